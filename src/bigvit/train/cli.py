"""`bigvit-train`: compose the Hydra config, set up the process group and run directory, then fit."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from bigvit.config import register_schemas, validate
from bigvit.errors import ConfigError
from bigvit.overrides import checked_main
from bigvit.parallel.distributed import DistEnv, broadcast_object, init_distributed, teardown
from bigvit.scaling.results import append_results, record_from_run
from bigvit.train.checkpoint import CheckpointError
from bigvit.train.loggers import format_rate
from bigvit.train.preemption import EXIT_PREEMPTED, Preempted
from bigvit.train.trainer import Trainer

# An absolute path: the config tree is data (conf/, linked into the package), not an importable module.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, MissingMandatoryValue)


register_schemas()


def setup_logging(env: DistEnv) -> None:
    """Progress on rank 0; other ranks report warnings and errors only, prefixed with their rank."""
    logger = logging.getLogger("bigvit")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    prefix = "" if env.is_main else f"[rank {env.rank}] "
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if env.is_main else logging.WARNING)
    logger.propagate = False


def log_to_run_dir(run_dir: Path, env: DistEnv) -> None:
    """Rank 0's console lines also go to <run_dir>/train.log (appended across resumes and requeues)."""
    if env.is_main:
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
        logging.getLogger("bigvit").addHandler(handler)


def git_state() -> dict:
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent)
        return result.stdout.strip() if result.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def resolve_run_dir(cfg: DictConfig, env: DistEnv) -> Path:
    """trainer.run_dir; in a sweep, the job's own directory (hydra.sweep.dir/subdir), which stays the
    same when a Slurm sweep job is requeued; else outputs/<date>/<time>_<name> decided on rank 0."""
    run_dir = cfg.trainer.run_dir
    if not run_dir:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            run_dir = HydraConfig.get().runtime.output_dir
        else:
            run_dir = broadcast_object(f"outputs/{time.strftime('%Y-%m-%d/%H-%M-%S')}_{cfg.trainer.name}")
    path = Path(run_dir)
    if env.is_main:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        run_info = {
            "argv": sys.argv,
            "git": git_state(),
            "world_size": env.world_size,
            "started": time.time(),
        }
        (path / "run.json").write_text(json.dumps(run_info, indent=1))
    return path


def closing_line(summary: dict, run_dir: Path) -> str:
    fields = (
        ("eval_top1", "eval top-1 {:.4f}"),
        ("train_loss", "train loss {:.4f}"),
        ("images_per_sec", "{} img/s"),
        ("mfu", "MFU {:.1%}"),
        ("wall_seconds", "{:.0f} s"),
    )
    shown = {**summary, "images_per_sec": format_rate(summary.get("images_per_sec") or 0.0)}
    parts = [fmt.format(shown[key]) for key, fmt in fields if summary.get(key) is not None]
    return f"finished step {summary['final_step']}: {' | '.join(parts)} → {run_dir / 'summary.json'}"


def run(cfg: DictConfig) -> dict:
    validate(cfg)  # before anything reads (or resolves, into run_dir/config.yaml) a bad value
    env = init_distributed(cfg.trainer.dist_timeout_s)
    setup_logging(env)
    try:
        run_dir = resolve_run_dir(cfg, env)
        log_to_run_dir(run_dir, env)
        summary = Trainer(cfg, env, run_dir).fit()
        logging.getLogger("bigvit").info(closing_line(summary, run_dir))
        if env.is_main and cfg.trainer.get("results_file"):
            added = append_results(cfg.trainer.results_file, [record_from_run(run_dir)])
            logging.getLogger("bigvit").info(
                "results → %s%s", cfg.trainer.results_file, "" if added else " (already there)"
            )
        return summary
    finally:
        teardown()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    try:
        summary = run(cfg)
    except USER_ERRORS as error:
        raise SystemExit(f"bigvit: error: {error}") from None
    except Preempted as stop:
        print(f"bigvit: {stop}", file=sys.stderr)
        raise SystemExit(EXIT_PREEMPTED) from None
    return summary.get("eval_top1")  # the objective a sweeper optimizes


def main() -> None:
    checked_main(CONF_DIR, "train", hydra_main)


if __name__ == "__main__":
    main()
