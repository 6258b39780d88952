"""Classification scores of an evaluation pass, summed batch by batch: the trainer's periodic evaluation
and `bigvit-eval` add them up the same way, so their figures agree."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def empty_scores(device: torch.device) -> torch.Tensor:
    """(3,) float64 zeros: correct predictions, samples, summed cross-entropy (fp64: exact counts)."""
    return torch.zeros(3, device=device, dtype=torch.float64)


def add_scores(scores: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Adds a batch's float logits (B, K) and class labels (B,) to `scores`; labels < 0 are filler rows
    (a rank that ran out of samples) and count for nothing."""
    valid = labels >= 0
    scores[0] += (logits.argmax(-1) == labels)[valid].sum()
    scores[1] += valid.sum()
    scores[2] += F.cross_entropy(logits[valid], labels[valid], reduction="sum") if valid.any() else 0.0


def score_figures(scores: torch.Tensor) -> dict:
    """{"eval_top1", "eval_loss" (mean cross-entropy), "eval_samples"} of summed `scores`."""
    return {
        "eval_top1": (scores[0] / scores[1]).item(),
        "eval_loss": (scores[2] / scores[1]).item(),
        "eval_samples": int(scores[1].item()),
    }
