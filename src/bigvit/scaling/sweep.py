"""`bigvit-scaling sweep`: the points of a scaling study (a grid or a star around a centre shape, each at
several durations), trained through Hydra's multirun so that any Hydra launcher (Slurm) runs them.

Each point is a generated config in `<dir>/.points/scaling_point/<id>.yaml` selected with
`+scaling_point=<id>`: one multirun over those ids runs every point with its own overrides. A point's
run directory is `<dir>/<id>`; a point whose run is already in the results file is skipped, and an
interrupted point resumes from its own checkpoints, so rerunning the same command resumes the sweep.

Durations without re-training (Hägele et al. 2024): with `branch: true` and schedule=wsd each shape
trains once at its longest duration, checkpointing where each shorter duration's cooldown starts; a
second multirun branches one short cooldown run from each of those checkpoints (trainer.branch_from).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from bigvit.errors import ConfigError
from bigvit.models.registry import model_config
from bigvit.optim.schedule import decay_start, lr_factor, schedule_args
from bigvit.overrides import compose, is_launch_override
from bigvit.scaling.flops import train_flops
from bigvit.scaling.results import known_runs
from bigvit.train.checkpoint import checkpoint_step
from bigvit.train.cli import CONF_DIR as TRAIN_CONF_DIR
from bigvit.train.loggers import format_duration

CONF_DIR = Path(TRAIN_CONF_DIR)
STEPS_KEY = "trainer.max_steps"
POINT_GROUP = "scaling_point"


@dataclass
class Point:
    """One training run of the study."""

    id: str
    overrides: list[str]  # the point's own overrides (shape, duration), on top of the common ones
    steps: int
    run_dir: Path
    phase: str = "train"  # train: from scratch | branch: a cooldown from a longer run's checkpoint
    branch_from: Path | None = None
    checkpoint_at: list[int] = field(default_factory=list)
    compute: float = 0.0  # training FLOPs this run spends itself (filled in by plan_points)

    @property
    def first_step(self) -> int:
        """The step this run starts training from: a branch's checkpoint step, else 0."""
        return checkpoint_step(self.branch_from) if self.branch_from else 0

    @property
    def key(self) -> str:
        """The point's identity in a results file (its `run`)."""
        return str(self.run_dir.resolve())


def _value_text(value) -> str:
    return str(value).replace(" ", "")


def shape_combinations(scfg) -> list[list[str]]:
    """Override lists of every shape: the grid's cartesian product, a star's centre and its one-axis
    variations, and the explicit points; without any of them, one point with the common overrides."""
    combos: list[list[str]] = []
    grid = {k: list(v) for k, v in (scfg.get("grid") or {}).items() if k != STEPS_KEY}
    if grid:
        for values in itertools.product(*grid.values()):
            combos.append([f"{k}={_value_text(v)}" for k, v in zip(grid, values, strict=True)])
    star = scfg.get("star")
    if star:
        if not star.get("centre"):
            raise ConfigError("scaling.star needs a centre ({key: value}) and vary ({key: [values]})")
        centre, vary = dict(star.centre), dict(star.get("vary") or {})
        missing = [k for k in vary if k not in centre]
        if missing:
            raise ConfigError(f"scaling.star.vary keys {missing} are not in scaling.star.centre {list(centre)}")
        combos.append([f"{k}={_value_text(v)}" for k, v in centre.items()])
        for key, values in vary.items():
            for value in values:
                if value != centre[key]:
                    combos.append([f"{k}={_value_text(value if k == key else v)}" for k, v in centre.items()])
    for point in scfg.get("points") or []:
        combos.append([str(o) for o in point])
    return combos or [[]]


def durations(scfg) -> list[int]:
    """trainer.max_steps of each shape, shortest first: scaling.durations or the grid's trainer.max_steps."""
    steps = list(scfg.get("durations") or (scfg.get("grid") or {}).get(STEPS_KEY) or [])
    if any(not isinstance(s, int) or s <= 0 for s in steps):
        raise ConfigError(f"scaling.durations={steps} must be positive step counts (trainer.max_steps)")
    return sorted(set(steps))


