"""I-SPY2 longitudinal breast DCE-MRI for early pCR prediction, one example per patient.

Configs change the bytes on disk only: `synthetic` (the default) renders the embedded phantom of
`phantom.py`; `synthetic_smoke` is the same phantom on a coarse grid and a small cohort, for smoke runs
and tests. Everything a training run may choose at read time (folds, 2D MIP or 3D crop, normalisation,
augmentation) belongs to the input pipeline, not here.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os

import numpy as np
import tensorflow_datasets as tfds

from tfds_ispy2.ispy2 import phantom

NUM_VISITS = len(phantom.VISITS)
NUM_PHASES = len(phantom.PHASES)
PCR_NAMES = ('non_pcr', 'pcr')


@dataclasses.dataclass(kw_only=True)
class Ispy2Config(tfds.core.BuilderConfig):
  """A builder config: the phantom's cohort and grid (synthetic)."""

  phantom: phantom.PhantomSpec = dataclasses.field(default_factory=phantom.PhantomSpec)

  @property
  def shape(self) -> tuple[int, int, int]:
    return tuple(self.phantom.shape)


class Builder(tfds.core.GeneratorBasedBuilder):
  """DatasetBuilder for the `ispy2` dataset."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Synthetic phantom configs.'}
  BUILDER_CONFIGS = [
      Ispy2Config(
          name='synthetic',
          description=(
              'Embedded phantom: 512 patients, 16x64x64 voxels of 3.0x2.0x2.0 mm (a 48x128x128 mm'
              ' unilateral field of view), four visits, three DCE phases.'
          ),
          phantom=phantom.PhantomSpec(num_patients=512, shape=(16, 64, 64), spacing_mm=(3.0, 2.0, 2.0)),
      ),
      Ispy2Config(
          name='synthetic_smoke',
          description='The phantom on a coarse 8x32x32 grid of 6x4x4 mm, 48 patients: smoke runs and tests.',
          phantom=phantom.PhantomSpec(num_patients=48, shape=(8, 32, 32), spacing_mm=(6.0, 4.0, 4.0)),
      ),
  ]
  DEFAULT_CONFIG_NAME = 'synthetic'

  def _info(self) -> tfds.core.DatasetInfo:
    d, h, w = self.builder_config.shape
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'patient_id': tfds.features.Text(doc='De-identified patient id.'),
            'images': tfds.features.Tensor(
                shape=(NUM_VISITS, NUM_PHASES, d, h, w), dtype=np.float16, encoding='zlib',
                doc='DCE-MRI [visit T0..T3, phase pre/early/late, D, H, W]; zeros for a missing visit.'),
            'visit_mask': tfds.features.Tensor(shape=(NUM_VISITS,), dtype=np.bool_, doc='Visit acquired.'),
            'tumor_mask': tfds.features.Tensor(
                shape=(NUM_VISITS, d, h, w), dtype=np.uint8, encoding='zlib', doc='Tumour per visit.'),
            'pcr': tfds.features.ClassLabel(names=PCR_NAMES),
            'subtype': tfds.features.ClassLabel(names=phantom.SUBTYPES),
            'arm': tfds.features.Text(doc='Treatment arm.'),
            'spacing_mm': tfds.features.Tensor(shape=(3,), dtype=np.float32, doc='Voxel size D, H, W.'),
            'phase_times_s': tfds.features.Tensor(
                shape=(NUM_VISITS, NUM_PHASES), dtype=np.float32, doc='Phase times after injection.'),
        }),
        homepage='https://doi.org/10.7937/TCIA.D8Z0-9T85',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The phantom needs no download.
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    spec = self.builder_config.phantom
    workers = max(1, min(os.cpu_count() or 1, 8))
    # Patients are pure functions of (seed, index): render them in parallel processes, in order.
    # 'spawn': the caller may already run JAX's threads, which a fork would copy half-way.
    context = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
      for example in pool.map(_render, [(spec, i) for i in range(spec.num_patients)], chunksize=4):
        yield example['patient_id'], example


def _render(spec_and_index: tuple[phantom.PhantomSpec, int]) -> dict:
  return phantom.render_patient(*spec_and_index)
