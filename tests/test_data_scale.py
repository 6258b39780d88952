"""Streams at scale: equal epochs per rank, no hang with few shards, exact resume at another layout, weighted
sources, mixup/cutmix. Ranks are TrainStreams built with their rank; workers are real DataLoader processes."""

import itertools
import json
import math
import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

import bigvit
from bigvit.config import register_schemas
from bigvit.data import build_data
from bigvit.data.plan import LayoutRecord, SourcePlan
from bigvit.data.shards import png_bytes, write_split
from bigvit.data.stream import ResumableLoader, Source, TrainStream, merge_states
from bigvit.data.transforms import BatchPrep, Mixup, train_transform
from bigvit.errors import ConfigError
from tests.helpers import ROOT, TINY, run_train, summary

UNEVEN = (7, 3, 12, 1, 5)  # 28 samples: 4 slots of 7, no padding


def labelled_shards(directory, sizes, first_label=0, label=None):
    """Shards of 4x4 PNGs whose label is the sample's number over all shards (or `label` for all)."""
    urls, number = [], first_label
    for shard, size in enumerate(sizes):
        samples = []
        for i in range(size):
            cls = number if label is None else label
            samples.append(
                {"__key__": f"s{shard}_{i}", "png": png_bytes(Image.new("L", (4, 4), i)), "cls": b"%d" % cls}
            )
            number += 1
        write_split(iter(samples), directory, f"part{shard}", max_count=size, total=size)
        urls.append(str(directory / f"part{shard}-000000.tar"))
    return urls


def loader(sources, rank=0, world_size=1, workers=0, batch_size=1, seed=7, buffer=4):
    stream = TrainStream(
        sources,
        batch_size,
        train_transform(4, (0.5, 1.0)),
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle_buffer=buffer,
    )
    return ResumableLoader(stream, num_workers=workers)


def labels(batches) -> list[int]:
    return [label for batch in batches for label in batch["label"].tolist()]


def epochs_and_labels(rank_loader, count: int) -> list[tuple[int, int]]:
    """(epoch, label) of the next `count` samples of a loader of batch size 1, the epoch from its positions."""
    out = []
    for batch in itertools.islice(rank_loader, count):
        worker = (rank_loader.next_worker - 1) % rank_loader.workers
        out.append((rank_loader.positions[worker][1][0][0], batch["label"].item()))
    return out


@pytest.fixture
def uneven(tmp_path):
    return labelled_shards(tmp_path, UNEVEN)


def test_one_epoch_on_two_ranks_of_two_workers_reads_every_sample_once_in_equal_batches(tmp_path):
    urls = labelled_shards(tmp_path, (7, 3, 11, 1, 5))  # 27 samples: 4 slots of ceil(27/4) = 7, one repeat
    ranks = [loader(urls, rank, 2, workers=2, batch_size=7) for rank in range(2)]
    epoch = [list(itertools.islice(rank_loader, 2)) for rank_loader in ranks]  # 2 workers x 7 samples
    # Every slot has read exactly its stretch of epoch 0; the next batch of every rank opens epoch 1.
    for rank_loader in ranks:
        assert {w: p[1] for w, p in rank_loader.positions.items()} == {0: ((0, 7),), 1: ((0, 7),)}
    seen = Counter(labels(epoch[0]) + labels(epoch[1]))
    assert set(seen) == set(range(27)) and sorted(seen.values()) == [1] * 26 + [2]  # the pad rule: one repeat
    for rank_loader in ranks:
        next(iter(rank_loader))
        assert [p[1][0][0] for p in rank_loader.positions.values()] == [
            1,
            0,
        ]  # worker 0 went on, into epoch 1


@pytest.mark.timeout(60)
def test_one_shard_on_two_ranks_of_two_workers_completes_epochs_without_hanging(tmp_path):
    urls = labelled_shards(tmp_path, (6,))  # 6 samples, 4 slots of 2: the first 2 of each epoch read twice
    ranks = [loader(urls, rank, 2, workers=2, batch_size=2) for rank in range(2)]
    per_rank = [list(itertools.islice(rank_loader, 4)) for rank_loader in ranks]  # two epochs
    assert [len(batches) for batches in per_rank] == [4, 4]
    for epoch in range(2):
        seen = Counter(
            labels(per_rank[0][2 * epoch : 2 * epoch + 2] + per_rank[1][2 * epoch : 2 * epoch + 2])
        )
        assert set(seen) == set(range(6)) and sorted(seen.values()) == [1, 1, 1, 1, 2, 2]


def interrupted(urls, world_size, workers, batches, batch_size=3):
    """Labels read by each rank in `batches` batches, and the merged state of all ranks, as a checkpoint holds it."""
    ranks = [loader(urls, rank, world_size, workers, batch_size) for rank in range(world_size)]
    read = [label for rank_loader in ranks for label in labels(itertools.islice(rank_loader, batches))]
    return read, merge_states([rank_loader.state_dict() for rank_loader in ranks])


