"""Flag a stalled training step: a hung collective, a dead data worker, a stuck file system.

A daemon thread watches the time since the loop last reported progress. Past `timeout_s` it logs
which step stalled and dumps every thread's stack (so the hang can be read, not guessed); with
action "abort" it then ends the process with EXIT_STALLED, and the launcher (torchrun, Slurm) tears
the job down, instead of the job idling until the collective timeout, or forever.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time

from bigvit.errors import ConfigError

log = logging.getLogger("bigvit")

EXIT_STALLED = 70  # EX_SOFTWARE
ACTIONS = ("warn", "abort")


class StepWatchdog:
    def __init__(self, timeout_s: float | None, action: str = "abort", rank: int = 0):
        if action not in ACTIONS:
            raise ConfigError(f"trainer.watchdog_action={action!r} is not one of {list(ACTIONS)}")
        # A negative timeout would flag (and with abort, end) a healthy run at its first check.
        if timeout_s is not None and (not isinstance(timeout_s, int | float) or timeout_s < 0):
            raise ConfigError(f"trainer.watchdog_s={timeout_s!r} must be a number of seconds > 0, or null (off)")
        self.timeout_s, self.action, self.rank = timeout_s, action, rank
        self.step, self.last_beat = 0, time.monotonic()
        self.stopped = threading.Event()
        self.thread = None
        if timeout_s:
            self.thread = threading.Thread(target=self.watch, name="bigvit-watchdog", daemon=True)
            self.thread.start()

    def beat(self, step: int) -> None:
        """The loop made progress (a step, an evaluation, a checkpoint finished)."""
        self.step, self.last_beat = step, time.monotonic()

    def close(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()

    def __enter__(self) -> StepWatchdog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def watch(self) -> None:
        flagged_beat = None
        while not self.stopped.wait(timeout=min(self.timeout_s / 4, 10.0)):
            beat = self.last_beat
            stalled_s = time.monotonic() - beat
            if stalled_s < self.timeout_s or beat == flagged_beat:
                continue
            flagged_beat = beat  # one report per stall
            self.report(stalled_s)
            if self.action == "abort":
                os._exit(EXIT_STALLED)  # a hung collective never returns: only leaving the process frees the job

    def report(self, stalled_s: float) -> None:
        message = (
            f"watchdog: rank {self.rank} made no progress for {stalled_s:.0f} s after step {self.step} "
            f"(trainer.watchdog_s={self.timeout_s:g}); stacks of all threads follow"
        )
        log.error(message)
        print(message, file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
