"""Training and evaluation streams over WebDataset shards.

Every (rank, dataloader worker) pair is a *slot*. In each epoch the shard list is permuted by
(seed, epoch) and dealt round-robin to the slots; with fewer shards than slots each shard is split
into sample-strided units, so every slot always has data and no rank waits in a collective. The
training stream is endless (epoch after epoch), so all ranks yield the same number of batches.

Resume: a slot's position is (epoch, samples consumed in that epoch). Replaying the epoch's raw
samples through the same seeded shuffle buffer, without decoding, restores the exact sequence;
augmentation draws from a per-sample seeded RNG, so replayed samples need no transform.

Bad data (`on_error`): under "warn" an unreadable shard (missing, failing pipe, corrupt or cut short)
loses the rest of that shard and an undecodable or incomplete sample is dropped; each is counted by
kind and logged (the first few per shard). The counts travel inside the batches, since batches are
all that crosses the dataloader worker boundary. Skips are a function of the data, so a resumed run
skips the same samples. Under "raise" the first bad shard or sample stops the run with a DataError.
"""

from __future__ import annotations

import io
import logging
import math
import random
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys

from bigvit.data.transforms import Transform
from bigvit.errors import ConfigError, DataError

log = logging.getLogger("bigvit")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")
ON_ERROR = ("warn", "raise")
SKIP_KINDS = ("read", "missing", "decode")  # shard unreadable from here on | no image or .cls | bad bytes
LOGGED_PER_SHARD = 3
META_FILE = re.compile(r"__[^/]*__($|/)")


class SampleError(DataError):
    """A sample that cannot be used; `kind` is one of SKIP_KINDS, `detail` what is wrong with it."""

    def __init__(self, sample: dict, detail: str, kind: str = "decode"):
        super().__init__(f"sample {sample.get('__key__')!r} in {sample.get('__url__')!r} {detail}")
        self.detail, self.kind = detail, kind


class Skips:
    """Skipped data counted by kind (for the metrics), the first few per shard logged; or raised, by `on_error`."""

    def __init__(self, on_error: str = "warn"):
        if on_error not in ON_ERROR:
            raise ConfigError(f"data.on_error={on_error!r} is not one of {list(ON_ERROR)}")
        self.on_error = on_error
        self.pending = Counter()  # not yet handed to a batch
        self.per_shard = Counter()  # for the rate limit, over this worker's life
        self.unlogged = Counter()  # per shard, since the last summary

    def __call__(self, kind: str, url: str, where: str, error: Exception) -> None:
        message = f"{kind} error in shard {url} ({where}): {getattr(error, 'detail', error)}"
        if self.on_error == "raise":
            raise DataError(f"{message}; data.on_error=warn skips bad data instead") from error
        self.pending[kind] += 1
        self.per_shard[url] += 1
        if self.per_shard[url] <= LOGGED_PER_SHARD:
            log.warning("skipped: %s", message)
        else:
            self.unlogged[url] += 1

    def take(self) -> dict[str, int]:
        """Counts by kind since the last take (every kind present, so batches collate alike)."""
        counts = {kind: self.pending[kind] for kind in SKIP_KINDS}
        self.pending.clear()
        return counts

    def summarize(self) -> None:
        for url, count in self.unlogged.items():
            log.warning("skipped %d more bad sample(s)/read(s) in shard %s without logging each", count, url)
        self.unlogged.clear()


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


