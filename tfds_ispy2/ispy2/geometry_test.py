"""Voxel geometry (geometry.py): the grown box, centroid and crop the reader and pcrjax share."""

import numpy as np

from tfds_ispy2.ispy2 import geometry


def test_grown_box_is_the_box_grown_by_the_margin_in_mm():
  mask = np.zeros((16, 64, 64), bool)
  mask[5, 10, 60] = True
  box = geometry.grown_box(
      mask, (3.0, 2.0, 2.0), 10.0
  )  # 4, 5, 5 voxels; clipped at 64
  expected = np.zeros_like(mask)
  expected[1:10, 5:16, 55:64] = True
  np.testing.assert_array_equal(box, expected)
  assert not geometry.grown_box(
      np.zeros_like(mask), (3.0, 2.0, 2.0), 10.0
  ).any()


def test_centroid_is_the_mean_index_or_none():
  mask = np.zeros((4, 10, 10), np.uint8)
  mask[1:3, 2:4, 2:4] = 1
  np.testing.assert_allclose(geometry.centroid(mask), [1.5, 2.5, 2.5])
  assert geometry.centroid(np.zeros_like(mask)) is None


def test_crop_pads_at_the_border_and_keeps_trailing_axes():
  volume = np.arange(4 * 6 * 6, dtype=np.float32).reshape(4, 6, 6, 1)
  crop = geometry.crop(volume, np.array([0.0, 0.0, 0.0]), (3, 5, 5))
  assert crop.shape == (3, 5, 5, 1) and crop.dtype == volume.dtype
  np.testing.assert_array_equal(crop[1:, 2:, 2:, 0], volume[:2, :3, :3, 0])
  assert (
      crop[0].sum() == 0
      and crop[:, :2].sum() == 0
      and crop[:, :, :2].sum() == 0
  )
  assert not geometry.crop(
      volume, np.array([20.0, 3.0, 3.0]), (3, 5, 5)
  ).any()  # misses it
  assert (
      geometry.window(volume.shape[:3], np.array([20.0, 3.0, 3.0]), (3, 5, 5))
      is None
  )


def test_crop_centres_within_half_a_voxel_of_a_physical_point():
  grid = geometry.Grid(
      origin=(-10.0, 5.0, 2.0), spacing=(1.0, 2.0, 3.0), size=(20, 10, 6)
  )
  point = grid.to_physical([2.0, 4.0, 7.0])
  np.testing.assert_allclose(grid.to_index(point), [2.0, 4.0, 7.0])
  volume = np.zeros(grid.size[::-1])
  volume[2, 4, 7] = 1.0
  crop = geometry.crop(volume, grid.to_index(point), (3, 5, 5))
  assert crop[1, 2, 2] == 1.0 and crop.sum() == 1.0
