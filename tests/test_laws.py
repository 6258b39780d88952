"""Scaling-law fits: each law recovers the parameters that generated its data and its 95% bootstrap interval
covers them in at least 17 of 20 seeded trials; degenerate input is refused with the identifying facts;
holdout measures extrapolation error; predict matches the generating formulas; seeds reproduce results.

The synthetic studies carry 2% multiplicative noise (obs = true·exp(0.02·N(0, 1))) and mimic real designs;
each generator says why its design is what it is.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bigvit.errors import ConfigError
from bigvit.scaling import laws
from bigvit.scaling.laws import LAWS, fit_law, law_columns, optimal_shape_value, predict, shape_slice

NOISE = 0.02
TRIALS = 20
MIN_COVERED = 17  # of TRIALS: a calibrated 95% interval covers ≥ 17 of 20 with probability 0.98
COVERAGE_RESAMPLES = 200  # enough for 2.5/97.5 percentiles; 1000 would only sharpen their edges
RECOVERY_TOLERANCE = 0.10  # relative error of one fit's exponents


def _noisy(true: np.ndarray, seed: int) -> np.ndarray:
    return true * np.exp(NOISE * np.random.default_rng(seed).standard_normal(true.shape))


# ----------------------------------------------------------------------------------------------------------
# Studies. Truths are written out as formulas here (not via predict) so that predict is tested against them.

# A frontier of ViT runs over 4 decades of training FLOPs (20 points): a pure power law needs only range.
POWER_TRUE = {"a": 0.8 * 1e15**0.3, "b": 0.3}
POWER_X = np.logspace(15, 19, 20)


def power_true(x):
    return POWER_TRUE["a"] * x ** -POWER_TRUE["b"]


def power_study(seed: int = 0, x: np.ndarray = POWER_X) -> dict:
    return {"compute": x, "eval_error": _noisy(power_true(x), seed)}


# Zhai et al.'s form with Figure-2-like numbers in FLOPs (C in units of 1e18 FLOPs): E = 0.08 +
# 0.3·(C + 0.1)^-0.35. 40 points over 6 decades, so that the low-compute bend (d, a decade above the smallest
# run) and the floor (c is 87% of the best error) are both inside the data. With 30 points over 5 decades the
# pairs bootstrap's spread of b is ~0.8x its sampling spread and covered only 16 of 20; 40 points calibrate it.
ZHAI_TRUE = {"c": 0.08, "a": 0.3 * 1e18**0.35, "d": 1e17, "b": 0.35}
ZHAI_X = np.logspace(16, 22, 40)


def zhai_true(x):
    t = ZHAI_TRUE
    return t["c"] + t["a"] * (x + t["d"]) ** -t["b"]


def zhai_study(seed: int = 0) -> dict:
    return {"compute": ZHAI_X, "eval_error": _noisy(zhai_true(ZHAI_X), seed)}


# Hoffmann et al.'s fitted constants on a 6 x 6 grid of model sizes (1e6..1e10 params, ViT-Ti-ish to ViT-22B)
# and examples seen (1e7..1e11). Four decades each: with 2 decades (and 2% noise) E trades off against the
# exponents and alpha's spread over seeds is 15%; with 4 it is ~5%.
CHINCHILLA_TRUE = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}
_N, _D = np.meshgrid(np.logspace(6, 10, 6), np.logspace(7, 11, 6))
CHINCHILLA_GRID = {"params": _N.ravel(), "examples_seen": _D.ravel()}


def chinchilla_true(n, d):
    t = CHINCHILLA_TRUE
    return t["E"] + t["A"] * n ** -t["alpha"] + t["B"] * d ** -t["beta"]


def chinchilla_study(seed: int = 0) -> dict:
    true = chinchilla_true(CHINCHILLA_GRID["params"], CHINCHILLA_GRID["examples_seen"])
    return CHINCHILLA_GRID | {"eval_error": _noisy(true, seed)}


# A SoViT star sweep around ViT-B (width 768, depth 12, MLP 3072): each dimension at 1/4..4x the centre,
# each of the 13 shapes trained for 4 durations (2M..128M examples), compute = FLOPs per image x examples,
# so it varies with the shape as it does in a real sweep. The exponents are the paper's (c = 0.65; a_k + b_k
# set so s_width = 0.22, s_depth = 0.45, s_mlp = 0.6); arms of 1/2..2x left s_k's spread over seeds at 5-10%,
# 1/4..4x put the compute-optimal shape near or inside the arms at every duration and bring it to 2-4%.
# In centre-relative units (x/x0, t/T0) the coefficients are shared by the dims, as they must be for the
# three slices to agree at the centre; they are set so the error runs from 0.05 to 0.7.
SHAPE_CENTRE = {"width": 768, "depth": 12, "mlp_dim": 3072}
SHAPE_EXPONENTS = {"width": (1.5, 1.45), "depth": (0.8, 0.64), "mlp_dim": (0.6, 0.48)}  # (a_k, b_k)
SHAPE_C, SHAPE_ALPHA, SHAPE_BETA, SHAPE_XI, SHAPE_EPS, SHAPE_T0 = 0.65, 0.036, 0.036, 0.03, 0.03, 1.5e18
SHAPE_SPREAD = (0.25, 0.5, 1.0, 2.0, 4.0)
SHAPE_EXAMPLES = (2e6, 8e6, 32e6, 128e6)


def shape_slice_true(dim: str, xk, t):
    a, b = SHAPE_EXPONENTS[dim]
    u, tau = np.asarray(xk) / SHAPE_CENTRE[dim], np.asarray(t) / SHAPE_T0
    return SHAPE_ALPHA * u**-a + (SHAPE_BETA * u**b + SHAPE_XI) * tau**-SHAPE_C + SHAPE_EPS


def shape_true_params() -> dict[str, float]:
    """The same law in the columns' units: alpha = alpha'·x0^a, beta = beta'·x0^-b·T0^c, xi = xi'·T0^c."""
    out: dict[str, float] = {}
    for dim, (a, b) in SHAPE_EXPONENTS.items():
        x0 = SHAPE_CENTRE[dim]
        out |= {f"alpha_{dim}": SHAPE_ALPHA * x0**a, f"a_{dim}": a,
                f"beta_{dim}": SHAPE_BETA * x0**-b * SHAPE_T0**SHAPE_C, f"b_{dim}": b}
    out |= {"xi": SHAPE_XI * SHAPE_T0**SHAPE_C, "c": SHAPE_C, "epsilon": SHAPE_EPS}
    return out | {f"s_{dim}": SHAPE_C / (a + b) for dim, (a, b) in SHAPE_EXPONENTS.items()}


def _flops_per_image(width, depth, mlp):
    return 6 * depth * (4 * width * width + 2 * width * mlp) * 197  # fwd + bwd, 197 tokens; attention aside


def shape_study(seed: int = 0, spread=SHAPE_SPREAD, dims=laws.SHAPE_DIMS) -> dict:
    shapes = [dict(SHAPE_CENTRE)] + [
        dict(SHAPE_CENTRE, **{dim: round(SHAPE_CENTRE[dim] * f)}) for dim in dims for f in spread if f != 1.0
    ]
    rows = [(s, ex) for s in shapes for ex in SHAPE_EXAMPLES]
    cols = {dim: np.array([float(s[dim]) for s, _ in rows]) for dim in laws.SHAPE_DIMS}
    cols["compute"] = np.array([_flops_per_image(s["width"], s["depth"], s["mlp_dim"]) * ex for s, ex in rows])
    varied = [next((d for d in laws.SHAPE_DIMS if s[d] != SHAPE_CENTRE[d]), "width") for s, _ in rows]
    true = np.array([shape_slice_true(d, s[d], t) for (s, _), d, t in zip(rows, varied, cols["compute"],
                                                                           strict=True)])
    return cols | {"eval_error": _noisy(true, seed)}


STUDIES = {
    "power": (power_study, POWER_TRUE, ("b",)),
    "zhai": (zhai_study, ZHAI_TRUE, ("b",)),
    "chinchilla": (chinchilla_study, CHINCHILLA_TRUE, ("alpha", "beta")),
    "shape": (shape_study, shape_true_params(), ("s_width", "s_depth", "s_mlp_dim", "c")),
}


# ----------------------------------------------------------------------------------------------------------
# Recovery and coverage


@pytest.mark.parametrize("law", LAWS)
def test_fit_recovers_the_generating_exponents(law):
    study, true, exponents = STUDIES[law]
    doc = fit_law(study(seed=0), law, bootstrap=0)
    for name in exponents:
        assert doc["params"][name] == pytest.approx(true[name], rel=RECOVERY_TOLERANCE), name
    assert doc["rmse_log"] == pytest.approx(NOISE, rel=0.5)  # the residuals are the noise, not misfit


def test_zhai_recovers_floor_and_shift_in_flops():
    params = fit_law(zhai_study(seed=0), "zhai", bootstrap=0)["params"]
    assert params["c"] == pytest.approx(ZHAI_TRUE["c"], rel=0.1)
    assert params["d"] == pytest.approx(ZHAI_TRUE["d"], rel=0.5)  # a shift in 1e16..1e22 FLOPs: conditioning


@pytest.mark.parametrize("law", LAWS)
def test_bootstrap_interval_covers_true_exponents(law):
    study, true, exponents = STUDIES[law]
    covered = dict.fromkeys(exponents, 0)
    estimates: dict[str, list[float]] = {name: [] for name in exponents}
    for seed in range(TRIALS):
        doc = fit_law(study(seed=seed), law, bootstrap=COVERAGE_RESAMPLES, seed=seed)
        assert doc["bootstrap"]["failed"] <= COVERAGE_RESAMPLES // 20
        for name in exponents:
            lo, hi = doc["ci95"][name]
            covered[name] += lo <= true[name] <= hi
            estimates[name].append(doc["params"][name])
    assert all(k >= MIN_COVERED for k in covered.values()), covered
    for name, values in estimates.items():  # and the estimator is centred on the truth
        assert np.median(values) == pytest.approx(true[name], rel=0.05), name  # measured: within 2.3%


# ----------------------------------------------------------------------------------------------------------
# Refusals: each names the facts


def test_missing_column_is_named_with_the_columns_that_exist():
    with pytest.raises(ConfigError, match=r"column 'eval_error', which is missing; the columns are: compute, loss"):
        fit_law({"compute": POWER_X, "loss": POWER_X}, "power")


def test_unknown_law_lists_the_laws():
    with pytest.raises(ConfigError, match=r"unknown law 'cubic'; the laws are: power, zhai, chinchilla, shape"):
        fit_law(power_study(), "cubic")


@pytest.mark.parametrize("law, n, need", [("power", 3, 4), ("zhai", 5, 6)])
def test_too_few_points_says_how_many_are_needed(law, n, need):
    x = np.logspace(16, 20, n)
    with pytest.raises(ConfigError, match=rf"needs at least {need} points; got {n} usable points"):
        fit_law({"compute": x, "eval_error": zhai_true(x)}, law, bootstrap=0)


def test_holdout_that_leaves_too_few_points_is_refused():
    with pytest.raises(ConfigError, match=r"needs at least 4 points; holdout=17 leaves 3 of 20 points"):
        fit_law(power_study(), "power", holdout=17)


def test_single_distinct_x_is_refused():
    x = np.full(10, 1e18)
    with pytest.raises(ConfigError, match=r"at least 2 distinct values of 'compute', got 1 \(1e\+18\)"):
        fit_law({"compute": x, "eval_error": _noisy(power_true(x), 0)}, "power")


@pytest.mark.parametrize("column", ["params", "examples_seen"])
def test_chinchilla_with_a_single_n_or_d_is_refused(column):
    study = chinchilla_study()
    study[column] = np.full(study[column].size, 1e8)
    with pytest.raises(ConfigError, match=rf"at least 3 distinct values of '{column}', got 1"):
        fit_law(study, "chinchilla")


def test_shape_without_a_varied_dimension_is_refused():
    study = shape_study(spread=(0.5, 1.0))  # two values per dimension: no slice identifies its exponents
    with pytest.raises(ConfigError, match=r"dimension with at least 3 distinct values around the centre "
                                          r"\(width=768, depth=12, mlp_dim=3072\); the slices have width 2"):
        fit_law(study, "shape")


@pytest.mark.parametrize("value, shown", [(-0.1, "-0.1"), (0.0, "0.0"), (math.nan, "nan"), (None, "None"),
                                          (math.inf, "inf"), ("n/a", "'n/a'")])
def test_bad_value_names_column_row_and_value(value, shown):
    study = power_study()
    errors = list(study["eval_error"])
    errors[3] = value
    with pytest.raises(ConfigError, match=rf"column 'eval_error' row 3 holds {shown}; .* positive finite"):
        fit_law(study | {"eval_error": errors}, "power")


def test_unused_columns_may_hold_none():
    study = power_study() | {"params": [None] * POWER_X.size}
    assert fit_law(study, "power", bootstrap=0)["points"] == POWER_X.size


def test_zhai_without_saturation_points_to_the_power_law():
    noiseless = {"compute": ZHAI_X, "eval_error": power_true(ZHAI_X)}
    with pytest.raises(ConfigError, match=r"c sits at its lower bound 0: these points show no saturation; "
                                          r"try --law power"):
        fit_law(noiseless, "zhai")


def test_zhai_without_a_low_compute_bend_is_refused():
    t = ZHAI_TRUE  # the same law with d = 0: the error falls as a straight power law down to its floor
    study = {"compute": ZHAI_X, "eval_error": _noisy(t["c"] + t["a"] * ZHAI_X ** -t["b"], 0)}
    with pytest.raises(ConfigError, match=r"d sits at its lower bound 0: these points show no low-compute bend"):
        fit_law(study, "zhai")


def test_rising_error_is_refused_by_the_power_law():
    study = {"compute": POWER_X, "eval_error": _noisy(1e-3 * POWER_X**0.1, 0)}
    with pytest.raises(ConfigError, match=r"b sits at its lower bound 0: eval_error does not fall as compute"):
        fit_law(study, "power")


def test_chinchilla_without_a_params_term_is_refused():
    d = CHINCHILLA_GRID["examples_seen"]
    t = CHINCHILLA_TRUE  # the loss depends on examples seen alone
    study = CHINCHILLA_GRID | {"eval_error": _noisy(t["E"] + t["B"] * d ** -t["beta"], 0)}
    with pytest.raises(ConfigError, match=r"alpha sits at its lower bound 0: .* power law in params"):
        fit_law(study, "chinchilla")


@pytest.mark.parametrize("law", ["zhai", "chinchilla"])
def test_fit_that_does_not_converge_is_refused(law, monkeypatch):
    monkeypatch.setattr(laws, "MAX_EVALUATIONS", 3)
    with pytest.raises(ConfigError, match=rf"the {law} fit did not converge after \d+ "):
        fit_law(STUDIES[law][0](), law, bootstrap=0)


def test_mostly_failing_bootstrap_is_refused(monkeypatch):
    def fail_on_resamples(self, w):  # every resample (a draw with some count ≠ 1) fails
        if np.any(w != 1):
            raise laws._FitFailed("a degenerate draw")

    monkeypatch.setattr(laws._PowerLaw, "check_design", fail_on_resamples)
    with pytest.raises(ConfigError, match=r"50 of 50 bootstrap resamples of the power fit failed"):
        fit_law(power_study(), "power", bootstrap=50)


# ----------------------------------------------------------------------------------------------------------
# Holdout, predict, reproducibility, the document


def test_holdout_predicts_the_largest_points_from_the_rest():
    doc = fit_law(power_study(), "power", bootstrap=20, holdout=5)
    held = doc["holdout"]
    assert (held["k"], doc["fit_on"], doc["points"]) == (5, 15, 20)
    assert [p["x"] for p in held["points"]] == list(POWER_X[-5:])
    assert doc["x_range"] == [POWER_X[0], POWER_X[14]]  # the range the reported params were fitted on
    predicted = predict("power", doc["params"], {"compute": POWER_X[-5:]})
    assert [p["predicted"] for p in held["points"]] == pytest.approx(list(predicted))
    assert held["rmse_log"] < 2.5 * NOISE  # the right law extrapolates to within the noise


def test_holdout_exposes_a_law_that_does_not_extrapolate():
    doc = fit_law(zhai_study(), "power", bootstrap=0, holdout=10)  # a power law through saturating points
    held = doc["holdout"]
    assert held["rmse_log"] > 3 * doc["rmse_log"]
    assert all(p["predicted"] < p["observed"] for p in held["points"])  # it misses the floor


def test_chinchilla_holdout_orders_by_compute():
    study = chinchilla_study()
    doc = fit_law(study, "chinchilla", bootstrap=0, holdout=4)
    assert doc["x"] == "params*examples_seen"
    nd = study["params"] * study["examples_seen"]
    assert sorted(p["x"] for p in doc["holdout"]["points"]) == pytest.approx(sorted(nd)[-4:])
    with_compute = study | {"compute": 1.0 / nd}  # a compute column, when every row has it, decides
    doc = fit_law(with_compute, "chinchilla", bootstrap=0, holdout=4)
    assert doc["x"] == "compute"
    assert sorted(p["params"] * p["examples_seen"] for p in doc["holdout"]["points"]) == pytest.approx(
        sorted(nd)[:4])


@pytest.mark.parametrize("law", ["power", "zhai", "chinchilla"])
def test_predict_matches_generation(law):
    x = np.logspace(14, 22, 9)
    if law == "chinchilla":
        cols = {"params": x / 1e6, "examples_seen": x / 1e8}
        expected = chinchilla_true(cols["params"], cols["examples_seen"])
    else:
        cols, expected = {"compute": x}, (power_true if law == "power" else zhai_true)(x)
    np.testing.assert_allclose(predict(law, STUDIES[law][1], cols), expected, rtol=1e-12)


def test_predict_shape_matches_generation_in_column_units():
    params, t = shape_true_params(), np.logspace(16, 20, 5)
    for dim in laws.SHAPE_DIMS:
        xk = SHAPE_CENTRE[dim] * np.array([0.3, 0.7, 1.0, 1.5, 3.0])
        got = predict("shape", params, {dim: xk, "compute": t}, dim=dim)
        np.testing.assert_allclose(got, shape_slice_true(dim, xk, t), rtol=1e-12)
        grid = shape_slice(params, dim, xk[:, None], t[None, :])  # broadcasts: a curve per compute
        np.testing.assert_allclose(grid, shape_slice_true(dim, xk[:, None], t[None, :]), rtol=1e-12)


def test_predict_names_a_missing_column():
    with pytest.raises(ConfigError, match=r"needs column 'compute'; the columns are: flops"):
        predict("power", POWER_TRUE, {"flops": POWER_X})


def test_optimal_shape_value_minimises_the_slice_law():
    params = shape_true_params()
    for dim in laws.SHAPE_DIMS:
        grid = SHAPE_CENTRE[dim] * np.logspace(-2, 2, 20001)
        for t in (1e17, 1e19):
            best = grid[np.argmin(predict("shape", params, {dim: grid, "compute": np.full(grid.size, t)}, dim=dim))]
            assert optimal_shape_value(params, dim, t) == pytest.approx(best, rel=1e-3)
        ratio = optimal_shape_value(params, dim, 1e20) / optimal_shape_value(params, dim, 1e19)
        assert ratio == pytest.approx(10 ** params[f"s_{dim}"])  # x* ∝ t^s


def test_shape_reports_dims_and_ignores_points_off_the_star():
    study = shape_study(dims=("width", "depth"))  # mlp_dim is never varied: that slice is the centre alone
    off_star = {"width": 384.0, "depth": 6.0, "mlp_dim": 3072.0, "compute": 1e18, "eval_error": 0.3}
    study = {k: np.append(v, off_star[k]) for k, v in study.items()}
    doc = fit_law(study, "shape", bootstrap=0)
    assert doc["ignored_points"] == 1 and doc["points"] == 9 * len(SHAPE_EXAMPLES)
    assert doc["dims"]["width"] == {"centre": 768.0, "values": [192.0, 384.0, 768.0, 1536.0, 3072.0],
                                    "fitted": True}
    assert doc["dims"]["mlp_dim"] == {"centre": 3072.0, "values": [3072.0], "fitted": False}
    assert "s_mlp_dim" not in doc["params"] and "s_depth" in doc["params"]


def test_shape_holdout_predicts_each_row_by_its_slice():
    doc = fit_law(shape_study(), "shape", bootstrap=0, holdout=6)
    assert doc["holdout"]["k"] == 6 and doc["fit_on"] == 46
    assert doc["holdout"]["rmse_log"] < 3 * NOISE


def test_same_seed_same_document_other_seed_other_intervals():
    first = fit_law(zhai_study(), "zhai", bootstrap=100, seed=7)
    again = fit_law(zhai_study(), "zhai", bootstrap=100, seed=7)
    other = fit_law(zhai_study(), "zhai", bootstrap=100, seed=8)
    assert json.dumps(first) == json.dumps(again)
    assert first["params"] == other["params"] and first["ci95"] != other["ci95"]
    assert first["bootstrap"] == {"resamples": 100, "failed": 0, "at_bound": 0, "seed": 7}


def test_document_is_json_ready():
    doc = fit_law(chinchilla_study(), "chinchilla", bootstrap=30, holdout=2)
    assert set(doc) >= {"law", "metric", "x", "params", "ci95", "points", "x_range", "rmse_log", "holdout",
                        "bootstrap", "samples", "fit_on"}
    assert set(doc["params"]) == {"E", "A", "alpha", "B", "beta"} == set(doc["ci95"]) == set(doc["samples"])
    assert all(len(v) == 30 - doc["bootstrap"]["failed"] for v in doc["samples"].values())
    assert json.loads(json.dumps(doc)) == doc


def test_no_bootstrap_means_no_intervals():
    doc = fit_law(power_study(), "power", bootstrap=0)
    assert (doc["ci95"], doc["samples"], doc["holdout"]) == ({}, {}, None)


def test_law_columns():
    assert law_columns("power", "eval_error", "compute") == ["compute", "eval_error"]
    assert law_columns("zhai", "loss", "flops") == ["flops", "loss"]
    assert law_columns("chinchilla", "loss", "compute") == ["params", "examples_seen", "loss"]
    assert law_columns("shape", "eval_error", "compute") == ["width", "depth", "mlp_dim", "compute", "eval_error"]
