"""ROC statistics for pCR prediction: AUROC, its bootstrap interval, DeLong's test, the corrected
resampled t-test over cross-validation folds, and Holm.

Conventions follow the R package pROC (Robin et al. 2011), the usual reference in the clinical
literature, so that numbers reported here can be compared with R output:

* AUROC is the Mann–Whitney statistic; tied scores count 1/2 (midranks).
* Higher scores mean "more likely positive" (pROC's `direction = "<"`). Callers fix the direction
  up front; it is never chosen from the data being evaluated.
* The bootstrap interval is stratified (`ci.auc(method = "bootstrap")`): positives and negatives
  are resampled separately, so every replicate has both classes.
* DeLong's variance uses sample covariances with `ddof = 1` as in pROC, computed with the
  O(n log n) midrank algorithm of Sun & Xu (2014).
* DeLong's test holds the predictions fixed: it sees the sampling of patients, not the randomness
  of training. The corrected resampled t-test (Nadeau & Bengio 2003) compares per-fold AUROCs over
  repeated cross-validation, so differences between trainings enter its variance.

The input checks and the stratified bootstrap are public because the calibration, operating-point
and decision-curve modules share them. Only NumPy and SciPy are used.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import norm, rankdata
from scipy.stats import t as student_t

# Upper bound on replicates × samples held at once in the bootstrap (~32 MiB of float64).
_MAX_BOOTSTRAP_ELEMENTS = 1 << 22


@dataclasses.dataclass(frozen=True)
class DeLongResult:
  """Paired two-sided DeLong test of H0: AUC_a == AUC_b, and the interval of AUC_b − AUC_a.

  `z` is of AUC_a − AUC_b (pROC's sign); `difference` = AUC_b − AUC_a is the gain of b over a,
  the quantity a table of "b vs a" reports, with its Wald interval `difference_ci`.
  """

  auc_a: float
  auc_b: float
  z: float
  p_value: float
  difference: float
  difference_ci: tuple[float, float]


def check_labels(labels: ArrayLike) -> NDArray[np.bool_]:
  """Validates 0/1 or boolean labels of shape [n] and checks both classes occur.

  Returns the labels as booleans, True = positive (pCR).
  """
  y = np.asarray(labels)
  if y.ndim != 1:
    raise ValueError(f'labels must have shape [n], got {y.shape}')
  if y.dtype != np.bool_:
    if not np.all((y == 0) | (y == 1)):
      raise ValueError('labels must be boolean or 0/1')
    y = y == 1
  num_pos = int(y.sum())
  num_neg = y.size - num_pos
  if num_pos == 0 or num_neg == 0:
    raise ValueError(
        f'AUROC needs both classes: got {num_pos} positives and {num_neg} negatives'
    )
  return y


def check_probs(probs: ArrayLike, n: int | None = None) -> NDArray[np.float64]:
  """Validates finite probabilities in [0, 1], of shape [n] when n is given."""
  p = np.asarray(probs, dtype=np.float64)
  if n is not None and p.shape != (n,):
    raise ValueError(f'probs must have shape [{n}], got {p.shape}')
  if not np.all(np.isfinite(p)) or np.any((p < 0.0) | (p > 1.0)):
    raise ValueError('probs must be finite and in [0, 1]')
  return p


def check_labels_and_probs(
    labels: ArrayLike, probs: ArrayLike
) -> tuple[NDArray[np.bool_], NDArray[np.float64]]:
  """`check_labels(labels)` and `check_probs(probs)` of the same shape [n]."""
  y = check_labels(labels)
  return y, check_probs(probs, y.size)


def _check_scores(scores: ArrayLike, n: int) -> NDArray[np.float64]:
  """Validates finite scores whose last axis matches the n labels."""
  s = np.asarray(scores, dtype=np.float64)
  if s.ndim == 0 or s.shape[-1] != n:
    raise ValueError(f'scores must have shape [..., {n}], got {s.shape}')
  if not np.all(np.isfinite(s)):
    raise ValueError('scores must be finite')
  return s


def _check_confidence(confidence: float) -> None:
  if not 0.0 < confidence < 1.0:
    raise ValueError(f'confidence must be in (0, 1), got {confidence}')


def _midranks(x: NDArray[np.float64]) -> NDArray[np.float64]:
  """1-based ranks along the last axis, ties sharing the mean of their ranks (one row per leading
  index: the bootstrap's replicates)."""
  return rankdata(x, axis=-1)


def _auroc_from_ranks(
    ranks: NDArray[np.float64], y: NDArray[np.bool_]
) -> NDArray[np.float64]:
  """Mann–Whitney U / (m·n) from midranks over all samples."""
  m = int(y.sum())
  n = y.size - m
  return (ranks[..., y].sum(axis=-1) - m * (m + 1) / 2.0) / (m * n)


def auroc(labels: ArrayLike, scores: ArrayLike) -> float | NDArray[np.float64]:
  """Area under the ROC curve, ties counted 1/2 (equals pROC `auc` with `direction='<'`).

  Args:
    labels: boolean or 0/1 array of shape [n]; True/1 is the positive class (pCR).
    scores: array of shape [..., n]; higher means more likely positive. Leading axes are
      evaluated independently (one AUROC per row), which the bootstrap relies on.

  Returns:
    A float for 1-D `scores`, else an array of shape `scores.shape[:-1]`.
  """
  y = check_labels(labels)
  s = _check_scores(scores, y.size)
  auc = _auroc_from_ranks(_midranks(s), y)
  return float(auc) if auc.ndim == 0 else auc


def stratified_bootstrap_indices(
    labels: ArrayLike, num_replicates: int, rng: np.random.Generator
) -> NDArray[np.intp]:
  """Sample indices for a class-stratified bootstrap, as in pROC (`stratified=TRUE`).

  Returns an int array `idx` of shape [num_replicates, n] in which position i of every replicate
  is drawn with replacement from the samples of i's class, so that `labels[idx[b]] == labels` and
  `auroc(labels, scores[idx])` scores all replicates.
  """
  y = check_labels(labels)
  pos = np.flatnonzero(y)
  neg = np.flatnonzero(~y)
  idx = np.empty((num_replicates, y.size), dtype=np.intp)
  idx[:, pos] = pos[rng.integers(0, pos.size, size=(num_replicates, pos.size))]
  idx[:, neg] = neg[rng.integers(0, neg.size, size=(num_replicates, neg.size))]
  return idx


def bootstrap_intervals(
    labels: ArrayLike,
    replicate_fn: Callable[[NDArray[np.intp]], dict[str, NDArray[np.float64]]],
    *,
    num_replicates: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
  """Percentile intervals of statistics over class-stratified bootstrap replicates.

  The one bootstrap loop behind every interval of the evidence, so that they all resample the
  same way: `replicate_fn` receives indices of shape [B, n] from `stratified_bootstrap_indices`
  (in chunks of at most ~4M elements, so memory stays bounded) and returns a dict of per-replicate
  values of shape [B], which may be ±inf (e.g. an unbounded calibration slope). Quantiles are R's
  default type 7 (NumPy's 'linear'). The result depends only on the inputs and `seed`.

  Replicates in which a statistic is undefined (NaN) are left out of its interval, which is then
  conditional on the statistic being defined; it is (NaN, NaN) when no replicate defines it.

  Returns:
    `{name: (low, high)}` for every name `replicate_fn` returns.
  """
  if num_replicates < 1:
    raise ValueError(f'num_replicates must be >= 1, got {num_replicates}')
  _check_confidence(confidence)
  y = check_labels(labels)
  rng = np.random.default_rng(seed)
  chunk = max(1, _MAX_BOOTSTRAP_ELEMENTS // y.size)
  replicates: dict[str, list[NDArray[np.float64]]] = {}
  for start in range(0, num_replicates, chunk):
    idx = stratified_bootstrap_indices(
        y, min(chunk, num_replicates - start), rng
    )
    for name, values in replicate_fn(idx).items():
      replicates.setdefault(name, []).append(values)
  alpha = 1.0 - confidence
  intervals = {}
  for name, chunks in replicates.items():
    values = np.concatenate(chunks)
    values = np.sort(values[~np.isnan(values)])
    intervals[name] = (
        (_quantile(values, alpha / 2.0), _quantile(values, 1.0 - alpha / 2.0))
        if values.size
        else (float('nan'), float('nan'))
    )
  return intervals


def _quantile(sorted_values: NDArray[np.float64], q: float) -> float:
  """R's type-7 quantile of sorted values, which unlike `np.quantile` may include ±inf."""
  h = (sorted_values.size - 1) * q
  low = int(h)
  a, b = sorted_values[low], sorted_values[min(low + 1, sorted_values.size - 1)]
  frac = h - low
  # Written so that an infinite neighbour gives an infinite quantile, not inf − inf = NaN.
  return (
      float(a) if frac == 0.0 or a == b else float((1.0 - frac) * a + frac * b)
  )


def bootstrap_auroc_ci(
    labels: ArrayLike,
    scores: ArrayLike,
    *,
    num_replicates: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
  """Percentile confidence interval of the AUROC by stratified bootstrap.

  Matches pROC `ci.auc(method='bootstrap')` defaults (2000 stratified replicates, quantile type
  7). Stratifying keeps the class counts fixed, so no replicate is undefined even with few pCR
  cases.
  """
  y = check_labels(labels)
  s = _check_scores(scores, y.size)
  if s.ndim != 1:
    raise ValueError(f'scores must have shape [{y.size}], got {s.shape}')
  intervals = bootstrap_intervals(
      y,
      lambda idx: {'auroc': _auroc_from_ranks(_midranks(s[idx]), y)},
      num_replicates=num_replicates,
      confidence=confidence,
      seed=seed,
  )
  return intervals['auroc']


def delong_covariance(
    labels: ArrayLike, scores: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
  """AUROCs of k predictors on the same patients and DeLong's covariance matrix of them.

  Fast midrank algorithm of Sun & Xu (2014, IEEE SPL 21:1389): the placement value of each
  positive (fraction of negatives it outranks, ties 1/2) is its midrank among all samples minus
  its midrank among positives, divided by the number of negatives, and symmetrically for
  negatives. The covariance is S10/m + S01/n from the sample covariances (ddof=1) of these
  structural components, as in DeLong et al. (1988) and pROC.

  Args:
    labels: boolean or 0/1 array of shape [n].
    scores: array of shape [k, n] (or [n] for a single predictor, treated as k=1).

  Returns:
    `(aucs, cov)` with shapes [k] and [k, k].
  """
  y = check_labels(labels)
  s = np.atleast_2d(_check_scores(scores, y.size))
  if s.ndim != 2:
    raise ValueError(f'scores must have shape [k, {y.size}], got {s.shape}')
  m = int(y.sum())
  n = y.size - m
  ranks_all = _midranks(s)
  ranks_pos_all = ranks_all[:, y]
  ranks_neg_all = ranks_all[:, ~y]
  # Placements: v10[i] = P(score_neg < score_pos_i), v01[j] = P(score_pos > score_neg_j).
  v10 = (ranks_pos_all - _midranks(s[:, y])) / n
  v01 = 1.0 - (ranks_neg_all - _midranks(s[:, ~y])) / m
  aucs = v10.mean(axis=1)
  cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
  return aucs, cov


def delong_test(
    labels: ArrayLike,
    scores_a: ArrayLike,
    scores_b: ArrayLike,
    *,
    confidence: float = 0.95,
) -> DeLongResult:
  """Paired two-sided DeLong test for two correlated ROC curves (pROC `roc.test`).

  z = (AUC_a − AUC_b) / sqrt(var_a + var_b − 2 cov_ab), p = 2 (1 − Φ(|z|)), and the Wald interval
  of AUC_b − AUC_a uses the same standard error, so it excludes 0 exactly when p < 1 −
  confidence. When the variance of the difference vanishes (e.g. identical rankings), there is no
  evidence of a difference: z = 0, p = 1 and the interval is the point (difference, difference).
  """
  _check_confidence(confidence)
  aucs, cov = delong_covariance(
      labels, np.stack([np.asarray(scores_a), np.asarray(scores_b)])
  )
  difference = float(aucs[1] - aucs[0])
  var_diff = cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1]
  # Rounding can leave a tiny residue (of either sign) when the rankings coincide.
  if var_diff <= 8 * np.finfo(np.float64).eps * (cov[0, 0] + cov[1, 1]):
    z, p_value, half_width = 0.0, 1.0, 0.0
  else:
    se = float(np.sqrt(var_diff))
    z = float((aucs[0] - aucs[1]) / se)
    p_value = float(2.0 * norm.sf(abs(z)))
    half_width = float(norm.ppf(0.5 + confidence / 2.0)) * se
  return DeLongResult(
      auc_a=float(aucs[0]),
      auc_b=float(aucs[1]),
      z=z,
      p_value=p_value,
      difference=difference,
      difference_ci=(difference - half_width, difference + half_width),
  )


@dataclasses.dataclass(frozen=True)
class CorrectedTTestResult:
  """Corrected resampled t-test of H0: E[d] == 0 over J paired test sets, d = metric_b − metric_a.

  `difference` is the mean of the J differences and `difference_ci` its t interval with the
  corrected variance; `t` has `df` = J − 1 degrees of freedom.
  """

  difference: float
  difference_ci: tuple[float, float]
  t: float
  df: int
  p_value: float


def corrected_resampled_ttest(
    differences: ArrayLike, *, test_train_ratio: float, confidence: float = 0.95
) -> CorrectedTTestResult:
  """Nadeau & Bengio's (2003, Machine Learning 52:239) corrected resampled t-test.

  The J test sets of repeated cross-validation overlap in their training sets, so the J paired
  differences d_j are positively correlated and the naive paired t-test (variance s²/J) is
  anticonservative. Nadeau & Bengio's correction replaces s²/J by (1/J + n_test/n_train) s²; for
  r repeats of K-fold cross-validation (J = rK, n_test/n_train = 1/(K − 1)) this is the corrected
  repeated k-fold test of Bouckaert & Frank (2004, PAKDD, LNCS 3056:3). t = mean(d) / sqrt(that),
  with J − 1 degrees of freedom; two-sided p; CI mean(d) ± t_{1−α/2, J−1} sqrt(that).

  Args:
    differences: shape [J], J >= 2: metric of b minus metric of a on each test set.
    test_train_ratio: n_test / n_train of each split, >= 0 (0 gives the naive paired t-test).
    confidence: of the interval.

  Returns:
    The test. When every d_j is the same, the variance is 0 and t undefined: if they are all 0,
    there is no evidence of a difference (t = 0, p = 1, the interval the point 0, as
    `delong_test`); otherwise t, p and the interval are NaN.

  Raises:
    ValueError: if J < 2 (no variance to estimate) or an input is malformed.
  """
  _check_confidence(confidence)
  d = np.asarray(differences, dtype=np.float64)
  if d.ndim != 1 or d.size < 2:
    raise ValueError(
        f'differences must have shape [J] with J >= 2 (a variance needs two test'
        f' sets), got {d.shape}'
    )
  if not np.all(np.isfinite(d)):
    raise ValueError('differences must be finite')
  if not (np.isfinite(test_train_ratio) and test_train_ratio >= 0):
    raise ValueError(
        f'test_train_ratio must be finite and >= 0, got {test_train_ratio}'
    )
  df = d.size - 1
  mean = float(d.mean())
  # Rounding can leave equal differences (the same change on folds of the same size) unequal.
  if np.ptp(d) <= 8 * np.finfo(np.float64).eps * np.abs(d).max():
    if not d.any():
      return CorrectedTTestResult(
          difference=0.0, difference_ci=(0.0, 0.0), t=0.0, df=df, p_value=1.0
      )
    nan = float('nan')
    return CorrectedTTestResult(
        difference=mean, difference_ci=(nan, nan), t=nan, df=df, p_value=nan
    )
  se = float(np.sqrt((1.0 / d.size + test_train_ratio) * d.var(ddof=1)))
  t = mean / se
  half_width = float(student_t.ppf(0.5 + confidence / 2.0, df)) * se
  return CorrectedTTestResult(
      difference=mean,
      difference_ci=(mean - half_width, mean + half_width),
      t=t,
      df=df,
      p_value=float(2.0 * student_t.sf(abs(t), df)),
  )


def holm(p_values: ArrayLike) -> NDArray[np.float64]:
  """Holm's (1979) step-down adjustment, controlling the family-wise error rate of k tests.

  The i-th smallest p-value is multiplied by k − i + 1 (i = 1..k), made non-decreasing in that
  order and capped at 1, so rejecting where the adjusted p < α is Holm's procedure at level α
  (statsmodels `multipletests(method='holm')`). A NaN p (a test that could not be done) stays NaN
  and still counts in k, which keeps the others' adjustment conservative.
  """
  p = np.asarray(p_values, dtype=np.float64)
  if p.ndim != 1:
    raise ValueError(f'p_values must have shape [k], got {p.shape}')
  order = np.argsort(p)
  adjusted = np.minimum(
      1.0, np.maximum.accumulate((p.size - np.arange(p.size)) * p[order])
  )
  out = np.empty_like(p)
  out[order] = adjusted
  return out
