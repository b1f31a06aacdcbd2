"""The Analysis Mask of a visit: the radiologist's VOI and I-SPY's FTV, in either of its forms.

The collection's own form is 8-bit frames of exclusion bit flags with a private Mask Legend (SEG
SOP class, but not a valid SEG, so read with pydicom); the standard form is a BINARY SEG whose
segments are the exclusion reasons (read with highdicom). Either decodes to voxel codes on the
mask's own geometry (`AnalysisMask`), which `mask_codes` resamples onto a visit's grid. A mask that
cannot be used raises `MaskError`, and the visit falls back to PE >= 70 % (`pe70`).
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Sequence
from typing import NamedTuple

import highdicom
import numpy as np
import pydicom
import SimpleITK as sitk

from tfds_ispy2.ispy2 import geometry, schema
from tfds_ispy2.ispy2.tcia import errors, grids, headers, slices


class MaskError(errors.CodedError):
  """An Analysis Mask that cannot be used: the visit falls back to PE >= 70 %."""


class AnalysisMask(NamedTuple):
  """A decoded Analysis Mask on its own geometry (its slab may be wider than the DCE series)."""

  form: str  # 'bitflags' (the collection's own form) or 'seg' (a standard BINARY SEG)
  codes: (
      sitk.Image
  )  # uint8: 0 outside the slab, then FTV, IN_VOI or OUTSIDE_VOI
  ftv_mm3: (
      float  # the FTV at the mask's own resolution: the volume I-SPY reports
  )


# Voxel codes of a decoded mask. The record's `tumor_mask` (schema.features) keeps the first two
# (schema.TUMOUR = FTV, schema.VOI = IN_VOI) and writes the rest as 0.
FTV, IN_VOI, OUTSIDE_VOI = schema.TUMOUR, schema.VOI, 3
# The bit-flag form: each voxel is an OR of exclusion bits, 0 = in the FTV; a mask's private Mask
# Legend names them, else these documented meanings hold.
MASK_LEGEND_TAG = (0x0117, 0x10D3)
DOCUMENTED_BITS = {
    1: 'PE threshold',
    2: 'SER / minimum-neighbour filter',
    16: 'background threshold',
    32: 'manual VOI',
}
_VOI_BIT = 32
_LEGEND_RE = re.compile(r'\s*([01]{8})\s*\(\s*(\d+)\s*\)\s*:\s*(.*?)\s*')
_SEGMENTATION_TYPES = ('BINARY', 'FRACTIONAL', 'LABELMAP')


def _legend(ds: pydicom.Dataset, name: str) -> dict[int, str]:
  """{bit value: meaning} of the Mask Legend (0117,10D3); {} without one."""
  element = ds.get(MASK_LEGEND_TAG)
  if element is None:
    return {}
  value = element.value
  if isinstance(
      value, bytes
  ):  # VR UN: an implicit-VR file, or a dictionary without the tag
    value = value.decode('latin-1').rstrip('\0 ').split('\\')
  legend = {}
  for n, entry in enumerate(
      [value] if isinstance(value, str) else list(value), start=1
  ):
    m = _LEGEND_RE.fullmatch(str(entry))
    if not m or int(m.group(1), 2) != int(m.group(2)):
      raise MaskError(
          'mask_unrecognised',
          f'{name}: Mask Legend entry {n} is not "<8 binary'
          ' digits> (<value>) : <meaning>"',
      )
    legend[int(m.group(2))] = m.group(3)
  return legend


def _frame_stack(ds: pydicom.Dataset, name: str) -> list[slices.SliceHeader]:
  """One header per frame (``path`` = frame index) from the functional groups: per-frame
  ImagePositionPatient; orientation and pixel spacing per frame or shared."""
  frames = ds.get('PerFrameFunctionalGroupsSequence') or []
  shared = (ds.get('SharedFunctionalGroupsSequence') or [pydicom.Dataset()])[0]

  def attribute(group, sequence, keyword):
    for source in (group, shared):
      if source.get(sequence) and keyword in source.get(sequence)[0]:
        return source.get(sequence)[0].get(keyword)
    return None

  if len(frames) != int(ds.get('NumberOfFrames') or 1):
    raise MaskError(
        'mask_unrecognised',
        f'{name}: {len(frames)} per-frame functional groups for'
        f' {int(ds.get("NumberOfFrames") or 1)} frames',
    )
  stack = []
  for n, group in enumerate(frames):
    ipp, iop, spacing = (
        attribute(group, *where)
        for where in (
            ('PlanePositionSequence', 'ImagePositionPatient'),
            ('PlaneOrientationSequence', 'ImageOrientationPatient'),
            ('PixelMeasuresSequence', 'PixelSpacing'),
        )
    )
    if (
        ipp is None
        or iop is None
        or spacing is None
        or len(ipp) != 3
        or len(iop) != 6
    ):
      raise MaskError(
          'mask_unrecognised',
          f'{name}: frame {n + 1} has no ImagePositionPatient,'
          ' ImageOrientationPatient or PixelSpacing',
      )
    stack.append(
        slices.SliceHeader(
            path=str(n),
            position=tuple(map(float, ipp)),
            orientation=tuple(map(float, iop)),
            pixel_spacing=(float(spacing[0]), float(spacing[1])),
            shape=(int(ds.Rows), int(ds.Columns)),
        )
    )
  return stack


def _bitflag_mask(ds: pydicom.Dataset, name: str) -> AnalysisMask:
  """The collection's form, from pydicom: 8-bit frames of exclusion bits placed by their
  functional groups (any order); meanings from the Mask Legend where present."""
  legend = _legend(ds, name)
  known = functools.reduce(operator.or_, {**DOCUMENTED_BITS, **legend})
  # The VOI bit is the one the legend names so; without such an entry, the documented bit 32.
  voi_bit = (
      functools.reduce(
          operator.or_, [b for b, m in legend.items() if 'voi' in m.lower()], 0
      )
      or _VOI_BIT
  )
  stack = _frame_stack(ds, name)
  values = ds.pixel_array.reshape((len(stack),) + stack[0].shape)
  found = np.flatnonzero(np.bincount(values.ravel(), minlength=256))
  unexplained = [f'0x{v:02x}' for v in found.tolist() if v & ~known]
  if unexplained:
    raise MaskError(
        'mask_unrecognised',
        f'{name}: 8-bit values {", ".join(unexplained[:8])}'
        f' are not made of the bits of its Mask Legend or the documented ones'
        f' ({", ".join(map(str, sorted({**DOCUMENTED_BITS, **legend})))})',
    )
  codes = np.full(
      values.shape, IN_VOI, np.uint8
  )  # uint8 throughout: 50 M voxels bi-laterally
  codes[(values & voi_bit) != 0] = OUTSIDE_VOI
  codes[values == 0] = FTV
  return _mask_from_frames('bitflags', codes, stack, name)


def _mask_from_frames(
    form: str,
    codes: np.ndarray,
    frames: Sequence[slices.SliceHeader],
    name: str,
) -> AnalysisMask:
  """Decoded codes [frame, row, column] placed by their frames' headers, as the DCE slices are."""
  try:
    stack, spacing = slices.sort_slices(frames)
  except errors.VisitError as e:
    raise MaskError(
        'mask_geometry', f'{name}: its frames: {e.detail}'
    ) from None
  image = slices.stack_image(
      codes[[int(s.path) for s in stack]], stack, spacing
  )
  voxel_mm3 = float(np.prod(image.GetSpacing()))
  return AnalysisMask(form, image, float((codes == FTV).sum()) * voxel_mm3)


