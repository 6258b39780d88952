"""Progressive resizing: the training resolution as a function of the step.

`data.resolution_schedule` is a list of [fraction of training, image size] stages, e.g.
`[[0, 128], [0.5, 176], [0.8, 224]]`: from step round(fraction × max_steps) on, training batches
are resized (on the device, by the same antialiased filters as every crop) to that size, and the
model resamples its position embeddings to the grid. Being a function of the step alone, the
schedule resumes exactly wherever a run stops.

With `data.resolution_batch_scaling=true` a step at a smaller size reads a whole multiple of the
batch, floor((data.image_size / size)²) stream batches, so the tokens per step stay about those of
data.image_size (FFCV and FixRes keep the tokens, not the images, per step constant).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from bigvit.errors import ConfigError


@dataclass(frozen=True)
class Stage:
    start_step: int
    image_size: int
    batch_multiple: int


class ResolutionSchedule:
    """The image size and batch multiple of each training step."""

    def __init__(self, stages: list[Stage]):
        self.stages = stages

    @classmethod
    def from_config(cls, data_cfg, max_steps: int, patch_size: int) -> ResolutionSchedule:
        """The schedule of `data.resolution_schedule` (null: data.image_size throughout); raises
        ConfigError naming the entry that is not a valid stage."""
        base = int(data_cfg.image_size)
        entries = data_cfg.get("resolution_schedule") or [[0, base]]
        if isinstance(entries, str) or not hasattr(entries, "__len__"):
            raise ConfigError(
                f"data.resolution_schedule={entries!r} must be a list of [fraction of training, image size] "
                "stages, e.g. [[0, 128], [0.5, 224]], or null"
            )
        scaling = bool(data_cfg.get("resolution_batch_scaling", False))
        stages, previous = [], -1.0
        for index, entry in enumerate(entries):
            key = f"data.resolution_schedule[{index}]={list(entry) if hasattr(entry, '__len__') else entry!r}"
            if not hasattr(entry, "__len__") or len(entry) != 2:
                raise ConfigError(f"{key} must be a [fraction of training, image size] pair")
            fraction, size = entry
            if not isinstance(fraction, int | float) or not previous < fraction < 1 or (index == 0) != (fraction == 0):
                raise ConfigError(
                    f"{key}: fractions must start at 0 and increase, each in [0, 1) (got {fraction!r})"
                )
            if not isinstance(size, int) or size <= 0 or size % patch_size:
                raise ConfigError(f"{key}: the image size must be a positive multiple of model.patch_size={patch_size}")
            multiple = max(1, (base * base) // (size * size)) if scaling else 1
            stages.append(Stage(round(fraction * max_steps), size, multiple))
            previous = fraction
        return cls(stages)

    def stage_at(self, step: int) -> Stage:
        """The stage step `step` (0-based: the step about to run) trains in."""
        return next(s for s in reversed(self.stages) if s.start_step <= step)

    def images_by_size(self, step: int, global_batch: int) -> dict[int, int]:
        """Images the first `step` steps read, by image size."""
        images: dict[int, int] = {}
        for index, stage in enumerate(self.stages):
            end = self.stages[index + 1].start_step if index + 1 < len(self.stages) else step
            steps = max(0, min(end, step) - stage.start_step)
            if steps:
                images[stage.image_size] = images.get(stage.image_size, 0) + steps * stage.batch_multiple * global_batch
        return images

    def describe(self, max_steps: int) -> str:
        parts = [
            f"{s.image_size} px from step {s.start_step}" + (f" (batch ×{s.batch_multiple})" if s.batch_multiple > 1 else "")
            for s in self.stages
            if s.start_step < max_steps
        ]
        return "; ".join(parts)


def scheduled_batch(
    device_batch: Callable, batches: Iterator[dict], device: torch.device, stage: Stage
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next training (images, labels) at the stage's size: `batch_multiple` stream batches, joined."""
    parts = [device_batch(next(batches), device, stage.image_size) for _ in range(stage.batch_multiple)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
