"""Tests of the ROC statistics against sklearn, published values, R pROC, and slow oracles."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
from scipy.stats import norm, ttest_rel
from sklearn.metrics import roc_auc_score

from pcrjax.evidence import statistics

# pROC::aSAH (Turck et al. 2010, Intensive Care Med 36:107; shipped with the R package
# pROC, GPL), 113 patients in pROC's row order. Transcribed from Python literals in a
# public GitHub test file that states they were exported from pROC 1.19.1; the values
# reproduce every pROC result below. POOR: 1 = outcome "Poor" (pROC's case level).
_ASAH_POOR = (
    '000011010010110010111010000000001001101100000000011000100010100111011011110001101000'
    '00010000000000001111110001000'
)
_ASAH_WFNS = (
    '111132541252551252252111121211342145414255112411255212512221511252145244141214212324'
    '21451154221113125225552445111'
)
_ASAH_S100B = (
    '0.13 0.14 0.1 0.04 0.13 0.1 0.47 0.16 0.18 0.1 0.12 0.1 0.44 0.71 0.04 0.08 0.49 '
    '0.04 0.07 0.33 0.09 0.09 0.07 0.11 0.07 0.17 0.07 0.11 0.13 0.19 0.05 0.16 0.41 0.14 '
    '0.34 0.35 0.48 0.09 0.96 0.25 0.5 0.46 0.16 0.07 0.43 0.45 0.11 0.08 0.09 0.86 0.52 '
    '0.08 0.06 0.13 2.07 0.1 0.14 0.15 0.07 0.06 0.77 0.05 0.09 0.3 0.03 0.09 0.04 0.23 '
    '0.7 0.09 0.27 0.71 0.08 0.26 0.08 0.16 0.09 0.13 0.1 0.08 0.11 0.33 0.11 0.28 0.07 '
    '0.1 0.32 0.22 0.07 0.05 0.24 0.38 0.1 0.15 0.08 0.14 0.1 0.07 0.04 0.19 0.56 0.14 '
    '0.58 0.32 0.82 0.74 0.15 0.47 0.17 0.44 0.15 0.5 0.48'
)
_ASAH_NDKA = (
    '3.01 8.54 8.09 10.42 17.4 12.75 6.0 13.2 15.54 6.01 15.96 17.86 5.18 8.9 13.41 20.75 '
    '11.6 16.11 32.37 54.82 32.41 49.94 40.34 9.47 6.29 12.53 6.54 6.3 80.3 12.8 9.8 9.81 '
    '9.85 18.21 5.03 14.04 21.93 8.02 7.42 8.38 6.59 9.63 13.12 7.96 14.34 41.43 7.63 '
    '7.06 12.59 13.56 3.87 9.44 7.66 12.98 419.19 27.19 22.27 9.95 21.22 11.73 10.4 58.83 '
    '6.39 11.09 12.22 13.67 17.21 22.63 12.9 9.7 21.57 8.23 72.57 15.54 10.51 10.6 14.57 '
    '5.19 9.63 4.61 21.48 17.3 12.71 9.44 11.07 19.46 10.83 5.37 11.97 7.75 9.83 10.55 '
    '28.49 8.53 12.57 12.9 46.83 11.68 12.67 9.01 9.57 34.06 11.72 14.26 47.61 11.67 '
    '24.58 10.33 13.87 15.89 22.43 6.79 13.45'
)


def _asah() -> tuple[np.ndarray, dict[str, np.ndarray]]:
  poor = np.array([c == '1' for c in _ASAH_POOR])
  scores = {
      'wfns': np.array([int(c) for c in _ASAH_WFNS], dtype=float),
      's100b': np.array(_ASAH_S100B.split(), dtype=float),
      'ndka': np.array(_ASAH_NDKA.split(), dtype=float),
  }
  return poor, scores


def _delong_oracle(
    labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """DeLong, DeLong & Clarke-Pearson (1988) by brute force: psi over all (pos, neg) pairs."""
  y = labels.astype(bool)
  m, n = y.sum(), (~y).sum()
  x, z = scores[:, y], scores[:, ~y]  # [k, m], [k, n]
  psi = (x[:, :, None] > z[:, None, :]) + 0.5 * (x[:, :, None] == z[:, None, :])
  v10, v01 = psi.mean(axis=2), psi.mean(axis=1)  # structural components
  aucs = psi.mean(axis=(1, 2))
  k = scores.shape[0]
  s10 = np.array(
      [
          [
              np.sum((v10[r] - aucs[r]) * (v10[s] - aucs[s])) / (m - 1)
              for s in range(k)
          ]
          for r in range(k)
      ]
  )
  s01 = np.array(
      [
          [
              np.sum((v01[r] - aucs[r]) * (v01[s] - aucs[s])) / (n - 1)
              for s in range(k)
          ]
          for r in range(k)
      ]
  )
  return aucs, s10 / m + s01 / n


def _tied_data(seed: int, n: int = 150) -> tuple[np.ndarray, np.ndarray]:
  """Labels and three correlated predictors rounded coarsely so ties are frequent."""
  rng = np.random.default_rng(seed)
  y = rng.random(n) < 0.35
  a = np.round(y + rng.normal(0, 1, n), 1)
  b = np.round(0.6 * a + rng.normal(0, 0.8, n), 1)
  c = np.round(rng.normal(0, 1, n))
  return y, np.stack([a, b, c])


# ---------------------------------------------------------------- auroc


@pytest.mark.parametrize('decimals', [None, 1, 0])
def test_auroc_matches_sklearn(decimals):
  rng = np.random.default_rng(1)
  y = rng.integers(0, 2, 300)
  s = y * 0.8 + rng.normal(size=300)
  if decimals is not None:
    s = np.round(s, decimals)
  assert statistics.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auroc_is_vectorised_over_leading_axes():
  rng = np.random.default_rng(2)
  y = rng.random(80) < 0.4
  s = np.round(rng.normal(size=(3, 4, 80)) + y, 1)
  got = statistics.auroc(y, s)
  assert isinstance(got, np.ndarray) and got.shape == (3, 4)
  want = np.array([[roc_auc_score(y, row) for row in block] for block in s])
  np.testing.assert_allclose(got, want, atol=1e-12)
  assert isinstance(statistics.auroc(y, s[0, 0]), float)


def test_auroc_edge_values():
  y = np.array([0, 0, 1, 1])
  assert statistics.auroc(y, [0.1, 0.2, 0.3, 0.4]) == 1.0
  assert statistics.auroc(y, [0.4, 0.3, 0.2, 0.1]) == 0.0
  assert statistics.auroc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5


@pytest.mark.parametrize('labels', [[1, 1, 1], [0, 0, 0], [True, True, True]])
def test_auroc_needs_both_classes(labels):
  with pytest.raises(ValueError, match='AUROC needs both classes'):
    statistics.auroc(labels, [0.1, 0.2, 0.3])


def test_auroc_rejects_malformed_input():
  with pytest.raises(ValueError, match='0/1'):
    statistics.auroc([0, 1, 2], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match='shape'):
    statistics.auroc([0, 1, 1], [0.1, 0.2])
  with pytest.raises(ValueError, match='finite'):
    statistics.auroc([0, 1, 1], [0.1, np.nan, 0.3])


def test_auroc_hanley_mcneil_1982_ct_ratings():
  """Hanley & McNeil (1982, Radiology 143:29), Table 1: 5-level CT ratings, AUC 0.893."""
  ratings = np.arange(1, 6)
  normals = np.repeat(ratings, [33, 6, 6, 11, 2])
  abnormals = np.repeat(ratings, [3, 2, 2, 11, 33])
  y = np.r_[np.zeros(normals.size), np.ones(abnormals.size)]
  assert (normals.size, abnormals.size) == (58, 51)
  assert round(statistics.auroc(y, np.r_[normals, abnormals]), 3) == 0.893


# ---------------------------------------------------------------- DeLong


@pytest.mark.parametrize(
    ('first', 'second', 'z', 'p'),
    [
        ('wfns', 's100b', 2.20898359144091, 0.0271757822291882),
        ('wfns', 'ndka', 2.79777591868904, 0.00514557970691098),
        ('ndka', 's100b', -1.39077002573558, 0.164295175223054),
    ],
)
def test_delong_matches_proc_roc_test_on_asah(first, second, z, p):
  y, scores = _asah()
  assert (y.size, int(y.sum())) == (113, 41)
  result = statistics.delong_test(y, scores[first], scores[second])
  assert result.z == pytest.approx(z, rel=1e-10)
  assert result.p_value == pytest.approx(p, rel=1e-10)


def test_asah_aucs_match_proc():
  y, scores = _asah()
  aucs, _ = statistics.delong_covariance(
      y, np.stack([scores['wfns'], scores['s100b'], scores['ndka']])
  )
  np.testing.assert_allclose(aucs, [0.824, 0.731, 0.612], atol=5e-4)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_delong_covariance_matches_brute_force_oracle(seed):
  y, scores = _tied_data(seed)
  aucs, cov = statistics.delong_covariance(y, scores)
  want_aucs, want_cov = _delong_oracle(y, scores)
  np.testing.assert_allclose(aucs, want_aucs, rtol=0, atol=1e-13)
  np.testing.assert_allclose(cov, want_cov, rtol=1e-10, atol=1e-16)
  np.testing.assert_allclose(
      aucs, [roc_auc_score(y, s) for s in scores], atol=1e-13
  )


@pytest.mark.parametrize('seed', [0, 1])
def test_delong_test_matches_brute_force_oracle(seed):
  y, scores = _tied_data(seed)
  aucs, cov = _delong_oracle(y, scores[:2])
  z = (aucs[0] - aucs[1]) / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
  result = statistics.delong_test(y, scores[0], scores[1])
  assert isinstance(result, statistics.DeLongResult)
  assert (result.auc_a, result.auc_b) == pytest.approx(tuple(aucs), abs=1e-13)
  assert result.z == pytest.approx(z, rel=1e-10)
  assert result.p_value == pytest.approx(2 * norm.sf(abs(z)), rel=1e-9)
  swapped = statistics.delong_test(y, scores[1], scores[0])
  assert swapped.z == pytest.approx(-result.z)
  assert swapped.p_value == pytest.approx(result.p_value)


def test_delong_identical_rankings_give_z0_p1():
  y, scores = _tied_data(3)
  for other in (
      scores[0],
      3.0 * scores[0] - 1.0,
  ):  # same ranking, different values
    result = statistics.delong_test(y, scores[0], other)
    assert (result.z, result.p_value) == (0.0, 1.0)
    assert result.auc_a == result.auc_b


def test_delong_covariance_of_one_predictor():
  y, scores = _tied_data(4)
  aucs, cov = statistics.delong_covariance(y, scores[0])
  assert aucs.shape == (1,) and cov.shape == (1, 1)
  np.testing.assert_allclose(cov, _delong_oracle(y, scores[:1])[1], rtol=1e-10)


def test_delong_difference_ci_on_asah():
  # pROC's roc.test interval is of AUC_wfns − AUC_s100b; these are its negation, derived from
  # pROC's Z above (SE = difference / Z) and the AUCs.
  y, scores = _asah()
  result = statistics.delong_test(y, scores['wfns'], scores['s100b'])
  assert result.difference == pytest.approx(
      result.auc_b - result.auc_a, abs=1e-15
  )
  assert result.difference == pytest.approx(0.7313686 - 0.8236789, abs=1e-7)
  assert result.difference_ci == pytest.approx(
      (-0.17421442, -0.01040618), abs=1e-8
  )


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_delong_difference_ci_is_the_wald_interval_of_the_test(seed):
  y, scores = _tied_data(seed)
  aucs, cov = _delong_oracle(y, scores[:2])
  se = np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
  result = statistics.delong_test(y, scores[0], scores[1])
  low, high = result.difference_ci
  assert result.difference == pytest.approx(aucs[1] - aucs[0], abs=1e-13)
  assert low < result.difference < high
  assert (high - low) / 2 == pytest.approx(1.959964 * se, rel=1e-6)
  assert (high - low) / 2 == pytest.approx(
      1.959964 * abs(result.difference / result.z), rel=1e-6
  )
  assert (low > 0 or high < 0) == (result.p_value < 0.05)
  narrow = statistics.delong_test(
      y, scores[0], scores[1], confidence=0.5
  ).difference_ci
  assert low < narrow[0] < narrow[1] < high
  assert (high - low) / 2 == pytest.approx(
      1.959964 / 0.6744898 * (narrow[1] - narrow[0]) / 2
  )
  swapped = statistics.delong_test(y, scores[1], scores[0])
  assert swapped.difference_ci == pytest.approx((-high, -low), abs=1e-15)


def test_delong_identical_rankings_give_a_point_interval():
  y, scores = _tied_data(3)
  result = statistics.delong_test(y, scores[0], 3.0 * scores[0] - 1.0)
  assert result.difference == 0.0 and result.difference_ci == (0.0, 0.0)


def test_delong_rejects_bad_confidence():
  y, scores = _tied_data(0, n=40)
  with pytest.raises(ValueError, match='confidence'):
    statistics.delong_test(y, scores[0], scores[1], confidence=0.0)


# ---------------------------------------------------------------- bootstrap


def test_stratified_indices_keep_every_class_count():
  y = np.array([1, 0, 0, 1, 0, 0, 0, 1, 0, 0])
  idx = statistics.stratified_bootstrap_indices(
      y, 500, np.random.default_rng(0)
  )
  assert idx.shape == (500, y.size)
  assert np.all(y[idx] == y)  # each position draws from its own class
  # Resampling is with replacement: some replicate repeats a positive.
  assert any(len(set(row[y == 1])) < 3 for row in idx)


def test_bootstrap_is_deterministic_and_contains_point_estimate():
  y, scores = _tied_data(5, n=200)
  ci = statistics.bootstrap_auroc_ci(y, scores[0], seed=7)
  assert ci == statistics.bootstrap_auroc_ci(y, scores[0], seed=7)
  assert ci != statistics.bootstrap_auroc_ci(y, scores[0], seed=8)
  assert ci[0] < statistics.auroc(y, scores[0]) < ci[1]
  narrow = statistics.bootstrap_auroc_ci(y, scores[0], confidence=0.5, seed=7)
  assert ci[0] < narrow[0] < narrow[1] < ci[1]


def test_bootstrap_never_draws_a_single_class_replicate():
  # One positive in 20: an unstratified bootstrap would often lose it and fail.
  y = np.r_[1, np.zeros(19)]
  s = np.linspace(0.0, 1.0, 20)[::-1]
  assert statistics.bootstrap_auroc_ci(y, s, num_replicates=300) == (1.0, 1.0)


def test_bootstrap_width_agrees_with_delong_for_a_large_sample():
  rng = np.random.default_rng(6)
  y = rng.random(800) < 0.4
  s = y + rng.normal(0, 1.2, 800)
  low, high = statistics.bootstrap_auroc_ci(y, s, seed=0)
  _, cov = statistics.delong_covariance(y, s)
  assert high - low == pytest.approx(2 * 1.96 * np.sqrt(cov[0, 0]), rel=0.2)


def test_bootstrap_rejects_bad_arguments():
  y, scores = _tied_data(0, n=40)
  with pytest.raises(ValueError, match='confidence'):
    statistics.bootstrap_auroc_ci(y, scores[0], confidence=1.0)
  with pytest.raises(ValueError, match='num_replicates'):
    statistics.bootstrap_auroc_ci(y, scores[0], num_replicates=0)
  with pytest.raises(ValueError, match='shape'):
    statistics.bootstrap_auroc_ci(y, scores)


def test_bootstrap_intervals_are_percentiles_of_the_stratified_replicates():
  y = np.array([1, 0, 0, 1, 0, 0, 0, 1, 0, 0])
  s = np.linspace(0.0, 1.0, y.size)

  def replicate_fn(idx):
    mean = s[idx].mean(axis=-1)
    return {
        'mean': mean,
        'never': np.full(mean.shape, np.nan),
        'half': np.where(np.arange(mean.size) % 2 == 0, mean, np.nan),
    }

  with warnings.catch_warnings():
    warnings.simplefilter('error')
    intervals = statistics.bootstrap_intervals(
        y, replicate_fn, num_replicates=400, confidence=0.9, seed=3
    )
  # A sample this small is one chunk: the same generator draws the same replicates.
  idx = statistics.stratified_bootstrap_indices(
      y, 400, np.random.default_rng(3)
  )
  means = s[idx].mean(axis=-1)
  assert intervals['mean'] == pytest.approx(
      tuple(np.quantile(means, [0.05, 0.95])), abs=1e-15
  )
  assert intervals['half'] == pytest.approx(
      tuple(np.quantile(means[::2], [0.05, 0.95])), abs=1e-15
  )
  assert np.all(np.isnan(intervals['never']))


def test_bootstrap_intervals_reject_bad_arguments():
  y = np.array([0, 1, 0, 1])
  with pytest.raises(ValueError, match='num_replicates'):
    statistics.bootstrap_intervals(y, lambda idx: {}, num_replicates=0)
  with pytest.raises(ValueError, match='confidence'):
    statistics.bootstrap_intervals(y, lambda idx: {}, confidence=1.5)


# ---------------------------------------------------------------- input checks


def test_check_labels_returns_booleans():
  y = statistics.check_labels([0, 1, 1, 0])
  assert y.dtype == np.bool_ and y.tolist() == [False, True, True, False]
  with pytest.raises(ValueError, match='shape'):
    statistics.check_labels([[0, 1]])


def test_check_probs_and_labels():
  y, p = statistics.check_labels_and_probs([0, 1], [0.0, 1.0])
  assert y.dtype == np.bool_ and p.dtype == np.float64
  for bad in ([0.2, 1.1], [0.2, np.nan], [-0.1, 0.5]):
    with pytest.raises(ValueError, match='finite and in'):
      statistics.check_probs(bad)
  with pytest.raises(ValueError, match='shape'):
    statistics.check_labels_and_probs([0, 1], [0.2, 0.3, 0.4])


# ---------------------------------------------------------------- corrected resampled t-test


def test_corrected_ttest_hand_computed():
  # J = 5 folds of 5-fold CV (n_test/n_train = 1/4): mean 0.02, s² = 0.0026/4 = 0.00065, corrected
  # variance (1/5 + 1/4) s² = 0.0002925. For 4 degrees of freedom the t CDF is closed-form,
  # F(t) = 1/2 + (3/8) x (1 − t²/(12 (1 + t²/4))) with x = t / sqrt(1 + t²/4), and t_{0.975,4} is
  # the textbook 2.7764451.
  result = statistics.corrected_resampled_ttest(
      [0.02, 0.05, -0.01, 0.04, 0.0], test_train_ratio=0.25
  )
  se = np.sqrt(0.45 * 0.00065)
  t = 0.02 / se
  x = t / np.sqrt(1 + t**2 / 4)
  p = 2 * (1 - (0.5 + 3 / 8 * x * (1 - t**2 / (12 * (1 + t**2 / 4)))))
  assert result.df == 4
  assert result.difference == pytest.approx(0.02, rel=1e-12)
  assert result.t == pytest.approx(t, rel=1e-12) and t == pytest.approx(
      1.16941069, rel=1e-8
  )
  assert result.p_value == pytest.approx(p, rel=1e-9)
  half_width = 2.7764451052 * se
  np.testing.assert_allclose(
      result.difference_ci, [0.02 - half_width, 0.02 + half_width], rtol=1e-9
  )


@pytest.mark.parametrize('seed', range(3))
def test_corrected_ttest_widens_the_naive_paired_t_test(seed):
  rng = np.random.default_rng(seed)
  a = rng.uniform(0.6, 0.8, 15)  # 3 repeats × 5 folds.
  b = a + rng.normal(0.03, 0.03, 15)
  naive = ttest_rel(b, a)
  uncorrected = statistics.corrected_resampled_ttest(
      b - a, test_train_ratio=0.0
  )
  assert uncorrected.p_value == pytest.approx(naive.pvalue, rel=1e-9)
  assert uncorrected.t == pytest.approx(naive.statistic, rel=1e-9)
  corrected = statistics.corrected_resampled_ttest(b - a, test_train_ratio=0.25)
  assert corrected.p_value > naive.pvalue
  assert corrected.difference == uncorrected.difference
  # The half-width grows by sqrt((1/J + 1/4) / (1/J)) = sqrt(1 + 15/4).
  width = lambda r: r.difference_ci[1] - r.difference_ci[0]  # noqa: E731
  assert width(corrected) == pytest.approx(
      width(uncorrected) * np.sqrt(1 + 15 / 4), rel=1e-12
  )
  assert corrected.difference_ci[0] < uncorrected.difference_ci[0]


def test_corrected_ttest_degenerate_cases():
  with pytest.raises(ValueError, match='J >= 2'):
    statistics.corrected_resampled_ttest([0.1], test_train_ratio=0.25)
  with pytest.raises(ValueError, match='J >= 2'):
    statistics.corrected_resampled_ttest([[0.1, 0.2]], test_train_ratio=0.25)
  with pytest.raises(ValueError, match='finite'):
    statistics.corrected_resampled_ttest([0.1, np.nan], test_train_ratio=0.25)
  with pytest.raises(ValueError, match='test_train_ratio'):
    statistics.corrected_resampled_ttest([0.1, 0.2], test_train_ratio=-1.0)
  with pytest.raises(ValueError, match='confidence'):
    statistics.corrected_resampled_ttest(
        [0.1, 0.2], test_train_ratio=0.25, confidence=1.0
    )
  # No variance: all zero is no evidence of a difference; a constant non-zero has no t (NaN),
  # also when rounding makes the constant unequal in the last bit.
  same = statistics.corrected_resampled_ttest(
      np.zeros(6), test_train_ratio=0.25
  )
  assert (same.t, same.p_value, same.difference, same.difference_ci) == (
      0.0,
      1.0,
      0.0,
      (0.0, 0.0),
  )
  for constant_d in (
      np.full(6, 0.05),
      0.05 + np.array([0, 1, 0, -1, 0, 0]) * np.spacing(0.05),
  ):
    constant = statistics.corrected_resampled_ttest(
        constant_d, test_train_ratio=0.25
    )
    assert constant.difference == pytest.approx(0.05) and constant.df == 5
    assert np.isnan(constant.t) and np.isnan(constant.p_value)
    assert np.isnan(constant.difference_ci).all()


# ---------------------------------------------------------------- Holm


def test_holm_hand_worked():
  # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04, made
  # non-decreasing: 0.02, 0.03, 0.06, 0.06 (statsmodels multipletests(method='holm') agrees).
  np.testing.assert_allclose(
      statistics.holm([0.01, 0.04, 0.03, 0.005]),
      [0.03, 0.06, 0.06, 0.02],
      rtol=1e-12,
  )
  np.testing.assert_array_equal(
      statistics.holm([0.5, 0.6]), [1.0, 1.0]
  )  # capped at 1
  np.testing.assert_allclose(
      statistics.holm([0.02, 0.5, 0.02]), [0.06, 0.5, 0.06], rtol=1e-12
  )
  assert statistics.holm([0.03]).tolist() == [0.03]
  assert statistics.holm([]).shape == (0,)
  # A test that could not be done stays NaN and still counts in k.
  np.testing.assert_allclose(
      statistics.holm([0.01, np.nan, 0.03]), [0.03, np.nan, 0.06], rtol=1e-12
  )


@pytest.mark.parametrize('seed', range(3))
def test_holm_matches_step_down_definition(seed):
  p = np.random.default_rng(seed).random(7) ** 3
  k = p.size
  ranks = np.argsort(p)
  want = np.empty(k)
  for i, index in enumerate(ranks):
    want[index] = min(1.0, max((k - j) * p[ranks[j]] for j in range(i + 1)))
  adjusted = statistics.holm(p)
  np.testing.assert_allclose(adjusted, want, rtol=1e-12)
  assert np.all(adjusted >= p)
  # Rejecting where adjusted < alpha is Holm's procedure: reject in order while p_(i) < alpha/(k-i).
  for alpha in (0.01, 0.05, 0.2):
    num_rejected = 0
    while num_rejected < k and p[ranks[num_rejected]] < alpha / (
        k - num_rejected
    ):
      num_rejected += 1
    assert set(np.flatnonzero(adjusted < alpha)) == set(ranks[:num_rejected])


# ---------------------------------------------------------------- imports


def test_statistics_layer_imports_no_jax_and_nothing_else_of_pcrjax():
  # A fresh interpreter: this one has JAX loaded by the test fixtures.
  code = (
      'import sys; '
      'from pcrjax.evidence import calibration, decision_curve, operating_points, statistics; '
      'print(*sys.modules)'
  )
  loaded = subprocess.run(
      [sys.executable, '-c', code], capture_output=True, text=True, check=True
  ).stdout.split()
  assert not [
      m for m in loaded if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax')
  ]
  assert {m for m in loaded if m.startswith('pcrjax')} == {
      'pcrjax',
      'pcrjax.evidence',
      'pcrjax.evidence.calibration',
      'pcrjax.evidence.decision_curve',
      'pcrjax.evidence.operating_points',
      'pcrjax.evidence.statistics',
  }