@pytest.mark.parametrize("world_size,workers", [(1, 0), (1, 2), (3, 1)])
def test_resume_at_another_layout_reads_the_rest_of_the_epoch_exactly_once(uneven, world_size, workers):
    before, state = interrupted(uneven, world_size=2, workers=2, batches=3)  # 18 of 28 samples
    after = []
    for rank in range(world_size):
        resumed = loader(uneven, rank, world_size, workers)
        resumed.load_state_dict(state)
        after += [label for epoch, label in epochs_and_labels(resumed, len(UNEVEN) * 6) if epoch == 0]
    assert len(before) == 18
    assert sorted(before + after) == list(range(28))


def test_resume_when_workers_are_in_different_epochs_finishes_both(uneven):
    before, state = interrupted(
        uneven, world_size=1, workers=2, batches=9
    )  # worker 0: 15 of 14 + 1 of epoch 1
    assert {w: v["positions"] for w, v in state["slots"].items()} == {0: [[1, 1]], 1: [[0, 12]]}
    resumed = loader(uneven)
    resumed.load_state_dict(state)
    after = epochs_and_labels(resumed, 2 * 28 - len(before))
    assert {epoch for epoch, _ in after} == {0, 1}
    assert Counter(before + [label for _, label in after]) == Counter(list(range(28)) * 2)


def test_layout_changes_stack_within_an_epoch(uneven):
    before, state = interrupted(uneven, world_size=2, workers=2, batches=2)  # 12 samples
    middle = loader(uneven)
    middle.load_state_dict(state)
    between = [label for _, label in epochs_and_labels(middle, 5)]
    state = middle.state_dict()
    assert len(state["history"]) == 1  # the first layout still decides what epoch 0 has left
    after = []
    for rank in range(3):
        last = loader(uneven, rank, 3, workers=0)
        last.load_state_dict(state)
        after += [label for epoch, label in epochs_and_labels(last, 28) if epoch == 0]
    assert sorted(before + between + after) == list(range(28))


def test_resume_at_the_same_layout_after_a_layout_change_is_exact(uneven):
    _, state = interrupted(uneven, world_size=2, workers=2, batches=1)
    first = loader(uneven, workers=2)
    first.load_state_dict(state)
    expected = epochs_and_labels(first, 30)
    again = loader(uneven, workers=2)
    again.load_state_dict(state)
    head = epochs_and_labels(again, 11)
    resumed = loader(uneven, workers=2)
    resumed.load_state_dict(again.state_dict())
    assert head + epochs_and_labels(resumed, 19) == expected


