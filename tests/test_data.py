"""Shards and streams: digits written once, every eval sample once across ranks, exact resume, clear errors."""

import itertools
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf

from bigvit.data import build_data, expand_urls
from bigvit.data.plan import SourcePlan
from bigvit.data.reader import read_units, shard_sizes
from bigvit.data.shards import write_digits, write_split
from bigvit.data.stream import EvalStream, ResumableLoader, TrainStream
from bigvit.data.synthetic import SyntheticStream
from bigvit.data.transforms import eval_transform, train_transform


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    index = write_digits(root / "digits", image_size=16, samples_per_shard=200)
    return root / "digits", index


def uneven_shards(tmp_path, sizes=(7, 3, 11, 1, 5)):
    """Shards of the given sizes whose samples are named s<shard>_<i>; returns (urls, all keys)."""
    keys = []
    for shard, size in enumerate(sizes):
        samples = [{"__key__": f"s{shard}_{i}", "cls": b"0"} for i in range(size)]
        write_split(iter(samples), tmp_path, f"part{shard}", max_count=size, total=size)
        keys += [s["__key__"] for s in samples]
    return [str(tmp_path / f"part{shard}-000000.tar") for shard in range(len(sizes))], keys


def test_digits_are_written_once_with_a_fixed_split(digits_dir):
    root, index = digits_dir
    counts = {split: sum(info["counts"]) for split, info in index["splits"].items()}
    assert counts == {"train": 1437, "test": 360}
    assert index["splits"]["train"]["counts"] == [200] * 7 + [37]
    again = write_digits(root.parent / "again", image_size=16, samples_per_shard=200)
    assert again == index


@pytest.mark.parametrize("ranks,workers", [(2, 2), (4, 3), (1, 1), (8, 8)])
def test_epoch_plans_give_every_slot_an_equal_stretch_covering_every_sample(tmp_path, ranks, workers):
    urls, keys = uneven_shards(tmp_path)
    slots = ranks * workers
    plan = SourcePlan(shard_sizes(urls), seed=3)
    per_slot = [
        [s["__key__"] for _, _, s in read_units(plan.units(1, slot, slots), urls, None)]
        for slot in range(slots)
    ]
    length = -(-len(keys) // slots)  # every slot reads ceil(N / slots) samples
    assert {len(keys_read) for keys_read in per_slot} == {length}
    # The pad rule: the epoch's order, continued from its start, fills the slots' stretches.
    order = [s["__key__"] for _, _, s in read_units(plan.units(1, 0, 1), urls, None)]
    assert sorted(order) == sorted(keys)
    padded = list(itertools.islice(itertools.cycle(order), slots * length))
    assert [key for keys_read in per_slot for key in keys_read] == padded


def test_every_eval_sample_is_scored_once_across_ranks_and_workers(digits_dir):
    root, index = digits_dir
    urls = [str(root / name) for name in index["splits"]["test"]["shards"]]
    labels = Counter()
    total = 0
    for rank in range(2):
        stream = EvalStream(urls, 16, eval_transform(16, 1.0), rank=rank, world_size=2)
        for batch in ResumableLoader.plain_loader(stream, num_workers=2):
            labels.update(batch["label"].tolist())
            total += len(batch["label"])
    assert total == 360
    assert sum(labels.values()) == 360 and set(labels) == set(range(10))


def make_loader(urls, rank=0, world_size=1, workers=2, seed=5):
    stream = TrainStream(
        urls,
        8,
        train_transform(16, (0.5, 1.0)),
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle_buffer=64,
    )
    return ResumableLoader(stream, num_workers=workers)


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_repeats_the_uninterrupted_sequence_exactly(digits_dir, workers):
    root, index = digits_dir
    urls = [str(root / name) for name in index["splits"]["train"]["shards"]]
    # 1437 / 8 per batch: 190 batches run past one epoch on every worker.
    uninterrupted = list(itertools.islice(make_loader(urls, workers=workers), 190))
    first = make_loader(urls, workers=workers)
    head = list(itertools.islice(first, 183))
    state = first.state_dict()
    resumed = make_loader(urls, workers=workers)
    resumed.load_state_dict(state)
    tail = list(itertools.islice(resumed, 7))
    for expected, got in zip(uninterrupted, head + tail, strict=True):
        assert torch.equal(expected["label"], got["label"])
        assert torch.equal(expected["image"], got["image"])


def test_ranks_read_different_samples(digits_dir):
    root, index = digits_dir
    urls = [str(root / name) for name in index["splits"]["train"]["shards"]]
    batches = [next(iter(make_loader(urls, rank=r, world_size=2, workers=0))) for r in range(2)]
    assert not torch.equal(batches[0]["image"], batches[1]["image"])


def test_missing_shards_are_named(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"data.train_urls=.*2 shard\(s\) not found \(first: .*nope-000000.tar"
    ):
        expand_urls(str(tmp_path / "nope-{000000..000001}.tar"), "train_urls")


def test_synthetic_global_batches_do_not_depend_on_world_size():
    def global_batches(world_size):
        streams = [
            iter(SyntheticStream(8, 10, 8, rank=r, world_size=world_size, seed=1)) for r in range(world_size)
        ]
        return [torch.cat([next(s)["image"] for s in streams]) for _ in range(3)]

    for one, four in zip(global_batches(1), global_batches(4), strict=True):
        assert torch.equal(one, four)


def test_digits_config_builds_shards_on_first_use(tmp_path):
    cfg = OmegaConf.load("conf/data/digits.yaml")
    cfg.root, cfg.num_workers = str(tmp_path / "d"), 0
    data = build_data(cfg, rank=0, world_size=1, local_batch=4, seed=0)
    batch = next(iter(data.train))
    # Workers ship crops at their own size, at most the 32 px of the stored digits, in RGBX.
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape[::3] == (4, 4)
    assert (batch["extent"] <= 32).all() and batch["label"].dtype == torch.long
    images, labels = data.device_batch(batch, torch.device("cpu"))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and torch.equal(labels, batch["label"])
