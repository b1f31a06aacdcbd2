"""Tests of decision-curve analysis against hand-computed net benefits and its known limits."""

import csv
import io

import numpy as np
import pytest
from scipy.special import expit

from pcrjax.evidence import decision_curve
from tests import synthetic


def test_net_benefit_hand_computed():
  y = np.array([1, 1, 0, 0, 1])
  p = np.array([0.9, 0.4, 0.6, 0.2, 0.3])
  # pt = 0: everyone positive, TP 3, and FPs cost nothing. pt = 0.25 and 0.3 (0.3 itself is
  # called positive): TP 3, FP 1. pt = 0.5: TP 1 (0.9), FP 1 (0.6). pt = 0.8: TP 1, FP 0.
  got = decision_curve.net_benefit(y, p, [0.0, 0.25, 0.3, 0.5, 0.8])
  want = [
      3 / 5,
      3 / 5 - 1 / 5 * 0.25 / 0.75,
      3 / 5 - 1 / 5 * 0.3 / 0.7,
      1 / 5 - 1 / 5,
      1 / 5,
  ]
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(
      decision_curve.treat_all(y, [0.0, 0.25, 0.5]),
      [0.6, 0.6 - 0.4 / 3, 0.2],
      rtol=1e-12,
  )


def test_net_benefit_matches_the_definition():
  y, lp = synthetic.calibrated(200, seed=1)
  p = np.round(expit(1.3 * lp), 2)  # ties at the thresholds
  thresholds = np.linspace(0.0, 0.99, 100)
  called = p[None, :] >= thresholds[:, None]
  tp, fp = (called & y).sum(axis=1), (called & ~y).sum(axis=1)
  want = tp / y.size - fp / y.size * thresholds / (1 - thresholds)
  np.testing.assert_allclose(
      decision_curve.net_benefit(y, p, thresholds), want, rtol=1e-12, atol=1e-15
  )


def test_treat_all_is_a_model_calling_everyone_positive():
  y, _ = synthetic.calibrated(100, seed=2)
  thresholds = decision_curve.DEFAULT_THRESHOLDS
  np.testing.assert_allclose(
      decision_curve.treat_all(y, thresholds),
      decision_curve.net_benefit(y, np.ones(y.size), thresholds),
      rtol=1e-12,
      atol=1e-15,
  )
  # Treating all is worth nothing exactly at the prevalence.
  assert decision_curve.treat_all(y, [y.mean()]) == pytest.approx(
      [0.0], abs=1e-15
  )


def test_perfect_classifier_reaches_the_prevalence_everywhere():
  y, _ = synthetic.calibrated(100, seed=3)
  thresholds = np.r_[0.0, decision_curve.DEFAULT_THRESHOLDS, 0.999]
  np.testing.assert_allclose(
      decision_curve.net_benefit(y, y.astype(float), thresholds),
      y.mean(),
      rtol=1e-12,
  )


def test_calibrated_model_beats_both_references():
  # Acting on calibrated risks at pt maximises the expected net benefit at pt, so in a large
  # sample the model is (up to sampling noise) at least as good as treating all or none.
  y, lp = synthetic.calibrated(20000, seed=4)
  thresholds = decision_curve.DEFAULT_THRESHOLDS
  model = decision_curve.net_benefit(y, expit(lp), thresholds)
  best_reference = np.maximum(decision_curve.treat_all(y, thresholds), 0.0)
  assert np.all(model >= best_reference - 0.005)
  assert np.mean(model > best_reference) > 0.9


def test_decision_curve_records_write_as_csv():
  y, lp = synthetic.calibrated(150, seed=5)
  p = expit(lp)
  records = decision_curve.decision_curve(y, p)
  assert len(records) == 91
  assert [r['threshold'] for r in records] == [k / 100 for k in range(5, 96)]
  assert records[2]['threshold'] == 0.07  # exactly, so a CSV shows 0.07
  thresholds = np.array([r['threshold'] for r in records])
  np.testing.assert_array_equal(
      [r['net_benefit_model'] for r in records],
      decision_curve.net_benefit(y, p, thresholds),
  )
  np.testing.assert_array_equal(
      [r['net_benefit_all'] for r in records],
      decision_curve.treat_all(y, thresholds),
  )
  assert all(r['net_benefit_none'] == 0.0 for r in records)
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=list(records[0]))
  writer.writeheader()
  writer.writerows(records)
  assert out.getvalue().splitlines()[0] == (
      'threshold,net_benefit_model,net_benefit_all,net_benefit_none'
  )
  assert [
      r['threshold'] for r in decision_curve.decision_curve(y, p, [0.3, 0.1])
  ] == [0.3, 0.1]


@pytest.mark.parametrize('thresholds', [[1.0], [-0.1], [np.nan], [0.2, 1.5]])
def test_thresholds_must_be_in_unit_interval(thresholds):
  with pytest.raises(ValueError, match='thresholds'):
    decision_curve.net_benefit([0, 1], [0.2, 0.8], thresholds)
  with pytest.raises(ValueError, match='thresholds'):
    decision_curve.treat_all([0, 1], thresholds)
