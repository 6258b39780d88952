"""Training and evaluation streams over WebDataset shards.

Every (rank, dataloader worker) pair is a *slot*. Each epoch, each slot reads an equal stretch of the
epoch's shuffled shard order through a seeded shuffle buffer (plan.py: the plan, the pad rule, and
how a resumed slot finds its place). The training stream is endless, epoch after epoch, and every
slot reads the same number of samples per epoch, so all ranks yield the same number of batches.

Sources: `data.sources` mixes several shard sets by weight. A slot draws its n-th sample from a
source chosen by a hash of (seed, slot, n), so the mix is deterministic and needs no state beyond n;
each source keeps its own epochs.

Resume: a slot's place is (samples drawn, and per source (epoch, samples taken from its shuffle
buffer)). Every rank's places, merged (`merge_states`), form a state that resumes at any layout: at
the same layout each rank continues exactly where it was, the same samples with the same
augmentation in the same batches (augmentation and mixup draw from RNGs seeded by the sample and the
position); at another world size or worker count the unread rest of each epoch is dealt to the new
slots, so no sample is read twice and none is skipped.

Bad data (reader.py): counted by kind and logged, or raised. The counts travel inside the batches,
since batches are all that crosses the dataloader worker boundary. Skips are a function of the data,
so a resumed run skips the same samples.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import itertools
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bigvit.data.plan import LayoutRecord, SourcePlan, buffer_after, extend_history, shuffled, units_after
from bigvit.data.reader import (
    SKIP_KINDS,
    SampleError,
    Silent,
    Skips,
    checked_on_error,
    entries,
    read_units,
    shard_sizes,
)
from bigvit.data.targets import ClassLabel, Targets
from bigvit.data.transforms import Crop, Transform, UndecodableImage, crop_batch
from bigvit.errors import DataError

log = logging.getLogger("bigvit")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")
STATE_VERSION = 2


def opened(sample: dict) -> Image.Image:
    """The image of a raw sample, opened (its header read) but not yet decoded: the transform decodes
    it, knowing its crop. A missing or unreadable image is a SampleError naming the sample."""
    image_key = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image_key is None:
        raise SampleError(
            sample,
            f"lacks an image ({'/'.join(IMAGE_EXTENSIONS)}); it has {entries(sample)}",
            kind="missing",
        )
    try:
        return Image.open(io.BytesIO(sample[image_key]))
    except Exception as error:  # PIL raises several types for bad bytes
        raise SampleError(sample, f"does not decode: {error}") from error


def transformed(
    sample: dict, transform: Transform, targets: Targets, rng: random.Random | None, skips: Skips
) -> tuple[Crop, dict] | None:
    """(transform(image), targets.read(sample)) of a raw sample, or None when it is bad and `skips` lets
    it be skipped. Targets are read first: a sample without them is not worth decoding."""
    try:
        values = targets.read(sample)
        image = opened(sample)
        try:
            return transform(image, rng), values
        except UndecodableImage as error:
            raise SampleError(sample, f"does not decode: {error}") from error
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


def collate(images: list[Crop], values: list[dict], targets: Targets) -> dict:
    """A batch of crops (transforms.crop_batch) and their targets' tensors (data/targets.py)."""
    return {**crop_batch(images), **targets.collate(values)}


@dataclass(frozen=True)
class Source:
    """Shards drawn from with probability ∝ weight; `sizes` (samples per shard) are counted when not given."""

    urls: tuple[str, ...]
    weight: float = 1.0
    sizes: tuple[int, ...] | None = None


def sized_sources(sources: Sequence[str] | Sequence[Source], on_error: str) -> list[Source]:
    """Shard URLs (one source) or sources, each with its shard sizes; a source with no samples is a DataError."""
    if all(isinstance(s, str) for s in sources):
        sources = [Source(tuple(sources))]
    sized = []
    for source in sources:
        sizes = source.sizes if source.sizes is not None else tuple(shard_sizes(source.urls, on_error))
        check_readable(source.urls, sizes)
        sized.append(Source(tuple(source.urls), source.weight, tuple(sizes)))
    return sized