def mixed_sources(tmp_path):
    """Source a (23 samples, label 0) at weight 0.7 and source b (7 samples, label 1) at 0.3."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = labelled_shards(tmp_path / "a", (10, 13), label=0)
    b = labelled_shards(tmp_path / "b", (7,), label=1)
    return [Source(tuple(a), 0.7), Source(tuple(b), 0.3)]


def test_sources_are_mixed_by_weight(tmp_path):
    drawn = labels(itertools.islice(loader(mixed_sources(tmp_path), batch_size=50), 40))
    share = drawn.count(0) / len(drawn)
    assert abs(share - 0.7) < 0.04, share  # 2000 draws: 4 standard deviations


def sources_config(overrides: list[str]):
    register_schemas()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose("train", overrides=["data=webdataset", "data.num_classes=2", *overrides]).data


def test_sources_from_the_command_line_build_a_weighted_stream_and_bad_weights_are_named(tmp_path):
    for name, sizes in (("a", (5, 6)), ("b", (4,))):
        (tmp_path / name).mkdir()
        labelled_shards(tmp_path / name, sizes)
    a, b = f"{tmp_path}/a/part{{0..1}}-000000.tar", f"{tmp_path}/b/part0-000000.tar"
    cfg = sources_config([f"data.sources=[{{urls:'{a}',weight:0.7}},{{urls:'{b}',weight:0.3}}]"])
    stream = build_data(cfg, rank=0, world_size=1, local_batch=4, seed=0).train.stream
    assert [(len(s.urls), sum(s.sizes), s.weight) for s in stream.sources] == [(2, 11, 0.7), (1, 4, 0.3)]
    bad = sources_config([f"data.sources=[{{urls:'{a}',weight:0.7}},{{urls:'{b}',weight:-1}}]"])
    with pytest.raises(ConfigError, match=r"data.sources\[1\].weight=-1 must be a positive number"):
        build_data(bad, rank=0, world_size=1, local_batch=4, seed=0)
    both = sources_config([f"data.train_urls='{b}'", f"data.sources=[{{urls:'{a}'}}]"])
    with pytest.raises(ConfigError, match=r"data.sources is for data=webdataset without data.train_urls"):
        build_data(both, rank=0, world_size=1, local_batch=4, seed=0)
    with pytest.raises(ConfigError, match=r"data.train_urls is not set"):
        build_data(sources_config([]), rank=0, world_size=1, local_batch=4, seed=0)


def test_weighted_sources_with_mixup_resume_exactly(tmp_path):
    sources = mixed_sources(tmp_path)
    prep = BatchPrep(4, (0.5,) * 3, (0.5,) * 3, Mixup(2, mixup_alpha=0.4, cutmix_alpha=1.0))
    cpu = torch.device("cpu")
    expected = [prep(b, cpu) for b in itertools.islice(loader(sources, workers=2, batch_size=4), 12)]
    first = loader(sources, workers=2, batch_size=4)
    head = [prep(b, cpu) for b in itertools.islice(first, 7)]
    resumed = loader(sources, workers=2, batch_size=4)
    resumed.load_state_dict(first.state_dict())
    tail = [prep(b, cpu) for b in itertools.islice(resumed, 5)]
    for (want_images, want_labels), (images, labels) in zip(expected, head + tail, strict=True):
        assert torch.equal(want_images, images) and torch.equal(want_labels, labels)
    assert expected[0][1].shape == (4, 2) and expected[0][1].dtype == torch.float32
    assert sum(bool(((labels > 0) & (labels < 1)).any()) for _, labels in expected) >= 6  # mixed batches


@pytest.mark.parametrize("workers", [0, 1])  # a worker's canvas is shared memory, zero when new
def test_workers_ship_uint8_crops_that_the_device_resizes_flips_and_normalizes(uneven, workers):
    batch = next(iter(loader(uneven, workers=workers, batch_size=4)))
    mean, std = torch.tensor([0.5, 0.25, 0.0]), torch.tensor([0.5, 0.5, 1.0])
    images, labels = BatchPrep(4, mean.tolist(), std.tolist())(batch, torch.device("cpu"))
    assert batch["image"].dtype == torch.uint8 and images.shape == (4, 3, 4, 4) and images.dtype == torch.float32
    assert torch.equal(labels, batch["label"])
    for i, ((h, w), flip) in enumerate(zip(batch["extent"].tolist(), batch["flip"].tolist(), strict=True)):
        crop = batch["image"][i, :h, :w, :3].permute(2, 0, 1).float()[None]
        resized = F.interpolate(crop, size=(4, 4), mode="bicubic", antialias=True).clamp(0, 255)[0]
        resized = resized.flip(-1) if flip else resized
        expected = (resized / 255 - mean.view(3, 1, 1)) / std.view(3, 1, 1)
        assert torch.allclose(images[i], expected, atol=1e-4)
        assert not batch["image"][i, h:].any() and not batch["image"][i, :, w:].any()  # zeros beyond the crop


def constant_batch(size=8, side=16) -> dict:
    """Image i filled with the value i, label i: every pixel says which image it came from."""
    images = torch.arange(size, dtype=torch.float32).view(size, 1, 1, 1).expand(size, 3, side, side)
    return {"image": images.contiguous(), "label": torch.arange(size)}


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_targets_match_the_pasted_area(seed):
    out = Mixup(8, cutmix_alpha=1.0)(constant_batch(), random.Random(seed))
    targets = out["label"]
    assert torch.allclose(targets.sum(1), torch.ones(8))
    for i in range(8):
        kept = (out["image"][i] == i).float().mean().item()
        assert targets[i, i].item() == pytest.approx(kept)
        assert targets[i, 7 - i].item() == pytest.approx(1 - kept)


@pytest.mark.parametrize("seed", range(5))
def test_mixup_targets_match_the_image_blend(seed):
    out = Mixup(8, mixup_alpha=0.8)(constant_batch(), random.Random(seed))
    lam = out["label"][0, 0].item()
    assert out["image"][0].unique().tolist() == pytest.approx(
        [(1 - lam) * 7]
    )  # image 0 is 0 * lam + 7 * (1 - lam)
    assert torch.allclose(out["label"].sum(1), torch.ones(8))


def test_label_smoothing_of_mixed_targets_equals_mixing_smoothed_targets():
    logits, smoothing = torch.randn(8, 10), 0.1
    out = Mixup(10, mixup_alpha=1.0)(
        {"image": torch.zeros(8, 3, 2, 2), "label": torch.arange(8)}, random.Random(0)
    )
    ours = F.cross_entropy(logits, out["label"], label_smoothing=smoothing)
    lam = out["label"][0, 0].item()
    smoothed = (
        F.one_hot(torch.arange(8), 10).float() * (1 - smoothing) + smoothing / 10
    )  # timm's mixup_target
    timm_target = smoothed * lam + smoothed.flip(0) * (1 - lam)
    assert ours.item() == pytest.approx(torch.sum(-timm_target * logits.log_softmax(-1), -1).mean().item())


def test_unmixed_batches_still_carry_class_probabilities():
    out = Mixup(8, cutmix_alpha=1.0, prob=0.0)(constant_batch(), random.Random(0))
    assert torch.equal(out["label"], torch.eye(8)) and torch.equal(out["image"], constant_batch()["image"])


def test_mix_settings_are_checked_with_the_key_named():
    with pytest.raises(ConfigError, match=r"data.augment.mixup_alpha=-1 must be >= 0"):
        Mixup(10, mixup_alpha=-1)
    with pytest.raises(ConfigError, match=r"data.augment.mix_prob=1.5 must be in \[0, 1\]"):
        Mixup(10, cutmix_alpha=1.0, prob=1.5)


def test_a_short_digits_run_with_mixup_and_cutmix_learns(tmp_path):
    cfg = OmegaConf.load("conf/data/digits.yaml")
    cfg.root, cfg.image_size, cfg.num_workers = str(tmp_path / "digits"), 16, 0
    cfg.augment.mixup_alpha, cfg.augment.cutmix_alpha = 0.2, 1.0
    data = build_data(cfg, rank=0, world_size=1, local_batch=32, seed=0)
    torch.manual_seed(0)
    model = bigvit.build_model(
        "vit_ti16", num_classes=10, image_size=16, patch_size=4, depth=2, width=48, heads=3, mlp_dim=96
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for batch in itertools.islice(data.train, 120):
        images, targets = data.device_batch(batch, torch.device("cpu"))  # as the trainer's train_step
        assert targets.shape == (32, 10)  # class probabilities, as the trainer's loss takes them
        loss = F.cross_entropy(model(images), targets, label_smoothing=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        evaluation = (data.eval_batch(b, torch.device("cpu")) for b in data.make_eval())
        right = [(model(images).argmax(-1) == labels).float() for images, labels in evaluation]
    assert torch.cat(right).mean().item() > 0.35  # chance: 0.1; about 0.55 after these 120 steps


def consumed_positions(plan: SourcePlan, state: dict, left) -> set[int]:
    """Positions of epoch 0 that the slots of a saved state took (the layout's record of it)."""
    slots = {int(s): tuple(tuple(p) for p in v["positions"]) for s, v in state["slots"].items()}
    world, workers, buffer = state["layout"]
    record = LayoutRecord(world * workers, tuple(state["first_epochs"]), slots, buffer)
    return set(plan.consumed_by(record, 0, left).tolist())


def positions_read_across_a_resize(checkpoint, digits_root) -> tuple[set[int], set[int]]:
    """Epoch-0 positions of the digits train split read before a run's first layout change (from the
    checkpoint's data history) and after it, up to `checkpoint`."""
    state = json.loads((checkpoint / "bigvit.json").read_text())["data"]
    sizes = json.loads((digits_root / "index.json").read_text())["splits"]["train"]["counts"]
    first = LayoutRecord.from_dict(state["history"][0])
    before = set(SourcePlan(sizes, seed=0).consumed_by(first, 0, None).tolist())
    later = SourcePlan(sizes, seed=0, history=[first])
    return before, consumed_positions(later, state, later.remaining(0))


@pytest.mark.slow
def test_training_on_two_processes_resumes_on_one_with_mixup_and_no_sample_read_twice(tmp_path):
    run_dir = tmp_path / "run"
    digits = [
        *TINY,
        "data=digits",
        f"data.root={tmp_path / 'digits'}",
        "data.batch_size=16",
        "data.num_workers=2",
        "data.augment.mixup_alpha=0.2",
        "data.augment.cutmix_alpha=1.0",
        "trainer.label_smoothing=0.1",
        "trainer.max_steps=8",
        "trainer.checkpoint_every=4",
    ]
    run_train(run_dir, [*digits, "trainer.stop_step=4"], nproc=2)
    resumed = run_train(run_dir, [*digits, "trainer.resume=auto"], nproc=1)
    result = summary(run_dir)
    assert (result["first_step"], result["final_step"], result["world_size"]) == (4, 8, 1)
    assert math.isfinite(result["train_loss"])
    assert "saved at 2 rank(s) x 2 worker(s)" in resumed.stdout + resumed.stderr
    # Every rank's stream state was gathered into bigvit.json; the one-process run read none of the
    # 4 x 16 samples the two-process run had taken, and 4 x 16 of its own.
    before, after = positions_read_across_a_resize(run_dir / "checkpoints" / "step_00000008", tmp_path / "digits")
    assert len(before) == len(after) == 64 and not before & after
