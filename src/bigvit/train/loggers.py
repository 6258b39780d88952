"""Run loggers on rank 0: console lines, metrics.jsonl, Weights & Biases (online, offline or disabled)
and TensorBoard, for those without W&B."""

from __future__ import annotations

import json
import logging
import netrc
import os
import uuid
from pathlib import Path

from bigvit.extras import require

log = logging.getLogger("bigvit")

# W&B checkpoint artifacts: none; a reference to the files (no copy: checkpoints of big models are
# terabytes, and the run dir is usually on shared storage); or an upload of the files.
CHECKPOINT_ARTIFACTS = ("none", "reference", "upload")


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def format_rate(value: float) -> str:
    """812 | 45.3 | 0.025: whole numbers when large, digits when small (a 1B-parameter step on a CPU)."""
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def console_line(step: int, max_steps: int, metrics: dict, eta_seconds: float) -> str:
    if "images_per_sec" in metrics:
        metrics = {**metrics, "images_per_sec": format_rate(metrics["images_per_sec"])}
    parts = [f"step {step}/{max_steps}"]
    fields = (
        ("loss", "loss {:.4f}"),
        ("lr", "lr {:.2e}"),
        ("grad_norm", "gnorm {:.3f}"),
        ("images_per_sec", "{} img/s"),
        ("mfu", "mfu {:.1%}"),
        ("resolution", "{:.0f} px"),
    )
    parts += [fmt.format(metrics[key]) for key, fmt in fields if key in metrics]
    skipped = sum(v for k, v in metrics.items() if k.startswith("data/skipped_"))
    if skipped:  # bad data is worth a glance on the console, not only in the metrics
        parts.append(f"skipped {skipped:.0f} bad")
    parts.append(f"eta {format_duration(eta_seconds)}")
    return " | ".join(parts)


def wandb_mode(mode: str) -> str:
    """`auto` → online when an API key is configured (env or ~/.netrc), else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        has_key = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        has_key = False
    return "online" if has_key else "offline"


class WandbLogger:
    """Rank-0 W&B run in `<run_dir>/wandb`; the run id is kept in the run dir so a resumed run continues it."""

    def __init__(self, cfg, run_dir: Path, config: dict):
        self.mode = wandb_mode(cfg.mode)
        self.run = None
        if self.mode == "disabled":
            return
        import wandb

        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or run_dir.name,
            group=cfg.group,
            tags=list(cfg.tags),
            config=config,
            dir=str(run_dir),
            mode=self.mode,
            id=run_id,
            resume="allow",
        )
        self.artifacts = cfg.checkpoint_artifacts
        log.info("W&B %s run %s in %s", self.mode, run_id, self.run.dir)

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def checkpoint(self, path: Path, step: int) -> None:
        """Record the checkpoint as a versioned W&B artifact (aliases latest and step_N)."""
        if self.run is None or self.artifacts == "none":
            return
        import wandb

        artifact = wandb.Artifact(f"checkpoint-{self.run.id}", type="checkpoint", metadata={"step": step})
        if self.artifacts == "reference":
            artifact.add_reference(path.resolve().as_uri(), name=path.name)
        else:
            artifact.add_dir(str(path), name=path.name)
        self.run.log_artifact(artifact, aliases=["latest", f"step_{step}"])

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class JsonlLogger:
    """Every logged step as one JSON line in `<run_dir>/metrics.jsonl`: readable without W&B, easy to plot."""

    def __init__(self, path: Path):
        self.file = path.open("a", buffering=1)

    def log(self, metrics: dict, step: int) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")

    def summary(self, values: dict) -> None:
        pass

    def checkpoint(self, path: Path, step: int) -> None:
        pass

    def finish(self) -> None:
        self.file.close()


class TensorBoardLogger:
    """Scalars in `<run_dir>/tensorboard` (`tensorboard --logdir outputs`); needs `pip install bigvit[tensorboard]`."""

    def __init__(self, run_dir: Path):
        require("tensorboard", "logger.tensorboard=true")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, global_step=step)

    def summary(self, values: dict) -> None:
        self.writer.add_text("summary", "\n".join(f"    {k}: {v}" for k, v in values.items()))

    def checkpoint(self, path: Path, step: int) -> None:
        pass

    def finish(self) -> None:
        self.writer.close()


class Loggers:
    """Fan-out to several loggers; empty on ranks other than 0."""

    def __init__(self, loggers: list):
        self.loggers = loggers

    def log(self, metrics: dict, step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def summary(self, values: dict) -> None:
        for logger in self.loggers:
            logger.summary(values)

    def checkpoint(self, path: Path, step: int) -> None:
        for logger in self.loggers:
            logger.checkpoint(path, step)

    def finish(self) -> None:
        for logger in self.loggers:
            logger.finish()


def build_loggers(cfg, run_dir: Path, config: dict, is_main: bool) -> Loggers:
    if not is_main:
        return Loggers([])
    loggers = [JsonlLogger(run_dir / "metrics.jsonl"), WandbLogger(cfg.wandb, run_dir, config)]
    if cfg.tensorboard:
        loggers.append(TensorBoardLogger(run_dir))
    return Loggers(loggers)
