"""The analytic planner: for a model, a cluster and a global batch, every candidate layout's per-GPU
memory, whether it fits, its step time and MFU, and the recommended one.

Each layout gets the largest per-GPU micro-batch that fits (global batch / data-parallel ranks, divided
by a whole number of gradient-accumulation steps); the recommendation is the fitting layout with the
highest estimated throughput, the one with less memory among those within `tie_tolerance` of it.
"""

from __future__ import annotations

from bigvit.errors import ConfigError
from bigvit.models.vit import ViTConfig, padded_length
from bigvit.scaling.assumptions import Assumptions
from bigvit.scaling.flops import forward_flops, param_count
from bigvit.scaling.hardware import Cluster
from bigvit.scaling.layouts import Layout, candidate_layouts
from bigvit.scaling.memory import GIB, memory_breakdown
from bigvit.scaling.roofline import step_time


def data_parallel_ranks(layout: Layout) -> int:
    """Ranks that read different images (a tp × cp group shares its batch)."""
    return layout.dims.dp


def _divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def evaluate(
    cfg: ViTConfig,
    layout: Layout,
    cluster: Cluster,
    assumptions: Assumptions,
    global_batch: int,
    optimizer: str,
    precision: str,
    reduce_dtype: str,
) -> dict:
    """One candidate: memory at the largest micro-batch that fits (or at 1 image if none does), step time."""
    ranks = data_parallel_ranks(layout)
    if global_batch % ranks:
        raise ConfigError(
            f"data.batch_size={global_batch} does not split over the {ranks} data-parallel ranks of this layout"
        )
    per_rank = global_batch // ranks
    hbm = int(cluster.gpu.hbm_gib * GIB)
    for micro in _divisors_descending(per_rank):
        memory = memory_breakdown(
            cfg, layout, micro, per_rank // micro, assumptions, optimizer, precision, reduce_dtype
        )
        if memory["total_bytes"] <= hbm:
            break
    accum = per_rank // micro
    state = memory["params_bytes"] + memory["grads_bytes"] + memory["optimizer_bytes"]
    timing = step_time(
        cfg, layout, cluster, assumptions, global_batch, micro, accum, state, precision, reduce_dtype
    )
    return {
        **layout.describe(),
        "micro_batch": micro,
        "grad_accum": accum,
        "memory": memory,
        "hbm_bytes": hbm,
        "fits": memory["total_bytes"] <= hbm,
        # The training sequence (after patch dropout), padded to a multiple of the sequence shards.
        "tokens": padded_length(cfg.train_tokens, layout.sequence_shards),
        "time": timing,
        "problem": None,
    }


def recommend(candidates: list[dict], tie_tolerance: float) -> dict | None:
    """The fitting candidate with the best throughput; within `tie_tolerance` of it, the least memory."""
    fitting = [c for c in candidates if c["fits"]]
    if not fitting:
        return None
    best = max(c["time"]["images_per_s"] for c in fitting)
    ties = [c for c in fitting if c["time"]["images_per_s"] >= best * (1 - tie_tolerance)]
    return min(ties, key=lambda c: c["memory"]["total_bytes"])


def plan(
    cfg: ViTConfig,
    cluster: Cluster,
    assumptions: Assumptions,
    global_batch: int,
    optimizer: str = "adamw",
    precision: str = "bf16",
    reduce_dtype: str = "fp32",
    tp_degrees=(2, 4, 8),
    cp_degrees=(2, 4, 8),
    sequence_parallel: bool = True,
) -> dict:
    """The planner's whole report as one JSON-ready dict (see plan_cli for its printed form)."""
    if not isinstance(global_batch, int) or global_batch < 1:
        raise ConfigError(f"data.batch_size={global_batch!r} must be a positive integer (the global batch)")
    candidates = []
    for layout, problem in candidate_layouts(cfg, cluster, tp_degrees, cp_degrees, sequence_parallel):
        try:
            if problem:
                raise ConfigError(problem)
            candidates.append(
                evaluate(cfg, layout, cluster, assumptions, global_batch, optimizer, precision, reduce_dtype)
            )
        except ConfigError as error:
            candidates.append({**layout.describe(), "fits": False, "problem": str(error)})
    best = recommend(candidates, assumptions.tie_tolerance)
    gpu = cluster.gpu
    return {
        "model": cfg.name,
        "params": param_count(cfg),
        "forward_gflops_per_image": forward_flops(cfg) / 1e9,
        "train_tokens": cfg.train_tokens,
        "global_batch": global_batch,
        "precision": precision,
        "optimizer": optimizer,
        "reduce_dtype": reduce_dtype,
        "cluster": {
            "gpus": cluster.gpus,
            "gpu": cluster.gpu_name,
            "gpus_per_node": cluster.gpus_per_node,
            "nodes": cluster.nodes,
        },
        "hardware": {
            "peak_bf16_tflops": gpu.peak_bf16_tflops,
            "hbm_gib": gpu.hbm_gib,
            "hbm_gb_per_s": gpu.hbm_gb_per_s,
            "nvlink_gb_per_s": gpu.nvlink_gb_per_s,
            "network_gbit_per_s_per_gpu": cluster.nic_gbit_per_s,
            "source": "vendor datasheets (scaling/hardware.py)",
        },
        "assumptions": assumptions.describe(),
        "candidates": candidates,
        "recommended": best["name"] if best else None,
    }
