"""bigvit-shards folder/list: every image once with its label, deterministic shards, clear errors, and they train."""

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from bigvit.data.shards import main, tar_size
from tests.helpers import TINY, run_train, summary

CLASSES = ["cat", "dog", "fish"]
NUM_IMAGES = 30


def make_tree(root: Path) -> dict[str, int]:
    """30 noise images in 3 class folders (dog's nested), JPEG and PNG of varied sizes; rel path → label."""
    rng = np.random.default_rng(0)
    labels = {}
    for i in range(NUM_IMAGES):
        label = i % 3
        folder = Path(CLASSES[label]) / ("a/b" if label == 1 and i % 2 else "")
        ext = "png" if i % 4 == 0 else ("jpeg" if i % 5 == 0 else "jpg")
        rel = (folder / f"img{i:02d}.{ext}").as_posix()
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        size = (20 + i, 40 - i // 2)
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / rel, format="PNG" if ext == "png" else "JPEG")
        labels[rel] = label
    return labels


def shard(args: list[str]) -> None:
    main([*args, "--workers", "1"] if "--workers" not in args else args)


def read_samples(out: Path, prefix: str = "train") -> list[dict]:
    index = json.loads((out / "index.json").read_text())
    urls = [str(out / name) for name in index["splits"][prefix]["shards"]]
    return list(wds.tarfile_samples([{"url": url} for url in urls]))


def tar_bytes(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.glob("*.tar"))}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree") / "images"
    labels = make_tree(root)
    out = root.parent / "shards"
    shard(["folder", str(root), "--out", str(out), "--max-count", "7"])
    return root, labels, out


def test_folder_shards_hold_every_image_once_with_its_label(tree):
    root, labels, out = tree
    index = json.loads((out / "index.json").read_text())
    split = index["splits"]["train"]
    assert index["classes"] == CLASSES and index["num_classes"] == 3
    assert sum(split["counts"]) == NUM_IMAGES
    assert len(split["shards"]) == math.ceil(NUM_IMAGES / 7) and max(split["counts"]) == 7
    samples = read_samples(out)
    meta = [json.loads(s["json"]) for s in samples]
    assert sorted(m["path"] for m in meta) == sorted(labels)
    for sample, m in zip(samples, meta, strict=True):
        assert int(sample["cls"]) == labels[m["path"]] and m["class"] == CLASSES[labels[m["path"]]]
        # Not re-encoding keeps each file's bytes, under the extension of its real format.
        ext = "png" if m["path"].endswith(".png") else "jpg"
        assert sample[ext] == (root / m["path"]).read_bytes()
    # The seeded shuffle mixes classes: the first shard is not a single class.
    assert len({int(s["cls"]) for s in samples[:7]}) > 1


def test_reruns_and_worker_counts_give_byte_identical_shards(tree, tmp_path):
    root, _, out = tree
    shard(["folder", str(root), "--out", str(tmp_path / "again"), "--max-count", "7"])
    assert tar_bytes(tmp_path / "again") == tar_bytes(out)
    resized = {}
    for workers in ("1", "2"):
        resized[workers] = tmp_path / f"w{workers}"
        args = ["folder", str(root), "--out", str(resized[workers]), "--resize", "16", "--workers", workers]
        shard(args)
    assert tar_bytes(resized["1"]) == tar_bytes(resized["2"])
    samples = read_samples(resized["2"])
    assert len(samples) == NUM_IMAGES and all("png" not in s for s in samples)
    assert {min(Image.open(io.BytesIO(s["jpg"])).size) for s in samples} == {16}


def test_max_bytes_closes_shards_before_they_grow_past_it(tree, tmp_path):
    root, _, _ = tree
    max_bytes = 12_000
    shard(["folder", str(root), "--out", str(tmp_path / "b"), "--max-bytes", str(max_bytes)])
    index = json.loads((tmp_path / "b" / "index.json").read_text())
    assert (
        sum(index["splits"]["train"]["counts"]) == NUM_IMAGES and len(index["splits"]["train"]["shards"]) > 3
    )
    for name in index["splits"]["train"]["shards"]:
        with tarfile.open(tmp_path / "b" / name) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        assert tar_size(members) <= max_bytes or len(members) == 3  # one sample alone may be larger


