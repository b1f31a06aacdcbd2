"""The numbers of a protocol run, from its predictions files: the main table, the bottom line,
pairwise tests with Holm's correction, operating points, decision curves and subgroups.

Two views of discrimination, side by side for every model. Pooled: the AUROC of each patient's
repeat-averaged out-of-fold prediction, with DeLong's test; it mixes the K fold models' scales,
which costs a model whose fold models are calibrated differently (a network) and not one that is
calibrated in every fold (a logistic reference). Per fold: the AUROC on each (repeat, fold)'s test
patients, averaged, with the corrected resampled t-test; it scores each fold model on its own
patients, and its variance includes the differences between trainings.

Computes from `Predictions` alone; pcrjax.evidence.loading reads them from a run's predictions
files, so that the evidence of a run can be rebuilt, or two runs compared, without retraining.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pcrjax import runs
from pcrjax.evidence import calibration, decision_curve, operating_points, statistics

MIN_PER_CLASS = 5  # A subgroup with fewer pCR or non-pCR patients gets "too few", not an AUROC.
RULES = {
    'youden': 'Youden',
    'sens90': '90 % sensitivity',
}  # Operating points, in report order.


@dataclasses.dataclass(frozen=True)
class Predictions:
  """One model's out-of-fold test predictions of every patient, in every repeat (sorted by id)."""

  patient_id: np.ndarray
  label: np.ndarray
  subtype: np.ndarray
  arm: np.ndarray
  prob: np.ndarray  # [repeats, patients]
  fold: (
      np.ndarray
  )  # [repeats, patients]: the fold in whose test set each patient was predicted.

  @property
  def mean_prob(self) -> np.ndarray:
    """The repeat-averaged prediction of each patient: what the table's CI and tests are about."""
    return self.prob.mean(axis=0)


def out_of_fold_rows(pred: Predictions) -> list[dict]:
  """The repeat-averaged prediction of every patient, in the predictions schema."""
  return [
      runs.prediction_row(
          patient_id=i, label=y, prob=p, subtype=s, fold=runs.OUT_OF_FOLD, arm=a
      )
      for i, y, p, s, a in zip(
          pred.patient_id, pred.label, pred.mean_prob, pred.subtype, pred.arm
      )
  ]


def _common(a: Predictions, b: Predictions) -> tuple[np.ndarray, np.ndarray]:
  """Indices into a and b of the patients both predicted; refuses disagreeing labels."""
  common, ia, ib = np.intersect1d(
      a.patient_id, b.patient_id, return_indices=True
  )
  if len(common) == 0:
    raise ValueError('The two models share no patient.')
  if not np.array_equal(a.label[ia], b.label[ib]):
    raise ValueError(
        'The two models disagree on the labels of the same patients.'
    )
  return ia, ib


