"""Functional tumour volume (FTV), the clinical imaging biomarker of I-SPY, and its features.

FTV is the volume of voxels that enhance strongly early after contrast injection. It follows the
UCSF convention (``SlicerBreast_DCEMRI_FTV``, ``ftv_map_gen.makeFTVMaps``) that produced the I-SPY2
Analysis Masks: PE = 100 (S1 - S0) / S0, SER = (S1 - S0) / (S2 - S0); a voxel is tumour when it is
inside the radiologist's VOI, above the background threshold (S0 >= 0.6 x the 95th percentile of S0
in the VOI, which drops fat and air), has PE >= 70 % and SER >= 0, and at least 4 of its 26
neighbours pass the background and PE thresholds (which removes isolated noisy voxels).
Where a `tcia` record carries a visit's Analysis Mask (a VOI in its ``tumor_mask``), the FTV is
the mask's own: I-SPY computed it on the original images, before any resampling.

The FTV reference rows (pcrjax.references) are the comparator a clinician would ask for: a logistic
regression on the baseline FTV and its relative change at T1 (3 weeks), the early-change biomarker
of I-SPY (reported AUROC 0.63-0.74 for pCR on I-SPY2), alone and with the HR/HER2 subtype.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from tfds_ispy2.ispy2 import geometry, schema

# I-SPY2 enrols tumours >= 2.5 cm (~ 8 cm^3); a baseline FTV under 0.1 cm^3 is a failed segmentation,
# not a small tumour. Flooring FTV0 there keeps log FTV0 finite and the relative change bounded.
FTV0_FLOOR_MM3 = 100.0
# Without a radiologist's VOI, the T0 tumour's box grown by this stands in for it: it also holds a
# shrinking, slightly misregistered tumour at a later visit, as a radiologist's VOI would.
T0_BOX_MARGIN_MM = 10.0

_NEIGHBOURS = np.ones((3, 3, 3), np.uint8)
_NEIGHBOURS[1, 1, 1] = 0  # count the 26 neighbours, not the voxel itself


def ftv_mask(
    pre: np.ndarray,
    early: np.ndarray,
    late: np.ndarray,
    *,
    roi: np.ndarray | None = None,
    pe_threshold: float = 70.0,
    background_fraction: float = 0.6,
    min_neighbours: int = 4,
) -> np.ndarray:
  """Boolean [D, H, W] FTV mask from the pre-contrast, early and late phases (UCSF convention).

  ``roi``: boolean [D, H, W] VOI (None: the whole volume). As in the reference, neighbours are
  counted on the background-and-PE mask over the whole volume (before the SER filter and the VOI),
  so a voxel on the VOI border keeps its neighbours outside it. SER >= 0 is tested as
  (S1 - S0)(S2 - S0) >= 0: the same sign test without dividing, so a flat late phase (S2 = S0,
  infinite SER) counts as enhancing and no division by zero happens.
  """
  roi = np.ones(np.shape(pre), bool) if roi is None else np.asarray(roi, bool)
  out = np.zeros(roi.shape, bool)
  if not roi.any():
    return out
  # The VOI's box and the voxel around it (its voxels' neighbours) hold every voxel the mask
  # reads: the same mask from a tenth of a volume's work where the VOI is a tumour's box.
  (box,) = ndimage.find_objects(roi.astype(np.uint8))
  box = tuple(
      slice(max(s.start - 1, 0), min(s.stop + 1, size))
      for s, size in zip(box, roi.shape)
  )
  pre, early, late = (
      np.asarray(a)[box].astype(np.float64) for a in (pre, early, late)
  )
  roi = roi[box]
  background = pre >= background_fraction * np.percentile(pre[roi], 95)
  washin = early - pre
  # PE >= threshold, multiplied out (S0 > 0) so that zero or negative S0 never divides.
  enhancing = (pre > 0) & (100.0 * washin >= pe_threshold * pre)
  candidates = background & enhancing
  neighbours = ndimage.convolve(
      candidates.astype(np.uint8), _NEIGHBOURS, mode='constant', cval=0
  )
  ser_nonnegative = washin * (late - pre) >= 0
  out[box] = candidates & (neighbours >= min_neighbours) & ser_nonnegative & roi
  return out


def voi(mask: np.ndarray) -> np.ndarray | None:
  """The radiologist's VOI (bool [D, H, W]) in one visit's tumor_mask; None without one."""
  mask = np.asarray(mask)
  return mask > 0 if (mask == schema.VOI).any() else None


def ftv_masks(record: dict) -> np.ndarray:
  """The FTV voxels (bool [4, D, H, W]) of each visit of one dataset record; none at a missing visit.

  A visit with its own VOI (an Analysis Mask) has I-SPY's FTV: its tumour voxels, the mask's. Any
  other visit's FTV comes from its images, inside the VOI of the latest earlier visit that had
  one, else inside the T0 tumour's box grown by `T0_BOX_MARGIN_MM` (the whole volume without a T0
  tumour): a visit's own tumour mask would leak the response (it is empty after pCR).
  """
  images = np.asarray(record['images'])
  visit_mask = np.asarray(record['visit_mask'], bool)
  masks = np.asarray(record['tumor_mask'])
  roi = geometry.grown_box(
      masks[0] == schema.TUMOUR, record['spacing_mm'], T0_BOX_MARGIN_MM
  )
  roi = roi if roi.any() else None
  out = np.zeros(masks.shape, bool)
  for v in np.flatnonzero(visit_mask):
    own = voi(masks[v])
    if own is None:
      out[v] = ftv_mask(*images[v], roi=roi)
    else:
      roi = own
      out[v] = masks[v] == schema.TUMOUR
  return out


def ftv_per_visit(record: dict, masks: np.ndarray | None = None) -> np.ndarray:
  """FTV in mm^3 of each of the 4 visits of one dataset record (float [4], NaN for a missing visit);
  `masks`: its `ftv_masks`, where the caller has them already."""
  voxel_mm3 = float(np.prod(np.asarray(record['spacing_mm'], np.float64)))
  masks = ftv_masks(record) if masks is None else masks
  ftv = masks.sum(axis=(1, 2, 3)) * voxel_mm3
  return np.where(np.asarray(record['visit_mask'], bool), ftv, np.nan)


def ftv_features(ftv: np.ndarray) -> np.ndarray:
  """[N, 4] FTV (mm^3, NaN = missing) -> [N, 2]: log FTV0 and the relative change (FTV1 - FTV0) / FTV0.

  FTV0 is floored at ``FTV0_FLOOR_MM3``. A missing visit gives NaN (the change is NaN when T1 is
  missing); the reference model (pcrjax.references) imputes it with its training patients' median.
  """
  ftv = np.asarray(ftv, np.float64)
  ftv0 = np.maximum(ftv[:, 0], FTV0_FLOOR_MM3)  # NaN stays NaN
  return np.stack([np.log(ftv0), (ftv[:, 1] - ftv0) / ftv0], axis=1)