def point_id(overrides: list[str]) -> str:
    """A readable, stable directory name: `width64-depth4-steps600` (a hash when too long)."""
    parts = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        leaf = key.replace("/", ".").split(".")[-1].replace("max_steps", "steps")
        parts.append(re.sub(r"[^A-Za-z0-9_.]+", "", f"{leaf}{value}"))
    text = "-".join(parts) or "point"
    return text if len(text) <= 80 else f"{text[:60]}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def expand(scfg, sweep_dir: Path, decay_fraction: float) -> list[Point]:
    """Every run of the study: each shape at each duration; with branching, the longest duration of a
    shape is a `train` run checkpointing where the shorter ones' cooldowns start, and those are `branch`
    runs starting from its checkpoints."""
    steps_list = durations(scfg)
    points: list[Point] = []
    for combo in shape_combinations(scfg):
        own_steps = [o for o in combo if o.lstrip("+").startswith(STEPS_KEY + "=")]
        if own_steps or not steps_list:  # an explicit point with its own duration, or no durations
            steps = int(own_steps[0].split("=", 1)[1]) if own_steps else 0
            points.append(Point(point_id(combo), combo, steps, sweep_dir / point_id(combo)))
            continue
        runs = [[*combo, f"{STEPS_KEY}={s}"] for s in steps_list]
        if not scfg.get("branch", True) or len(steps_list) == 1:
            points += [Point(point_id(r), r, s, sweep_dir / point_id(r)) for r, s in zip(runs, steps_list, strict=True)]
            continue
        longest = Point(point_id(runs[-1]), runs[-1], steps_list[-1], sweep_dir / point_id(runs[-1]))
        longest.checkpoint_at = [decay_start(s, decay_fraction) for s in steps_list[:-1]]
        points.append(longest)
        for run, steps, start in zip(runs, steps_list, longest.checkpoint_at, strict=False):
            branch_from = longest.run_dir / "checkpoints" / f"step_{start:08d}"
            points.append(Point(point_id(run), run, steps, sweep_dir / point_id(run), "branch", branch_from))
    ids = [p.id for p in points]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError(f"the sweep defines the same point twice: {duplicates}")
    return points


# -- point configs -------------------------------------------------------------------------------


def _is_group(key: str) -> bool:
    return "." not in key and (CONF_DIR / key).is_dir()


def point_config(point: Point, scfg, results: Path) -> dict:
    """The generated `+scaling_point` config: the point's overrides as config values (group choices as
    defaults-list overrides), its run directory, branch/checkpoint steps and results file."""
    parser = OverridesParser.create()
    defaults: list = []
    values: dict = {}
    for text in point.overrides:
        override = parser.parse_override(text)
        key = override.key_or_group
        if _is_group(key):
            defaults.append({f"override /{key}": override.value()})
            continue
        node = values
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = override.value()
    trainer = values.setdefault("trainer", {})
    trainer.update(run_dir=str(point.run_dir), results_file=str(results), name=point.id)
    if point.checkpoint_at:
        trainer["checkpoint_at"] = point.checkpoint_at
    if point.branch_from:
        trainer["branch_from"] = str(point.branch_from)
    values["sweep"] = {"name": scfg.name, "point": point.id, "phase": point.phase}
    return {"defaults": [*defaults, "_self_"], **values}


def write_point_configs(points: list[Point], scfg, sweep_dir: Path, results: Path) -> Path:
    """One YAML per point under <sweep_dir>/.points/scaling_point/; returns the search-path root."""
    root = sweep_dir / ".points"
    group = root / POINT_GROUP
    group.mkdir(parents=True, exist_ok=True)
    for point in points:
        text = "# @package _global_\n# generated by bigvit-scaling sweep\n"
        text += yaml.safe_dump(point_config(point, scfg, results), sort_keys=False)
        (group / f"{point.id}.yaml").write_text(text)
    return root


def compose_config(name: str, overrides: list[str], what: str):
    """conf/<name>.yaml composed with `overrides` as its command would (Hydra's errors as one line)."""
    return compose(CONF_DIR, name, overrides, what)


def compose_train(overrides: list[str], what: str):
    """The training config bigvit-train composes from `overrides` (launcher overrides left out)."""
    return compose_config("train", [o for o in overrides if not is_launch_override(o)], what)


