"""Scaling-law fits behind `bigvit-scaling`: four laws, fitted in log space, with bootstrap intervals.

The laws (parameter names are the keys of the fitted document):

- ``power``: E = a·x^(−b).
- ``zhai`` (Zhai et al. 2022): E = c + a·(x + d)^(−b); c is the irreducible error, d the low-compute shift.
- ``chinchilla`` (Hoffmann et al. 2022): L = E + A/N^alpha + B/D^beta, N = column ``params``,
  D = column ``examples_seen``.
- ``shape`` (Alabdulmohsin et al. 2023, SoViT): for each shape dimension k in (width, depth, mlp_dim) that a
  star sweep varies, f_k = alpha_k·x_k^(−a_k) + (beta_k·x_k^(b_k) + xi)·t^(−c) + epsilon, t = compute, with
  xi, c, epsilon shared by the dimensions; s_k = c/(a_k + b_k) is the exponent of the compute-optimal
  value x_k* ∝ t^(s_k).

Fitting: every residual is log(observed) − log(predicted) (a relative error; scaling data spans decades).
``power`` is a linear regression in log–log; ``zhai`` and ``shape`` are bounded least squares
(scipy's trust-region-reflective ``least_squares`` with analytic Jacobians) from the best few points of a
start grid; ``chinchilla`` minimises the Huber loss (δ = 1e-3) of the residuals with the prediction written
as logsumexp(a − alpha·log N, b − beta·log D, e), by L-BFGS-B with an analytic gradient from the best few
points of a start grid, as Hoffmann et al. did. Internally x (and N, D, t, shape values) are divided by a
reference value for conditioning; reported parameters are in the columns' own units.

Intervals: a bootstrap over points (rows drawn with replacement), each resample refitted from the
full-data fit; 95% percentile intervals. Resamples that cannot be fitted (a degenerate draw, no
convergence) are counted in ``failed`` and left out; more than half failing is an error. Resamples whose
estimate lands on a bound are kept (the bound is part of the estimator) and counted in ``at_bound``.

Bad input raises ConfigError with a one-line message; so does a full-data fit that does not converge or
whose parameter sits on a bound (a bound reached means the data do not identify that parameter).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable

import numpy as np
from scipy.optimize import least_squares, minimize, nnls
from scipy.special import logsumexp
from threadpoolctl import threadpool_limits

from bigvit.errors import ConfigError

LAWS: tuple[str, ...] = ("power", "zhai", "chinchilla", "shape")
SHAPE_DIMS: tuple[str, ...] = ("width", "depth", "mlp_dim")
EXPONENT_MAX = 5.0  # no scaling exponent in the literature is near 5; reaching it means a degenerate fit
HUBER_DELTA = 1e-3  # Hoffmann et al.'s δ
LOG_RANGE = 25.0  # log coefficients may range this far beyond the data's scale (e^25 ≈ 7e10)
MAX_EVALUATIONS = 3000  # per full-data fit; a warm-started bootstrap refit gets a tenth
BOUND_RTOL = 1e-4  # a parameter within this fraction of its scale from a bound sits on it (trf only nears a bound)
STARTS_KEPT = 4  # the best grid points that are refined; the grids are evaluated in one vectorised pass


class _FitFailed(Exception):
    """A fit (or a bootstrap resample) that produced no estimate; the message says why."""


# ----------------------------------------------------------------------------------------------------------
# Input columns


def law_columns(law: str, metric: str, x: str) -> list[str]:
    """The columns a law reads: for power and zhai x and the metric; chinchilla ignores x."""
    _check_law(law)
    if law == "chinchilla":
        return ["params", "examples_seen", metric]
    if law == "shape":
        return [*SHAPE_DIMS, x, metric]
    return [x, metric]


def _check_law(law: str) -> None:
    if law not in LAWS:
        raise ConfigError(f"unknown law {law!r}; the laws are: {', '.join(LAWS)}")


def _positive_column(columns: dict, name: str, law: str) -> np.ndarray:
    """The column as floats, every row positive and finite (the fits take logs)."""
    if name not in columns:
        have = ", ".join(sorted(columns)) or "none"
        raise ConfigError(f"the {law} law needs column {name!r}, which is missing; the columns are: {have}")
    raw = list(columns[name])
    try:
        values = np.asarray([math.nan if v is None else v for v in raw], dtype=float)
    except (TypeError, ValueError):
        values = np.asarray([_float_or_nan(v) for v in raw])
    bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
    if bad.size:
        i = int(bad[0])
        raise ConfigError(
            f"column {name!r} row {i} holds {_shown(raw[i])}; the {law} law needs positive finite values there "
            f"({bad.size} such row{'s' if bad.size > 1 else ''}: filter them out)"
        )
    return values


def _shown(v) -> str:
    """A cell as the user wrote it: numbers plainly (numpy scalars too), anything else by repr."""
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
        return repr(float(v))
    return repr(v)


def _float_or_nan(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _usable_columns(columns: dict, law: str, names: list[str]) -> dict[str, np.ndarray]:
    out = {name: _positive_column(columns, name, law) for name in names}
    lengths = {name: len(v) for name, v in out.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"the {law} law's columns differ in length: {lengths}")
    return out


def _require_points(law: str, n: int, n_params: int, held: int = 0) -> None:
    need = n_params + 2
    if n - held < need:
        got = f"holdout={held} leaves {n - held} of {n} points" if held else f"got {n} usable points"
        raise ConfigError(f"the {law} law has {n_params} parameters and needs at least {need} points; {got}")


def _require_distinct(law: str, name: str, values: np.ndarray, need: int, why: str = "") -> None:
    distinct = np.unique(values)
    if distinct.size < need:
        shown = ", ".join(f"{v:g}" for v in distinct[:5])
        raise ConfigError(
            f"the {law} law needs at least {need} distinct values of {name!r}, got {distinct.size} ({shown})"
            + (f"; {why}" if why else "")
        )


def _distinct_count(values: np.ndarray, w: np.ndarray) -> int:
    return np.unique(values[w > 0]).size


# ----------------------------------------------------------------------------------------------------------
# Shared optimisation helpers


def _bounded_least_squares(residual, jacobian, theta0, lower, upper, max_nfev: int):
    """trf least squares from theta0 (moved strictly inside the bounds); raises _FitFailed if not converged."""
    span = upper - lower
    inset = np.where(np.isfinite(span), 1e-9 * span, 1e-9)
    start = np.clip(theta0, lower + inset, upper - inset)
    res = least_squares(
        residual, start, jac=jacobian, bounds=(lower, upper), method="trf", x_scale="jac",
        max_nfev=max_nfev, xtol=1e-10, ftol=1e-12, gtol=1e-10,
    )
    if res.status <= 0 or not np.isfinite(res.cost):
        raise _FitFailed(f"did not converge after {res.nfev} evaluations ({res.message})")
    return res.x, 2 * res.cost


def _best_fit(fit_one: Callable, starts: np.ndarray) -> np.ndarray:
    """theta of the lowest-cost fit over the starts; only if every start fails does the fit fail."""
    fits, failure = [], None
    for start in starts:
        try:
            fits.append(fit_one(start))
        except _FitFailed as err:
            failure = err
    if not fits:
        raise failure
    return min(fits, key=lambda f: f[1])[0]


def _best_rows(costs: np.ndarray, k: int) -> np.ndarray:
    order = np.argsort(np.where(np.isfinite(costs), costs, np.inf))
    return order[: min(k, int(np.isfinite(costs).sum()) or 1)]


def _on_bound(theta, lower, upper, scale) -> list[tuple[int, str]]:
    """(index, "lower"|"upper") for each parameter within BOUND_RTOL·scale of a bound."""
    hits = []
    for i, (v, lo, hi, s) in enumerate(zip(theta, lower, upper, scale, strict=True)):
        if np.isfinite(lo) and v - lo <= BOUND_RTOL * s:
            hits.append((i, "lower"))
        elif np.isfinite(hi) and hi - v <= BOUND_RTOL * s:
            hits.append((i, "upper"))
    return hits


class _Law:
    """What the driver needs of a law; subclasses fix their normalisation from validated columns."""

    name: str
    keys: tuple[str, ...]  # reported parameters, in the order of theta
    n_params: int
    y: np.ndarray  # the metric, one entry per row

    def bounds(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def bound_scale(self) -> np.ndarray:
        """Per parameter of theta, the scale against which "within BOUND_RTOL of a bound" is measured."""
        return np.ones(len(self.keys))

    def bound_text(self, i: int, side: str, bound: float) -> str:
        return f"{bound:g}"

    def advice(self, i: int, side: str) -> str:
        raise NotImplementedError

    def bound_issue(self, theta: np.ndarray) -> str | None:
        """A one-line refusal for the first parameter of the full-data fit that sits on a bound, or None."""
        lower, upper = self.bounds(np.ones(self.y.size))
        for i, side in _on_bound(theta, lower, upper, self.bound_scale()):
            bound = (lower if side == "lower" else upper)[i]
            return f"{self.keys[i]} sits at its {side} bound {self.bound_text(i, side, bound)}: {self.advice(i, side)}"
        return None

    def on_bound(self, theta: np.ndarray, w: np.ndarray) -> bool:
        lower, upper = self.bounds(w)
        return bool(_on_bound(theta, lower, upper, self.bound_scale()))


class _LeastSquaresLaw(_Law):
    """A law fitted by bounded least squares on log residuals, weighted by each row's bootstrap count."""

    def _residual_and_jacobian(self, sw: np.ndarray) -> tuple[Callable, Callable]:
        raise NotImplementedError

    def _starts(self, w: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _residual_weights(self, w: np.ndarray) -> np.ndarray:
        return w

    def fit(self, w: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
        """theta minimising the weighted squared log residuals: from `start` alone (a bootstrap refit) or
        from the best of the start grid."""
        lower, upper = self.bounds(w)
        residual, jacobian = self._residual_and_jacobian(np.sqrt(self._residual_weights(w)))

        def fit_from(theta0, budget=MAX_EVALUATIONS):
            return _bounded_least_squares(residual, jacobian, theta0, lower, upper, budget)

        if start is not None:
            return fit_from(start, MAX_EVALUATIONS // 10)[0]
        return _best_fit(fit_from, self._starts(w, lower, upper))


def _log_bound_text(metric: str, side: str) -> str:
    return f"(e^{LOG_RANGE:g} times {'below min' if side == 'lower' else 'above max'}({metric}))"


# ----------------------------------------------------------------------------------------------------------
# The laws. Each takes validated columns, fixes its normalisation, and offers: check_design(w) (raises
# _FitFailed for a draw that cannot identify the law), fit(w, start) -> theta (internal units), bound_issue
# (a message or None), report(theta) -> params in the columns' units, residuals(theta) -> log residuals.


class _PowerLaw(_Law):
    name = "power"
    keys = ("a", "b")

    def __init__(self, cols: dict[str, np.ndarray], metric: str, x: str):
        self.x_name, self.metric = x, metric
        self.x, self.y = cols[x], cols[metric]
        self.x_ref = float(np.exp(np.mean(np.log(self.x))))
        self.lx, self.ly = np.log(self.x / self.x_ref), np.log(self.y)
        self.n_params = 2

    def check_design(self, w: np.ndarray) -> None:
        if _distinct_count(self.x, w) < 2:
            raise _FitFailed(f"a single distinct {self.x_name}")

    def fit(self, w: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
        # Weighted linear regression of log E on log x: log E = la − b·log(x/x_ref).
        mx, my = np.average(self.lx, weights=w), np.average(self.ly, weights=w)
        sxx = np.sum(w * (self.lx - mx) ** 2)
        if sxx <= 0:
            raise _FitFailed(f"a single distinct {self.x_name}")
        slope = np.sum(w * (self.lx - mx) * (self.ly - my)) / sxx
        return np.array([my - slope * mx, -slope])

    def bounds(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """theta = (log a', b); the regression is unbounded, so a b beyond its bounds is caught afterwards."""
        return np.array([-np.inf, 0.0]), np.array([np.inf, EXPONENT_MAX])

    def advice(self, i: int, side: str) -> str:
        if side == "lower":
            return f"{self.metric} does not fall as {self.x_name} grows (b = fitted slope); check the points"
        return f"the fit is degenerate; check the units of {self.x_name}"

    def report(self, theta: np.ndarray) -> dict[str, float]:
        la, b = theta
        return {"a": float(np.exp(la + b * math.log(self.x_ref))), "b": float(b)}

    def residuals(self, theta: np.ndarray) -> np.ndarray:
        return self.ly - (theta[0] - theta[1] * self.lx)


class _ZhaiLaw(_LeastSquaresLaw):
    name = "zhai"
    keys = ("c", "a", "d", "b")

    def __init__(self, cols: dict[str, np.ndarray], metric: str, x: str):
        self.x_name, self.metric = x, metric
        self.x, self.y = cols[x], cols[metric]
        # x in units of the smallest x: d is then O(1) when the low-compute bend is inside the data.
        self.x_ref = float(self.x.min())
        self.u, self.ly = self.x / self.x_ref, np.log(self.y)
        self.n_params = 4

    def check_design(self, w: np.ndarray) -> None:
        if _distinct_count(self.x, w) < 4:
            raise _FitFailed(f"fewer than 4 distinct values of {self.x_name}")

    def bounds(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """theta = (c, log a', d', b); c < min E (the floor lies below every point), 0 ≤ d ≤ max x."""
        y = self.y[w > 0]
        lo_a, hi_a = math.log(y.min()) - LOG_RANGE, math.log(y.max()) + LOG_RANGE
        lower = np.array([0.0, lo_a, 0.0, 0.0])
        upper = np.array([y.min(), hi_a, self.u[w > 0].max(), EXPONENT_MAX])
        return lower, upper

    def _predict(self, theta: np.ndarray, u: np.ndarray) -> np.ndarray:
        c, la, d, b = theta
        return c + np.exp(la - b * np.log(u + d))

    def _residual_and_jacobian(self, sw: np.ndarray) -> tuple[Callable, Callable]:
        def residual(theta):
            return sw * (self.ly - np.log(self._predict(theta, self.u)))

        def jacobian(theta):
            c, la, d, b = theta
            log_ud = np.log(self.u + d)
            power = np.exp(la - b * log_ud)
            pred = c + power
            dpred = np.stack([np.ones_like(pred), power, -b * power / (self.u + d), -power * log_ud], axis=1)
            return -(sw / pred)[:, None] * dpred

        return residual, jacobian

    def _starts(self, w: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
        """A grid over (c, d, b) with log a' solved in closed form; the few lowest-cost rows."""
        c0, d0, b0 = np.meshgrid(
            [0.0, 0.5 * upper[0], 0.9 * upper[0]], [0.0, 0.3, 3.0], [0.15, 0.4, 1.0], indexing="ij"
        )
        c0, d0, b0 = c0.ravel()[:, None], np.minimum(d0.ravel(), upper[2])[:, None], b0.ravel()[:, None]
        excess = np.log(np.maximum(self.y - c0, 1e-300))
        la0 = np.average(excess + b0 * np.log(self.u + d0), weights=w, axis=1)[:, None]
        pred = c0 + np.exp(la0 - b0 * np.log(self.u + d0))
        costs = np.sum(w * (self.ly - np.log(pred)) ** 2, axis=1)
        grid = np.hstack([c0, np.clip(la0, lower[1], upper[1]), d0, b0])
        return grid[_best_rows(costs, STARTS_KEPT)]

    def bound_scale(self) -> np.ndarray:
        return np.array([self.y.min(), 1.0, 1.0, 1.0])

    def bound_text(self, i: int, side: str, bound: float) -> str:
        if i == 0 and side == "upper":
            return f"min({self.metric})={bound:.4g}"
        if i == 1:
            return _log_bound_text(self.metric, side)
        if i == 2 and side == "upper":
            return f"max({self.x_name})={bound * self.x_ref:.4g}"
        return f"{bound:g}"

    def advice(self, i: int, side: str) -> str:
        return {
            (0, "lower"): "these points show no saturation; try --law power",
            (0, "upper"): "the fitted floor reaches the best point (the curve is flat at the top end); "
                          "drop the saturated points or add points between",
            (1, "lower"): "the compute term vanishes; check the points",
            (1, "upper"): "the compute term diverges; check the points",
            (2, "lower"): f"these points show no low-compute bend, so d is not identified; add points at smaller "
                          f"{self.x_name}, or try --law power if they show no saturation either",
            (2, "upper"): f"the points show no power-law regime; add points at larger {self.x_name}",
            (3, "lower"): f"{self.metric} does not fall with {self.x_name}",
            (3, "upper"): f"the fit is degenerate; check the units of {self.x_name} or try --law power",
        }[(i, side)]

    def report(self, theta: np.ndarray) -> dict[str, float]:
        c, la, d, b = theta
        return {"c": float(c), "a": float(np.exp(la + b * math.log(self.x_ref))), "d": float(d * self.x_ref),
                "b": float(b)}

    def residuals(self, theta: np.ndarray) -> np.ndarray:
        return self.ly - np.log(self._predict(theta, self.u))


class _ChinchillaLaw(_Law):
    name = "chinchilla"
    keys = ("A", "alpha", "B", "beta", "E")  # theta's order; reported as E, A, alpha, B, beta

    def __init__(self, cols: dict[str, np.ndarray], metric: str, x: str):
        self.metric = metric
        self.N, self.D, self.y = cols["params"], cols["examples_seen"], cols[metric]
        # log N and log D about their geometric means: a and alpha are otherwise nearly collinear.
        self.logN0, self.logD0 = float(np.mean(np.log(self.N))), float(np.mean(np.log(self.D)))
        self.lN, self.lD = np.log(self.N) - self.logN0, np.log(self.D) - self.logD0
        self.ly = np.log(self.y)
        self.n_params = 5

    def check_design(self, w: np.ndarray) -> None:
        for name, v in (("params", self.N), ("examples_seen", self.D)):
            if _distinct_count(v, w) < 3:
                raise _FitFailed(f"fewer than 3 distinct values of {name!r}")

    def bounds(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """theta = (a', alpha, b', beta, e): a', b' are the log terms at the reference N and D."""
        lo, hi = math.log(self.y.min()), math.log(self.y.max())
        lower = np.array([lo - LOG_RANGE, 0.0, lo - LOG_RANGE, 0.0, lo - 12.0])
        upper = np.array([hi + LOG_RANGE, EXPONENT_MAX, hi + LOG_RANGE, EXPONENT_MAX, hi])
        return lower, upper

    def _terms(self, theta: np.ndarray) -> np.ndarray:
        """The three log terms (a' − alpha·log N', b' − beta·log D', e): shape (..., rows, 3)."""
        th = np.asarray(theta)[..., None, :]
        n_term = th[..., 0] - th[..., 1] * self.lN
        d_term = th[..., 2] - th[..., 3] * self.lD
        return np.stack([n_term, d_term, np.broadcast_to(th[..., 4], n_term.shape)], axis=-1)

    def _log_predict(self, theta: np.ndarray) -> np.ndarray:
        return logsumexp(self._terms(theta), axis=-1)

    def _objective(self, w: np.ndarray) -> Callable:
        norm = HUBER_DELTA * w.sum()  # the loss per point in units of δ: gradients O(1) for L-BFGS

        def loss_and_grad(theta):
            a, alpha, b, beta, e = theta
            z_n, z_d = a - alpha * self.lN, b - beta * self.lD
            top = np.maximum(np.maximum(z_n, z_d), e)
            e_n, e_d, e_e = np.exp(z_n - top), np.exp(z_d - top), np.exp(e - top)
            total = e_n + e_d + e_e
            r = self.ly - top - np.log(total)
            ar = np.abs(r)
            huber = np.where(ar <= HUBER_DELTA, 0.5 * r * r, HUBER_DELTA * (ar - 0.5 * HUBER_DELTA))
            g = w * np.clip(r, -HUBER_DELTA, HUBER_DELTA) / total  # −d loss/d log-prediction, over the sum
            g_n, g_d = g @ e_n, g @ e_d
            grad = -np.array([g_n, -(g * self.lN) @ e_n, g_d, -(g * self.lD) @ e_d, g @ e_e])
            return float(w @ huber) / norm, grad / norm

        return loss_and_grad

    def _starts(self, w: np.ndarray) -> np.ndarray:
        """Hoffmann et al.'s grid, scaled to the data: E, and each term at the reference N or D, as fractions
        of the smallest loss; exponents 0.1 to 1. The lowest-loss rows start L-BFGS."""
        lmin = math.log(self.y.min())
        frac = np.log([0.05, 0.3, 0.8])
        a, alpha, b, beta, e = np.meshgrid(lmin + frac, [0.1, 0.3, 0.6, 1.0], lmin + frac, [0.1, 0.3, 0.6, 1.0],
                                           lmin + np.log([0.05, 0.3, 0.6, 0.9]), indexing="ij")
        grid = np.stack([v.ravel() for v in (a, alpha, b, beta, e)], axis=1)
        r = np.abs(self.ly - self._log_predict(grid))
        huber = np.where(r <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (r - 0.5 * HUBER_DELTA))
        return grid[_best_rows(huber @ w, STARTS_KEPT)]

    def _minimise(self, w, start, lower, upper, maxiter: int) -> tuple[np.ndarray, float]:
        res = minimize(self._objective(w), np.clip(start, lower, upper), jac=True, method="L-BFGS-B",
                       bounds=list(zip(lower, upper, strict=True)),
                       options={"maxiter": maxiter, "ftol": 1e-13, "gtol": 1e-9})
        # With δ this small the loss is nearly piecewise linear: a line search that stalls at the kink is
        # convergence in all but name; only running out of iterations (or a non-finite loss) is a failure.
        if res.nit >= maxiter or not np.isfinite(res.fun):
            raise _FitFailed(f"did not converge after {res.nit} iterations ({res.message})")
        return res.x, float(res.fun)

    def fit(self, w: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
        lower, upper = self.bounds(w)
        if start is not None:
            return self._minimise(w, start, lower, upper, MAX_EVALUATIONS // 10)[0]
        return _best_fit(lambda s: self._minimise(w, s, lower, upper, MAX_EVALUATIONS), self._starts(w))

    def bound_text(self, i: int, side: str, bound: float) -> str:
        if i in (1, 3):
            return f"{bound:g}"
        if i == 4:
            return f"{math.exp(bound):.3g} ({'e^-12 times min' if side == 'lower' else 'max'}({self.metric}))"
        return _log_bound_text(self.metric, side)

    def advice(self, i: int, side: str) -> str:
        if i == 4:
            return ("these points show no irreducible loss; add points at larger params and examples_seen"
                    if side == "lower" else f"the floor exceeds every {self.metric}; check the points")
        column = "params" if i < 2 else "examples_seen"
        return f"{self.metric} does not follow a power law in {column}; widen the range of {column}"

    def report(self, theta: np.ndarray) -> dict[str, float]:
        a, alpha, b, beta, e = theta
        return {"E": float(np.exp(e)), "A": float(np.exp(a + alpha * self.logN0)), "alpha": float(alpha),
                "B": float(np.exp(b + beta * self.logD0)), "beta": float(beta)}

    def residuals(self, theta: np.ndarray) -> np.ndarray:
        return self.ly - self._log_predict(theta)


class _ShapeLaw(_LeastSquaresLaw):
    name = "shape"

    def __init__(self, cols: dict[str, np.ndarray], metric: str, x: str, centre: dict[str, float]):
        self.x_name, self.metric, self.centre = x, metric, centre
        self.t, self.y = cols[x], cols[metric]
        self.shape_cols = {k: cols[k] for k in SHAPE_DIMS}
        slices = _shape_slices(self.shape_cols, centre)
        self.values = {k: np.unique(self.shape_cols[k][rows]) for k, rows in slices.items()}
        self.dims = tuple(k for k in SHAPE_DIMS if self.values[k].size >= 3)
        self.keys = tuple(f"{p}_{k}" for k in self.dims for p in ("alpha", "a", "beta", "b")) + ("xi", "c", "epsilon")
        self.n_params = 4 * len(self.dims) + 3
        # One residual per (point, fitted slice): a centre point counts once in every slice.
        rows = [slices[k] for k in self.dims]
        self.pair_row = np.concatenate(rows) if rows else np.zeros(0, int)
        self.pair_dim = np.concatenate([np.full(r.size, j) for j, r in enumerate(rows)]) if rows else self.pair_row
        # Shape values relative to the centre and t to its geometric mean: coefficients then O(metric).
        self.log_t0 = float(np.mean(np.log(self.t)))
        xk = np.stack([self.shape_cols[k] / centre[k] for k in self.dims]) if self.dims else np.zeros((0, 0))
        self.lx = np.log(xk[self.pair_dim, self.pair_row]) if self.dims else np.zeros(0)
        self.lt = np.log(self.t[self.pair_row]) - self.log_t0
        self.ly = np.log(self.y[self.pair_row])

    def check_design(self, w: np.ndarray) -> None:
        pw = w[self.pair_row]
        for j, k in enumerate(self.dims):
            in_slice = (self.pair_dim == j) & (pw > 0)
            if np.unique(self.lx[in_slice]).size < 3:
                raise _FitFailed(f"fewer than 3 distinct values of {k} in its slice")
        if _distinct_count(self.t, w) < 3:
            raise _FitFailed(f"fewer than 3 distinct values of {self.x_name}")

    def bounds(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """theta = (log alpha', a, log beta', b) per dim, then (xi', c, epsilon); primes: normalised units."""
        y = self.y[w > 0]
        lo, hi = math.log(y.min()) - LOG_RANGE, math.log(y.max()) + LOG_RANGE
        per_dim_lo, per_dim_hi = [lo, 0.0, lo, 0.0], [hi, EXPONENT_MAX, hi, EXPONENT_MAX]
        lower = np.array(per_dim_lo * len(self.dims) + [0.0, 0.0, 0.0])
        upper = np.array(per_dim_hi * len(self.dims) + [np.inf, EXPONENT_MAX, y.min()])
        return lower, upper

    def _parts(self, theta: np.ndarray):
        k = len(self.dims)
        la, a, lb, b = theta[: 4 * k].reshape(k, 4)[self.pair_dim].T
        xi, c, eps = theta[4 * k:]
        width_term = np.exp(la - a * self.lx)  # alpha·x^-a
        growth = np.exp(lb + b * self.lx)  # beta·x^b
        decay = np.exp(-c * self.lt)  # t^-c
        return width_term, growth, decay, xi, eps

    def _predict_pairs(self, theta: np.ndarray) -> np.ndarray:
        width_term, growth, decay, xi, eps = self._parts(theta)
        return width_term + (growth + xi) * decay + eps

    def _residual_and_jacobian(self, sw: np.ndarray) -> tuple[Callable, Callable]:
        k = len(self.dims)
        rows = np.arange(self.pair_row.size)
        cols = 4 * self.pair_dim

        def residual(theta):
            return sw * (self.ly - np.log(self._predict_pairs(theta)))

        def jacobian(theta):
            width_term, growth, decay, xi, eps = self._parts(theta)
            pred = width_term + (growth + xi) * decay + eps
            jac = np.zeros((rows.size, 4 * k + 3))
            jac[rows, cols] = width_term
            jac[rows, cols + 1] = -width_term * self.lx
            jac[rows, cols + 2] = growth * decay
            jac[rows, cols + 3] = growth * decay * self.lx
            jac[:, 4 * k] = decay
            jac[:, 4 * k + 1] = -(growth + xi) * decay * self.lt
            jac[:, 4 * k + 2] = 1.0
            return -(sw / pred)[:, None] * jac

        return residual, jacobian

    def _starts(self, w: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
        """For given exponents the law is linear in its coefficients: over a grid of exponents (the same for
        every dim) solve those by non-negative least squares on relative errors; the best few start the fit."""
        pw = w[self.pair_row]
        grid = [self._linear_start(a0, b0, c0, pw, lower, upper)
                for a0, b0, c0 in itertools.product((0.3, 1.0), (0.3, 1.0), (0.3, 0.7))]
        costs = np.array([np.sum(pw * self.residuals(theta) ** 2) for theta in grid])
        return np.array(grid)[_best_rows(costs, STARTS_KEPT)]

    def _linear_start(self, a0, b0, c0, pw, lower, upper) -> np.ndarray:
        k, rows = len(self.dims), np.arange(self.ly.size)
        y = np.exp(self.ly)
        decay = np.exp(-c0 * self.lt)
        design = np.zeros((y.size, 2 * k + 2))
        design[rows, self.pair_dim] = np.exp(-a0 * self.lx)
        design[rows, k + self.pair_dim] = np.exp(b0 * self.lx) * decay
        design[:, 2 * k], design[:, 2 * k + 1] = decay, 1.0
        scale = np.sqrt(pw) / y  # relative errors, like the log residuals they stand in for
        coef = nnls(design * scale[:, None], y * scale)[0]
        floor = math.exp(lower[0] + 1.0)  # a zero coefficient starts just inside its log bound
        alpha, beta = np.maximum(coef[:k], floor), np.maximum(coef[k:2 * k], floor)
        per_dim = np.stack([np.log(alpha), np.full(k, a0), np.log(beta), np.full(k, b0)], axis=1).ravel()
        return np.concatenate([per_dim, [coef[2 * k], c0, min(coef[2 * k + 1], 0.9 * upper[-1])]])

    def _residual_weights(self, w: np.ndarray) -> np.ndarray:
        return w[self.pair_row]  # a row's count weighs each of its (row, slice) residuals

    def bound_scale(self) -> np.ndarray:
        scale = np.ones(len(self.keys))
        scale[-3] = scale[-1] = self.y.min()  # xi and epsilon are in the metric's units
        return scale

    def bound_text(self, i: int, side: str, bound: float) -> str:
        name = self.keys[i]
        if name.startswith(("alpha_", "beta_")):
            return _log_bound_text(self.metric, side)
        return f"min({self.metric})={bound:.4g}" if name == "epsilon" and side == "upper" else f"{bound:g}"

    def advice(self, i: int, side: str) -> str:
        name = self.keys[i]
        if name in ("epsilon", "xi"):
            return "the sweep does not identify it; widen the shape values or the compute range"
        if name == "c":
            return f"{self.metric} does not fall with {self.x_name} as a power law; check the points"
        dim = name.split("_", 1)[1]
        return f"the {dim} slice does not identify it; widen the {dim} values around the centre"

    def report(self, theta: np.ndarray) -> dict[str, float]:
        """Coefficients back in the columns' units: alpha = alpha'·x0^a, beta = beta'·x0^-b·t0^c, xi = xi'·t0^c."""
        k = len(self.dims)
        xi, c, eps = (float(v) for v in theta[4 * k:])
        out: dict[str, float] = {}
        for j, dim in enumerate(self.dims):
            la, a, lb, b = (float(v) for v in theta[4 * j: 4 * j + 4])
            log_x0 = math.log(self.centre[dim])
            out |= {f"alpha_{dim}": math.exp(la + a * log_x0), f"a_{dim}": a,
                    f"beta_{dim}": math.exp(lb - b * log_x0 + c * self.log_t0), f"b_{dim}": b}
        out |= {"xi": xi * math.exp(c * self.log_t0), "c": c, "epsilon": eps}
        return out | {f"s_{dim}": c / (out[f"a_{dim}"] + out[f"b_{dim}"]) for dim in self.dims}

    def residuals(self, theta: np.ndarray) -> np.ndarray:
        return self.ly - np.log(self._predict_pairs(theta))


def _shape_centre(shape_cols: dict[str, np.ndarray]) -> dict[str, float]:
    """The per-column mode (the centre of a star sweep occurs in every arm); ties go to the smaller value."""
    centre = {}
    for k, v in shape_cols.items():
        values, counts = np.unique(v, return_counts=True)
        centre[k] = float(values[np.argmax(counts)])
    return centre


def _shape_slices(shape_cols: dict[str, np.ndarray], centre: dict[str, float]) -> dict[str, np.ndarray]:
    """Row indices of each dimension's slice: rows whose other two dims equal the centre."""
    at_centre = {k: shape_cols[k] == centre[k] for k in SHAPE_DIMS}
    return {k: np.flatnonzero(np.logical_and.reduce([at_centre[o] for o in SHAPE_DIMS if o != k]))
            for k in SHAPE_DIMS}


# ----------------------------------------------------------------------------------------------------------
# Public entry points


def fit_law(
    columns: dict[str, np.ndarray | list],
    law: str,
    metric: str = "eval_error",
    x: str = "compute",
    bootstrap: int = 1000,
    holdout: int = 0,
    seed: int = 0,
) -> dict:
    """Fit `law` to the rows of `columns` and return the JSON-ready document (see the module docstring).

    Params and ci95 come from the fit on all points, or with holdout=K > 0 on all but the K largest-x ones
    (for chinchilla: largest compute, the `x` column if every row has it, else params × examples_seen),
    which are then predicted in "holdout". Raises ConfigError for unusable input or an unidentified fit.
    """
    # The problems are tiny (≤ a few hundred rows, ≤ 15 parameters): BLAS threads only add synchronisation,
    # and on a busy machine OpenBLAS's spin-waiting made L-BFGS-B ~100x slower (3 ms per 5-dim step).
    with threadpool_limits(limits=1, user_api="blas"):
        return _fit_document(columns, law, metric, x, bootstrap, holdout, seed)


def _fit_document(columns, law, metric, x, bootstrap, holdout, seed) -> dict:
    _check_law(law)
    if bootstrap < 0 or holdout < 0:
        raise ConfigError(f"bootstrap ({bootstrap}) and holdout ({holdout}) must be ≥ 0")
    cols, order_x, x_label, extra = _law_inputs(columns, law, metric, x)
    n = order_x.size
    if holdout >= n:
        raise ConfigError(f"holdout={holdout} leaves none of the {n} usable points to fit")
    fit_rows = np.sort(np.argsort(order_x, kind="stable")[: n - holdout])
    model = _build(law, {k: v[fit_rows] for k, v in cols.items()}, metric, x, extra)
    _check_full_design(model, law)
    _require_points(law, n, model.n_params, holdout)
    theta = _full_fit(model)
    params = model.report(theta)
    ci95, samples, boot = _bootstrap(model, theta, bootstrap, seed)
    fit_x = order_x[fit_rows]
    doc = {
        "law": law, "metric": metric, "x": x_label, "params": params, "ci95": ci95, "points": int(n),
        "x_range": [float(fit_x.min()), float(fit_x.max())],
        "rmse_log": _rms(model.residuals(theta)),
        "holdout": _holdout_report(law, params, cols, order_x, fit_rows, metric, x, extra) if holdout else None,
        "bootstrap": boot, "samples": samples,
    }
    if holdout:
        doc["fit_on"] = int(fit_rows.size)
    if law == "shape":
        doc["dims"] = {k: {"centre": extra["centre"][k], "values": [float(v) for v in model.values[k]],
                           "fitted": k in model.dims} for k in SHAPE_DIMS}
        doc["ignored_points"] = extra["ignored"]
    return doc


def _law_inputs(columns: dict, law: str, metric: str, x: str):
    """(validated columns, the x that orders points for holdout and x_range, its label, law extras)."""
    cols = _usable_columns(columns, law, law_columns(law, metric, x))
    if law == "chinchilla":
        if x in columns:
            with contextlib.suppress(ConfigError):  # x missing in some rows: order by params × examples_seen
                cols[x] = _positive_column(columns, x, law)
        if x in cols:
            return cols, cols[x], x, {}
        return cols, cols["params"] * cols["examples_seen"], "params*examples_seen", {}
    if law == "shape":
        shape_cols = {k: cols[k] for k in SHAPE_DIMS}
        centre = _shape_centre(shape_cols)
        slices = _shape_slices(shape_cols, centre)
        used = np.unique(np.concatenate(list(slices.values())))
        n_ignored = int(cols[metric].size - used.size)
        cols = {k: v[used] for k, v in cols.items()}
        return cols, cols[x], x, {"centre": centre, "ignored": n_ignored}
    return cols, cols[x], x, {}


def _build(law: str, cols: dict[str, np.ndarray], metric: str, x: str, extra: dict):
    if law == "shape":
        return _ShapeLaw(cols, metric, x, extra["centre"])
    return {"power": _PowerLaw, "zhai": _ZhaiLaw, "chinchilla": _ChinchillaLaw}[law](cols, metric, x)


def _check_full_design(model, law: str) -> None:
    """The degenerate designs, as ConfigErrors naming the column and its distinct values."""
    if law in ("power", "zhai"):
        why = "a single distinct value cannot show scaling" if law == "power" else "d, c, a and b need them"
        _require_distinct(law, model.x_name, model.x, 2 if law == "power" else 4, why)
    elif law == "chinchilla":
        for name, v in (("params", model.N), ("examples_seen", model.D)):
            _require_distinct(law, name, v, 3, f"{name}'s term has E, a coefficient and an exponent")
    else:
        _check_shape_design(model)


def _check_shape_design(model: _ShapeLaw) -> None:
    if not model.dims:
        counts = ", ".join(f"{k} {model.values[k].size}" for k in SHAPE_DIMS)
        centre = ", ".join(f"{k}={v:g}" for k, v in model.centre.items())
        raise ConfigError(
            f"the shape law needs a dimension with at least 3 distinct values around the centre ({centre}); "
            f"the slices have {counts}: a star sweep varies each dimension over 3 or more values"
        )
    _require_distinct("shape", model.x_name, model.t, 3, "c, xi and epsilon need them")


def _full_fit(model) -> np.ndarray:
    w = np.ones(model.y.size)
    try:
        theta = model.fit(w)
    except _FitFailed as err:
        raise ConfigError(f"the {model.name} fit {err}; try more points or a simpler law") from None
    issue = model.bound_issue(theta)
    if issue:
        raise ConfigError(f"the {model.name} fit is not identified: {issue}")
    return theta


def _bootstrap(model, theta: np.ndarray, resamples: int, seed: int) -> tuple[dict, dict, dict]:
    """Percentile 95% intervals from refits of rows drawn with replacement, warm-started from theta."""
    n = model.y.size
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    rows, failed, at_bound = [], 0, 0
    for draw in draws:
        w = np.bincount(draw, minlength=n).astype(float)
        try:
            model.check_design(w)
            estimate = model.fit(w, start=theta)
        except (_FitFailed, np.linalg.LinAlgError):
            failed += 1
            continue
        at_bound += model.on_bound(estimate, w)
        rows.append(model.report(estimate))
    if resamples and failed > resamples / 2:
        raise ConfigError(
            f"{failed} of {resamples} bootstrap resamples of the {model.name} fit failed; the points barely "
            f"identify the law: add points, or pass --bootstrap 0 for a fit without intervals"
        )
    info = {"resamples": int(resamples), "failed": int(failed), "at_bound": int(at_bound), "seed": int(seed)}
    if not rows:
        return {}, {}, info
    names = list(rows[0])
    samples = {k: [r[k] for r in rows] for k in names}
    ci95 = {k: [float(v) for v in np.percentile(samples[k], [2.5, 97.5])] for k in names}
    return ci95, samples, info


def _rms(r: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(r))))


def _holdout_report(law, params, cols, order_x, fit_rows, metric, x, extra) -> dict:
    held = np.setdiff1d(np.arange(order_x.size), fit_rows)
    held = held[np.argsort(order_x[held], kind="stable")]
    held_cols = {k: v[held] for k, v in cols.items()}
    if law == "shape":
        # Each held-out row by its own slice; a centre row by the mean log prediction over the slices.
        fitted = [k for k in SHAPE_DIMS if f"a_{k}" in params]
        logs = np.stack([np.log(predict("shape", params, held_cols, x=x, dim=k)) for k in fitted])
        in_slice = np.stack([_row_in_slice(held_cols, extra["centre"], k) for k in fitted])
        pred = np.exp(np.sum(logs * in_slice, axis=0) / np.maximum(in_slice.sum(axis=0), 1))
    else:
        pred = predict(law, params, held_cols, x=x)
    observed = held_cols[metric]
    points = [{"x": float(order_x[i]), "observed": float(o), "predicted": float(p)}
              for i, o, p in zip(held, observed, pred, strict=True)]
    if law == "chinchilla":
        for point, n_, d_ in zip(points, held_cols["params"], held_cols["examples_seen"], strict=True):
            point |= {"params": float(n_), "examples_seen": float(d_)}
    return {"k": int(held.size), "rmse_log": _rms(np.log(observed) - np.log(pred)), "points": points}


def _row_in_slice(cols: dict, centre: dict, dim: str) -> np.ndarray:
    return np.logical_and.reduce([cols[o] == centre[o] for o in SHAPE_DIMS if o != dim]).astype(float)


def predict(
    law: str, params: dict, columns: dict[str, np.ndarray], x: str = "compute", dim: str | None = None
) -> np.ndarray:
    """The law's prediction per row of `columns` (arrays of equal length), from params as fit_law reports
    them. power/zhai read column `x`; chinchilla reads params and examples_seen; shape evaluates the slice
    law f_dim on columns `dim` and `x` (dim may be omitted when only one dimension was fitted)."""
    _check_law(law)
    if law == "power":
        return params["a"] * _column(columns, x, law) ** (-params["b"])
    if law == "zhai":
        return params["c"] + params["a"] * (_column(columns, x, law) + params["d"]) ** (-params["b"])
    if law == "chinchilla":
        n, d = _column(columns, "params", law), _column(columns, "examples_seen", law)
        return params["E"] + params["A"] * n ** (-params["alpha"]) + params["B"] * d ** (-params["beta"])
    dim = _shape_dim(params, dim)
    return shape_slice(params, dim, _column(columns, dim, law), _column(columns, x, law))


def shape_slice(params: dict, dim: str, xk, t) -> np.ndarray:
    """f_dim(x_k, t) = alpha·x_k^-a + (beta·x_k^b + xi)·t^-c + epsilon; xk and t broadcast against each other."""
    dim = _shape_dim(params, dim)
    xk, t = np.asarray(xk, dtype=float), np.asarray(t, dtype=float)
    growth = params[f"beta_{dim}"] * xk ** params[f"b_{dim}"] + params["xi"]
    return params[f"alpha_{dim}"] * xk ** (-params[f"a_{dim}"]) + growth * t ** (-params["c"]) + params["epsilon"]


def _column(columns: dict, name: str, law: str) -> np.ndarray:
    if name not in columns:
        raise ConfigError(f"predicting with the {law} law needs column {name!r}; the columns are: "
                          f"{', '.join(sorted(columns)) or 'none'}")
    return np.asarray(columns[name], dtype=float)


def _shape_dim(params: dict, dim: str | None) -> str:
    fitted = [k for k in SHAPE_DIMS if f"a_{k}" in params]
    if dim is None and len(fitted) == 1:
        return fitted[0]
    if dim not in fitted:
        raise ConfigError(f"the shape law predicts one dimension's slice: pass dim= one of {', '.join(fitted)}")
    return dim


def optimal_shape_value(params: dict, dim: str, t: float | np.ndarray) -> float | np.ndarray:
    """The value of `dim` that minimises f_dim at compute t: (alpha·a·t^c / (beta·b))^(1/(a + b))."""
    dim = _shape_dim(params, dim)
    a, b = params[f"a_{dim}"], params[f"b_{dim}"]
    ratio = params[f"alpha_{dim}"] * a / (params[f"beta_{dim}"] * b)
    return (ratio * np.asarray(t, dtype=float) ** params["c"]) ** (1.0 / (a + b))
