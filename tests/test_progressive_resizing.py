"""Progressive resizing (data.resolution_schedule): the schedule itself, an FSDP2 run on real digits
shards that resumes bit-for-bit across a resolution change, batch scaling, and compiled blocks that
recompile per resolution rather than per step."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch._dynamo.utils import counters

import bigvit
from bigvit import ConfigError
from bigvit.data.resolution import ResolutionSchedule
from bigvit.parallel.parallelize import apply_compile
from bigvit.scaling.flops import train_flops
from tests.helpers import TINY, final_params, losses, run_train, summary


def schedule(entries, max_steps=10, patch=4, scaling=False, image_size=16):
    data = OmegaConf.create(
        {"image_size": image_size, "resolution_schedule": entries, "resolution_batch_scaling": scaling}
    )
    return ResolutionSchedule.from_config(data, max_steps, patch)


def test_schedule_gives_each_step_its_stage_and_counts_images_by_size():
    plan = schedule([[0, 8], [0.5, 12], [0.8, 16]])
    assert [plan.stage_at(step).image_size for step in range(10)] == [8] * 5 + [12] * 3 + [16] * 2
    assert plan.images_by_size(10, 4) == {8: 20, 12: 12, 16: 8}
    assert plan.images_by_size(6, 4) == {8: 20, 12: 4}
    assert schedule(None).stages[0].image_size == 16  # no schedule: data.image_size throughout
    # Batch scaling keeps tokens per step near those of data.image_size: floor((16 / size)²) batches.
    scaled = schedule([[0, 8], [0.5, 12], [0.8, 16]], scaling=True)
    assert [s.batch_multiple for s in scaled.stages] == [4, 1, 1]
    assert scaled.images_by_size(10, 4) == {8: 80, 12: 12, 16: 8}


@pytest.mark.parametrize(
    "entries,message",
    [
        ([[0.1, 8]], "fractions must start at 0"),
        ([[0, 8], [0.6, 12], [0.5, 16]], r"data.resolution_schedule\[2\]=\[0.5, 16\]: fractions must"),
        ([[0, 8], [1.0, 16]], "each in \\[0, 1\\)"),
        ([[0, 10]], "must be a positive multiple of model.patch_size=4"),
        ([[0, 8, 1]], "must be a \\[fraction of training, image size\\] pair"),
    ],
)
def test_bad_schedules_are_named(entries, message):
    with pytest.raises(ConfigError, match=message):
        schedule(entries)


DIGITS = [
    *TINY,
    "data=digits",
    "data.batch_size=16",
    "data.num_workers=1",
    "trainer.max_steps=10",
    "trainer.checkpoint_every=4",
    "trainer.precision=fp32",
    "data.resolution_schedule=[[0,8],[0.5,16]]",  # 2×2 patches for steps 1-5, then 4×4
]


@pytest.mark.slow
def test_fsdp_run_resumes_bit_for_bit_across_a_resolution_change(tmp_path):
    digits = [*DIGITS, f"data.root={tmp_path / 'digits'}"]
    run_train(tmp_path / "full", digits, nproc=2)
    run_train(tmp_path / "parts", [*digits, "trainer.stop_step=4"], nproc=2)  # stops before the change
    run_train(tmp_path / "parts", [*digits, "trainer.resume=auto"], nproc=2)
    lines = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    resolution = {r["step"]: r["train/resolution"] for r in lines if "train/resolution" in r}
    assert resolution == {step: 8 if step <= 5 else 16 for step in range(1, 11)}
    full, parts = losses(tmp_path / "full"), losses(tmp_path / "parts")
    assert sorted(parts) == list(range(1, 11)) and parts == full  # fp32, same layout: bit-for-bit
    expected, got = final_params(tmp_path / "full"), final_params(tmp_path / "parts")
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    result = summary(tmp_path / "full")
    shape = dict(depth=2, width=48, heads=3, mlp_dim=96, patch_size=4, image_size=16, num_classes=10)
    cfg = bigvit.model_config("vit_ti16", **shape)
    assert result["examples_seen"] == 160 and result["resolution"] == 16
    assert result["flops_per_image"] == (train_flops(cfg, 8) + train_flops(cfg, 16)) / 2


def test_batch_scaling_reads_whole_batches_at_small_sizes(tmp_path):
    overrides = [
        *TINY,
        "data=synthetic",
        "data.batch_size=4",
        "trainer.max_steps=4",
        "parallel=single",
        "data.resolution_schedule=[[0,8],[0.5,16]]",
        "data.resolution_batch_scaling=true",
    ]
    run_train(tmp_path, overrides)
    result = summary(tmp_path)
    assert result["examples_seen"] == 2 * 4 * 4 + 2 * 4  # two steps of 4 batches at 8 px, two of one


def test_compiled_blocks_recompile_per_resolution_not_per_step():
    torch._dynamo.reset()
    counters.clear()
    model = bigvit.build_model("vit_ti16", depth=2, width=48, heads=3, mlp_dim=96, patch_size=4, image_size=16)
    apply_compile(model, backend="eager")  # dynamo's guards and recompiles do not depend on the backend
    graphs = []
    try:
        for size in (8, 8, 16, 16, 12, 12, 8, 16):
            model(torch.randn(2, 3, size, size)).sum().backward()
            graphs.append(counters["stats"]["unique_graphs"])
    finally:
        torch._dynamo.reset()
    first, second = graphs[0], graphs[2]
    assert graphs[1] == first and graphs[3] == second  # a second step at a size compiles nothing
    # The second size recompiles once, with a dynamic token count that then serves every other size.
    assert first < second <= 3 * first and graphs[4:] == [second] * 4
