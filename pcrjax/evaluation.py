"""Predictions files and the AUROC table built from them."""

from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np

from pcrjax import stats

PREDICTION_FIELDS = ('patient_id', 'label', 'prob', 'subtype', 'fold')


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
class Row:
  """One line of the comparison table."""

  name: str
  time_points: str
  num_patients: int
  num_pcr: int
  auroc: float
  ci_low: float
  ci_high: float
  p_vs_reference: float | None  # Paired DeLong p-value against the reference row, where computed.


def pooled(predictions: list[dict], patient_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """Labels and probabilities in the order of `patient_ids` (so rows can be paired)."""
  by_id = {p['patient_id']: p for p in predictions}
  missing = [pid for pid in patient_ids if pid not in by_id]
  if missing:
    raise ValueError(f'{len(missing)} patients have no prediction, e.g. {missing[:3]}: the runs did'
                     ' not predict the same patients.')
  labels = np.array([by_id[pid]['label'] for pid in patient_ids])
  probs = np.array([by_id[pid]['prob'] for pid in patient_ids])
  return labels, probs


def comparison_table(predictions: dict[str, list[dict]], time_points: dict[str, str], *,
                     reference: str, compared: tuple[str, ...], seed: int,
                     num_replicates: int = 2000) -> list[Row]:
  """AUROC with a 95 % stratified bootstrap CI per run; DeLong p of each `compared` run vs `reference`.

  All runs are paired on the patients of the reference run.
  """
  patient_ids = sorted(p['patient_id'] for p in predictions[reference])
  labels, reference_probs = pooled(predictions[reference], patient_ids)
  table = []
  for name, preds in predictions.items():
    run_labels, probs = pooled(preds, patient_ids)
    if not np.array_equal(run_labels, labels):
      raise ValueError(f'Run {name!r} disagrees with {reference!r} on the labels of the same patients.')
    low, high = stats.bootstrap_auroc_ci(labels, probs, num_replicates=num_replicates, seed=seed)
    p_value = (stats.delong_test(labels, probs, reference_probs).p_value if name in compared else None)
    table.append(Row(name=name, time_points=time_points[name], num_patients=len(labels),
                     num_pcr=int(labels.sum()), auroc=float(stats.auroc(labels, probs)),
                     ci_low=low, ci_high=high, p_vs_reference=p_value))
  return table
