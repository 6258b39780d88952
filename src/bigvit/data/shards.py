"""Write WebDataset shards (`prefix-%06d.tar` of `<key>.png|jpg` + `<key>.cls`) with an `index.json`.

`bigvit-shards digits --out data/digits` writes scikit-learn's handwritten digits, the embedded
default dataset; the train/test split is fixed by a seed.

`bigvit-shards folder ROOT --out DIR --prefix train` shards an ImageNet-style tree
`ROOT/<class>/**/*.jpg|jpeg|png|webp` (labels: sorted class folder names → 0..K-1);
`bigvit-shards list FILE --out DIR` does the same for a CSV (`path,label` header) or JSONL list.
Each sample is `<key>.jpg|png|webp` (the file's bytes, or a JPEG when `--resize` re-encodes),
`<key>.cls` and `<key>.json` ({"path", "class"}). Sample order is the sorted paths under a seeded
shuffle, so the same inputs and seed give byte-identical shards whatever `--workers` is.

Several prefixes (train, val) share one DIR: a run stages its shards in `DIR/.<prefix>.tmp`, then
replaces only the `<prefix>-*.tar` shards and the `<prefix>` entry of `DIR/index.json`. Run the
prefixes of one DIR one after another, not concurrently (they share index.json).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import glob
import io
import json
import multiprocessing
import os
import random
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from rich.progress import track

INDEX_FILE = "index.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format → extension the stream decodes
TAR_BLOCK = 512


class ShardError(ValueError):
    """A bad input (root, list, image); the CLI prints it as `bigvit-shards: error: ...`."""


def tar_size(sample: dict) -> int:
    """Bytes `sample` adds to a tar: a header block per member plus its data padded to whole blocks."""
    sizes = [len(v) for k, v in sample.items() if not k.startswith("_")]
    return sum(TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK for size in sizes)


def write_split(
    samples: Iterable[dict],
    out_dir: Path,
    split: str,
    max_count: int,
    total: int,
    max_bytes: int | None = None,
) -> dict:
    """Write samples (dicts of webdataset keys with bytes values, e.g. __key__, png, cls) to `split-%06d.tar`.

    A shard holds at most `max_count` samples and, unless one sample alone is larger, at most about
    `max_bytes` (tar headers and padding counted). Returns {"shards": [names], "counts": [samples]}.
    """
    counts: list[int] = []
    writer, size = None, 0
    for sample in track(samples, total=total, description=f"writing {split} shards"):
        grow = tar_size(sample)
        full = writer is not None and (counts[-1] == max_count or (max_bytes and size + grow > max_bytes))
        if writer is None or full:
            if writer is not None:
                writer.close()
            # A fixed mtime makes the same samples give byte-identical tars.
            writer = wds.TarWriter(str(out_dir / f"{split}-{len(counts):06d}.tar"), mtime=0)
            counts.append(0)
            size = 0
        writer.write(sample)
        counts[-1] += 1
        size += grow
    if writer is not None:
        writer.close()
    return {"shards": [f"{split}-{i:06d}.tar" for i in range(len(counts))], "counts": counts}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def digits_samples(images: np.ndarray, labels: np.ndarray, image_size: int, split: str) -> Iterator[dict]:
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        # Digits are 8x8 with values 0..16; upscale once here so training reads ordinary images.
        small = Image.fromarray(np.clip(pixels * 16, 0, 255).astype(np.uint8), mode="L")
        image = small.resize((image_size, image_size), Image.BICUBIC)
        yield {"__key__": f"{split}{i:05d}", "png": png_bytes(image), "cls": str(int(label)).encode()}


def write_digits(
    out_dir: str | Path,
    image_size: int = 32,
    seed: int = 0,
    test_fraction: float = 0.2,
    samples_per_shard: int = 256,
) -> dict:
    """Write the digits dataset as train/test shards under `out_dir` (atomically: a temp dir, then a rename)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    out_dir = Path(out_dir)
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index = {"dataset": "digits", "num_classes": 10, "image_size": image_size, "seed": seed, "splits": {}}
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        samples = digits_samples(x, y, image_size, split)
        index["splits"][split] = write_split(samples, tmp, split, samples_per_shard, len(y))
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return index


