"""Deterministic, stratified cross-validation folds, assigned at read time from patient ids.

Patients are sorted by id first, so the folds depend only on the set of ids, the strata and the seed,
never on the order the records happen to sit in on disk.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from sklearn import model_selection


@dataclasses.dataclass(frozen=True)
class FoldSplit:
  """Row indices (into the data source) of one outer fold."""

  train: np.ndarray
  val: np.ndarray
  test: np.ndarray


def strata(pcr: np.ndarray, subtype: np.ndarray) -> np.ndarray:
  """pCR x HR/HER2 subtype, the strata of every split."""
  return np.asarray(subtype) * 2 + np.asarray(pcr)


def pcr_of(stratum: np.ndarray) -> np.ndarray:
  return np.asarray(stratum) % 2


def assign_folds(
    patient_ids, stratum: np.ndarray, num_folds: int, seed: int
) -> np.ndarray:
  """The outer fold (0..num_folds-1) of every patient, stratified by `stratum`."""
  patient_ids = np.asarray(patient_ids)
  if len(set(patient_ids.tolist())) != len(patient_ids):
    raise ValueError(
        'Duplicate patient ids in the dataset: folds would leak patients.'
    )
  if len(patient_ids) < num_folds:
    raise ValueError(
        f'{len(patient_ids)} patients cannot fill {num_folds} folds.'
    )
  order = np.argsort(patient_ids, kind='stable')
  folds = np.empty(len(order), np.int64)
  for fold, (_, held_out) in enumerate(
      _stratified_splits(num_folds, seed, order, stratum[order])
  ):
    folds[order[held_out]] = fold
  return folds


def split_fold(
    patient_ids,
    stratum: np.ndarray,
    *,
    num_folds: int,
    fold: int,
    seed: int,
    val_fraction: float,
) -> FoldSplit:
  """Outer fold `fold` is the test set; a stratified `val_fraction` of the rest is validation."""
  folds = assign_folds(patient_ids, stratum, num_folds, seed)
  test = np.flatnonzero(folds == fold)
  rest = np.flatnonzero(folds != fold)
  rest = rest[np.argsort(np.asarray(patient_ids)[rest], kind='stable')]
  is_val = stratified_holdout(stratum[rest], val_fraction, seed + 1)
  is_val = _with_both_classes(
      is_val, pcr_of(stratum[rest]), fold=fold, seed=seed + 2
  )
  return FoldSplit(
      train=np.sort(rest[~is_val]),
      val=np.sort(rest[is_val]),
      test=np.sort(test),
  )


def hold_out_part(
    split: FoldSplit,
    patient_ids,
    stratum: np.ndarray,
    *,
    parts: int,
    part: int,
    seed: int,
) -> FoldSplit:
  """Cross-fitting inside a fold: its training patients cut in `parts` stratified parts; part `part`
  is the test set, the other parts train, validation is the fold's. A model trained on it predicts
  part `part` without having seen those patients' labels."""
  train = split.train[
      np.argsort(np.asarray(patient_ids)[split.train], kind='stable')
  ]
  held_out = np.zeros(len(train), bool)
  held_out[_stratified_splits(parts, seed, train, stratum[train])[part][1]] = (
      True
  )
  return FoldSplit(
      train=np.sort(train[~held_out]),
      val=split.val,
      test=np.sort(train[held_out]),
  )


def _with_both_classes(
    is_val: np.ndarray, pcr: np.ndarray, *, fold: int, seed: int
) -> np.ndarray:
  """The holdout, with a patient of each class in it and in training (validation AUROC selects the
  epoch): a small cohort's stratified quota can leave a class out; one patient is then swapped in.
  """
  counts = np.bincount(pcr, minlength=2)
  if counts.min() < 2 or min(is_val.sum(), (~is_val).sum()) < 2:
    raise ValueError(
        f'Fold {fold}: its {len(pcr)} training and validation patients hold {counts[1]} pCR and'
        f' {counts[0]} non-pCR; model selection needs both classes in training and in validation'
        ' (at least 2 of each, and 2 validation patients): use fewer folds, a larger'
        ' data.val_fraction, or more patients.'
    )
  rng = np.random.default_rng(seed)
  is_val = is_val.copy()
  for label in (0, 1):
    for in_val in (
        True,
        False,
    ):  # Validation, then training: each needs a patient of `label`.
      part = is_val == in_val
      if not (part & (pcr == label)).any():
        swap_in = rng.choice(np.flatnonzero(~part & (pcr == label)))
        swap_out = rng.choice(np.flatnonzero(part & (pcr != label)))
        is_val[swap_in], is_val[swap_out] = is_val[swap_out], is_val[swap_in]
  return is_val


def stratified_holdout(
    stratum: np.ndarray, fraction: float, seed: int
) -> np.ndarray:
  """A mask holding out round(fraction * n) rows, each stratum in proportion (largest remainder).

  sklearn's StratifiedShuffleSplit does the same but refuses a stratum of one patient, which small
  training folds have (a rare pCR subtype); here such a stratum is held out or not by its quota.
  """
  groups, members = np.unique(stratum, return_inverse=True)
  quota = fraction * np.bincount(members, minlength=len(groups))
  counts = np.floor(quota).astype(int)
  extra = round(fraction * len(stratum)) - counts.sum()
  counts[np.argsort(counts - quota, kind='stable')[:extra]] += 1
  rng = np.random.default_rng(seed)
  held = np.zeros(len(stratum), bool)
  for group, count in enumerate(counts):
    held[rng.permutation(np.flatnonzero(members == group))[:count]] = True
  return held


def _stratified_splits(
    n_splits: int, seed: int, rows: np.ndarray, stratum: np.ndarray
) -> list:
  """sklearn's StratifiedKFold (shuffled) splits of `rows`, as (train, held_out) position pairs.

  Rare strata (e.g. a pCR subtype with a handful of patients) are expected in small cohorts; they are
  spread over as many folds as they have patients, which is the best stratification can do, so
  sklearn's warning about them is silenced.
  """
  kfold = model_selection.StratifiedKFold(
      n_splits=n_splits, shuffle=True, random_state=seed
  )
  with warnings.catch_warnings():
    warnings.filterwarnings(
        'ignore', message='The least populated class', category=UserWarning
    )
    return list(kfold.split(rows, stratum))
