"""Reading WebDataset tar shards: samples by number, shard sizes, and bad data counted or raised.

Shard sizes come from the `index.json` beside local shards (bigvit-shards writes one), else from one
pass over each shard's tar headers (local files seek past the data; `pipe:` and remote URLs are read
whole, so large remote datasets want an index). A shard that cannot be read to its end counts the
samples it could read; its damage is reported when training reads it, or at once under on_error=raise.

Bad data (`on_error`): under "warn" an unreadable shard (missing, failing pipe, corrupt or cut short)
loses the rest of that shard and an undecodable or incomplete sample is dropped; each is counted by
kind and logged (the first few per shard). Under "raise" the first bad shard or sample stops the run
with a DataError naming the shard and the sample.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import webdataset as wds
from webdataset.tariterators import group_by_keys

from bigvit.data.plan import Unit
from bigvit.data.shards import read_index
from bigvit.errors import ConfigError, DataError

log = logging.getLogger("bigvit")

ON_ERROR = ("warn", "raise")
SKIP_KINDS = ("read", "missing", "decode")  # shard unreadable from here on | no image or .cls | bad bytes
LOGGED_PER_SHARD = 3
META_FILE = re.compile(r"__[^/]*__($|/)")


def entries(sample: dict) -> list[str]:
    """The entry names of a raw sample (its keys without WebDataset's `__key__`, `__url__`, ...)."""
    return sorted(k for k in sample if k[:2] != "__")


class SampleError(DataError):
    """A sample that cannot be used; `kind` is one of SKIP_KINDS, `detail` what is wrong with it."""

    def __init__(self, sample: dict, detail: str, kind: str = "decode"):
        super().__init__(f"sample {sample.get('__key__')!r} in {sample.get('__url__')!r} {detail}")
        self.detail, self.kind = detail, kind


def checked_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ConfigError(f"data.on_error={on_error!r} is not one of {list(ON_ERROR)}")
    return on_error


class Skips:
    """Skipped data counted by kind (for the metrics), the first few per shard logged; or raised, by `on_error`."""

    def __init__(self, on_error: str = "warn"):
        self.on_error = checked_on_error(on_error)
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


class Silent(Skips):
    """Skips that neither count nor log: for re-reading samples whose damage was reported before."""

    def __call__(self, kind: str, url: str, where: str, error: Exception) -> None:
        pass


class _EndCheckedTarInfo(tarfile.TarInfo):
    """Marks the TarFile when its archive ends without the end-of-archive blocks (tarfile ends silently)."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            tar.cut_short = True
            raise


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def tar_files(tar: tarfile.TarFile, url: str, with_data: bool) -> Iterator[dict]:
    for member in tar:
        if member.isreg() and not META_FILE.match(member.name):
            data = tar.extractfile(member).read() if with_data else b""
            yield {"fname": member.name, "data": data, "__url__": url}
        tar.members = []
    if getattr(tar, "cut_short", False):
        raise tarfile.ReadError("the archive ends without its end-of-archive marker: truncated")


def shard_files(url: str, with_data: bool = True) -> Iterator[dict]:
    """The files of one tar shard as webdataset file samples, then its end-of-shard marker `{}`.

    Unlike webdataset's reader, a shard cut short at a member boundary is an error, not a quiet end.
    Without data (for sizes), a local shard is read by seeking from header to header.
    """
    if not with_data and is_local(url):
        with tarfile.open(url, mode="r:*", tarinfo=_EndCheckedTarInfo) as tar:
            yield from tar_files(tar, url, with_data=False)
        yield {}
        return
    stream = wds.gopen(url)
    finished = False
    try:
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndCheckedTarInfo) as tar:
            yield from tar_files(tar, url, with_data)
        stream.close()  # a pipe: reports a failing command here
        finished = True
    finally:
        if not finished:  # stopped early or failed: a pipe's exit status says nothing more
            with contextlib.suppress(Exception):
                stream.close()
    yield {}


def where(key: str | None) -> str:
    return f"after sample {key!r}" if key else "before its first sample"


def read_unit(unit: Unit, url: str, skips: Skips) -> Iterator[tuple[int, int, dict | None]]:
    """(shard, sample number, sample) for each sample of the unit, in order; None for one not read.

    A failure to read the shard is reported only when it cuts this unit's samples short, or past
    them when the unit reads to the end, so each failure is reported once per epoch.
    """
    wanted = iter(unit.indices)
    expected = next(wanted, None)
    count, key = 0, None
    try:
        if expected is not None or unit.to_end:
            for index, sample in enumerate(group_by_keys(shard_files(url))):
                count, key = index + 1, sample["__key__"]
                if index == expected:
                    yield unit.shard, index, sample
                    expected = next(wanted, None)
                    if expected is None and not unit.to_end:
                        break
    except Exception as error:  # any failure to read the shard: missing, failing pipe, corrupt
        if count >= unit.report_from:
            skips("read", url, where(key), error)
    while expected is not None:
        yield unit.shard, expected, None
        expected = next(wanted, None)


def read_units(
    units: Sequence[Unit], urls: Sequence[str], skips: Skips
) -> Iterator[tuple[int, int, dict | None]]:
    for unit in units:
        yield from read_unit(unit, urls[unit.shard], skips)


def counted_samples(url: str, on_error: str) -> int:
    """Samples in a shard, from its tar headers; what could be read when it is damaged (raised under raise)."""
    count, key = 0, None
    try:
        for sample in group_by_keys(shard_files(url, with_data=False)):
            count, key = count + 1, sample["__key__"]
    except Exception as error:
        if on_error == "raise":
            Skips(on_error)("read", url, where(key), error)
        log.debug("shard %s: %d readable sample(s), then %s", url, count, error)
    return count


def indexed_sizes(directory: Path) -> dict[str, int]:
    """Shard file name → samples, from an index.json (bigvit-shards) in `directory`."""
    index = read_index(directory) or {}
    return {
        name: count
        for split in index.get("splits", {}).values()
        for name, count in zip(split.get("shards", []), split.get("counts", []), strict=False)
    }


def shard_sizes(urls: Sequence[str], on_error: str = "warn") -> list[int]:
    """Samples per shard: from the index.json beside local shards, else counted from the tar headers."""
    indexes: dict[Path, dict[str, int]] = {}
    sizes = []
    for url in urls:
        known = None
        if is_local(url):
            path = Path(url)
            if path.parent not in indexes:
                indexes[path.parent] = indexed_sizes(path.parent)
            known = indexes[path.parent].get(path.name)
        sizes.append(known if known is not None else counted_samples(url, on_error))
    return sizes
