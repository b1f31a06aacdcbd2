"""Tests for pcrjax.calibration against sklearn, Newton/brute-force oracles and synthetic truth."""

import json
import pickle
import warnings

import numpy as np
import pytest
from scipy.special import expit
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, log_loss, roc_curve

from pcrjax.calibration import (
    Calibrator,
    brier,
    calibration_intercept_slope,
    confusion_metrics,
    fit_platt,
    fit_temperature,
    operating_point,
    reliability_curve,
    threshold_at_sensitivity,
    youden_threshold,
)


def _synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """True logits ~ N(0, 1.5²) and labels y ~ Bernoulli(σ(logit)): σ(logit) is calibrated."""
    rng = np.random.default_rng(seed)
    true_logit = rng.normal(0.0, 1.5, n)
    return rng.random(n) < expit(true_logit), true_logit


def _newton_logistic(y: np.ndarray, x: np.ndarray, offset: bool) -> np.ndarray:
    """Independent oracle: Newton–Raphson MLE of logit P(y) = a + b·x, or a + x if offset."""
    design = np.ones((x.size, 1)) if offset else np.column_stack([np.ones_like(x), x])
    base = x if offset else np.zeros_like(x)
    beta = np.zeros(design.shape[1])
    for _ in range(50):
        mu = expit(base + design @ beta)
        hessian = design.T @ (design * (mu * (1 - mu))[:, None])
        beta = beta + np.linalg.solve(hessian, design.T @ (y - mu))
    return beta


# ----------------------------------------------------------------------------- calibration


def test_brier_matches_sklearn():
    y, lp = _synthetic(500, seed=1)
    p = expit(1.7 * lp - 0.3)
    assert brier(y, p) == pytest.approx(brier_score_loss(y, p), rel=1e-12)
    assert brier(y.astype(int), p) == pytest.approx(np.mean((y - p) ** 2), rel=1e-12)


def test_perfectly_calibrated_gives_slope_one_intercept_zero():
    # n = 20000: SE(slope) ≈ 0.011, SE(intercept) ≈ 0.017; tolerances are ~4.5 SE.
    y, lp = _synthetic(20000, seed=2)
    intercept, slope = calibration_intercept_slope(y, expit(lp))
    assert slope == pytest.approx(1.0, abs=0.05)
    assert intercept == pytest.approx(0.0, abs=0.07)


def test_overconfident_predictions_give_slope_half():
    y, lp = _synthetic(20000, seed=3)
    intercept, slope = calibration_intercept_slope(y, expit(2.0 * lp))
    assert slope == pytest.approx(0.5, abs=0.03)  # SE ≈ 0.006
    assert intercept == pytest.approx(0.0, abs=0.07)


@pytest.mark.parametrize("shift", [-0.8, 0.6])
def test_logit_shift_is_recovered_in_intercept(shift):
    y, lp = _synthetic(20000, seed=4)
    base_intercept, base_slope = calibration_intercept_slope(y, expit(lp))
    intercept, slope = calibration_intercept_slope(y, expit(lp + shift))
    # With logit(p) as an offset, shifting it by δ moves the MLE intercept by exactly −δ.
    assert intercept == pytest.approx(base_intercept - shift, abs=1e-6)
    assert intercept == pytest.approx(-shift, abs=0.07)
    assert slope == pytest.approx(base_slope, abs=1e-6)


def test_intercept_slope_match_newton_oracle():
    y, lp = _synthetic(3000, seed=5)
    p = expit(1.6 * lp + 0.4)
    intercept, slope = calibration_intercept_slope(y, p)
    (oracle_intercept,) = _newton_logistic(y, np.log(p / (1 - p)), offset=True)
    _, oracle_slope = _newton_logistic(y, np.log(p / (1 - p)), offset=False)
    assert intercept == pytest.approx(oracle_intercept, abs=1e-7)
    assert slope == pytest.approx(oracle_slope, abs=1e-6)


def test_intercept_slope_finite_for_saturated_probabilities():
    y = np.array([0, 0, 1, 1, 0, 1, 1, 0])
    p = np.array([0.0, 0.1, 1.0, 0.7, 0.4, 0.3, 0.9, 0.6])
    assert np.all(np.isfinite(calibration_intercept_slope(y, p)))


