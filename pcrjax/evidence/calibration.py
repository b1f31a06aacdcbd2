"""Calibration of predicted pCR probabilities, and its post-hoc recalibration.

AUROC (`statistics`) only judges ranking; a model whose probabilities are used to counsel patients
must also be calibrated. Conventions are those of `statistics`: labels are boolean or 0/1 of shape
[n], True/1 = pCR, both classes must occur, and intervals are percentile intervals of the
class-stratified bootstrap.

Calibration follows the hierarchy of Van Calster et al. (2019, BMC Med 17:230): the Brier score,
calibration-in-the-large (intercept) and the calibration slope (Cox 1958), and a reliability
curve. Post-hoc recalibration (Platt, temperature) must be fitted on validation predictions only
and then applied, frozen, to test predictions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import brentq, minimize
from scipy.special import expit, logit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss

from pcrjax.evidence import statistics

# Probabilities are clipped to [_EPS, 1 - _EPS] before taking logits (|logit| <= ~13.8), so a
# saturated 0 or 1 from a float32 sigmoid cannot produce an infinite logit.
_EPS = 1e-6

# `degenerate_calibration` rules; see there.
_MIN_SPAN = 0.05
_MAX_SLOPE = 5.0

# Batched Newton–Raphson of `calibration_ci`: at most this many steps, each halved at most
# _MAX_HALVINGS times while it lowers the log-likelihood by more than _LL_RTOL (relative); a fit
# has converged when no coefficient moves by more than _NEWTON_TOL.
_MAX_NEWTON_STEPS = 100
_MAX_HALVINGS = 30
_LL_RTOL = 1e-12
_NEWTON_TOL = 1e-10


def _logit(p: NDArray[np.float64]) -> NDArray[np.float64]:
  return logit(np.clip(p, _EPS, 1.0 - _EPS))


def brier(labels: ArrayLike, probs: ArrayLike) -> float:
  """Mean squared error of the probabilities (sklearn `brier_score_loss`)."""
  y, p = statistics.check_labels_and_probs(labels, probs)
  return float(brier_score_loss(y, p))


def _logistic_fit(
    y: NDArray[np.bool_], x: NDArray[np.float64]
) -> tuple[float, float]:
  """Unpenalised maximum-likelihood (intercept, slope) of the logistic model y ~ x."""
  model = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(
      x[:, None], y
  )
  return float(model.intercept_[0]), float(model.coef_[0, 0])


def calibration_intercept_slope(
    labels: ArrayLike, probs: ArrayLike
) -> tuple[float, float]:
  """Calibration-in-the-large and calibration slope (Cox 1958; Van Calster et al. 2019).

  * slope: coefficient b of logit P(y) = a + b·logit(p). b < 1 means predictions are too extreme
    (over-fitting, the usual case), b > 1 too modest.
  * intercept: a in logit P(y) = a + logit(p), i.e. with the slope fixed at 1 (logit p as an
    offset), so it measures only the average bias: a > 0 means risks are underestimated on
    average. It is *not* the intercept of the slope fit, which mixes bias with spread.

  Both are unpenalised maximum-likelihood fits; p is clipped to [1e-6, 1 - 1e-6].
  """
  y, p = statistics.check_labels_and_probs(labels, probs)
  lp = _logit(p)
  _, slope = _logistic_fit(y, lp)
  # With an offset the score equation mean(σ(a + lp)) = mean(y) is monotone in a; the bracket
  # puts every a + lp on one side of logit(mean y), so it contains the root.
  target = logit(y.mean())
  intercept = brentq(
      lambda a: expit(a + lp).mean() - y.mean(),
      target - lp.max() - 1.0,
      target - lp.min() + 1.0,
      xtol=1e-12,
  )
  return float(intercept), slope


def _newton_logistic(
    y: NDArray[np.bool_],
    design: NDArray[np.float64],
    offset: NDArray[np.float64],
    beta: NDArray[np.float64],
) -> NDArray[np.float64]:
  """Unpenalised MLEs of logit P(y) = offset + design·β, one independent fit per leading row.

  Newton–Raphson, halving a step while it lowers the log-likelihood; as that is strictly concave
  whenever the MLE exists, the iteration converges from any start. Callers pass only rows whose
  MLE exists.

  Args:
    y: labels of shape [n], shared by all rows (as in the stratified bootstrap).
    design: covariates of shape [B, n, k].
    offset: fixed part of the linear predictor, of shape [B, n].
    beta: starting coefficients of shape [B, k].

  Returns:
    Coefficients of shape [B, k]; NaN in a row that did not converge.
  """
  t = y.astype(np.float64)

  def log_likelihood(eta: NDArray[np.float64]) -> NDArray[np.float64]:
    # t·eta - log(1 + e^eta), the softplus split at 0 so that exp never overflows: a third
    # quicker than np.logaddexp(0, eta) on the [2000, n] replicates.
    softplus = np.maximum(eta, 0.0) + np.log1p(np.exp(-np.abs(eta)))
    return np.sum(t * eta - softplus, axis=-1)

  fitted = np.full(beta.shape, np.nan)
  rows = np.arange(
      beta.shape[0]
  )  # The rows still moving, to which x, b, eta and ll belong.
  x, b = design, np.array(beta, dtype=np.float64)
  eta = offset + (x @ b[..., None])[..., 0]
  ll = log_likelihood(eta)
  for _ in range(_MAX_NEWTON_STEPS):
    mu = expit(eta)
    x_t = np.swapaxes(x, -1, -2)
    gradient = (x_t @ (t - mu)[..., None])[..., 0]
    hessian = (x_t * (mu * (1.0 - mu))[:, None, :]) @ x
    step = np.linalg.solve(hessian, gradient[..., None])[..., 0]
    floor = ll - _LL_RTOL * (
        1.0 + np.abs(ll)
    )  # Rounding near the maximum is no reason to halve.
    for _ in range(_MAX_HALVINGS):
      new_eta = eta + (x @ step[..., None])[..., 0]
      new_ll = log_likelihood(new_eta)
      worse = new_ll < floor
      if not worse.any():
        break
      step[worse] /= 2.0
    b, eta, ll = b + step, new_eta, new_ll
    moving = np.any(np.abs(step) > _NEWTON_TOL, axis=-1)
    if not moving.all():
      fitted[rows[~moving]] = b[~moving]
      rows, x, b, eta, ll = (
          rows[moving],
          x[moving],
          b[moving],
          eta[moving],
          ll[moving],
      )
      if not rows.size:
        break
  return fitted


def _slope_exists(
    y: NDArray[np.bool_], lp: NDArray[np.float64]
) -> NDArray[np.bool_]:
  """Whether the slope fit of each row [..., n] has an MLE: the classes' logits overlap.

  Otherwise some threshold separates them (or all logits are equal) and the slope is unbounded.
  """
  pos, neg = lp[..., y], lp[..., ~y]
  return (pos.min(axis=-1) < neg.max(axis=-1)) & (
      neg.min(axis=-1) < pos.max(axis=-1)
  )


def _bootstrap_intercepts_and_slopes(
    y: NDArray[np.bool_], lp: NDArray[np.float64]
) -> dict[str, NDArray[np.float64]]:
  """Calibration intercept and slope of every replicate row of logits lp [B, n].

  Where the slope has no MLE, the likelihood grows without bound as the slope tends to ±inf, the
  sign of the separation, so the replicate counts as that; it is NaN if all logits are equal. The
  intercept always has an MLE.
  """
  num_rows, n = lp.shape
  ones = np.broadcast_to(1.0, (num_rows, n, 1))
  (intercept,) = _newton_logistic(y, ones, lp, np.zeros((num_rows, 1))).T
  gap = lp[:, y].mean(axis=-1) - lp[:, ~y].mean(axis=-1)
  slope = np.select([gap > 0.0, gap < 0.0], [np.inf, -np.inf], np.nan)
  ok = _slope_exists(y, lp)
  if ok.any():
    design = np.stack([np.ones_like(lp[ok]), lp[ok]], axis=-1)
    start = np.tile(
        [0.0, 1.0], (int(ok.sum()), 1)
    )  # The identity map: perfect calibration.
    slope[ok] = _newton_logistic(y, design, np.zeros_like(lp[ok]), start)[:, 1]
  return {'intercept': intercept, 'slope': slope}


def calibration_ci(
    labels: ArrayLike,
    probs: ArrayLike,
    *,
    num_replicates: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
  """Percentile stratified-bootstrap intervals of the calibration intercept and slope.

  Every replicate refits both models of `calibration_intercept_slope` (by a batched Newton
  iteration, which reaches the same MLEs). A replicate whose classes the predictions separate has
  an infinite slope, so when more than (1 − confidence) / 2 of them do, a bound of the slope
  interval is infinite: the data cannot bound the slope.

  Returns:
    A dict with `intercept_ci` and `slope_ci`, each (low, high).
  """
  y, p = statistics.check_labels_and_probs(labels, probs)
  lp = _logit(p)
  intervals = statistics.bootstrap_intervals(
      y,
      lambda idx: _bootstrap_intercepts_and_slopes(y, lp[idx]),
      num_replicates=num_replicates,
      confidence=confidence,
      seed=seed,
  )
  return {
      'intercept_ci': intervals['intercept'],
      'slope_ci': intervals['slope'],
  }


def degenerate_calibration(labels: ArrayLike, probs: ArrayLike) -> str | None:
  """Why the calibration intercept and slope would mislead a reader, or None if they would not.

  The rules, checked in this order:

  * 'predictions span < 0.05': nearly constant predictions (e.g. a collapsed model predicting
    the prevalence) carry no spread to calibrate, so the slope is a ratio of noise.
  * 'predictions separate the classes': some threshold splits pCR from non-pCR, so the slope's
    MLE does not exist (it is infinite; a fitted number only reflects when the optimiser
    stopped).
  * 'calibration slope < 0': observed risk falls as predicted risk rises. The predictions are
    ranked backwards, which intercept and slope would present as mere miscalibration.
  * 'calibration slope > 5': predictions far too modest, which in practice means a model whose
    outputs barely vary; the slope is then dominated by its uncertainty.

  The report prints the reason instead of the numbers.
  """
  y, p = statistics.check_labels_and_probs(labels, probs)
  if p.max() - p.min() < _MIN_SPAN:
    return f'predictions span < {_MIN_SPAN}'
  if not _slope_exists(y, _logit(p)):
    return 'predictions separate the classes'
  _, slope = calibration_intercept_slope(y, p)
  if slope < 0.0:
    return 'calibration slope < 0'
  if slope > _MAX_SLOPE:
    return f'calibration slope > {_MAX_SLOPE:g}'
  return None


def reliability_curve(
    labels: ArrayLike,
    probs: ArrayLike,
    num_bins: int = 10,
    strategy: str = 'quantile',
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.intp]]:
  """Reliability diagram points: mean prediction, observed pCR rate and size of each bin.

  Bins and values are those of sklearn's `calibration_curve(labels, probs, n_bins=num_bins,
  strategy=strategy)` (the tests check this), with empty bins dropped. The bins are computed here
  rather than by calling sklearn because sklearn does not return the counts, and with pCR cohorts
  of a few hundred the count is what tells a reader how noisy each point is; one binning keeps
  the three arrays aligned.

  Returns:
    `(mean_predicted, observed_fraction, counts)`, each of shape [non-empty bins].
  """
  y, p = statistics.check_labels_and_probs(labels, probs)
  if num_bins < 1:
    raise ValueError(f'num_bins must be >= 1, got {num_bins}')
  if strategy == 'quantile':
    edges = np.percentile(p, np.linspace(0.0, 1.0, num_bins + 1) * 100)
  elif strategy == 'uniform':
    edges = np.linspace(0.0, 1.0, num_bins + 1)
  else:
    raise ValueError(
        f"strategy must be 'quantile' or 'uniform', got {strategy!r}"
    )
  bin_ids = np.searchsorted(edges[1:-1], p)
  counts = np.bincount(bin_ids, minlength=num_bins)
  sum_pred = np.bincount(bin_ids, weights=p, minlength=num_bins)
  sum_true = np.bincount(bin_ids, weights=y, minlength=num_bins)
  nonempty = counts > 0
  counts = counts[nonempty]
  return sum_pred[nonempty] / counts, sum_true[nonempty] / counts, counts


@dataclasses.dataclass(frozen=True)
class Calibrator:
  """Frozen recalibration map p ↦ σ(intercept + slope · logit p).

  Platt scaling fits both parameters; temperature scaling fixes intercept = 0 and slope = 1/T.
  One class covers both, so a fitted calibrator is three plain values that pickle and serialise
  (`to_dict`) next to the predictions it was fitted for.
  """

  method: str
  intercept: float
  slope: float

  def __call__(self, probs: ArrayLike) -> NDArray[np.float64]:
    return expit(
        self.intercept + self.slope * _logit(statistics.check_probs(probs))
    )

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> Calibrator:
    return cls(
        method=str(d['method']),
        intercept=float(d['intercept']),
        slope=float(d['slope']),
    )


def fit_platt(val_labels: ArrayLike, val_probs: ArrayLike) -> Calibrator:
  """Platt scaling: unpenalised logistic regression of y on logit(p), on validation data.

  Fitting on logits (not raw p) makes the identity map a special case, so a calibrated model is
  left unchanged. Plain 0/1 targets are used (no Platt 1999 prior smoothing), which makes the fit
  the same model as the calibration slope.
  """
  y, p = statistics.check_labels_and_probs(val_labels, val_probs)
  intercept, slope = _logistic_fit(y, _logit(p))
  return Calibrator(method='platt', intercept=intercept, slope=slope)


def fit_temperature(val_labels: ArrayLike, val_probs: ArrayLike) -> Calibrator:
  """Temperature scaling (Guo et al. 2017): p ↦ σ(logit(p) / T), fitted on validation data.

  A single T > 0 only rescales confidence, so it cannot change the ranking (AUROC) or move the
  decision boundary at p = 0.5. T is found by minimising the mean NLL over log T, which keeps T
  positive without constraints; the result stores slope = 1/T.
  """
  y, p = statistics.check_labels_and_probs(val_labels, val_probs)
  lp = _logit(p)

  def nll_and_grad(
      log_t: NDArray[np.float64],
  ) -> tuple[float, NDArray[np.float64]]:
    z = lp * np.exp(-log_t[0])
    nll = np.mean(np.logaddexp(0.0, z) - y * z)
    return float(nll), np.array([np.mean((expit(z) - y) * -z)])

  result = minimize(nll_and_grad, x0=np.zeros(1), jac=True, method='BFGS')
  if not result.success:
    raise RuntimeError(f'temperature fit did not converge: {result.message}')
  return Calibrator(
      method='temperature', intercept=0.0, slope=float(np.exp(-result.x[0]))
  )


NONE = (
    'none'  # No post-hoc calibration: the probabilities as the model gave them.
)
FITS = {'platt': fit_platt, 'temperature': fit_temperature}
METHODS = (NONE,) + tuple(
    FITS
)  # The post-hoc calibrations a run or an export may ask for.


def fit(method: str, val_labels: ArrayLike, val_probs: ArrayLike) -> Calibrator:
  """`method`'s calibrator fitted on validation predictions; the identity map for NONE."""
  if method == NONE:
    return Calibrator(method=NONE, intercept=0.0, slope=1.0)
  return FITS[method](val_labels, val_probs)
