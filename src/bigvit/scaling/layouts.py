"""The layouts the planner compares on a cluster: bigvit's parallel strategies at concrete degrees.

FSDP over all GPUs; HSDP (shard within a node, replicate across nodes); FSDP × tensor parallel and
FSDP × Ulysses context parallel at each configured degree that fits in a node; DDP; DeepSpeed ZeRO 1-3;
each with activation checkpointing off and on. The mesh order is bigvit's (dp_replicate, dp_shard, cp,
tp): tp ranks are consecutive, so a tp (or cp × tp) group inside a node talks over NVLink.
"""

from __future__ import annotations

from dataclasses import dataclass

from bigvit.errors import ConfigError
from bigvit.models.vit import ViTConfig
from bigvit.parallel.mesh import ParallelDims
from bigvit.parallel.tensor import check_tp_layout
from bigvit.scaling.hardware import Cluster

CHECKPOINTING = ("none", "full")


@dataclass(frozen=True)
class Layout:
    name: str  # e.g. "fsdp_tp8+ac"
    strategy: str  # fsdp (FSDP2, also HSDP/TP/CP) | ddp | deepspeed | single (one process)
    dims: ParallelDims
    checkpointing: str = "none"
    zero_stage: int = 0  # DeepSpeed only
    sequence_parallel: bool = True  # with tp > 1

    @property
    def sequence_shards(self) -> int:
        """Ranks one image's token sequence is split over (cp × sequence-parallel tp)."""
        return self.dims.cp * (self.dims.tp if self.sequence_parallel else 1)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "strategy": self.strategy,
            "zero_stage": self.zero_stage,
            "dp_replicate": self.dims.dp_replicate,
            "dp_shard": self.dims.dp_shard,
            "cp": self.dims.cp,
            "tp": self.dims.tp,
            "sequence_parallel": self.sequence_parallel and self.dims.tp > 1,
            "activation_checkpointing": self.checkpointing,
        }


def _base_layouts(
    cfg: ViTConfig, cluster: Cluster, tp_degrees, cp_degrees, sequence_parallel: bool
) -> list[tuple[Layout, str | None]]:
    gpus, node = cluster.gpus, cluster.gpus_per_node
    layouts: list[tuple[Layout, str | None]] = [(Layout("fsdp", "fsdp", ParallelDims(1, gpus, 1, 1)), None)]
    if gpus > node:
        layouts.append((Layout("hsdp", "fsdp", ParallelDims(gpus // node, node, 1, 1)), None))
    for tp in tp_degrees:
        if tp > node or gpus % tp:
            continue
        # Any token count: with sequence parallel the model pads its sequence to a multiple of tp.
        sp = sequence_parallel
        problem = _problem(lambda tp=tp, sp=sp: check_tp_layout(cfg, tp, sp))
        layouts.append(
            (
                Layout(f"fsdp_tp{tp}", "fsdp", ParallelDims(1, gpus // tp, 1, tp), sequence_parallel=sp),
                problem,
            )
        )
    for cp in cp_degrees:
        if cp > node or gpus % cp:
            continue
        problem = None
        if cfg.heads % cp:
            problem = f"Ulysses cp={cp} needs the heads ({cfg.heads}) divisible by {cp}"
        elif cfg.window_size:
            problem = f"Ulysses cp={cp} does not compose with windowed attention (model.window_size)"
        layouts.append((Layout(f"fsdp_cp{cp}", "fsdp", ParallelDims(1, gpus // cp, cp, 1)), problem))
    layouts.append((Layout("ddp", "ddp", ParallelDims(gpus, 1, 1, 1)), None))
    for stage in (1, 2, 3):
        layouts.append(
            (Layout(f"zero{stage}", "deepspeed", ParallelDims(1, gpus, 1, 1), zero_stage=stage), None)
        )
    return layouts


def _problem(check) -> str | None:
    try:
        check()
    except ConfigError as error:
        return str(error)
    return None


def candidate_layouts(
    cfg: ViTConfig,
    cluster: Cluster,
    tp_degrees=(2, 4, 8),
    cp_degrees=(2, 4, 8),
    sequence_parallel: bool = True,
) -> list[tuple[Layout, str | None]]:
    """Every candidate with activation checkpointing off and on, each with why it cannot run (or None)."""
    out = []
    for layout, problem in _base_layouts(cfg, cluster, tp_degrees, cp_degrees, sequence_parallel):
        for mode in CHECKPOINTING:
            name = layout.name + ("+ac" if mode == "full" else "")
            out.append(
                (
                    Layout(
                        name, layout.strategy, layout.dims, mode, layout.zero_stage, layout.sequence_parallel
                    ),
                    problem,
                )
            )
    return out
