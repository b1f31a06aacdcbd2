"""ROC statistics for pCR prediction: AUROC, its bootstrap interval, and DeLong's test.

Conventions follow the R package pROC (Robin et al. 2011), the usual reference in the
clinical literature, so that numbers reported here can be compared with R output:

* AUROC is the Mann–Whitney statistic; tied scores count 1/2 (midranks).
* Higher scores mean "more likely positive" (pROC's ``direction = "<"``). Callers fix
  the direction up front; it is never chosen from the data being evaluated.
* The bootstrap interval is stratified (``ci.auc(method = "bootstrap")``): positives and
  negatives are resampled separately, so every replicate has both classes.
* DeLong's variance uses sample covariances with ``ddof = 1`` as in pROC, computed with
  the O(n log n) midrank algorithm of Sun & Xu (2014).

Only NumPy and ``scipy.stats.norm`` are used, so this module is cheap to import anywhere.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import norm

# Upper bound on replicates × samples held at once in the bootstrap (~32 MiB of float64).
_MAX_BOOTSTRAP_ELEMENTS = 1 << 22


@dataclasses.dataclass(frozen=True)
class DeLongResult:
    """Paired two-sided DeLong test of H0: AUC_a == AUC_b."""

    auc_a: float
    auc_b: float
    z: float
    p_value: float


def _as_labels(labels: ArrayLike) -> NDArray[np.bool_]:
    """Validates 0/1 or boolean labels of shape [n] and checks both classes occur."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must have shape [n], got {y.shape}")
    if y.dtype != np.bool_:
        if not np.all((y == 0) | (y == 1)):
            raise ValueError("labels must be boolean or 0/1")
        y = y == 1
    num_pos = int(y.sum())
    num_neg = y.size - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError(
            f"AUROC needs both classes: got {num_pos} positives and {num_neg} negatives"
        )
    return y