def check_readable(urls: Sequence[str], sizes: Sequence[int]) -> None:
    if not sum(sizes):
        raise DataError(
            f"read no samples from any of the {len(urls)} shard(s) {list(urls[:5])}"
            f"{'...' if len(urls) > 5 else ''}: every one is unreadable or empty"
        )


def restored_buffer(plan: SourcePlan, units, held: list[int], urls: Sequence[str]) -> list:
    """The items a resumed shuffle buffer holds: inputs `held` of `units`, read again (damage was reported before)."""
    inputs = plan.positions_of(units)[held]
    items = {
        int(plan.offsets[shard] + index): (shard, index, sample)
        for shard, index, sample in read_units(plan.units_of(np.sort(inputs), report=False), urls, Silent())
    }
    return [items[int(position)] for position in inputs]


def slot_items(
    plan: SourcePlan,
    urls: Sequence[str],
    slot: int,
    num_slots: int,
    start: tuple[int, int],
    buffer_size: int,
    skips: Skips,
) -> Iterator[tuple[int, int, tuple]]:
    """(epoch, outputs so far in it, (shard, sample number, sample or None)) of one source for one slot,
    epoch after epoch from `start` = (epoch, outputs); None marks a sample the shard could not give."""
    epoch, outputs = start
    while True:
        units = plan.units(epoch, slot, num_slots)
        planned = sum(len(unit.indices) for unit in units)
        rng, buffer, resumed = plan.buffer_rng(epoch, slot), [], outputs > 0
        if resumed:
            held, read = buffer_after(planned, outputs, buffer_size, rng)
            buffer = restored_buffer(plan, units, held, urls)
            units = units_after(units, read)
        any_sample = False
        for item in shuffled(read_units(units, urls, skips), buffer_size, rng, buffer):
            outputs += 1
            any_sample = any_sample or item[2] is not None
            yield epoch, outputs, item
        skips.summarize()
        if planned and not any_sample and not resumed:  # endless reads of nothing would hang the run
            shards = sorted({urls[unit.shard] for unit in units})
            raise DataError(
                f"data slot {slot} read no samples in epoch {epoch} from its {len(shards)} shard(s) "
                f"{shards[:5]}{'...' if len(shards) > 5 else ''}: every one is unreadable or empty"
            )
        epoch, outputs = epoch + 1, 0


