"""The slices of one DCE series: their headers, their phases and the volumes they stack into.

A slice's header (`read_slice_header`) gives its geometry, its timing and where its pixels lie, so
that the phases are told apart and checked from the headers alone (`split_phases`, `check_phases`),
and only the three phases used are read, straight into arrays (`load_volume`). Every slice's
length is checked against its PixelData, which finds a download cut short without reading the
phases that are not used. Stacks are sorted by geometry, never by file order or InstanceNumber.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pydicom
import pydicom.datadict
import pydicom.pixels
import SimpleITK as sitk

from tfds_ispy2.ispy2.tcia import dicom_scan, errors, headers


class PixelRef(NamedTuple):
  """Where a slice's stored pixels lie in its file (native little-endian data) and how to turn
  them into values, as pydicom's ``pixel_array`` and ``apply_rescale`` would."""

  offset: int
  dtype: str  # of the stored values: '<u2', '<i2', 'u1' or 'i1'
  bits_stored: int
  rescale: (
      tuple[float, float] | None
  )  # (RescaleSlope, RescaleIntercept) when both are present


class SliceHeader(NamedTuple):
  """Geometry and timing of one single-frame DCE slice (and, when read, where its pixels are)."""

  path: str
  position: tuple[float, float, float]  # ImagePositionPatient
  orientation: tuple[
      float, ...
  ]  # ImageOrientationPatient (row direction, column direction)
  pixel_spacing: tuple[float, float]  # (between rows, between columns)
  shape: tuple[int, int]  # (Rows, Columns)
  temporal_position: int | None = None
  trigger_time_ms: float | None = None
  acquisition_time_s: float | None = None
  pixels: PixelRef | None = (
      None  # None: pydicom decodes them (compressed, or not walked)
  )


def _float(text: str) -> float | None:
  try:
    return float(text)
  except ValueError:
    return None


def _seconds(tm) -> float | None:
  """DICOM TM (HHMMSS.ffffff, or HH:MM:SS) as seconds after midnight."""
  text = headers.text(tm).replace(':', '')
  if not re.fullmatch(r'\d{2,6}(\.\d*)?', text):
    return None
  whole, _, frac = text.partition('.')
  whole = whole.ljust(6, '0')
  return (
      int(whole[:2]) * 3600
      + int(whole[2:4]) * 60
      + float(f'{whole[4:6]}.{frac or 0}')
  )


_SLICE_FIELDS = {
    'ImagePositionPatient': 'numbers',
    'ImageOrientationPatient': 'numbers',
    'PixelSpacing': 'numbers',
    'Rows': 'us',
    'Columns': 'us',
    'TemporalPositionIdentifier': 'text',
    'TriggerTime': 'text',
    'AcquisitionTime': 'text',
    'SamplesPerPixel': 'us',
    'NumberOfFrames': 'text',
    'BitsAllocated': 'us',
    'BitsStored': 'us',
    'PixelRepresentation': 'us',
    'RescaleSlope': 'text',
    'RescaleIntercept': 'text',
    'ModalityLUTSequence': 'text',
}


