"""Bad data: skipped, counted and named under on_error=warn; one clear error under raise; never a hang."""

import itertools
import json
import logging

import pytest
from PIL import Image

from bigvit.data.shards import png_bytes, write_split
from bigvit.data.stream import EvalStream, ResumableLoader, TrainStream
from bigvit.data.transforms import eval_transform, train_transform
from bigvit.errors import DataError
from tests.helpers import TINY, run_train

GOOD = {"read": 0, "missing": 0, "decode": 0}


def sample(key: str, label: int = 0) -> dict:
    return {"__key__": key, "png": png_bytes(Image.new("L", (8, 8), 10 * label)), "cls": str(label).encode()}


def write_shard(tmp_path, name: str, samples: list[dict]) -> str:
    write_split(iter(samples), tmp_path, name, max_count=len(samples), total=len(samples))
    return str(tmp_path / f"{name}-000000.tar")


@pytest.fixture
def bad_samples_shard(tmp_path):
    """10 samples: b3's image is garbage and b6 has no .cls."""
    samples = [sample(f"b{i}", i % 10) for i in range(10)]
    samples[3]["png"] = b"not a png"
    del samples[6]["cls"]
    return write_shard(tmp_path, "bad", samples)


def good_shards(tmp_path, count: int = 2, size: int = 6) -> list[str]:
    return [
        write_shard(tmp_path, f"good{s}", [sample(f"g{s}_{i}", i) for i in range(size)]) for s in range(count)
    ]


def truncated_shard(tmp_path, past_half: int) -> str:
    """A real 8-sample shard cut `past_half` bytes after its middle (0: a tar block boundary, unnoticed by tarfile)."""
    url = write_shard(tmp_path, "cut", [sample(f"c{i}", i) for i in range(8)])
    with open(url, "rb") as f:
        data = f.read()
    with open(url, "wb") as f:
        f.write(data[: len(data) // 2 + past_half])
    return url


def eval_pass(urls, on_error="warn", batch_size=4):
    loader = ResumableLoader.plain_loader(
        EvalStream(urls, batch_size, eval_transform(8, 1.0), rank=0, world_size=1, on_error=on_error), 0
    )
    labels = [label for batch in loader for label in batch["label"].tolist()]
    return labels, loader.skipped


def train_loader(urls, on_error="warn", batch_size=4, workers=0):
    stream = TrainStream(
        urls,
        batch_size,
        train_transform(8, (0.5, 1.0)),
        rank=0,
        world_size=1,
        seed=0,
        shuffle_buffer=8,
        on_error=on_error,
    )
    return ResumableLoader(stream, num_workers=workers)


def test_bad_samples_are_skipped_counted_and_named(bad_samples_shard, caplog):
    with caplog.at_level(logging.WARNING, logger="bigvit"):
        labels, skipped = eval_pass([bad_samples_shard])
    assert labels == [0, 1, 2, 4, 5, 7, 8, 9]
    assert skipped == {**GOOD, "missing": 1, "decode": 1}
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert "'b3'" in warnings and "'b6'" in warnings and bad_samples_shard in warnings


def test_train_stream_skips_bad_samples_and_counts_them_per_epoch(bad_samples_shard):
    loader = train_loader([bad_samples_shard], batch_size=4)
    batches = list(itertools.islice(loader, 4))  # 8 good samples per epoch: two epochs
    assert sorted(label for b in batches for label in b["label"].tolist()) == sorted(
        [0, 1, 2, 4, 5, 7, 8, 9] * 2
    )
    assert loader.skipped == {**GOOD, "missing": 2, "decode": 2}


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_sample_under_raise_names_shard_and_key(bad_samples_shard, workers):
    with pytest.raises(
        DataError, match=r"(decode|missing) error in shard .*bad-000000.tar \(sample 'b[36]'\)"
    ) as info:
        list(itertools.islice(train_loader([bad_samples_shard], "raise", workers=workers), 4))
    assert "Traceback" not in str(
        info.value
    )  # a worker's error arrives as one line, not torch's traceback dump


@pytest.mark.parametrize("past_half", [0, 100])
def test_truncated_shard_is_counted_and_the_good_shards_still_read(tmp_path, past_half):
    urls = [*good_shards(tmp_path), truncated_shard(tmp_path, past_half)]
    labels, skipped = eval_pass(urls)
    assert skipped["read"] == 1
    assert 12 <= len(labels) < 12 + 8  # the good shards whole, the cut one partly
    with pytest.raises(DataError, match=r"read error in shard .*cut-000000.tar \(after sample 'c\d'\)"):
        eval_pass(urls, "raise")


@pytest.mark.timeout(60)
def test_missing_url_is_skipped_and_an_all_unreadable_slot_is_an_error_not_a_hang(tmp_path):
    missing = str(tmp_path / "nope.tar")
    loader = train_loader([*good_shards(tmp_path), missing, "pipe:false"], batch_size=4)
    batches = list(itertools.islice(loader, 3))  # one epoch of 12 good samples
    assert sum(len(b["label"]) for b in batches) == 12
    assert loader.skipped == {**GOOD, "read": 2}
    with pytest.raises(DataError, match=r"read no samples .*nope.tar.*every one is unreadable"):
        next(iter(train_loader([missing, "pipe:false"])))
    with pytest.raises(DataError, match=r"read error in shard .*nope.tar \(before its first sample\)"):
        next(iter(train_loader([missing], "raise")))


def test_resume_skips_the_same_samples_and_keeps_the_counts(tmp_path, bad_samples_shard):
    urls = [*good_shards(tmp_path), bad_samples_shard, str(tmp_path / "nope.tar")]
    uninterrupted = train_loader(urls, workers=1)
    expected = list(itertools.islice(uninterrupted, 9))
    first = train_loader(urls, workers=1)
    head = list(itertools.islice(first, 4))
    resumed = train_loader(urls, workers=1)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as a checkpoint round trip would
    tail = list(itertools.islice(resumed, 5))
    assert [b["label"].tolist() for b in head + tail] == [b["label"].tolist() for b in expected]
    assert resumed.skipped == uninterrupted.skipped and uninterrupted.skipped["decode"] >= 2


def test_on_error_is_checked_where_it_is_set(bad_samples_shard):
    with pytest.raises(ValueError, match=r"data.on_error='ignore' is not one of \['warn', 'raise'\]"):
        train_loader([bad_samples_shard], on_error="ignore")


@pytest.mark.slow
def test_training_on_a_corrupt_shard_logs_skips_or_stops_with_one_line(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    samples = [sample(f"k{i:03d}", i % 10) for i in range(64)]
    samples[5]["png"] = b"garbage"
    write_split(iter(samples), shards, "train", max_count=32, total=64)
    data = [
        "data=webdataset",
        f"data.train_urls='{shards}/train-{{000000..000001}}.tar'",
        "data.num_classes=10",
        "data.batch_size=8",
        "data.num_workers=1",
        "data.shuffle_buffer=16",
        "parallel=single",
        "trainer.max_steps=10",
        "trainer.checkpoint_every=0",
        *TINY,
    ]
    run_train(tmp_path / "warn", data)
    records = [json.loads(line) for line in (tmp_path / "warn" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("train/data/skipped_decode", 0) for r in records) >= 1
    failed = run_train(tmp_path / "raise", [*data, "data.on_error=raise"], check=False)
    assert failed.returncode != 0
    errors = [line for line in failed.stderr.splitlines() if line.startswith("bigvit: error:")]
    assert len(errors) == 1 and "train-000000.tar" in errors[0] and "'k005'" in errors[0], failed.stderr[
        -2000:
    ]
