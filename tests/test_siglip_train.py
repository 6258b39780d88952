"""SigLIP end to end: caption shards from `bigvit-shards list` train an image–text model through the real
trainer, the tokenizer travels with the run, its checkpoints and exports, and the digits preset learns
zero-shot classification from prompts alone."""

import json

import pytest
from safetensors import safe_open

from bigvit.data.shards import main as shards_main
from bigvit.train.export import main as export_main
from tests.helpers import run_train, summary
from tests.test_captions import write_images

TINY_TOWERS = [
    "model=siglip_b16",  # its towers' layout (MAP pooling, no class token) at tiny sizes
    "model.depth=1",
    "model.width=32",
    "model.heads=2",
    "model.mlp_dim=64",
    "model.patch_size=4",
    *[f"model.text.{k}={v}" for k, v in dict(vocab_size=512, context_length=16, width=24, depth=1, heads=2, mlp_dim=48).items()],
]


def caption_list_shards(tmp_path) -> str:
    names = write_images(tmp_path, 12)
    captions = [f"noise picture number {i}" for i in range(12)]
    captions[5] = ""  # written, then a counted skip when read
    with (tmp_path / "list.csv").open("w") as file:
        file.write("path,label,caption\n")
        file.writelines(f'{name},{i % 3},"{caption}"\n' for i, (name, caption) in enumerate(zip(names, captions, strict=True)))
    out = tmp_path / "shards"
    shards_main(["list", str(tmp_path / "list.csv"), "--out", str(out), "--caption-column", "caption", "--workers", "1"])
    return f"{out}/train-000000.tar"


@pytest.mark.slow
def test_caption_shards_from_a_list_train_siglip_and_the_tokenizer_travels(tmp_path):
    shard = caption_list_shards(tmp_path)
    run_dir = tmp_path / "run"
    run_train(
        run_dir,
        [
            "objective=siglip",
            "data=webdataset",
            f"data.train_urls={shard}",
            f"data.eval_urls={shard}",
            "data.num_classes=3",
            "data.image_size=8",
            "data.batch_size=4",
            "data.context_length=16",
            "data.shuffle_buffer=8",
            "+data.class_names=[red,green,blue]",
            "+data.templates=['a {} picture']",
            "parallel=single",
            "logger=none",
            "trainer.max_steps=3",
            *TINY_TOWERS,
        ],
    )
    result = summary(run_dir)
    figures = result["eval"]
    for key in ("i2t_recall@1", "i2t_recall@5", "t2i_recall@1", "t2i_recall@5", "zeroshot_top1"):
        assert 0.0 <= figures[key] <= 1.0, key
    assert figures["retrieval_samples"] == 11 and figures["zeroshot_samples"] == 11  # the empty caption skipped
    assert figures["i2t_recall@5"] >= figures["i2t_recall@1"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("train/data/skipped_decode", 0) >= 1 for r in records)  # counted while training
    assert any("train/siglip_temperature" in r for r in records)
    # The tokenizer: in the run dir, in the checkpoint, and in the exported weights.
    tokenizer = (tmp_path / "shards" / "tokenizer.json").read_text()
    assert (run_dir / "tokenizer.json").read_text() == tokenizer
    checkpoint = sorted((run_dir / "checkpoints").iterdir())[-1]
    assert json.loads((checkpoint / "bigvit.json").read_text())["tokenizer"] == tokenizer
    export_main([str(run_dir), str(tmp_path / "model.safetensors")])
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as file:
        assert file.metadata()["tokenizer"] == tokenizer
        names = set(file.keys())
    assert {"text.token_embed.weight", "image.patch_embed.weight", "logit_bias"} <= names


def test_siglip_needs_a_text_tower_and_refuses_what_it_cannot_do(tmp_path):
    overrides = ["objective=siglip", "data=digits_captions", "logger=none", "parallel=single"]
    result = run_train(tmp_path / "a", overrides, check=False)
    assert result.returncode != 0 and "objective=siglip needs an image–text model" in result.stderr
    result = run_train(
        tmp_path / "b",
        ["experiment=siglip_digits", "logger=none", "parallel=single", "data.augment.mixup_alpha=0.8"],
        check=False,
    )
    assert result.returncode != 0 and "mixup/cutmix mixes class labels" in result.stderr


@pytest.mark.slow
def test_both_towers_train_under_fsdp2_with_activation_checkpointing_and_bf16(tmp_path):
    """FSDP2's sharding, activation checkpointing and mixed precision reach both towers (2 processes)."""
    run_dir = tmp_path / "run"
    run_train(
        run_dir,
        [
            "experiment=siglip_digits",
            "logger=none",
            "trainer.max_steps=3",
            "trainer.eval_every=0",
            "data.image_size=16",
            "data.batch_size=16",
            "parallel.activation_checkpointing=full",
            "trainer.precision=bf16",
            *TINY_TOWERS[1:],
        ],
        nproc=2,
    )
    result = summary(run_dir)
    assert result["strategy"] == "fsdp" and result["world_size"] == 2
    assert 0.0 < result["train_loss"] < 50.0 and 0.0 <= result["eval"]["zeroshot_top1"] <= 1.0
    log = (run_dir / "train.log").read_text()
    assert "checkpoint step 3" in log


@pytest.mark.slow
def test_siglip_digits_learns_zero_shot_classification_from_prompts(tmp_path):
    """A small experiment=siglip_digits on 2 FSDP2 processes (the full preset reaches 0.93: closing note of
    issue 15): zero-shot top-1 from prompts alone well above chance (0.1), retrieval above chance too."""
    run_dir = tmp_path / "run"
    run_train(
        run_dir,
        [
            "experiment=siglip_digits",
            "logger=none",
            "trainer.max_steps=500",
            "trainer.eval_every=0",
            "trainer.checkpoint_every=0",
            "data.image_size=16",
            "model.patch_size=4",
            "model.width=64",
            "model.depth=2",
            "model.heads=4",
            "model.mlp_dim=128",
            "model.text.width=64",
            "model.text.depth=2",
            "schedule.warmup_steps=10",
            "optim.lr=5e-4",
        ],
        nproc=2,
        timeout=600,
    )
    figures = summary(run_dir)["eval"]
    assert figures["zeroshot_samples"] == figures["retrieval_samples"] == 360
    assert figures["zeroshot_top1"] >= 0.4  # measured 0.575
    assert figures["i2t_recall@1"] >= 0.3 and figures["t2i_recall@1"] >= 0.3  # one caption per digit: chance 0.1
