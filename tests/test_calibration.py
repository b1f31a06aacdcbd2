"""Tests of calibration against sklearn, a Newton oracle and synthetic truth."""

import json
import pickle

import numpy as np
import pytest
from scipy.special import expit
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, log_loss

from pcrjax.evidence import calibration, statistics
from tests import synthetic


def _newton_logistic(y: np.ndarray, x: np.ndarray, offset: bool) -> np.ndarray:
  """Independent oracle: Newton–Raphson MLE of logit P(y) = a + b·x, or a + x if offset."""
  design = (
      np.ones((x.size, 1)) if offset else np.column_stack([np.ones_like(x), x])
  )
  base = x if offset else np.zeros_like(x)
  beta = np.zeros(design.shape[1])
  for _ in range(50):
    mu = expit(base + design @ beta)
    hessian = design.T @ (design * (mu * (1 - mu))[:, None])
    beta = beta + np.linalg.solve(hessian, design.T @ (y - mu))
  return beta


# ----------------------------------------------------------------------------- calibration


def test_brier_matches_sklearn():
  y, lp = synthetic.calibrated(500, seed=1)
  p = expit(1.7 * lp - 0.3)
  assert calibration.brier(y, p) == pytest.approx(
      brier_score_loss(y, p), rel=1e-12
  )
  assert calibration.brier(y.astype(int), p) == pytest.approx(
      np.mean((y - p) ** 2), rel=1e-12
  )


def test_perfectly_calibrated_gives_slope_one_intercept_zero():
  # n = 20000: SE(slope) ≈ 0.011, SE(intercept) ≈ 0.017; tolerances are ~4.5 SE.
  y, lp = synthetic.calibrated(20000, seed=2)
  intercept, slope = calibration.calibration_intercept_slope(y, expit(lp))
  assert slope == pytest.approx(1.0, abs=0.05)
  assert intercept == pytest.approx(0.0, abs=0.07)


def test_overconfident_predictions_give_slope_half():
  y, lp = synthetic.calibrated(20000, seed=3)
  intercept, slope = calibration.calibration_intercept_slope(y, expit(2.0 * lp))
  assert slope == pytest.approx(0.5, abs=0.03)  # SE ≈ 0.006
  assert intercept == pytest.approx(0.0, abs=0.07)


@pytest.mark.parametrize('shift', [-0.8, 0.6])
def test_logit_shift_is_recovered_in_intercept(shift):
  y, lp = synthetic.calibrated(20000, seed=4)
  base_intercept, base_slope = calibration.calibration_intercept_slope(
      y, expit(lp)
  )
  intercept, slope = calibration.calibration_intercept_slope(
      y, expit(lp + shift)
  )
  # With logit(p) as an offset, shifting it by δ moves the MLE intercept by exactly −δ.
  assert intercept == pytest.approx(base_intercept - shift, abs=1e-6)
  assert intercept == pytest.approx(-shift, abs=0.07)
  assert slope == pytest.approx(base_slope, abs=1e-6)


def test_intercept_slope_match_newton_oracle():
  y, lp = synthetic.calibrated(3000, seed=5)
  p = expit(1.6 * lp + 0.4)
  intercept, slope = calibration.calibration_intercept_slope(y, p)
  (oracle_intercept,) = _newton_logistic(y, np.log(p / (1 - p)), offset=True)
  _, oracle_slope = _newton_logistic(y, np.log(p / (1 - p)), offset=False)
  assert intercept == pytest.approx(oracle_intercept, abs=1e-7)
  assert slope == pytest.approx(oracle_slope, abs=1e-6)


def test_intercept_slope_finite_for_saturated_probabilities():
  y = np.array([0, 0, 1, 1, 0, 1, 1, 0])
  p = np.array([0.0, 0.1, 1.0, 0.7, 0.4, 0.3, 0.9, 0.6])
  assert np.all(np.isfinite(calibration.calibration_intercept_slope(y, p)))


@pytest.mark.parametrize('strategy', ['quantile', 'uniform'])
def test_reliability_curve_matches_sklearn_and_counts_align(strategy):
  y, lp = synthetic.calibrated(1000, seed=6)
  p = np.round(expit(lp), 2)  # ties across quantile edges
  predicted, observed, counts = calibration.reliability_curve(
      y, p, num_bins=10, strategy=strategy
  )
  sk_observed, sk_predicted = calibration_curve(
      y, p, n_bins=10, strategy=strategy
  )
  np.testing.assert_allclose(predicted, sk_predicted, rtol=1e-12)
  np.testing.assert_allclose(observed, sk_observed, rtol=1e-12)
  assert counts.sum() == y.size and np.all(counts > 0)
  # Counts are aligned with their bins iff the count-weighted bin means give the totals.
  assert np.sum(counts * predicted) == pytest.approx(p.sum(), rel=1e-12)
  assert np.sum(counts * observed) == pytest.approx(y.sum(), rel=1e-12)


