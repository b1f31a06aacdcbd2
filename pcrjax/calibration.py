"""Calibration and operating-point statistics for predicted pCR probabilities.

AUROC (``pcrjax.stats``) only judges ranking; a model whose probabilities are used to
counsel patients or pick a surgery-sparing cut-off must also be calibrated and read at a
stated operating point. This module follows the same conventions as ``pcrjax.stats``:

* Labels are boolean or 0/1 of shape [n], True/1 = pCR, and both classes must occur.
* Higher probability means "more likely pCR"; a case is called positive when
  ``prob >= threshold``, and thresholds are always observed probabilities.
* Intervals are percentile intervals from the class-stratified bootstrap of
  ``stats.stratified_bootstrap_indices`` (quantile type 7, as in R).

Calibration follows the hierarchy of Van Calster et al. (2019, BMC Med 17:230): the
Brier score, calibration-in-the-large (intercept) and the calibration slope (Cox 1958),
and a reliability curve. Post-hoc recalibration (Platt, temperature) must be fitted on
validation predictions only and then applied, frozen, to test predictions.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import brentq, minimize
from scipy.special import expit, logit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss

from pcrjax.stats import _MAX_BOOTSTRAP_ELEMENTS, _as_labels, stratified_bootstrap_indices

# Probabilities are clipped to [_EPS, 1 - _EPS] before taking logits (|logit| <= ~13.8),
# so a saturated 0 or 1 from a float32 sigmoid cannot produce an infinite logit.
_EPS = 1e-6

_METRICS = ("sensitivity", "specificity", "ppv", "npv")


def _as_probs(probs: ArrayLike, n: int | None = None) -> NDArray[np.float64]:
    """Validates finite probabilities in [0, 1], of shape [n] when n is given."""
    p = np.asarray(probs, dtype=np.float64)
    if n is not None and p.shape != (n,):
        raise ValueError(f"probs must have shape [{n}], got {p.shape}")
    if not np.all(np.isfinite(p)) or np.any((p < 0.0) | (p > 1.0)):
        raise ValueError("probs must be finite and in [0, 1]")
    return p


def _logit(p: NDArray[np.float64]) -> NDArray[np.float64]:
    return logit(np.clip(p, _EPS, 1.0 - _EPS))


def _labels_and_probs(
    labels: ArrayLike, probs: ArrayLike
) -> tuple[NDArray[np.bool_], NDArray[np.float64]]:
    y = _as_labels(labels)
    return y, _as_probs(probs, y.size)


# --------------------------------------------------------------------------- calibration


def brier(labels: ArrayLike, probs: ArrayLike) -> float:
    """Mean squared error of the probabilities (sklearn ``brier_score_loss``)."""
    y, p = _labels_and_probs(labels, probs)
    return float(brier_score_loss(y, p))


def _logistic_fit(y: NDArray[np.bool_], x: NDArray[np.float64]) -> tuple[float, float]:
    """Unpenalised maximum-likelihood (intercept, slope) of the logistic model y ~ x."""
    model = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(x[:, None], y)
    return float(model.intercept_[0]), float(model.coef_[0, 0])


def calibration_intercept_slope(labels: ArrayLike, probs: ArrayLike) -> tuple[float, float]:
    """Calibration-in-the-large and calibration slope (Cox 1958; Van Calster et al. 2019).

    * slope: coefficient b of logit P(y) = a + b·logit(p). b < 1 means predictions are
      too extreme (over-fitting, the usual case), b > 1 too modest.
    * intercept: a in logit P(y) = a + logit(p), i.e. with the slope fixed at 1 (logit p
      as an offset), so it measures only the average bias: a > 0 means risks are
      underestimated on average. It is *not* the intercept of the slope fit, which mixes
      bias with spread.

    Both are unpenalised maximum-likelihood fits; p is clipped to [1e-6, 1 - 1e-6].
    """
    y, p = _labels_and_probs(labels, probs)
    lp = _logit(p)
    _, slope = _logistic_fit(y, lp)
    # With an offset the score equation mean(σ(a + lp)) = mean(y) is monotone in a; the
    # bracket puts every a + lp on one side of logit(mean y), so it contains the root.
    target = logit(y.mean())
    intercept = brentq(
        lambda a: expit(a + lp).mean() - y.mean(),
        target - lp.max() - 1.0,
        target - lp.min() + 1.0,
        xtol=1e-12,
    )
    return float(intercept), slope


def reliability_curve(
    labels: ArrayLike, probs: ArrayLike, num_bins: int = 10, strategy: str = "quantile"
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.intp]]:
    """Reliability diagram points: mean prediction, observed pCR rate and size of each bin.

    Bins and values are those of sklearn's ``calibration_curve(labels, probs,
    n_bins=num_bins, strategy=strategy)`` (the tests check this), with empty bins dropped.
    The bins are computed here rather than by calling sklearn because sklearn does not
    return the counts, and with pCR cohorts of a few hundred the count is what tells a
    reader how noisy each point is; one binning keeps the three arrays aligned.

    Returns:
      ``(mean_predicted, observed_fraction, counts)``, each of shape [non-empty bins].
    """
    y, p = _labels_and_probs(labels, probs)
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    if strategy == "quantile":
        edges = np.percentile(p, np.linspace(0.0, 1.0, num_bins + 1) * 100)
    elif strategy == "uniform":
        edges = np.linspace(0.0, 1.0, num_bins + 1)
    else:
        raise ValueError(f"strategy must be 'quantile' or 'uniform', got {strategy!r}")
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

    Platt scaling fits both parameters; temperature scaling fixes intercept = 0 and
    slope = 1/T. One class covers both, so a fitted calibrator is three plain values that
    pickle and serialise (``to_dict``) next to the predictions it was fitted for.
    """

    method: str
    intercept: float
    slope: float

    def __call__(self, probs: ArrayLike) -> NDArray[np.float64]:
        return expit(self.intercept + self.slope * _logit(_as_probs(probs)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibrator:
        return cls(
            method=str(d["method"]), intercept=float(d["intercept"]), slope=float(d["slope"])
        )


def fit_platt(val_labels: ArrayLike, val_probs: ArrayLike) -> Calibrator:
    """Platt scaling: unpenalised logistic regression of y on logit(p), on validation data.

    Fitting on logits (not raw p) makes the identity map a special case, so a calibrated
    model is left unchanged. Plain 0/1 targets are used (no Platt 1999 prior smoothing),
    which makes the fit the same model as the calibration slope.
    """
    y, p = _labels_and_probs(val_labels, val_probs)
    intercept, slope = _logistic_fit(y, _logit(p))
    return Calibrator(method="platt", intercept=intercept, slope=slope)


def fit_temperature(val_labels: ArrayLike, val_probs: ArrayLike) -> Calibrator:
    """Temperature scaling (Guo et al. 2017): p ↦ σ(logit(p) / T), fitted on validation data.

    A single T > 0 only rescales confidence, so it cannot change the ranking (AUROC) or
    move the decision boundary at p = 0.5. T is found by minimising the mean NLL over
    log T, which keeps T positive without constraints; the result stores slope = 1/T.
    """
    y, p = _labels_and_probs(val_labels, val_probs)
    lp = _logit(p)

    def nll_and_grad(log_t: NDArray[np.float64]) -> tuple[float, NDArray[np.float64]]:
        z = lp * np.exp(-log_t[0])
        nll = np.mean(np.logaddexp(0.0, z) - y * z)
        return float(nll), np.array([np.mean((expit(z) - y) * -z)])

    result = minimize(nll_and_grad, x0=np.zeros(1), jac=True, method="BFGS")
    if not result.success:
        raise RuntimeError(f"temperature fit did not converge: {result.message}")
    return Calibrator(method="temperature", intercept=0.0, slope=float(np.exp(-result.x[0])))


# ------------------------------------------------------------------------ operating points
#
# The helpers below take scores of shape [B, n] (B bootstrap replicates, or B = 1) with
# labels y of shape [n] shared by all rows, which the stratified bootstrap guarantees.


def _cuts(
    y: NDArray[np.bool_], s: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.intp], NDArray[np.intp], NDArray[np.bool_]]:
    """Every candidate threshold per row, with the TP and FP counts of calling ≥ it positive.

    Sorting each row by decreasing score, position i (the last of its tie group) is the
    threshold s_i: samples 0..i are called positive. Returns sorted scores, cumulative TP
    and FP, and the mask of positions that end a tie group (the valid thresholds).
    """
    order = np.argsort(-s, axis=-1, kind="stable")
    s_sorted = np.take_along_axis(s, order, axis=-1)
    y_sorted = y[order]
    tp = np.cumsum(y_sorted, axis=-1)
    fp = np.cumsum(~y_sorted, axis=-1)
    edge = np.ones(s.shape[:-1] + (1,), dtype=bool)
    is_cut = np.concatenate([s_sorted[..., 1:] != s_sorted[..., :-1], edge], axis=-1)
    return s_sorted, tp, fp, is_cut


def _pick(s_sorted: NDArray[np.float64], k: NDArray[np.intp]) -> NDArray[np.float64]:
    return np.take_along_axis(s_sorted, k[..., None], axis=-1)[..., 0]


def _youden(y: NDArray[np.bool_], s: NDArray[np.float64]) -> NDArray[np.float64]:
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


_RULES: dict[str, Callable[[NDArray[np.bool_], NDArray[np.float64]], NDArray[np.float64]]] = {
    "youden": _youden,
    "sens90": functools.partial(_at_sensitivity, target=0.9),
}


def _ratio(a: NDArray[np.intp], b: NDArray[np.intp]) -> NDArray[np.float64]:
    """a / b, NaN where b == 0 (e.g. PPV with no predicted positives)."""
    return np.divide(a, b, out=np.full(np.shape(a), np.nan), where=b > 0)


def _confusion(
    y: NDArray[np.bool_], s: NDArray[np.float64], threshold: NDArray[np.float64]
) -> dict[str, NDArray[Any]]:
    """Confusion counts and rates per row when calling ``s >= threshold`` positive."""
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
    y, p = _labels_and_probs(labels, probs)
    return float(_youden(y, p[None])[0])


def threshold_at_sensitivity(labels: ArrayLike, probs: ArrayLike, target: float = 0.9) -> float:
    """Highest observed probability whose sensitivity is ≥ ``target``.

    The highest such threshold gives the best specificity at the required sensitivity.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be in (0, 1], got {target}")
    y, p = _labels_and_probs(labels, probs)
    return float(_at_sensitivity(y, p[None], target)[0])


def confusion_metrics(labels: ArrayLike, probs: ArrayLike, threshold: float) -> dict[str, Any]:
    """Sensitivity, specificity, PPV, NPV and counts when calling ``prob >= threshold`` pCR.

    A rate whose denominator is zero (PPV with no positive calls, NPV with no negative
    calls) is NaN rather than an arbitrary 0 or 1.
    """
    y, p = _labels_and_probs(labels, probs)
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
    """Threshold chosen by ``rule`` and the metrics there, with bootstrap percentile CIs.

    Rules: ``'youden'`` (max sensitivity + specificity − 1) or ``'sens90'`` (highest
    threshold with sensitivity ≥ 0.9).

    The threshold is re-derived by the rule within every stratified bootstrap replicate,
    and the metrics are computed at that replicate's own threshold. The intervals
    therefore include the uncertainty of choosing the threshold on the same data, which a
    fixed-threshold bootstrap (or a binomial interval) ignores and which dominates in
    small cohorts. They are still optimistic for a threshold then applied to new patients;
    for that, choose it on validation data and report ``confusion_metrics`` on test data.

    Replicates in which a metric is undefined (NaN) are left out of its interval, which is
    then conditional on the metric being defined; it is NaN when no replicate defines it.

    Returns:
      A dict with ``rule``, ``threshold``, the four rates ``sensitivity``,
      ``specificity``, ``ppv``, ``npv`` (point estimates on the full data), ``<name>_ci``
      = ``(low, high)`` for the threshold and each rate, and the counts ``tp``, ``fp``,
      ``tn``, ``fn`` at the point estimate.
    """
    if rule not in _RULES:
        raise ValueError(f"rule must be one of {sorted(_RULES)}, got {rule!r}")
    if num_replicates < 1:
        raise ValueError(f"num_replicates must be >= 1, got {num_replicates}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    y, p = _labels_and_probs(labels, probs)
    choose = _RULES[rule]

    threshold = choose(y, p[None])
    result: dict[str, Any] = {"rule": rule, "threshold": float(threshold[0])}
    result.update(confusion_metrics(y, p, result["threshold"]))

    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_BOOTSTRAP_ELEMENTS // y.size)
    replicates: dict[str, list[NDArray[np.float64]]] = {k: [] for k in ("threshold",) + _METRICS}
    for start in range(0, num_replicates, chunk):
        s = p[stratified_bootstrap_indices(y, min(chunk, num_replicates - start), rng)]
        t = choose(y, s)
        m = _confusion(y, s, t)
        replicates["threshold"].append(t)
        for k in _METRICS:
            replicates[k].append(m[k])

    alpha = 1.0 - confidence
    for k, chunks in replicates.items():
        values = np.concatenate(chunks)
        if np.all(np.isnan(values)):
            result[f"{k}_ci"] = (float("nan"), float("nan"))
        else:
            low, high = np.nanquantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
            result[f"{k}_ci"] = (float(low), float(high))
    return result