def _as_scores(scores: ArrayLike, n: int) -> NDArray[np.float64]:
    """Validates finite scores whose last axis matches the n labels."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 0 or s.shape[-1] != n:
        raise ValueError(f"scores must have shape [..., {n}], got {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return s


def _midranks(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """1-based ranks along the last axis, ties sharing the mean of their ranks.

    Vectorised over leading axes (``scipy.stats.rankdata(method='average')`` per row).
    """
    n = x.shape[-1]
    order = np.argsort(x, axis=-1, kind="stable")
    xs = np.take_along_axis(x, order, axis=-1)
    positions = np.broadcast_to(np.arange(n), xs.shape)
    new_value = xs[..., 1:] != xs[..., :-1]
    edge = np.ones(xs.shape[:-1] + (1,), dtype=bool)
    is_first = np.concatenate([edge, new_value], axis=-1)
    is_last = np.concatenate([new_value, edge], axis=-1)
    # First/last sorted position of each element's tie group.
    first = np.maximum.accumulate(np.where(is_first, positions, 0), axis=-1)
    last = np.flip(
        np.minimum.accumulate(np.flip(np.where(is_last, positions, n - 1), -1), axis=-1), -1
    )
    ranks = np.empty_like(xs)
    np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=-1)
    return ranks


def _auroc_from_ranks(
    ranks: NDArray[np.float64], y: NDArray[np.bool_]
) -> NDArray[np.float64]:
    """Mann–Whitney U / (m·n) from midranks over all samples."""
    m = int(y.sum())
    n = y.size - m
    return (ranks[..., y].sum(axis=-1) - m * (m + 1) / 2.0) / (m * n)


def auroc(labels: ArrayLike, scores: ArrayLike) -> float | NDArray[np.float64]:
    """Area under the ROC curve, ties counted 1/2 (equals pROC ``auc`` with ``direction='<'``).

    Args:
      labels: boolean or 0/1 array of shape [n]; True/1 is the positive class (pCR).
      scores: array of shape [..., n]; higher means more likely positive. Leading axes
        are evaluated independently (one AUROC per row), which the bootstrap relies on.

    Returns:
      A float for 1-D ``scores``, else an array of shape ``scores.shape[:-1]``.
    """
    y = _as_labels(labels)
    s = _as_scores(scores, y.size)
    auc = _auroc_from_ranks(_midranks(s), y)
    return float(auc) if auc.ndim == 0 else auc


def stratified_bootstrap_indices(
    labels: ArrayLike, num_replicates: int, rng: np.random.Generator
) -> NDArray[np.intp]:
    """Sample indices for a class-stratified bootstrap, as in pROC (``stratified=TRUE``).

    Returns an int array ``idx`` of shape [num_replicates, n] in which position i of every
    replicate is drawn with replacement from the samples of i's class, so that
    ``labels[idx[b]] == labels`` and ``auroc(labels, scores[idx])`` scores all replicates.
    """
    y = _as_labels(labels)
    pos = np.flatnonzero(y)
    neg = np.flatnonzero(~y)
    idx = np.empty((num_replicates, y.size), dtype=np.intp)
    idx[:, pos] = pos[rng.integers(0, pos.size, size=(num_replicates, pos.size))]
    idx[:, neg] = neg[rng.integers(0, neg.size, size=(num_replicates, neg.size))]
    return idx


def bootstrap_auroc_ci(
    labels: ArrayLike,
    scores: ArrayLike,
    *,
    num_replicates: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile confidence interval of the AUROC by stratified bootstrap.

    Matches pROC ``ci.auc(method='bootstrap')`` defaults (2000 stratified replicates,
    quantiles with R's default type 7 = NumPy's "linear"). Stratifying keeps the class
    counts fixed, so no replicate is undefined even with few pCR cases. Replicates are
    scored in vectorised chunks; the result depends only on the inputs and ``seed``.
    """
    if num_replicates < 1:
        raise ValueError(f"num_replicates must be >= 1, got {num_replicates}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    y = _as_labels(labels)
    s = _as_scores(scores, y.size)
    if s.ndim != 1:
        raise ValueError(f"scores must have shape [{y.size}], got {s.shape}")
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_BOOTSTRAP_ELEMENTS // y.size)
    aucs = []
    for start in range(0, num_replicates, chunk):
        idx = stratified_bootstrap_indices(y, min(chunk, num_replicates - start), rng)
        aucs.append(_auroc_from_ranks(_midranks(s[idx]), y))
    alpha = 1.0 - confidence
    low, high = np.quantile(np.concatenate(aucs), [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def delong_covariance(
    labels: ArrayLike, scores: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """AUROCs of k predictors on the same patients and DeLong's covariance matrix of them.

    Fast midrank algorithm of Sun & Xu (2014, IEEE SPL 21:1389): the placement value of
    each positive (fraction of negatives it outranks, ties 1/2) is its midrank among all
    samples minus its midrank among positives, divided by the number of negatives, and
    symmetrically for negatives. The covariance is S10/m + S01/n from the sample
    covariances (ddof=1) of these structural components, as in DeLong et al. (1988) and
    pROC.

    Args:
      labels: boolean or 0/1 array of shape [n].
      scores: array of shape [k, n] (or [n] for a single predictor, treated as k=1).

    Returns:
      ``(aucs, cov)`` with shapes [k] and [k, k].
    """
    y = _as_labels(labels)
    s = np.atleast_2d(_as_scores(scores, y.size))
    if s.ndim != 2:
        raise ValueError(f"scores must have shape [k, {y.size}], got {s.shape}")
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


def delong_test(labels: ArrayLike, scores_a: ArrayLike, scores_b: ArrayLike) -> DeLongResult:
    """Paired two-sided DeLong test for two correlated ROC curves (pROC ``roc.test``).

    z = (AUC_a - AUC_b) / sqrt(var_a + var_b - 2 cov_ab), p = 2 (1 - Φ(|z|)). When the
    variance of the difference vanishes (e.g. identical rankings), there is no evidence of
    a difference: z = 0 and p = 1.
    """
    aucs, cov = delong_covariance(labels, np.stack([np.asarray(scores_a), np.asarray(scores_b)]))
    var_diff = cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1]
    # Rounding can leave a tiny residue (of either sign) when the rankings coincide.
    if var_diff <= 8 * np.finfo(np.float64).eps * (cov[0, 0] + cov[1, 1]):
        z, p_value = 0.0, 1.0
    else:
        z = float((aucs[0] - aucs[1]) / np.sqrt(var_diff))
        p_value = float(2.0 * norm.sf(abs(z)))
    return DeLongResult(auc_a=float(aucs[0]), auc_b=float(aucs[1]), z=z, p_value=p_value)