class TrainStream(IterableDataset):
    """Endless, shuffled, augmented batches of `batch_size` for one rank; see the module docstring.

    `sources`: shard URLs, or weighted `Source`s. A batch: the transform's crops (transforms.crop_batch:
    "image", "extent", "region", "flip"), "label" long (B,), and "seed", a number for the batch's mixup/cutmix
    RNG; transforms.BatchPrep finishes it on the device, the same way after a resume.
    """

    def __init__(
        self,
        sources: Sequence[str] | Sequence[Source],
        batch_size: int,
        transform: Transform,
        *,
        rank: int,
        world_size: int,
        seed: int,
        shuffle_buffer: int = 1000,
        on_error: str = "warn",
        targets: Targets | None = None,
    ):
        self.on_error = checked_on_error(on_error)  # here, where the value is first seen
        self.targets = targets or ClassLabel()
        self.sources = sized_sources(sources, on_error)
        total = sum(source.weight for source in self.sources)
        self.cumulative = list(itertools.accumulate(source.weight / total for source in self.sources))
        self.batch_size, self.transform = batch_size, transform
        self.rank, self.world_size, self.seed, self.shuffle_buffer = rank, world_size, seed, shuffle_buffer
        # Set by ResumableLoader on resume: logical worker → (drawn, per source (epoch, outputs)), the
        # rotation of workers, earlier layouts and the epoch per source this layout started in.
        self.start: dict[int, tuple[int, tuple]] = {}
        self.rotation = 0
        self.history: tuple[LayoutRecord, ...] = ()
        self.first_epochs = (0,) * len(self.sources)

    def fingerprint(self) -> dict:
        """What a saved position is only valid for: the seed and each source's shard and sample counts."""
        return {"seed": self.seed, "sources": [[len(s.urls), sum(s.sizes)] for s in self.sources]}

    def plan(self, source: int) -> SourcePlan:
        return SourcePlan(self.sources[source].sizes, self.seed, source, history=self.history)

    def hash(self, text: str) -> int:
        """A 63-bit number from the seed and `text`: a position's random draw, found without replay."""
        digest = hashlib.blake2b(f"{self.seed}-{text}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1

    def pick(self, slot: int, drawn: int) -> int:
        """The source of a slot's `drawn`-th sample."""
        if len(self.sources) == 1:
            return 0
        uniform = self.hash(f"source-{slot}-{drawn}") / 2**63
        return min(bisect.bisect_right(self.cumulative, uniform), len(self.sources) - 1)

    def __iter__(self) -> Iterator[dict]:
        return errors_as_data(self.batches())

    def batches(self) -> Iterator[dict]:
        physical, workers, _ = worker_slot(self.rank, self.world_size)
        # After a resume the worker that was due next starts first: physical worker w plays logical w + rotation.
        worker = (physical + self.rotation) % workers
        slot, num_slots = self.rank * workers + worker, self.world_size * workers
        drawn, positions = self.start.get(worker, (0, tuple((epoch, 0) for epoch in self.first_epochs)))
        positions = list(positions)
        skips = Skips(self.on_error)
        readers = [
            slot_items(self.plan(i), s.urls, slot, num_slots, positions[i], self.shuffle_buffer, skips)
            for i, s in enumerate(self.sources)
        ]
        images, values = [], []
        while True:
            source = self.pick(slot, drawn)
            drawn += 1
            epoch, outputs, (shard, index, sample) = next(readers[source])
            positions[source] = (epoch, outputs)
            if sample is None:
                continue
            rng = random.Random(f"aug-{self.seed}-{source}-{epoch}-{shard}-{index}")
            if (good := transformed(sample, self.transform, self.targets, rng, skips)) is None:
                continue
            images.append(good[0])
            values.append(good[1])
            if len(images) == self.batch_size:
                yield {
                    **collate(images, values, self.targets),
                    "seed": self.hash(f"mix-{slot}-{drawn}"),
                    "position": (worker, drawn, tuple(positions)),
                    "skipped": skips.take(),
                }
                images, values = [], []


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
        sizes: Sequence[int] | None = None,
        targets: Targets | None = None,
    ):
        self.on_error = checked_on_error(on_error)
        self.targets = targets or ClassLabel()
        self.urls, self.batch_size, self.transform = list(urls), batch_size, transform
        self.rank, self.world_size = rank, world_size
        self.sizes = list(sizes) if sizes is not None else shard_sizes(self.urls, on_error)
        check_readable(self.urls, self.sizes)

    def __iter__(self) -> Iterator[dict]:
        return errors_as_data(self.batches())

    def batches(self) -> Iterator[dict]:
        """Batches with a "skipped" count each; a last batch of counts alone when the stream ends in skips."""
        _, workers, slot = worker_slot(self.rank, self.world_size)
        plan = SourcePlan(self.sizes, seed=0, shuffle=False, pad=False)
        skips = Skips(self.on_error)
        images, values = [], []
        for _, _, sample in read_units(plan.units(0, slot, self.world_size * workers), self.urls, skips):
            if sample is None or (good := transformed(sample, self.transform, self.targets, None, skips)) is None:
                continue
            images.append(good[0])
            values.append(good[1])
            if len(images) == self.batch_size:
                yield {**collate(images, values, self.targets), "skipped": skips.take()}
                images, values = [], []
        skips.summarize()
        if images:
            yield {**collate(images, values, self.targets), "skipped": skips.take()}
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


def merge_states(states: Sequence[dict]) -> dict:
    """One state from every rank's: dicts unite key by key; other values are the same on every rank (the first kept)."""
    merged: dict = {}
    for state in states:
        for key, value in state.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = merge_states([merged[key], value])
            else:
                merged.setdefault(key, value)
    return merged