@pytest.mark.parametrize("strategy", ["quantile", "uniform"])
def test_reliability_curve_matches_sklearn_and_counts_align(strategy):
    y, lp = _synthetic(1000, seed=6)
    p = np.round(expit(lp), 2)  # ties across quantile edges
    predicted, observed, counts = reliability_curve(y, p, num_bins=10, strategy=strategy)
    sk_observed, sk_predicted = calibration_curve(y, p, n_bins=10, strategy=strategy)
    np.testing.assert_allclose(predicted, sk_predicted, rtol=1e-12)
    np.testing.assert_allclose(observed, sk_observed, rtol=1e-12)
    assert counts.sum() == y.size and np.all(counts > 0)
    # Counts are aligned with their bins iff the count-weighted bin means give the totals.
    assert np.sum(counts * predicted) == pytest.approx(p.sum(), rel=1e-12)
    assert np.sum(counts * observed) == pytest.approx(y.sum(), rel=1e-12)


def test_reliability_curve_drops_empty_bins():
    y = np.array([0, 1, 0, 1])
    p = np.array([0.05, 0.06, 0.91, 0.95])
    predicted, observed, counts = reliability_curve(y, p, num_bins=10, strategy="uniform")
    np.testing.assert_allclose(predicted, [0.055, 0.93])
    np.testing.assert_allclose(observed, [0.5, 0.5])
    np.testing.assert_array_equal(counts, [2, 2])


# ------------------------------------------------------------------- post-hoc calibration


def test_temperature_recovers_t_two_and_improves_heldout_nll():
    y_val, lp_val = _synthetic(5000, seed=7)
    y_test, lp_test = _synthetic(5000, seed=8)
    calibrator = fit_temperature(y_val, expit(2.0 * lp_val))
    assert calibrator.method == "temperature" and calibrator.intercept == 0.0
    assert 1.0 / calibrator.slope == pytest.approx(2.0, abs=0.1)
    raw = expit(2.0 * lp_test)
    calibrated = calibrator(raw)
    assert log_loss(y_test, calibrated) < log_loss(y_test, raw) - 0.01
    oracle_nll = log_loss(y_test, expit(lp_test))
    assert log_loss(y_test, calibrated) == pytest.approx(oracle_nll, abs=0.005)
    # A positive temperature only rescales confidence: the ranking is unchanged.
    order = np.argsort(raw, kind="stable")
    np.testing.assert_array_equal(np.argsort(calibrated, kind="stable"), order)


def test_platt_recovers_affine_miscalibration_and_improves_heldout_nll():
    y_val, lp_val = _synthetic(5000, seed=9)
    y_test, lp_test = _synthetic(5000, seed=10)
    # p̂ = σ(2·logit + 0.5), so the truth is logit = 0.5·logit(p̂) − 0.25.
    calibrator = fit_platt(y_val, expit(2.0 * lp_val + 0.5))
    assert calibrator.method == "platt"
    assert calibrator.slope == pytest.approx(0.5, abs=0.04)
    assert calibrator.intercept == pytest.approx(-0.25, abs=0.08)
    raw = expit(2.0 * lp_test + 0.5)
    calibrated = calibrator(raw)
    assert log_loss(y_test, calibrated) < log_loss(y_test, raw) - 0.01
    assert calibration_intercept_slope(y_test, calibrated) == pytest.approx((0.0, 1.0), abs=0.1)


def test_calibrator_round_trips_through_dict_json_and_pickle():
    y, lp = _synthetic(500, seed=11)
    calibrator = fit_platt(y, expit(1.5 * lp))
    restored = Calibrator.from_dict(json.loads(json.dumps(calibrator.to_dict())))
    assert restored == calibrator
    assert pickle.loads(pickle.dumps(calibrator)) == calibrator
    probs = np.array([0.0, 0.01, 0.3, 0.5, 0.99, 1.0])
    np.testing.assert_array_equal(restored(probs), calibrator(probs))
    assert np.all(np.isfinite(restored(probs)))
    identity = Calibrator("temperature", 0.0, 1.0)
    np.testing.assert_allclose(identity(probs[1:-1]), probs[1:-1], rtol=1e-12)


# ----------------------------------------------------------------------- operating points


