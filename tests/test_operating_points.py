"""Tests of the operating points against brute force and hand-computed confusion matrices."""

import warnings

import numpy as np
import pytest
from scipy.special import expit
from sklearn.metrics import roc_curve

from pcrjax.evidence import operating_points, statistics
from tests import synthetic


def _brute_force_rates(
    y: np.ndarray, p: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Sensitivity and specificity at every observed value used as a threshold (p ≥ t)."""
  thresholds = np.unique(p)
  sens = np.array([np.mean(p[y] >= t) for t in thresholds])
  spec = np.array([np.mean(p[~y] < t) for t in thresholds])
  return thresholds, sens, spec


def _small_tied_sample(seed: int) -> tuple[np.ndarray, np.ndarray]:
  y, lp = synthetic.calibrated(60, seed=seed)
  if y.all() or not y.any():
    y[0] = not y[0]
  return y, np.round(expit(lp), 1)  # coarse rounding: many ties


@pytest.mark.parametrize('seed', range(8))
def test_youden_threshold_maximises_j_against_brute_force(seed):
  y, p = _small_tied_sample(seed)
  thresholds, sens, spec = _brute_force_rates(y, p)
  j = sens + spec - 1.0
  best = thresholds[np.isclose(j, j.max(), rtol=0, atol=1e-12)]
  assert (
      operating_points.youden_threshold(y, p) == best.max()
  )  # ties go to the highest threshold
  fpr, tpr, _ = roc_curve(y, p)
  assert j.max() == pytest.approx(np.max(tpr - fpr), abs=1e-12)


@pytest.mark.parametrize('seed', range(8))
def test_threshold_at_sensitivity_is_highest_reaching_target(seed):
  y, p = _small_tied_sample(seed)
  thresholds, sens, _ = _brute_force_rates(y, p)
  for target in (0.5, 0.9, 1.0):
    t = operating_points.threshold_at_sensitivity(y, p, target)
    assert operating_points.confusion_metrics(y, p, t)['sensitivity'] >= target
    assert t == thresholds[sens >= target].max()


def test_confusion_metrics_hand_computed():
  y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
  p = np.array([0.9, 0.7, 0.4, 0.8, 0.3, 0.2, 0.5, 0.5])
  # p ≥ 0.5 → predicted [1, 1, 0, 1, 0, 0, 1, 1]: TP 3 (0.9, 0.7, 0.5), FN 1 (0.4),
  # FP 2 (0.8, 0.5), TN 2 (0.3, 0.2).
  m = operating_points.confusion_metrics(y, p, 0.5)
  assert (m['tp'], m['fp'], m['tn'], m['fn']) == (3, 2, 2, 1)
  assert m['sensitivity'] == pytest.approx(3 / 4)
  assert m['specificity'] == pytest.approx(2 / 4)
  assert m['ppv'] == pytest.approx(3 / 5)
  assert m['npv'] == pytest.approx(2 / 3)
  # Above every score nothing is called positive: PPV undefined, NPV = 4 / 8.
  m = operating_points.confusion_metrics(y, p, 0.95)
  assert (m['tp'], m['fp'], m['tn'], m['fn']) == (0, 0, 4, 4)
  assert np.isnan(m['ppv']) and m['npv'] == 0.5 and m['sensitivity'] == 0.0


@pytest.mark.parametrize('rule', ['youden', 'sens90'])
def test_operating_point_cis_contain_estimates_and_are_deterministic(rule):
  y, lp = synthetic.calibrated(300, seed=12)
  p = expit(lp)
  result = operating_points.operating_point(
      y, p, rule, num_replicates=500, seed=3
  )
  expected = (
      operating_points.youden_threshold(y, p)
      if rule == 'youden'
      else operating_points.threshold_at_sensitivity(y, p, 0.9)
  )
  assert result['rule'] == rule and result['threshold'] == expected
  point = operating_points.confusion_metrics(y, p, expected)
  for key in ('threshold', 'sensitivity', 'specificity', 'ppv', 'npv'):
    low, high = result[f'{key}_ci']
    assert low <= result[key] <= high, key
    assert low < high, key
    if key != 'threshold':
      assert result[key] == point[key]
  if rule == 'sens90':
    # The threshold is re-derived in every replicate, so each one keeps sens ≥ 0.9
    # (a threshold fixed at the point estimate would not).
    assert result['sensitivity_ci'][0] >= 0.9
  assert (
      operating_points.operating_point(y, p, rule, num_replicates=500, seed=3)
      == result
  )
  assert (
      operating_points.operating_point(y, p, rule, num_replicates=500, seed=4)
      != result
  )


def test_operating_point_nan_safe():
  # 2 of 10 positives tie at the lowest score, so sens ≥ 0.9 needs the lowest threshold,
  # which calls everyone positive: NPV is undefined on the full data, and in the ~1/3 of
  # replicates that draw at most one of those two it is defined.
  y = np.r_[np.ones(10, bool), np.zeros(30, bool)]
  p = np.r_[0.0, 0.0, np.linspace(0.55, 0.95, 8), np.linspace(0.05, 0.6, 30)]
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    result = operating_points.operating_point(
        y, p, 'sens90', num_replicates=400, seed=0
    )
    assert result['threshold'] == 0.0 and np.isnan(result['npv'])
    low, high = result['npv_ci']
    assert 0.0 <= low <= high <= 1.0
    # All positives at the bottom: NPV is undefined in every replicate.
    p_bottom = np.r_[np.zeros(10), np.linspace(0.05, 0.6, 30)]
    result = operating_points.operating_point(
        y, p_bottom, 'sens90', num_replicates=100, seed=0
    )
    assert np.isnan(result['npv']) and np.all(np.isnan(result['npv_ci']))
    assert result['ppv_ci'] == (0.25, 0.25)


def test_operating_point_rejects_unknown_rule():
  with pytest.raises(ValueError, match='rule'):
    operating_points.operating_point([0, 1], [0.2, 0.8], 'sens95')


@pytest.mark.parametrize('decimals', [1, 2, 8])
def test_roc_band_is_that_of_sklearns_curve_of_each_replicate(decimals):
  """Ties (rounded scores) make vertical and diagonal steps, where the interpolation matters."""
  rng = np.random.default_rng(3)
  y = rng.random(150) < 0.35
  s = np.round(0.6 * rng.random(150) + 0.4 * y, decimals)
  grid = np.linspace(0, 1, 101)
  curves = [
      np.interp(grid, *roc_curve(y[i], s[i])[:2])
      for i in statistics.stratified_bootstrap_indices(
          y, 200, np.random.default_rng(5)
      )
  ]
  low, high = operating_points.bootstrap_roc_band(
      y, s, grid, num_replicates=200, seed=5
  )
  np.testing.assert_allclose(
      low, np.percentile(curves, 2.5, axis=0), rtol=0, atol=1e-12
  )
  np.testing.assert_allclose(
      high, np.percentile(curves, 97.5, axis=0), rtol=0, atol=1e-12
  )
  assert (low < high).any() and (low <= high).all()
