"""The loss a run optimises, built once from `objective.name` (conf/objective/): per micro-batch the
trainer feeds the model `objective.inputs(images, targets)` and takes `objective(outputs, targets, images)`
as the loss, knowing nothing of what either computes.

    classify  softmax cross-entropy against class numbers (or mixup's class probabilities)
    sigmoid   sigmoid binary cross-entropy against multi-hot label sets (train/sigmoid.py)
    siglip    the pairwise sigmoid loss of image–caption pairs (train/siglip.py), for a TwoTower model

`distill.name` other than none wraps the base in distillation (train/distill.py), which keeps the base as
its hard-label term. The targets are what `data.targets` reads (data/targets.py), which each objective's
config sets. Evaluation on the held-out set follows the objective too: its `evaluator` where it has one,
else the trainer's softmax top-1 and loss (Trainer.classify).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from bigvit.errors import ConfigError
from bigvit.train.sigmoid import build_sigmoid

DISTILLATION = ("none", "soft")


class Objective(Protocol):
    def inputs(self, images: torch.Tensor, targets: torch.Tensor) -> tuple:
        """The model's forward arguments for a micro-batch (classification: the images alone)."""

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The mean loss of one micro-batch (a 0-d float32 tensor with autograd to the model's outputs)."""

    def figures(self, image_size: int) -> dict[str, float]:
        """What the objective costs or adds beyond the model, for logs and the summary (e.g. a teacher's
        FLOPs per image at `image_size`); {} for none. Not counted in the model's MFU."""

    # Optional: `evaluator(trainer) -> dict`, the figures of one pass over the held-out set
    # (trainer.data.make_eval()) with the weights now in the model, each sample counted once across ranks
    # (trainer.held_out_batches feeds the ranks in lockstep; trainer.summed_over_ranks adds up the sums).
    # It returns its figures (classification-like ones "eval_top1", "eval_loss", "eval_samples"; siglip's
    # "zeroshot_top1", "i2t_recall@1", ...); the trainer logs them as eval/<key> and on the console, for
    # the live weights and, with ema.decay > 0, the EMA's (as ema_<key without eval_>). Without one:
    # Trainer.classify (softmax top-1).


@dataclass
class Classify:
    """Cross-entropy with label smoothing. Labels are class numbers, or class probabilities under
    mixup/cutmix (smoothing the mixture equals mixing smoothed one-hots, as timm does: both are linear)."""

    label_smoothing: float = 0.0

    def inputs(self, images: torch.Tensor, targets: torch.Tensor) -> tuple:
        return (images,)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def figures(self, image_size: int) -> dict[str, float]:
        return {}


def build_classify(cfg, mesh, dims, device: torch.device) -> Classify:
    return Classify(cfg.trainer.label_smoothing)


# objective.name → builder(cfg, mesh, dims, device); a new objective is a module with a builder here and
# a conf/objective/<name>.yaml.


def build_siglip(cfg, mesh, dims, device: torch.device):
    # Imported when chosen: config.py imports this module, and the siglip evaluator imports config.
    from bigvit.train.siglip import build_siglip as build

    return build(cfg, mesh, dims, device)


OBJECTIVES = {"classify": build_classify, "sigmoid": build_sigmoid, "siglip": build_siglip}


def build_objective(cfg, mesh, dims, device: torch.device) -> Objective:
    """The run's objective: the base loss, wrapped in distillation where `distill.name` asks for it (its
    teacher is built with the run's layout on `mesh`/`dims`, a collective on every rank)."""
    name = cfg.objective.name if cfg.get("objective") is not None else "classify"
    if name not in OBJECTIVES:
        raise ConfigError(f"objective.name={name!r} is not one of {sorted(OBJECTIVES)} (objective=NAME)")
    objective = OBJECTIVES[name](cfg, mesh, dims, device)
    distill = cfg.get("distill")
    name = distill.name if distill is not None else "none"
    if name not in DISTILLATION:
        raise ConfigError(f"distill.name={name!r} is not one of {list(DISTILLATION)}")
    if name == "none":
        return objective
    from bigvit.train.distill import build_distillation  # builds a model: only when asked for

    return build_distillation(objective, cfg, mesh, dims, device)
