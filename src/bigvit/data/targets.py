"""What a sample is trained against, read from its shard entries beside the image: `data.targets`.

A reader turns one raw WebDataset sample into plain values (`read`, in the dataloader worker, raising
a SampleError for a sample that lacks them or holds bad ones: a counted skip like a bad image), and a
list of those into the batch's tensors (`collate`). The image is read by the stream, never here.

    class    `.cls` → "label" long (B,): softmax classification (the default)
    labels   `.cls` "3 7" / "3,7" or `.json` {"labels": [3, 7]} → "label" multi-hot float (B, num_classes)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from bigvit.data.reader import SampleError
from bigvit.errors import ConfigError


class Targets(Protocol):
    def read(self, sample: dict) -> dict:
        """This sample's targets as plain values; SampleError (kind "missing" or "decode") when it has none."""

    def collate(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        """The batch's target tensors from `read`'s values, in sample order."""


def entry_text(sample: dict, key: str) -> str:
    """Entry `key` of a raw sample (bytes) as text; a SampleError naming the sample when it is absent."""
    if key not in sample:
        raise SampleError(
            sample, f"lacks a .{key} entry; it has {sorted(k for k in sample if k[:2] != '__')}", kind="missing"
        )
    value = sample[key]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class ClassLabel:
    """One class number per image, from `.cls`."""

    def read(self, sample: dict) -> dict:
        text = entry_text(sample, "cls")
        try:
            return {"label": int(text)}
        except ValueError as error:
            raise SampleError(sample, f"has .cls {text.strip()[:40]!r}, not a class number") from error

    def collate(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        return {"label": torch.tensor([item["label"] for item in items], dtype=torch.long)}


class MultiLabel:
    """A set of class numbers per image (JFT-style, sigmoid training), from `.cls` ("3", "3 7" or "3,7") or,
    where the sample has no `.cls`, `.json` ({"labels": [3, 7]} or a bare list); a multi-hot row each."""

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
}


def build_targets(cfg) -> Targets:
    """The reader `data.targets` names (default: class)."""
    name = cfg.get("targets", "class") or "class"
    if name not in READERS:
        raise ConfigError(f"data.targets={name!r} is not one of {sorted(READERS)}")
    return READERS[name](cfg)
