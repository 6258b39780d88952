"""Data sources by `data.kind`: each builds a resumable training loader and an evaluation iterable."""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds

from bigvit.data.digit_strings import DigitStringStream
from bigvit.data.reader import is_local, shard_sizes
from bigvit.data.shards import caption_spec, ensure_digits, split_urls
from bigvit.data.stream import EvalStream, ResumableLoader, Source, TrainStream, merge_states
from bigvit.data.synthetic import SyntheticStream
from bigvit.data.targets import build_targets
from bigvit.data.tokenizer import DEFAULT_VOCAB_SIZE, CaptionTokenizer
from bigvit.data.transforms import BatchPrep, Mixup, eval_transform, on_device, train_transform
from bigvit.errors import ConfigError

__all__ = ["DataBundle", "build_data", "digits_captions", "expand_urls", "merge_states", "prepare"]


@dataclass
class DataBundle:
    """What the trainer needs: an endless resumable train iterable and a factory of eval passes."""

    # Also has state_dict() (this rank's part) / load_state_dict(merge_states(every rank's part)),
    # which resumes at any layout; shard data also has `skipped` (kind → count).
    train: Iterable[dict]
    make_eval: Callable[[], Iterable[dict]] | None  # a pass over shard data also has `skipped` after it ends
    # A training batch → (images, labels) on the device, ready for the model and the loss (shard data:
    # crops resized, flipped, normalized, then mixup/cutmix); `eval_batch` the same for evaluation batches.
    device_batch: Callable[[dict, torch.device], tuple[torch.Tensor, torch.Tensor]] = on_device
    eval_batch: Callable[[dict, torch.device], tuple[torch.Tensor, torch.Tensor]] = on_device
    # One pass over the training split with evaluation preprocessing (each sample once across ranks, as
    # make_eval's): the support pool of few-shot probes. None where the data has none.
    make_support: Callable[[], Iterable[dict]] | None = None
    # The tokenizer of the captions in the batches' "tokens" (data.targets=caption); None for other targets.
    tokenizer: CaptionTokenizer | None = None


