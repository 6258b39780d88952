"""Data stream throughput per worker: bigvit's TrainStream vs a bare tar-read + PIL decode loop (the limit).

Writes 224x224 JPEG shards (crops of scikit-learn's sample photographs, so JPEG sizes are those of
natural images) to a temp dir, then measures one process with one torch thread, as a dataloader
worker runs, no Image.draft anywhere:
  bare:    read each member's bytes from the tar + PIL decode + convert("RGB")
  stream:  TrainStream (shard plan, tar reader, shuffle buffer, positions, batching) with decode only,
           then to uint8 tensors, then RandomResizedCrop + flip to uint8 batches as bigvit trains
           (normalize and mixup run on the device), and for comparison normalizing to float in the
           worker; also in one dataloader worker process, whose batches cross through shared memory
Pipelines alternate round by round so that machine drift hits all alike; medians are reported.
Resume-state costs: state_dict() per call, the first batch of a resumed stream (buffer simulated,
its samples re-read) vs a fresh one, and planning a layout change mid-epoch for a large epoch.

    python bench/data.py [--images 512] [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import itertools
import random
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import report
from PIL import Image

from bigvit.data.plan import LayoutRecord, SourcePlan
from bigvit.data.shards import write_split
from bigvit.data.stream import ResumableLoader, TrainStream
from bigvit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize, pixels, train_transform

SIZE = 224
BATCH = 32


def natural_jpegs(count: int, seed: int = 0, size: int = SIZE) -> list[bytes]:
    """`count` size×size JPEGs (quality 90): random crops, flips and brightness of two photographs."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(array) for array in load_sample_images().images]
    rng = random.Random(seed)
    jpegs = []
    for _ in range(count):
        photo = rng.choice(photos)
        side = rng.uniform(size, min(photo.size))
        left, top = rng.uniform(0, photo.width - side), rng.uniform(0, photo.height - side)
        image = photo.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        gain = rng.uniform(0.7, 1.3)
        image = image.point([min(255, int(v * gain)) for v in range(256)] * 3)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs


def write_shards(directory: Path, jpegs: list[bytes], per_shard: int = 128) -> list[str]:
    samples = ({"__key__": f"{i:06d}", "jpg": data, "cls": b"%d" % (i % 10)} for i, data in enumerate(jpegs))
    split = write_split(samples, directory, "bench", per_shard, len(jpegs))
    return [str(directory / name) for name in split["shards"]]


def bare_loop(urls: list[str], images: int) -> tuple[int, float]:
    """(images, seconds) of reading and decoding `images` images from the shards, round and round."""
    start, done = time.perf_counter(), 0
    while done < images:
        for url in urls:
            with tarfile.open(url, mode="r|") as tar:
                for member in tar:
                    if member.name.endswith(".jpg"):
                        Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                        done += 1
    return done, time.perf_counter() - start


def stream_loader(urls: list[str], transform, workers: int = 0) -> ResumableLoader:
    stream = TrainStream(urls, BATCH, transform, rank=0, world_size=1, seed=0, shuffle_buffer=256)
    return ResumableLoader(stream, num_workers=workers)


