"""bench/gpu_check.py: skips cleanly without a GPU, and its every section runs on CPU with tiny shapes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, train_env

SCRIPT = ROOT / "bench" / "gpu_check.py"


def run_check(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, env=train_env(1), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs for real")
def test_without_a_gpu_it_skips_with_one_line_and_writes_nothing(tmp_path):
    result = run_check("--results-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines() == [
        f"gpu_check: skipped, no CUDA device (torch {torch.__version__}); run it on a GPU machine, or with "
        "--cpu-smoke to exercise it on CPU"
    ]
    assert not list(tmp_path.iterdir())


def test_cpu_smoke_runs_every_section_into_one_json(tmp_path):
    result = run_check("--cpu-smoke", "--results-dir", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    assert report["mode"] == "cpu-smoke" and set(sections) == {"attention", "fsdp_step", "timm", "compile"}
    timm_installed = importlib.util.find_spec("timm") is not None  # a dev-only reference
    failed = [name for name, section in sections.items() if "error" in section or "skipped" in section]
    assert failed == ([] if timm_installed else ["timm"])

    cases = {(c["impl"], c["tokens"]): c for c in sections["attention"]["cases"]}
    for tokens in (197, 577, 1025):
        for impl in ("sdpa", "math"):
            assert cases[impl, tokens]["close"] and cases[impl, tokens]["forward_backward_ms"] > 0
        assert "error" in cases["flash_attn", tokens]  # no CUDA here: the reason is recorded, not raised

    step = sections["fsdp_step"]["vit_tiny"]
    assert "error" not in step and 0 < step["mfu"] < 1 and step["images_per_s"] > 0
    assert step["memory"]["planner"]["tensor_bytes"] > 0
    if timm_installed:
        timm = sections["timm"]["vit_tiny"]
        assert "error" not in timm and timm["params"] == step["params"] and timm["bigvit_over_timm"] > 0
    assert sections["compile"]["backend"] == "aot_eager" and sections["compile"]["step_s"] > 0
    assert report["wall_s"] < 60
