"""Voxel geometry shared by the TCIA reader and pcrjax: an axis-aligned grid, and the box, the
centroid and the crop of a mask or a volume in voxel indices.

Spelled once so that the crop the reader writes and the crop a model reads (pcrjax.input_pipeline),
and the VOI the reader carries to a later visit and the one the FTV biomarker stands in for
(pcrjax.ftv), are made the same way. NumPy only: pcrjax imports it without the reader's DICOM
libraries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class Grid(NamedTuple):
  """An axis-aligned (identity direction) LPS grid, in SimpleITK's x, y, z order."""

  origin: tuple[float, float, float]
  spacing: tuple[float, float, float]
  size: tuple[int, int, int]

  def to_physical(self, index_zyx: np.ndarray) -> np.ndarray:
    """Physical x, y, z of a numpy [z, y, x] index (fractional allowed)."""
    return (
        np.asarray(self.origin)
        + np.asarray(index_zyx, np.float64)[::-1] * self.spacing
    )

  def to_index(self, point_xyz: np.ndarray) -> np.ndarray:
    """Fractional numpy [z, y, x] index of a physical point."""
    return ((np.asarray(point_xyz, np.float64) - self.origin) / self.spacing)[
        ::-1
    ]


def grown_box(
    mask: np.ndarray, spacing_mm: Sequence[float], margin_mm: float
) -> np.ndarray:
  """The bounding box of ``mask``'s voxels grown by ``margin_mm`` per side, clipped to the array;
  all False when ``mask`` has no voxel. ``spacing_mm``: the voxel size along ``mask``'s axes.
  """
  voxels = np.argwhere(mask)
  box = np.zeros(np.shape(mask), bool)
  if len(voxels):
    pad = np.ceil(margin_mm / np.asarray(spacing_mm, np.float64)).astype(int)
    lo = np.maximum(voxels.min(0) - pad, 0)
    hi = np.minimum(voxels.max(0) + pad + 1, box.shape)
    box[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
  return box


def centroid(mask: np.ndarray) -> np.ndarray | None:
  """The mean index of ``mask``'s voxels; None when it has none."""
  voxels = np.argwhere(mask)
  return voxels.mean(0) if len(voxels) else None


def window(
    size: Sequence[int], centre: np.ndarray, shape: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
  """Where a window of ``shape`` voxels, nearest to centred on the fractional index ``centre``
  (within half a voxel), meets an array of ``size``: (its slices of the array, its slices of the
  window); None when it misses the array."""
  start = np.round(
      np.asarray(centre, np.float64) - (np.asarray(shape) - 1) / 2.0
  ).astype(int)
  src, dst = [], []
  for s, n, extent in zip(start, shape, size):
    lo, hi = max(s, 0), min(s + n, extent)
    if hi <= lo:
      return None
    src.append(slice(lo, hi))
    dst.append(slice(lo - s, hi - s))
  return tuple(src), tuple(dst)


def crop(
    array: np.ndarray, centre: np.ndarray, shape: Sequence[int]
) -> np.ndarray:
  """The `window` of ``shape`` voxels around ``centre`` over ``array``'s leading axes, zero-padded
  outside it; trailing axes (channels) are kept whole."""
  shape = tuple(shape)
  out = np.zeros(shape + array.shape[len(shape) :], array.dtype)
  if found := window(array.shape[: len(shape)], centre, shape):
    src, dst = found
    out[dst] = array[src]
  return out
