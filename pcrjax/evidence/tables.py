"""The numbers of a protocol run, from its predictions files: the main table, the bottom line,
pairwise DeLong tests with Holm's correction, operating points, decision curves and subgroups.

Reads predictions only (through the run contract, pcrjax.runs), so the evidence of a run can be
rebuilt, or two runs compared, without retraining.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pcrjax import runs
from pcrjax.evidence import calibration, decision_curve, operating_points, statistics

MIN_PER_CLASS = 5  # A subgroup with fewer pCR or non-pCR patients gets "too few", not an AUROC.
RULES = {'youden': 'Youden', 'sens90': '90 % sensitivity'}  # Operating points, in report order.


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


CALIBRATORS = {'platt': calibration.fit_platt, 'temperature': calibration.fit_temperature}


def fold_calibrator(directory: str, method: str) -> calibration.Calibrator:
  """`method`'s calibrator fitted on one fold's validation predictions (identity for 'none')."""
  if method == 'none':
    return calibration.Calibrator(method='none', intercept=0.0, slope=1.0)
  val = runs.read_predictions(runs.predictions_path(directory, 'val'))
  return CALIBRATORS[method](np.array([p['label'] for p in val]), np.array([p['prob'] for p in val]))


def load_predictions(run_dir: str, model_name: str, *, num_repeats: int, num_folds: int,
                     calibrate: str = 'none') -> Predictions:
  """Pools the test predictions of every fold; optionally recalibrates each fold first.

  `calibrate` ('platt' or 'temperature') is fitted on that fold's validation predictions only and
  applied to its test predictions.
  """
  per_repeat = []
  for repeat in range(num_repeats):
    rows = []
    for fold in range(num_folds):
      directory = runs.stage_dir(run_dir, repeat, fold, model_name)
      test = runs.read_predictions(runs.predictions_path(directory, 'test'))
      if calibrate != 'none':
        probs = fold_calibrator(directory, calibrate)(np.array([p['prob'] for p in test]))
        test = [{**p, 'prob': float(q)} for p, q in zip(test, probs)]
      rows += test
    per_repeat.append(sorted(rows, key=lambda p: p['patient_id']))
  first = per_repeat[0]
  ids = np.array([p['patient_id'] for p in first])
  for rows in per_repeat[1:]:
    if [p['patient_id'] for p in rows] != ids.tolist():
      raise ValueError(f'{run_dir}: the repeats of {model_name} did not predict the same patients.')
  return Predictions(patient_id=ids, label=np.array([p['label'] for p in first]),
                     subtype=np.array([p['subtype'] for p in first]),
                     arm=np.array([p['arm'] for p in first]),
                     prob=np.array([[p['prob'] for p in rows] for rows in per_repeat]))


def load_run(run_dir: str) -> dict[str, Predictions]:
  """Every finished model of a protocol run, in table order, as its run config asks."""
  config = runs.read_config(run_dir)
  return {m.name: load_predictions(run_dir, m.name, num_repeats=config.num_repeats,
                                   num_folds=config.data.num_folds, calibrate=config.calibration)
          for m in runs.finished_models(run_dir, num_repeats=config.num_repeats,
                                        num_folds=config.data.num_folds)}


def out_of_fold_rows(pred: Predictions) -> list[dict]:
  """The repeat-averaged prediction of every patient, in the predictions schema."""
  return [runs.prediction_row(patient_id=i, label=y, prob=p, subtype=s, fold=runs.OUT_OF_FOLD, arm=a)
          for i, y, p, s, a in zip(pred.patient_id, pred.label, pred.mean_prob, pred.subtype, pred.arm)]


def paired(a: Predictions, b: Predictions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(labels, probs_a, probs_b) on the patients both predicted; refuses disagreeing labels."""
  common, ia, ib = np.intersect1d(a.patient_id, b.patient_id, return_indices=True)
  if len(common) == 0:
    raise ValueError('The two models share no patient.')
  if not np.array_equal(a.label[ia], b.label[ib]):
    raise ValueError('The two models disagree on the labels of the same patients.')
  return a.label[ia], a.mean_prob[ia], b.mean_prob[ib]


