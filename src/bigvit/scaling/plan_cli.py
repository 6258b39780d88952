"""`bigvit-plan`: the analytic planner over a cluster (cluster.gpus=N), or a dry run of one layout.

plan.dry_run=true runs the layout in `parallel` on plan.world_size fake ranks; false runs the planner,
which needs cluster.gpus; null (the default) picks the planner exactly when cluster.gpus is set.
"""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from bigvit.config import register_schemas
from bigvit.errors import ConfigError
from bigvit.models.registry import model_config
from bigvit.models.vit import ViTConfig
from bigvit.overrides import checked_main
from bigvit.scaling.assumptions import Assumptions
from bigvit.scaling.dryrun import dry_run
from bigvit.scaling.hardware import build_cluster
from bigvit.scaling.planner import plan
from bigvit.train.cli import CONF_DIR

register_schemas()
GIB = 1024**3
FORMATS = ("json", "table")
# Wide enough for the planner's table when stdout is not a terminal (a file, a pipe, a CI log).
MIN_WIDTH = 150


def print_table(report: dict) -> None:
    table = Table(
        title=f"{report['model']} · {report['strategy']} · {report['world_size']} ranks · "
        f"layout {report['layout']}"
    )
    for column in ("per rank", "GiB", "elements"):
        table.add_column(column, justify="right")
    for key in ("params_bytes", "grads_bytes", "optimizer_bytes"):
        table.add_row(key.removesuffix("_bytes"), f"{report[key] / GIB:.3f}", "")
    model_state = report["params_bytes"] + report["grads_bytes"] + report["optimizer_bytes"]
    table.add_row("model state", f"{model_state / GIB:.3f}", f"{report['params_per_rank']:,}")
    Console().print(table)
    print(f"{report['total_params']:,} parameters in all; dry run took {report['seconds']:.1f} s")


def layout_label(candidate: dict) -> str:
    dims = "×".join(
        f"{key} {candidate[key]}" for key in ("dp_replicate", "dp_shard", "cp", "tp") if candidate[key] > 1
    )
    no_sp = ", no SP" if candidate["tp"] > 1 and not candidate["sequence_parallel"] else ""
    return f"{candidate['name']} ({dims or 'one rank'}{no_sp})"


def print_padding(report: dict) -> None:
    """One line naming the layouts whose sharded sequence carries padding tokens (timed and sized)."""
    padded: dict[int, list[str]] = {}
    for c in report["candidates"]:
        if not c["problem"] and c["tokens"] > report["train_tokens"] and not c["name"].endswith("+ac"):
            padded.setdefault(c["tokens"], []).append(c["name"])
    if padded:
        parts = "; ".join(f"{tokens} under {', '.join(names)}" for tokens, names in sorted(padded.items()))
        print(
            f"tokens: {report['train_tokens']} per image, padded to a multiple of the sequence shards "
            f"(masked out of attention, counted in time and memory): {parts}"
        )


