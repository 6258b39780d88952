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


class IndexedStream:
    """Batches of samples that are pure functions of (seed, global index): this rank's slice of global
    batch `step` while training; with `eval_samples`, a fixed held-out set (another seed) strided over
    ranks. Subclasses say what a batch of indices is (`batch`)."""

    def __init__(self, global_batch: int, *, rank: int, world_size: int, seed: int, eval_samples: int = 0,
                 repeat_batch: bool = False, eval_split: str = "eval"):  # fmt: skip
        self.global_batch, self.rank, self.world_size, self.seed = global_batch, rank, world_size, seed
        self.eval_samples = eval_samples
        self.eval_split = eval_split  # "train": the fixed set is the training stream's first samples
        self.repeat_batch = repeat_batch  # every step sees global batch 0: overfitting and memory checks
        self.local_batch = global_batch // world_size
        self.step = 0

    def batch(self, indices: range | list[int], seed: int) -> dict:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict]:
        if self.eval_samples:
            indices = list(range(self.rank, self.eval_samples, self.world_size))
            for start in range(0, len(indices), self.local_batch):
                seed = self.seed if self.eval_split == "train" else self.seed + 1
                yield self.batch(indices[start : start + self.local_batch], seed)
            return
        while True:
            first = (0 if self.repeat_batch else self.step) * self.global_batch + self.rank * self.local_batch
            self.step += 1
            yield self.batch(range(first, first + self.local_batch), self.seed)

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


class SyntheticStream(IndexedStream):
    """Noisy class templates; held-out samples are other draws around the same templates."""

    def __init__(self, global_batch: int, num_classes: int, image_size: int, **stream):
        super().__init__(global_batch, **stream)
        self.num_classes, self.image_size = num_classes, image_size

    def batch(self, indices: range | list[int], seed: int) -> dict:
        pairs = [synthetic_sample(seed, i, self.num_classes, self.image_size, self.seed) for i in indices]
        return {"image": torch.stack([p[0] for p in pairs]), "label": torch.tensor([p[1] for p in pairs])}
