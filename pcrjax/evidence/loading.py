"""A protocol run's predictions files read into `tables.Predictions`: the one place the evidence
reads run folders (the report, comparisons of runs and the export ask it)."""

from __future__ import annotations

import numpy as np

from pcrjax import runs
from pcrjax.evidence import calibration, tables


def fold_calibrator(directory: str, method: str) -> calibration.Calibrator:
  """`method`'s calibrator fitted on one fold's validation predictions."""
  val = runs.read_predictions(runs.predictions_path(directory, 'val'))
  return calibration.fit(
      method,
      np.array([p['label'] for p in val]),
      np.array([p['prob'] for p in val]),
  )


def load_predictions(
    run_dir: str,
    model_name: str,
    *,
    num_repeats: int,
    num_folds: int,
    calibrate: str = calibration.NONE,
) -> tables.Predictions:
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
      if calibrate != calibration.NONE:
        probs = fold_calibrator(directory, calibrate)(
            np.array([p['prob'] for p in test])
        )
        test = [{**p, 'prob': float(q)} for p, q in zip(test, probs)]
      rows += test
    per_repeat.append(sorted(rows, key=lambda p: p['patient_id']))
  first = per_repeat[0]
  ids = np.array([p['patient_id'] for p in first])
  for rows in per_repeat[1:]:
    if [p['patient_id'] for p in rows] != ids.tolist():
      raise ValueError(
          f'{run_dir}: the repeats of {model_name} did not predict the same patients.'
      )
  return tables.Predictions(
      patient_id=ids,
      label=np.array([p['label'] for p in first]),
      subtype=np.array([p['subtype'] for p in first]),
      arm=np.array([p['arm'] for p in first]),
      prob=np.array([[p['prob'] for p in rows] for rows in per_repeat]),
      fold=np.array([[p['fold'] for p in rows] for rows in per_repeat]),
  )


def load_run(run_dir: str) -> dict[str, tables.Predictions]:
  """Every finished model of a protocol run, in table order, as its run config asks."""
  config = runs.read_config(run_dir)
  protocol, num_folds = config.protocol, config.data.num_folds
  return {
      m.name: load_predictions(
          run_dir,
          m.name,
          num_repeats=protocol.num_repeats,
          num_folds=num_folds,
          calibrate=protocol.calibration,
      )
      for m in runs.finished_models(
          run_dir, num_repeats=protocol.num_repeats, num_folds=num_folds
      )
  }
