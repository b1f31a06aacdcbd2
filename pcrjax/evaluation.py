"""Predictions files, and the evidence computed from them: AUROC with CIs across repeats, paired
DeLong tests with Holm's correction, calibration, operating points and subgroups.

Everything here reads predictions only, so a report can be rebuilt (or two runs compared) without
retraining.
"""

from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np

from pcrjax import calibration, stats

PREDICTION_FIELDS = ('patient_id', 'label', 'prob', 'subtype', 'fold', 'arm')
MODELS = ('baseline', 'student', 'ftv', 'teacher')  # Table order.
EARLY_MODELS = ('baseline', 'student', 'ftv')  # The T0+T1 rows, compared pairwise.
TIME_POINTS = {'baseline': 'T0+T1', 'student': 'T0+T1', 'ftv': 'T0+T1', 'teacher': 'T0+T1+T2'}
LABELS = {'baseline': 'Baseline (single-stage, single-task)', 'student': 'Student (two-stage, dual-task)',
          'ftv': 'FTV (I-SPY clinical biomarker)', 'teacher': 'Teacher (stage 1, sees T2)'}
MIN_PER_CLASS = 5  # A subgroup with fewer pCR or non-pCR patients gets "too few", not an AUROC.


def write_predictions(path: str, rows: list[dict]) -> None:
  """Writes atomically: a file that exists is complete (the protocol resumes on that)."""
  tmp = path + '.tmp'
  with open(tmp, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=PREDICTION_FIELDS)
    writer.writeheader()
    for row in rows:
      writer.writerow({**row, 'prob': f"{row['prob']:.6f}"})
  os.replace(tmp, path)


def read_predictions(path: str) -> list[dict]:
  with open(path, newline='') as f:
    return [{**row, 'label': int(row['label']), 'prob': float(row['prob']), 'fold': int(row['fold'])}
            for row in csv.DictReader(f)]


@dataclasses.dataclass(frozen=True)
class Predictions:
  """One model's out-of-fold test predictions of every patient, in every repeat (sorted by id)."""

  patient_id: np.ndarray
  label: np.ndarray
  subtype: np.ndarray
  arm: np.ndarray
  prob: np.ndarray  # [repeats, patients]

  @property
  def mean_prob(self) -> np.ndarray:
    """The repeat-averaged prediction of each patient: what the table's CI and tests are about."""
    return self.prob.mean(axis=0)


def load_predictions(run_dir: str, model: str, *, num_repeats: int, num_folds: int,
                     calibrate: str = 'none') -> Predictions:
  """Pools `repeat_<r>/fold_<k>/<model>/predictions_test.csv`; optionally recalibrates each fold.

  `calibrate` ('platt' or 'temperature') is fitted on that fold's validation predictions only and
  applied to its test predictions.
  """
  per_repeat = []
  for repeat in range(num_repeats):
    rows = []
    for fold in range(num_folds):
      fold_dir = os.path.join(run_dir, f'repeat_{repeat}', f'fold_{fold}', model)
      test = read_predictions(os.path.join(fold_dir, 'predictions_test.csv'))
      if calibrate != 'none':
        val = read_predictions(os.path.join(fold_dir, 'predictions_val.csv'))
        fit = {'platt': calibration.fit_platt, 'temperature': calibration.fit_temperature}[calibrate]
        calibrator = fit(np.array([p['label'] for p in val]), np.array([p['prob'] for p in val]))
        probs = calibrator(np.array([p['prob'] for p in test]))
        test = [{**p, 'prob': float(q)} for p, q in zip(test, probs)]
      rows += test
    per_repeat.append(sorted(rows, key=lambda p: p['patient_id']))
  first = per_repeat[0]
  ids = np.array([p['patient_id'] for p in first])
  for rows in per_repeat[1:]:
    if [p['patient_id'] for p in rows] != ids.tolist():
      raise ValueError(f'{run_dir}: the repeats of {model} did not predict the same patients.')
  return Predictions(patient_id=ids, label=np.array([p['label'] for p in first]),
                     subtype=np.array([p['subtype'] for p in first]),
                     arm=np.array([p.get('arm', '') for p in first]),
                     prob=np.array([[p['prob'] for p in rows] for rows in per_repeat]))


