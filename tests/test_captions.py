"""Caption shards and tokenizers: exact round trips at a fixed length, captions streamed as "tokens" through
real dataloader workers, and empty, undecodable or missing captions counted as skips."""

import json
import logging
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from bigvit.data import build_data
from bigvit.data.captions import DIGIT_NAMES, DIGIT_TEMPLATES
from bigvit.data.shards import caption_spec, ensure_digits, main, png_bytes, write_split
from bigvit.data.stream import EvalStream, ResumableLoader
from bigvit.data.targets import Caption
from bigvit.data.tokenizer import (
    END_ID,
    PAD_ID,
    BPETokenizer,
    ByteTokenizer,
    build_tokenizer,
    load_tokenizer,
    train_bpe,
)
from bigvit.data.transforms import eval_transform
from bigvit.errors import ConfigError, DataError
from tests.helpers import compose_train

CAPTIONS = [
    "a photo of the digit seven",
    "a handwritten seven",
    "  two spaces, a\ttab and a trailing space ",
    "café, naïve, 東京 and 🙂",
    "text that spells <|endoftext|> and <|pad|>",
    "x",
]
NO_SKIPS = {"read": 0, "missing": 0, "decode": 0}


def check_rows(rows: torch.Tensor, length: int) -> None:
    """Fixed length; exactly one end token per row, followed only by padding (so the last position is end or pad)."""
    assert rows.dtype == torch.long and rows.shape == (rows.shape[0], length)
    for row in rows.tolist():
        end = row.index(END_ID)
        assert row.count(END_ID) == 1 and set(row[end + 1 :]) <= {PAD_ID} and PAD_ID not in row[:end]


@pytest.mark.parametrize("kind", ["bpe", "bytes"])
def test_tokenizers_round_trip_every_caption_exactly_at_a_fixed_length(kind, tmp_path):
    tokenizer = BPETokenizer(train_bpe(CAPTIONS, 300), 48) if kind == "bpe" else ByteTokenizer(96)
    rows = tokenizer.encode(CAPTIONS)
    check_rows(rows, tokenizer.context_length)
    assert tokenizer.decode(rows) == CAPTIONS
    assert int(rows.max()) < tokenizer.vocab_size
    # What dataloader workers and runs get: a pickled copy, and the saved file loaded back, encode alike.
    assert torch.equal(pickle.loads(pickle.dumps(tokenizer)).encode(CAPTIONS), rows)
    saved = tokenizer.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(saved, tokenizer.context_length)
    assert type(loaded) is type(tokenizer) and torch.equal(loaded.encode(CAPTIONS), rows)
    if kind == "bpe":  # merges learnt: the training captions take fewer tokens than their bytes
        assert (rows != PAD_ID).sum() < (ByteTokenizer(96).encode(CAPTIONS) != PAD_ID).sum()


def test_truncation_keeps_the_end_token(tmp_path):
    for tokenizer in (BPETokenizer(train_bpe(CAPTIONS, 300), 4), ByteTokenizer(4)):
        rows = tokenizer.encode(CAPTIONS)
        check_rows(rows, 4)
        assert (rows[:, -1] == END_ID).sum() == len(CAPTIONS) - 1  # all but "x" fill the row
        decoded = tokenizer.decode(rows)
        # A cut inside a multi-byte character shows as U+FFFD; every other cut is a prefix of the caption.
        assert all(c.startswith(t) or "\ufffd" in t for t, c in zip(decoded, CAPTIONS, strict=True))
    assert ByteTokenizer(4).decode(ByteTokenizer(4).encode("a photo")) == ["a p"]
    (tmp_path / "bad.json").write_text("{'not': json}")
    with pytest.raises(ConfigError, match="bad.json.*not JSON"):
        build_tokenizer(str(tmp_path / "bad.json"), 16)
    with pytest.raises(ConfigError, match="data.context_length=1 must be an integer >= 2"):
        ByteTokenizer(1)


def caption_shard(tmp_path, samples: list[dict]) -> str:
    write_split(iter(samples), tmp_path, "cap", max_count=len(samples), total=len(samples))
    return str(tmp_path / "cap-000000.tar")


def test_empty_undecodable_and_missing_captions_are_counted_skips_naming_the_sample(tmp_path, caplog):
    image = png_bytes(Image.new("L", (8, 8), 100))
    samples = [
        {"__key__": "good", "png": image, "txt": b"a seven\n", "cls": b"7"},
        {"__key__": "latin1", "png": image, "txt": "café".encode("latin-1")},
        {"__key__": "from_json", "png": image, "json": json.dumps({"caption": "a two"}).encode()},
        {"__key__": "blank", "png": image, "txt": b" \n\t"},
        {"__key__": "none", "png": image, "json": json.dumps({"path": "x.png"}).encode()},
    ]
    stream = EvalStream(
        [caption_shard(tmp_path, samples)], 8, eval_transform(8, 1.0), rank=0, world_size=1,
        targets=Caption(ByteTokenizer(12)),
    )  # fmt: skip
    loader = ResumableLoader.plain_loader(stream, 1)  # a real worker: the reader and tokenizer pickle into it
    with caplog.at_level(logging.WARNING, logger="bigvit"):
        (batch,) = list(loader)
    assert ByteTokenizer(12).decode(batch["tokens"]) == ["a seven", "a two"]
    assert batch["label"].tolist() == [7, -1]
    assert loader.skipped == {**NO_SKIPS, "decode": 2, "missing": 1}
    # Warnings are logged in the worker process, so the skip counts are what reach this process; the
    # message a skip raises under on_error=raise names the sample.
    with pytest.raises(DataError, match="'latin1'.*not UTF-8"):
        list(
            EvalStream(
                stream.urls,
                8,
                stream.transform,
                rank=0,
                world_size=1,
                on_error="raise",
                targets=stream.targets,
            )
        )