def paired(
    a: Predictions, b: Predictions
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(labels, probs_a, probs_b) on the patients both predicted; refuses disagreeing labels."""
  ia, ib = _common(a, b)
  return a.label[ia], a.mean_prob[ia], b.mean_prob[ib]


def fold_aurocs(pred: Predictions) -> np.ndarray:
  """The AUROC of each (repeat, fold) model on its own test patients: [repeats, folds]."""
  folds = np.unique(pred.fold)
  out = np.empty((pred.prob.shape[0], folds.size))
  for repeat, (probs, fold_of) in enumerate(zip(pred.prob, pred.fold)):
    for k, fold in enumerate(folds):
      members = fold_of == fold
      try:
        out[repeat, k] = statistics.auroc(pred.label[members], probs[members])
      except ValueError as e:
        raise ValueError(f'Repeat {repeat}, fold {fold}: {e}.') from None
  return out


def _select(pred: Predictions, patients: np.ndarray) -> Predictions:
  return Predictions(
      patient_id=pred.patient_id[patients],
      label=pred.label[patients],
      subtype=pred.subtype[patients],
      arm=pred.arm[patients],
      prob=pred.prob[:, patients],
      fold=pred.fold[:, patients],
  )


def fold_test(a: Predictions, b: Predictions) -> dict:
  """B vs A over the repeats × folds test sets: Nadeau & Bengio's corrected resampled t-test.

  Pairs the fold models of a and b that were tested on the same patients (of those both
  predicted), so a and b must share their folds, as every model of a run does. Two runs with
  different folds have nothing to pair: every value is then None.
  """
  a, b = (
      _select(pred, patients) for pred, patients in zip((a, b), _common(a, b))
  )
  if a.fold.shape != b.fold.shape or not np.array_equal(a.fold, b.fold):
    return dict.fromkeys(
        (
            'repeats',
            'folds',
            'fold_auroc_a',
            'fold_auroc_b',
            'fold_difference',
            'fold_difference_ci_low',
            'fold_difference_ci_high',
            'fold_t',
            'fold_df',
            'fold_p',
        )
    )
  aurocs_a, aurocs_b = fold_aurocs(a), fold_aurocs(b)
  num_repeats, num_folds = aurocs_a.shape
  # K-fold cross-validation: n_test / n_train = 1 / (K - 1).
  result = statistics.corrected_resampled_ttest(
      (aurocs_b - aurocs_a).ravel(), test_train_ratio=1.0 / (num_folds - 1)
  )
  return {
      'repeats': num_repeats,
      'folds': num_folds,
      'fold_auroc_a': float(aurocs_a.mean()),
      'fold_auroc_b': float(aurocs_b.mean()),
      'fold_difference': result.difference,
      'fold_difference_ci_low': result.difference_ci[0],
      'fold_difference_ci_high': result.difference_ci[1],
      'fold_t': result.t,
      'fold_df': result.df,
      'fold_p': result.p_value,
  }


def paired_tests(
    pairs: list[tuple[str, Predictions, str, Predictions]],
) -> list[dict]:
  """B vs A for each (name_a, a, name_b, b): pooled (DeLong) and per fold (corrected t-test).

  Each family is Holm-adjusted over the pairs: `p_holm` (DeLong) and `fold_p_holm`.
  """
  out = []
  for name_a, a, name_b, b in pairs:
    labels, pa, pb = paired(a, b)
    result = statistics.delong_test(labels, pa, pb)
    out.append(
        {
            'a': name_a,
            'b': name_b,
            'patients': len(labels),
            'auroc_a': result.auc_a,
            'auroc_b': result.auc_b,
            'difference': result.difference,
            'difference_ci_low': result.difference_ci[0],
            'difference_ci_high': result.difference_ci[1],
            'z': -result.z,  # Of b - a.
            'p': result.p_value,
            'p_holm': None,
            **fold_test(a, b),
            'fold_p_holm': None,
        }
    )
  for family in ('p', 'fold_p'):
    # A test not done (None) enters Holm as NaN: it stays None and counts in the family.
    p_values = [np.nan if r[family] is None else r[family] for r in out]
    for row, adjusted in zip(out, statistics.holm(p_values) if out else []):
      row[f'{family}_holm'] = None if row[family] is None else float(adjusted)
  return out


def pairwise_tests(predictions: dict[str, Predictions]) -> list[dict]:
  """Every pair of the compared (early) models, in table order."""
  names = [name for name in predictions if runs.model(name).early_predictor]
  return paired_tests(
      [
          (a, predictions[a], b, predictions[b])
          for i, a in enumerate(names)
          for b in names[i + 1 :]
      ]
  )


def bottom_line(pairs: list[dict]) -> dict | None:
  """The paper's comparison (runs.PRIMARY): method minus reference, if both were run."""
  reference, method = runs.PRIMARY
  return next(
      (p for p in pairs if (p['a'], p['b']) == (reference, method)), None
  )


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of the main table."""

  name: str
  time_points: str
  num_patients: int
  num_pcr: int
  auroc: float  # Pooled: of the repeat-averaged out-of-fold predictions.
  ci_low: float
  ci_high: float
  auroc_repeats: tuple[float, ...]  # Pooled out-of-fold AUROC of each repeat.
  auroc_folds: tuple[
      float, ...
  ]  # AUROC of each (repeat, fold) on its test patients, repeat-major.
  brier: float
  calibration_intercept: float
  calibration_intercept_ci: tuple[float, float]
  calibration_slope: float
  calibration_slope_ci: tuple[float, float]
  degenerate: (
      str  # Why the calibration numbers would mislead ('' when they do not).
  )
  p_vs_baseline: (
      float | None
  )  # Paired DeLong, Holm-adjusted over the compared pairs.
  p_vs_baseline_per_fold: (
      float | None
  )  # Corrected resampled t-test, Holm-adjusted likewise.


def main_table(
    predictions: dict[str, Predictions],
    *,
    seed: int,
    num_replicates: int,
    pairs: list[dict],
) -> list[Row]:
  reference = runs.PRIMARY[0]
  vs_reference = {p['b']: p for p in pairs if p['a'] == reference}
  table = []
  for name, pred in predictions.items():
    probs = pred.mean_prob
    low, high = statistics.bootstrap_auroc_ci(
        pred.label, probs, num_replicates=num_replicates, seed=seed
    )
    intercept, slope = calibration.calibration_intercept_slope(
        pred.label, probs
    )
    cis = calibration.calibration_ci(
        pred.label, probs, num_replicates=num_replicates, seed=seed
    )
    table.append(
        Row(
            name=name,
            time_points=runs.model(name).visits,
            num_patients=len(pred.label),
            num_pcr=int(pred.label.sum()),
            auroc=float(statistics.auroc(pred.label, probs)),
            ci_low=low,
            ci_high=high,
            auroc_repeats=tuple(
                float(a)
                for a in np.atleast_1d(statistics.auroc(pred.label, pred.prob))
            ),
            auroc_folds=tuple(float(a) for a in fold_aurocs(pred).ravel()),
            brier=calibration.brier(pred.label, probs),
            calibration_intercept=intercept,
            calibration_intercept_ci=tuple(cis['intercept_ci']),
            calibration_slope=slope,
            calibration_slope_ci=tuple(cis['slope_ci']),
            degenerate=calibration.degenerate_calibration(pred.label, probs)
            or '',
            p_vs_baseline=vs_reference.get(name, {}).get('p_holm'),
            p_vs_baseline_per_fold=vs_reference.get(name, {}).get(
                'fold_p_holm'
            ),
        )
    )
  return table


def table_record(row: Row) -> dict:
  """A main-table row as a flat CSV record."""
  record = dataclasses.asdict(row)
  repeats = record.pop('auroc_repeats')
  record.update(
      auroc_repeats_mean=float(np.mean(repeats)),
      auroc_repeats_sd=float(np.std(repeats)),
      auroc_repeats_min=min(repeats),
      auroc_repeats_max=max(repeats),
  )
  folds = record.pop('auroc_folds')
  record.update(
      auroc_fold_mean=float(np.mean(folds)),
      auroc_fold_sd=float(np.std(folds, ddof=1)),
      auroc_fold_min=min(folds),
      auroc_fold_max=max(folds),
      test_folds=len(folds),
  )
  return record


def operating_point_table(
    predictions: dict[str, Predictions], *, seed: int, num_replicates: int
) -> list[dict]:
  """Sensitivity, specificity, PPV, NPV (with CIs) at each rule's threshold."""
  return [
      {
          'model': name,
          **operating_points.operating_point(
              pred.label,
              pred.mean_prob,
              rule,
              num_replicates=num_replicates,
              seed=seed,
          ),
      }
      for name, pred in predictions.items()
      for rule in RULES
  ]


def decision_curves(predictions: dict[str, Predictions]) -> list[dict]:
  """Net benefit of every model, of treating all and of treating none, per threshold probability."""
  return [
      {'model': name, **record}
      for name, pred in predictions.items()
      for record in decision_curve.decision_curve(pred.label, pred.mean_prob)
  ]


def subgroups(
    predictions: dict[str, Predictions], *, seed: int, num_replicates: int
) -> list[dict]:
  """AUROC with CI per HR/HER2 subtype and per arm; "too few" below MIN_PER_CLASS per class."""
  out = []
  for name, pred in predictions.items():
    for kind, values in (('subtype', pred.subtype), ('arm', pred.arm)):
      for group in sorted(set(values.tolist()) - {''}):
        members = values == group
        labels, probs = pred.label[members], pred.mean_prob[members]
        row = {
            'model': name,
            'kind': kind,
            'group': group,
            'patients': int(members.sum()),
            'pcr': int(labels.sum()),
            'auroc': None,
            'ci_low': None,
            'ci_high': None,
        }
        if min(labels.sum(), len(labels) - labels.sum()) >= MIN_PER_CLASS:
          row['auroc'] = float(statistics.auroc(labels, probs))
          row['ci_low'], row['ci_high'] = statistics.bootstrap_auroc_ci(
              labels, probs, num_replicates=num_replicates, seed=seed
          )
        out.append(row)
  return out