def stream_loop(loader: ResumableLoader, images: int) -> tuple[int, float]:
    """(images, seconds) after the first batch: the steady rate, without a worker's start-up and buffer fill."""
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    done = sum(len(batch["label"]) for batch in itertools.islice(batches, images // BATCH))
    return done, time.perf_counter() - start


def throughput_rows(urls: list[str], images: int, rounds: int) -> list[dict]:
    normalize, augment = Normalize(IMAGENET_MEAN, IMAGENET_STD), train_transform(SIZE)
    float_augment = lambda image, rng: normalize(augment(image, rng))  # noqa: E731
    nothing = torch.zeros(0)
    loaders = {
        "stream: decode only, no tensor (the stream's own cost)": stream_loader(
            urls, lambda image, rng: nothing
        ),
        "stream: decode → uint8 tensor": stream_loader(urls, lambda image, rng: pixels(image)),
        "stream: decode + RandomResizedCrop + flip → uint8 (bigvit)": stream_loader(urls, augment),
        "  the same + normalize to float in the worker": stream_loader(urls, float_augment),
        # In one dataloader worker process: batches cross to the main process through shared memory.
        "bigvit, in 1 worker process": stream_loader(urls, augment, workers=1),
        "  the same + normalize in the worker, in 1 worker process": stream_loader(
            urls, float_augment, workers=1
        ),
    }
    pipelines = {"bare: tar read + PIL decode + RGB": lambda: bare_loop(urls, images)}
    pipelines.update(
        {name: (lambda loader=loader: stream_loop(loader, images)) for name, loader in loaders.items()}
    )
    rates: dict[str, list[float]] = {name: [] for name in pipelines}
    for index in range(rounds + 1):  # the first round warms caches and is not counted
        for name, run in pipelines.items():
            count, elapsed = run()
            if index:
                rates[name].append(count / elapsed)
    bare = statistics.median(rates["bare: tar read + PIL decode + RGB"])
    return [
        {
            "pipeline": name,
            "img/s": statistics.median(values),
            "vs bare": statistics.median(values) / bare,
            "ms/img": 1e3 / statistics.median(values),
        }
        for name, values in rates.items()
    ]


def seconds(action, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        action()
    return (time.perf_counter() - start) / repeat


def resume_rows(urls: list[str]) -> list[dict]:
    transform = train_transform(SIZE)
    fresh = stream_loader(urls, transform)
    first_fresh = seconds(lambda: next(iter(stream_loader(urls, transform))))
    list(itertools.islice(fresh, 7))  # mid-epoch: 224 of 512 samples taken
    state = fresh.state_dict()

    def resumed_first_batch():
        loader = stream_loader(urls, transform)
        loader.load_state_dict(state)
        next(iter(loader))

    # A layout change mid-epoch of an ImageNet-sized source: 1024 shards of 1251 samples, 64 slots
    # (8 ranks x 8 workers) halfway through, re-dealt to 32 slots; planning only, no reading.
    sizes = [1251] * 1024
    record = LayoutRecord(64, (0,), {slot: ((0, 10_000),) for slot in range(64)}, buffer_size=5000)
    plan_change = seconds(lambda: SourcePlan(sizes, seed=0, history=[record]).units(0, 0, 32))
    return [
        {"cost": "state_dict() per call", "ms": 1e3 * seconds(fresh.state_dict, repeat=1000)},
        {"cost": "first batch, fresh stream", "ms": 1e3 * first_fresh},
        {"cost": "first batch, resumed mid-epoch (same layout)", "ms": 1e3 * seconds(resumed_first_batch)},
        {"cost": "plan a layout change, 1.28M-sample epoch half read", "ms": 1e3 * plan_change},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--images", type=int, default=512, help="JPEGs written (and read per round: 2 passes)"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--source-size",
        type=int,
        default=SIZE,
        help="side of the stored JPEGs (the training crop stays 224); ImageNet's average is about 400x350",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a dataloader worker
    jpegs = natural_jpegs(args.images, size=args.source_size)
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_shards(Path(tmp), jpegs)
        rows = throughput_rows(urls, 2 * args.images, args.rounds)
        costs = resume_rows(urls)
    size = {"mean_jpeg_bytes": float(np.mean([len(j) for j in jpegs])), "images": args.images}
    report(
        "data_throughput" + ("" if args.source_size == SIZE else f"_source{args.source_size}"),
        f"images/s per worker (1 process, 1 thread), {args.source_size}x{args.source_size} JPEG q90 → "
        f"{SIZE}px crops, mean "
        f"{size['mean_jpeg_bytes'] / 1024:.1f} KiB, batch {BATCH}, median of {args.rounds} rounds",
        rows,
        size,
    )
    report("data_resume", "resume-state costs", costs)


if __name__ == "__main__":
    main()
