"""The planner's stated assumptions: every number it uses that is not a datasheet figure or a count.

The tunable ones come from conf/plan.yaml (`plan.*`); the rest are the defaults of the libraries bigvit
runs, named here so that the planner prints them next to its answer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from bigvit.errors import ConfigError

# DeepSpeed's defaults (deepspeed/runtime/zero/config.py), which bigvit's DeepSpeed config leaves as they are.
DEEPSPEED_REDUCE_BUCKET_ELEMENTS = 500_000_000  # zero_optimization.reduce_bucket_size
DEEPSPEED_ALLGATHER_BUCKET_ELEMENTS = 500_000_000  # zero_optimization.allgather_bucket_size (stages 1-2)
DEEPSPEED_OVERLAP_COMM_STAGES = (3,)  # overlap_comm defaults to true only for stage 3
# torch DDP's default bucket_cap_mb: the last bucket's all-reduce cannot overlap backward.
DDP_BUCKET_BYTES = 25 * 2**20


@dataclass(frozen=True)
class Assumptions:
    matmul_efficiency: float = 0.6  # achieved fraction of the peak FLOP/s over a whole fwd+bwd
    comm_efficiency: float = 0.8  # achieved fraction of the NVLink / network line rate in collectives
    comm_overlap: float = 1.0  # fraction of data-parallel communication that can hide behind compute
    allocator_overhead: float = 0.10  # caching-allocator fragmentation, as a fraction of all tensor bytes
    reserved_gib: float = 2.0  # per GPU, not tensors: CUDA context, NCCL buffers, cuBLAS workspaces
    prefetch_blocks: int = 2  # FSDP2 / ZeRO-3 blocks unsharded at once (current + prefetched)
    tie_tolerance: float = 0.01  # throughputs this close count as a tie; the smaller memory wins

    def __post_init__(self):
        for key in ("matmul_efficiency", "comm_efficiency"):
            if not 0 < getattr(self, key) <= 1:
                raise ConfigError(f"plan.{key}={getattr(self, key)} must lie in (0, 1]")
        for key in ("comm_overlap", "allocator_overhead", "tie_tolerance"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"plan.{key}={getattr(self, key)} must lie in [0, 1]")
        if self.reserved_gib < 0 or self.prefetch_blocks < 1:
            raise ConfigError(
                f"plan.reserved_gib={self.reserved_gib} must be >= 0 and "
                f"plan.prefetch_blocks={self.prefetch_blocks} >= 1"
            )

    @classmethod
    def from_config(cls, plan_cfg) -> Assumptions:
        return cls(**{key: plan_cfg[key] for key in asdict(cls()) if key in plan_cfg})

    def describe(self) -> dict:
        """Everything assumed, with the library defaults, for printing and for the JSON report."""
        return {
            **asdict(self),
            "deepspeed_reduce_bucket_elements": DEEPSPEED_REDUCE_BUCKET_ELEMENTS,
            "deepspeed_allgather_bucket_elements": DEEPSPEED_ALLGATHER_BUCKET_ELEMENTS,
            "deepspeed_overlap_comm_stages": list(DEEPSPEED_OVERLAP_COMM_STAGES),
            "ddp_bucket_bytes": DDP_BUCKET_BYTES,
            "overlap": "data-parallel collectives (FSDP/HSDP/ZeRO-3 gathers and reduce-scatters, DDP "
            "all-reduce) overlap compute except the first block's gather and the last reduce; ZeRO-1/2 "
            "reductions and their post-step parameter gather, tensor- and context-parallel collectives "
            "and the optimizer step are not overlapped",
            "compute": "matmul FLOPs from scaling/flops.py (backward = 2x forward, +1 forward of the "
            "blocks with activation checkpointing) at matmul_efficiency x peak; embedding and "
            "classifier replicated on every tp/cp rank",
            "optimizer_step": "reads and writes every model-state byte once, at HBM bandwidth",
        }