def _pixel_ref(
    values: dict, header: dicom_scan.Header | None, path: str
) -> PixelRef | None:
  """Where the native pixels of a walked slice lie; None when pydicom must decode them (another
  transfer syntax, several frames or samples, a modality LUT). VisitError when the file ends before
  its pixel data does (a download cut short): checked for every slice, not only the phases used.
  """
  if (
      header is None
      or header.pixel_offset is None
      or header.pixel_length is None
  ):
    return None
  bits, stored, signed = (
      values[k] for k in ('BitsAllocated', 'BitsStored', 'PixelRepresentation')
  )
  if (
      values['SamplesPerPixel'] not in (None, 1)
      or values['NumberOfFrames'] not in ('', '1')
      or header.values.get(
          pydicom.datadict.tag_for_keyword('ModalityLUTSequence')
      )
      is not None
      or bits not in (8, 16)
      or signed not in (0, 1)
      or not 0 < (stored or bits) <= bits
  ):
    return None
  expected = values['Rows'] * values['Columns'] * bits // 8
  if header.pixel_length not in (
      expected,
      expected + 1,
  ):  # + 1: odd-length padding
    return None  # pydicom says what is wrong with it
  have = header.file_size - header.pixel_offset
  if have < expected:
    raise errors.VisitError(
        'corrupt_file',
        f'{headers.short_name(path)}: pixel data unreadable'
        f' (PixelData cut short: the file holds {max(have, 0)} of its'
        f' {expected} bytes)',
    )
  slope, intercept = values['RescaleSlope'], values['RescaleIntercept']
  return PixelRef(
      header.pixel_offset,
      ('<' if bits == 16 else '') + 'ui'[signed] + str(bits // 8),
      stored or bits,
      (float(slope), float(intercept)) if slope and intercept else None,
  )


def read_slice_header(path: str) -> SliceHeader:
  """Header of one DCE slice, with where its pixels lie (not the pixels); VisitError if it is
  unreadable, has no geometry or is cut short."""
  try:
    values, header = headers.header_values(
        path, _SLICE_FIELDS, dicom_scan.PIXEL_DATA
    )
    if values is None:
      raise ValueError('not a DICOM file')
    ipp, iop, spacing = (
        values[k]
        for k in (
            'ImagePositionPatient',
            'ImageOrientationPatient',
            'PixelSpacing',
        )
    )
    if (
        ipp is None
        or iop is None
        or spacing is None
        or len(ipp) != 3
        or len(iop) != 6
    ):
      raise errors.VisitError(
          'missing_geometry',
          f'{headers.short_name(path)}: no'
          ' ImagePositionPatient, ImageOrientationPatient or PixelSpacing',
      )
    tpi = _float(values['TemporalPositionIdentifier'])
    return SliceHeader(
        path=path,
        position=ipp,
        orientation=iop,
        pixel_spacing=(spacing[0], spacing[1]),
        shape=(int(values['Rows']), int(values['Columns'])),
        temporal_position=None if tpi is None else int(tpi),
        trigger_time_ms=_float(values['TriggerTime']),
        acquisition_time_s=_seconds(values['AcquisitionTime']),
        pixels=_pixel_ref(values, header, path),
    )
  except errors.VisitError:
    raise
  except Exception as e:  # noqa: BLE001 -- a broken header makes the visit unusable
    raise errors.VisitError(
        'corrupt_file',
        f'{headers.short_name(path)}: header unreadable'
        f' ({type(e).__name__})',
    ) from e


def split_phases(
    slices: Sequence[SliceHeader],
) -> tuple[list[list[SliceHeader]], str]:
  """Slices per temporal phase, in acquisition order, and the attribute that split them.

  The first of TemporalPositionIdentifier, TriggerTime and AcquisitionTime that every slice has
  and that takes more than one value (GE writes one AcquisitionTime for the whole series, Philips
  TriggerTime 0 on every slice); else one phase.
  """
  present = [
      (field, name)
      for field, name in (
          ('temporal_position', 'TemporalPositionIdentifier'),
          ('trigger_time_ms', 'TriggerTime'),
          ('acquisition_time_s', 'AcquisitionTime'),
      )
      if slices and all(getattr(s, field) is not None for s in slices)
  ]
  for field, name in present:
    groups = collections.defaultdict(list)
    for s in slices:
      groups[round(getattr(s, field), 3)].append(s)
    if len(groups) > 1:
      return [groups[k] for k in sorted(groups)], name
  return [list(slices)], present[0][1] if present else 'none'


def phase_times(phases: Sequence[Sequence[SliceHeader]]) -> np.ndarray:
  """Seconds after the first (pre-contrast) phase: from TriggerTime, else AcquisitionTime, the first
  that every slice has and that differs between the phases (see `split_phases`).
  """
  for field, scale in (('trigger_time_ms', 1e-3), ('acquisition_time_s', 1.0)):
    if all(getattr(s, field) is not None for p in phases for s in p):
      starts = (
          np.array(
              [min(getattr(s, field) for s in p) for p in phases], np.float64
          )
          * scale
      )
      if len(phases) > 1 and np.all(starts == starts[0]):
        continue
      times = starts - starts[0]
      if field == 'acquisition_time_s':
        times[times < 0] += 86400.0  # acquisition across midnight
      return times
  raise errors.VisitError(
      'no_phase_times',
      'DCE slices have no TriggerTime or AcquisitionTime that'
      ' differs between phases',
  )


def choose_phases(
    times: Sequence[float], early_s: float = 150.0, late_s: float = 450.0
) -> tuple[int, int, int]:
  """(pre, early, late): the first phase, and the post-contrast phases closest to early_s and
  late_s (ties: the earlier). Early and late may coincide when one phase is closest to both.
  """
  post = range(1, len(times))

  def closest(target):
    return min(post, key=lambda i: (abs(times[i] - target), times[i]))

  return 0, closest(early_s), closest(late_s)


def _axes(
    orientation: Sequence[float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Orthonormal row direction, column direction and slice normal from an IOP."""
  row = np.asarray(orientation[:3], np.float64)
  row /= np.linalg.norm(row)
  col = np.asarray(orientation[3:], np.float64)
  col -= row * (row @ col)
  col /= np.linalg.norm(col)
  return row, col, np.cross(row, col)


def sort_slices(
    slices: Sequence[SliceHeader],
) -> tuple[list[SliceHeader], float]:
  """One stack's slices (a phase, or a mask's frames) sorted along the normal (never by file order
  or InstanceNumber), and the slice spacing (median step); a step > 1.5 x the median is a missing
  slice."""
  first = slices[0]
  if any(
      s.shape != first.shape
      or not np.allclose(s.orientation, first.orientation, atol=1e-3)
      or not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=1e-3)
      for s in slices
  ):
    raise errors.VisitError(
        'inconsistent_geometry',
        'slices of a stack differ in orientation, pixel spacing or matrix size',
    )
  if len(slices) < 2:
    raise errors.VisitError('missing_slices', 'a stack of a single slice')
  normal = _axes(first.orientation)[2]
  depth = np.array([np.dot(s.position, normal) for s in slices])
  order = np.argsort(depth, kind='stable')
  steps = np.diff(depth[order])
  if steps.min() < 1e-3:
    raise errors.VisitError(
        'duplicate_slices',
        f'{int(np.sum(steps < 1e-3))} slice positions'
        ' occur twice within a stack',
    )
  spacing = float(np.median(steps))
  if steps.max() > 1.5 * spacing:
    raise errors.VisitError(
        'missing_slices',
        f'gap of {steps.max():.2f} mm between slices spaced'
        f' {spacing:.2f} mm',
    )
  return [slices[i] for i in order], spacing


def check_phases(
    phases: Sequence[Sequence[SliceHeader]],
) -> tuple[list[list[SliceHeader]], float]:
  """Sorted slices per phase; every phase must hold the same slice positions, >= 3 phases."""
  if len(phases) < 3:
    raise errors.VisitError(
        'missing_phases', f'{len(phases)} temporal phase(s); at least 3 needed'
    )
  counts = [len(p) for p in phases]
  if min(counts) != max(counts):
    short = counts.index(min(counts))
    raise errors.VisitError(
        'missing_slices',
        f'phase {short} has {min(counts)} slices, others up'
        f' to {max(counts)}',
    )
  stacks = [sort_slices(p) for p in phases]
  reference = np.array([s.position for s in stacks[0][0]])
  for i, (stack, _) in enumerate(stacks[1:], start=1):
    if not np.allclose(
        np.array([s.position for s in stack]), reference, atol=0.01
    ):
      raise errors.VisitError(
          'missing_slices', f'phase {i} slice positions differ from phase 0'
      )
  return [stack for stack, _ in stacks], stacks[0][1]


def read_pixels(header: SliceHeader) -> np.ndarray:
  """Rescaled pixels of one slice (float32); VisitError when truncated or unreadable.

  Native pixels are read at their offset (no second parse of the header), masked to BitsStored
  and rescaled in float64 as pydicom does; anything else is pydicom's to decode.
  """
  ref = header.pixels
  try:
    if ref is not None:
      stored = np.empty(header.shape, ref.dtype)
      dicom_scan.read_pixels(header.path, ref.offset, stored)
      bits = 8 * stored.itemsize
      if (
          ref.bits_stored < bits
      ):  # the unused high bits: cleared, or the sign extended
        shift = bits - ref.bits_stored
        stored = (
            (stored << shift) >> shift
            if stored.dtype.kind == 'i'
            else (stored & ((1 << ref.bits_stored) - 1))
        )
      if ref.rescale is None:
        return stored.astype(np.float32)
      return (stored * ref.rescale[0] + ref.rescale[1]).astype(np.float32)
    with headers.quiet():
      ds = pydicom.dcmread(header.path)
      pixels = pydicom.pixels.apply_rescale(ds.pixel_array, ds)
  except Exception as e:  # noqa: BLE001 -- truncated or damaged pixel data
    raise errors.VisitError(
        'corrupt_file',
        f'{headers.short_name(header.path)}: pixel data'
        f' unreadable ({type(e).__name__})',
    ) from e
  if pixels.shape != header.shape:
    raise errors.VisitError(
        'corrupt_file',
        f'{headers.short_name(header.path)}: pixel matrix'
        f' {pixels.shape} != Rows x Columns {header.shape}',
    )
  return pixels.astype(np.float32)


def load_volume(
    stack: Sequence[SliceHeader], slice_spacing: float
) -> sitk.Image:
  """One phase as a SimpleITK image in LPS (see `stack_image`), filled slice by slice."""
  array = np.empty((len(stack),) + stack[0].shape, np.float32)
  for k, s in enumerate(stack):
    array[k] = read_pixels(s)
  return stack_image(array, stack, slice_spacing)


def stack_image(
    array: np.ndarray | None, stack: Sequence[SliceHeader], slice_spacing: float
) -> sitk.Image:
  """[slice, row, column] pixels of a sorted stack as an LPS image: origin = first IPP,
  direction (row, column, normal); without ``array``, an image of bytes with that geometry.
  """
  row, col, normal = _axes(stack[0].orientation)
  image = (
      sitk.GetImageFromArray(array)
      if array is not None
      else sitk.Image(
          [stack[0].shape[1], stack[0].shape[0], len(stack)], sitk.sitkUInt8
      )
  )
  image.SetOrigin(stack[0].position)
  image.SetSpacing(
      (stack[0].pixel_spacing[1], stack[0].pixel_spacing[0], slice_spacing)
  )
  image.SetDirection(np.column_stack([row, col, normal]).ravel().tolist())
  return image
