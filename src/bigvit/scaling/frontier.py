"""`bigvit-scaling frontier`: for a FLOP budget, the compute-optimal shape and examples, the metric the
laws predict for it, a pasteable bigvit-train line, and (with cluster.*) the layout and days to train.

How the shape is chosen:
- the chinchilla fit L(N, D) of the results decides how to split the budget between model size and
  examples; the budget is exact: C = flops_per_image(shape) x D (scaling/flops.py), not 6·N·D;
- the direction in which the shape grows comes from the shape law of a star sweep in the results
  (each dimension x_k grows as compute^s_k), or with --published-shape from SoViT's exponents
  (s_width 0.22, s_depth 0.45, s_mlp 0.6), or else at the fixed aspect of the reference shape. Along
  that path x_k(λ) = x_k,ref · λ^s_k, every candidate is rounded to a valid ViT (heads dividing the
  width, head_dim near 64) and the one with the lowest predicted metric at this budget wins.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from bigvit.errors import ConfigError
from bigvit.models.registry import model_config
from bigvit.models.vit import ViTConfig
from bigvit.scaling.flops import param_count, train_flops
from bigvit.scaling.laws import fit_law, predict
from bigvit.scaling.results import columns

DIMS = ("width", "depth", "mlp_dim")
# "Getting ViT in Shape" (Alabdulmohsin et al. 2023), ImageNet 10-shot: x_k* ∝ compute^s_k.
SOVIT_EXPONENTS = {"width": 0.22, "depth": 0.45, "mlp_dim": 0.6}
HEAD_DIM = 64
# λ from 1e-3 to 1e9 times the reference: far wider than any budget a results file supports.
LAMBDAS = np.logspace(-3, 9, 1201)


def mode(values):
    return Counter(values).most_common(1)[0][0]


def reference_config(records: list[dict], metric: str) -> ViTConfig:
    """The architecture the path starts from: the best run's (lowest metric), with its non-shape keys."""
    scored = [r for r in records if isinstance(r.get(metric), int | float)]
    best = min(scored, key=lambda r: r[metric]) if scored else records[0]
    if isinstance(best.get("model"), dict):
        return model_config(best["model"])
    # A CSV without the model column: ViT defaults with the row's shape keys.
    keys = ("width", "depth", "mlp_dim", "heads", "patch_size", "image_size")
    return model_config({k: int(best[k]) for k in keys if best.get(k) is not None})


def valid_shape(reference: ViTConfig, width: float, depth: float, mlp_dim: float) -> ViTConfig:
    """A buildable ViT near (width, depth, mlp_dim): heads = round(width / 64) (at least 1), the width a
    multiple of 8 x heads, the MLP a multiple of 16, at least one block."""
    heads = max(1, round(width / HEAD_DIM))
    width = max(8 * heads, round(width / (8 * heads)) * 8 * heads)
    mlp = max(16, round(mlp_dim / 16) * 16)
    return model_config(reference, width=int(width), heads=heads, depth=max(1, round(depth)), mlp_dim=int(mlp))


def shape_direction(
    cols: dict, metric: str, published: bool, bootstrap: int, seed: int
) -> tuple[dict, str, dict | None]:
    """(exponent per dimension, where it came from, the shape fit or None)."""
    try:
        fit = fit_law(cols, "shape", metric=metric, x="compute", bootstrap=bootstrap, seed=seed)
    except ConfigError as error:
        fit, why = None, str(error)
    if fit is not None:
        exponents = {d: fit["params"].get(f"s_{d}", 0.0) for d in DIMS}
        fitted = [d for d in DIMS if f"s_{d}" in fit["params"]]
        return exponents, f"shape law fitted on the star sweep in the results (dims {fitted})", fit
    if published:
        return dict(SOVIT_EXPONENTS), "SoViT's published exponents (--published-shape; no star sweep fitted)", None
    return (
        {d: 1.0 for d in DIMS},
        f"the reference shape at a fixed aspect (no star sweep fitted: {why}); run a star sweep or pass "
        "--published-shape for a compute-optimal aspect",
        None,
    )


