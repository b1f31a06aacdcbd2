"""The contract of the `ispy2` dataset: visits, phases, labels and the feature spec, spelled once.

The builder, the phantom, the TCIA reader and the training code must agree on these; they live
here so that none of them imports another for them. Imports no JAX (nor TensorFlow): the evidence
of a run, which names visits through it, can be rebuilt without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
  import tensorflow_datasets as tfds

VISITS = ('T0', 'T1', 'T2', 'T3')
PHASES = ('pre', 'early', 'late')
SUBTYPES = (
    'HR+/HER2-',
    'HR+/HER2+',
    'HR-/HER2+',
    'HR-/HER2-',
)  # index = ClassLabel id
# (HR, HER2) status of each subtype, 1 = positive: the clinical inputs every patient has at T0.
RECEPTORS = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], np.float32)
PCR_NAMES = ('non_pcr', 'pcr')  # index = ClassLabel id
# Codes of `tumor_mask`: a tumour (FTV) voxel, and a voxel of the radiologist's VOI outside the FTV
# (only at visits whose own Analysis Mask gave a VOI); 0 elsewhere.
TUMOUR, VOI = 1, 2
NUM_VISITS = len(VISITS)
NUM_PHASES = len(PHASES)

# The `tcia` config's output grid (D, H, W): the crop around the tumour and its voxel size.
DEFAULT_CROP_SHAPE = (32, 96, 96)
DEFAULT_SPACING_MM = (2.0, 1.0, 1.0)


def features(shape: tuple[int, int, int]) -> tfds.features.FeaturesDict:
  """The `tfds.features.FeaturesDict` of one patient on a D x H x W grid."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top,redefined-outer-name

  d, h, w = shape
  return tfds.features.FeaturesDict(
      {
          'patient_id': tfds.features.Text(doc='De-identified patient id.'),
          'images': tfds.features.Tensor(
              shape=(NUM_VISITS, NUM_PHASES, d, h, w),
              dtype=np.float16,
              encoding='zlib',
              doc='DCE-MRI [visit T0..T3, phase pre/early/late, D, H, W]; zeros for a missing visit.',
          ),
          'visit_mask': tfds.features.Tensor(
              shape=(NUM_VISITS,), dtype=np.bool_, doc='Visit acquired.'
          ),
          'tumor_mask': tfds.features.Tensor(
              shape=(NUM_VISITS, d, h, w),
              dtype=np.uint8,
              encoding='zlib',
              doc="Tumour per visit: 1 tumour (FTV); 2 the radiologist's VOI outside it, only where"
              " the visit's own Analysis Mask gave one (tcia); 0 elsewhere.",
          ),
          'pcr': tfds.features.ClassLabel(names=PCR_NAMES),
          'subtype': tfds.features.ClassLabel(names=SUBTYPES),
          'arm': tfds.features.Text(doc='Treatment arm.'),
          'spacing_mm': tfds.features.Tensor(
              shape=(3,), dtype=np.float32, doc='Voxel size D, H, W.'
          ),
          'phase_times_s': tfds.features.Tensor(
              shape=(NUM_VISITS, NUM_PHASES),
              dtype=np.float32,
              doc='Phase times after injection.',
          ),
      }
  )
