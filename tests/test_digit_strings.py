"""data=digit_strings, the embedded scaling-study task: samples are pure functions of (seed, index),
held-out images use held-out handwriting, labels spell the digits, bad settings are one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bigvit.data.digit_strings import DigitStringStream, glyph_sets, render
from bigvit.errors import ConfigError
from tests.helpers import ROOT, run_train, summary

CFG = OmegaConf.load(ROOT / "conf" / "data" / "digit_strings.yaml")


def stream(cfg=CFG, **kwargs) -> DigitStringStream:
    return DigitStringStream(cfg, **{"global_batch": 8, "rank": 0, "world_size": 1, "seed": 0, **kwargs})


def test_ranks_read_slices_of_the_same_global_batches_and_resume_exactly():
    whole = iter(stream())
    first, second = next(whole), next(whole)
    halves = [iter(stream(rank=r, world_size=2)) for r in range(2)]
    assert torch.equal(torch.cat([next(h)["image"] for h in halves]), first["image"])
    resumed = stream()
    resumed.load_state_dict({"step": 1})
    assert torch.equal(next(iter(resumed))["label"], second["label"])


def test_held_out_images_use_the_held_out_glyphs_and_each_sample_once():
    sets = glyph_sets(int(CFG.glyph_size), int(CFG.split_seed))
    assert (len(sets["train"][0]), len(sets["test"][0])) == (1437, 360)
    train = {g.tobytes() for g in sets["train"][0]}
    assert not any(g.tobytes() in train for g in sets["test"][0])
    cfg = OmegaConf.merge(CFG, {"eval_samples": 20})
    parts = [list(stream(cfg, rank=r, world_size=2, eval=True)) for r in range(2)]
    assert sum(len(b["label"]) for part in parts for b in part) == 20


def test_the_label_is_the_number_the_digits_spell():
    glyphs = np.zeros((10, 4, 4), dtype=np.float32)
    for digit in range(10):
        glyphs[digit, :, : digit % 4 + 1] = 1.0  # distinguishable ink
    image, label = render(np.random.default_rng(3), glyphs, np.arange(10), length=3, image_size=12, noise=0.0)
    assert image.shape == (3, 12, 12) and 0 <= label < 1000
    ink = (image[0] > 0).sum(axis=0)  # ink per column, digit by digit
    digits = [int(d) for d in f"{label:03d}"]
    assert [int(ink[4 * i : 4 * i + 4].astype(bool).sum()) for i in range(3)] == [d % 4 + 1 for d in digits]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"length": 2}, r"data\.num_classes=10 must be 10\*\*data\.length = 100"),
        ({"glyph_size": 20, "length": 2, "num_classes": 100}, r"data\.glyph_size=20 does not fit 2 digit"),
    ],
)
def test_bad_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        stream(OmegaConf.merge(CFG, override))


def test_the_scaling_preset_trains_and_evaluates(tmp_path):
    run_train(tmp_path / "run", ["experiment=scaling_digits", "trainer.max_steps=3", "data.eval_samples=64",
                                 "schedule.warmup_steps=1", "hardware.peak_tflops=1"])  # fmt: skip
    result = summary(tmp_path / "run")
    assert result["final_step"] == 3 and result["eval"]["eval_samples"] == 64
    assert 0.0 <= result["eval_top1"] <= 1.0 and result["global_batch"] == 64