def candidates(reference: ViTConfig, exponents: dict) -> list[ViTConfig]:
    """The distinct valid shapes along x_k = x_k,ref · λ^s_k."""
    seen, shapes = set(), []
    for lam in LAMBDAS:
        size = {d: getattr(reference, d) * lam ** exponents[d] for d in DIMS}
        if min(size.values()) < 0.5:
            continue
        cfg = valid_shape(reference, size["width"], size["depth"], size["mlp_dim"])
        key = (cfg.width, cfg.depth, cfg.mlp_dim)
        if key not in seen:
            seen.add(key)
            shapes.append(cfg)
    return shapes


def chinchilla_predict(params: dict, n: np.ndarray, d: np.ndarray) -> np.ndarray:
    return predict("chinchilla", params, {"params": n, "examples_seen": d})


class ShapePath:
    """The valid shapes along the growth path, with their parameters and training FLOPs per image."""

    def __init__(self, reference: ViTConfig, exponents: dict):
        self.reference, self.exponents = reference, exponents
        self.shapes = candidates(reference, exponents)
        self.params = np.array([param_count(s) for s in self.shapes], dtype=float)
        self.flops = np.array([train_flops(s) for s in self.shapes], dtype=float)

    def predicted(self, chinchilla_params: dict, budget: float) -> np.ndarray:
        """The chinchilla prediction of every shape trained on budget / flops_per_image images."""
        return chinchilla_predict(chinchilla_params, self.params, budget / self.flops)

    def best(self, chinchilla_params: dict, budget: float) -> tuple[ViTConfig, float, float]:
        """(shape, params, examples) with the lowest predicted metric at this budget."""
        i = int(np.nanargmin(self.predicted(chinchilla_params, budget)))
        return self.shapes[i], self.params[i], budget / self.flops[i]


def fitted_path(records: list[dict], metric: str, published: bool, bootstrap: int, seed: int):
    """(chinchilla fit, ShapePath, exponent source, shape fit or None) of a results table."""
    cols = columns(records)
    chinchilla = fit_law(cols, "chinchilla", metric=metric, bootstrap=bootstrap, seed=seed)
    exponents, source, shape_fit = shape_direction(cols, metric, published, bootstrap, seed)
    return chinchilla, ShapePath(reference_config(records, metric), exponents), source, shape_fit


def interval(chinchilla: dict, n: float, d: float) -> list[float] | None:
    """95% interval of the predicted metric over the chinchilla fit's bootstrap draws."""
    samples = chinchilla.get("samples") or {}
    if not samples:
        return None
    draws = len(next(iter(samples.values())))
    values = [
        chinchilla_predict({k: v[i] for k, v in samples.items()}, np.array([n]), np.array([d]))[0]
        for i in range(draws)
    ]
    return [float(np.nanpercentile(values, 2.5)), float(np.nanpercentile(values, 97.5))]


def plan_overrides(overrides: list[str]) -> tuple[list[str], int | None]:
    """(the planner's overrides without data.batch_size, data.batch_size if given)."""
    batch, rest = None, []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{item!r} is not KEY=VALUE; frontier takes cluster.*, plan.*, data.batch_size=...")
        if key == "data.batch_size":
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"data.batch_size={value!r} must be a positive integer (the global batch)")
            batch = int(value)
        else:
            rest.append(item)
    return rest, batch


def layout_plan(shape: ViTConfig, overrides: list[str], batch: int, steps: int) -> dict | None:
    """The planner's recommendation for `shape` on the cluster in `overrides` (None without cluster.gpus)."""
    from bigvit.scaling.plan_cli import layout_label, run_planner
    from bigvit.scaling.sweep import compose_config

    if not any(o.startswith("cluster.gpus=") for o in overrides):
        return None
    cfg = compose_config("plan", [*overrides, f"data.batch_size={batch}"], "the planner's overrides")
    report = run_planner(cfg, shape)
    best = next((c for c in report["candidates"] if c["name"] == report["recommended"]), None)
    result = {"cluster": report["cluster"], "recommended": report["recommended"], "precision": report["precision"]}
    if best is None:
        return {**result, "fits": False}
    step_s = best["time"]["step_s"]
    return {
        **result,
        "fits": True,
        "layout": layout_label(best),
        "micro_batch": best["micro_batch"],
        "grad_accum": best["grad_accum"],
        "memory_gib": best["memory"]["total_bytes"] / 2**30,
        "step_s": step_s,
        "images_per_s": best["time"]["images_per_s"],
        "mfu": best["time"]["mfu"],
        "days": steps * step_s / 86400,
    }


