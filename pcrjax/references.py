"""The protocol's reference rows: logistic models fitted inside each training fold.

What a deep model has to beat to earn its cost: the HR/HER2 subtype every patient has before
treatment, the I-SPY imaging biomarker (FTV at T0 and its change at T1, pcrjax.ftv), and both (the
I-SPY clinical model). On a synthetic cohort also the oracle: the same kind of model on the
phantom's true tumour volume and Ktrans at T0 and T1 plus subtype (plus, in a cohort with the
phantom's transfer knob on, the kinetic heterogeneity h that T0/T1 show as enhancement texture),
the ceiling of what the early visits hold in that cohort; it is a reference point, never compared
as a method, and nothing a network sees comes from it (the build writes the truth into the dataset's
metadata, never into a record: `phantom.oracle_truth`). Beside it, `t2_explained` says how much of
the T2 shrinkage those same truths predict: what a student regressing T2 features from T0/T1 could
at best learn.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import r2_score
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pcrjax import ftv, input_pipeline, runs
from tfds_ispy2.ispy2 import phantom, schema

# Floors that keep the oracle's logs finite for a tumour gone at T1 (pCR) or a missing value.
_VOLUME_FLOOR_MM3 = 1.0
_KTRANS_FLOOR_PER_MIN = 1e-3


def logistic_model():
  """Median imputation (a missing T1), standardisation, L2 logistic regression: deterministic."""
  return make_pipeline(
      SimpleImputer(strategy='median'), StandardScaler(), LogisticRegression()
  )


def _phantom_truths(data: ml_collections.ConfigDict, patient_ids):
  """(spec, [phantom.oracle_truth]) of a synthetic cohort's patients, as its build wrote them into
  the dataset's metadata; (None, None) for another cohort."""
  if not runs.is_synthetic(data.dataset):
    return None, None
  builder = tfds.builder(data.dataset, data_dir=data.data_dir or None)
  try:
    truths = builder.info.metadata[phantom.ORACLE_TRUTH]
  except KeyError:
    raise ValueError(
        f'{data.dataset} in {builder.data_dir} holds no phantom truth (no'
        f' {phantom.ORACLE_TRUTH!r} in its metadata.json): delete that folder, and'
        ' the next run builds it again with the truth.'
    ) from None
  return builder.builder_config.phantom, [truths[pid] for pid in patient_ids]


def truth_table(truths: Sequence[dict], transfer: bool) -> np.ndarray:
  """[N, 4] true tumour volume (mm^3) and mean Ktrans (/min) at T0 and T1 of `phantom.oracle_truth`s
  (NaN for a missing T1), [N, 5] with the knob on (below).

  A cohort with the phantom's transfer knob on has a 5th column, the heterogeneity h: T0/T1 show
  it (as enhancement texture), so the ceiling must see it. Other cohorts keep 4 columns rather
  than a column of zeros, a dead input of their oracle.
  """
  truth = np.full((len(truths), 5 if transfer else 4), np.nan)
  for row, t in enumerate(truths):
    for visit in (0, 1):
      if t['tumor_volume_mm3'][visit] is not None:
        truth[row, [visit, 2 + visit]] = (
            t['tumor_volume_mm3'][visit],
            t['ktrans_per_min'][visit],
        )
    if transfer:
      truth[row, 4] = t['heterogeneity']
  return truth


def phantom_truth(
    data: ml_collections.ConfigDict, patient_ids
) -> np.ndarray | None:
  """The `truth_table` of a synthetic cohort's patients; None for a cohort not the phantom's."""
  spec, truths = _phantom_truths(data, patient_ids)
  return None if spec is None else truth_table(truths, bool(spec.transfer))


def _oracle_inputs(truth: np.ndarray, subtype: np.ndarray) -> np.ndarray:
  """log volume and log Ktrans at T0, their changes at T1, subtype one-hot, then h if present."""
  volume = np.log(np.maximum(truth[:, :2], _VOLUME_FLOOR_MM3))
  ktrans = np.log(np.maximum(truth[:, 2:4], _KTRANS_FLOOR_PER_MIN))
  return np.hstack(
      [
          volume[:, :1],
          volume[:, 1:] - volume[:, :1],
          ktrans[:, :1],
          ktrans[:, 1:] - ktrans[:, :1],
          subtype,
          truth[:, 4:],
      ]
  )


def t2_r2(truths: Sequence[dict], transfer: bool) -> float:
  """Cross-validated R^2 of the true T2 log-volume change from the oracle's T0/T1 truths.

  Over the patients with T1 and T2: out-of-fold predictions of a linear model (5 shuffled folds,
  seed 0) of `phantom.log_volume_change` at T2. How much of the later shrinkage the early visits
  hold, which is what a student regressing T2 features could at best learn.
  """
  subtype = np.eye(len(schema.SUBTYPES))[[t['subtype'] for t in truths]]
  inputs = _oracle_inputs(truth_table(truths, transfer), subtype)
  rows = [
      i
      for i, t in enumerate(truths)
      if t['tumor_volume_mm3'][1] is not None
      and t['t2_log_volume_change'] is not None
  ]
  target = np.array([truths[i]['t2_log_volume_change'] for i in rows])
  predicted = cross_val_predict(
      make_pipeline(StandardScaler(), LinearRegression()),
      inputs[rows],
      target,
      cv=KFold(5, shuffle=True, random_state=0),
  )
  return float(r2_score(target, predicted))


def t2_explained(data: ml_collections.ConfigDict, patient_ids) -> float | None:
  """`t2_r2` of a synthetic cohort's patients; None for a cohort not the phantom's."""
  spec, truths = _phantom_truths(data, patient_ids)
  return None if spec is None else t2_r2(truths, bool(spec.transfer))


def features(
    cohort: input_pipeline.Cohort, ftv_mm3: np.ndarray, truth: np.ndarray | None
) -> dict[str, np.ndarray]:
  """The inputs of every reference model that this cohort allows, by model name: [N, F] each."""
  subtype = np.eye(len(schema.SUBTYPES))[cohort.subtype]
  biomarker = ftv.ftv_features(ftv_mm3)
  out = {
      'subtype': subtype,
      'ftv': biomarker,
      'ftv_subtype': np.hstack([biomarker, subtype]),
  }
  if truth is not None:
    out['oracle'] = _oracle_inputs(truth, subtype)
  return out