def paired(a: Predictions, b: Predictions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(labels, probs_a, probs_b) on the patients both predicted; refuses disagreeing labels."""
  common, ia, ib = np.intersect1d(a.patient_id, b.patient_id, return_indices=True)
  if len(common) == 0:
    raise ValueError('The two runs share no patient.')
  if not np.array_equal(a.label[ia], b.label[ib]):
    raise ValueError('The two runs disagree on the labels of the same patients.')
  return a.label[ia], a.mean_prob[ia], b.mean_prob[ib]


def holm(p_values) -> np.ndarray:
  """Holm's step-down adjustment: controls the family-wise error rate of the pairwise tests."""
  p = np.asarray(p_values, float)
  order = np.argsort(p)
  adjusted = np.minimum(1.0, np.maximum.accumulate((len(p) - np.arange(len(p))) * p[order]))
  out = np.empty_like(p)
  out[order] = adjusted
  return out


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of the main table."""

  name: str
  time_points: str
  num_patients: int
  num_pcr: int
  auroc: float  # Of the repeat-averaged predictions.
  ci_low: float
  ci_high: float
  auroc_repeats: tuple[float, ...]  # Pooled out-of-fold AUROC of each repeat.
  brier: float
  calibration_intercept: float
  calibration_slope: float
  p_vs_baseline: float | None  # Paired DeLong, Holm-adjusted over the T0+T1 pairs.


def main_table(predictions: dict[str, Predictions], *, seed: int, num_replicates: int,
               pairs: list[dict]) -> list[Row]:
  vs_baseline = {p['b']: p['p_holm'] for p in pairs if p['a'] == 'baseline'}
  table = []
  for name, pred in predictions.items():
    probs = pred.mean_prob
    low, high = stats.bootstrap_auroc_ci(pred.label, probs, num_replicates=num_replicates, seed=seed)
    intercept, slope = calibration.calibration_intercept_slope(pred.label, probs)
    table.append(Row(
        name=name, time_points=TIME_POINTS[name], num_patients=len(pred.label),
        num_pcr=int(pred.label.sum()), auroc=float(stats.auroc(pred.label, probs)), ci_low=low,
        ci_high=high, auroc_repeats=tuple(float(a) for a in stats.auroc(pred.label, pred.prob)),
        brier=calibration.brier(pred.label, probs), calibration_intercept=intercept,
        calibration_slope=slope, p_vs_baseline=vs_baseline.get(name)))
  return table


def pairwise_tests(predictions: dict[str, Predictions]) -> list[dict]:
  """Paired DeLong tests between every pair of T0+T1 models, with Holm-adjusted p-values."""
  names = [m for m in EARLY_MODELS if m in predictions]
  pairs = []
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      labels, pa, pb = paired(predictions[a], predictions[b])
      result = stats.delong_test(labels, pa, pb)
      pairs.append({'a': a, 'b': b, 'auroc_a': result.auc_a, 'auroc_b': result.auc_b,
                    'difference': result.auc_b - result.auc_a, 'z': -result.z,  # Of b - a.
                    'p': result.p_value})
  for pair, adjusted in zip(pairs, holm([p['p'] for p in pairs]) if pairs else []):
    pair['p_holm'] = float(adjusted)
  return pairs


def operating_points(predictions: dict[str, Predictions], *, seed: int,
                     num_replicates: int) -> list[dict]:
  """Sensitivity, specificity, PPV, NPV (with CIs) at the Youden point and at 90 % sensitivity."""
  return [{'model': name, 'rule': rule, **calibration.operating_point(
              pred.label, pred.mean_prob, rule, num_replicates=num_replicates, seed=seed)}
          for name, pred in predictions.items() for rule in ('youden', 'sens90')]


def subgroups(predictions: dict[str, Predictions], *, seed: int, num_replicates: int) -> list[dict]:
  """AUROC with CI per HR/HER2 subtype and per arm; "too few" below MIN_PER_CLASS per class."""
  out = []
  for name, pred in predictions.items():
    for kind, values in (('subtype', pred.subtype), ('arm', pred.arm)):
      for group in sorted(set(values.tolist()) - {''}):
        members = values == group
        labels, probs = pred.label[members], pred.mean_prob[members]
        row = {'model': name, 'kind': kind, 'group': group, 'patients': int(members.sum()),
               'pcr': int(labels.sum()), 'auroc': None, 'ci_low': None, 'ci_high': None}
        if min(labels.sum(), len(labels) - labels.sum()) >= MIN_PER_CLASS:
          row['auroc'] = float(stats.auroc(labels, probs))
          row['ci_low'], row['ci_high'] = stats.bootstrap_auroc_ci(
              labels, probs, num_replicates=num_replicates, seed=seed)
        out.append(row)
  return out