def test_reliability_curve_drops_empty_bins():
  y = np.array([0, 1, 0, 1])
  p = np.array([0.05, 0.06, 0.91, 0.95])
  predicted, observed, counts = calibration.reliability_curve(
      y, p, num_bins=10, strategy='uniform'
  )
  np.testing.assert_allclose(predicted, [0.055, 0.93])
  np.testing.assert_allclose(observed, [0.5, 0.5])
  np.testing.assert_array_equal(counts, [2, 2])


# ------------------------------------------------------------------- post-hoc calibration


def test_temperature_recovers_t_two_and_improves_heldout_nll():
  y_val, lp_val = synthetic.calibrated(5000, seed=7)
  y_test, lp_test = synthetic.calibrated(5000, seed=8)
  calibrator = calibration.fit_temperature(y_val, expit(2.0 * lp_val))
  assert calibrator.method == 'temperature' and calibrator.intercept == 0.0
  assert 1.0 / calibrator.slope == pytest.approx(2.0, abs=0.1)
  raw = expit(2.0 * lp_test)
  calibrated = calibrator(raw)
  assert log_loss(y_test, calibrated) < log_loss(y_test, raw) - 0.01
  oracle_nll = log_loss(y_test, expit(lp_test))
  assert log_loss(y_test, calibrated) == pytest.approx(oracle_nll, abs=0.005)
  # A positive temperature only rescales confidence: the ranking is unchanged.
  order = np.argsort(raw, kind='stable')
  np.testing.assert_array_equal(np.argsort(calibrated, kind='stable'), order)


def test_platt_recovers_affine_miscalibration_and_improves_heldout_nll():
  y_val, lp_val = synthetic.calibrated(5000, seed=9)
  y_test, lp_test = synthetic.calibrated(5000, seed=10)
  # p̂ = σ(2·logit + 0.5), so the truth is logit = 0.5·logit(p̂) − 0.25.
  calibrator = calibration.fit_platt(y_val, expit(2.0 * lp_val + 0.5))
  assert calibrator.method == 'platt'
  assert calibrator.slope == pytest.approx(0.5, abs=0.04)
  assert calibrator.intercept == pytest.approx(-0.25, abs=0.08)
  raw = expit(2.0 * lp_test + 0.5)
  calibrated = calibrator(raw)
  assert log_loss(y_test, calibrated) < log_loss(y_test, raw) - 0.01
  intercept_and_slope = calibration.calibration_intercept_slope(
      y_test, calibrated
  )
  assert intercept_and_slope == pytest.approx((0.0, 1.0), abs=0.1)


def test_calibrator_round_trips_through_dict_json_and_pickle():
  y, lp = synthetic.calibrated(500, seed=11)
  calibrator = calibration.fit_platt(y, expit(1.5 * lp))
  restored = calibration.Calibrator.from_dict(
      json.loads(json.dumps(calibrator.to_dict()))
  )
  assert restored == calibrator
  assert pickle.loads(pickle.dumps(calibrator)) == calibrator
  probs = np.array([0.0, 0.01, 0.3, 0.5, 0.99, 1.0])
  np.testing.assert_array_equal(restored(probs), calibrator(probs))
  assert np.all(np.isfinite(restored(probs)))
  identity = calibration.Calibrator('temperature', 0.0, 1.0)
  np.testing.assert_allclose(identity(probs[1:-1]), probs[1:-1], rtol=1e-12)


# ----------------------------------------------------------------- calibration intervals


def test_calibration_ci_is_the_bootstrap_of_the_point_fits():
  y, lp = synthetic.calibrated(120, seed=13)
  p = expit(1.5 * lp + 0.3)
  got = calibration.calibration_ci(
      y, p, num_replicates=60, confidence=0.8, seed=2
  )
  # 120 samples are one chunk: the same generator draws the same replicates.
  idx = statistics.stratified_bootstrap_indices(y, 60, np.random.default_rng(2))
  fits = np.array(
      [calibration.calibration_intercept_slope(y, p[i]) for i in idx]
  )
  want = np.quantile(fits, [0.1, 0.9], axis=0)
  assert got['intercept_ci'] == pytest.approx(tuple(want[:, 0]), abs=1e-7)
  assert got['slope_ci'] == pytest.approx(tuple(want[:, 1]), abs=1e-6)


