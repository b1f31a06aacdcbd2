"""The protocol's reference rows: features per reference, the phantom's truth for the oracle."""

import ml_collections
import numpy as np

from experiments import baseline
from pcrjax import input_pipeline, references, runs
from tfds_ispy2.ispy2 import phantom, schema


def test_reference_features_cover_every_registered_reference(data_dir):
  config = baseline.get_config('smoke')
  config.data.data_dir = data_dir
  cohort = input_pipeline.read_cohort(input_pipeline.load_source(config.data, with_images=False))
  truth = references.phantom_truth(config.data, cohort.patient_id)
  # The truth is the phantom's own, patient by patient (T1 NaN where it is missing).
  spec = phantom.PhantomSpec(num_patients=48, shape=(8, 32, 32), spacing_mm=(6.0, 4.0, 4.0))
  first = phantom.simulate_patient(spec, int(cohort.patient_id[0].split('-')[1]))
  assert truth[0, 0] == first.tumor_volume_mm3[0] and truth[0, 2] == first.ktrans_per_min[0]
  np.testing.assert_array_equal(np.isnan(truth[:, 1]), ~cohort.visit_mask[:, 1])
  ftv_mm3 = np.full((len(cohort), 4), 5000.0)
  inputs = references.features(cohort, ftv_mm3, truth)
  assert set(inputs) == {m.name for m in runs.MODELS if m.kind == runs.REFERENCE}
  np.testing.assert_array_equal(inputs['subtype'].argmax(1), cohort.subtype)
  assert inputs['subtype'].shape[1] == len(schema.SUBTYPES)
  assert inputs['oracle'].shape == (len(cohort), 4 + len(schema.SUBTYPES))
  # Without the phantom's truth (real data) there is no oracle.
  assert 'oracle' not in references.features(cohort, ftv_mm3, None)


def test_reference_model_learns_and_is_deterministic():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 3))
  y = (x[:, 0] + 0.5 * rng.normal(size=200) > 0).astype(int)
  x[::7, 1] = np.nan  # A missing value is imputed, not fatal.
  p = references.logistic_model().fit(x, y).predict_proba(x)[:, 1]
  np.testing.assert_array_equal(p, references.logistic_model().fit(x, y).predict_proba(x)[:, 1])
  assert ((p > 0.5) == y).mean() > 0.8


def _phantom_config(dataset, data_dir):
  """A data config naming a phantom cohort: its truths need the builder's spec, not a build."""
  return ml_collections.ConfigDict({'dataset': dataset, 'data_dir': str(data_dir)})


def test_oracle_sees_the_heterogeneity_only_when_the_knob_is_on(tmp_path):
  ids = [phantom.patient_id(i) for i in range(40)]
  knob = references.phantom_truth(_phantom_config('ispy2/synthetic_transfer', tmp_path), ids)
  plain = references.phantom_truth(_phantom_config('ispy2/synthetic', tmp_path), ids)
  assert knob.shape == (40, 5) and plain.shape == (40, 4)
  spec = phantom.PhantomSpec(num_patients=512, shape=(16, 64, 64), spacing_mm=(3.0, 2.0, 2.0),
                             transfer=1.0)
  truths = [phantom.simulate_patient(spec, i) for i in range(40)]
  np.testing.assert_array_equal(knob[:, 4], [t.heterogeneity for t in truths])
  np.testing.assert_array_equal(knob[:, 0], [t.tumor_volume_mm3[0] for t in truths])
  assert np.all(knob[:, 4] != 0)


def test_oracle_inputs_end_with_the_heterogeneity(data_dir):
  config = baseline.get_config('smoke')
  config.data.data_dir = data_dir
  cohort = input_pipeline.read_cohort(input_pipeline.load_source(config.data, with_images=False))
  truth = references.phantom_truth(config.data, cohort.patient_id)
  h = np.linspace(-2.0, 2.0, len(cohort))
  ftv_mm3 = np.full((len(cohort), 4), 5000.0)
  plain = references.features(cohort, ftv_mm3, truth)['oracle']
  knob = references.features(cohort, ftv_mm3, np.hstack([truth, h[:, None]]))['oracle']
  assert knob.shape == (len(cohort), plain.shape[1] + 1)
  np.testing.assert_array_equal(knob[:, :-1], plain)
  np.testing.assert_array_equal(knob[:, -1], h)


def test_t2_explained_rises_with_the_knob_and_needs_the_phantom(tmp_path):
  ids = [phantom.patient_id(i) for i in range(400)]
  plain = references.t2_explained(_phantom_config('ispy2/synthetic', tmp_path), ids)
  knob = references.t2_explained(_phantom_config('ispy2/synthetic_transfer', tmp_path), ids)
  assert 0.1 < plain < 0.4 and knob > 0.45 and knob > plain + 0.15, (plain, knob)
  assert references.t2_explained(_phantom_config('ispy2/synthetic', tmp_path), ids) == plain
  assert references.t2_explained(_phantom_config('ispy2/tcia', tmp_path), ids) is None
