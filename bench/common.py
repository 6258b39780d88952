"""Shared by the benchmarks: result tables on the console and JSON under bench/results/."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))  # the torchvision stand-in for timm lives with the tests


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def report(name: str, title: str, rows: list[dict], extra: dict | None = None) -> Path:
    """Print `rows` as a table and write them, with the environment, to bench/results/<name>.json."""
    table = Table(title=title)
    for column in rows[0]:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else escape(str(v)) for v in row.values()))
    console = Console()
    # Wide enough for the table when stdout is a file or a pipe (rich assumes 80 columns there).
    Console(width=max(console.width, 160) if not console.is_terminal else None).print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"rows": rows, "environment": environment(), **(extra or {})}, indent=1))
    print(f"wrote {path}")
    return path