def test_calibration_ci_contains_estimates_is_deterministic_and_has_wald_width():
  y, lp = synthetic.calibrated(1000, seed=14)
  p = expit(1.5 * lp)
  result = calibration.calibration_ci(y, p, num_replicates=1000, seed=5)
  assert set(result) == {'intercept_ci', 'slope_ci'}
  intercept, slope = calibration.calibration_intercept_slope(y, p)
  assert result['intercept_ci'][0] < intercept < result['intercept_ci'][1]
  assert result['slope_ci'][0] < slope < result['slope_ci'][1]
  assert result['slope_ci'][0] < 1 / 1.5 < result['slope_ci'][1]
  assert calibration.calibration_ci(y, p, num_replicates=1000, seed=5) == result
  assert calibration.calibration_ci(y, p, num_replicates=1000, seed=6) != result
  # Wald SE of the slope from the Fisher information of the fit.
  x = np.column_stack([np.ones(y.size), np.log(p / (1 - p))])
  mu = expit(x @ _newton_logistic(y, x[:, 1], offset=False))
  se = np.sqrt(np.linalg.inv(x.T @ (x * (mu * (1 - mu))[:, None]))[1, 1])
  low, high = result['slope_ci']
  assert high - low == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_calibration_ci_slope_is_unbounded_when_replicates_separate():
  # Only one of five pCRs (0.3) overlaps the non-pCRs: replicates without it are separated, so
  # their slope is +inf, and too many of them (~1/3) for a finite upper bound.
  y = np.r_[np.ones(5, bool), np.zeros(25, bool)]
  p = np.r_[0.9, 0.85, 0.8, 0.75, 0.3, np.linspace(0.05, 0.5, 25)]
  result = calibration.calibration_ci(y, p, num_replicates=400)
  low, high = result['slope_ci']
  assert np.isfinite(low) and high == np.inf
  assert np.all(np.isfinite(result['intercept_ci']))
  # Fully separated (and reversed): every replicate's slope is −inf.
  reversed_probs = (
      1.0 - np.r_[0.9, 0.85, 0.8, 0.75, 0.7, np.linspace(0.05, 0.5, 25)]
  )
  result = calibration.calibration_ci(y, reversed_probs, num_replicates=50)
  assert result['slope_ci'] == (-np.inf, -np.inf)
  assert np.all(np.isfinite(result['intercept_ci']))


def test_calibration_ci_rejects_bad_arguments():
  y, lp = synthetic.calibrated(50, seed=15)
  with pytest.raises(ValueError, match='confidence'):
    calibration.calibration_ci(y, expit(lp), confidence=0.0)
  with pytest.raises(ValueError, match='num_replicates'):
    calibration.calibration_ci(y, expit(lp), num_replicates=0)


# ------------------------------------------------------------------ degenerate calibration


@pytest.mark.parametrize(
    ('transform', 'reason'),
    [
        (lambda lp: expit(lp), None),
        (lambda lp: expit(2.0 * lp - 0.5), None),
        (lambda lp: 0.3 + 0.04 * expit(lp), 'predictions span < 0.05'),
        (lambda lp: expit(-lp), 'calibration slope < 0'),
        (lambda lp: expit(0.1 * lp), 'calibration slope > 5'),
    ],
)
def test_degenerate_calibration_rules(transform, reason):
  y, lp = synthetic.calibrated(300, seed=16)
  assert calibration.degenerate_calibration(y, transform(lp)) == reason


def test_degenerate_calibration_flags_separation():
  y = np.r_[np.ones(5, bool), np.zeros(25, bool)]
  separated = np.r_[
      0.9, 0.85, 0.8, 0.75, 0.5, np.linspace(0.05, 0.5, 25)
  ]  # Tied at 0.5.
  for probs in (separated, 1.0 - separated):
    assert (
        calibration.degenerate_calibration(y, probs)
        == 'predictions separate the classes'
    )
  overlapping = np.r_[0.9, 0.85, 0.8, 0.75, 0.3, np.linspace(0.05, 0.5, 25)]
  assert calibration.degenerate_calibration(y, overlapping) is None