class _EndCheckedTarInfo(tarfile.TarInfo):
    """Marks the TarFile when its archive ends without the end-of-archive blocks (tarfile ends silently)."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            tar.cut_short = True
            raise


def shard_files(url: str) -> Iterator[dict]:
    """The files of one tar shard as webdataset file samples, then its end-of-shard marker `{}`.

    Unlike webdataset's reader, a shard cut short at a member boundary is an error, not a quiet end.
    """
    stream = wds.gopen(url)
    with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndCheckedTarInfo) as tar:
        for member in tar:
            if member.isreg() and not META_FILE.match(member.name):
                yield {"fname": member.name, "data": tar.extractfile(member).read(), "__url__": url}
            tar.members = []
        if getattr(tar, "cut_short", False):
            raise tarfile.ReadError("the archive ends without its end-of-archive marker: truncated")
    stream.close()  # a pipe: reports a failing command here
    yield {}


def raw_samples(units: Iterable[Unit], skips: Skips | None = None) -> Iterator[dict]:
    """Undecoded samples (dicts of key → bytes) of the units, in order.

    A shard that cannot be read to its end raises, or with `skips` is counted and left from there on.
    """
    for unit in units:
        key = None
        try:
            for index, sample in enumerate(group_by_keys(shard_files(unit.url))):
                key = sample["__key__"]
                if index % unit.stride == unit.offset:
                    yield sample
        except Exception as error:  # any failure to read the shard: missing, failing pipe, corrupt
            if skips is None:
                raise
            skips("read", unit.url, f"after sample {key!r}" if key else "before its first sample", error)


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
    """(RGB image, class) of a raw sample; a missing or undecodable entry is a SampleError naming the sample."""
    image_key = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image_key is None or "cls" not in sample:
        raise SampleError(
            sample,
            f"lacks an image ({'/'.join(IMAGE_EXTENSIONS)}) or a .cls entry; "
            f"it has {sorted(k for k in sample if k[:2] != '__')}",
            kind="missing",
        )
    try:
        image = Image.open(io.BytesIO(sample[image_key])).convert("RGB")
        return image, int(sample["cls"])
    except Exception as error:  # PIL raises several types for bad bytes; int() a ValueError
        raise SampleError(sample, f"does not decode: {error}") from error


def decoded(sample: dict, skips: Skips) -> tuple[Image.Image, int] | None:
    """decode(sample), or None when it is bad and `skips` lets it be skipped."""
    try:
        return decode(sample)
    except SampleError as error:
        skips(error.kind, sample.get("__url__"), f"sample {sample.get('__key__')!r}", error)
        return None


def errors_as_data(batches: Iterator[dict]) -> Iterator[dict]:
    """A DataError in a dataloader worker becomes a last batch {"error": message}: raised by the
    loader in the main process as one line, where torch would put a worker traceback in the message."""
    try:
        yield from batches
    except DataError as error:
        if get_worker_info() is None:
            raise
        yield {"error": str(error)}


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
        on_error: str = "warn",
    ):
        self.urls, self.batch_size, self.transform = list(urls), batch_size, transform
        self.rank, self.world_size, self.seed, self.shuffle_buffer = rank, world_size, seed, shuffle_buffer
        self.on_error = Skips(on_error).on_error  # validated here, where the value is first seen
        self.start: dict[int, tuple[int, int]] = {}  # logical worker → (epoch, consumed), set on resume
        self.rotation = 0

    def epoch_samples(self, slot: int, num_slots: int, epoch: int, skips: Skips) -> Iterator[dict]:
        units = epoch_units(self.urls, slot, num_slots, self.seed, epoch)
        rng = random.Random(f"buffer-{self.seed}-{epoch}-{slot}")
        return shuffled(raw_samples(units, skips), self.shuffle_buffer, rng)

    def __iter__(self) -> Iterator[dict]:
        return errors_as_data(self.batches())

    def batches(self) -> Iterator[dict]:
        physical, workers, _ = worker_slot(self.rank, self.world_size)
        # After a resume the worker that was due next starts first: physical worker w plays logical w + rotation.
        worker = (physical + self.rotation) % workers
        slot, num_slots = self.rank * workers + worker, self.world_size * workers
        epoch, skip = self.start.get(worker, (0, 0))
        skips = Skips(self.on_error)
        images, labels = [], []
        while True:
            consumed = 0
            for sample in self.epoch_samples(slot, num_slots, epoch, skips):
                consumed += 1
                if consumed <= skip:
                    skips.take()  # read failures while replaying were counted before the checkpoint
                    continue
                if (good := decoded(sample, skips)) is None:
                    continue
                rng = random.Random(f"aug-{self.seed}-{epoch}-{slot}-{consumed}")
                images.append(self.transform(good[0], rng))
                labels.append(good[1])
                if len(images) == self.batch_size:
                    yield {
                        **collate(images, labels),
                        "position": (worker, epoch, consumed),
                        "skipped": skips.take(),
                    }
                    images, labels = [], []
            skips.summarize()
            if consumed == 0:
                urls = sorted(
                    {unit.url for unit in epoch_units(self.urls, slot, num_slots, self.seed, epoch)}
                )
                raise DataError(
                    f"data slot {slot} read no samples in epoch {epoch} from its {len(urls)} shard(s) "
                    f"{urls[:5]}{'...' if len(urls) > 5 else ''}: every one is unreadable or empty"
                )
            epoch, skip = epoch + 1, 0


class EvalStream(IterableDataset):
    """Each evaluation sample exactly once across all ranks and workers, in file order, last batch partial."""

    def __init__(
        self,
        urls: Sequence[str],
        batch_size: int,
        transform: Transform,
        *,
        rank: int,
        world_size: int,
        on_error: str = "warn",
    ):
        self.urls, self.batch_size, self.transform = list(urls), batch_size, transform
        self.rank, self.world_size = rank, world_size
        self.on_error = Skips(on_error).on_error

    def __iter__(self) -> Iterator[dict]:
        return errors_as_data(self.batches())

    def batches(self) -> Iterator[dict]:
        """Batches with a "skipped" count each; a last batch of counts alone when the stream ends in skips."""
        _, workers, slot = worker_slot(self.rank, self.world_size)
        units = epoch_units(self.urls, slot, self.world_size * workers, seed=0, epoch=0, shuffle=False)
        skips = Skips(self.on_error)
        images, labels = [], []
        for sample in raw_samples(units, skips):
            if (good := decoded(sample, skips)) is None:
                continue
            images.append(self.transform(good[0]))
            labels.append(good[1])
            if len(images) == self.batch_size:
                yield {**collate(images, labels), "skipped": skips.take()}
                images, labels = [], []
        skips.summarize()
        if images:
            yield {**collate(images, labels), "skipped": skips.take()}
        if any(counts := skips.take()):
            yield {"skipped": counts}


class CountingLoader:
    """Batches of a stream through a DataLoader; `skipped` adds up, by kind, the skip counts they carry.

    A batch {"error": message} from a worker is raised here as a DataError; batches of counts alone
    are not passed on.
    """

    def __init__(self, stream: IterableDataset, num_workers: int, prefetch_factor: int | None = None):
        self.stream, self.num_workers, self.prefetch_factor = stream, num_workers, prefetch_factor
        self.skipped = dict.fromkeys(SKIP_KINDS, 0)

    def batches(self) -> Iterator[dict]:
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
        )
        for batch in loader:
            if "error" in batch:
                raise DataError(batch["error"])
            for kind, count in batch.pop("skipped", {}).items():
                self.skipped[kind] += count
            if "image" in batch:
                yield batch

    def __iter__(self) -> Iterator[dict]:
        return self.batches()


class ResumableLoader(CountingLoader):
    """A DataLoader over a TrainStream that remembers each worker's position (and the skip counts) for checkpoints.

    The DataLoader takes batches from its workers round-robin; on resume the stream rotates worker
    identities so that the worker that was due next produces the first batch.
    """

    def __init__(self, stream: TrainStream, num_workers: int):
        super().__init__(stream, num_workers, prefetch_factor=4)
        self.positions: dict[int, tuple[int, int]] = {}  # logical worker → (epoch, consumed)
        self.next_worker = 0

    def __iter__(self) -> Iterator[dict]:
        self.stream.start, self.stream.rotation = dict(self.positions), self.next_worker
        for batch in self.batches():
            worker, epoch, consumed = batch.pop("position")
            self.positions[worker] = (epoch, consumed)
            self.next_worker = (worker + 1) % max(self.num_workers, 1)
            yield batch

    @staticmethod
    def plain_loader(stream: IterableDataset, num_workers: int) -> CountingLoader:
        return CountingLoader(stream, num_workers)

    def state_dict(self) -> dict:
        return {
            "positions": dict(self.positions),
            "next_worker": self.next_worker,
            "num_workers": self.num_workers,
            "world_size": self.stream.world_size,
            "skipped": dict(self.skipped),
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
        self.skipped = {kind: state.get("skipped", {}).get(kind, 0) for kind in SKIP_KINDS}
