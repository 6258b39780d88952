"""Graceful stop on SIGTERM / SIGUSR1 (schedulers' preemption warnings).

A signal only sets a flag; at the next logging step (`logger.console_every`, where the loop already
synchronizes) all ranks agree with one tiny all-reduce, write a checkpoint and leave with
EXIT_PREEMPTED. Rank 0 also leaves `preempted.json` in the run directory: torchrun reports any
worker failure as exit 1, so the Slurm script reads the marker, not the code, to decide to requeue.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import torch

from bigvit.parallel.distributed import all_reduce

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again later
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
MARKER = "preempted.json"


def mark_preempted(run_dir: Path, signal_name: str, step: int) -> None:
    (run_dir / MARKER).write_text(json.dumps({"signal": signal_name, "step": step, "time": time.time()}))


def clear_preempted(run_dir: Path) -> None:
    (run_dir / MARKER).unlink(missing_ok=True)


class Preempted(Exception):
    def __init__(self, signal_name: str, step: int):
        super().__init__(
            f"stopped by {signal_name} after step {step}; checkpoint written, "
            "rerun the same command to resume (trainer.resume=auto)"
        )


class StopSignal:
    def __init__(self, device: torch.device):
        self.device, self.received = device, None
        for sig in SIGNALS:
            signal.signal(sig, self.handle)

    def handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def requested(self) -> bool:
        """True on every rank once any rank has received a stop signal (collective)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=self.device)
        return bool(all_reduce(flag, op="max").item())
