"""Data stream throughput per worker: bigvit's TrainStream vs a bare tar-read + PIL decode loop (the limit).

Writes 224x224 JPEG shards (crops of scikit-learn's sample photographs, so JPEG sizes are those of
natural images) to a temp dir, then measures one process with one torch thread, as a dataloader
worker runs:
  bare:    read each member's bytes from the tar + PIL decode + convert("RGB"); and that with each
           batch's decoded pixels copied into a fresh batch array, as any loader that hands its
           pixels on must (the canvas alone costs page faults: new memory per batch, as a worker's
           shared memory is)
  stream:  TrainStream (shard plan, tar reader, shuffle buffer, positions, batching) with decode only
           (the stream's own cost); then RandomResizedCrop + flip as bigvit's workers do it (decode,
           crop, batch the crops: the resize runs on the device); also in one dataloader worker
           process, whose batches cross through shared memory; and for comparison with the resize
           in the worker (torch's antialiased bicubic on uint8, the fastest CPU resize here)
  device:  BatchPrep, the rest of the augmentation on the training device (resize, flip,
           normalize): its time per image on this CPU, in the main process
Pipelines take turns in short segments, each going on where it stopped, so that this VM's drift
falls on all alike; the median time per image is reported, and the spread of per-round ratios.
Resume-state costs: state_dict() per call, the first batch of a resumed stream (buffer simulated,
its samples re-read) vs a fresh one, and planning a layout change mid-epoch for a large epoch.

    python bench/data.py [--rounds 100] [--segment 64] [--source-size 224]
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
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import report
from PIL import Image

from bigvit.data.pixels import rgbx
from bigvit.data.plan import LayoutRecord, SourcePlan
from bigvit.data.shards import write_split
from bigvit.data.stream import ResumableLoader, TrainStream
from bigvit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, BatchPrep, Crop, crop_batch, train_transform

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


def bare_decoded(urls: list[str]) -> Iterator[Image.Image]:
    """Endlessly: read each member's bytes from the shards and decode them with PIL, as RGB."""
    while True:
        for url in urls:
            with tarfile.open(url, mode="r|") as tar:
                for member in tar:
                    if member.name.endswith(".jpg"):
                        yield Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")


def bare_images(urls: list[str]) -> Iterator[int]:
    """The bare loop: 1 per decoded image."""
    for _ in bare_decoded(urls):
        yield 1


def bare_shipped_images(urls: list[str]) -> Iterator[int]:
    """Endlessly: the bare loop, and each batch's whole decoded images copied into one fresh batch
    array (crop_batch), the least a loader that hands its pixels on must add; BATCH per batch."""
    images = (rgbx(image) for image in bare_decoded(urls))
    while True:
        crop_batch([Crop(pixels, (0, 0, *pixels.shape[:2])) for pixels in itertools.islice(images, BATCH)])
        yield BATCH


def stream_loader(urls: list[str], transform, workers: int = 0) -> ResumableLoader:
    stream = TrainStream(urls, BATCH, transform, rank=0, world_size=1, seed=0, shuffle_buffer=256)
    return ResumableLoader(stream, num_workers=workers)


def stream_images(loader: ResumableLoader) -> Iterator[int]:
    """Endlessly: the images of each batch, after the first (a worker's start-up and buffer fill)."""
    batches = iter(loader)
    next(batches)
    for batch in batches:
        yield len(batch["label"])


def seconds_per_image(counts: Iterator[int], images: int) -> float:
    """Seconds per image while drawing at least `images` from an endless iterator of counts."""
    start, done = time.perf_counter(), 0
    while done < images:
        done += next(counts)
    return (time.perf_counter() - start) / done


def resized_in_worker(transform):
    """`transform`, then the crop resized to SIZE in the worker (uint8, antialiased bicubic, channels last)."""

    def apply(image, rng) -> Crop:
        crop = transform(image, rng)
        top, left, height, width = crop.region  # whole pixels here: 224 px sources are never shrunk
        pixels = torch.from_numpy(crop.pixels).permute(2, 0, 1)[None, :, round(top) :, round(left) :]
        resized = F.interpolate(pixels[..., : round(height), : round(width)], (SIZE, SIZE), mode="bicubic", antialias=True)
        return Crop(resized[0].permute(1, 2, 0).numpy(), (0, 0, SIZE, SIZE), crop.flip)

    return apply