def plan_points(points: list[Point], common: list[str], search_root: Path, decay_fraction: float | None) -> None:
    """Compose every point as its job will (a bad override fails here, before anything trains), check that
    branched points run the WSD schedule they were planned with, and fill in each point's compute."""
    search = f"hydra.searchpath=[file://{search_root}]"
    for point in points:
        cfg = compose_train([*common, search, f"+{POINT_GROUP}={point.id}"], f"point {point.id}")
        schedule = cfg.schedule
        branched = point.checkpoint_at or point.branch_from
        if branched and (schedule.name != "wsd" or schedule.decay_fraction != decay_fraction):
            raise ConfigError(
                f"point {point.id}: scaling.branch=true needs schedule=wsd with one decay_fraction for every "
                f"point (cooldowns branch off the stable phase); got schedule={schedule.name}; add "
                "schedule=wsd to scaling.overrides or set scaling.branch=false"
            )
        point.steps = int(cfg.trainer.max_steps)
        check_schedule(point, schedule, bool(branched))
        flops = train_flops(model_config(OmegaConf.to_container(cfg.model, resolve=True)))
        point.compute = flops * cfg.data.batch_size * (point.steps - point.first_step)


def check_schedule(point: Point, schedule, branched: bool) -> None:
    """The point's schedule as its run will evaluate it (bad values fail before anything trains); a
    branched point's warm-up must fit its run: capped, it would no longer match the longest run's prefix."""
    args = schedule_args(schedule, point.steps)
    try:
        lr_factor(0, **args)
    except ConfigError as error:
        raise ConfigError(f"point {point.id}: {error}") from None
    if branched and args["warmup_steps"] != schedule.warmup_steps:
        raise ConfigError(
            f"point {point.id}: schedule.warmup_steps={schedule.warmup_steps} is longer than its "
            f"trainer.max_steps={point.steps}, so its cooldown cannot branch from the longest run; lower "
            "schedule.warmup_steps or set scaling.branch=false"
        )


# -- running -------------------------------------------------------------------------------------


def multirun_command(ids: list[str], common: list[str], search_root: Path, sweep_dir: Path, nproc: int) -> list[str]:
    launcher = [sys.executable, "-m", "bigvit.train"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "bigvit.train"]  # fmt: skip
    return [
        *launcher,
        "--multirun",
        f"hydra.searchpath=[file://{search_root}]",
        f"hydra.sweep.dir={sweep_dir / '.multirun'}",
        *common,
        f"+{POINT_GROUP}={','.join(ids)}",
    ]


