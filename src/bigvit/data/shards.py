"""Write WebDataset shards (`prefix-%06d.tar` of `<key>.png|jpg` + `<key>.cls`) with an `index.json`.

`bigvit-shards digits --out data/digits` writes scikit-learn's handwritten digits, the embedded
default dataset; the train/test split is fixed by a seed. `--captions` adds a `<key>.txt` caption
per image from bigvit.data.captions' templates (train: a seeded template per image; test: the first
template) and trains a byte-level BPE tokenizer on the train captions.

`bigvit-shards folder ROOT --out DIR --prefix train` shards an ImageNet-style tree
`ROOT/<class>/**/*.jpg|jpeg|png|webp` (labels: sorted class folder names → 0..K-1);
`bigvit-shards list FILE --out DIR` does the same for a CSV (`path,label` header) or JSONL list.
Each sample is `<key>.jpg|png|webp` (the file's bytes, or a JPEG when `--resize` re-encodes),
`<key>.cls` and `<key>.json` ({"path", "class"}). With `--caption-column NAME` each sample also
gets `<key>.txt`, the row's caption (the label column may then be left out: no .cls), and the
captions train DIR's `tokenizer.json` (a byte-level BPE, recorded in index.json; the `train` prefix's
captions win over other prefixes'). Sample order is the sorted paths under a seeded
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
import hashlib
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

from bigvit.data import captions as digit_captions
from bigvit.data.tokenizer import DEFAULT_VOCAB_SIZE, TOKENIZER_FILE, train_bpe

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


def digits_samples(
    images: np.ndarray, labels: np.ndarray, image_size: int, split: str, texts: list[str] | None = None
) -> Iterator[dict]:
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        # Digits are 8x8 with values 0..16; upscale once here so training reads ordinary images.
        small = Image.fromarray(np.clip(pixels * 16, 0, 255).astype(np.uint8), mode="L")
        image = small.resize((image_size, image_size), Image.BICUBIC)
        sample = {"__key__": f"{split}{i:05d}", "png": png_bytes(image), "cls": str(int(label)).encode()}
        if texts is not None:
            sample["txt"] = texts[i].encode()
        yield sample


def caption_spec(
    class_names=digit_captions.DIGIT_NAMES,
    templates=digit_captions.DIGIT_TEMPLATES,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> dict:
    """What captioned digits shards are made from, as index.json records it (a change rewrites them)."""
    spec = {"class_names": [str(n) for n in class_names], "templates": [str(t) for t in templates]}
    digit_captions.check_templates(spec["templates"], spec["class_names"])
    if len(spec["class_names"]) != 10:
        raise ValueError(f"the digits have 10 classes; class_names={spec['class_names']} has {len(spec['class_names'])}")
    return {**spec, "vocab_size": int(vocab_size)}


def save_tokenizer(folder: Path, texts: list[str], vocab_size: int, trained_on: str) -> dict:
    """Train a byte-level BPE on the non-empty `texts`, save folder/tokenizer.json; its index.json entry."""
    text = train_bpe([t for t in texts if t.strip()], vocab_size)
    tmp = folder / (TOKENIZER_FILE + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, folder / TOKENIZER_FILE)
    return {
        "file": TOKENIZER_FILE,
        "kind": "bpe",
        "vocab_size": len(json.loads(text)["model"]["vocab"]),
        "max_vocab_size": vocab_size,
        "trained_on": trained_on,
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
    }


def write_digits(
    out_dir: str | Path,
    image_size: int = 32,
    seed: int = 0,
    test_fraction: float = 0.2,
    samples_per_shard: int = 256,
    captions: dict | None = None,
) -> dict:
    """Write the digits dataset as train/test shards under `out_dir` (atomically: a temp dir, then a rename).

    `captions` (a `caption_spec`): each image also gets a `.txt` caption, and the train captions train
    the `tokenizer.json` saved beside index.json."""
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
    texts = {}
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if captions:
            texts[split] = digit_captions.captions(
                y, captions["class_names"], captions["templates"], draw=split == "train", seed=seed
            )
        samples = digits_samples(x, y, image_size, split, texts.get(split))
        index["splits"][split] = write_split(samples, tmp, split, samples_per_shard, len(y))
    if captions:
        index["captions"] = captions
        index["tokenizer"] = save_tokenizer(tmp, texts["train"], captions["vocab_size"], "train")
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return index


def read_index(root: str | Path) -> dict | None:
    path = Path(root) / INDEX_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def ensure_digits(root: str | Path, image_size: int, seed: int = 0, captions: dict | None = None) -> dict:
    """The digits index under `root`, writing the shards first if they are missing, of another size or
    seed, or captioned otherwise than `captions` asks (a `caption_spec`, or None for no captions)."""
    index = read_index(root)
    if (
        index is None
        or index.get("image_size") != image_size
        or index.get("seed") != seed
        or index.get("captions") != captions
    ):
        index = write_digits(root, image_size=image_size, seed=seed, captions=captions)
    return index


def split_urls(root: str | Path, index: dict, split: str) -> list[str]:
    return [str(Path(root) / name) for name in index["splits"][split]["shards"]]


@dataclass(frozen=True)
class Item:
    """One input image: where it is read from, its name in the shard's .json, its label and caption."""

    path: Path
    name: str  # relative to ROOT, or as written in the list
    label: int | None  # None: a captions list without labels
    caption: str | None = None


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