def expand_urls(spec: str | list[str], key: str) -> list[str]:
    """Brace patterns, globs or lists → shard URLs; local shards must exist (error names the key and path)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        for url in wds.shardlists.expand_urls(str(item)):
            urls.extend(sorted(glob.glob(url)) if any(c in url for c in "*?[") else [url])
    local = [u for u in urls if is_local(u)]
    missing = [u for u in local if not Path(u).is_file()]
    if not urls or missing:
        first = missing[0] if missing else specs
        raise FileNotFoundError(
            f"data.{key}={spec!r}: {len(missing) if missing else 'no'} shard(s) not found "
            f"(first: {first}); give existing tar files, a brace pattern like dir/train-{{000000..000009}}.tar, "
            "or a pipe: command"
        )
    return urls


def digits_captions(cfg) -> dict | None:
    """What data.kind=digits captions its shards with (shards.caption_spec), or None without data.captions."""
    if not cfg.get("captions"):
        return None
    try:
        return caption_spec(cfg.class_names, cfg.templates, cfg.get("vocab_size", DEFAULT_VOCAB_SIZE))
    except ValueError as error:
        raise ConfigError(f"data.captions=true: data.class_names/data.templates: {error}") from None


def shard_urls(cfg, split_key: str) -> list[str] | None:
    if cfg.kind == "digits":
        index = ensure_digits(cfg.root, cfg.image_size, cfg.split_seed, digits_captions(cfg))
        return split_urls(cfg.root, index, {"train_urls": "train", "eval_urls": "test"}[split_key])
    spec = cfg.get(split_key)
    return expand_urls(spec, split_key) if spec else None


def prepare(cfg) -> None:
    """One-time work before training (run by one process, the others wait): writes the digits shards."""
    if cfg.kind == "digits":
        ensure_digits(cfg.root, cfg.image_size, cfg.split_seed, digits_captions(cfg))


def train_sources(cfg) -> list[Source]:
    """`data.sources` (a list of {urls, weight}) or `data.train_urls` as one source of weight 1."""
    sources = cfg.get("sources")
    if not sources:
        urls = shard_urls(cfg, "train_urls")
        if not urls:
            raise ConfigError(
                "data.train_urls is not set: give shard URLs (a brace pattern, glob, list or pipe: "
                "command), or data.sources=[{urls: ..., weight: ...}, ...]"
            )
        return [Source(tuple(urls))]
    if cfg.kind != "webdataset" or cfg.get("train_urls"):
        raise ConfigError(
            f"data.sources is for data=webdataset without data.train_urls (data.kind={cfg.kind!r}, "
            f"data.train_urls={cfg.get('train_urls')!r}); give one or the other"
        )
    parsed = []
    for i, source in enumerate(sources):
        weight = source.get("weight", 1.0)
        if not isinstance(weight, int | float) or weight <= 0:
            raise ConfigError(f"data.sources[{i}].weight={weight!r} must be a positive number")
        if not source.get("urls"):
            raise ConfigError(f"data.sources[{i}] has no urls: expected {{urls: PATTERN, weight: W}}")
        parsed.append(Source(tuple(expand_urls(source.urls, f"sources[{i}].urls")), float(weight)))
    return parsed


def build_mix(cfg) -> Mixup | None:
    aug = cfg.augment
    mix = Mixup(
        cfg.num_classes,
        aug.get("mixup_alpha", 0.0),
        aug.get("cutmix_alpha", 0.0),
        aug.get("mix_prob", 1.0),
        aug.get("mix_switch_prob", 0.5),
    )
    return mix if mix.enabled else None


def build_shard_data(cfg, *, rank: int, world_size: int, local_batch: int, seed: int) -> DataBundle:
    aug, on_error, draft = cfg.augment, cfg.get("on_error", "warn"), cfg.get("jpeg_draft", True)
    interpolation = aug.get("interpolation", "bicubic")
    sources = train_sources(cfg)  # first: digits shards (and their tokenizer) are written here when missing
    targets = build_targets(cfg)
    mix = build_mix(cfg)
    if mix is not None and targets.trained != "label":
        raise ConfigError(
            f"data.augment mixup/cutmix mixes class labels; data.targets={cfg.targets!r} trains against "
            f"{targets.trained}: set data.augment.mixup_alpha=0 data.augment.cutmix_alpha=0"
        )
    device_batch = BatchPrep(cfg.image_size, cfg.mean, cfg.std, mix, interpolation, targets.trained)
    eval_batch = BatchPrep(cfg.image_size, cfg.mean, cfg.std, None, interpolation)
    stream = TrainStream(
        sources,
        local_batch,
        train_transform(cfg.image_size, aug.scale, aug.ratio, aug.hflip, draft),
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle_buffer=cfg.shuffle_buffer,
        on_error=on_error,
        targets=targets,
    )
    eval_urls = shard_urls(cfg, "eval_urls")
    evaluation = eval_transform(cfg.image_size, cfg.crop_pct, draft)
    make_eval = None
    if eval_urls:
        eval_sizes = shard_sizes(eval_urls, on_error)  # once, not per evaluation

        def make_eval():
            stream = EvalStream(
                eval_urls,
                local_batch,
                evaluation,
                rank=rank,
                world_size=world_size,
                on_error=on_error,
                sizes=eval_sizes,
                targets=targets,
            )
            return ResumableLoader.plain_loader(stream, cfg.num_workers)

    support_urls = [url for source in sources for url in source.urls]

    def make_support():
        stream = EvalStream(
            support_urls, local_batch, evaluation, rank=rank, world_size=world_size, on_error=on_error, targets=targets
        )
        return ResumableLoader.plain_loader(stream, cfg.num_workers)

    return DataBundle(
        ResumableLoader(stream, cfg.num_workers),
        make_eval,
        device_batch,
        eval_batch,
        make_support,
        tokenizer=getattr(targets, "tokenizer", None),
    )


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
    # The support pool: as many samples of the training stream itself as the held-out set has.
    make_support = (
        (lambda: SyntheticStream(**common, eval_samples=cfg.eval_samples, eval_split="train"))
        if cfg.eval_samples
        else None
    )
    train = SyntheticStream(**common, repeat_batch=cfg.get("repeat_batch", False))
    return DataBundle(train, make_eval, make_support=make_support)


def build_digit_strings(cfg, *, rank: int, world_size: int, local_batch: int, seed: int) -> DataBundle:
    common = dict(global_batch=local_batch * world_size, rank=rank, world_size=world_size, seed=seed)
    make_eval = (lambda: DigitStringStream(cfg, **common, eval=True)) if cfg.eval_samples else None
    return DataBundle(DigitStringStream(cfg, **common), make_eval)


BUILDERS = {
    "digits": build_shard_data,
    "webdataset": build_shard_data,
    "synthetic": build_synthetic_data,
    "digit_strings": build_digit_strings,
}


def build_data(cfg, *, rank: int, world_size: int, local_batch: int, seed: int) -> DataBundle:
    if cfg.kind not in BUILDERS:
        raise ConfigError(f"data.kind={cfg.kind!r} is not one of {sorted(BUILDERS)}")
    return BUILDERS[cfg.kind](cfg, rank=rank, world_size=world_size, local_batch=local_batch, seed=seed)