def decode_only(image, rng) -> Crop:
    image.load()
    return Crop(np.zeros((1, 1, 4), np.uint8), (0, 0, 1, 1))


def throughput_rows(urls: list[str], rounds: int, segment: int) -> list[dict]:
    """Per pipeline: the median time per image over `rounds` segments of `segment` images, the
    pipelines taking turns segment by segment (each going on where it stopped), so that this VM's
    drift, which moves whole runs by 5-10%, falls on all alike; the quartiles of the per-round ratio
    to the bare loop show the spread."""
    augment = train_transform(SIZE)
    bare = "bare: tar read + PIL decode + RGB"
    pipelines = {
        bare: bare_images(urls),
        "bare + ship: and the decoded pixels copied into a fresh batch array": bare_shipped_images(urls),
        "stream: decode only (the stream's own cost)": stream_images(stream_loader(urls, decode_only)),
        "bigvit: decode + RandomResizedCrop + flip (resize on the device)": stream_images(
            stream_loader(urls, augment)
        ),
        "  the same with the resize in the worker": stream_images(stream_loader(urls, resized_in_worker(augment))),
    }
    times: dict[str, list[float]] = {name: [] for name in pipelines}
    for index in range(rounds + 2):  # the first rounds warm caches and are not counted
        for name, counts in pipelines.items():
            elapsed = seconds_per_image(counts, segment)
            if index >= 2:
                times[name].append(elapsed)
    # A worker process prefetches 4 batches ahead: timed alone, from a fresh start, over 512 images.
    in_worker = "bigvit in 1 dataloader worker process (batches via shared memory)"
    times[in_worker] = [seconds_per_image(stream_images(stream_loader(urls, augment, workers=1)), 512) for _ in range(3)]
    prep, cpu = BatchPrep(SIZE, IMAGENET_MEAN, IMAGENET_STD), torch.device("cpu")
    device_batches = list(itertools.islice(stream_loader(urls, augment), 4))
    times["device: BatchPrep (resize + flip + normalize), on this CPU"] = [
        seconds(lambda: [prep(b, cpu) for b in device_batches]) / (BATCH * len(device_batches)) for _ in range(3)
    ]
    base = statistics.median(times[bare])
    rows = []
    for name, values in times.items():
        paired = [b / t for b, t in zip(times[bare], values, strict=False)] if name in pipelines else []
        low, _, high = statistics.quantiles(paired, n=4) if len(paired) > 1 else (float("nan"),) * 3
        rows.append(
            {
                "pipeline": name,
                "img/s": 1 / statistics.median(values),
                "ms/img": 1e3 * statistics.median(values),
                "vs bare": base / statistics.median(values),
                "per-round ratio, quartiles": f"{low:.3f}..{high:.3f}" if paired else "",
            }
        )
    return rows


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
    parser.add_argument("--images", type=int, default=512, help="JPEGs written to the shards")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--segment", type=int, default=64, help="images per pipeline per round")
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
        rows = throughput_rows(urls, args.rounds, args.segment)
        costs = resume_rows(urls)
    size = {"mean_jpeg_bytes": float(np.mean([len(j) for j in jpegs])), "images": args.images}
    report(
        "data_throughput" + ("" if args.source_size == SIZE else f"_source{args.source_size}"),
        f"images/s per worker (1 process, 1 thread), {args.source_size}x{args.source_size} JPEG q90 → "
        f"{SIZE}px crops, mean "
        f"{size['mean_jpeg_bytes'] / 1024:.1f} KiB, batch {BATCH}, medians of {args.rounds} rounds of {args.segment}",
        rows,
        size,
    )
    report("data_resume", "resume-state costs", costs)


if __name__ == "__main__":
    main()