def csv_rows(path: Path, caption: str | None = None) -> list[dict]:
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        columns = set(reader.fieldnames or [])
        # A captions list may leave labels out; a classification list needs them.
        needed = {"path"} | ({"label"} if caption is None or "label" in columns else set()) | ({caption} - {None})
        missing = needed - columns
        if missing:
            raise ShardError(
                f"FILE={str(path)!r}: the CSV header {reader.fieldnames} lacks column(s) {sorted(missing)}; "
                f"expected a header {','.join(c for c in ('path', 'label', caption) if c)}"
            )
        rows = list(reader)
    for number, row in enumerate(rows, 2):  # line 1 is the header
        if not row["path"] or ("label" in columns and not row["label"]):
            raise ShardError(f"{path}:{number}: a row needs a path and a label, got {row}")
        if caption is not None and row[caption] is None:
            raise ShardError(f"{path}:{number}: the row has no {caption!r} column, got {row}")
    return rows


def jsonl_rows(path: Path, caption: str | None = None) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ShardError(f"{path}:{number}: not JSON ({error})") from None
        needed = {"path", "label"} if caption is None else {"path", caption}
        if not isinstance(row, dict) or not needed <= row.keys():
            fields = ", ".join(f'"{name}": ...' for name in sorted(needed))
            raise ShardError(f"{path}:{number}: expected {{{fields}}}, got {line.strip()[:200]}")
        rows.append(row)
    if caption is not None and len({"label" in row for row in rows}) > 1:
        raise ShardError(f"FILE={str(path)!r}: some rows have a label and some do not; give all or none")
    return rows


LIST_READERS = {".csv": csv_rows, ".jsonl": jsonl_rows, ".ndjson": jsonl_rows}


def list_items(path: Path, caption: str | None = None) -> tuple[list[Item], list[str]]:
    """Items of a CSV/JSONL list and the class names; labels are ints, or names mapped to sorted positions.
    `caption`: the column (JSONL: key) of each image's caption; labels are then optional."""
    reader = LIST_READERS.get(path.suffix.lower())
    if reader is None:
        raise ShardError(
            f"FILE={str(path)!r}: unknown list format {path.suffix!r}; expected one of {sorted(LIST_READERS)}"
        )
    if not path.is_file():
        raise ShardError(f"FILE={str(path)!r} does not exist")
    rows = reader(path, caption)
    if not rows:
        raise ShardError(f"FILE={str(path)!r} lists no images")
    texts = [str(row[caption]).strip() for row in rows] if caption else [None] * len(rows)
    if "label" not in rows[0]:
        # A captions list without labels: no .cls, no classes.
        return [Item(path.parent / str(r["path"]), str(r["path"]), None, t) for r, t in zip(rows, texts, strict=True)], []
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
        Item(path.parent / str(row["path"]), str(row["path"]), label, text)
        for row, label, text in zip(rows, labels, texts, strict=True)
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
        meta = {"path": item.name}
        sample = {"__key__": f"{i:08d}", ext: data}
        if item.label is not None:
            meta["class"] = classes[item.label]
            sample["cls"] = str(item.label).encode()
        if item.caption is not None:
            # Written even when empty: the reader counts it as a skipped sample, where it can be seen.
            sample["txt"] = item.caption.encode()
        yield {**sample, "json": json.dumps(meta).encode()}


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


