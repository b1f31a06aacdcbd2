"""Resampling by geometry: a series (or a mask) onto the axis-aligned LPS grid of the record.

The grid is the series' own extent at the output spacing (`target_grid`); an image goes onto it,
or onto the crop of it around the tumour only (`resample_crop`), by physical position, whatever
the series' orientation. The grid itself and the crop in voxels are `tfds_ispy2.ispy2.geometry`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from tfds_ispy2.ispy2 import geometry


def target_grid(
    image: sitk.Image, spacing_dhw: Sequence[float]
) -> geometry.Grid:
  """The axis-aligned grid covering an image's voxel centres at spacing (D, H, W)."""
  size = np.array(image.GetSize())
  corners = np.array(
      [
          image.TransformContinuousIndexToPhysicalPoint(
              (size - 1) * np.array(c, np.float64)
          )
          for c in np.ndindex(2, 2, 2)
      ]
  )
  low, high = corners.min(0), corners.max(0)
  spacing = np.asarray(spacing_dhw, np.float64)[::-1]
  count = np.ceil((high - low) / spacing - 1e-6).astype(int) + 1
  return geometry.Grid(
      tuple(low.tolist()), tuple(spacing.tolist()), tuple(count.tolist())
  )


def resample(
    image: sitk.Image,
    grid: geometry.Grid,
    interpolator=sitk.sitkLinear,
    pixel_type=sitk.sitkFloat32,
) -> np.ndarray:
  """``image`` on ``grid`` as a numpy [z, y, x] array; zeros outside the image."""
  out = sitk.Resample(
      image,
      [int(n) for n in grid.size],
      sitk.Transform(),
      interpolator,
      grid.origin,
      grid.spacing,
      (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0),
      0,
      pixel_type,
  )
  return sitk.GetArrayFromImage(out)


def resample_crop(
    image: sitk.Image,
    grid: geometry.Grid,
    centre_xyz: np.ndarray,
    shape: Sequence[int],
) -> np.ndarray:
  """``geometry.crop(resample(image, grid), grid.to_index(centre_xyz), shape)``, resampling only
  the window's voxels: a real-size field of view has ten times as many."""
  out = np.zeros(tuple(shape), np.float32)
  if window := geometry.window(
      grid.size[::-1], grid.to_index(centre_xyz), shape
  ):
    src, dst = window
    origin = tuple(grid.to_physical([s.start for s in src]).tolist())
    out[dst] = resample(
        image,
        geometry.Grid(
            origin, grid.spacing, tuple(s.stop - s.start for s in src[::-1])
        ),
    )
  return out
