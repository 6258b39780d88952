"""Dry runs on a fake process group: cluster-scale layouts, per-rank bytes, no model memory."""

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

import bigvit
from bigvit.scaling.dryrun import dry_run
from tests.helpers import ROOT

FSDP = OmegaConf.load(ROOT / "conf/parallel/fsdp.yaml")


def parallel(**overrides):
    return OmegaConf.merge(FSDP, overrides)


def model_cfg(name: str) -> dict:
    return bigvit.model_config(name).to_dict()


@pytest.mark.parametrize(
    "name,world_size,layout,shard_degree",
    [
        ("vit_22b", 1024, {}, 1024),
        ("vit_22b", 1024, {"tp": 8}, 1024),  # FSDP 128 × TP 8: norms/embeddings replicate over tp
        ("vit_g14", 64, {}, 64),
        ("vit_e14", 256, {"dp_replicate": 4, "dp_shard": 64}, 64),
    ],
)
def test_per_rank_parameter_bytes_are_the_sharded_share(name, world_size, layout, shard_degree):
    report = dry_run(model_cfg(name), parallel(**layout), world_size)
    ideal = report["total_params"] * 4 / shard_degree  # fp32 master parameters
    assert abs(report["params_bytes"] - ideal) / ideal < 0.01
    assert report["grads_bytes"] == report["params_bytes"]
    assert report["optimizer_bytes"] == 2 * report["params_bytes"]  # AdamW: two fp32 moments
    assert report["seconds"] < 60


def test_class_token_model_dry_runs_under_sequence_parallel():
    # ViT-g/14's 257 tokens: sequence parallel over tp=8 pads them to 264 (it used to refuse them).
    report = dry_run(model_cfg("vit_g14"), parallel(tp=8), 512)
    assert (report["world_size"], report["layout"]["tp"], report["layout"]["dp_shard"]) == (512, 8, 64)
    # Blocks shard over all 512 ranks; embeddings and norms replicate over tp, sharded over dp only.
    ideal = report["total_params"] * 4 / 512
    assert ideal < report["params_bytes"] < 1.1 * ideal


def test_cli_prints_one_json_document():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bigvit.scaling.plan_cli",
            "model=vit_22b",
            "plan.world_size=1024",
            "plan.format=json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    report = json.loads(result.stdout)
    assert report["world_size"] == 1024 and report["layout"]["dp_shard"] == 1024
    assert {"params_bytes", "grads_bytes", "optimizer_bytes"} <= report.keys()


def test_impossible_layout_is_named_before_anything_is_built():
    with pytest.raises(bigvit.ConfigError, match="= 12 ranks, but the world size is 16"):
        dry_run(model_cfg("vit_b16"), parallel(dp_shard=12), 16)
