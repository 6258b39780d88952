"""Which samples each data slot reads in each epoch, and where a resumed slot picks up, without reading.

A *slot* is one (rank, dataloader worker) pair: slot = rank * workers + worker, of S slots. A
source's shards have known sizes (samples per shard); a *position* is a sample's number in the
concatenation of the shards in list order.

Epoch plan: the shard list is permuted by (seed, source, epoch); the shards' samples in that order
are the epoch's sequence of N samples. Slot s reads the stretch [s*L, (s+1)*L) of the sequence,
L = ceil(N/S), the sequence continuing from its start past its end (the pad rule, as torch's
DistributedSampler): every slot reads L samples, so every rank yields the same number of batches per
epoch whatever the shard sizes, and the S*L - N (< S) samples at the start of the sequence are read
twice (with fewer samples than slots, cyclically more often). Evaluation reads the unpermuted
sequence in S near-equal stretches, without padding.

Shuffle buffer: a slot passes its stretch through a seeded shuffle buffer. Its output order depends
only on the number of inputs and its RNG, never on sample contents, so the buffer after k outputs
(which inputs it holds, how many it has read) is found by simulation: a slot resumed at (epoch, k)
reads only the samples still in its buffer and the rest of its stretch.

Resume at another layout (world size or worker count): the saved state is every old slot's
(epoch, outputs). Simulating each old slot's buffer gives the positions it has consumed; what is left
of each epoch the old slots had started (`remaining`) is dealt to the new slots in near-equal
contiguous parts of the sequence order, without padding, so every sample left in those epochs is read
exactly once. Later epochs use the plain plan of the new layout. A layout change inside such a
remainder epoch stacks: the history holds each earlier layout still needed.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Unit:
    """Samples `indices` (increasing sample numbers) of shard `shard`, read in one pass over the shard.

    `to_end`: the unit holds the shard's last planned sample, so it reads on to the end of the archive
    and reports damage found there. A read failure is reported by the unit only from sample
    `report_from` on (before that, another unit's samples were cut short and that unit reports it).
    """

    shard: int
    indices: Sequence[int]  # a range, or a tuple after a resume at another layout
    to_end: bool = False
    reports_from: int | None = None

    @property
    def report_from(self) -> int:
        if self.reports_from is not None:
            return self.reports_from
        return self.indices[0] if len(self.indices) else 0


def shuffled(items: Iterable, buffer_size: int, rng: random.Random, buffer: list | None = None) -> Iterator:
    """A shuffle buffer: fills to `buffer_size`, then yields a random held item per item read.

    The order depends only on the number of items and the RNG. `buffer` (kept by the caller, updated
    in place) always holds exactly the items read but not yet yielded: a resumed stream passes the
    buffer and RNG a simulation left (see `buffer_after`).
    """
    buffer = [] if buffer is None else buffer
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        item, buffer[index] = buffer[index], item
        yield item
    while buffer:
        index = rng.randrange(len(buffer))
        buffer[index], buffer[-1] = buffer[-1], buffer[index]
        yield buffer.pop()


def buffer_after(
    num_inputs: int, outputs: int, buffer_size: int, rng: random.Random
) -> tuple[list[int], int]:
    """(input numbers held in the buffer, inputs read) after `outputs` outputs; advances `rng` to match."""
    outputs = min(outputs, num_inputs)
    buffer: list[int] = []
    stream = shuffled(range(num_inputs), buffer_size, rng, buffer)
    for _ in range(outputs):
        next(stream)
    return buffer, min(num_inputs, buffer_size + outputs) if outputs else 0


def units_after(units: Sequence[Unit], start: int) -> list[Unit]:
    """The units' inputs from input number `start` on, as units (a cut unit keeps its duty to read to the end)."""
    rest, seen = [], 0
    for unit in units:
        count = len(unit.indices)
        if seen >= start:
            rest.append(unit)
        elif seen + count >= start:
            cut = start - seen
            tail = unit.indices[cut:]
            if len(tail) or unit.to_end:
                rest.append(Unit(unit.shard, tail, unit.to_end, unit.indices[cut - 1] + 1))
        seen += count
    return rest


def near_equal_bounds(total: int, parts: int, part: int) -> tuple[int, int]:
    """[start, stop) of part `part` when `total` items split into `parts` runs; the first total % parts take one more."""
    base, extra = divmod(total, parts)
    start = part * base + min(part, extra)
    return start, start + base + (part < extra)


@dataclass(frozen=True)
class LayoutRecord:
    """Where every slot of an earlier layout stopped: (epoch, outputs) per source, by slot."""

    num_slots: int
    first_epochs: tuple[int, ...]  # per source: the epoch the layout's slots started in
    positions: dict[
        int, tuple[tuple[int, int], ...]
    ]  # slot → per source (epoch, outputs); absent: not started
    buffer_size: int

    def position(self, slot: int, source: int) -> tuple[int, int]:
        positions = self.positions.get(slot)
        return tuple(positions[source]) if positions else (self.first_epochs[source], 0)

    def last_epoch(self, source: int) -> int:
        return max(self.position(slot, source)[0] for slot in range(self.num_slots))

    def to_dict(self) -> dict:
        return {
            "num_slots": self.num_slots,
            "first_epochs": list(self.first_epochs),
            "positions": {slot: [list(p) for p in pos] for slot, pos in self.positions.items()},
            "buffer_size": self.buffer_size,
        }

    @classmethod
    def from_dict(cls, state: dict) -> LayoutRecord:
        return cls(
            state["num_slots"],
            tuple(state["first_epochs"]),
            {int(slot): tuple(tuple(p) for p in pos) for slot, pos in state["positions"].items()},
            state["buffer_size"],
        )


class SourcePlan:
    """The epoch plans of one source (shard sizes known) under a seed, after a history of layouts."""

    def __init__(
        self,
        sizes: Sequence[int],
        seed: int,
        source: int = 0,
        *,
        shuffle: bool = True,
        pad: bool = True,
        history: Sequence[LayoutRecord] = (),
    ):
        self.sizes = [int(size) for size in sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])
        self.total = int(self.offsets[-1])
        self.seed, self.source, self.shuffle, self.pad = seed, source, shuffle, pad
        self.history = tuple(history)
        self.remaining_cache: dict[int, np.ndarray | None] = {}

    def order(self, epoch: int) -> list[int]:
        order = list(range(len(self.sizes)))
        if self.shuffle:
            random.Random(f"shards-{self.seed}-{self.source}-{epoch}").shuffle(order)
        return order

    def buffer_rng(self, epoch: int, slot: int) -> random.Random:
        return random.Random(f"buffer-{self.seed}-{self.source}-{epoch}-{slot}")

    def units(self, epoch: int, slot: int, num_slots: int) -> list[Unit]:
        """The units slot `slot` of `num_slots` reads in `epoch`, in reading order."""
        remaining = self.remaining(epoch)
        if remaining is None:
            return self.stretch_units(epoch, slot, num_slots)
        return self.units_of(remaining[slice(*near_equal_bounds(len(remaining), num_slots, slot))])

    # -- the plain plan -----------------------------------------------------------------------------
    def stretch_units(self, epoch: int, slot: int, num_slots: int) -> list[Unit]:
        if self.pad:
            length = -(-self.total // num_slots)
            start, stop = slot * length, (slot + 1) * length
        else:
            start, stop = near_equal_bounds(self.total, num_slots, slot)
        order, total = self.order(epoch), self.total
        units = self.piece_units(order, start, min(stop, total), first=True) if start < total else []
        # Positions from N on wrap round: repeats, which leave damage reports to the first reading.
        repeat = max(start, total)
        if stop > repeat:
            low = repeat % total
            high = low + stop - repeat
            units += self.piece_units(order, low, min(high, total), first=False)
            if high > total:
                units += self.piece_units(order, 0, high - total, first=False)
        return units

    def piece_units(self, order: list[int], start: int, stop: int, first: bool) -> list[Unit]:
        """Units of [start, stop) of the epoch sequence; `first` (not a repeat): also the empty shards there."""
        units, cursor = [], 0
        for shard in order:
            low, high = cursor, cursor + self.sizes[shard]
            cursor = high
            if low == high:  # an empty (or unreadable) shard: opened once per epoch, so damage is reported
                if first and (start <= low < stop or low == stop == self.total):
                    units.append(Unit(shard, range(0), to_end=True))
                continue
            a, b = max(low, start), min(high, stop)
            if a < b:
                units.append(Unit(shard, range(a - low, b - low), to_end=first and b == high))
        return units

    # -- after a layout change ------------------------------------------------------------------------
    def sequence(self, epoch: int) -> np.ndarray:
        """Positions of the epoch's samples in reading order (O(N) memory: only after a layout change)."""
        parts = [np.arange(self.offsets[s], self.offsets[s + 1]) for s in self.order(epoch)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def positions_of(self, units: Sequence[Unit]) -> np.ndarray:
        parts = [self.offsets[u.shard] + np.asarray(u.indices, dtype=np.int64) for u in units]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def units_of(self, positions: np.ndarray, report: bool = True) -> list[Unit]:
        """Positions as units, one per run of positions in one shard (`report`: units may read on to the end)."""
        shards = np.searchsorted(self.offsets, positions, side="right") - 1
        cuts = np.flatnonzero((np.diff(shards) != 0) | (np.diff(positions) < 0)) + 1
        units = []
        for run in np.split(np.arange(len(positions)), cuts) if len(positions) else []:
            shard = int(shards[run[0]])
            indices = (positions[run] - self.offsets[shard]).tolist()
            contiguous = indices[-1] - indices[0] == len(indices) - 1
            span = range(indices[0], indices[-1] + 1) if contiguous else tuple(indices)
            units.append(Unit(shard, span, to_end=report and indices[-1] == self.sizes[shard] - 1))
        return units

    def remaining(self, epoch: int) -> np.ndarray | None:
        """Positions of `epoch` the history's layouts left unread, in sequence order; None: untouched."""
        if epoch not in self.remaining_cache:
            left = None
            for record in self.history:
                first, last = record.first_epochs[self.source], record.last_epoch(self.source)
                if first <= epoch <= last:
                    read = np.zeros(self.total, dtype=bool)
                    read[self.consumed_by(record, epoch, left)] = True
                    base = self.sequence(epoch) if left is None else left
                    left = base[~read[base]]
            self.remaining_cache[epoch] = left
        return self.remaining_cache[epoch]

    def consumed_by(self, record: LayoutRecord, epoch: int, left: np.ndarray | None) -> np.ndarray:
        """Positions of `epoch` that the slots of `record` had taken from their shuffle buffers."""
        taken = []
        for slot in range(record.num_slots):
            slot_epoch, outputs = record.position(slot, self.source)
            if slot_epoch < epoch or (slot_epoch == epoch and outputs == 0):
                continue
            if left is None:
                inputs = self.positions_of(self.stretch_units(epoch, slot, record.num_slots))
            else:
                inputs = left[slice(*near_equal_bounds(len(left), record.num_slots, slot))]
            if slot_epoch > epoch:
                taken.append(inputs)
                continue
            rng = self.buffer_rng(epoch, slot)
            held, read = buffer_after(len(inputs), outputs, record.buffer_size, rng)
            out = np.ones(read, dtype=bool)
            out[held] = False
            taken.append(inputs[:read][out])
        return np.concatenate(taken) if taken else np.zeros(0, np.int64)


def extend_history(
    history: Sequence[LayoutRecord], record: LayoutRecord, num_sources: int
) -> tuple[tuple[LayoutRecord, ...], tuple[int, ...]]:
    """(history, first epoch per source) of a layout that follows `record`'s.

    The new layout starts each source at the oldest epoch a slot of `record` was in; a record whose
    last epoch is before that, for every source, no longer matters and is dropped.
    """
    firsts = tuple(
        min(record.position(slot, source)[0] for slot in range(record.num_slots))
        for source in range(num_sources)
    )
    kept = [
        old
        for old in history
        if any(old.last_epoch(source) >= firsts[source] for source in range(num_sources))
    ]
    return (*kept, record), firsts
