"""Operating points of predicted pCR probabilities: a threshold, and the rates it gives.

A model used to pick a surgery-sparing cut-off must be read at a stated operating point. A case is
called positive when `prob >= threshold`, and thresholds are always observed probabilities.
Conventions (labels, stratified bootstrap, percentile intervals) are those of `statistics`.

The private helpers take scores of shape [B, n] (B bootstrap replicates, or B = 1) with labels y
of shape [n] shared by all rows, which the stratified bootstrap guarantees.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np
from numpy.typing import ArrayLike, NDArray

from pcrjax.evidence import statistics

_METRICS = ('sensitivity', 'specificity', 'ppv', 'npv')


def _cuts(
    y: NDArray[np.bool_], s: NDArray[np.float64]
) -> tuple[
    NDArray[np.float64], NDArray[np.intp], NDArray[np.intp], NDArray[np.bool_]
]:
  """Every candidate threshold per row, with the TP and FP counts of calling ≥ it positive.

  Sorting each row by decreasing score, position i (the last of its tie group) is the threshold
  s_i: samples 0..i are called positive. Returns sorted scores, cumulative TP and FP, and the mask
  of positions that end a tie group (the valid thresholds).
  """
  order = np.argsort(-s, axis=-1, kind='stable')
  s_sorted = np.take_along_axis(s, order, axis=-1)
  y_sorted = y[order]
  tp = np.cumsum(y_sorted, axis=-1)
  fp = np.cumsum(~y_sorted, axis=-1)
  edge = np.ones(s.shape[:-1] + (1,), dtype=bool)
  is_cut = np.concatenate(
      [s_sorted[..., 1:] != s_sorted[..., :-1], edge], axis=-1
  )
  return s_sorted, tp, fp, is_cut


def _pick(
    s_sorted: NDArray[np.float64], k: NDArray[np.intp]
) -> NDArray[np.float64]:
  return np.take_along_axis(s_sorted, k[..., None], axis=-1)[..., 0]


def _youden(
    y: NDArray[np.bool_], s: NDArray[np.float64]
) -> NDArray[np.float64]:
  """Threshold maximising sensitivity + specificity − 1; ties go to the highest one."""
  s_sorted, tp, fp, is_cut = _cuts(y, s)
  num_pos = int(y.sum())
  j = np.where(is_cut, tp / num_pos - fp / (y.size - num_pos), -np.inf)
  return _pick(s_sorted, np.argmax(j, axis=-1))


def _at_sensitivity(
    y: NDArray[np.bool_], s: NDArray[np.float64], target: float
) -> NDArray[np.float64]:
  """Highest threshold whose sensitivity is ≥ target (the lowest one always qualifies)."""
  s_sorted, tp, _, is_cut = _cuts(y, s)
  ok = is_cut & (tp / int(y.sum()) >= target)
  return _pick(s_sorted, np.argmax(ok, axis=-1))


_RULES: dict[
    str, Callable[[NDArray[np.bool_], NDArray[np.float64]], NDArray[np.float64]]
] = {
    'youden': _youden,
    'sens90': functools.partial(_at_sensitivity, target=0.9),
}


def bootstrap_roc_band(
    labels: ArrayLike,
    probs: ArrayLike,
    fpr_grid: ArrayLike,
    *,
    num_replicates: int = 500,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
  """Percentile band (low, high) of the sensitivity at each false-positive rate of `fpr_grid`,
  over stratified bootstrap replicates of the ROC curve.

  Every replicate's cuts at once (`_cuts`): the curves of sklearn's `roc_curve` (tested), whose
  input checks alone took 9 s of a 20-s report for 3,500 curves. Each curve is interpolated as
  `np.interp` does sklearn's: at a vertical step, its top.
  """
  y, p = statistics.check_labels_and_probs(labels, probs)
  idx = statistics.stratified_bootstrap_indices(
      y, num_replicates, np.random.default_rng(seed)
  )
  _, tp, fp, is_cut = _cuts(y, p[idx])
  num_pos = int(y.sum())
  grid = np.asarray(fpr_grid, np.float64)
  curves = [
      np.interp(
          grid,
          np.r_[0, f[cut]] / (y.size - num_pos),
          np.r_[0, t[cut]] / num_pos,
      )
      for t, f, cut in zip(tp, fp, is_cut)
  ]
  alpha = 1.0 - confidence
  low, high = np.percentile(
      curves, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0
  )
  return low, high


def _ratio(a: NDArray[np.intp], b: NDArray[np.intp]) -> NDArray[np.float64]:
  """a / b, NaN where b == 0 (e.g. PPV with no predicted positives)."""
  return np.divide(a, b, out=np.full(np.shape(a), np.nan), where=b > 0)


def _confusion(
    y: NDArray[np.bool_], s: NDArray[np.float64], threshold: NDArray[np.float64]
) -> dict[str, NDArray[Any]]:
  """Confusion counts and rates per row when calling `s >= threshold` positive."""
  pred = s >= threshold[..., None]
  tp = (pred & y).sum(axis=-1)
  fp = (pred & ~y).sum(axis=-1)
  fn = (~pred & y).sum(axis=-1)
  tn = (~pred & ~y).sum(axis=-1)
  return dict(
      sensitivity=_ratio(tp, tp + fn),
      specificity=_ratio(tn, tn + fp),
      ppv=_ratio(tp, tp + fp),
      npv=_ratio(tn, tn + fn),
      tp=tp,
      fp=fp,
      tn=tn,
      fn=fn,
  )


def youden_threshold(labels: ArrayLike, probs: ArrayLike) -> float:
  """Observed probability maximising Youden's J = sensitivity + specificity − 1.

  Ties go to the highest such threshold (fewest positive calls).
  """
  y, p = statistics.check_labels_and_probs(labels, probs)
  return float(_youden(y, p[None])[0])


def threshold_at_sensitivity(
    labels: ArrayLike, probs: ArrayLike, target: float = 0.9
) -> float:
  """Highest observed probability whose sensitivity is ≥ `target`.

  The highest such threshold gives the best specificity at the required sensitivity.
  """
  if not 0.0 < target <= 1.0:
    raise ValueError(f'target must be in (0, 1], got {target}')
  y, p = statistics.check_labels_and_probs(labels, probs)
  return float(_at_sensitivity(y, p[None], target)[0])


def confusion_metrics(
    labels: ArrayLike, probs: ArrayLike, threshold: float
) -> dict[str, Any]:
  """Sensitivity, specificity, PPV, NPV and counts when calling `prob >= threshold` pCR.

  A rate whose denominator is zero (PPV with no positive calls, NPV with no negative calls) is
  NaN rather than an arbitrary 0 or 1.
  """
  y, p = statistics.check_labels_and_probs(labels, probs)
  m = _confusion(y, p[None], np.array([float(threshold)]))
  return {k: float(v[0]) if k in _METRICS else int(v[0]) for k, v in m.items()}


def operating_point(
    labels: ArrayLike,
    probs: ArrayLike,
    rule: str,
    *,
    num_replicates: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
  """Threshold chosen by `rule` and the metrics there, with bootstrap percentile CIs.

  Rules: 'youden' (max sensitivity + specificity − 1) or 'sens90' (highest threshold with
  sensitivity ≥ 0.9).

  The threshold is re-derived by the rule within every stratified bootstrap replicate, and the
  metrics are computed at that replicate's own threshold. The intervals therefore include the
  uncertainty of choosing the threshold on the same data, which a fixed-threshold bootstrap (or a
  binomial interval) ignores and which dominates in small cohorts. They are still optimistic for
  a threshold then applied to new patients; for that, choose it on validation data and report
  `confusion_metrics` on test data.

  Replicates in which a metric is undefined (NaN) are left out of its interval, which is then
  conditional on the metric being defined; it is NaN when no replicate defines it.

  Returns:
    A dict with `rule`, `threshold`, the four rates `sensitivity`, `specificity`, `ppv`, `npv`
    (point estimates on the full data), `<name>_ci` = (low, high) for the threshold and each
    rate, and the counts `tp`, `fp`, `tn`, `fn` at the point estimate.
  """
  if rule not in _RULES:
    raise ValueError(f'rule must be one of {sorted(_RULES)}, got {rule!r}')
  y, p = statistics.check_labels_and_probs(labels, probs)
  choose = _RULES[rule]
  result: dict[str, Any] = {
      'rule': rule,
      'threshold': float(choose(y, p[None])[0]),
  }
  result.update(confusion_metrics(y, p, result['threshold']))

  def replicate_fn(idx: NDArray[np.intp]) -> dict[str, NDArray[np.float64]]:
    s = p[idx]
    threshold = choose(y, s)
    metrics = _confusion(y, s, threshold)
    return {'threshold': threshold, **{k: metrics[k] for k in _METRICS}}

  intervals = statistics.bootstrap_intervals(
      y,
      replicate_fn,
      num_replicates=num_replicates,
      confidence=confidence,
      seed=seed,
  )
  result.update({f'{k}_ci': v for k, v in intervals.items()})
  return result
