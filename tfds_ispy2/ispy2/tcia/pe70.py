"""The tumour of a visit without a usable Analysis Mask: the largest region of PE >= 70 %.

The same thresholds as the FTV (pcrjax.ftv), without the SER and neighbour filters: enough to find
and centre the tumour, inside the VOI carried over from an earlier visit where there is one.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _largest_component(mask: np.ndarray) -> np.ndarray:
  labels, count = ndimage.label(
      mask, structure=np.ones((3, 3, 3), bool)
  )  # 26-connected
  if count == 0:
    return mask
  return labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))


def pe70_mask(
    pre: np.ndarray,
    early: np.ndarray,
    background: float,
    region: np.ndarray | None = None,
) -> np.ndarray:
  """Largest 26-connected component of PE >= 70 % among voxels with S_pre >= background (and in
  ``region`` when given)."""
  valid = (pre >= background) & (pre > 0)
  if region is not None:
    valid &= region
  pe = 100.0 * (early - pre) / np.where(valid, pre, 1.0)
  return _largest_component(valid & (pe >= 70.0))
