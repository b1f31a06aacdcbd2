"""Decision-curve analysis (Vickers & Elkin 2006, Med Decis Making 26:565).

AUROC and calibration do not say whether acting on the predictions helps patients. Net benefit
does: at a threshold probability pt, the risk at which a clinician is indifferent between acting
(e.g. de-escalating surgery for predicted pCR) and not, calling `prob >= pt` positive is worth

  NB(pt) = TP/n − FP/n · pt / (1 − pt),

true positives per patient, with each false positive weighed by the odds pt / (1 − pt) that the
threshold implies. A model is useful at pt if its NB exceeds both reference strategies: treating
everyone (`treat_all`) and treating no one (NB = 0). Labels follow `statistics`.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from pcrjax.evidence import statistics

# 0.05, 0.06, ..., 0.95, each exactly the float of its two-decimal literal.
DEFAULT_THRESHOLDS = np.arange(5, 96) / 100


def _check_thresholds(thresholds: ArrayLike) -> NDArray[np.float64]:
  t = np.asarray(thresholds, dtype=np.float64)
  if not np.all(np.isfinite(t)) or np.any((t < 0.0) | (t >= 1.0)):
    raise ValueError('thresholds must be finite and in [0, 1)')
  return t


def net_benefit(
    labels: ArrayLike, probs: ArrayLike, thresholds: ArrayLike
) -> NDArray[np.float64]:
  """Net benefit of calling `prob >= pt` positive, for every threshold pt in [0, 1).

  Returns:
    An array of the shape of `thresholds`.
  """
  y, p = statistics.check_labels_and_probs(labels, probs)
  t = _check_thresholds(thresholds)
  # Cases at or above t among the sorted probabilities of each class.
  pos, neg = np.sort(p[y]), np.sort(p[~y])
  tp = pos.size - np.searchsorted(pos, t, side='left')
  fp = neg.size - np.searchsorted(neg, t, side='left')
  return tp / y.size - fp / y.size * t / (1.0 - t)


def treat_all(labels: ArrayLike, thresholds: ArrayLike) -> NDArray[np.float64]:
  """Net benefit of treating everyone: prevalence − (1 − prevalence) · pt / (1 − pt).

  Returns:
    An array of the shape of `thresholds`.
  """
  prevalence = statistics.check_labels(labels).mean()
  t = _check_thresholds(thresholds)
  return prevalence - (1.0 - prevalence) * t / (1.0 - t)


def decision_curve(
    labels: ArrayLike,
    probs: ArrayLike,
    thresholds: ArrayLike = DEFAULT_THRESHOLDS,
) -> list[dict[str, float]]:
  """The decision curve of a model and of both reference strategies, one record per threshold.

  The default thresholds, 0.05 to 0.95 in steps of 0.01, span the whole curve; a report should
  still state in advance the range of thresholds that is clinically reasonable.

  Returns:
    One dict per threshold (in the order given) with `threshold`, `net_benefit_model`,
    `net_benefit_all` and `net_benefit_none` (always 0), ready for `csv.DictWriter`.
  """
  t = np.ravel(_check_thresholds(thresholds))
  model = net_benefit(labels, probs, t)
  everyone = treat_all(labels, t)
  return [
      {
          'threshold': float(pt),
          'net_benefit_model': float(nb_model),
          'net_benefit_all': float(nb_all),
          'net_benefit_none': 0.0,
      }
      for pt, nb_model, nb_all in zip(t, model, everyone)
  ]
