#!/usr/bin/env bash
# One node: bigvit-train on every local GPU (2 processes on a CPU-only machine).
# Arguments are Hydra overrides, passed through:
#   launch/torchrun.sh experiment=digits
#   NPROC=8 launch/torchrun.sh model=vit_l16 parallel=fsdp trainer.precision=bf16
set -euo pipefail
PYTHON=${PYTHON:-python3}
NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m bigvit.train "$@"