def update_index(
    out_dir: Path, prefix: str, split: dict, classes: list[str], tokenizer: dict | None = None
) -> dict:
    index = {**(read_index(out_dir) or {}), "classes": classes, "num_classes": len(classes)}
    index.setdefault("splits", {})[prefix] = split
    if tokenizer is not None:
        index["tokenizer"] = tokenizer
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
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> dict:
    """Shard `items` into `out_dir/prefix-%06d.tar` (see the module docstring); return the updated index.json.

    Items with captions also (re)train DIR's tokenizer.json on them when this prefix is `train`, DIR has
    none yet, or this prefix trained the one there."""
    out_dir = Path(out_dir)
    check_split(out_dir, prefix, classes)
    items = sorted(items, key=lambda item: (item.name, -1 if item.label is None else item.label))
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
    tokenizer = None
    texts = [item.caption for item in items if item.caption is not None]
    if texts:
        split["captions"] = len(texts)
        split["empty_captions"] = sum(not text for text in texts)
        old = (read_index(out_dir) or {}).get("tokenizer")
        if prefix == "train" or old is None or old.get("trained_on") == prefix:
            tokenizer = save_tokenizer(out_dir, texts, vocab_size, prefix)
    return update_index(out_dir, prefix, split, classes, tokenizer)


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


def add_vocab_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vocab-size",
        type=vocab_size,
        default=DEFAULT_VOCAB_SIZE,
        help="most tokens of the BPE tokenizer trained on the captions (fewer if the captions run out of merges)",
    )


def vocab_size(text: str) -> int:
    value = positive_int(text)
    if value < 258:
        raise argparse.ArgumentTypeError(f"{text!r}: a byte-level BPE needs >= 258 tokens (256 bytes + 2 special)")
    return value


def shard_images(args: argparse.Namespace) -> dict:
    source = Path(args.root if args.source == "folder" else args.file)
    items, classes = folder_items(source) if args.source == "folder" else list_items(source, args.caption_column)
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
        vocab_size=getattr(args, "vocab_size", DEFAULT_VOCAB_SIZE),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bigvit-shards", description=__doc__)
    sub = parser.add_subparsers(dest="source", required=True)
    digits = sub.add_parser("digits", help="scikit-learn's handwritten digits (shipped with the package)")
    digits.add_argument("--out", default="data/digits")
    digits.add_argument("--image-size", type=int, default=32)
    digits.add_argument("--seed", type=int, default=0)
    digits.add_argument("--samples-per-shard", type=int, default=256)
    digits.add_argument("--captions", action="store_true", help="a templated caption per image + tokenizer.json")
    add_vocab_option(digits)
    folder = sub.add_parser("folder", help="an ImageNet-style tree ROOT/<class>/**/<image>")
    folder.add_argument("root")
    add_image_options(folder)
    listing = sub.add_parser("list", help="a CSV (path,label header) or JSONL list of images")
    listing.add_argument("file")
    listing.add_argument(
        "--caption-column", default=None, help="column (JSONL: key) of each image's caption → <key>.txt"
    )
    add_image_options(listing)
    add_vocab_option(listing)
    args = parser.parse_args(argv)
    if args.source == "digits":
        captions = caption_spec(vocab_size=args.vocab_size) if args.captions else None
        index = write_digits(
            args.out, args.image_size, args.seed, samples_per_shard=args.samples_per_shard, captions=captions
        )
        for split, info in index["splits"].items():
            print(f"{split}: {sum(info['counts'])} samples in {len(info['shards'])} shards under {args.out}")
        if captions:
            print(f"captions: {len(captions['templates'])} templates; tokenizer: {index['tokenizer']['vocab_size']} tokens")
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
    if info.get("captions"):
        print(
            f"{args.prefix}: {info['captions']} captions ({info['empty_captions']} empty: skipped when read); "
            f"tokenizer: {index['tokenizer']['vocab_size']} tokens, trained on {index['tokenizer']['trained_on']!r}"
        )


if __name__ == "__main__":
    main()
