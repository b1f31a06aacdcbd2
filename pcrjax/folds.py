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


def assign_folds(patient_ids, stratum: np.ndarray, num_folds: int, seed: int) -> np.ndarray:
  """The outer fold (0..num_folds-1) of every patient, stratified by `stratum`."""
  patient_ids = np.asarray(patient_ids)
  if len(set(patient_ids.tolist())) != len(patient_ids):
    raise ValueError('Duplicate patient ids in the dataset: folds would leak patients.')
  if len(patient_ids) < num_folds:
    raise ValueError(f'{len(patient_ids)} patients cannot fill {num_folds} folds.')
  order = np.argsort(patient_ids, kind='stable')
  folds = np.empty(len(order), np.int64)
  for fold, (_, held_out) in enumerate(_stratified_splits(num_folds, seed, order, stratum[order])):
    folds[order[held_out]] = fold
  return folds


def split_fold(patient_ids, stratum: np.ndarray, *, num_folds: int, fold: int, seed: int,
               val_fraction: float) -> FoldSplit:
  """Outer fold `fold` is the test set; a stratified `val_fraction` of the rest is validation."""
  folds = assign_folds(patient_ids, stratum, num_folds, seed)
  test = np.flatnonzero(folds == fold)
  rest = np.flatnonzero(folds != fold)
  rest = rest[np.argsort(np.asarray(patient_ids)[rest], kind='stable')]
  is_val = stratified_holdout(stratum[rest], val_fraction, seed + 1)
  return FoldSplit(train=np.sort(rest[~is_val]), val=np.sort(rest[is_val]), test=np.sort(test))


def stratified_holdout(stratum: np.ndarray, fraction: float, seed: int) -> np.ndarray:
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


def _stratified_splits(n_splits: int, seed: int, rows: np.ndarray, stratum: np.ndarray) -> list:
  """sklearn's StratifiedKFold (shuffled) splits of `rows`, as (train, held_out) position pairs.

  Rare strata (e.g. a pCR subtype with a handful of patients) are expected in small cohorts; they are
  spread over as many folds as they have patients, which is the best stratification can do, so
  sklearn's warning about them is silenced.
  """
  kfold = model_selection.StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
  with warnings.catch_warnings():
    warnings.filterwarnings('ignore', message='The least populated class', category=UserWarning)
    return list(kfold.split(rows, stratum))