def print_plan(report: dict) -> None:
    cluster, hw = report["cluster"], report["hardware"]
    table = Table(
        title=f"{report['model']} ({report['params'] / 1e9:.2f} B params) on {cluster['gpus']} × "
        f"{cluster['gpu']} ({cluster['nodes']} nodes of {cluster['gpus_per_node']}), global batch "
        f"{report['global_batch']}, {report['precision']}, {report['optimizer']}; memory in GiB per GPU"
    )
    columns = (
        "layout",
        "micro×accum",
        "params",
        "grads",
        "optim",
        "activ",
        "buffers",
        "total",
        "fits",
        "step s",
        "img/s",
        "MFU",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "layout" else "right")
    for c in report["candidates"]:
        if c["problem"]:
            table.add_row(layout_label(c), *["-"] * 7, "n/a", *["-"] * 3)
            continue
        m, t = c["memory"], c["time"]
        gib = [
            f"{m[k] / GIB:.1f}"
            for k in (
                "params_bytes",
                "grads_bytes",
                "optimizer_bytes",
                "activations_bytes",
                "buffers_bytes",
                "total_bytes",
            )
        ]
        marker = " ◀" if c["name"] == report["recommended"] else ""
        table.add_row(
            layout_label(c) + marker,
            f"{c['micro_batch']}×{c['grad_accum']}",
            *gib,
            "yes" if c["fits"] else "NO",
            f"{t['step_s']:.2f}",
            f"{t['images_per_s']:.0f}",
            f"{t['mfu']:.1%}",
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, MIN_WIDTH))
    console.print(table)
    for c in report["candidates"]:
        if c["problem"]:
            print(f"n/a {c['name']}: {c['problem']}")
    print_padding(report)
    best = next((c for c in report["candidates"] if c["name"] == report["recommended"]), None)
    if best is None:
        print(
            "recommendation: none — no layout fits in GPU memory at any micro-batch; add GPUs, use "
            "optim=lean, or a GPU with more memory"
        )
    else:
        t = best["time"]
        accum = f", {best['grad_accum']} accumulation steps" if best["grad_accum"] > 1 else ""
        print(
            f"recommendation: {layout_label(best)}, micro-batch {best['micro_batch']}{accum}: "
            f"{best['memory']['total_bytes'] / GIB:.1f} of {best['hbm_bytes'] / GIB:.0f} GiB, step "
            f"{t['step_s']:.2f} s (compute {t['compute_s']:.2f}, tp {t['tp_s']:.2f}, cp {t['cp_s']:.2f}, "
            f"exposed dp {t['dp_exposed_s']:.2f} of {t['dp_comm_s']:.2f}, optimizer {t['optimizer_s']:.3f}), "
            f"{t['images_per_s']:.0f} img/s, MFU {t['mfu']:.1%}"
        )
    a = report["assumptions"]
    print(
        f"hardware ({hw['source']}): {hw['peak_bf16_tflops']:.1f} TFLOP/s dense bf16, {hw['hbm_gib']:.0f} GiB HBM "
        f"at {hw['hbm_gb_per_s']:.0f} GB/s, NVLink {hw['nvlink_gb_per_s']:.0f} GB/s and network "
        f"{hw['network_gbit_per_s_per_gpu']:.0f} Gb/s per GPU per direction"
    )
    print(
        f"assumptions: matmul efficiency {a['matmul_efficiency']:.0%} of peak; collectives at "
        f"{a['comm_efficiency']:.0%} of line rate; overlap {a['comm_overlap']:.0%}: {a['overlap']}; "
        f"allocator overhead {a['allocator_overhead']:.0%} of tensor bytes + {a['reserved_gib']} GiB reserved; "
        f"{a['prefetch_blocks']} blocks gathered at once; DeepSpeed buckets "
        f"{a['deepspeed_reduce_bucket_elements']:.0e} elements; compute: {a['compute']}; "
        f"optimizer step {a['optimizer_step']}; ties within {a['tie_tolerance']:.0%} go to less memory"
    )


def use_dry_run(cfg: DictConfig) -> bool:
    """plan.dry_run, with null meaning "the planner when cluster.gpus is set, else the dry run"."""
    mode, gpus = cfg.plan.dry_run, cfg.cluster.gpus
    if mode is None:
        return gpus is None
    if not mode and gpus is None:
        raise ConfigError("plan.dry_run=false runs the analytic planner, which needs cluster.gpus=N")
    return bool(mode)


def run_planner(cfg: DictConfig, model: ViTConfig | None = None) -> dict:
    """The planner on cfg's cluster and assumptions, for `model` (default: the config's model)."""
    cluster = build_cluster(
        cfg.cluster.gpus, cfg.cluster.gpu, cfg.cluster.gpus_per_node, cfg.cluster.network_gbit_per_s
    )
    return plan(
        model or model_config(OmegaConf.to_container(cfg.model, resolve=True)),
        cluster,
        Assumptions.from_config(cfg.plan),
        cfg.data.batch_size,
        optimizer=cfg.optim.name,
        precision=cfg.trainer.precision,
        reduce_dtype=cfg.parallel.reduce_dtype,
        tp_degrees=tuple(cfg.plan.tp_degrees),
        cp_degrees=tuple(cfg.plan.cp_degrees),
        sequence_parallel=cfg.parallel.get("sequence_parallel", True),
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="plan")
def hydra_main(cfg: DictConfig) -> None:
    try:
        if cfg.plan.format not in FORMATS:
            raise ConfigError(f"plan.format={cfg.plan.format!r} is not one of {list(FORMATS)}")
        dry = use_dry_run(cfg)
        if dry:
            report = dry_run(
                OmegaConf.to_container(cfg.model, resolve=True),
                cfg.parallel,
                int(cfg.plan.world_size),
                cfg.trainer.precision,
                cfg.optim.name,
            )
        else:
            report = run_planner(cfg)
    except ConfigError as error:
        raise SystemExit(f"bigvit: error: {error}") from None
    if cfg.plan.format == "json":
        print(json.dumps(report))
    elif dry:
        print_table(report)
    else:
        print_plan(report)


def main() -> None:
    checked_main(CONF_DIR, "plan", hydra_main)


if __name__ == "__main__":
    main()