def _binary_seg_mask(ds: pydicom.Dataset, name: str) -> AnalysisMask:
  """The standard form, from highdicom: segments are exclusion reasons, the one whose label names
  the VOI marks voxels outside it; a voxel of the slab in no segment is in the FTV.
  """
  seg = highdicom.seg.Segmentation.from_dataset(ds, copy=False)
  volume = seg.get_volume(combine_segments=False)
  excluded = (
      np.asarray(volume.array).reshape(volume.array.shape[:3] + (-1,)) >= 0.5
  )
  labels = [
      seg.get_segment_description(n).segment_label for n in seg.segment_numbers
  ]
  outside_voi = excluded[..., ['voi' in label.lower() for label in labels]].any(
      -1
  )
  codes = np.where(
      ~excluded.any(-1), FTV, np.where(outside_voi, OUTSIDE_VOI, IN_VOI)
  )
  image = sitk.GetImageFromArray(codes.astype(np.uint8))  # [slice, row, column]
  steps = volume.affine[:3, :3][
      :, ::-1
  ]  # columns: steps along column, row, slice
  spacing = np.linalg.norm(steps, axis=0)
  image.SetSpacing(spacing.tolist())
  image.SetDirection((steps / spacing).ravel().tolist())
  image.SetOrigin(volume.affine[:3, 3].tolist())
  return AnalysisMask(
      'seg', image, float((codes == FTV).sum() * np.prod(spacing))
  )


def read_analysis_mask(path: str) -> AnalysisMask:
  """Either form of an Analysis Mask, on its own geometry; MaskError says why it cannot be used.

  8-bit frames are the collection's own form (SEG SOP class, invalid as a SEG): a voxel is in
  the FTV when its value is 0 and in the radiologist's VOI when the VOI bit is clear. 1-bit frames
  of a BINARY SEG are the standard form. A mask that flags no voxel as outside the VOI (a SEG
  without a VOI segment) has its whole slab as VOI.
  """
  name = headers.short_name(path)
  try:
    with headers.quiet():
      ds = pydicom.dcmread(path)
  except Exception as e:  # noqa: BLE001 -- not DICOM, or a damaged header
    raise MaskError('mask_unreadable', f'{name}: {type(e).__name__}') from None
  bits, kind = ds.get('BitsAllocated'), headers.text(ds.get('SegmentationType'))
  try:
    with headers.quiet():
      if bits == 8:
        return _bitflag_mask(ds, name)
      if bits == 1 and kind == 'BINARY':
        return _binary_seg_mask(ds, name)
  except MaskError:
    raise
  except Exception as e:  # noqa: BLE001 -- truncated pixel data, broken functional groups
    raise MaskError(
        'mask_unreadable', f'{name}: {type(e).__name__} while decoding'
    ) from None
  found = [
      f'BitsAllocated {bits}' if bits is not None else 'no BitsAllocated',
      kind
      if kind in _SEGMENTATION_TYPES
      else ('another SegmentationType' if kind else 'no SegmentationType'),
  ]
  raise MaskError(
      'mask_unrecognised',
      f'{name}: neither the I-SPY2 bit-flag form (8-bit frames)'
      f' nor a BINARY SEG (1-bit frames): {", ".join(found)}',
  )


def mask_codes(mask: AnalysisMask, grid: geometry.Grid) -> np.ndarray:
  """The decoded mask on ``grid`` by geometry (nearest neighbour; 0 outside its slab)."""
  return grids.resample(
      mask.codes, grid, sitk.sitkNearestNeighbor, sitk.sitkUInt8
  )
