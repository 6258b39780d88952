"""Checkpoint directories: atomic, with retention and compatibility checks.

A checkpoint is a directory `step_%08d` written first as `step_%08d.tmp` and renamed once every
rank has finished and bigvit's metadata file is written last: a crash or SIGTERM mid-save leaves the
previous checkpoint as the newest usable one. What goes inside is the engine's business (DCP by
parameter name for PyTorch layouts); per-rank state (RNG) is one safetensors file per rank. The data
stream's state is gathered from every rank into bigvit.json, so that any world size resumes the data
exactly. Everything is read back as data (train/safe_load.py): no pickle is ever loaded.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bigvit.data import merge_states
from bigvit.errors import CheckpointError
from bigvit.parallel.distributed import barrier
from bigvit.train.safe_load import load_tensors, read_json, save_tensors

__all__ = ["META_FILE", "CheckpointError", "Checkpointer", "checkpoint_dirs", "checkpoint_step"]

STEP_DIR = re.compile(r"^step_(\d{8})$")
META_FILE = "bigvit.json"


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temp dirs of interrupted saves are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint directory `step_%08d`."""
    return int(STEP_DIR.match(path.name).group(1))


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def gathered_data_state(state: dict | None) -> dict | None:
    """Every rank's data state merged into one (collective); None when there is none."""
    if not dist.is_initialized():
        return state
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return merge_states(states) if state is not None else None


class Checkpointer:
    """The directory protocol (temp dir, rename, retention, compatibility); the engine writes the contents."""

    def __init__(
        self, root: str | Path, rank: int, keep: int = 2, pinned: tuple[int, ...] = (), asynchronous: bool = False
    ):
        """Keeps the newest `keep` checkpoints (0 = all) and, whatever their age, those of `pinned` steps.
        `asynchronous`: write while training continues (DCP's async_save), over a gloo group of its own
        so that the writer thread's collectives never interleave with training's."""
        self.root, self.rank, self.keep, self.pinned = Path(root), rank, keep, set(pinned)
        self.asynchronous, self.pending = asynchronous, None
        self.group = dist.new_group(backend="gloo") if asynchronous and dist.is_initialized() else None
        self.after_shards = None  # called with the step once this rank's files are written (train/chaos.py)
        self.on_complete = None  # called with (path, step) once a checkpoint is complete (loggers)

    def latest(self) -> Path | None:
        found = checkpoint_dirs(self.root)
        return found[-1] if found else None

    def save(self, step: int, engine, rank_state: dict, meta: dict, data_state: dict | None = None) -> Path:
        """Write a checkpoint of `step` (collective: every rank calls it). `rank_state` ({group: {name:
        tensor}}) is kept per rank; `data_state`, this rank's part of the data position, is merged over
        ranks into the metadata. Asynchronous: returns once the state is staged in host memory; the
        checkpoint becomes complete (renamed into place) in `finish`, which the next save calls."""
        self.finish()  # one save in flight at a time
        final = self.root / f"step_{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        start = time.perf_counter()
        data_state = gathered_data_state(data_state)
        writing = engine.save(tmp, step, asynchronous=self.asynchronous, group=self.group)
        save_tensors(tmp / rank_file(self.rank), rank_state)
        meta = {**meta, "step": step, **({"data": data_state} if data_state is not None else {})}
        self.pending = (tmp, final, meta, writing, start)
        if not self.asynchronous:
            self.finish()
        return final

    def finish(self) -> None:
        """Complete the save in flight, if any (collective): wait for every rank's files, then write the
        metadata, rename the directory into place and apply retention."""
        if self.pending is None:
            return
        tmp, final, meta, writing, start = self.pending
        self.pending = None
        if writing is not None:
            writing.result()  # this rank's shards are on disk
        if self.after_shards:
            self.after_shards(meta["step"])
        barrier()  # every rank's shards are on disk before the checkpoint is declared complete
        if self.rank == 0:
            meta = {**meta, "saved_at": time.time(), "save_seconds": time.perf_counter() - start}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in checkpoint_dirs(self.root)[: -self.keep] if self.keep > 0 else []:
                if checkpoint_step(old) not in self.pinned:
                    shutil.rmtree(old, ignore_errors=True)
        barrier()
        if self.on_complete:
            self.on_complete(final, meta["step"])

    def load(
        self, path: str | Path, engine, expect: dict | None = None
    ) -> tuple[int, dict | None, dict | None]:
        """Load `path` into the engine; returns (step, this rank's state or None, the merged data state or None).

        `expect` (e.g. the model config) must equal what the checkpoint recorded; otherwise a
        CheckpointError names the differing keys. Per-rank state (RNG streams) is restored only at the
        world size it was saved with; the data state, every rank's part merged, at any world size.
        """
        path = Path(path)
        if not (path / META_FILE).is_file():
            raise CheckpointError(
                f"{path} is not a complete checkpoint (no {META_FILE}); "
                f"complete ones here: {[p.name for p in checkpoint_dirs(path.parent)]}"
            )
        saved = read_json(path / META_FILE)
        for key, value in (expect or {}).items():
            if key in saved and saved[key] != value:
                diff = (
                    value
                    if not isinstance(value, dict)
                    else {k: (saved[key].get(k), v) for k, v in value.items() if saved[key].get(k) != v}
                )
                raise CheckpointError(
                    f"checkpoint {path} is incompatible: {key} differs (saved, now): {diff}"
                )
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        same_layout = saved.get("world_size") == world_size
        step = engine.load(path, same_layout)
        rank_state = load_tensors(path / rank_file(self.rank)) if same_layout else None
        return step, rank_state, saved.get("data")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
