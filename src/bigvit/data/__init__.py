"""Data sources by `data.kind`: each builds a resumable training loader and an evaluation iterable."""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from bigvit.data.shards import ensure_digits, split_urls
from bigvit.data.stream import EvalStream, ResumableLoader, TrainStream
from bigvit.data.synthetic import SyntheticStream
from bigvit.data.transforms import eval_transform, train_transform
from bigvit.errors import ConfigError


@dataclass
class DataBundle:
    """What the trainer needs: an endless resumable train iterable and a factory of eval passes."""

    train: Iterable[
        dict
    ]  # also has state_dict() / load_state_dict(); shard data also `skipped` (kind → count)
    make_eval: Callable[[], Iterable[dict]] | None  # a pass over shard data also has `skipped` after it ends


def expand_urls(spec: str | list[str], key: str) -> list[str]:
    """Brace patterns, globs or lists → shard URLs; local shards must exist (error names the key and path)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        for url in wds.shardlists.expand_urls(str(item)):
            urls.extend(sorted(glob.glob(url)) if any(c in url for c in "*?[") else [url])
    local = [u for u in urls if not u.startswith("pipe:") and "://" not in u]
    missing = [u for u in local if not Path(u).is_file()]
    if not urls or missing:
        first = missing[0] if missing else specs
        raise FileNotFoundError(
            f"data.{key}={spec!r}: {len(missing) if missing else 'no'} shard(s) not found "
            f"(first: {first}); give existing tar files, a brace pattern like dir/train-{{000000..000009}}.tar, "
            "or a pipe: command"
        )
    return urls


def shard_urls(cfg, split_key: str) -> list[str] | None:
    if cfg.kind == "digits":
        index = ensure_digits(cfg.root, cfg.image_size, cfg.split_seed)
        return split_urls(cfg.root, index, {"train_urls": "train", "eval_urls": "test"}[split_key])
    spec = cfg.get(split_key)
    return expand_urls(spec, split_key) if spec else None


def prepare(cfg) -> None:
    """One-time work before training (run by one process, the others wait): writes the digits shards."""
    if cfg.kind == "digits":
        ensure_digits(cfg.root, cfg.image_size, cfg.split_seed)


def build_shard_data(cfg, *, rank: int, world_size: int, local_batch: int, seed: int) -> DataBundle:
    aug, on_error = cfg.augment, cfg.get("on_error", "warn")
    stream = TrainStream(
        shard_urls(cfg, "train_urls"),
        local_batch,
        train_transform(cfg.image_size, aug.scale, aug.ratio, aug.hflip, cfg.mean, cfg.std),
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle_buffer=cfg.shuffle_buffer,
        on_error=on_error,
    )
    eval_urls = shard_urls(cfg, "eval_urls")
    evaluation = eval_transform(cfg.image_size, cfg.crop_pct, cfg.mean, cfg.std)
    make_eval = None
    if eval_urls:

        def make_eval():
            stream = EvalStream(
                eval_urls, local_batch, evaluation, rank=rank, world_size=world_size, on_error=on_error
            )
            return ResumableLoader.plain_loader(stream, cfg.num_workers)

    return DataBundle(ResumableLoader(stream, cfg.num_workers), make_eval)


def build_synthetic_data(cfg, *, rank: int, world_size: int, local_batch: int, seed: int) -> DataBundle:
    common = dict(
        global_batch=local_batch * world_size,
        num_classes=cfg.num_classes,
        image_size=cfg.image_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
    )
    make_eval = (
        (lambda: SyntheticStream(**common, eval_samples=cfg.eval_samples)) if cfg.eval_samples else None
    )
    return DataBundle(SyntheticStream(**common, repeat_batch=cfg.get("repeat_batch", False)), make_eval)


BUILDERS = {"digits": build_shard_data, "webdataset": build_shard_data, "synthetic": build_synthetic_data}


def build_data(cfg, *, rank: int, world_size: int, local_batch: int, seed: int) -> DataBundle:
    if cfg.kind not in BUILDERS:
        raise ConfigError(f"data.kind={cfg.kind!r} is not one of {sorted(BUILDERS)}")
    return BUILDERS[cfg.kind](cfg, rank=rank, world_size=world_size, local_batch=local_batch, seed=seed)
