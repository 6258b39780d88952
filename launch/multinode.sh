#!/usr/bin/env bash
# Several nodes: run this on every node; they meet at a c10d rendezvous on MASTER_ADDR:MASTER_PORT
# (ranks are assigned by the rendezvous, so NODE_RANK is not needed). NNODES may be a range
# MIN:MAX for an elastic job. Arguments are Hydra overrides, passed through:
#   MASTER_ADDR=node0 NNODES=4 launch/multinode.sh model=vit_g14 parallel=hsdp parallel.dp_shard=8
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}"
PYTHON=${PYTHON:-python3}
MASTER_PORT=${MASTER_PORT:-29500}
NNODES=${NNODES:-1}
NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')}
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${RDZV_ID:-bigvit}" \
  --max_restarts="${MAX_RESTARTS:-0}" -m bigvit.train "$@"