def read_index(root: str | Path) -> dict | None:
    path = Path(root) / INDEX_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def ensure_digits(root: str | Path, image_size: int, seed: int = 0) -> dict:
    """The digits index under `root`, writing the shards first if they are missing or of another size."""
    index = read_index(root)
    if index is None or index.get("image_size") != image_size or index.get("seed") != seed:
        index = write_digits(root, image_size=image_size, seed=seed)
    return index


def split_urls(root: str | Path, index: dict, split: str) -> list[str]:
    return [str(Path(root) / name) for name in index["splits"][split]["shards"]]


@dataclass(frozen=True)
class Item:
    """One input image: where it is read from, its name in the shard's .json, and its label."""

    path: Path
    name: str  # relative to ROOT, or as written in the list
    label: int


@dataclass(frozen=True)
class Encoding:
    """How images are stored: their own bytes (resize None), or shorter side → `resize` as a JPEG."""

    resize: int | None = None
    quality: int = 90


def image_files(folder: Path) -> list[Path]:
    """Sorted image files anywhere under `folder`; dot files and folders (e.g. macOS `._x.jpg`) are skipped."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and path.is_file()
    )


def folder_items(root: Path) -> tuple[list[Item], list[str]]:
    """Items of `root/<class>/**/<image>` and the sorted class names (a class's position is its label)."""
    if not root.is_dir():
        raise ShardError(f"ROOT={str(root)!r} is not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ShardError(f"ROOT={str(root)!r} has no class folders (expected ROOT/<class>/<image>)")
    items = [
        Item(path, path.relative_to(root).as_posix(), label)
        for label, name in enumerate(classes)
        for path in image_files(root / name)
    ]
    empty = sorted(set(classes) - {classes[item.label] for item in items})
    if empty:
        raise ShardError(
            f"ROOT={str(root)!r}: {len(empty)} class folder(s) hold no {'/'.join(IMAGE_SUFFIXES)} "
            f"images: {empty[:5]}"
        )
    return items, classes


def csv_rows(path: Path) -> list[dict]:
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        missing = {"path", "label"} - set(reader.fieldnames or [])
        if missing:
            raise ShardError(
                f"FILE={str(path)!r}: the CSV header {reader.fieldnames} lacks column(s) {sorted(missing)}; "
                "expected a header path,label"
            )
        rows = list(reader)
    for number, row in enumerate(rows, 2):  # line 1 is the header
        if not row["path"] or not row["label"]:
            raise ShardError(f"{path}:{number}: a row needs a path and a label, got {row}")
    return rows


def jsonl_rows(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ShardError(f"{path}:{number}: not JSON ({error})") from None
        if not isinstance(row, dict) or not {"path", "label"} <= row.keys():
            raise ShardError(
                f'{path}:{number}: expected {{"path": ..., "label": ...}}, got {line.strip()[:200]}'
            )
        rows.append(row)
    return rows


LIST_READERS = {".csv": csv_rows, ".jsonl": jsonl_rows, ".ndjson": jsonl_rows}


def list_items(path: Path) -> tuple[list[Item], list[str]]:
    """Items of a CSV/JSONL list and the class names; labels are ints, or names mapped to sorted positions."""
    reader = LIST_READERS.get(path.suffix.lower())
    if reader is None:
        raise ShardError(
            f"FILE={str(path)!r}: unknown list format {path.suffix!r}; expected one of {sorted(LIST_READERS)}"
        )
    if not path.is_file():
        raise ShardError(f"FILE={str(path)!r} does not exist")
    rows = reader(path)
    if not rows:
        raise ShardError(f"FILE={str(path)!r} lists no images")
    names = [str(row["label"]).strip() for row in rows]
    if all(name.isdigit() for name in names):
        # Integer labels are used as they are; a class's name is its number.
        classes = [str(i) for i in range(max(map(int, names)) + 1)]
        labels = [int(name) for name in names]
    else:
        classes = sorted(set(names))
        position = {name: i for i, name in enumerate(classes)}
        labels = [position[name] for name in names]
    # Relative paths are relative to the list, so a dataset folder with its list can move as a whole.
    items = [
        Item(path.parent / str(row["path"]), str(row["path"]), label)
        for row, label in zip(rows, labels, strict=True)
    ]
    return items, classes


def resized(image: Image.Image, short_side: int | None) -> Image.Image:
    """RGB `image` with its shorter side scaled to `short_side` (aspect kept); as it is when None."""
    image = image.convert("RGB")
    if short_side is None:
        return image
    width, height = image.size
    scale = short_side / min(width, height)
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)


def encode_image(path: Path, encoding: Encoding) -> tuple[str, bytes]:
    """(extension, bytes) of the image at `path` as a shard stores it; an unreadable file is an error naming it."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            # A full decode: a truncated file fails here, not hours into training.
            image.load()
            if encoding.resize is None and image.format in KEPT_FORMATS:
                return KEPT_FORMATS[image.format], data
            buffer = io.BytesIO()
            resized(image, encoding.resize).save(buffer, format="JPEG", quality=encoding.quality)
            return "jpg", buffer.getvalue()
    except Image.UnidentifiedImageError:
        raise ShardError(f"cannot read image {str(path)!r}: not an image format PIL can identify") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ShardError(f"cannot read image {str(path)!r}: {error}") from None


@contextlib.contextmanager
def encoded_images(
    paths: list[Path], encoding: Encoding, workers: int
) -> Iterator[Iterator[tuple[str, bytes]]]:
    """(extension, bytes) per path, in input order; encoded in a pool of `workers` processes when > 1."""
    encode = functools.partial(encode_image, encoding=encoding)
    if workers <= 1:
        yield map(encode, paths)
        return
    with multiprocessing.Pool(workers) as pool:
        # imap, not imap_unordered: results arrive in input order, so shards never depend on timing.
        yield pool.imap(encode, paths, chunksize=16)


def image_samples(
    items: list[Item], classes: list[str], images: Iterable[tuple[str, bytes]]
) -> Iterator[dict]:
    for i, (item, (ext, data)) in enumerate(zip(items, images, strict=True)):
        meta = {"path": item.name, "class": classes[item.label]}
        yield {
            "__key__": f"{i:08d}",
            ext: data,
            "cls": str(item.label).encode(),
            "json": json.dumps(meta).encode(),
        }


def check_split(out_dir: Path, prefix: str, classes: list[str]) -> None:
    """The splits of one DIR must share one label ↔ class mapping, or a label would mean two classes."""
    if not prefix or "/" in prefix or prefix.startswith("."):
        raise ShardError(f"--prefix={prefix!r} must be a plain file name prefix such as train or val")
    index = read_index(out_dir) or {}
    others = sorted(set(index.get("splits", {})) - {prefix})
    old = index.get("classes") or []
    if others and old != classes:
        raise ShardError(
            f"{out_dir / INDEX_FILE} has {len(old)} classes {old[:3]}... for split(s) {others}; this "
            f"{prefix!r} split has {len(classes)} classes {classes[:3]}...; write it to another --out"
        )


def install_shards(staging: Path, out_dir: Path, prefix: str) -> None:
    # Old shards of this prefix go first: a smaller rerun must leave no stale extra shard behind.
    for old in out_dir.glob(f"{glob.escape(prefix)}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        old.unlink()
    for new in sorted(staging.iterdir()):
        os.replace(new, out_dir / new.name)


def update_index(out_dir: Path, prefix: str, split: dict, classes: list[str]) -> dict:
    index = {**(read_index(out_dir) or {}), "classes": classes, "num_classes": len(classes)}
    index.setdefault("splits", {})[prefix] = split
    tmp = out_dir / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out_dir / INDEX_FILE)  # readers never see a half-written index
    return index


def write_images(
    items: list[Item],
    classes: list[str],
    out_dir: str | Path,
    prefix: str = "train",
    *,
    max_count: int = 1000,
    max_bytes: int | None = None,
    encoding: Encoding = Encoding(),
    workers: int = 1,
    seed: int = 0,
    source: str = "",
) -> dict:
    """Shard `items` into `out_dir/prefix-%06d.tar` (see the module docstring); return the updated index.json."""
    out_dir = Path(out_dir)
    check_split(out_dir, prefix, classes)
    items = sorted(items, key=lambda item: (item.name, item.label))
    random.Random(seed).shuffle(items)  # classes mix across shards
    staging = out_dir / f".{prefix}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with encoded_images([item.path for item in items], encoding, workers) as images:
            samples = image_samples(items, classes, images)
            split = write_split(samples, staging, prefix, max_count, len(items), max_bytes)
        install_shards(staging, out_dir, prefix)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    split.update(source=source, seed=seed, resize=encoding.resize, quality=encoding.quality)
    return update_index(out_dir, prefix, split, classes)


def positive_int(text: str) -> int:
    value = int(float(text))  # float first, so --max-bytes 1e9 works
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def add_image_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder; other prefixes in it are kept")
    parser.add_argument("--prefix", default="train", help="shards are PREFIX-%%06d.tar")
    parser.add_argument("--max-count", type=positive_int, default=1000, help="samples per shard at most")
    parser.add_argument(
        "--max-bytes", type=positive_int, default=10**9, help="bytes per shard at most (1e9 ok)"
    )
    parser.add_argument(
        "--resize", type=positive_int, default=None, help="re-encode: shorter side → RESIZE px"
    )
    parser.add_argument("--quality", type=positive_int, default=90, help="JPEG quality when re-encoding")
    parser.add_argument("--workers", type=positive_int, default=min(os.cpu_count() or 1, 8))
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order")


def shard_images(args: argparse.Namespace) -> dict:
    source = Path(args.root if args.source == "folder" else args.file)
    items, classes = folder_items(source) if args.source == "folder" else list_items(source)
    return write_images(
        items,
        classes,
        args.out,
        args.prefix,
        max_count=args.max_count,
        max_bytes=args.max_bytes,
        encoding=Encoding(args.resize, args.quality),
        workers=args.workers,
        seed=args.seed,
        source=str(source),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bigvit-shards", description=__doc__)
    sub = parser.add_subparsers(dest="source", required=True)
    digits = sub.add_parser("digits", help="scikit-learn's handwritten digits (shipped with the package)")
    digits.add_argument("--out", default="data/digits")
    digits.add_argument("--image-size", type=int, default=32)
    digits.add_argument("--seed", type=int, default=0)
    digits.add_argument("--samples-per-shard", type=int, default=256)
    folder = sub.add_parser("folder", help="an ImageNet-style tree ROOT/<class>/**/<image>")
    folder.add_argument("root")
    add_image_options(folder)
    listing = sub.add_parser("list", help="a CSV (path,label header) or JSONL list of images")
    listing.add_argument("file")
    add_image_options(listing)
    args = parser.parse_args(argv)
    if args.source == "digits":
        index = write_digits(args.out, args.image_size, args.seed, samples_per_shard=args.samples_per_shard)
        for split, info in index["splits"].items():
            print(f"{split}: {sum(info['counts'])} samples in {len(info['shards'])} shards under {args.out}")
        return
    try:
        index = shard_images(args)
    except ShardError as error:
        raise SystemExit(f"bigvit-shards: error: {error}") from None
    info = index["splits"][args.prefix]
    print(
        f"{args.prefix}: {sum(info['counts'])} samples of {index['num_classes']} classes "
        f"in {len(info['shards'])} shards under {args.out}"
    )


if __name__ == "__main__":
    main()