def delong_holm(pairs: list[tuple[str, Predictions, str, Predictions]]) -> list[dict]:
  """Paired DeLong test of B vs A for each (name_a, a, name_b, b), Holm-adjusted over the family."""
  out = []
  for name_a, a, name_b, b in pairs:
    labels, pa, pb = paired(a, b)
    result = statistics.delong_test(labels, pa, pb)
    out.append({'a': name_a, 'b': name_b, 'patients': len(labels), 'auroc_a': result.auc_a,
                'auroc_b': result.auc_b, 'difference': result.difference,
                'difference_ci_low': result.difference_ci[0],
                'difference_ci_high': result.difference_ci[1], 'z': -result.z,  # Of b - a.
                'p': result.p_value})
  for row, adjusted in zip(out, statistics.holm([r['p'] for r in out]) if out else []):
    row['p_holm'] = float(adjusted)
  return out


def pairwise_tests(predictions: dict[str, Predictions]) -> list[dict]:
  """Every pair of the compared (early) models, in table order."""
  names = [name for name in predictions if runs.model(name).compared]
  return delong_holm([(a, predictions[a], b, predictions[b])
                      for i, a in enumerate(names) for b in names[i + 1:]])


def bottom_line(pairs: list[dict]) -> dict | None:
  """The paper's comparison (runs.PRIMARY): method minus reference, if both were run."""
  reference, method = runs.PRIMARY
  return next((p for p in pairs if (p['a'], p['b']) == (reference, method)), None)


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
  calibration_intercept_ci: tuple[float, float]
  calibration_slope: float
  calibration_slope_ci: tuple[float, float]
  degenerate: str  # Why the calibration numbers would mislead ('' when they do not).
  p_vs_baseline: float | None  # Paired DeLong, Holm-adjusted over the compared pairs.


def main_table(predictions: dict[str, Predictions], *, seed: int, num_replicates: int,
               pairs: list[dict]) -> list[Row]:
  reference = runs.PRIMARY[0]
  vs_reference = {p['b']: p['p_holm'] for p in pairs if p['a'] == reference}
  table = []
  for name, pred in predictions.items():
    probs = pred.mean_prob
    low, high = statistics.bootstrap_auroc_ci(pred.label, probs, num_replicates=num_replicates,
                                              seed=seed)
    intercept, slope = calibration.calibration_intercept_slope(pred.label, probs)
    cis = calibration.calibration_ci(pred.label, probs, num_replicates=num_replicates, seed=seed)
    table.append(Row(
        name=name, time_points=runs.model(name).visits, num_patients=len(pred.label),
        num_pcr=int(pred.label.sum()), auroc=float(statistics.auroc(pred.label, probs)),
        ci_low=low, ci_high=high,
        auroc_repeats=tuple(float(a) for a in np.atleast_1d(statistics.auroc(pred.label, pred.prob))),
        brier=calibration.brier(pred.label, probs), calibration_intercept=intercept,
        calibration_intercept_ci=tuple(cis['intercept_ci']), calibration_slope=slope,
        calibration_slope_ci=tuple(cis['slope_ci']),
        degenerate=calibration.degenerate_calibration(pred.label, probs) or '',
        p_vs_baseline=vs_reference.get(name)))
  return table


def table_record(row: Row) -> dict:
  """A main-table row as a flat CSV record."""
  record = dataclasses.asdict(row)
  repeats = record.pop('auroc_repeats')
  record.update(auroc_repeats_mean=float(np.mean(repeats)), auroc_repeats_sd=float(np.std(repeats)),
                auroc_repeats_min=min(repeats), auroc_repeats_max=max(repeats))
  return record


def operating_point_table(predictions: dict[str, Predictions], *, seed: int,
                          num_replicates: int) -> list[dict]:
  """Sensitivity, specificity, PPV, NPV (with CIs) at each rule's threshold."""
  return [{'model': name, **operating_points.operating_point(
              pred.label, pred.mean_prob, rule, num_replicates=num_replicates, seed=seed)}
          for name, pred in predictions.items() for rule in RULES]


def decision_curves(predictions: dict[str, Predictions]) -> list[dict]:
  """Net benefit of every model, of treating all and of treating none, per threshold probability."""
  return [{'model': name, **record} for name, pred in predictions.items()
          for record in decision_curve.decision_curve(pred.label, pred.mean_prob)]


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
          row['auroc'] = float(statistics.auroc(labels, probs))
          row['ci_low'], row['ci_high'] = statistics.bootstrap_auroc_ci(
              labels, probs, num_replicates=num_replicates, seed=seed)
        out.append(row)
  return out
