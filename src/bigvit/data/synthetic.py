"""Synthetic images whose every sample is a pure function of (seed, global index).

Rank r of W takes rows [r*B/W, (r+1)*B/W) of each global batch of B, so any two parallel layouts
see the same global batches: the basis of loss-parity checks across layouts. Each class has a
fixed template the image is noised around, so the task is learnable.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def synthetic_sample(
    seed: int, index: int, num_classes: int, image_size: int, template_seed: int | None = None
) -> tuple[torch.Tensor, int]:
    """Sample `index` of the stream `seed`, noised around the class templates of `template_seed`
    (default: `seed`); a held-out set is another stream around the same templates."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    label = int(torch.randint(num_classes, (1,), generator=generator))
    noise = torch.randn(3, image_size, image_size, generator=generator)
    template = class_template(seed if template_seed is None else template_seed, label, image_size)
    return template + 0.5 * noise, label


def class_template(seed: int, label: int, image_size: int) -> torch.Tensor:
    """Drawn per sample rather than stored: 1000 classes at 224 px would hold 0.56 GiB per stream."""
    generator = torch.Generator().manual_seed(seed * 7_919 + label + 1)
    return torch.randn(3, image_size, image_size, generator=generator)


class SyntheticStream:
    """Batches of this rank's slice of global batch `step`; `eval=True` gives a fixed finite set."""

    def __init__(
        self,
        global_batch: int,
        num_classes: int,
        image_size: int,
        *,
        rank: int,
        world_size: int,
        seed: int,
        eval_samples: int = 0,
        repeat_batch: bool = False,
    ):
        self.global_batch, self.num_classes, self.image_size = global_batch, num_classes, image_size
        self.rank, self.world_size, self.seed, self.eval_samples = rank, world_size, seed, eval_samples
        self.repeat_batch = repeat_batch  # every step sees global batch 0: overfitting and memory checks
        self.local_batch = global_batch // world_size
        self.step = 0

    def batch(self, indices: range | list[int], seed: int) -> dict:
        pairs = [synthetic_sample(seed, i, self.num_classes, self.image_size, self.seed) for i in indices]
        return {"image": torch.stack([p[0] for p in pairs]), "label": torch.tensor([p[1] for p in pairs])}

    def __iter__(self) -> Iterator[dict]:
        if self.eval_samples:  # held-out samples (another seed, the same classes), strided over ranks
            indices = list(range(self.rank, self.eval_samples, self.world_size))
            for start in range(0, len(indices), self.local_batch):
                yield self.batch(indices[start : start + self.local_batch], self.seed + 1)
            return
        while True:
            first = (0 if self.repeat_batch else self.step) * self.global_batch + self.rank * self.local_batch
            self.step += 1
            yield self.batch(range(first, first + self.local_batch), self.seed)

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