def test_lists_of_class_names_and_of_ints_label_alike(tree, tmp_path):
    root, labels, _ = tree
    names = {0: "zebra", 1: "ant", 2: "moth"}  # sorted: ant=0, moth=1, zebra=2
    csv_file = root / "list.csv"
    csv_file.write_text("path,label\n" + "".join(f"{p},{names[y]}\n" for p, y in labels.items()))
    shard(["list", str(csv_file), "--out", str(tmp_path / "csv")])
    by_name = {
        json.loads(s["json"])["path"]: (int(s["cls"]), json.loads(s["json"])["class"])
        for s in read_samples(tmp_path / "csv")
    }
    remap = {0: 2, 1: 0, 2: 1}
    assert by_name == {p: (remap[y], names[y]) for p, y in labels.items()}

    jsonl_file = tmp_path / "list.jsonl"
    jsonl_file.write_text(
        "".join(json.dumps({"path": str(root / p), "label": y}) + "\n" for p, y in labels.items())
    )
    shard(["list", str(jsonl_file), "--out", str(tmp_path / "jsonl"), "--prefix", "val"])
    index = json.loads((tmp_path / "jsonl" / "index.json").read_text())
    assert index["classes"] == ["0", "1", "2"]
    got = {json.loads(s["json"])["path"]: int(s["cls"]) for s in read_samples(tmp_path / "jsonl", "val")}
    assert got == {str(root / p): y for p, y in labels.items()}


def test_prefixes_share_a_folder_without_clobbering_each_other(tree, tmp_path):
    root, _, _ = tree
    out = tmp_path / "both"
    shard(["folder", str(root), "--out", str(out), "--max-count", "10", "--prefix", "val"])
    shard(["folder", str(root), "--out", str(out), "--max-count", "7"])
    shard(["folder", str(root), "--out", str(out), "--max-count", "15"])  # a rerun replaces train's shards
    index = json.loads((out / "index.json").read_text())
    assert {k: v["counts"] for k, v in index["splits"].items()} == {"val": [10, 10, 10], "train": [15, 15]}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["index.json", "train-000000.tar", "train-000001.tar", *(f"val-{i:06d}.tar" for i in range(3))]
    )


def error_of(args: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        shard(args)
    message = str(info.value.code)
    assert message.startswith("bigvit-shards: error: ")
    return message


def test_bad_inputs_are_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no class folders" in error_of(["folder", str(empty), "--out", str(tmp_path / "o")])
    (empty / "cat").mkdir()
    assert "['cat']" in error_of(["folder", str(empty), "--out", str(tmp_path / "o")])
    (empty / "cat" / "x.jpg").write_bytes(b"not an image at all")
    for workers in ("1", "2"):
        message = error_of(["folder", str(empty), "--out", str(tmp_path / "o"), "--workers", workers])
        assert f"cannot read image {str(empty / 'cat' / 'x.jpg')!r}" in message
    listing = tmp_path / "list.txt"
    listing.write_text("x.jpg 0\n")
    assert "unknown list format '.txt'" in error_of(["list", str(listing), "--out", str(tmp_path / "o")])
    listing = tmp_path / "list.csv"
    listing.write_text("file,label\nx.jpg,0\n")
    assert "lacks column(s) ['path']" in error_of(["list", str(listing), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.tar"))


def test_splits_with_other_classes_are_refused(tree, tmp_path):
    root, labels, _ = tree
    out = tmp_path / "mixed"
    shard(["folder", str(root), "--out", str(out), "--prefix", "val"])
    listing = tmp_path / "l.jsonl"
    listing.write_text(json.dumps({"path": str(root / next(iter(labels))), "label": 0}) + "\n")
    assert "for split(s) ['val']" in error_of(["list", str(listing), "--out", str(out)])


@pytest.mark.slow
def test_folder_shards_train(tree, tmp_path):
    _, _, out = tree
    last = len(json.loads((out / "index.json").read_text())["splits"]["train"]["shards"]) - 1
    urls = f"{out}/train-{{000000..{last:06d}}}.tar"
    run_train(
        tmp_path / "run",
        [
            *TINY,
            "data=webdataset",
            f"data.train_urls='{urls}'",
            f"data.eval_urls='{urls}'",
            "data.num_classes=3",
            "data.image_size=16",
            "data.num_workers=0",
            "data.batch_size=4",
            "parallel=single",
            "trainer.max_steps=3",
            "schedule.warmup_steps=1",
        ],
    )
    assert summary(tmp_path / "run")["final_step"] == 3
