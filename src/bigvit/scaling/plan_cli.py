"""`bigvit-plan`: per-rank memory of a model under a parallel layout at any world size."""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from bigvit.config import register_schemas
from bigvit.errors import ConfigError
from bigvit.scaling.dryrun import dry_run
from bigvit.train.cli import CONF_DIR

register_schemas()
GIB = 1024**3


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


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="plan")
def main(cfg: DictConfig) -> None:
    try:
        if not cfg.plan.dry_run:
            raise ConfigError(
                "plan.dry_run=false (the analytic planner) is not available yet; use plan.dry_run=true"
            )
        if cfg.plan.format not in ("table", "json"):
            raise ConfigError(f"plan.format={cfg.plan.format!r} is not one of ['json', 'table']")
        report = dry_run(
            OmegaConf.to_container(cfg.model, resolve=True),
            cfg.parallel,
            int(cfg.plan.world_size),
            cfg.trainer.precision,
            cfg.optim.name,
        )
    except ConfigError as error:
        raise SystemExit(f"bigvit: error: {error}") from None
    if cfg.plan.format == "json":
        print(json.dumps(report))
    else:
        print_table(report)


if __name__ == "__main__":
    main()