def frontier(
    records: list[dict],
    budget: float,
    metric: str = "eval_error",
    published_shape: bool = False,
    overrides: list[str] | tuple = (),
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """The whole report as a JSON-ready dict (format_frontier prints it)."""
    if not math.isfinite(budget) or budget <= 0:
        raise ConfigError(f"--budget={budget} must be a positive number of training FLOPs (e.g. 1e21)")
    chinchilla, path, source, shape_fit = fitted_path(records, metric, published_shape, bootstrap, seed)
    shape, n, d = path.best(chinchilla["params"], budget)
    overrides, batch = plan_overrides(list(overrides))
    batch = batch or int(mode([r["batch_size"] for r in records if r.get("batch_size")] or [reference_batch(records)]))
    compute_seen = columns(records).get("compute")
    steps = math.ceil(d / batch)
    predicted = float(chinchilla_predict(chinchilla["params"], np.array([n]), np.array([d]))[0])
    line = (
        f"bigvit-train model.width={shape.width} model.depth={shape.depth} model.mlp_dim={shape.mlp_dim} "
        f"model.heads={shape.heads} trainer.max_steps={steps} data.batch_size={batch}"
    )
    return {
        "budget": budget,
        "metric": metric,
        "params": int(n),
        "examples": float(d),
        "shape": {"width": shape.width, "depth": shape.depth, "mlp_dim": shape.mlp_dim, "heads": shape.heads,
                  "patch_size": shape.patch_size, "image_size": shape.image_size},  # fmt: skip
        "flops_per_image": train_flops(shape),
        "steps": steps,
        "batch_size": batch,
        "predicted": predicted,
        "predicted_ci95": interval(chinchilla, n, d),
        "shape_source": source,
        "exponents": path.exponents,
        "reference": path.reference.name,
        "chinchilla": {k: chinchilla[k] for k in ("params", "ci95", "points", "rmse_log")},
        "shape_fit": None if shape_fit is None else {k: shape_fit[k] for k in ("params", "ci95", "points")},
        "extrapolation": None if compute_seen is None else float(budget / np.nanmax(compute_seen)),
        "command": line,
        "plan": layout_plan(shape, overrides, batch, steps),
    }


def reference_batch(records: list[dict]) -> int:
    with_batch = [r for r in records if r.get("examples_seen") and r.get("steps")]
    if not with_batch:
        raise ConfigError("the results hold no batch_size (nor examples_seen and steps): give data.batch_size=B")
    return round(with_batch[0]["examples_seen"] / with_batch[0]["steps"])


def format_frontier(report: dict) -> str:
    ci = report["predicted_ci95"]
    band = f" (95% interval {ci[0]:.4g} – {ci[1]:.4g})" if ci else ""
    s = report["shape"]
    lines = [
        f"budget {report['budget']:.3g} training FLOPs → {report['params'] / 1e6:.3g} M parameters × "
        f"{report['examples']:.3g} examples ({report['steps']:,} steps of {report['batch_size']})",
        f"shape: width {s['width']}, depth {s['depth']}, MLP {s['mlp_dim']}, {s['heads']} heads, patch "
        f"{s['patch_size']} at {s['image_size']} px; {report['flops_per_image'] / 1e9:.3g} GFLOP per training image",
        f"  from {report['shape_source']}",
        f"predicted {report['metric']}: {report['predicted']:.4g}{band}",
    ]
    if report["extrapolation"] and report["extrapolation"] > 10:
        lines.append(
            f"  the budget is {report['extrapolation']:.3g}× the largest run in the results: an extrapolation"
        )
    lines += ["", report["command"]]
    plan = report["plan"]
    if plan is not None:
        c = plan["cluster"]
        where = f"{c['gpus']} × {c['gpu']} ({c['nodes']} nodes)"
        if not plan["fits"]:
            lines.append(f"plan on {where}: no layout fits this shape in GPU memory")
        else:
            lines.append(
                f"plan on {where}: {plan['layout']}, micro-batch {plan['micro_batch']}×{plan['grad_accum']}, "
                f"{plan['memory_gib']:.1f} GiB/GPU, step {plan['step_s']:.3g} s, {plan['images_per_s']:.0f} img/s, "
                f"MFU {plan['mfu']:.1%} → {plan['days']:.3g} days to train"
            )
    return "\n".join(lines)
