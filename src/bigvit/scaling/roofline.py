"""Step time and MFU of a layout from a stated roofline (see Assumptions.describe for the overlap rules).

    compute    = FLOPs per GPU / (peak × matmul_efficiency)
    collective = bytes × (n−1)/n / (link line rate × comm_efficiency)   (ring; all-reduce = 2 × that)
    optimizer  = 2 × model-state bytes per GPU / HBM bandwidth
    step       = compute + tp + cp + exposed data-parallel communication + optimizer
    MFU        = model FLOPs (3 × forward, no recomputation) / (step × peak × GPUs)

Per micro-batch, a tensor-parallel block exchanges its b·N/c·W activations 4 times per pass (all-gather
before attention and MLP, reduce-scatter after; 3 in a parallel block whose one norm feeds both), or 2
all-reduces without sequence parallel; Ulysses exchanges q, k, v and the attention output (4 × b·N/c·W/tp)
by all-to-all. Passes: forward, backward, and the recomputed forward of checkpointed blocks.
"""

from __future__ import annotations

from bigvit.models.vit import ViTConfig, padded_length
from bigvit.parallel.parallelize import DTYPES
from bigvit.scaling.activations import checkpointed_blocks
from bigvit.scaling.assumptions import DDP_BUCKET_BYTES, DEEPSPEED_OVERLAP_COMM_STAGES, Assumptions
from bigvit.scaling.flops import forward_flops_breakdown, param_count, train_flops
from bigvit.scaling.hardware import Cluster
from bigvit.scaling.layouts import Layout
from bigvit.scaling.memory import activation_layout
from bigvit.scaling.model_state import unsharded_elements


def peak_flops(cluster: Cluster, precision: str) -> float:
    """Per-GPU dense peak FLOP/s in the training precision (fp32 matmuls run as TF32 at half the bf16 peak)."""
    return cluster.gpu.peak_bf16_tflops * 1e12 / (2 if precision == "fp32" else 1)


def recompute_share(cfg: ViTConfig, layout: Layout) -> float:
    """Fraction of the blocks whose forward runs again in backward (activation checkpointing)."""
    return checkpointed_blocks(cfg, activation_layout(layout, 1, "fp32")) / cfg.depth


def compute_flops(cfg: ViTConfig, layout: Layout, images_per_group: int) -> dict[str, float]:
    """FLOPs one GPU executes per step (forward, backward incl. recomputation): blocks and MAP head split
    over its tp × cp group, patch embedding and classifier replicated on each member."""
    # As executed: the tokens patch dropout keeps, padded to a multiple of the sequence shards.
    parts = forward_flops_breakdown(cfg, training=True, sequence_multiple=layout.sequence_shards)
    split = layout.dims.tp * layout.dims.cp
    blocks = parts["blocks"] + parts.get("text_blocks", 0)  # an image–text model's towers split alike
    forward = images_per_group * (
        (blocks + parts["map_head"]) / split + parts["patch_embed"] + parts["head"] + parts.get("text_head", 0)
    )
    recompute = images_per_group * blocks / split * recompute_share(cfg, layout)
    return {"forward": forward, "backward": 2 * forward + recompute}


def _collective_seconds(bytes_: float, ranks: int, extent: int, cluster: Cluster, efficiency: float) -> float:
    """A ring all-gather / reduce-scatter of a `bytes_` tensor over `ranks` ranks spanning `extent` GPUs."""
    if ranks <= 1:
        return 0.0
    return bytes_ * (ranks - 1) / ranks / (cluster.link_bytes_per_s(extent) * efficiency)


def model_parallel_seconds(
    cfg: ViTConfig,
    layout: Layout,
    cluster: Cluster,
    micro_batch: int,
    grad_accum: int,
    precision: str,
    efficiency: float,
) -> dict[str, float]:
    """Tensor- and context-parallel communication per step (on the critical path)."""
    tp, cp = layout.dims.tp, layout.dims.cp
    act = 2 if precision != "fp32" else 4
    passes = 2 + recompute_share(cfg, layout)
    stream = micro_batch * padded_length(cfg.train_tokens, layout.sequence_shards) // cp * cfg.width * act
    # Without sequence parallel: two all-reduces per pass, each the cost of two all-gathers.
    exchanges = 3 if layout.sequence_parallel and cfg.parallel_block else 4
    tp_s = (
        grad_accum * cfg.depth * passes * exchanges * _collective_seconds(stream, tp, tp, cluster, efficiency)
    )
    cp_s = (
        grad_accum
        * cfg.depth
        * passes
        * 4
        * _collective_seconds(stream / tp, cp, cp * tp, cluster, efficiency)
    )
    return {"tp_s": tp_s, "cp_s": cp_s}


