"""Write WebDataset shards (`prefix-%06d.tar` of `<key>.png|jpg` + `<key>.cls`) with an `index.json`.

`bigvit-shards digits --out data/digits` writes scikit-learn's handwritten digits, the embedded
default dataset; the train/test split is fixed by a seed.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from rich.progress import track

INDEX_FILE = "index.json"


def write_split(samples: Iterable[dict], out_dir: Path, split: str, max_count: int, total: int) -> dict:
    """Write samples (dicts of webdataset keys, e.g. __key__, png, cls) to `split-%06d.tar`; return its index."""
    counts: list[int] = []
    writer = None
    for sample in track(samples, total=total, description=f"writing {split} shards"):
        if writer is None or counts[-1] == max_count:
            if writer is not None:
                writer.close()
            writer = wds.TarWriter(str(out_dir / f"{split}-{len(counts):06d}.tar"))
            counts.append(0)
        writer.write(sample)
        counts[-1] += 1
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bigvit-shards", description=__doc__)
    sub = parser.add_subparsers(dest="source", required=True)
    digits = sub.add_parser("digits", help="scikit-learn's handwritten digits (shipped with the package)")
    digits.add_argument("--out", default="data/digits")
    digits.add_argument("--image-size", type=int, default=32)
    digits.add_argument("--seed", type=int, default=0)
    digits.add_argument("--samples-per-shard", type=int, default=256)
    args = parser.parse_args(argv)
    index = write_digits(args.out, args.image_size, args.seed, samples_per_shard=args.samples_per_shard)
    for split, info in index["splits"].items():
        print(f"{split}: {sum(info['counts'])} samples in {len(info['shards'])} shards under {args.out}")


if __name__ == "__main__":
    main()
