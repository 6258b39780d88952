"""Results files: one JSON line per finished run, the input of every `bigvit-scaling` command.

A record holds the run directory (`run`, its identity), the shape keys, sizes and compute, and the
run's metrics (`eval_error` = 1 - top-1, every other `eval_*` metric, `train_loss`, ...). Appending
is idempotent: a run already in the file is not added again. Any CSV or JSONL with these column
names is read the same way.
"""

from __future__ import annotations

import csv
import fcntl
import json
import math
from pathlib import Path

import numpy as np
import yaml

from bigvit.errors import ConfigError
from bigvit.models.registry import model_config
from bigvit.scaling.flops import train_flops
from bigvit.train.checkpoint import checkpoint_step

SHAPE_KEYS = ("width", "depth", "mlp_dim", "heads", "patch_size", "image_size")
# The columns every record has (None where a run has no value, e.g. no held-out set).
COLUMNS = (
    "run",
    *SHAPE_KEYS,
    "params",
    "flops_per_image",
    "examples_seen",
    "compute",
    "steps",
    "eval_error",
    "eval_loss",
    "train_loss",
    "wall_seconds",
    "images_per_sec",
)


def record_from_run(run_dir: str | Path) -> dict:
    """The results record of a finished run, from its summary.json and config.yaml."""
    run_dir = Path(run_dir)
    summary_path, config_path = run_dir / "summary.json", run_dir / "config.yaml"
    for path in (summary_path, config_path):
        if not path.is_file():
            raise ConfigError(f"{run_dir} is not a finished bigvit run: {path.name} is missing")
    summary = json.loads(summary_path.read_text())
    cfg = yaml.safe_load(config_path.read_text())
    model = model_config({k: v for k, v in cfg["model"].items() if k != "defaults"})
    batch = int(summary.get("global_batch") or cfg["data"]["batch_size"])
    steps = int(summary["final_step"])
    # A resolution schedule with batch scaling reads more than steps × batch images.
    examples = int(summary.get("examples_seen") or steps * batch)
    flops = float(summary.get("flops_per_image") or train_flops(model))
    branch_from = cfg["trainer"].get("branch_from")  # a cooldown branch started at that checkpoint's step
    branch_step = checkpoint_step(Path(branch_from)) if branch_from else 0
    eval_metrics = summary.get("eval") or {
        k: summary[k] for k in ("eval_top1", "eval_loss") if summary.get(k) is not None
    }
    top1 = eval_metrics.get("eval_top1")
    record = {
        "run": str(run_dir.resolve()),
        "name": model.name,
        **{key: getattr(model, key) for key in SHAPE_KEYS},
        "params": int(summary["params"]),
        "flops_per_image": flops,
        "batch_size": batch,
        "examples_seen": examples,
        "compute": flops * examples,
        # What this run itself trained: a cooldown branch reuses its parent's first branch_step steps.
        "compute_spent": flops * (examples - branch_step * batch),
        "steps": steps,
        "branch_step": branch_step,
        "schedule": cfg.get("schedule", {}).get("name"),
        "eval_error": None if top1 is None else 1.0 - top1,
        "eval_loss": eval_metrics.get("eval_loss"),
        "train_loss": summary.get("train_loss"),
        "wall_seconds": summary.get("wall_seconds"),
        "images_per_sec": summary.get("images_per_sec"),
        # Every other evaluation metric (not counts of samples or skipped data).
        **{k: v for k, v in eval_metrics.items() if isinstance(v, float) and not k.startswith("skipped")},
        "model": model.to_dict(),
    }
    if cfg.get("sweep"):  # written by `bigvit-scaling sweep` into each point's config
        record["sweep"], record["point"] = cfg["sweep"].get("name"), cfg["sweep"].get("point")
    return record


def append_results(path: str | Path, records: list[dict]) -> int:
    """Append the records whose `run` is not yet in the file; returns how many were added.

    Safe when several jobs of a sweep finish at once: the file is locked while it is read and extended.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        file.seek(0)
        known = {json.loads(line).get("run") for line in file if line.strip()}
        added = [r for r in records if r["run"] not in known and not known.add(r["run"])]
        file.seek(0, 2)
        for record in added:
            file.write(json.dumps(record) + "\n")
    return len(added)


def _number(text: str):
    """A CSV cell as int, float, None (empty) or the text itself."""
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_results(path: str | Path) -> list[dict]:
    """Records of a JSONL or CSV results file (CSV cells become numbers where they parse as numbers)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"results file {path} does not exist")
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as file:
            records = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(file)]
    else:
        records = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ConfigError(f"{path}:{number} is not a JSON line ({error.msg}); expected JSONL or .csv") from None
    if not records:
        raise ConfigError(f"results file {path} holds no records")
    return records


def known_runs(path: str | Path) -> set[str]:
    """The `run` of every record in a results file (empty when the file does not exist yet)."""
    path = Path(path)
    return {r.get("run") for r in read_results(path)} if path.is_file() and path.stat().st_size else set()


def as_float(value) -> float:
    """A cell as a float; missing, empty or non-numeric cells become NaN (the laws refuse them by name)."""
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def columns(records: list[dict]) -> dict[str, np.ndarray]:
    """Column name → float array over the records, for every numeric column any record has."""
    names = dict.fromkeys(k for r in records for k, v in r.items() if not isinstance(v, dict | list))
    table = {name: np.array([as_float(r.get(name)) for r in records]) for name in names}
    return {name: values for name, values in table.items() if not np.isnan(values).all()}


def select(records: list[dict], min_examples: float = 0, where: dict | None = None) -> list[dict]:
    """Records with examples_seen >= min_examples whose fields equal `where` (values compared as text)."""
    where = where or {}
    kept = [
        r
        for r in records
        if as_float(r.get("examples_seen")) >= min_examples or min_examples <= 0
        if all(str(r.get(k)) == v for k, v in where.items())
    ]
    if not kept:
        raise ConfigError(
            f"no record has examples_seen >= {min_examples:g} and {where or 'no filter'}: "
            f"{len(records)} records in all"
        )
    return kept


def pareto(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices, by increasing x, of the points that no point with a smaller x beats (a lower y): the
    compute frontier of Zhai et al. (NaNs are never on it)."""
    best, keep = np.inf, []
    for i in np.argsort(x):
        if np.isfinite(x[i]) and np.isfinite(y[i]) and y[i] < best:
            best = y[i]
            keep.append(int(i))
    return np.array(keep, dtype=int)


def frontier_records(records: list[dict], x: str, metric: str) -> list[dict]:
    """The records on the Pareto frontier of `metric` against `x`."""
    table = columns(records)
    for name in (x, metric):
        if name not in table:
            raise ConfigError(f"column {name!r} is not in the results; columns: {sorted(table)}")
    return [records[i] for i in pareto(table[x], table[metric])]
