"""Evidence from predictions files: pooling over folds and repeats, recalibration, Holm, subgroups."""

import numpy as np
import pytest

from pcrjax import calibration, evaluation


def _write_run(root, *, num_repeats=2, num_folds=2, n=80, seed=0, overconfident=False):
  """Fake predictions of one model in the protocol's layout; returns (labels, subtypes, arms)."""
  rng = np.random.default_rng(seed)
  labels = (rng.random(n) < 0.35).astype(int)
  subtypes = np.array(['HR+/HER2-', 'HR-/HER2-', 'HR-/HER2+'])[rng.integers(0, 3, n)]
  subtypes[:4] = 'HR+/HER2+'  # A subgroup too small for an AUROC.
  arms = np.array(['A', 'B'])[rng.integers(0, 2, n)]
  for repeat in range(num_repeats):
    fold_of = rng.permutation(n) % num_folds
    logits = 1.5 * (labels - 0.35) + rng.normal(0, 1, n)
    probs = 1 / (1 + np.exp(-(3 * logits if overconfident else logits)))
    for fold in range(num_folds):
      fold_dir = root / f'repeat_{repeat}' / f'fold_{fold}' / 'baseline'
      fold_dir.mkdir(parents=True)
      for split, rows in (('test', fold_of == fold), ('val', fold_of != fold)):
        evaluation.write_predictions(str(fold_dir / f'predictions_{split}.csv'), [
            {'patient_id': f'P{i:03d}', 'label': int(labels[i]), 'prob': float(probs[i]),
             'subtype': subtypes[i], 'fold': fold, 'arm': arms[i]} for i in np.flatnonzero(rows)])
  return labels, subtypes, arms


def test_pooling_over_folds_and_repeats(tmp_path):
  labels, _, _ = _write_run(tmp_path)
  pred = evaluation.load_predictions(str(tmp_path), 'baseline', num_repeats=2, num_folds=2)
  assert list(pred.patient_id) == sorted(pred.patient_id) and len(pred.patient_id) == 80
  np.testing.assert_array_equal(pred.label, labels[np.argsort([f'P{i:03d}' for i in range(80)])])
  assert pred.prob.shape == (2, 80) and not np.allclose(pred.prob[0], pred.prob[1])
  np.testing.assert_allclose(pred.mean_prob, pred.prob.mean(0))


def test_recalibration_is_fitted_on_each_folds_validation_split(tmp_path):
  _write_run(tmp_path, overconfident=True)
  raw = evaluation.load_predictions(str(tmp_path), 'baseline', num_repeats=2, num_folds=2)
  fitted = evaluation.load_predictions(str(tmp_path), 'baseline', num_repeats=2, num_folds=2,
                                       calibrate='temperature')
  # Repeat 0, fold 0: the test predictions transformed by the calibrator of that fold's val split.
  val = evaluation.read_predictions(str(tmp_path / 'repeat_0/fold_0/baseline/predictions_val.csv'))
  test = evaluation.read_predictions(str(tmp_path / 'repeat_0/fold_0/baseline/predictions_test.csv'))
  calibrator = calibration.fit_temperature(np.array([p['label'] for p in val]),
                                           np.array([p['prob'] for p in val]))
  index = {pid: i for i, pid in enumerate(fitted.patient_id)}
  for p in test:
    assert fitted.prob[0, index[p['patient_id']]] == pytest.approx(calibrator(np.array([p['prob']]))[0])
  # Over-confident predictions: recalibration brings the slope towards 1.
  _, raw_slope = calibration.calibration_intercept_slope(raw.label, raw.prob[0])
  _, new_slope = calibration.calibration_intercept_slope(fitted.label, fitted.prob[0])
  assert raw_slope < 0.6 and abs(new_slope - 1) < abs(raw_slope - 1)


def test_holm_matches_its_definition():
  np.testing.assert_allclose(evaluation.holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
  np.testing.assert_allclose(evaluation.holm([0.5, 0.001]), [0.5, 0.002])
  assert evaluation.holm([0.9, 0.8]).max() == 1.0


def test_subgroups_say_too_few_instead_of_a_number(tmp_path):
  _write_run(tmp_path)
  pred = evaluation.load_predictions(str(tmp_path), 'baseline', num_repeats=2, num_folds=2)
  rows = evaluation.subgroups({'baseline': pred}, seed=0, num_replicates=200)
  small = next(r for r in rows if r['group'] == 'HR+/HER2+')
  assert small['patients'] == 4 and small['auroc'] is None
  for row in rows:
    if row['auroc'] is not None:
      assert min(row['pcr'], row['patients'] - row['pcr']) >= evaluation.MIN_PER_CLASS
      assert row['ci_low'] <= row['auroc'] <= row['ci_high']
  assert {r['group'] for r in rows if r['kind'] == 'arm'} == {'A', 'B'}


def test_pairwise_tests_pair_patients_and_adjust(tmp_path):
  _write_run(tmp_path)
  base = evaluation.load_predictions(str(tmp_path), 'baseline', num_repeats=2, num_folds=2)
  perfect = evaluation.Predictions(base.patient_id, base.label, base.subtype, base.arm,
                                   base.label[None].astype(float) * 0.8 + 0.1)
  pairs = evaluation.pairwise_tests({'baseline': base, 'student': perfect, 'ftv': base})
  by_pair = {(p['a'], p['b']): p for p in pairs}
  assert by_pair[('baseline', 'student')]['auroc_b'] == 1.0
  assert by_pair[('baseline', 'student')]['difference'] > 0 and by_pair[('baseline', 'student')]['z'] > 0
  assert by_pair[('baseline', 'ftv')]['p'] == 1.0
  assert all(p['p_holm'] >= p['p'] for p in pairs)
  shuffled = evaluation.Predictions(base.patient_id, 1 - base.label, base.subtype, base.arm, base.prob)
  with pytest.raises(ValueError, match='disagree on the labels'):
    evaluation.pairwise_tests({'baseline': base, 'student': shuffled})
