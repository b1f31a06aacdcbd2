"""The protocol's reference rows: logistic models fitted inside each training fold.

What a deep model has to beat to earn its cost: the HR/HER2 subtype every patient has before
treatment, the I-SPY imaging biomarker (FTV at T0 and its change at T1, pcrjax.ftv), and both (the
I-SPY clinical model). On a synthetic cohort also the oracle: the same kind of model on the
phantom's true tumour volume and Ktrans at T0 and T1 plus subtype (plus, in a cohort with the
phantom's transfer knob on, the kinetic heterogeneity h that T0/T1 show as enhancement texture),
the ceiling of what the early visits hold in that cohort; it is a reference point, never compared
as a method, and nothing a network sees comes from it. Beside it, `t2_explained` says how much of
the T2 shrinkage those same truths predict: what a student regressing T2 features from T0/T1 could
at best learn.
"""

from __future__ import annotations

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import r2_score
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pcrjax import ftv, input_pipeline
from tfds_ispy2.ispy2 import phantom, schema

# Floors that keep the oracle's logs finite for a tumour gone at T1 (pCR) or a missing value.
_VOLUME_FLOOR_MM3 = 1.0
_KTRANS_FLOOR_PER_MIN = 1e-3


def logistic_model():
  """Median imputation (a missing T1), standardisation, L2 logistic regression: deterministic."""
  return make_pipeline(SimpleImputer(strategy='median'), StandardScaler(), LogisticRegression())


def _phantom_truths(data: ml_collections.ConfigDict, patient_ids):
  """(spec, [PatientTruth]) of a synthetic cohort's patients; (None, None) for another cohort."""
  spec = tfds.builder(data.dataset, data_dir=data.data_dir or None).builder_config.phantom
  if spec is None:
    return None, None
  index = {phantom.patient_id(i): i for i in range(spec.num_patients)}
  return spec, [phantom.simulate_patient(spec, index[pid]) for pid in patient_ids]


def _truth_table(spec: phantom.PhantomSpec, truths) -> np.ndarray:
  truth = np.full((len(truths), 5 if spec.transfer else 4), np.nan)
  for row, t in enumerate(truths):
    for visit in (0, 1):
      if t.visit_mask[visit]:
        truth[row, [visit, 2 + visit]] = t.tumor_volume_mm3[visit], t.ktrans_per_min[visit]
    if spec.transfer:
      truth[row, 4] = t.heterogeneity
  return truth


def phantom_truth(data: ml_collections.ConfigDict, patient_ids) -> np.ndarray | None:
  """[N, 4] true tumour volume (mm^3) and mean Ktrans (/min) at T0 and T1 of a synthetic cohort
  (NaN for a missing T1), [N, 5] with the knob (below); None for a cohort not the phantom's.

  A cohort with the phantom's transfer knob on has a 5th column, the heterogeneity h: T0/T1 show
  it (as enhancement texture), so the ceiling must see it. Other cohorts keep 4 columns rather
  than a column of zeros, a dead input of their oracle.
  """
  spec, truths = _phantom_truths(data, patient_ids)
  return None if spec is None else _truth_table(spec, truths)


def _oracle_inputs(truth: np.ndarray, subtype: np.ndarray) -> np.ndarray:
  """log volume and log Ktrans at T0, their changes at T1, subtype one-hot, then h if present."""
  volume = np.log(np.maximum(truth[:, :2], _VOLUME_FLOOR_MM3))
  ktrans = np.log(np.maximum(truth[:, 2:4], _KTRANS_FLOOR_PER_MIN))
  return np.hstack([volume[:, :1], volume[:, 1:] - volume[:, :1], ktrans[:, :1],
                    ktrans[:, 1:] - ktrans[:, :1], subtype, truth[:, 4:]])


def t2_explained(data: ml_collections.ConfigDict, patient_ids) -> float | None:
  """Cross-validated R^2 of the true T2 log-volume change from the oracle's T0/T1 truths.

  Over the patients with T1 and T2: out-of-fold predictions of a linear model (5 shuffled folds,
  seed 0) of `phantom.log_volume_change` at T2. How much of the later shrinkage the early visits
  hold, which is what a student regressing T2 features could at best learn; None for a cohort
  that is not the phantom's.
  """
  spec, truths = _phantom_truths(data, patient_ids)
  if spec is None:
    return None
  subtype = np.eye(len(schema.SUBTYPES))[[t.subtype for t in truths]]
  inputs = _oracle_inputs(_truth_table(spec, truths), subtype)
  target = np.array([phantom.log_volume_change(t, 2) for t in truths])
  rows = np.array([bool(t.visit_mask[1] and t.visit_mask[2]) for t in truths])
  predicted = cross_val_predict(make_pipeline(StandardScaler(), LinearRegression()), inputs[rows],
                                target[rows], cv=KFold(5, shuffle=True, random_state=0))
  return float(r2_score(target[rows], predicted))


def features(cohort: input_pipeline.Cohort, ftv_mm3: np.ndarray,
             truth: np.ndarray | None) -> dict[str, np.ndarray]:
  """The inputs of every reference model that this cohort allows, by model name: [N, F] each."""
  subtype = np.eye(len(schema.SUBTYPES))[cohort.subtype]
  biomarker = ftv.ftv_features(ftv_mm3)
  out = {'subtype': subtype, 'ftv': biomarker, 'ftv_subtype': np.hstack([biomarker, subtype])}
  if truth is not None:
    out['oracle'] = _oracle_inputs(truth, subtype)
  return out