def _brute_force_rates(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sensitivity and specificity at every observed value used as a threshold (p ≥ t)."""
    thresholds = np.unique(p)
    sens = np.array([np.mean(p[y] >= t) for t in thresholds])
    spec = np.array([np.mean(p[~y] < t) for t in thresholds])
    return thresholds, sens, spec


def _small_tied_sample(seed: int) -> tuple[np.ndarray, np.ndarray]:
    y, lp = _synthetic(60, seed=seed)
    if y.all() or not y.any():
        y[0] = not y[0]
    return y, np.round(expit(lp), 1)  # coarse rounding: many ties


@pytest.mark.parametrize("seed", range(8))
def test_youden_threshold_maximises_j_against_brute_force(seed):
    y, p = _small_tied_sample(seed)
    thresholds, sens, spec = _brute_force_rates(y, p)
    j = sens + spec - 1.0
    best = thresholds[np.isclose(j, j.max(), rtol=0, atol=1e-12)]
    assert youden_threshold(y, p) == best.max()  # ties go to the highest threshold
    fpr, tpr, _ = roc_curve(y, p)
    assert j.max() == pytest.approx(np.max(tpr - fpr), abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_threshold_at_sensitivity_is_highest_reaching_target(seed):
    y, p = _small_tied_sample(seed)
    thresholds, sens, _ = _brute_force_rates(y, p)
    for target in (0.5, 0.9, 1.0):
        t = threshold_at_sensitivity(y, p, target)
        assert confusion_metrics(y, p, t)["sensitivity"] >= target
        assert t == thresholds[sens >= target].max()


def test_confusion_metrics_hand_computed():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    p = np.array([0.9, 0.7, 0.4, 0.8, 0.3, 0.2, 0.5, 0.5])
    # p ≥ 0.5 → predicted [1, 1, 0, 1, 0, 0, 1, 1]: TP 3 (0.9, 0.7, 0.5), FN 1 (0.4),
    # FP 2 (0.8, 0.5), TN 2 (0.3, 0.2).
    m = confusion_metrics(y, p, 0.5)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 2, 2, 1)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(2 / 4)
    assert m["ppv"] == pytest.approx(3 / 5)
    assert m["npv"] == pytest.approx(2 / 3)
    # Above every score nothing is called positive: PPV undefined, NPV = 4 / 8.
    m = confusion_metrics(y, p, 0.95)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (0, 0, 4, 4)
    assert np.isnan(m["ppv"]) and m["npv"] == 0.5 and m["sensitivity"] == 0.0


@pytest.mark.parametrize("rule", ["youden", "sens90"])
def test_operating_point_cis_contain_estimates_and_are_deterministic(rule):
    y, lp = _synthetic(300, seed=12)
    p = expit(lp)
    result = operating_point(y, p, rule, num_replicates=500, seed=3)
    expected = youden_threshold(y, p) if rule == "youden" else threshold_at_sensitivity(y, p, 0.9)
    assert result["rule"] == rule and result["threshold"] == expected
    point = confusion_metrics(y, p, expected)
    for key in ("threshold", "sensitivity", "specificity", "ppv", "npv"):
        low, high = result[f"{key}_ci"]
        assert low <= result[key] <= high, key
        assert low < high, key
        if key != "threshold":
            assert result[key] == point[key]
    if rule == "sens90":
        # The threshold is re-derived in every replicate, so each one keeps sens ≥ 0.9
        # (a threshold fixed at the point estimate would not).
        assert result["sensitivity_ci"][0] >= 0.9
    assert operating_point(y, p, rule, num_replicates=500, seed=3) == result
    assert operating_point(y, p, rule, num_replicates=500, seed=4) != result


def test_operating_point_nan_safe():
    # 2 of 10 positives tie at the lowest score, so sens ≥ 0.9 needs the lowest threshold,
    # which calls everyone positive: NPV is undefined on the full data, and in the ~1/3 of
    # replicates that draw at most one of those two it is defined.
    y = np.r_[np.ones(10, bool), np.zeros(30, bool)]
    p = np.r_[0.0, 0.0, np.linspace(0.55, 0.95, 8), np.linspace(0.05, 0.6, 30)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = operating_point(y, p, "sens90", num_replicates=400, seed=0)
        assert result["threshold"] == 0.0 and np.isnan(result["npv"])
        low, high = result["npv_ci"]
        assert 0.0 <= low <= high <= 1.0
        # All positives at the bottom: NPV is undefined in every replicate.
        p_bottom = np.r_[np.zeros(10), np.linspace(0.05, 0.6, 30)]
        result = operating_point(y, p_bottom, "sens90", num_replicates=100, seed=0)
        assert np.isnan(result["npv"]) and np.all(np.isnan(result["npv_ci"]))
        assert result["ppv_ci"] == (0.25, 0.25)


def test_operating_point_rejects_unknown_rule():
    with pytest.raises(ValueError, match="rule"):
        operating_point([0, 1], [0.2, 0.8], "sens95")
