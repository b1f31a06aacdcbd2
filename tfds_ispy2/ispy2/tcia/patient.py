"""One patient: its visits read into the arrays of a record, and its example with the labels.

Per visit (`_load_visit`): headers, phases, the target grid, the tumour (the Analysis Mask's FTV in
its VOI, else PE >= 70 %), then the pre, early and late phases resampled in the crop around it.
A visit that fails is missing; a failing T0 skips the patient. The metadata of each patient says
per visit which mask was used and, per stage, where the CPU time went (`StageTimer`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from tfds_ispy2.ispy2 import geometry, schema
from tfds_ispy2.ispy2.tcia import (
    analysis_mask,
    clinical_sheet,
    discovery,
    errors,
    grids,
    headers,
    pe70,
    slices,
)

# The values of a visit's `mask_source`: its Analysis Mask in either form, else PE >= 70 % inside a
# VOI carried over from an earlier visit, else over the whole field of view.
MASK_SOURCES = (
    'analysis_mask_bitflags',
    'analysis_mask_seg',
    'pe70_in_voi',
    'pe70',
)
_FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclasses.dataclass(frozen=True)
class TciaSpec:
  """Output grid and phase choice of the `tcia` config."""

  target_spacing_mm: tuple[float, float, float] = (
      schema.DEFAULT_SPACING_MM
  )  # D, H, W
  crop_shape: tuple[int, int, int] = schema.DEFAULT_CROP_SHAPE  # D, H, W voxels
  early_s: float = 150.0
  late_s: float = 450.0
  voi_margin_mm: float = (
      10.0  # a VOI carried over to a later visit: its box grown by this
  )


class StageTimer:
  """CPU seconds spent per stage of reading one patient (this process's, all its threads: what a
  core pays, whatever else shares the machine): returned in its metadata, so that a build report
  (and `python -m benchmarks.build`) says where the time goes."""

  STAGES = ('headers', 'pixels', 'resample', 'mask', 'crop')

  def __init__(self):
    self.seconds = dict.fromkeys(self.STAGES, 0.0)

  @contextlib.contextmanager
  def __call__(self, stage: str):
    start = time.process_time()
    try:
      yield
    finally:
      self.seconds[stage] += time.process_time() - start


@dataclasses.dataclass
class _Visit:
  """One visit: its tumour on its own full target grid, its images in the crop around it."""

  grid: geometry.Grid
  centre: np.ndarray  # the crop's centre, LPS mm
  empty_t0: (
      str | None
  )  # at T0 without a tumour voxel: what the crop was centred on
  images: np.ndarray  # float32 [3, *crop_shape]
  codes: (
      np.ndarray
  )  # uint8 [z, y, x]: the record's tumor_mask codes (schema.TUMOUR, schema.VOI, 0)
  voi: (
      np.ndarray | None
  )  # bool [z, y, x]: the VOI used (the visit's mask's, or carried over)
  voi_image: (
      sitk.Image | None
  )  # the VOI of the visit's own mask, to carry to later visits
  mask_source: str  # one of MASK_SOURCES
  mask_ftv_mm3: float | None  # the mask's own FTV (None without a mask)
  phases: tuple[int, int, int]
  times: np.ndarray  # [3]
  num_phases: int
  phase_source: str
  issues: list[tuple[str, str]]


def _analysis_mask_tumour(
    seg: str | None, grid: geometry.Grid, timer: StageTimer
) -> tuple[dict | None, list[tuple[str, str]]]:
  """The visit's tumour from its Analysis Mask (the fields of `_Visit` after ``codes``): the FTV
  inside the mask's VOI; None when there is no usable mask (the issues say why).
  """
  if seg is None:
    return None, []
  try:
    with timer('mask'):
      mask = analysis_mask.read_analysis_mask(seg)
  except (
      analysis_mask.MaskError
  ) as e:  # an unusable mask falls back to PE >= 70 %
    return None, [(e.reason, f'{e.detail}; using PE >= 70 %')]
  with timer('resample'):
    codes = analysis_mask.mask_codes(mask, grid)
  voi = (codes == analysis_mask.FTV) | (codes == analysis_mask.IN_VOI)
  if not voi.any():
    return None, [
        (
            'mask_outside_image',
            f'{headers.short_name(seg)}: its VOI does not overlap the'
            ' DCE series; using PE >= 70 %',
        )
    ]
  return (
      dict(
          codes=np.where(voi, codes, 0).astype(np.uint8),
          voi=voi,
          voi_image=sitk.BinaryThreshold(
              mask.codes, analysis_mask.FTV, analysis_mask.IN_VOI, 1, 0
          ),
          mask_source=f'analysis_mask_{mask.form}',
          mask_ftv_mm3=mask.ftv_mm3,
      ),
      [],
  )


def _pe70_tumour(
    grid: geometry.Grid,
    images: np.ndarray,
    background: float,
    carried: sitk.Image | None,
    spec: TciaSpec,
    timer: StageTimer,
) -> dict:
  """Without a usable Analysis Mask: PE >= 70 % inside the VOI carried over from an earlier
  visit (its box grown by ``spec.voi_margin_mm``: the patient is repositioned between visits),
  else over the field of view (``images``: pre and early on the full grid)."""
  voi = None
  with timer('mask'):
    if carried is not None:
      voi = geometry.grown_box(
          grids.resample(
              carried, grid, sitk.sitkNearestNeighbor, sitk.sitkUInt8
          )
          > 0,
          grid.spacing[::-1],
          spec.voi_margin_mm,
      )
      voi = (
          voi if voi.any() else None
      )  # the carried VOI misses this visit's field of view
    codes = pe70.pe70_mask(images[0], images[1], background, voi).astype(
        np.uint8
    )
  return dict(
      codes=codes,
      voi=voi,
      voi_image=None,
      mask_source='pe70' if voi is None else 'pe70_in_voi',
      mask_ftv_mm3=None,
  )


def _load_visit(
    files: discovery.VisitFiles,
    spec: TciaSpec,
    carried: sitk.Image | None,
    timer: StageTimer,
    centre_of: Callable[
        [np.ndarray, np.ndarray | None, geometry.Grid],
        tuple[np.ndarray, str | None],
    ],
) -> _Visit:
  """Headers -> phases -> target grid -> tumour -> crop of pre/early/late (VisitError if bad).

  Every file's header is read once (with where its pixels lie); only the three phases used are
  read, one at a time. The target grid is the series' geometry's, and the Analysis Mask is read
  before any phase (a bi-lateral mask and phase are 50 M voxels each). With a usable mask the
  tumour, and so the crop, is known from the grid alone, and each phase is resampled in the crop
  only; without one, PE >= 70 % needs the pre and early phases over the whole field of view.
  ``centre_of(codes, voi, grid)`` gives the crop's centre (`_crop_centre`).
  """
  with timer('headers'):
    phases, phase_source = slices.split_phases(
        [slices.read_slice_header(p) for p in files.dce]
    )
    stacks, slice_spacing = slices.check_phases(phases)
    times = slices.phase_times(stacks)
    chosen = slices.choose_phases(times, spec.early_s, spec.late_s)
  with timer('resample'):
    grid = grids.target_grid(
        slices.stack_image(None, stacks[0], slice_spacing),
        spec.target_spacing_mm,
    )
  tumour, issues = _analysis_mask_tumour(files.seg, grid, timer)
  shape = tuple(spec.crop_shape)
  centre = empty_t0 = background = None
  if tumour is not None:
    with timer('crop'):
      centre, empty_t0 = centre_of(tumour['codes'], tumour['voi'], grid)
  cropped = {}
  for i in sorted(
      set(chosen)
  ):  # the pre phase first: it sets the background threshold
    with timer('pixels'):
      volume = slices.load_volume(stacks[i], slice_spacing)
    with timer('resample'):
      if background is None:
        background = 0.6 * float(
            np.percentile(sitk.GetArrayViewFromImage(volume), 95)
        )
      cropped[i] = (
          grids.resample_crop(volume, grid, centre, shape)
          if centre is not None
          else grids.resample(volume, grid)
      )
    del volume
  if tumour is None:
    tumour = _pe70_tumour(
        grid, [cropped[i] for i in chosen[:2]], background, carried, spec, timer
    )
    with timer('crop'):
      centre, empty_t0 = centre_of(tumour['codes'], tumour['voi'], grid)
      at = grid.to_index(centre)
      cropped = {
          i: geometry.crop(full, at, shape) for i, full in cropped.items()
      }
  return _Visit(
      grid=grid,
      centre=centre,
      empty_t0=empty_t0,
      images=np.stack([cropped[i] for i in chosen]),
      phases=chosen,
      times=times[list(chosen)],
      num_phases=len(stacks),
      phase_source=phase_source,
      issues=issues,
      **tumour,
  )


def _check_labels(
    pid: str, clinical: clinical_sheet.ClinicalRecord | None
) -> clinical_sheet.ClinicalRecord:
  rows = '' if clinical is None else ', '.join(map(str, clinical.rows))
  if clinical is None:
    raise errors.Skip(
        'not_in_clinical_sheet', f'{pid} has no row in the clinical sheet'
    )
  if clinical.duplicate:
    raise errors.Skip(
        'duplicate_clinical_id', f'{pid}: conflicting clinical rows {rows}'
    )
  if clinical.pcr is None:
    raise errors.Skip(
        'no_pcr_label', f'{pid}: empty or unreadable pCR (row {rows})'
    )
  if clinical.subtype is None:
    raise errors.Skip(
        'no_subtype', f'{pid}: empty or unreadable HR or HER2 (row {rows})'
    )
  return clinical


def _visit_or_issue(
    pid: str,
    v: int,
    files: discovery.VisitFiles | None,
    spec: TciaSpec,
    carried: sitk.Image | None,
    issues: list[errors.Issue],
    timer: StageTimer,
    t0_centre: np.ndarray | None,
) -> _Visit | None:
  """The visit, or None with an issue recorded; at T0 a failure skips the patient instead."""
  if files is None:
    if v == 0:
      raise errors.Skip('no_t0', f'{pid}: no T0 study with a DCE series')
    return (
        None  # discover reported why (no study, unknown visit, no DCE series)
    )
  try:
    visit = _load_visit(
        files,
        spec,
        carried,
        timer,
        functools.partial(_crop_centre, v, t0_centre=t0_centre),
    )
  except Exception as e:  # noqa: BLE001 -- a failing visit is missing, not a failed build
    if not isinstance(e, errors.VisitError):
      e = errors.VisitError(
          'visit_error', f'{type(e).__name__}: {headers.masked(str(e))[:160]}'
      )
    if v == 0:
      raise errors.Skip('no_t0', f'{pid}: T0 {e.reason}: {e.detail}') from None
    issues.append(errors.Issue(pid, v, e.reason, e.detail))
    return None
  issues.extend(
      errors.Issue(pid, v, reason, detail) for reason, detail in visit.issues
  )
  if visit.empty_t0:
    issues.append(
        errors.Issue(
            pid,
            0,
            'empty_t0_mask',
            f'no tumour voxel at T0; crop centred on {visit.empty_t0}',
        )
    )
  return visit


def _crop_centre(
    v: int,
    codes: np.ndarray,
    voi: np.ndarray | None,
    grid: geometry.Grid,
    *,
    t0_centre: np.ndarray | None,
) -> tuple[np.ndarray, str | None]:
  """The tumour's centroid; if empty (a complete response), the VOI's; without a VOI the T0
  crop centre (T0 itself: the image centre). And, at T0 without a tumour voxel, what it is.
  """
  tumour = geometry.centroid(codes == schema.TUMOUR)
  if tumour is not None:
    return grid.to_physical(tumour), None
  voi = None if voi is None else geometry.centroid(voi)
  empty_t0 = ('its VOI' if voi is not None else 'the image') if v == 0 else None
  if voi is not None:
    return grid.to_physical(voi), empty_t0
  if v > 0:
    return t0_centre, None
  return grid.to_physical((np.asarray(grid.size[::-1]) - 1) / 2.0), empty_t0


_META_KEYS = (
    'mask_source',
    'phase_indices',
    'phase_times_s',
    'num_phases',
    'phase_source',
    'laterality',
    'ftv_mm3',
    'mask_ftv_mm3',
    'crop_centre_mm',
    'notes',
)


def _visit_meta(
    visit: _Visit, files: discovery.VisitFiles, centre: np.ndarray
) -> dict:
  """Build-report facts of one visit (JSON-ready; codes and numbers only, no header text)."""
  voxel_mm3 = float(np.prod(visit.grid.spacing))
  return {
      'mask_source': visit.mask_source,
      'phase_indices': [int(i) for i in visit.phases],
      'phase_times_s': [round(float(t), 3) for t in visit.times],
      'num_phases': visit.num_phases,
      'phase_source': visit.phase_source,
      'laterality': files.laterality,
      'ftv_mm3': round(
          float((visit.codes == schema.TUMOUR).sum() * voxel_mm3), 1
      ),
      'mask_ftv_mm3': (
          None if visit.mask_ftv_mm3 is None else round(visit.mask_ftv_mm3, 1)
      ),
      'crop_centre_mm': [round(float(c), 2) for c in centre],
      'notes': list(files.notes),
  }


def read_images(
    patient: discovery.PatientFiles,
    spec: TciaSpec = TciaSpec(),
    visits: Sequence[int] = tuple(range(schema.NUM_VISITS)),
) -> tuple[dict, list[errors.Issue], dict]:
  """(images, issues, metadata) of one patient's `visits`, no label needed; raises Skip when T0
  cannot be used.

  The reading half of `process_patient`, also what `pcrjax.predict` reads a new patient with. One
  visit at a time (bounded memory). A visit that fails becomes a missing visit (issue); a failing
  T0 skips the patient (`no_t0`). Each visit is cropped around its own tumour, and the VOI of the
  latest Analysis Mask is carried over to later visits that have none. Visits not in `visits` are
  left missing. ``images`` holds the record's image fields (images, visit_mask, tumor_mask,
  spacing_mm, phase_times_s); ``metadata`` maps each key of `_visit_meta` to a list over T0..T3
  (None: visit missing), and ``stage_cpu_s`` to the CPU seconds per `StageTimer` stage.
  """
  pid = patient.patient_id
  shape = tuple(spec.crop_shape)
  images = np.zeros((schema.NUM_VISITS, schema.NUM_PHASES) + shape, np.float16)
  masks = np.zeros((schema.NUM_VISITS,) + shape, np.uint8)
  visit_mask = np.zeros(schema.NUM_VISITS, bool)
  times = np.zeros((schema.NUM_VISITS, schema.NUM_PHASES), np.float32)
  metas: list[dict | None] = [None] * schema.NUM_VISITS
  issues: list[errors.Issue] = []
  t0_centre = carried = None
  timer = StageTimer()
  for v, files in enumerate(patient.visits):
    if v not in visits:
      continue
    visit = _visit_or_issue(
        pid, v, files, spec, carried, issues, timer, t0_centre
    )
    if visit is None:
      continue
    carried = visit.voi_image if visit.voi_image is not None else carried
    centre = visit.centre
    t0_centre = centre if v == 0 else t0_centre
    with timer('crop'):
      images[v] = np.clip(visit.images, -_FLOAT16_MAX, _FLOAT16_MAX).astype(
          np.float16
      )
      masks[v] = geometry.crop(visit.codes, visit.grid.to_index(centre), shape)
    visit_mask[v] = True
    times[v] = visit.times
    metas[v] = _visit_meta(visit, files, centre)
  arrays = {
      'images': images,
      'visit_mask': visit_mask,
      'tumor_mask': masks,
      'spacing_mm': np.asarray(spec.target_spacing_mm, np.float32),
      'phase_times_s': times,
  }
  meta = {k: [m[k] if m else None for m in metas] for k in _META_KEYS}
  meta['stage_cpu_s'] = {k: round(t, 4) for k, t in timer.seconds.items()}
  return arrays, issues, meta


def process_patient(
    patient: discovery.PatientFiles,
    clinical: clinical_sheet.ClinicalRecord | None,
    spec: TciaSpec = TciaSpec(),
) -> tuple[dict, list[errors.Issue], dict]:
  """(example, issues, metadata) of one patient; raises Skip when it cannot be written.

  `read_images` of every visit, with the clinical sheet's labels (required: a patient without a
  pCR label or a subtype is skipped).
  """
  record = _check_labels(patient.patient_id, clinical)
  arrays, issues, meta = read_images(patient, spec)
  example = {
      'patient_id': patient.patient_id,
      **arrays,
      'pcr': int(record.pcr),
      'subtype': int(record.subtype),
      'arm': record.arm,
  }
  return example, issues, meta
