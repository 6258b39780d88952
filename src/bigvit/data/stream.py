"""Training and evaluation streams over WebDataset shards.

Every (rank, dataloader worker) pair is a *slot*. In each epoch the shard list is permuted by
(seed, epoch) and dealt round-robin to the slots; with fewer shards than slots each shard is split
into sample-strided units, so every slot always has data and no rank waits in a collective. The
training stream is endless (epoch after epoch), so all ranks yield the same number of batches.

Resume: a slot's position is (epoch, samples consumed in that epoch). Replaying the epoch's raw
samples through the same seeded shuffle buffer, without decoding, restores the exact sequence;
augmentation draws from a per-sample seeded RNG, so replayed samples need no transform.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bigvit.data.transforms import Transform

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")


@dataclass(frozen=True)
class Unit:
    """A shard, or every `stride`-th sample of it starting at `offset`."""

    url: str
    offset: int = 0
    stride: int = 1


def epoch_units(
    urls: Sequence[str], slot: int, num_slots: int, seed: int, epoch: int, shuffle: bool = True
) -> list[Unit]:
    """The units slot `slot` of `num_slots` reads in `epoch`; the units of all slots partition the data."""
    order = list(range(len(urls)))
    if shuffle:
        random.Random(f"shards-{seed}-{epoch}").shuffle(order)
    split = math.ceil(num_slots / len(urls))
    units = [Unit(urls[i], j, split) for i in order for j in range(split)]
    return units[slot::num_slots]


def raw_samples(units: Iterable[Unit]) -> Iterator[dict]:
    """Undecoded samples (dicts of key → bytes) of the units, in order."""
    for unit in units:
        samples = wds.tarfile_samples([{"url": unit.url}])
        for index, sample in enumerate(samples):
            if index % unit.stride == unit.offset:
                yield sample


def shuffled(samples: Iterable[dict], buffer_size: int, rng: random.Random) -> Iterator[dict]:
    """Reservoir-style shuffle buffer; deterministic for a given rng state and input order."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = sample
    rng.shuffle(buffer)
    yield from buffer


def decode(sample: dict) -> tuple[Image.Image, int]:
    """(RGB image, class) of a raw sample; a missing image or class is an error naming the sample."""
    image_key = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image_key is None or "cls" not in sample:
        raise ValueError(
            f"sample {sample.get('__key__')!r} in {sample.get('__url__')!r} lacks an image "
            f"({'/'.join(IMAGE_EXTENSIONS)}) or a .cls entry; it has {sorted(k for k in sample if k[:2] != '__')}"
        )
    image = Image.open(io.BytesIO(sample[image_key])).convert("RGB")
    return image, int(sample["cls"])


def worker_slot(rank: int, world_size: int) -> tuple[int, int, int]:
    """(worker id, number of workers, global slot) for the calling dataloader worker."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    return worker, workers, rank * workers + worker


def collate(images: list[torch.Tensor], labels: list[int]) -> dict:
    return {"image": torch.stack(images), "label": torch.tensor(labels, dtype=torch.long)}


class TrainStream(IterableDataset):
    """Endless, shuffled, augmented batches of `batch_size` for one rank; see the module docstring."""

    def __init__(
        self,
        urls: Sequence[str],
        batch_size: int,
        transform: Transform,
        *,
        rank: int,
        world_size: int,
        seed: int,
        shuffle_buffer: int = 1000,
    ):
        self.urls, self.batch_size, self.transform = list(urls), batch_size, transform
        self.rank, self.world_size, self.seed, self.shuffle_buffer = rank, world_size, seed, shuffle_buffer
        self.start: dict[int, tuple[int, int]] = {}  # logical worker → (epoch, consumed), set on resume
        self.rotation = 0

    def epoch_samples(self, slot: int, num_slots: int, epoch: int) -> Iterator[dict]:
        units = epoch_units(self.urls, slot, num_slots, self.seed, epoch)
        rng = random.Random(f"buffer-{self.seed}-{epoch}-{slot}")
        return shuffled(raw_samples(units), self.shuffle_buffer, rng)

    def __iter__(self) -> Iterator[dict]:
        physical, workers, _ = worker_slot(self.rank, self.world_size)
        # After a resume the worker that was due next starts first: physical worker w plays logical w + rotation.
        worker = (physical + self.rotation) % workers
        slot, num_slots = self.rank * workers + worker, self.world_size * workers
        epoch, skip = self.start.get(worker, (0, 0))
        images, labels = [], []
        while True:
            consumed = 0
            for sample in self.epoch_samples(slot, num_slots, epoch):
                consumed += 1
                if consumed <= skip:
                    continue
                image, label = decode(sample)
                rng = random.Random(f"aug-{self.seed}-{epoch}-{slot}-{consumed}")
                images.append(self.transform(image, rng))
                labels.append(label)
                if len(images) == self.batch_size:
                    yield {**collate(images, labels), "position": (worker, epoch, consumed)}
                    images, labels = [], []
            if consumed == 0:
                raise RuntimeError(f"data slot {slot} read no samples from {self.urls[:3]}...")
            epoch, skip = epoch + 1, 0


class EvalStream(IterableDataset):
    """Each evaluation sample exactly once across all ranks and workers, in file order, last batch partial."""

    def __init__(
        self, urls: Sequence[str], batch_size: int, transform: Transform, *, rank: int, world_size: int
    ):
        self.urls, self.batch_size, self.transform = list(urls), batch_size, transform
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[dict]:
        _, workers, slot = worker_slot(self.rank, self.world_size)
        units = epoch_units(self.urls, slot, self.world_size * workers, seed=0, epoch=0, shuffle=False)
        images, labels = [], []
        for sample in raw_samples(units):
            image, label = decode(sample)
            images.append(self.transform(image))
            labels.append(label)
            if len(images) == self.batch_size:
                yield collate(images, labels)
                images, labels = [], []
        if images:
            yield collate(images, labels)


class ResumableLoader:
    """A DataLoader over a TrainStream that remembers each worker's position for checkpoints.

    The DataLoader takes batches from its workers round-robin; on resume the stream rotates worker
    identities so that the worker that was due next produces the first batch.
    """

    def __init__(self, stream: TrainStream, num_workers: int):
        self.stream, self.num_workers = stream, num_workers
        self.positions: dict[int, tuple[int, int]] = {}  # logical worker → (epoch, consumed)
        self.next_worker = 0

    def __iter__(self) -> Iterator[dict]:
        self.stream.start, self.stream.rotation = dict(self.positions), self.next_worker
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=4 if self.num_workers else None,
        )
        for batch in loader:
            worker, epoch, consumed = batch.pop("position")
            self.positions[worker] = (epoch, consumed)
            self.next_worker = (worker + 1) % max(self.num_workers, 1)
            yield batch

    @staticmethod
    def plain_loader(stream: IterableDataset, num_workers: int) -> DataLoader:
        return DataLoader(stream, batch_size=None, num_workers=num_workers)

    def state_dict(self) -> dict:
        return {
            "positions": dict(self.positions),
            "next_worker": self.next_worker,
            "num_workers": self.num_workers,
            "world_size": self.stream.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        layout = (state["num_workers"], state["world_size"])
        if layout != (self.num_workers, self.stream.world_size):
            raise ValueError(
                f"data state was saved with (num_workers, world_size)={layout}, this run has "
                f"{(self.num_workers, self.stream.world_size)}; exact resume needs the same layout"
            )
        self.positions = {int(k): tuple(v) for k, v in state["positions"].items()}
        self.next_worker = state["next_worker"]