def data_parallel_seconds(
    cfg: ViTConfig,
    layout: Layout,
    cluster: Cluster,
    grad_accum: int,
    precision: str,
    reduce_dtype: str,
    efficiency: float,
) -> dict[str, float]:
    """Data-parallel communication per step: what may overlap compute, what must not, and the part of the
    overlappable traffic that never can (first gather, last reduce)."""
    dims, p = layout.dims, DTYPES[precision].itemsize
    sizes = unsharded_elements(cfg, dims.tp)
    model = cfg.depth * sizes["block"] + sizes["root"]  # elements per tp rank
    if layout.strategy == "ddp":
        r = DTYPES["fp32"].itemsize  # DDP reduces the gradients of its fp32 parameters
        all_reduce = 2 * _collective_seconds(model * r, dims.world_size, cluster.gpus, cluster, efficiency)
        tail = 2 * _collective_seconds(DDP_BUCKET_BYTES, dims.world_size, cluster.gpus, cluster, efficiency)
        return {"overlappable": all_reduce, "serial": 0.0, "tail": min(tail, all_reduce)}
    if layout.strategy == "deepspeed":
        ranks = dims.world_size
        gather = _collective_seconds(param_count(cfg) * p, ranks, cluster.gpus, cluster, efficiency)
        if layout.zero_stage == 3:
            per_micro = 3 * gather  # gather forward, gather backward, reduce-scatter (all in bf16)
            block_share = sizes["block"] / model
            return {"overlappable": grad_accum * per_micro, "serial": 0.0, "tail": 2 * gather * block_share}
        reductions = grad_accum if layout.zero_stage == 2 else 1  # stage 2 reduces every micro-batch
        total = reductions * gather + gather  # reduce-scatter(s), then the updated parameters' all-gather
        overlaps = layout.zero_stage in DEEPSPEED_OVERLAP_COMM_STAGES
        return {"overlappable": total if overlaps else 0.0, "serial": 0.0 if overlaps else total, "tail": 0.0}
    # FSDP2 over dp_shard × cp (consecutive after tp), HSDP all-reduces the shards across replicas.
    shards, extent = dims.dp_shard * dims.cp, dims.dp_shard * dims.cp * dims.tp
    r = DTYPES[reduce_dtype].itemsize
    gather = _collective_seconds(model * p, shards, extent, cluster, efficiency)
    reduce = _collective_seconds(model * r, shards, extent, cluster, efficiency)
    replicas = 2 * _collective_seconds(
        model * r / shards, dims.dp_replicate, cluster.gpus, cluster, efficiency
    )
    block_share = sizes["block"] / model
    return {
        "overlappable": grad_accum * 2 * gather + reduce + replicas,
        "serial": 0.0,
        "tail": (gather + reduce) * block_share,
    }


def step_time(
    cfg: ViTConfig,
    layout: Layout,
    cluster: Cluster,
    assumptions: Assumptions,
    global_batch: int,
    micro_batch: int,
    grad_accum: int,
    state_bytes: int,
    precision: str = "bf16",
    reduce_dtype: str = "fp32",
) -> dict[str, float]:
    """Seconds per optimizer step by part, images/s and MFU for one layout."""
    peak = peak_flops(cluster, precision)
    images_per_group = micro_batch * grad_accum
    flops = compute_flops(cfg, layout, images_per_group)
    compute = (flops["forward"] + flops["backward"]) / (peak * assumptions.matmul_efficiency)
    eff = assumptions.comm_efficiency
    model_parallel = model_parallel_seconds(cfg, layout, cluster, micro_batch, grad_accum, precision, eff)
    dp = data_parallel_seconds(cfg, layout, cluster, grad_accum, precision, reduce_dtype, eff)
    hidden = min(assumptions.comm_overlap * (dp["overlappable"] - dp["tail"]), compute)
    dp_exposed = dp["overlappable"] - hidden + dp["serial"]
    optimizer = 2 * state_bytes / (cluster.gpu.hbm_gb_per_s * 1e9)
    total = compute + model_parallel["tp_s"] + model_parallel["cp_s"] + dp_exposed + optimizer
    model_flops = train_flops(cfg, batch=global_batch)
    return {
        "compute_s": compute,
        **model_parallel,
        "dp_comm_s": dp["overlappable"] + dp["serial"],
        "dp_exposed_s": dp_exposed,
        "optimizer_s": optimizer,
        "step_s": total,
        "images_per_s": global_batch / total,
        "mfu": model_flops / (total * peak * cluster.gpus),
    }