class ResumableLoader(CountingLoader):
    """A DataLoader over a TrainStream that remembers each worker's position (and the skip counts) for checkpoints.

    The DataLoader takes batches from its workers round-robin; on resume the stream rotates worker
    identities so that the worker that was due next produces the first batch. `state_dict()` is this
    rank's part; `load_state_dict` takes every rank's parts merged (`merge_states`), from any layout.
    """

    def __init__(self, stream: TrainStream, num_workers: int):
        super().__init__(stream, num_workers, prefetch_factor=4)
        self.positions: dict[
            int, tuple[int, tuple]
        ] = {}  # logical worker → (drawn, per source (epoch, outputs))
        self.next_worker = 0

    @property
    def workers(self) -> int:
        """Data slots per rank (no worker processes: one, in the main process)."""
        return max(self.num_workers, 1)

    def __iter__(self) -> Iterator[dict]:
        self.stream.start, self.stream.rotation = dict(self.positions), self.next_worker
        for batch in self.batches():
            worker, drawn, positions = batch.pop("position")
            self.positions[worker] = (drawn, tuple(tuple(p) for p in positions))  # the loader made lists
            self.next_worker = (worker + 1) % self.workers
            yield batch

    @staticmethod
    def plain_loader(stream: IterableDataset, num_workers: int) -> CountingLoader:
        return CountingLoader(stream, num_workers)

    def state_dict(self) -> dict:
        stream, rank = self.stream, self.stream.rank
        return {
            "version": STATE_VERSION,
            "fingerprint": stream.fingerprint(),
            "layout": [stream.world_size, self.workers, stream.shuffle_buffer],
            "first_epochs": list(stream.first_epochs),
            "history": [record.to_dict() for record in stream.history],
            "slots": {
                rank * self.workers + worker: {"drawn": drawn, "positions": [list(p) for p in positions]}
                for worker, (drawn, positions) in self.positions.items()
            },
            "next_worker": {rank: self.next_worker},
            "skipped": {rank: dict(self.skipped)},
        }

    def load_state_dict(self, state: dict) -> None:
        stream, rank, workers = self.stream, self.stream.rank, self.workers
        if state.get("version") != STATE_VERSION or state["fingerprint"] != stream.fingerprint():
            log.warning(
                "data state in the checkpoint is for %s, this run reads %s (seed, [shards, samples] per "
                "source): the data stream starts afresh",
                state.get("fingerprint", "an older bigvit"),
                stream.fingerprint(),
            )
            return
        slots = {
            int(slot): (value["drawn"], tuple(tuple(p) for p in value["positions"]))
            for slot, value in state["slots"].items()
        }
        skipped = {int(r): counts for r, counts in state["skipped"].items()}
        history = tuple(LayoutRecord.from_dict(record) for record in state["history"])
        saved_world, saved_workers, saved_buffer = state["layout"]
        if [saved_world, saved_workers, saved_buffer] == [stream.world_size, workers, stream.shuffle_buffer]:
            first = rank * workers
            self.positions = {s - first: v for s, v in slots.items() if first <= s < first + workers}
            self.next_worker = {int(r): w for r, w in state["next_worker"].items()}.get(rank, 0)
            stream.history, stream.first_epochs = history, tuple(state["first_epochs"])
            counts = skipped.get(rank, {})
        else:
            positions = {slot: value[1] for slot, value in slots.items()}
            record = LayoutRecord(
                saved_world * saved_workers, tuple(state["first_epochs"]), positions, saved_buffer
            )
            stream.history, stream.first_epochs = extend_history(history, record, len(stream.sources))
            self.positions, self.next_worker = {}, 0
            # The metrics sum skip counts over ranks: the old ranks' totals go to rank 0.
            counts = {k: sum(c.get(k, 0) for c in skipped.values()) for k in SKIP_KINDS} if rank == 0 else {}
            log.info(
                "data stream saved at %d rank(s) x %d worker(s), buffer %d; resumed at %d x %d, buffer %d: "
                "the rest of epoch(s) from %s is dealt to the new slots",
                saved_world,
                saved_workers,
                saved_buffer,
                stream.world_size,
                workers,
                stream.shuffle_buffer,
                list(stream.first_epochs),
            )
        self.skipped = {kind: counts.get(kind, 0) for kind in SKIP_KINDS}
