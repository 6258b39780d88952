"""objective=sigmoid: each class a yes/no question (JFT-style multi-label training, big_vision's sigmoid_xent).

    loss = mean over the batch of  Σ_k  −[y_k log σ(x_k) + (1 − y_k) log(1 − σ(x_k))]

Targets are multi-hot rows (data.targets=labels; class numbers are one-hot encoded first), mixed linearly
under mixup/cutmix. trainer.label_smoothing s smooths them as timm's BinaryCrossEntropy does:
y·(1 − s) + s/K. The head's bias starts at model.head_bias_init (−10 in conf/objective/sigmoid.yaml), so
every class starts unlikely, as the labels of a large label set are. Evaluation (`evaluator`) reports
precision@1 as eval_top1, the loss, and per-label precision and recall at p = 0.5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bigvit.errors import ConfigError


def multi_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float (B, K) targets: multi-hot rows (or mixup's mixtures) as they are, class numbers (B,) one-hot."""
    return labels.float() if labels.dim() == 2 else F.one_hot(labels, num_classes).float()


def sigmoid_xent(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample sigmoid cross-entropy, summed over classes: float32 (B,), numerically stable."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none").sum(-1)


class Sigmoid:
    """Sigmoid binary cross-entropy summed over the K classes, averaged over the batch."""

    def __init__(self, num_classes: int, label_smoothing: float = 0.0):
        self.num_classes, self.label_smoothing = num_classes, label_smoothing

    def inputs(self, images: torch.Tensor, targets: torch.Tensor) -> tuple:
        return (images,)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        targets = multi_hot(labels, self.num_classes)
        if self.label_smoothing:
            targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_classes
        return sigmoid_xent(logits, targets).mean()

    def figures(self, image_size: int) -> dict[str, float]:
        return {}

    @torch.no_grad()
    def evaluator(self, trainer) -> dict:
        """Over the whole held-out set, each sample once across ranks: eval_top1 (precision@1: the top-scored
        class is one of the image's labels), eval_loss (the unsmoothed sigmoid loss), eval_samples, and at
        p = σ(logit) > 0.5 eval_precision/<k> for every label k (0 where k is never predicted), their mean
        eval_precision, and eval_recall, the mean recall over the labels the set holds."""
        k = self.num_classes
        # hits@1, samples, summed loss, then per label: true positives, predicted, actual (fp64: exact counts)
        sums = torch.zeros(3 + 3 * k, device=trainer.env.device, dtype=torch.float64)
        loader = trainer.data.make_eval()
        for images, labels in trainer.held_out_batches(loader):
            logits = trainer.engine.forward(*self.inputs(images, labels)).float()
            targets = multi_hot(labels.clamp(min=0), k)
            valid = (labels >= 0).reshape(len(labels), -1).all(-1)  # filler rows are all -1
            logits, targets = logits[valid], targets[valid]
            predicted = logits > 0
            sums[0] += targets.gather(1, logits.argmax(-1, keepdim=True)).sum()
            sums[1] += valid.sum()
            sums[2] += sigmoid_xent(logits, targets).sum()
            sums[3 : 3 + k] += (predicted & (targets > 0.5)).sum(0)
            sums[3 + k : 3 + 2 * k] += predicted.sum(0)
            sums[3 + 2 * k :] += (targets > 0.5).sum(0)
        sums = trainer.summed_over_ranks(sums)
        return {**self.scores(sums), **trainer.skip_counts(loader)}

    def scores(self, sums: torch.Tensor) -> dict:
        k = self.num_classes
        hits, predicted, actual = sums[3 : 3 + k], sums[3 + k : 3 + 2 * k], sums[3 + 2 * k :]
        precision = torch.where(predicted > 0, hits / predicted.clamp(min=1), 0.0)
        present = actual > 0
        recall = (hits[present] / actual[present]).mean() if present.any() else torch.zeros(())
        samples = sums[1].clamp(min=1)
        return {
            "eval_top1": (sums[0] / samples).item(),
            "eval_loss": (sums[2] / samples).item(),
            "eval_samples": int(sums[1].item()),
            "eval_precision": precision.mean().item(),
            "eval_recall": recall.item(),
            **{f"eval_precision/{label}": value for label, value in enumerate(precision.tolist())},
        }


def build_sigmoid(cfg, mesh, dims, device: torch.device) -> Sigmoid:
    distill = cfg.get("distill")
    if distill is not None and distill.name != "none":
        # The soft term is a softmax KL, which does not describe independent per-class probabilities.
        raise ConfigError(
            f"distill.name={distill.name!r} distils softmax outputs, which objective=sigmoid does not train; "
            "use distill=none with objective=sigmoid, or objective=classify"
        )
    return Sigmoid(int(cfg.model.num_classes), float(cfg.trainer.label_smoothing))
