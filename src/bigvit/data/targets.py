"""What a sample is trained against, read from its shard entries beside the image: `data.targets`.

A reader turns one raw WebDataset sample into plain values (`read`, in the dataloader worker, raising
a SampleError for a sample that lacks them or holds bad ones: a counted skip like a bad image), and a
list of those into the batch's tensors (`collate`). The image is read by the stream, never here.

    class    `.cls` → "label" long (B,): softmax classification (the default)
    caption  `.txt` (or the "caption" of `.json`) → "tokens" long (B, data.context_length), ids of
             the run's tokenizer (data/tokenizer.py, `data.tokenizer`); and "label" long (B,) from
             `.cls`, -1 for a sample without one (zero-shot evaluation reads labelled eval shards)
    labels   `.cls` "3 7" / "3,7" or `.json` {"labels": [3, 7]} → "label" multi-hot float (B, num_classes)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
import webdataset as wds

from bigvit.data.reader import SampleError, entries, is_local
from bigvit.data.tokenizer import CaptionTokenizer, build_tokenizer
from bigvit.errors import ConfigError


class Targets(Protocol):
    # The batch entry the objective trains against ("label"; captions: "tokens"); the others ride along.
    trained: str

    def read(self, sample: dict) -> dict:
        """This sample's targets as plain values; SampleError (kind "missing" or "decode") when it has none."""

    def collate(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        """The batch's target tensors from `read`'s values, in sample order."""


def entry_text(sample: dict, key: str) -> str:
    """Entry `key` of a raw sample (bytes) as text; a SampleError naming the sample when it is absent."""
    if key not in sample:
        raise SampleError(
            sample, f"lacks a .{key} entry; it has {entries(sample)}", kind="missing"
        )
    value = sample[key]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class ClassLabel:
    """One class number per image, from `.cls`."""

    trained = "label"

    def read(self, sample: dict) -> dict:
        text = entry_text(sample, "cls")
        try:
            return {"label": int(text)}
        except ValueError as error:
            raise SampleError(sample, f"has .cls {text.strip()[:40]!r}, not a class number") from error

    def collate(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        return {"label": torch.tensor([item["label"] for item in items], dtype=torch.long)}


def caption_text(sample: dict) -> str:
    """The caption of a raw sample, stripped: its `.txt`, else the "caption" of its `.json`. A SampleError
    naming the sample when it has neither (kind "missing"), or one that is not UTF-8 or is empty ("decode")."""
    if "txt" in sample:
        raw, where = sample["txt"], ".txt"
    elif "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise SampleError(sample, f"has a .json that is not JSON ({error})") from error
        if not isinstance(meta, dict) or "caption" not in meta:
            raise SampleError(sample, "lacks a caption: no .txt entry and no \"caption\" in its .json", kind="missing")
        raw, where = meta["caption"], '.json "caption"'
    else:
        raise SampleError(
            sample, f"lacks a caption (.txt or .json); it has {entries(sample)}", kind="missing"
        )
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError as error:
        raise SampleError(sample, f"has a {where} caption that is not UTF-8 ({error})") from error
    if not text.strip():
        raise SampleError(sample, f"has an empty {where} caption {text[:20]!r}")
    return text.strip()


class Caption:
    """A caption per image as `tokenizer` ids (tokenized here, in the dataloader worker), and the class
    number when the sample has a `.cls`. Pickles with its tokenizer into every worker."""

    trained = "tokens"

    def __init__(self, tokenizer: CaptionTokenizer):
        self.tokenizer = tokenizer

    def read(self, sample: dict) -> dict:
        tokens = self.tokenizer.row(caption_text(sample))
        label = ClassLabel().read(sample)["label"] if "cls" in sample else -1
        return {"tokens": tokens, "label": label}

    def collate(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        return {
            "tokens": torch.tensor([item["tokens"] for item in items], dtype=torch.long),
            "label": torch.tensor([item["label"] for item in items], dtype=torch.long),
        }


def shard_folders(cfg) -> list[Path]:
    """The folders of the local training shards a data config names (digits: its root): where
    data.tokenizer=auto looks for the shards' tokenizer.json."""
    if cfg.get("kind") == "digits":
        return [Path(cfg.root)]
    specs = [cfg.get("train_urls")] if cfg.get("train_urls") else [s.get("urls") for s in cfg.get("sources") or []]
    folders = set()
    for spec in specs:
        for item in [spec] if isinstance(spec, str) else list(spec or []):
            folders.update(Path(url).parent for url in wds.shardlists.expand_urls(str(item)) if is_local(url))
    return sorted(folders)


def caption_reader(cfg) -> Caption:
    tokenizer = build_tokenizer(cfg.get("tokenizer", "auto"), cfg.get("context_length", 64), shard_folders(cfg))
    return Caption(tokenizer)


class MultiLabel:
    """A set of class numbers per image (JFT-style, sigmoid training), from `.cls` ("3", "3 7" or "3,7") or,
    where the sample has no `.cls`, `.json` ({"labels": [3, 7]} or a bare list); a multi-hot row each."""

    trained = "label"

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def read(self, sample: dict) -> dict:
        if "cls" in sample or "json" not in sample:
            text = entry_text(sample, "cls")
            labels = text.replace(",", " ").split()
        else:
            text = entry_text(sample, "json")
            try:
                labels = json.loads(text)
            except ValueError as error:
                raise SampleError(sample, f"has .json {text.strip()[:40]!r}, not JSON") from error
            labels = labels.get("labels") if isinstance(labels, dict) else labels
        if not isinstance(labels, list) or not labels:
            raise SampleError(sample, f"has labels {text.strip()[:40]!r}: expected one class number or more")
        for label in labels:
            # bool is an int to Python but never a class number
            number = label if isinstance(label, int) and not isinstance(label, bool) else None
            if number is None and isinstance(label, str) and label.lstrip("-").isdigit():
                number = int(label)
            if number is None or not 0 <= number < self.num_classes:
                raise SampleError(
                    sample, f"has label {label!r}: not a class number in [0, {self.num_classes}) (data.num_classes)"
                )
        return {"label": sorted({int(label) for label in labels})}

    def collate(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        hot = torch.zeros(len(items), self.num_classes)
        for row, item in enumerate(items):
            hot[row, item["label"]] = 1.0
        return {"label": hot}


# data.targets → a reader built from the data config.
READERS: dict[str, Callable[..., Targets]] = {
    "class": lambda cfg: ClassLabel(),
    "labels": lambda cfg: MultiLabel(int(cfg.num_classes)),
    "caption": caption_reader,
}


def build_targets(cfg) -> Targets:
    """The reader `data.targets` names (default: class)."""
    name = cfg.get("targets", "class") or "class"
    if name not in READERS:
        raise ConfigError(f"data.targets={name!r} is not one of {sorted(READERS)}")
    return READERS[name](cfg)
