"""Digit strings: an endless embedded task whose difficulty is set, for scaling studies on a laptop.

Each image shows `length` handwritten digits of scikit-learn's digits side by side, each at a random
place in its column, over pixel noise; the label is the number they spell (10**length classes).
Training and held-out images draw their glyphs from disjoint sets (the stratified split data=digits
uses), so the error measures reading unseen handwriting. With 1437 training glyphs there are 1437**2
two-digit images: the stream does not repeat within any run on this machine, unlike the 1437 digits,
which a small ViT memorizes in minutes. `length`, `noise` and `glyph_size` set the difficulty.

Like data=synthetic, a sample is a pure function of (seed, global index): every layout sees the same
global batches and a resumed run continues exactly.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bigvit.data.synthetic import IndexedStream
from bigvit.errors import ConfigError


def glyph_sets(glyph_size: int, split_seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train"|"test": (glyphs (n, glyph_size, glyph_size) in [0, 1], labels (n,))}, data=digits' split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0).float()[:, None]
    resized = F.interpolate(images, size=(glyph_size, glyph_size), mode="bilinear", antialias=True)
    glyphs = resized[:, 0].clamp(0, 1).numpy()
    x_train, x_test, y_train, y_test = train_test_split(
        glyphs, digits.target, test_size=0.2, random_state=split_seed, stratify=digits.target
    )
    return {"train": (x_train, y_train), "test": (x_test, y_test)}


def render(rng: np.random.Generator, glyphs: np.ndarray, labels: np.ndarray, length: int,
           image_size: int, noise: float) -> tuple[np.ndarray, int]:  # fmt: skip
    """One image (3, image_size, image_size), normalized to mean 0 / std ~1 of the clean ink, and its label."""
    glyph_size = glyphs.shape[-1]
    column = image_size // length
    canvas = np.zeros((image_size, image_size), dtype=np.float32)
    label = 0
    for position, pick in enumerate(rng.integers(len(glyphs), size=length)):
        x = position * column + rng.integers(column - glyph_size + 1)
        y = rng.integers(image_size - glyph_size + 1)
        canvas[y : y + glyph_size, x : x + glyph_size] = glyphs[pick]
        label = 10 * label + int(labels[pick])
    canvas += noise * rng.standard_normal(canvas.shape, dtype=np.float32)
    return np.broadcast_to((canvas - 0.5) / 0.5, (3, image_size, image_size)), label


class DigitStringStream(IndexedStream):
    """This rank's slice of each global batch of training images, or (eval=True) a fixed held-out set."""

    def __init__(self, cfg, *, global_batch: int, rank: int, world_size: int, seed: int, eval: bool = False):
        super().__init__(global_batch, rank=rank, world_size=world_size, seed=seed,
                         eval_samples=int(cfg.eval_samples) if eval else 0)  # fmt: skip
        length, size = int(cfg.length), int(cfg.image_size)
        if cfg.num_classes != 10**length:
            raise ConfigError(
                f"data.num_classes={cfg.num_classes} must be 10**data.length = {10**length} for "
                f"data.length={length} (the label is the number the digits spell)"
            )
        if size // length < cfg.glyph_size:
            raise ConfigError(
                f"data.glyph_size={cfg.glyph_size} does not fit {length} digit(s) side by side in "
                f"data.image_size={size}: need glyph_size <= image_size // length = {size // length}"
            )
        self.glyphs, self.labels = glyph_sets(int(cfg.glyph_size), int(cfg.split_seed))["test" if eval else "train"]
        self.length, self.image_size, self.noise = length, size, float(cfg.noise)

    def batch(self, indices, seed: int) -> dict:
        samples = [
            render(np.random.default_rng([seed, i]), self.glyphs, self.labels, self.length, self.image_size, self.noise)
            for i in indices
        ]
        images = torch.from_numpy(np.stack([s[0] for s in samples]))
        return {"image": images, "label": torch.tensor([s[1] for s in samples])}