def write_images(folder, count: int) -> list[str]:
    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        names.append(f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / names[-1])
    return names


def shard_data(overrides: list[str]):
    cfg = compose_train(["data.num_workers=1", "data.batch_size=4", "data.targets=caption", *overrides])
    return build_data(cfg.data, rank=0, world_size=1, local_batch=4, seed=0)


def test_a_list_with_a_caption_column_streams_tokens_and_labels(tmp_path):
    names = write_images(tmp_path, 12)
    captions = [f"a {DIGIT_NAMES[i % 3]} on noise number {i}" for i in range(12)]
    captions[5] = "   "  # an empty caption: written, then a counted skip when read
    with (tmp_path / "list.csv").open("w") as file:
        file.write("path,label,caption\n")
        file.writelines(
            f'{name},{i % 3},"{caption}"\n'
            for i, (name, caption) in enumerate(zip(names, captions, strict=True))
        )
    out = tmp_path / "shards"
    main(
        [
            "list",
            str(tmp_path / "list.csv"),
            "--out",
            str(out),
            "--caption-column",
            "caption",
            "--workers",
            "1",
        ]
    )
    index = json.loads((out / "index.json").read_text())
    assert index["tokenizer"]["file"] == "tokenizer.json" and index["tokenizer"]["trained_on"] == "train"
    assert index["splits"]["train"]["empty_captions"] == 1

    urls = f"data.train_urls='{out}/train-000000.tar'"
    data = shard_data(["data=webdataset", urls, urls.replace("train_urls", "eval_urls"), "data.num_classes=3",
                       "data.image_size=8", "data.context_length=16", "data.shuffle_buffer=8"])  # fmt: skip
    assert (
        isinstance(data.tokenizer, BPETokenizer)
        and data.tokenizer.json_text == (out / "tokenizer.json").read_text()
    )
    good = {caption: i % 3 for i, caption in enumerate(captions) if caption.strip()}
    # Training: endless batches of fixed-length tokens whose captions and labels are the list's rows.
    for batch, _ in zip(data.train, range(4), strict=False):  # endless: 4 batches
        check_rows(batch["tokens"], 16)
        texts = data.tokenizer.decode(batch["tokens"])
        assert [good[text] for text in texts] == batch["label"].tolist()
    # Evaluation: each good row once, and the empty one counted.
    evaluation = data.make_eval()
    seen = [
        (text, label)
        for b in evaluation
        for text, label in zip(data.tokenizer.decode(b["tokens"]), b["label"].tolist(), strict=True)
    ]
    assert sorted(seen) == sorted(good.items())
    assert evaluation.skipped == {**NO_SKIPS, "decode": 1}


def txt_by_key(path) -> dict[str, tuple[str, int]]:
    with tarfile.open(path) as tar:
        files = {
            m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith((".txt", ".cls"))
        }
    files = {name: data.decode() for name, data in files.items()}
    return {
        name[:-4]: (text, int(files[name[:-4] + ".cls"]))
        for name, text in files.items()
        if name.endswith(".txt")
    }


def test_digits_captions_shards_carry_templated_captions_and_their_tokenizer(tmp_path):
    root = tmp_path / "digits"
    main(["digits", "--captions", "--out", str(root), "--image-size", "8"])
    index = json.loads((root / "index.json").read_text())
    train = {k: v for name in index["splits"]["train"]["shards"] for k, v in txt_by_key(root / name).items()}
    test = {k: v for name in index["splits"]["test"]["shards"] for k, v in txt_by_key(root / name).items()}
    assert len(train) == 1437 and len(test) == 360
    # Train: a drawn template per image, all of them used; test: the first template for every image.
    templates = {
        next(t for t in DIGIT_TEMPLATES if t.format(DIGIT_NAMES[label]) == text)
        for text, label in train.values()
    }
    assert templates == set(DIGIT_TEMPLATES)
    assert all(text == DIGIT_TEMPLATES[0].format(DIGIT_NAMES[label]) for text, label in test.values())
    tokenizer = load_tokenizer(root / "tokenizer.json", 16)
    distinct = sorted({text for text, _ in train.values()})
    rows = tokenizer.encode(distinct)
    assert tokenizer.decode(rows) == distinct and (rows[:, -1] == PAD_ID).all()  # every caption fits 16
    assert tokenizer.vocab_size == index["tokenizer"]["vocab_size"] < 512

    # data=digits_captions reads these shards (same spec: not rewritten) with their tokenizer.
    stamp = (root / "tokenizer.json").stat().st_mtime_ns
    data = shard_data(["data=digits_captions", f"data.root={root}", "data.image_size=8"])
    assert (root / "tokenizer.json").stat().st_mtime_ns == stamp
    assert data.tokenizer.json_text == (root / "tokenizer.json").read_text()
    batch = next(iter(data.make_eval()))
    expected = [DIGIT_TEMPLATES[0].format(DIGIT_NAMES[label]) for label in batch["label"].tolist()]
    assert data.tokenizer.decode(batch["tokens"]) == expected

    # Other templates are another dataset: the shards are rewritten, not silently reused.
    spec = caption_spec(templates=["digit {}", *DIGIT_TEMPLATES])
    assert ensure_digits(root, 8, 0, spec)["captions"]["templates"][0] == "digit {}"
    assert next(iter(txt_by_key(root / "test-000000.tar").values()))[0].startswith("digit ")
