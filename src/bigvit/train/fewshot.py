"""Few-shot linear evaluation, as big_vision's `fewshot_lsr` evaluator: pre-logit features of the frozen
model, a closed-form ridge regression on k examples per class from the training split, top-1 error on the
held-out split.

Features are whitened with the support set's mean and std, get a constant bias feature (large, so the
ridge barely shrinks the bias) and regress onto ±1 one-hot targets; each k is averaged over seeded draws.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from bigvit.config import check_number, check_positive
from bigvit.errors import ConfigError
from bigvit.parallel.distributed import all_reduce

log = logging.getLogger("bigvit")

BIAS_CONSTANT = 100.0  # big_vision's value
DEFAULTS = {"shots": [1, 5, 10, 25], "draws": 3, "ridge": 1024.0, "seed": 0}  # ridge 2**10 as big_vision


def whitened(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x − mean)/std with the constant bias feature appended: (N, D) → (N, D+1)."""
    x = (x - mean) / std
    return torch.cat([x, x.new_full((x.shape[0], 1), BIAS_CONSTANT)], dim=1)


def ridge_weights(x: torch.Tensor, targets: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_w |x w − targets|² + ridge |w|², float64, through the smaller of the two normal systems:
    (xᵀx + λI)⁻¹ xᵀy when N ≥ D, xᵀ(x xᵀ + λI)⁻¹ y when D > N (few shots, wide features)."""
    x, targets = x.double(), targets.double()
    n, d = x.shape
    if n >= d:
        return torch.linalg.solve(x.T @ x + ridge * torch.eye(d, dtype=x.dtype), x.T @ targets)
    return x.T @ torch.linalg.solve(x @ x.T + ridge * torch.eye(n, dtype=x.dtype), targets)


def fit_predict(
    support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, num_classes: int, ridge: float
) -> torch.Tensor:
    """Predicted classes of the query features from a ridge probe fit on the support set."""
    support_x, query_x = support_x.double(), query_x.double()
    mean = support_x.mean(dim=0, keepdim=True)
    std = support_x.std(dim=0, unbiased=False, keepdim=True) + 1e-5
    targets = 2.0 * torch.nn.functional.one_hot(support_y, num_classes).double() - 1.0
    weights = ridge_weights(whitened(support_x, mean, std), targets, ridge)
    return (whitened(query_x, mean, std) @ weights).argmax(dim=1)


def draw_support(
    labels: torch.Tensor, shots: int, num_classes: int, generator: torch.Generator
) -> torch.Tensor:
    """Indices of `shots` examples of each class (all of a class that has fewer), drawn with `generator`."""
    picked = []
    for cls in range(num_classes):
        members = (labels == cls).nonzero().flatten()
        picked.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return torch.cat(picked)


def fewshot_errors(
    support: tuple[torch.Tensor, torch.Tensor],
    query: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    shots: Iterable[int] = (1, 5, 10, 25),
    draws: int = 3,
    ridge: float = 1024.0,
    seed: int = 0,
) -> dict[int, float]:
    """{k: top-1 error on the query set, averaged over `draws` seeded draws of k examples per class}."""
    (pool_x, pool_y), (query_x, query_y) = support, query
    errors = {}
    for k in shots:
        total = 0.0
        for draw in range(draws):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + k * 1_009 + draw)
            chosen = draw_support(pool_y, k, num_classes, generator)
            predicted = fit_predict(pool_x[chosen], pool_y[chosen], query_x, num_classes, ridge)
            total += (predicted != query_y).double().mean().item()
        errors[k] = total / draws
    return errors


def check_fewshot(cfg) -> dict:
    """`fewshot.*` with defaults filled in, checked."""
    settings = {**DEFAULTS, **(dict(cfg) if cfg is not None else {})}
    shots = list(settings["shots"])
    if not shots or not all(isinstance(k, int) and k > 0 for k in shots):
        raise ConfigError(
            f"fewshot.shots={shots!r} must be a non-empty list of positive integers, e.g. [1, 5, 10, 25]"
        )
    check_positive("fewshot.draws", settings["draws"])
    check_number("fewshot.ridge", settings["ridge"], 0.0, open_low=True)
    return {**settings, "shots": shots}


def lockstep_batches(loader: Iterable[dict], device: torch.device) -> Iterator[dict | None]:
    """The batches of this rank's part of a pass, then None while other ranks still have batches: sharded
    forwards are collectives every rank must join (the caller feeds a filler batch for a None)."""
    batches = iter(loader)
    while True:
        batch = next(batches, None)
        more = all_reduce(torch.tensor([float(batch is not None)], device=device), op="max")
        if not more.item():
            return
        yield batch


def filled_batches(loader: Iterable[dict], device: torch.device) -> Iterator[tuple[dict, bool]]:
    """(batch, real) for each batch of `lockstep_batches`: once this rank has run out, a one-row copy of its
    last batch (real=False) stands in for the None, so it still joins every sharded forward."""
    filler = None
    for batch in lockstep_batches(loader, device):
        real = batch is not None
        batch = batch if real else filler
        filler = {k: v[:1] for k, v in batch.items() if torch.is_tensor(v)}
        yield batch, real


def from_each_group(local, group_size: int = 1) -> list:
    """Every rank's `local` (CPU tensors, None for nothing) from the first rank of each `group_size` block
    (a tp×cp group, whose ranks saw the same samples), in rank order, on every rank (a collective)."""
    if not dist.is_initialized():
        return [local] if local is not None else []
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local if dist.get_rank() % group_size == 0 else None)  # our own tensors
    return [part for part in everyone if part is not None]


def image_keys(images: torch.Tensor) -> torch.Tensor:
    """An exact integer fingerprint of each image (its float bits, hashed by an integer dot product that no
    summation order changes): the canonical order of a pass, whatever layout and batches produced it."""
    bits = images.float().contiguous().flatten(1).view(torch.int32).long() % 65521
    weights = torch.randint(1, 65521, (bits.shape[1],), generator=torch.Generator().manual_seed(0))
    return (bits * weights.to(bits.device)).sum(dim=1).cpu()


@torch.no_grad()
def collect_features(
    loader: Iterable[dict],
    prepare: Callable[[dict, torch.device], tuple[torch.Tensor, torch.Tensor]],
    forward: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    group_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) on the CPU of every sample of a pass, from all ranks (collective), in an order
    that depends on the images only (so seeded draws pick the same samples under any layout). Ranks of one
    `group_size` block (a tp×cp group) see the same samples: only each block's first rank contributes."""
    features, labels, keys = [], [], []
    for batch, real in filled_batches(loader, device):
        images, batch_labels = prepare(batch, device)
        out = forward(images).float()
        if real:
            keep = batch_labels >= 0  # a batch of skip counts alone carries no samples
            features.append(out[keep].cpu())
            labels.append(batch_labels[keep].cpu())
            keys.append(image_keys(images[keep]))
    local = (torch.cat(features), torch.cat(labels), torch.cat(keys)) if features else None
    parts = from_each_group(local, group_size)
    if not parts:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    order = torch.cat([p[2] for p in parts]).argsort(stable=True)
    return torch.cat([p[0] for p in parts])[order], torch.cat([p[1] for p in parts])[order]


def feature_model(module: torch.nn.Module):
    """The model inside a (possibly wrapped) module that has the `features_only` switch."""
    for candidate in module.modules():
        if hasattr(candidate, "features_only"):
            return candidate
    raise ConfigError("few-shot evaluation needs a bigvit ViT (a module with `features_only`)")


class FewShotEvaluation:
    """The trainer's few-shot probe: `fewshot_{k}shot_error` for each configured k."""

    def __init__(self, cfg, num_classes: int, data, data_kind: str):
        self.settings, self.num_classes = check_fewshot(cfg), num_classes
        if data.make_support is None or data.make_eval is None:  # refused at start-up, not at the first probe
            missing = "evaluation split" if data.make_eval is None else "support pass over its training split"
            raise ConfigError(
                f"trainer.fewshot_every needs a training and an evaluation split; data.kind={data_kind} has no "
                f"{missing}: set trainer.fewshot_every=0"
            )

    def __call__(self, trainer) -> dict:
        data = trainer.data
        vit = feature_model(trainer.engine.model)
        group = trainer.dims.cp * trainer.dims.tp
        vit.features_only = True
        try:
            support = collect_features(
                data.make_support(), data.eval_batch, trainer.engine.forward, trainer.env.device, group
            )
            query = collect_features(
                data.make_eval(), data.eval_batch, trainer.engine.forward, trainer.env.device, group
            )
        finally:
            vit.features_only = False
        errors = errors_for(self.settings, support, query, self.num_classes)
        log.info(
            "few-shot step %d | %s | %d support, %d query samples",
            trainer.step,
            " | ".join(f"{k}-shot error {e:.4f}" for k, e in errors.items()),
            len(support[1]),
            len(query[1]),
        )
        counts = {"fewshot_support_samples": len(support[1]), "fewshot_query_samples": len(query[1])}
        return {**{f"fewshot_{k}shot_error": e for k, e in errors.items()}, **counts}


def errors_for(settings: dict, support, query, num_classes: int) -> dict[int, float]:
    s = settings
    return fewshot_errors(support, query, num_classes, s["shots"], s["draws"], float(s["ridge"]), s["seed"])
