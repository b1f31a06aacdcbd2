"""The protocol's reference rows: logistic models fitted inside each training fold.

What a deep model has to beat to earn its cost: the HR/HER2 subtype every patient has before
treatment, the I-SPY imaging biomarker (FTV at T0 and its change at T1, pcrjax.ftv), and both (the
I-SPY clinical model). On a synthetic cohort also the oracle: the same kind of model on the
phantom's true tumour volume and Ktrans at T0 and T1 plus subtype, the ceiling of what the early
visits hold in that cohort; it is a reference point, never compared as a method, and nothing a
network sees comes from it.
"""

from __future__ import annotations

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
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


def phantom_truth(data: ml_collections.ConfigDict, patient_ids) -> np.ndarray | None:
  """[N, 4] true tumour volume (mm^3) and mean Ktrans (/min) at T0 and T1 of a synthetic cohort
  (NaN for a missing T1); None for a cohort that is not the phantom's."""
  spec = tfds.builder(data.dataset, data_dir=data.data_dir or None).builder_config.phantom
  if spec is None:
    return None
  index = {phantom.patient_id(i): i for i in range(spec.num_patients)}
  truth = np.full((len(patient_ids), 4), np.nan)
  for row, pid in enumerate(patient_ids):
    t = phantom.simulate_patient(spec, index[pid])
    for visit in (0, 1):
      if t.visit_mask[visit]:
        truth[row, [visit, 2 + visit]] = t.tumor_volume_mm3[visit], t.ktrans_per_min[visit]
  return truth


def features(cohort: input_pipeline.Cohort, ftv_mm3: np.ndarray,
             truth: np.ndarray | None) -> dict[str, np.ndarray]:
  """The inputs of every reference model that this cohort allows, by model name: [N, F] each."""
  subtype = np.eye(len(schema.SUBTYPES))[cohort.subtype]
  biomarker = ftv.ftv_features(ftv_mm3)
  out = {'subtype': subtype, 'ftv': biomarker, 'ftv_subtype': np.hstack([biomarker, subtype])}
  if truth is not None:
    volume = np.log(np.maximum(truth[:, :2], _VOLUME_FLOOR_MM3))
    ktrans = np.log(np.maximum(truth[:, 2:], _KTRANS_FLOOR_PER_MIN))
    out['oracle'] = np.hstack([volume[:, :1], volume[:, 1:] - volume[:, :1], ktrans[:, :1],
                               ktrans[:, 1:] - ktrans[:, :1], subtype])
  return out
