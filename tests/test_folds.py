"""Fold assignment: disjoint, covering, stratified, deterministic, independent of record order."""

import numpy as np
import pytest

from pcrjax import folds


def _cohort(n=120, seed=0):
  rng = np.random.default_rng(seed)
  ids = np.array([f'SYN-{i:05d}' for i in rng.permutation(n)])
  subtype = rng.choice(4, size=n, p=[0.4, 0.15, 0.1, 0.35])
  pcr = (rng.random(n) < np.array([0.18, 0.35, 0.65, 0.4])[subtype]).astype(int)
  return ids, folds.strata(pcr, subtype), pcr


def test_folds_partition_and_stratify():
  ids, stratum, pcr = _cohort()
  assigned = folds.assign_folds(ids, stratum, 5, seed=0)
  assert sorted(np.unique(assigned)) == [0, 1, 2, 3, 4]
  for s in np.unique(
      stratum
  ):  # Every stratum is spread as evenly as its size allows.
    counts = np.bincount(assigned[stratum == s], minlength=5)
    assert counts.max() - counts.min() <= 1
  rates = [pcr[assigned == f].mean() for f in range(5)]
  assert max(rates) - min(rates) < 0.1


def test_split_fold_is_disjoint_and_covers_everyone():
  ids, stratum, _ = _cohort()
  test_sets = []
  for fold in range(5):
    split = folds.split_fold(
        ids, stratum, num_folds=5, fold=fold, seed=3, val_fraction=0.2
    )
    parts = [set(split.train), set(split.val), set(split.test)]
    assert (
        not (parts[0] & parts[1])
        and not (parts[0] & parts[2])
        and not (parts[1] & parts[2])
    )
    assert len(parts[0] | parts[1] | parts[2]) == len(ids)
    assert abs(len(split.val) - 0.2 * (len(ids) - len(split.test))) <= 8
    test_sets.append(parts[2])
  assert set().union(*test_sets) == set(range(len(ids)))


def test_folds_are_deterministic_and_follow_ids_not_record_order():
  ids, stratum, _ = _cohort()
  a = folds.assign_folds(ids, stratum, 5, seed=7)
  np.testing.assert_array_equal(a, folds.assign_folds(ids, stratum, 5, seed=7))
  shuffled = np.random.default_rng(1).permutation(len(ids))
  b = folds.assign_folds(ids[shuffled], stratum[shuffled], 5, seed=7)
  assert dict(zip(ids, a)) == dict(zip(ids[shuffled], b))
  assert not np.array_equal(a, folds.assign_folds(ids, stratum, 5, seed=8))


def test_duplicate_ids_are_refused():
  ids, stratum, _ = _cohort(20)
  ids[3] = ids[4]
  with pytest.raises(ValueError, match='Duplicate patient ids'):
    folds.assign_folds(ids, stratum, 2, seed=0)


@pytest.mark.parametrize('val_fraction', [0.2, 0.3, 0.4])
def test_validation_split_honours_val_fraction_and_strata(val_fraction):
  ids, stratum, _ = _cohort(200)
  split = folds.split_fold(
      ids, stratum, num_folds=5, fold=1, seed=0, val_fraction=val_fraction
  )
  rest = np.concatenate([split.train, split.val])
  assert len(split.val) == round(val_fraction * len(rest))
  for s in np.unique(
      stratum[rest]
  ):  # Each stratum within one patient of its share.
    share = val_fraction * (stratum[rest] == s).sum()
    assert abs((stratum[split.val] == s).sum() - share) < 1


def test_holdout_keeps_singleton_strata():
  held = folds.stratified_holdout(
      np.array([0, 0, 0, 0, 1, 2, 2, 2, 2, 2]), 0.3, seed=0
  )
  assert held.sum() == 3


def test_validation_and_training_hold_both_classes_in_a_small_cohort():
  """A 21-patient cohort in 2 folds: a 2-patient validation split would often miss the rare class."""
  for seed in range(20):
    ids, stratum, pcr = _cohort(21, seed=seed)
    for fold in range(2):
      try:
        split = folds.split_fold(
            ids, stratum, num_folds=2, fold=fold, seed=seed, val_fraction=0.2
        )
      except (
          ValueError
      ) as e:  # Too few of a class in the fold's training part: said in one line.
        rest_pcr = np.bincount(
            pcr[folds.assign_folds(ids, stratum, 2, seed) != fold], minlength=2
        )
        assert rest_pcr.min() < 2 and 'needs both classes' in str(e)
        continue
      assert len(split.val) == round(0.2 * (len(split.train) + len(split.val)))
      assert set(pcr[split.val]) == {0, 1} and set(pcr[split.train]) == {
          0,
          1,
      }, (seed, fold)
