"""The analytic planner: its model-state bytes against the dry run, its CLI, and properties of its answers
that a wrong model would break."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import bigvit
from bigvit.parallel.mesh import ParallelDims, resolve_dims
from bigvit.parallel.parallelize import largest_dim_placement
from bigvit.scaling.assumptions import Assumptions
from bigvit.scaling.dryrun import dry_run
from bigvit.scaling.hardware import build_cluster
from bigvit.scaling.layouts import Layout
from bigvit.scaling.memory import memory_breakdown
from bigvit.scaling.model_state import model_state_bytes
from bigvit.scaling.planner import plan
from tests.helpers import ROOT

FSDP = OmegaConf.load(ROOT / "conf/parallel/fsdp.yaml")
PLAN = [str(Path(sys.executable).parent / "bigvit-plan")]  # the installed console script
TOLERANCE = 0.10  # the bound; the two agree to the byte on every case below


def model_state(report: dict) -> int:
    return report["params_bytes"] + report["grads_bytes"] + report["optimizer_bytes"]


# World sizes 64…4096.
@pytest.mark.parametrize(
    "name,world_size,layout,optimizer",
    [
        ("vit_g14", 64, {}, "adamw"),
        ("vit_G14", 128, {}, "lean"),
        ("vit_e14", 256, {}, "adamw"),
        ("vit_22b", 512, {}, "adamw"),
        ("vit_22b", 1024, {"tp": 8}, "adamw"),
        ("vit_22b", 1024, {}, "lean"),
        ("vit_22b", 2048, {"cp": 2}, "adamw"),
        ("vit_22b", 4096, {"tp": 8}, "lean"),
        ("vit_g14", 4096, {"dp_replicate": 64, "dp_shard": 64}, "adamw"),
        ("vit_22b", 4096, {"dp_replicate": 512, "dp_shard": 8}, "adamw"),
        ("vit_22b", 4096, {}, "adamw"),  # pos_embed's dims do not divide 4096: padded Shard(0)
        ("vit_e14", 4096, {}, "lean"),
    ],
)
def test_model_state_bytes_match_the_dry_run(name, world_size, layout, optimizer):
    parallel = OmegaConf.merge(FSDP, layout)
    report = dry_run(bigvit.model_config(name).to_dict(), parallel, world_size, "bf16", optimizer)
    planned = model_state_bytes(
        bigvit.model_config(name), "fsdp", resolve_dims(parallel, world_size), optimizer, "bf16", "fp32"
    )
    assert model_state(planned) == pytest.approx(model_state(report), rel=TOLERANCE)
    assert planned["params_per_rank"] == report["params_per_rank"]


def test_short_parameters_shard_on_a_dim_that_divides():
    placement = largest_dim_placement(1024)
    assert placement(torch.empty(1, 256, 6144, device="meta")).dim == 2  # not a padded full copy per rank
    assert largest_dim_placement(4096)(torch.empty(1, 256, 6144, device="meta")) is None  # FSDP2: dim 0 only
    assert placement(torch.empty(4096, 6144, device="meta")) is None  # dim 0 splits: FSDP2's default


def run_plan(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*PLAN, *overrides], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def test_cli_prints_a_recommendation_with_its_assumptions():
    result = run_plan("model=vit_22b", "cluster.gpus=1024", "cluster.gpu=h100")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"^recommendation: (?!none)\S+", out, re.MULTILINE), out
    for stated in ("TFLOP/s dense bf16", "NVLink", "matmul efficiency", "allocator overhead", "overlap"):
        assert stated in out


def test_cli_json_is_one_document_with_the_expected_keys():
    result = run_plan("model=vit_22b", "cluster.gpus=1024", "cluster.gpu=h100", "plan.format=json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # fails on anything but exactly one JSON document
    assert {
        "candidates",
        "recommended",
        "assumptions",
        "hardware",
        "cluster",
        "global_batch",
    } <= report.keys()
    recommended = next(c for c in report["candidates"] if c["name"] == report["recommended"])
    assert recommended["fits"]
    assert {"params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "buffers_bytes"} <= (
        recommended["memory"].keys()
    )
    assert 0 < recommended["time"]["mfu"] < 1
    assert {"matmul_efficiency", "comm_efficiency", "comm_overlap", "allocator_overhead"} <= (
        report["assumptions"].keys()
    )


def test_class_token_models_get_sequence_and_context_parallel_layouts_with_padding():
    result = run_plan("model=vit_g14", "cluster.gpus=64", "cluster.gpu=h100", "plan.format=json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    sharded = {c["name"]: c for c in report["candidates"] if c["name"].startswith(("fsdp_tp", "fsdp_cp"))}
    assert len(sharded) == 12 and not any(c["problem"] for c in sharded.values())  # 2, 4, 8 each, ± AC
    assert all(c["sequence_parallel"] for name, c in sharded.items() if name.startswith("fsdp_tp"))
    # 257 tokens (256 patches + class token) padded to a multiple of the shard degree, and timed so.
    assert {name: c["tokens"] for name, c in sharded.items() if "+ac" not in name} == {
        "fsdp_tp2": 258, "fsdp_tp4": 260, "fsdp_tp8": 264, "fsdp_cp2": 258, "fsdp_cp4": 260, "fsdp_cp8": 264
    }
    assert all(c["time"]["images_per_s"] > 0 for c in sharded.values())
    printed = run_plan("model=vit_g14", "cluster.gpus=64", "cluster.gpu=h100").stdout
    assert "tokens: 257 per image, padded" in printed and "n/a fsdp_cp" not in printed


def test_unknown_gpu_is_named_with_the_valid_ones():
    result = run_plan("model=vit_b16", "cluster.gpus=8", "cluster.gpu=b300")
    assert result.returncode != 0
    assert "cluster.gpu='b300' is not one of ['a100_40gb', 'a100_80gb', 'h100', 'h200']" in result.stderr
    with pytest.raises(bigvit.ConfigError, match="cluster.gpu='tpu'"):
        build_cluster(8, "tpu")


def test_planner_needs_the_cluster_size():
    result = run_plan("model=vit_b16", "plan.dry_run=false")
    assert result.returncode != 0 and "needs cluster.gpus" in result.stderr


def candidates(model: str, gpus: int) -> dict[str, dict]:
    report = plan(bigvit.model_config(model), build_cluster(gpus, "h100"), Assumptions(), 4096)
    return {c["name"]: c for c in report["candidates"]}


def test_vit_22b_does_not_fit_with_replicated_states():
    found = candidates("vit_22b", 1024)
    for name in ("ddp", "ddp+ac", "zero1", "zero1+ac"):
        assert not found[name]["fits"], name
    assert any(c["fits"] for c in found.values())


def test_vit_b16_fits_with_fsdp_on_one_node():
    assert candidates("vit_b16", 8)["fsdp"]["fits"]


def test_checkpointing_reduces_activation_bytes():
    cfg, assumptions = bigvit.model_config("vit_22b"), Assumptions()
    dims = ParallelDims(1, 128, 1, 8)
    off = memory_breakdown(cfg, Layout("fsdp_tp8", "fsdp", dims), 8, 1, assumptions)
    on = memory_breakdown(cfg, Layout("fsdp_tp8+ac", "fsdp", dims, "full"), 8, 1, assumptions)
    assert on["activations_bytes"] < off["activations_bytes"] / 3


def test_more_tensor_parallel_means_fewer_parameters_per_gpu():
    cfg, assumptions = bigvit.model_config("vit_22b"), Assumptions()
    # Within a node (tp only) the parameters themselves split; under FSDP × TP the sharded states are
    # params/GPUs whatever tp is, and what shrinks is the unsharded blocks each GPU gathers.
    alone = [model_state_bytes(cfg, "fsdp", ParallelDims(1, 1, 1, tp))["params_bytes"] for tp in (1, 2, 4, 8)]
    assert alone == sorted(alone, reverse=True) and alone[-1] < alone[0] / 6
    gathered = [
        memory_breakdown(cfg, Layout("t", "fsdp", ParallelDims(1, 1024 // tp, 1, tp)), 1, 1, assumptions)
        for tp in (1, 2, 4, 8)
    ]
    buffers = [m["buffers"]["all_gather"] for m in gathered]
    assert buffers == sorted(buffers, reverse=True) and buffers[-1] < buffers[0] / 6
