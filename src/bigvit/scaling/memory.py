"""Per-GPU memory of a layout: model states, activations, communication buffers and overheads.

Buffers, by strategy (sizes per GPU; p = compute-dtype bytes, r = reduce-dtype bytes):
- single (one process): none.
- FSDP2: `prefetch_blocks` blocks gathered unsharded (p each) plus the root module (embeddings, heads),
  which FSDP2 keeps gathered between forward and backward; one block's unsharded gradients and the
  reduce-dtype copy FSDP2 reduce-scatters from (p + r); with gradient accumulation, the unsharded gradients
  of the whole (tp-local) model in the reduce dtype, because bigvit skips the reduce-scatter on all but the
  last micro-batch (FSDP2's set_requires_gradient_sync(False) accumulates them unsharded).
- DDP: the bf16 weight copies autocast keeps for backward, and the gradient buckets DDP all-reduces from
  (a second copy of the fp32 gradients: torch's default gradient_as_bucket_view=False).
- DeepSpeed ZeRO: its reduce bucket (and, stages 1-2, the all-gather bucket for the updated parameters) at
  DeepSpeed's default sizes, capped at the model; stage 3 gathers blocks like FSDP2.
Activations are the saved-for-backward bytes of one micro-batch (scaling/activations.py) plus the
transient working set of one block's backward. On top of all tensors: the allocator overhead fraction,
then a fixed reserve for CUDA/NCCL.
"""

from __future__ import annotations

from bigvit.models.vit import ViTConfig
from bigvit.parallel.parallelize import DTYPES
from bigvit.scaling.activations import ActivationLayout, activation_breakdown, backward_working_bytes
from bigvit.scaling.assumptions import (
    DEEPSPEED_ALLGATHER_BUCKET_ELEMENTS,
    DEEPSPEED_REDUCE_BUCKET_ELEMENTS,
    Assumptions,
)
from bigvit.scaling.flops import param_count
from bigvit.scaling.layouts import Layout
from bigvit.scaling.model_state import model_state_bytes, unsharded_elements

GIB = 2**30


def activation_precision(strategy: str, precision: str) -> str:
    """How activations are stored: FSDP2 (MixedPrecisionPolicy) and DeepSpeed cast the parameters, so the
    whole forward runs in the low precision; DDP runs fp32 parameters under autocast."""
    if precision == "fp32":
        return "fp32"
    return "autocast" if strategy == "ddp" else "bf16"


def activation_layout(layout: Layout, micro_batch: int, precision: str) -> ActivationLayout:
    return ActivationLayout(
        micro_batch=micro_batch,
        precision=activation_precision(layout.strategy, precision),
        checkpointing=layout.checkpointing,
        tp=layout.dims.tp,
        sequence_parallel=layout.sequence_parallel,
        cp=layout.dims.cp,
    )


def buffer_bytes(
    cfg: ViTConfig,
    layout: Layout,
    grad_accum: int,
    precision: str,
    reduce_dtype: str,
    weight_copies: int,
    assumptions: Assumptions,
) -> dict[str, int]:
    """Communication and mixed-precision buffers per GPU, by kind (see the module docstring)."""
    p, r = DTYPES[precision].itemsize, DTYPES[reduce_dtype].itemsize
    sizes = unsharded_elements(cfg, layout.dims.tp)
    block, root, total = sizes["block"], sizes["root"], param_count(cfg)
    gathered = (assumptions.prefetch_blocks * block + root) * p
    if layout.strategy == "single":  # one process, no collectives
        return {}
    if layout.strategy == "fsdp":
        local_model = cfg.depth * block + root
        return {
            "all_gather": gathered,
            "reduce_scatter": max(block, root) * (p + r),
            "grad_accumulation": local_model * r if grad_accum > 1 else 0,
        }
    if layout.strategy == "ddp":
        return {"weight_copies": weight_copies, "grad_buckets": total * r}
    reduce_bucket = min(DEEPSPEED_REDUCE_BUCKET_ELEMENTS, total) * p
    if layout.zero_stage == 3:
        return {"all_gather": gathered, "reduce_bucket": reduce_bucket}
    return {
        "reduce_bucket": reduce_bucket,
        "all_gather_bucket": min(DEEPSPEED_ALLGATHER_BUCKET_ELEMENTS, total) * p,
    }


def memory_breakdown(
    cfg: ViTConfig,
    layout: Layout,
    micro_batch: int,
    grad_accum: int,
    assumptions: Assumptions,
    optimizer: str = "adamw",
    precision: str = "bf16",
    reduce_dtype: str = "fp32",
) -> dict[str, int]:
    """Bytes per GPU: params, grads, optimizer (as the dry run reports them), activations, buffers,
    overhead, reserved and their total."""
    if layout.strategy == "ddp" and precision != "fp32":
        reduce_dtype = "fp32"  # DDP reduces the fp32 gradients of fp32 parameters
    if layout.strategy == "deepspeed":
        reduce_dtype = precision  # DeepSpeed communicates in the model's dtype by default
    state = model_state_bytes(
        cfg, layout.strategy, layout.dims, optimizer, precision, reduce_dtype, layout.zero_stage
    )
    acts = activation_layout(layout, micro_batch, precision)
    saved = activation_breakdown(cfg, acts)
    weight_copies = saved.pop("weight_copies")
    buffers = buffer_bytes(cfg, layout, grad_accum, precision, reduce_dtype, weight_copies, assumptions)
    memory = {
        "params_bytes": state["params_bytes"],
        "grads_bytes": state["grads_bytes"],
        "optimizer_bytes": state["optimizer_bytes"],
        "activations_bytes": sum(saved.values()) + backward_working_bytes(cfg, acts),
        "buffers_bytes": sum(buffers.values()),
    }
    memory["overhead_bytes"] = int(assumptions.allocator_overhead * sum(memory.values()))
    memory["reserved_bytes"] = int(assumptions.reserved_gib * GIB)
    memory["total_bytes"] = sum(memory.values())
    memory["buffers"] = buffers
    return memory
