"""The protocol's reference rows: features per reference, the phantom's truth for the oracle."""

import os
import shutil

import ml_collections
import numpy as np
import pytest

from experiments import baseline
from pcrjax import input_pipeline, references, runs
from tfds_ispy2.ispy2 import phantom, schema


def test_reference_features_cover_every_registered_reference(data_dir):
  config = baseline.get_config('smoke')
  config.data.data_dir = data_dir
  cohort = input_pipeline.read_cohort(
      input_pipeline.load_source(config.data, with_images=False)
  )
  truth = references.phantom_truth(config.data, cohort.patient_id)
  # The truth is the phantom's own, patient by patient (T1 NaN where it is missing).
  spec = phantom.PhantomSpec(
      num_patients=48, shape=(8, 32, 32), spacing_mm=(6.0, 4.0, 4.0)
  )
  first = phantom.simulate_patient(
      spec, int(cohort.patient_id[0].split('-')[1])
  )
  assert (
      truth[0, 0] == first.tumor_volume_mm3[0]
      and truth[0, 2] == first.ktrans_per_min[0]
  )
  np.testing.assert_array_equal(np.isnan(truth[:, 1]), ~cohort.visit_mask[:, 1])
  ftv_mm3 = np.full((len(cohort), 4), 5000.0)
  inputs = references.features(cohort, ftv_mm3, truth)
  assert set(inputs) == {
      m.name for m in runs.MODELS if m.kind == runs.REFERENCE
  }
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
  np.testing.assert_array_equal(
      p, references.logistic_model().fit(x, y).predict_proba(x)[:, 1]
  )
  assert ((p > 0.5) == y).mean() > 0.8


def _phantom_config(dataset, data_dir):
  """A data config naming a cohort, built or not."""
  return ml_collections.ConfigDict(
      {'dataset': dataset, 'data_dir': str(data_dir)}
  )


def _truths(transfer, num):
  """The `phantom.oracle_truth`s a build of the 512-patient cohort writes, of its first `num`."""
  spec = phantom.PhantomSpec(
      num_patients=512,
      shape=(16, 64, 64),
      spacing_mm=(3.0, 2.0, 2.0),
      transfer=transfer,
  )
  return [
      phantom.oracle_truth(phantom.simulate_patient(spec, i))
      for i in range(num)
  ]


def test_oracle_sees_the_heterogeneity_only_when_the_knob_is_on():
  knob_truths = _truths(1.0, 40)
  knob = references.truth_table(knob_truths, transfer=True)
  plain = references.truth_table(_truths(0.0, 40), transfer=False)
  assert knob.shape == (40, 5) and plain.shape == (40, 4)
  np.testing.assert_array_equal(
      knob[:, 4], [t['heterogeneity'] for t in knob_truths]
  )
  np.testing.assert_array_equal(
      knob[:, 0], [t['tumor_volume_mm3'][0] for t in knob_truths]
  )
  assert np.all(knob[:, 4] != 0)


def test_oracle_inputs_end_with_the_heterogeneity(data_dir):
  config = baseline.get_config('smoke')
  config.data.data_dir = data_dir
  cohort = input_pipeline.read_cohort(
      input_pipeline.load_source(config.data, with_images=False)
  )
  truth = references.phantom_truth(config.data, cohort.patient_id)
  h = np.linspace(-2.0, 2.0, len(cohort))
  ftv_mm3 = np.full((len(cohort), 4), 5000.0)
  plain = references.features(cohort, ftv_mm3, truth)['oracle']
  knob = references.features(cohort, ftv_mm3, np.hstack([truth, h[:, None]]))[
      'oracle'
  ]
  assert knob.shape == (len(cohort), plain.shape[1] + 1)
  np.testing.assert_array_equal(knob[:, :-1], plain)
  np.testing.assert_array_equal(knob[:, -1], h)


def test_t2_explained_rises_with_the_knob_and_needs_the_phantom(tmp_path):
  plain = references.t2_r2(_truths(0.0, 400), transfer=False)
  knob = references.t2_r2(_truths(1.0, 400), transfer=True)
  assert 0.1 < plain < 0.4 and knob > 0.45 and knob > plain + 0.15, (
      plain,
      knob,
  )
  assert references.t2_r2(_truths(0.0, 400), transfer=False) == plain
  ids = [phantom.patient_id(i) for i in range(400)]
  assert (
      references.t2_explained(_phantom_config('ispy2/tcia', tmp_path), ids)
      is None
  )


def test_a_synthetic_build_without_the_truth_says_so_in_one_line(
    data_dir, tmp_path
):
  """A dataset folder whose metadata lacks the truth (not one this builder wrote): one line that
  says how to mend it, not a traceback from deep in the fit."""
  shutil.copytree(os.path.join(data_dir, 'ispy2'), tmp_path / 'ispy2')
  (metadata,) = (tmp_path / 'ispy2').glob('synthetic_smoke/*/metadata.json')
  metadata.unlink()
  ids = [phantom.patient_id(i) for i in range(3)]
  with pytest.raises(ValueError, match='holds no phantom truth') as error:
    references.phantom_truth(
        _phantom_config('ispy2/synthetic_smoke', tmp_path), ids
    )
  assert '\n' not in str(error.value)