def last_step(run_dir: Path) -> int:
    """The newest logged step of a run in progress (0 before its first log line)."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    lines = metrics.read_text().splitlines()
    return json.loads(lines[-1]).get("step", 0) if lines else 0


class Progress:
    """Points done / left and an ETA from the FLOPs still to train at the rate measured so far."""

    def __init__(self, points: list[Point], done: set[str], results: Path):
        self.points, self.done, self.total, self.results = points, done, len(points), results
        self.start = time.monotonic()
        self.compute_before = sum(p.compute for p in points if p.key in done)  # not this session's rate

    def trained(self, point: Point) -> float:
        """FLOPs of `point` trained so far (from its newest logged step while it runs)."""
        if point.key in self.done:
            return point.compute
        steps = max(last_step(point.run_dir) - point.first_step, 0)
        return point.compute * min(steps / max(point.steps - point.first_step, 1), 1.0)

    def eta(self) -> str:
        trained = sum(self.trained(p) for p in self.points) - self.compute_before
        left = sum(p.compute for p in self.points) - self.compute_before - trained
        if trained <= 0:
            return "ETA after the first steps"
        return f"ETA {format_duration((time.monotonic() - self.start) / trained * left)}"

    def finished(self) -> list[dict]:
        """The records written so far; a line another job is still writing is left for the next poll."""
        if not self.results.is_file():
            return []
        records = []
        for line in self.results.read_text().split("\n")[:-1]:  # the part after the last newline is unfinished
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
        return records

    def poll(self) -> None:
        """Print a line for each point that finished since the last poll."""
        by_run = {p.key: p for p in self.points}
        for record in self.finished():
            run = record.get("run")
            if run in by_run and run not in self.done:
                self.done.add(run)
                error = record.get("eval_error")
                metric = f"eval_error {error:.4f}" if error is not None else "no eval"
                print(
                    f"[{len(self.done)}/{self.total} points] {by_run[run].id} done: {metric}, "
                    f"{record.get('wall_seconds') or 0:.0f} s | {self.eta()}",
                    flush=True,
                )


def run_phase(name: str, points: list[Point], command: list[str], log_path: Path, progress: Progress) -> None:
    """Run one multirun to its end, printing progress; a failure or interruption ends the sweep."""
    print(f"{name}: {len(points)} run(s) through Hydra multirun; log → {log_path}", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("a") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
        log.flush()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        last_eta = time.monotonic()
        try:
            while child.poll() is None:
                time.sleep(1.0)
                progress.poll()
                if time.monotonic() - last_eta > 30:  # a heartbeat while a long point trains
                    print(f"  … {len(progress.done)}/{progress.total} points | {progress.eta()}", flush=True)
                    last_eta = time.monotonic()
        except KeyboardInterrupt:
            os.killpg(child.pid, signal.SIGTERM)  # the trainers checkpoint and stop (preemption path)
            child.wait()
            raise
        progress.poll()
    if child.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-25:])
        print(tail, file=sys.stderr)
        raise ConfigError(f"sweep {name} failed (exit {child.returncode}); its log: {log_path}")


def branch_saving(points: list[Point]) -> tuple[float, float]:
    """(compute the sweep trains, compute of training every duration in full from scratch)."""
    spent = sum(p.compute for p in points)
    return spent, sum(p.compute * p.steps / (p.steps - p.first_step) for p in points)


def check_same_study(sweep_dir: Path, overrides: list[str]) -> None:
    """Refuse to resume a sweep directory with other common overrides: its finished points would count
    as done although they trained something else (launcher overrides may change between calls)."""
    previous = sweep_dir / "sweep.json"
    if previous.is_file():
        before = json.loads(previous.read_text()).get("overrides")
        if before is not None and before != overrides:
            raise ConfigError(
                f"scaling.dir={sweep_dir} holds a sweep run with the overrides {before}, not {overrides}: "
                "resume it with the same ones or give another scaling.dir"
            )


def sweep(scfg, passthrough: list[str]) -> dict:
    """Run (or resume) the study `scfg` (the scaling config group); returns a JSON-ready summary."""
    sweep_dir = Path(scfg.dir).resolve()
    results = Path(scfg.results).resolve() if scfg.get("results") else sweep_dir / "results.jsonl"
    sweep_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    common = [*(str(o) for o in scfg.get("overrides") or []), *passthrough]
    check_same_study(sweep_dir, [o for o in common if not is_launch_override(o)])
    schedule = compose_train(common, "the sweep's common overrides").schedule
    decay_fraction = schedule.get("decay_fraction") if schedule.name == "wsd" else None
    points = expand(scfg, sweep_dir, decay_fraction if decay_fraction is not None else 0.2)
    search_root = write_point_configs(points, scfg, sweep_dir, results)
    plan_points(points, common, search_root, decay_fraction)
    done = {run for run in known_runs(results) if run}
    pending = [p for p in points if p.key not in done]
    already = len(points) - len(pending)
    spent, full = branch_saving(points)
    print(
        f"sweep {scfg.name}: {len(points)} runs ({already} already in {results.name}), "
        f"{spent:.3g} training FLOPs ({spent / full:.2f}× of training every duration in full: {full:.3g})",
        flush=True,
    )
    progress = Progress(points, {p.key for p in points} & done, results)
    for phase in ("train", "branch"):
        todo = [p for p in pending if p.phase == phase]
        if todo:
            command = multirun_command([p.id for p in todo], common, search_root, sweep_dir, int(scfg.nproc))
            run_phase(phase, todo, command, sweep_dir / "sweep.log", progress)
    missing = [p.id for p in points if p.key not in progress.done]
    if missing:
        raise ConfigError(f"the sweep ended but {len(missing)} point(s) wrote no result: {missing[:5]}")
    previous = sweep_dir / "sweep.json"
    earlier = json.loads(previous.read_text()).get("wall_seconds", 0.0) if previous.is_file() else 0.0
    summary = {
        "sweep": scfg.name,
        "dir": str(sweep_dir),
        "results": str(results),
        "runs": len(points),
        "trained_now": len(pending),
        "compute": spent,
        "compute_full_durations": full,
        "compute_ratio": spent / full,
        "overrides": [o for o in common if not is_launch_override(o)],
        "wall_seconds": earlier + time.monotonic() - started,  # summed over the calls that resumed it
    }
    (sweep_dir / "sweep.json").write_text(json.dumps(summary, indent=1))
    return summary
