"""Tests of the TCIA I-SPY2 DICOM reader (tfds_ispy2/ispy2/tcia/) on small synthetic DICOM trees.

The trees are written here with pydicom (MR slices), the fixture writer's bit-flag Analysis Mask
(the collection's own form) and highdicom (the standard BINARY SEG form), with known cubes at
known physical positions, so that geometry errors show up as misplaced or resized cubes.
"""

import json
import logging
import os
import pickle
import random
import shutil
from typing import NamedTuple

import highdicom as hd
import numpy as np
import openpyxl
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from fake_data import tcia_fixtures
from tfds_ispy2.ispy2 import geometry, schema, tcia, tcia_build
from tfds_ispy2.ispy2.tcia import dicom_scan, slices

PHI = {
    'PatientName': 'Doe^Jane',
    'PatientBirthDate': '19610203',
    'StudyDate': '19990517',
    'SeriesDate': '19990517',
    'InstitutionName': 'Sunnybrook Secret Hospital',
    'AccessionNumber': 'ACC98765',
    'ReferringPhysicianName': 'House^Gregory',
    'PatientAge': '038Y',
    'PatientSex': 'F',
}
PHI_STRINGS = (
    'Doe',
    'Jane',
    '19610203',
    '19990517',
    '05-17-1999',
    'Sunnybrook',
    'ACC98765',
    'House',
    '038Y',
)
UNI_DCE = 'ISPY2: VOLSER: uni-lateral cropped: original DCE'
BI_DCE = 'ISPY2: VOLSER: bi-lateral: original DCE'
UNI_MASK = 'ISPY2: VOLSER: uni-lateral cropped: Analysis Mask'
BI_MASK = 'ISPY2: VOLSER: bi-lateral: Analysis Mask'
SPEC = tcia.TciaSpec(crop_shape=(16, 40, 40))
CUBE_MM = 20.0


# ----------------------------------------------------------------------------- DICOM writers
def _dataset(
    pid,
    study,
    series,
    *,
    modality='MR',
    sop=MRImageStorage,
    study_desc='',
    series_desc='',
    timepoint=None,
):
  ds = Dataset()
  ds.file_meta = FileMetaDataset()
  ds.file_meta.MediaStorageSOPClassUID = sop
  ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
  ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds.SOPClassUID, ds.SOPInstanceUID = (
      sop,
      ds.file_meta.MediaStorageSOPInstanceUID,
  )
  ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = pid, study, series
  ds.FrameOfReferenceUID = '1.2.3.4'
  ds.Modality, ds.StudyDescription, ds.SeriesDescription = (
      modality,
      study_desc,
      series_desc,
  )
  ds.StudyTime, ds.StudyID, ds.SeriesNumber, ds.Manufacturer = (
      '100000',
      '1',
      3,
      'x',
  )
  if timepoint is not None:
    ds.ClinicalTrialTimePointID = timepoint
  for keyword, value in PHI.items():
    setattr(ds, keyword, value)
  return ds


def _save(ds, path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  ds.save_as(path, enforce_file_format=True)


def _rotation(axis, degrees):
  axis = np.asarray(axis, float) / np.linalg.norm(axis)
  a = np.radians(degrees)
  k = np.array(
      [[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]]
  )
  return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


# (row direction, column direction) of slice stacks other than axial.
OBLIQUE = tuple(
    tuple(_rotation((1, 1, 0.3), 20) @ axis) for axis in ((1, 0, 0), (0, 1, 0))
)
SAGITTAL = ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0))


class Geometry(NamedTuple):
  """A slice stack centred on ``centre``: rows x cols pixels, n slices; spacing (row, col, slice)
  in mm."""

  centre: tuple = (10.0, -20.0, 30.0)
  row_dir: tuple = (1.0, 0.0, 0.0)
  col_dir: tuple = (0.0, 1.0, 0.0)
  spacing: tuple = (1.0, 1.0, 2.5)
  shape: tuple = (48, 48, 20)

  @property
  def normal(self):
    return np.cross(self.row_dir, self.col_dir)

  def position(self, k):
    rows, cols, n = self.shape
    rs, cs, ss = self.spacing
    return (
        np.asarray(self.centre)
        + (k - (n - 1) / 2) * ss * self.normal
        - (cols - 1) / 2 * cs * np.asarray(self.row_dir)
        - (rows - 1) / 2 * rs * np.asarray(self.col_dir)
    )

  def points(self, k):
    """Physical (x, y, z) of every pixel of slice k: [rows, cols, 3]."""
    rows, cols, _ = self.shape
    r = (
        np.arange(rows)[:, None, None]
        * self.spacing[0]
        * np.asarray(self.col_dir)
    )
    c = (
        np.arange(cols)[None, :, None]
        * self.spacing[1]
        * np.asarray(self.row_dir)
    )
    return self.position(k) + r + c


def _cube(points, centre, size=CUBE_MM):
  """Points of a box of edge(s) ``size`` mm around ``centre``."""
  return np.all(
      np.abs(points - np.asarray(centre)) <= np.asarray(size) / 2, axis=-1
  )


def _tm(seconds):
  h, rest = divmod(36000.0 + seconds, 3600)
  m, s = divmod(rest, 60)
  return f'{int(h):02d}{int(m):02d}{s:09.6f}'


def write_dce(
    folder,
    geom,
    values,
    times_s,
    *,
    pid='ISPY2-100001',
    study=None,
    series=None,
    study_desc='ISPY2MRIT0',
    series_desc=UNI_DCE,
    tpi=True,
    trigger=True,
    acq=True,
    drop=(),
    slope=1.0,
    intercept=0.0,
    seed=0,
    timepoint=None,
):
  """One DCE series (all phases) in shuffled files; values(phase, points) -> physical values."""
  study, series = study or generate_uid(), series or generate_uid()
  rng = random.Random(seed)
  jobs = [
      (p, k)
      for p in range(len(times_s))
      for k in range(geom.shape[2])
      if (p, k) not in drop
  ]
  rng.shuffle(jobs)  # file order and InstanceNumber say nothing about geometry
  sources = []
  for number, (p, k) in enumerate(jobs):
    ds = _dataset(
        pid,
        study,
        series,
        study_desc=study_desc,
        series_desc=series_desc,
        timepoint=timepoint,
    )
    ds.InstanceNumber = len(jobs) - number
    ds.ImagePositionPatient = [round(float(x), 4) for x in geom.position(k)]
    ds.ImageOrientationPatient = [
        round(float(x), 6) for x in geom.row_dir + geom.col_dir
    ]
    ds.PixelSpacing = list(geom.spacing[:2])
    ds.SliceThickness = geom.spacing[2]
    ds.Rows, ds.Columns = geom.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, 'MONOCHROME2'
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (
        16,
        16,
        15,
        0,
    )
    if slope != 1.0 or intercept != 0.0:
      ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    stored = np.round((values(p, geom.points(k)) - intercept) / slope)
    ds.PixelData = np.clip(stored, 0, 65535).astype(np.uint16).tobytes()
    if tpi:
      ds.TemporalPositionIdentifier = p + 1
    if trigger:
      ds.TriggerTime = times_s[p] * 1000.0
    if acq:
      ds.AcquisitionTime = _tm(times_s[p])
    path = os.path.join(folder, f'{rng.randrange(10**6):06d}-{number}.dcm')
    _save(ds, path)
    if p == 0:
      sources.append(ds)
  return sources


def write_seg(path, sources, geom, ftv, *, voi=None, series_desc=UNI_MASK):
  """The standard form of an Analysis Mask (a BINARY SEG) on its own slice stack: segments mark
  what is NOT tumour, 'PE threshold' inside the VOI and 'manual VOI' outside it (one segment
  'excluded' when ``voi`` is None)."""
  n = geom.shape[2]
  points = np.stack([geom.points(k) for k in range(n)])
  excluded = ~ftv(points)
  if voi is None:
    labels, segments = ('excluded',), excluded[..., None]
  else:
    inside = voi(points)
    labels, segments = ('PE threshold', 'manual VOI'), np.stack(
        [excluded & inside, ~inside], -1
    )
  descriptions = [
      hd.seg.SegmentDescription(
          segment_number=i + 1,
          segment_label=label,
          segmented_property_category=hd.sr.CodedConcept(
              '91723000', 'SCT', 'Anatomical Structure'
          ),
          segmented_property_type=hd.sr.CodedConcept(
              '85756007', 'SCT', 'Tissue'
          ),
          algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
      )
      for i, label in enumerate(labels)
  ]
  seg = hd.seg.Segmentation(
      source_images=sources,
      pixel_array=segments.astype(np.uint8),
      segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
      segment_descriptions=descriptions,
      series_instance_uid=generate_uid(),
      series_number=50,
      sop_instance_uid=generate_uid(),
      instance_number=1,
      manufacturer='x',
      manufacturer_model_name='y',
      software_versions='1',
      device_serial_number='1',
      omit_empty_frames=False,
      plane_positions=[
          hd.PlanePositionSequence(
              hd.CoordinateSystemNames.PATIENT,
              [float(x) for x in geom.position(k)],
          )
          for k in range(n)
      ],
      plane_orientation=hd.PlaneOrientationSequence(
          hd.CoordinateSystemNames.PATIENT, list(geom.row_dir + geom.col_dir)
      ),
      pixel_measures=hd.PixelMeasuresSequence(
          list(geom.spacing[:2]),
          geom.spacing[2],
          spacing_between_slices=geom.spacing[2],
      ),
  )
  seg.SeriesDescription = series_desc
  _save(seg, path)


def write_bitflag_mask(
    path,
    geom,
    values,
    *,
    pid='ISPY2-100001',
    study=None,
    legend=tcia_fixtures.MASK_LEGEND,
    orientation_per_frame=False,
    series_desc=UNI_MASK,
    seed=0,
):
  """The collection's form of an Analysis Mask (8-bit exclusion flags, tcia_fixtures' writer) on
  its own slice stack, frames in shuffled order; ``values(points)`` gives the flags.
  """
  order = list(range(geom.shape[2]))
  random.Random(seed).shuffle(order)
  ds = _dataset(
      pid,
      study or generate_uid(),
      generate_uid(),
      modality='SEG',
      sop=tcia.SEG_SOP_CLASS,
      series_desc=series_desc,
  )
  tcia_fixtures.set_bitflag_mask(
      ds,
      np.stack([values(geom.points(k)) for k in order]),
      np.stack([geom.position(k) for k in order]),
      geom.row_dir + geom.col_dir,
      geom.spacing[:2],
      legend=legend,
      orientation_per_frame=orientation_per_frame,
  )
  _save(ds, path)


def _flags(ftv, voi):
  """values(points) of a bit-flag mask: 0 in the FTV, PE (1) elsewhere in the VOI, manual VOI (32)
  outside it, and background (16) in the posterior 'air' (y > -5 mm), as VOLSER flags them.
  """

  def values(points):
    out = np.where(ftv(points), 0, tcia_fixtures.PE_BIT)
    out |= np.where(voi(points), 0, tcia_fixtures.VOI_BIT)
    out |= np.where(
        points[..., 1] > -5.0,
        tcia_fixtures.BACKGROUND_BIT | tcia_fixtures.PE_BIT,
        0,
    )
    return out.astype(np.uint8)

  return values


def _header_only(path, pid, study, series, **kwargs):
  _save(_dataset(pid, study, series, **kwargs), path)


def _write_xlsx(path, header, rows):
  wb = openpyxl.Workbook()
  wb.active.append(header)
  for row in rows:
    wb.active.append(row)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  wb.save(path)


def _strings(obj):
  """Every text that an object carries (for PHI searches)."""
  if isinstance(obj, np.ndarray):
    return [] if obj.dtype.kind != 'U' else [str(obj)]
  if isinstance(obj, dict):
    return [s for k, v in obj.items() for s in _strings(k) + _strings(v)]
  if isinstance(obj, (list, tuple)):
    return [s for v in obj for s in _strings(v)]
  return [repr(obj)]


# ----------------------------------------------------------------------------- phases
def _headers(tpis, triggers, acqs):
  return [
      tcia.SliceHeader(
          path=f's{i}',
          position=(0.0, 0.0, float(i % 3)),
          orientation=(1.0, 0, 0, 0, 1.0, 0),
          pixel_spacing=(1.0, 1.0),
          shape=(4, 4),
          temporal_position=p,
          trigger_time_ms=t,
          acquisition_time_s=a,
      )
      for i, (p, t, a) in enumerate(zip(tpis, triggers, acqs))
  ]


@pytest.mark.parametrize(
    'drop, source',
    [
        ((), 'TemporalPositionIdentifier'),
        (('tpi',), 'TriggerTime'),
        (('tpi', 'trigger'), 'AcquisitionTime'),
    ],
)
def test_split_phases_fallbacks(drop, source):
  phase = [2, 0, 1, 2, 1, 0, 0, 2, 1]  # shuffled, three slices per phase
  tpis = [
      None if ('tpi' in drop and i == 4) else p + 1 for i, p in enumerate(phase)
  ]  # one gap
  triggers = [None if 'trigger' in drop else p * 90000.0 for p in phase]
  acqs = [36000.0 + 90 * p for p in phase]
  phases, used = tcia.split_phases(_headers(tpis, triggers, acqs))
  assert used == source
  assert [sorted(int(s.path[1:]) for s in ph) for ph in phases] == [
      [i for i, p in enumerate(phase) if p == q] for q in range(3)
  ]
  np.testing.assert_allclose(tcia.phase_times(phases), [0.0, 90.0, 180.0])


def test_phase_times_relative_and_across_midnight():
  phases = [_headers([1], [None], [86390.0]), _headers([2], [None], [40.0])]
  np.testing.assert_allclose(tcia.phase_times(phases), [0.0, 50.0])
  phases = [_headers([1], [12000.0], [0.0]), _headers([2], [162000.0], [0.0])]
  np.testing.assert_allclose(
      tcia.phase_times(phases), [0.0, 150.0]
  )  # relative to the pre phase
  with pytest.raises(tcia.VisitError, match='no_phase_times'):
    tcia.phase_times([_headers([1], [None], [None])])


@pytest.mark.parametrize(
    'times, expected',
    [
        ([0, 90, 180, 270, 360], (0, 2, 4)),  # 5 phases
        (
            [0, 100, 200, 300, 400, 500],
            (0, 1, 4),
        ),  # 6 phases: ties 100/200 and 400/500 -> earlier
        ([0, 75, 150, 225, 300, 375, 450], (0, 2, 6)),  # 7 phases, exact hits
        ([0, 130, 260, 390, 520, 650, 780, 910], (0, 1, 3)),  # 8 phases
        (
            [0, 60, 120, 180, 240, 300, 360, 420, 480],
            (0, 2, 7),
        ),  # 9 phases: ties -> earlier
        ([0, 10, 20, 30, 40], (0, 4, 4)),  # one phase closest to both targets
        ([0, 300, 1000], (0, 1, 1)),
    ],
)
def test_choose_phases(times, expected):
  assert tcia.choose_phases(times) == expected


def test_choose_phases_never_picks_the_pre_phase():
  assert tcia.choose_phases([0.0, 600.0, 900.0], early_s=0.0) == (0, 1, 1)


# ----------------------------------------------------------------------------- visits and series
@pytest.mark.parametrize(
    'description, timepoint, folders, expected',
    [
        ('ISPY2MRIT0', '', (), (0, 'description')),
        ('ISPY2_MRI_T1', '', (), (1, 'description')),
        ('ISPY2 MRI T2', 'T0', (), (2, 'description')),
        ('mri t3', '', (), (3, 'description')),
        ('ISPY2_MRI_T1_repeat', '', (), (1, 'description')),
        ('MRI T12', '', (), (None, '')),
        ('', 'T2', ('x-ISPY2MRIT0-1',), (2, 'timepoint')),
        ('BREAST MRI', '3', (), (3, 'timepoint')),
        ('', 'T7', ('01-01-2010-6698ISPY2MRIT3-12345',), (3, 'folder')),
        (
            '',
            '',
            ('ISPY2', 'ISPY2-100001', '01-01-2010-ISPY2MRIT1-99'),
            (1, 'folder'),
        ),
        (
            '',
            '',
            ('a-ISPY2MRIT1-9', 'b-ISPY2MRIT2-9'),
            (None, ''),
        ),  # contradicting folders
        ('Breast', '', ('ISPY2-100001',), (None, '')),
    ],
)
def test_study_visit(description, timepoint, folders, expected):
  assert tcia.study_visit(description, timepoint, folders) == expected


@pytest.mark.parametrize(
    'description, expected',
    [
        (UNI_DCE, 'uni-lateral'),
        (BI_DCE, 'bi-lateral'),
        (
            'ACRIN-6698: VOLSER: Uni-Lateral cropped: original DCE',
            'uni-lateral',
        ),
        ('bilateral original DCE', 'bi-lateral'),
        ('original DCE', ''),
    ],
)
def test_laterality(description, expected):
  assert tcia.laterality(description) == expected


@pytest.fixture
def header_tree(tmp_path):
  """Header-only files exercising grouping, visit precedence and series choice."""
  root = tmp_path / 'manual'
  pid = 'ISPY2-100001'
  top = root / 'ISPY2' / pid
  uid = {name: generate_uid() for name in 'ABCDEF'}
  series = {
      name: generate_uid()
      for name in (
          'a_uni',
          'a_bi',
          'a_seg_uni',
          'a_seg_bi',
          'a_ser',
          'b_bi',
          'b_seg_uni',
          'c',
          'd',
          'e',
          'f_ser',
      )
  }

  def put(
      study, folder, name, count, desc, modality='MR', sop=MRImageStorage, **kw
  ):
    for i in range(count):
      _header_only(
          str(top / folder / name / f'1-{i:02d}.dcm'),
          pid,
          uid[study],
          series[name],
          modality=modality,
          sop=sop,
          series_desc=desc,
          **kw,
      )

  seg_sop = tcia.SEG_SOP_CLASS
  a = dict(study_desc='ISPY2MRIT0')
  put('A', '05-17-1999-ISPY2MRIT0-1', 'a_uni', 3, UNI_DCE, **a)
  put('A', '05-17-1999-ISPY2MRIT0-1', 'a_bi', 5, BI_DCE, **a)
  put(
      'A',
      '05-17-1999-ISPY2MRIT0-1',
      'a_seg_bi',
      1,
      BI_MASK,
      'SEG',
      seg_sop,
      **a,
  )
  put(
      'A',
      '05-17-1999-ISPY2MRIT0-1',
      'a_seg_uni',
      1,
      UNI_MASK,
      'SEG',
      seg_sop,
      **a,
  )
  put(
      'A',
      '05-17-1999-ISPY2MRIT0-1',
      'a_ser',
      4,
      'ISPY2: VOLSER: uni-lateral cropped: SER',
      **a,
  )
  # A slice of study A's uni-lateral DCE in an unrelated folder: grouped by UIDs, not folders.
  _header_only(
      str(top / 'misplaced' / 'x.dcm'),
      pid,
      uid['A'],
      series['a_uni'],
      series_desc=UNI_DCE,
      study_desc='ISPY2MRIT0',
  )
  put('B', 'study-b', 'b_bi', 2, BI_DCE, timepoint='T1')
  put('B', 'study-b', 'b_seg_uni', 1, UNI_MASK, 'SEG', seg_sop, timepoint='T1')
  put(
      'C',
      '05-17-1999-6698ISPY2MRIT2-333',
      'c',
      2,
      'ACRIN-6698: VOLSER: uni-lateral cropped: original DCE',
  )
  put('D', 'study-d', 'd', 4, UNI_DCE, study_desc='ISPY2 MRI T2')
  put('E', 'study-e', 'e', 2, UNI_DCE, study_desc='BREAST BILATERAL')
  put(
      'F',
      'study-f',
      'f_ser',
      2,
      'ISPY2: VOLSER: uni-lateral cropped: SER',
      study_desc='ISPY2_MRI_T3',
  )
  other = root / 'ISPY2' / 'ACRIN-6698-200002' / 's' / 'x'
  _header_only(
      str(other / '1.dcm'),
      'ACRIN-6698-200002',
      generate_uid(),
      generate_uid(),
      study_desc='MRI T0',
      series_desc=UNI_DCE,
  )
  # Not DICOM (ignored silently) and corrupt DICOM (reported).
  (root / 'LICENSE').write_text('CC BY 4.0')
  (root / '.DS_Store').write_bytes(b'\0\0\0\1Bud1')
  _write_xlsx(str(root / tcia.CLINICAL_FILE), ['Patient_ID'], [[100001]])
  good = (top / '05-17-1999-ISPY2MRIT0-1' / 'a_uni' / '1-00.dcm').read_bytes()
  (top / '05-17-1999-ISPY2MRIT0-1' / 'a_uni' / 'broken.dcm').write_bytes(
      good[:200]
  )
  return root, series


def test_discover_groups_by_headers_and_chooses_series(header_tree):
  root, series = header_tree
  patients, issues = tcia.discover(root)
  assert sorted(patients) == ['ACRIN-6698-200002', 'ISPY2-100001']
  t0, t1, t2, t3 = patients['ISPY2-100001'].visits
  # T0: uni-lateral preferred over bi-lateral (which has more slices); the misplaced slice joins.
  assert len(t0.dce) == 4 and t0.laterality == 'uni-lateral'
  assert all('a_uni' in p or 'misplaced' in p for p in t0.dce)
  assert 'a_seg_uni' in t0.seg and t0.notes == ()
  # T1 from ClinicalTrialTimePointID: only a bi-lateral DCE; the mask of the other wording is used.
  assert (
      len(t1.dce) == 2
      and t1.laterality == 'bi-lateral'
      and 'b_seg_uni' in t1.seg
  )
  assert 'visit from timepoint' in t1.notes
  assert any('laterality differs' in n for n in t1.notes)
  # T2 claimed by the folder name (C, 2 slices) and the description (D, 4 slices): D wins.
  assert len(t2.dce) == 4 and all(f'{os.sep}d{os.sep}' in p for p in t2.dce)
  assert t2.seg is None and 'no analysis mask' in t2.notes
  assert t3 is None  # T3 has only a SER series
  reasons = sorted((i.reason, i.visit) for i in issues)
  assert reasons == [
      ('corrupt_file', None),
      ('duplicate_visit', 2),
      ('no_dce_series', 3),
      ('unknown_visit', None),
  ]
  corrupt = next(i for i in issues if i.reason == 'corrupt_file')
  assert corrupt.detail.startswith(
      os.path.join('ISPY2', 'ISPY2-100001', '<date>-ISPY2MRIT0-1')
  )
  assert 'broken.dcm' in corrupt.detail
  assert not [s for s in _strings(issues) for phi in PHI_STRINGS if phi in s]
  acrin = patients['ACRIN-6698-200002'].visits
  assert acrin[0] is not None and acrin[1:] == (None, None, None)
  # Parallel header reading through any map function gives the same result.
  assert tcia.discover(root, map_fn=lambda f, xs: [f(x) for x in xs]) == (
      patients,
      issues,
  )
  pickle.dumps((patients, tcia.scan_file, tcia.process_patient))
  skip = pickle.loads(pickle.dumps(tcia.Skip('no_t0', 'why')))
  assert (skip.reason, skip.detail) == ('no_t0', 'why')


def test_discover_errors(tmp_path):
  with pytest.raises(
      FileNotFoundError, match='does not exist.*ISPY2-Imaging-Cohort-1'
  ):
    tcia.discover(tmp_path / 'nope')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='is empty'):
    tcia.discover(tmp_path / 'empty')
  (tmp_path / 'junk' / 'sub').mkdir(parents=True)
  (tmp_path / 'junk' / 'notes.txt').write_text('hello')
  (tmp_path / 'junk' / 'sub' / 'a.txt').write_text('hello')
  (tmp_path / 'junk' / 'sub' / 'img.png').write_bytes(b'\x89PNG')
  with pytest.raises(
      ValueError, match=r'no DICOM.*3 files \(\.txt 2, \.png 1\).*PatientID'
  ):
    tcia.discover(tmp_path / 'junk')


# ----------------------------------------------------------------------------- geometry
def _measure(image, grid, threshold):
  mask = tcia.resample(image, grid) > threshold
  return grid.to_physical(geometry.centroid(mask)), mask.sum() * np.prod(
      grid.spacing
  )


@pytest.mark.parametrize(
    'name, row_dir, col_dir',
    [
        ('axial', (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
        ('flipped rows, negative normal', (-1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
        ('flipped columns', (1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),
        ('oblique 20 deg', *OBLIQUE),
        ('sagittal', *SAGITTAL),
    ],
)
def test_geometry_recovers_a_cube(tmp_path, name, row_dir, col_dir):
  geom = Geometry(
      row_dir=row_dir,
      col_dir=col_dir,
      spacing=(0.9, 1.1, 2.0),
      shape=(50, 44, 24),
  )
  centre = np.asarray(geom.centre) + (4.0, -6.0, 3.0)
  write_dce(
      str(tmp_path),
      geom,
      lambda p, pts: np.where(_cube(pts, centre), 1000.0, 100.0),
      [0.0],
      tpi=False,
      slope=2.0,
      intercept=-10.0,
  )
  headers = [tcia.read_slice_header(str(p)) for p in tmp_path.iterdir()]
  stack, spacing = tcia.sort_slices(headers)
  assert spacing == pytest.approx(2.0, abs=1e-3)
  image = tcia.load_volume(stack, spacing)
  assert np.asarray(image.GetDirection()).reshape(3, 3)[
      :, 2
  ] @ geom.normal == pytest.approx(1)
  grid = tcia.target_grid(image, (2.0, 1.0, 1.0))
  assert grid.spacing == (1.0, 1.0, 2.0)
  values = tcia.resample(image, grid)
  assert values.max() == pytest.approx(
      1000.0, abs=1.0
  )  # RescaleSlope/Intercept applied
  found, volume = _measure(image, grid, 550.0)
  np.testing.assert_array_less(
      np.abs(found - centre), grid.spacing
  )  # within one target voxel
  assert volume == pytest.approx(CUBE_MM**3, rel=0.10)
  # The crop around it holds the cube in its middle.
  window = geometry.crop(values > 550.0, grid.to_index(found), (16, 40, 40))
  inner = np.argwhere(window).mean(0)
  np.testing.assert_allclose(inner, (7.5, 19.5, 19.5), atol=1.0)


def _stack(n, step=2.0, skip=()):
  return [
      tcia.SliceHeader(
          path=f'{k}',
          position=(0.0, 0.0, -step * k),
          orientation=(1.0, 0, 0, 0, 1.0, 0),
          pixel_spacing=(1.0, 1.0),
          shape=(4, 4),
      )
      for k in range(n)
      if k not in skip
  ]


def test_missing_slices_and_phases_are_detected():
  stack, spacing = tcia.sort_slices(_stack(6)[::-1])
  assert [s.path for s in stack] == [
      '5',
      '4',
      '3',
      '2',
      '1',
      '0',
  ] and spacing == 2.0
  with pytest.raises(tcia.VisitError, match='missing_slices.*gap of 4.00 mm'):
    tcia.sort_slices(_stack(6, skip=(3,)))
  with pytest.raises(
      tcia.VisitError, match='missing_slices.*phase 1 has 5 slices'
  ):
    tcia.check_phases(
        [_stack(6), _stack(6, skip=(5,)), _stack(6)]
    )  # an end slice: no gap
  with pytest.raises(
      tcia.VisitError, match='missing_slices.*phase 2 slice positions differ'
  ):
    tcia.check_phases([_stack(6), _stack(6), _stack(7, skip=(0,))])
  with pytest.raises(tcia.VisitError, match='missing_phases'):
    tcia.check_phases([_stack(6), _stack(6)])
  with pytest.raises(tcia.VisitError, match='duplicate_slices'):
    tcia.sort_slices(_stack(4) + _stack(1))
  tilted = _stack(4)[:3] + [
      _stack(4)[3]._replace(orientation=(0.0, 1, 0, 1, 0, 0))
  ]
  with pytest.raises(tcia.VisitError, match='inconsistent_geometry'):
    tcia.sort_slices(tilted)


@pytest.mark.parametrize(
    'form, orientation, legend, orientation_per_frame',
    [
        (
            'bitflags',
            ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
            tcia_fixtures.MASK_LEGEND,
            False,
        ),
        (
            'bitflags',
            OBLIQUE,
            None,
            True,
        ),  # no Mask Legend: the documented bits
        ('bitflags', SAGITTAL, tcia_fixtures.MASK_LEGEND, False),
        ('seg', ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)), None, False),
        ('seg', OBLIQUE, None, False),
    ],
)
def test_masks_are_resampled_by_geometry(
    tmp_path, form, orientation, legend, orientation_per_frame
):
  geom = Geometry(
      row_dir=orientation[0], col_dir=orientation[1]
  )  # 20 slices of 2.5 mm
  sources = write_dce(
      str(tmp_path / 'dce'),
      geom,
      lambda p, pts: np.full(pts.shape[:2], 100.0),
      [0.0],
  )
  # The mask's slab extends 10 slices below and 2 above the DCE: centre-cropping would misplace it.
  mask_geom = geom._replace(
      centre=tuple(np.asarray(geom.centre) - 4 * 2.5 * geom.normal),
      shape=(48, 48, 32),
  )
  ftv_centre = np.asarray(geom.centre) + (-8.0, 5.0, -12.0)
  ftv = lambda pts: _cube(pts, ftv_centre)  # noqa: E731
  voi = lambda pts: _cube(pts, ftv_centre, CUBE_MM + 10.0)  # noqa: E731
  path = str(tmp_path / 'mask.dcm')
  if form == 'seg':
    write_seg(path, sources, mask_geom, ftv, voi=voi)
  else:
    write_bitflag_mask(
        path,
        mask_geom,
        _flags(ftv, voi),
        legend=legend,
        orientation_per_frame=orientation_per_frame,
    )
  mask = tcia.read_analysis_mask(path)
  assert mask.form == form
  assert mask.ftv_mm3 == pytest.approx(
      CUBE_MM**3, rel=0.15
  )  # on its own 1 x 1 x 2.5 mm grid
  stack, spacing = tcia.sort_slices(
      [tcia.read_slice_header(str(p)) for p in (tmp_path / 'dce').iterdir()]
  )
  image = tcia.load_volume(stack, spacing)
  grid = tcia.target_grid(image, (2.0, 1.0, 1.0))
  codes = tcia.mask_codes(mask, grid)
  inside_dce = tcia.resample(image, grid, sitk.sitkNearestNeighbor) > 0
  assert (
      codes[inside_dce] > 0
  ).all()  # the whole DCE lies inside the mask's slab
  tumour, in_voi = codes == schema.TUMOUR, (codes == schema.TUMOUR) | (
      codes == schema.VOI
  )
  for region in (tumour, in_voi):
    centre = grid.to_physical(geometry.centroid(region))
    np.testing.assert_array_less(np.abs(centre - ftv_centre), grid.spacing)
  assert tumour.sum() * np.prod(grid.spacing) == pytest.approx(
      CUBE_MM**3, rel=0.10
  )
  assert in_voi.sum() * np.prod(grid.spacing) == pytest.approx(
      (CUBE_MM + 10) ** 3, rel=0.10
  )
  # Outside the mask's slab nothing is tumour or VOI, even where no bit excludes it.
  wide = grid._replace(
      origin=tuple(np.asarray(grid.origin) - (60.0, 0, 0)),
      size=(grid.size[0] + 60,) + grid.size[1:],
  )
  assert not tcia.mask_codes(mask, wide)[:, :, :10].any()


def test_the_mask_legend_says_which_bit_is_the_voi(tmp_path):
  """The legend's meanings override the documented bits; a value that neither explains means the
  mask is not in the bit-flag form."""
  geom = Geometry(shape=(8, 8, 4))
  column = lambda pts: np.round((pts[..., 0] - geom.position(0)[0]) / geom.spacing[1])  # noqa: E731
  values = lambda pts: np.select([column(pts) < 2, column(pts) >= 6], [0, 0x41], 0x01)  # noqa: E731
  legend = (
      '00000001 ( 1) : PE threshold',
      '01000000 (64) : outside the manual VOI',
  )
  write_bitflag_mask(
      str(tmp_path / 'mask' / 'legend.dcm'), geom, values, legend=legend
  )
  codes = sitk.GetArrayFromImage(
      tcia.read_analysis_mask(str(tmp_path / 'mask' / 'legend.dcm')).codes
  )  # [slice, row, column] on the mask's own grid
  np.testing.assert_array_equal(codes[0, 0], [1, 1, 2, 2, 2, 2, 3, 3])
  write_bitflag_mask(
      str(tmp_path / 'mask' / 'documented.dcm'), geom, values, legend=None
  )
  with pytest.raises(tcia.MaskError) as info:
    tcia.read_analysis_mask(str(tmp_path / 'mask' / 'documented.dcm'))
  assert info.value.reason == 'mask_unrecognised'
  assert info.value.detail.startswith('mask/documented.dcm: 8-bit values 0x41 ')
  write_bitflag_mask(
      str(tmp_path / 'mask' / 'bad_legend.dcm'),
      geom,
      values,
      legend=legend[:1] + ('01000000 (32) : manual VOI',),
  )
  with pytest.raises(
      tcia.MaskError, match=r'bad_legend.dcm: Mask Legend entry 2 is not'
  ):
    tcia.read_analysis_mask(str(tmp_path / 'mask' / 'bad_legend.dcm'))


def _broken_masks(folder):
  """(file, reason, what the detail says) of masks the reader must refuse, written under folder."""
  geom = Geometry(shape=(8, 8, 6))
  good = folder / 'good.dcm'
  write_bitflag_mask(
      str(good), geom, lambda pts: np.zeros(pts.shape[:2], np.uint8)
  )
  cases = []

  def variant(name, reason, says, change):
    ds = pydicom.dcmread(good)
    change(ds)
    _save(ds, str(folder / name))
    cases.append((name, reason, says))

  def sixteen_bits(ds):
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelData = np.zeros((6, 8, 8), np.uint16).tobytes()

  def one_bit_fractional(ds):
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0

  def no_positions(ds):
    for frame in ds.PerFrameFunctionalGroupsSequence:
      del frame.PlanePositionSequence

  def gap(ds):
    depth = [
        np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float)
        @ geom.normal
        for f in ds.PerFrameFunctionalGroupsSequence
    ]
    drop = int(np.argsort(depth)[2])
    del ds.PerFrameFunctionalGroupsSequence[drop]
    frames = np.frombuffer(ds.PixelData, np.uint8).reshape(6, 8, 8)
    ds.PixelData, ds.NumberOfFrames = np.delete(frames, drop, 0).tobytes(), 5

  variant(
      '16bit.dcm',
      'mask_unrecognised',
      'BitsAllocated 16, FRACTIONAL',
      sixteen_bits,
  )
  variant(
      '1bit.dcm',
      'mask_unrecognised',
      'BitsAllocated 1, FRACTIONAL',
      one_bit_fractional,
  )
  variant(
      'no_positions.dcm',
      'mask_unrecognised',
      'frame 1 has no ImagePositionPatient',
      no_positions,
  )
  variant('gap.dcm', 'mask_geometry', 'its frames: gap of 5.00 mm', gap)
  (folder / 'truncated.dcm').write_bytes(good.read_bytes()[:-100])
  cases.append(
      ('truncated.dcm', 'mask_unreadable', 'ValueError while decoding')
  )
  (folder / 'not_dicom.dcm').write_bytes(b'\0' * 128 + b'DICM' + b'\1' * 64)
  cases.append(
      (
          'not_dicom.dcm',
          'mask_unrecognised',
          'no BitsAllocated, no SegmentationType',
      )
  )
  return cases


def test_masks_in_neither_form_get_a_reason_naming_the_file(tmp_path):
  folder = tmp_path / 'mask series'
  for name, reason, says in _broken_masks(folder):
    with pytest.raises(tcia.MaskError) as info:
      tcia.read_analysis_mask(str(folder / name))
    assert info.value.reason == reason, name
    assert (
        info.value.detail.startswith(f'mask series/{name}: ')
        and says in info.value.detail
    ), info.value.detail


def test_pe70_mask_background_and_largest_component():
  pre = np.full((10, 20, 20), 100.0)
  pre[:, :, :5] = 5.0  # air, below 0.6 x the 95th percentile
  early = pre * 1.1
  early[:, :, :5] = (
      10.0  # PE 100 % in air: excluded by the background threshold
  )
  early[2:5, 8:12, 8:12] = 200.0  # 48 voxels of PE 100 %
  early[5, 12, 12] = 200.0  # touches them only at a corner (26-connected)
  early[7:9, 15:17, 15:17] = 200.0  # a smaller component
  early[1, 1, 10] = 169.0  # PE 69 %
  expected = np.zeros(pre.shape, bool)
  expected[2:5, 8:12, 8:12] = expected[5, 12, 12] = True
  mask = tcia.pe70_mask(pre, early, 0.6 * np.percentile(pre, 95))
  np.testing.assert_array_equal(mask, expected)
  assert not tcia.pe70_mask(pre, pre, 60.0).any()


# ----------------------------------------------------------------------------- clinical sheet
def test_read_clinical(tmp_path):
  header = ['Patient_ID', 'Arm', 'HR', 'HER2', 'MP', 'pCR', 'Age', 'race']
  _write_xlsx(
      str(tmp_path / 'docs' / tcia.CLINICAL_FILE),
      header,
      [
          [100899, 'Paclitaxel', 1, 0, 'High', 1, 51, 'white'],
          [
              '100900',
              'Paclitaxel + Neratinib',
              'Positive',
              'Positive',
              None,
              '0.0',
              44,
              'asian',
          ],
          [
              'ISPY2-100901',
              'T-DM1 + Pertuzumab',
              'Negative',
              1.0,
              None,
              'Yes',
              60,
              None,
          ],
          [100902.0, 'Paclitaxel', 0, 0, None, None, 38, None],  # empty pCR
          [100903, 'Paclitaxel', 0, 0, None, 1, 38, None],
          [
              'ISPY2-100903',
              'Paclitaxel',
              0,
              0,
              None,
              0,
              38,
              None,
          ],  # conflicting duplicate
          [100904, 'Paclitaxel', 1, 1, None, 'No', 70, None],
          [
              100904,
              'Paclitaxel',
              1,
              1,
              None,
              'No',
              70,
              None,
          ],  # identical duplicate: fine
          [100905, 'Paclitaxel', None, 1, None, 1, 70, None],  # no HR
          [None, None, None, None, None, None, None, None],
      ],
  )
  _write_xlsx(
      str(tmp_path / tcia.ANCILLARY_FILE),
      ['TCIA PATIENT ID', 'I-SPY 2 Research ID'],
      [
          ['ACRIN-6698-555555', 100899],
          ['ISPY2-100900', '100900'],
          ['ACRIN-6698-666666', 999999],
      ],
  )
  records = tcia.read_clinical(tmp_path)
  sub = schema.SUBTYPES.index
  r = records['ISPY2-100899']
  assert (r.pcr, r.subtype, r.arm, r.duplicate) == (
      1,
      sub('HR+/HER2-'),
      'Paclitaxel',
      False,
  )
  assert (
      records['100899'] == r and records['ACRIN-6698-555555'] == r
  )  # ancillary mapping
  assert (
      'ACRIN-6698-666666' not in records
  )  # maps to an id absent from the sheet
  assert (records['ISPY2-100900'].pcr, records['ISPY2-100900'].subtype) == (
      0,
      sub('HR+/HER2+'),
  )
  assert (records['100901'].pcr, records['100901'].subtype) == (
      1,
      sub('HR-/HER2+'),
  )
  assert records['ISPY2-100902'].pcr is None and records[
      'ISPY2-100902'
  ].subtype == sub('HR-/HER2-')
  assert records['ISPY2-100903'].duplicate and records['ISPY2-100903'].rows == (
      6,
      7,
  )
  assert (
      not records['ISPY2-100904'].duplicate and records['ISPY2-100904'].pcr == 0
  )
  assert records['ISPY2-100905'].subtype is None
  assert not [
      s for s in _strings(records) if '51' in s or 'white' in s or 'asian' in s
  ]
  for record, reason in (
      (None, 'not_in_clinical_sheet'),
      (records['ISPY2-100903'], 'duplicate_clinical_id'),
      (records['ISPY2-100902'], 'no_pcr_label'),
      (records['ISPY2-100905'], 'no_subtype'),
  ):
    with pytest.raises(tcia.Skip) as info:
      tcia.process_patient(tcia.PatientFiles('X', (None,) * 4), record, SPEC)
    assert info.value.reason == reason
  with pytest.raises(tcia.Skip, match='no_t0'):
    tcia.process_patient(tcia.PatientFiles('X', (None,) * 4), r, SPEC)


def test_read_clinical_errors(tmp_path):
  with pytest.raises(
      FileNotFoundError, match='ISPY2-Imaging-Cohort-1-Clinical-Data.xlsx'
  ):
    tcia.read_clinical(tmp_path)
  _write_xlsx(
      str(tmp_path / 'my clinical data.xlsx'), ['ID', 'Arm'], [[1, 'a']]
  )
  with pytest.raises(ValueError, match='no sheet with the columns'):
    tcia.read_clinical(tmp_path)


# ----------------------------------------------------------------------------- one patient
T0_TUMOUR = np.asarray(Geometry().centre) + (4.0, -6.0, 3.0)
T2_TUMOUR = T0_TUMOUR + (5.0, 3.0, -6.0)
VOI_MM = CUBE_MM + 10.0  # the radiologist's VOI: a box around the tumour
# An enhancing node outside the VOI (even grown by the carry-over margin), larger than the tumour.
NODE, NODE_MM = np.array([49.0, -25.0, 32.0]), np.array([14.0, 30.0, 30.0])
PATIENT_GEOMETRY = Geometry(
    shape=(48, 96, 20)
)  # 96 columns: x from -37.5 to 57.5 mm


def _enhancing(centre, size):
  """Tissue: pre 100, +10 % after contrast; the cube (and the node) enhance by 140 % (early) and
  120 % (late). A posterior slab of 'air' (pre 5, noise-like +140 %), larger than the cube, must
  be excluded by the background threshold of the PE >= 70 % fallback."""

  def values(p, pts):
    enhancing = _cube(pts, centre, size) | _cube(pts, NODE, NODE_MM)
    gain = (0.0, 0.6, 1.4, 1.3, 1.2)[p] if p < 5 else 1.1
    tissue = np.where(
        enhancing, 100.0 * (1 + gain), 100.0 * (1 + 0.1 * (p > 0))
    )
    return np.where(pts[..., 1] > -5.0, 12.0 if p else 5.0, tissue)

  return values


@pytest.fixture(scope='module')
def patient_tree(tmp_path_factory):
  """Four visits of one patient: T0 with a bit-flag mask, T1 with a missing slice, T2 without a
  mask (PE >= 70 % in T0's VOI, not on the node), T3 with a standard SEG whose FTV is empty (pCR);
  plus a clinical sheet."""
  root = tmp_path_factory.mktemp('tcia')
  pid = 'ISPY2-100001'
  top = root / 'ISPY2' / pid
  geom = PATIENT_GEOMETRY
  mask_geom = geom._replace(
      centre=tuple(np.asarray(geom.centre) - 2 * 2.5 * geom.normal),
      shape=(48, 96, 26),
  )
  times = [0.0, 70.0, 160.0, 300.0, 470.0]
  study = generate_uid()
  write_dce(
      str(top / '05-17-1999-ISPY2MRIT0-1' / '3.000-uni DCE'),
      geom,
      _enhancing(T0_TUMOUR, CUBE_MM),
      times,
      study=study,
  )
  write_bitflag_mask(
      str(top / '05-17-1999-ISPY2MRIT0-1' / '5.000-mask' / '1.dcm'),
      mask_geom,
      _flags(
          lambda pts: _cube(pts, T0_TUMOUR),
          lambda pts: _cube(pts, T0_TUMOUR, VOI_MM),
      ),
      study=study,
  )
  write_dce(
      str(top / '05-17-1999-ISPY2MRIT1-2' / '3.000-uni DCE'),
      geom,
      _enhancing(T0_TUMOUR, CUBE_MM),
      [0.0, 80.0, 150.0, 400.0, 500.0, 600.0],
      study_desc='ISPY2_MRI_T1',
      tpi=False,
      drop={(3, 10)},
  )
  write_dce(
      str(top / '05-17-1999-ISPY2MRIT2-3' / '3.000-uni DCE'),
      geom,
      _enhancing(T2_TUMOUR, 18.0),
      [0.0, 60.0, 140.0, 280.0, 430.0, 560.0, 700.0],
      study_desc='',
      timepoint='T2',
      tpi=False,
      trigger=False,
  )
  study = generate_uid()
  sources = write_dce(
      str(top / '05-17-1999-ISPY2MRIT3-4' / '3.000-uni DCE'),
      geom,
      _enhancing(T2_TUMOUR, 0.0),
      times,
      study=study,
      study_desc='ISPY2MRIT3',
  )
  write_seg(
      str(top / '05-17-1999-ISPY2MRIT3-4' / '5.000-mask' / '1.dcm'),
      sources,
      mask_geom,
      lambda pts: np.zeros(pts.shape[:-1], bool),
      voi=lambda pts: _cube(pts, T2_TUMOUR, VOI_MM),
  )
  _write_xlsx(
      str(root / tcia.CLINICAL_FILE),
      ['Patient_ID', 'Arm', 'HR', 'HER2', 'pCR', 'Age'],
      [[100001, 'Paclitaxel + Pembrolizumab', 0, 0, 1, 47]],
  )
  return root


def test_process_patient(patient_tree):
  patients, issues = tcia.discover(patient_tree)
  assert issues == []
  clinical = tcia.read_clinical(patient_tree)
  patient = patients['ISPY2-100001']
  example, issues, meta = tcia.process_patient(
      patient, clinical['ISPY2-100001'], SPEC
  )
  d, h, w = SPEC.crop_shape
  assert set(example) == {
      'patient_id',
      'images',
      'visit_mask',
      'tumor_mask',
      'pcr',
      'subtype',
      'arm',
      'spacing_mm',
      'phase_times_s',
  }
  assert example['images'].dtype == np.float16 and example['images'].shape == (
      4,
      3,
      d,
      h,
      w,
  )
  assert example['tumor_mask'].dtype == np.uint8 and example[
      'tumor_mask'
  ].shape == (4, d, h, w)
  assert (
      example['visit_mask'].dtype == np.bool_
      and example['spacing_mm'].dtype == np.float32
  )
  assert example['phase_times_s'].dtype == np.float32
  assert (
      example['patient_id'],
      example['pcr'],
      example['subtype'],
      example['arm'],
  ) == ('ISPY2-100001', 1, 3, 'Paclitaxel + Pembrolizumab')
  np.testing.assert_array_equal(
      example['visit_mask'], [True, False, True, True]
  )
  assert [(i.visit, i.reason) for i in issues] == [(1, 'missing_slices')]
  assert meta['mask_source'] == [
      'analysis_mask_bitflags',
      None,
      'pe70_in_voi',
      'analysis_mask_seg',
  ]
  assert meta['phase_source'] == [
      'TemporalPositionIdentifier',
      None,
      'AcquisitionTime',
      'TemporalPositionIdentifier',
  ]
  assert meta['phase_indices'] == [[0, 2, 4], None, [0, 2, 4], [0, 2, 4]]
  assert meta['num_phases'] == [5, None, 7, 5]
  np.testing.assert_allclose(
      example['phase_times_s'],
      [[0, 160, 470], [0, 0, 0], [0, 140, 430], [0, 160, 470]],
      atol=1e-3,
  )
  voxel = np.prod(SPEC.target_spacing_mm)
  centre_index = (np.asarray(SPEC.crop_shape) - 1) / 2
  # T0 from its mask (the VOI around the tumour in it); T2 from PE >= 70 % in T0's VOI: the
  # tumour, not the larger node that PE >= 70 % over the field of view would take.
  for v, size in ((0, CUBE_MM), (2, 18.0)):
    mask = example['tumor_mask'][v] == schema.TUMOUR
    assert mask.sum() * voxel == pytest.approx(size**3, rel=0.10)
    np.testing.assert_allclose(
        np.argwhere(mask).mean(0), centre_index, atol=1.0
    )
    pre, early, late = example['images'][v].astype(np.float32)[:, mask].mean(1)
    assert (
        pre == pytest.approx(100, rel=0.05)
        and early > 2.0 * pre
        and late > 1.9 * pre
    )
  np.testing.assert_allclose(meta['crop_centre_mm'][0], T0_TUMOUR, atol=1.0)
  np.testing.assert_allclose(meta['crop_centre_mm'][2], T2_TUMOUR, atol=1.0)
  assert meta['mask_ftv_mm3'][0] == pytest.approx(CUBE_MM**3, rel=0.10)
  assert meta['mask_ftv_mm3'][2] is None and meta['ftv_mm3'][
      2
  ] == pytest.approx(18.0**3, rel=0.1)
  # The VOI is in the record where a mask gave one (code VOI, around the tumour), nowhere else.
  voi = example['tumor_mask'][0] > 0
  assert voi.sum() * voxel == pytest.approx(VOI_MM**3, rel=0.10)
  assert set(np.unique(example['tumor_mask'][2])) == {0, schema.TUMOUR}
  # T3: pCR, empty FTV -> cropped around the mask's VOI, which the record keeps.
  assert set(np.unique(example['tumor_mask'][3])) == {0, schema.VOI}
  assert meta['ftv_mm3'][3] == 0 and meta['mask_ftv_mm3'][3] == 0
  # (within a mask slice: the VOI's edges fall between its 2.5-mm slices)
  assert (
      np.linalg.norm(np.subtract(meta['crop_centre_mm'][3], T2_TUMOUR))
      <= 1.25 + 1e-6
  )
  assert not example['images'][1].any() and not example['tumor_mask'][1].any()
  # No PHI anywhere (names, dates also from the dated folder names, institution, accession).
  texts = _strings(example) + _strings(meta) + _strings(issues)
  assert not [(phi, s) for s in texts for phi in PHI_STRINGS if phi in s]
  pickle.loads(pickle.dumps((example, issues, meta)))
  json.dumps([meta, [i._asdict() for i in issues]])  # the build report is JSON


def test_process_patient_fallbacks(patient_tree, tmp_path):
  patients, _ = tcia.discover(patient_tree)
  clinical = tcia.read_clinical(patient_tree)['ISPY2-100001']
  t0 = patients['ISPY2-100001'].visits[0]
  bad_seg = tmp_path / 'masks' / 'bad_seg.dcm'
  bad_seg.parent.mkdir()
  bad_seg.write_bytes(b'\0' * 128 + b'DICM' + b'\1' * 64)
  truncated = tmp_path / 'series'
  truncated.mkdir()
  pre = next(
      p
      for p in sorted(t0.dce)
      if tcia.read_slice_header(p).temporal_position == 1
  )
  for i, path in enumerate(sorted(t0.dce)):
    data = open(path, 'rb').read()
    (truncated / f'{i}.dcm').write_bytes(data[:-100] if path == pre else data)
  broken = tcia.VisitFiles(
      dce=tuple(str(p) for p in sorted(truncated.iterdir()))
  )
  patient = tcia.PatientFiles(
      'ISPY2-100001',
      (tcia.VisitFiles(dce=t0.dce, seg=str(bad_seg)), broken, None, None),
  )
  example, issues, meta = tcia.process_patient(patient, clinical, SPEC)
  # A mask in neither form: PE >= 70 % over the field of view, with no VOI to restrict it, takes
  # the largest enhancing structure: the node, not the tumour (what the Analysis Mask prevents).
  assert meta['mask_source'][0] == 'pe70' and meta['mask_ftv_mm3'][0] is None
  np.testing.assert_allclose(meta['crop_centre_mm'][0], NODE, atol=1.0)
  mask = example['tumor_mask'][0].astype(bool)
  assert mask.sum() * np.prod(SPEC.target_spacing_mm) == pytest.approx(
      np.prod(NODE_MM), rel=0.10
  )
  # Truncated pixel data in a chosen phase: that visit is missing; at T0 the patient is skipped.
  assert [(i.visit, i.reason) for i in issues] == [
      (0, 'mask_unrecognised'),
      (1, 'corrupt_file'),
  ]
  assert issues[0].detail.startswith('masks/bad_seg.dcm: neither')
  assert 'pixel data unreadable' in issues[1].detail
  np.testing.assert_array_equal(
      example['visit_mask'], [True, False, False, False]
  )
  with pytest.raises(tcia.Skip) as info:
    tcia.process_patient(
        tcia.PatientFiles('ISPY2-100001', (broken, t0, None, None)),
        clinical,
        SPEC,
    )
  assert info.value.reason == 'no_t0'


# ----------------------------------------------------------------------------- fixture trees
def _date_variants(texts):
  """'20101130' -> also '11-30-2010' (NBIA folder names): dates must not leak in either form."""
  out = list(texts)
  for t in texts:
    if len(t) == 8 and t.isdigit():
      out.append(f'{t[4:6]}-{t[6:]}-{t[:4]}')
  return out


@pytest.mark.parametrize('tree', ['tcia_tree', 'vendor_tree'])
def test_fixture_tree_end_to_end(tree, request):
  root, truths = request.getfixturevalue(tree)
  patients, issues = tcia.discover(root)
  clinical = tcia.read_clinical(root)
  assert sorted(patients) == sorted(truths)
  # Study-level reports; nothing else (the junk .dcm text file is not DICOM: ignored silently).
  expected = {
      (pid, reason)
      for pid, t in truths.items()
      for reason, _ in t.study_reports
  }
  expected |= {
      (pid, 'no_dce_series')
      for pid, t in truths.items()
      if 'no_dce_series' in t.visit_reasons
  }
  assert {(i.patient_id, i.reason) for i in issues} == expected
  spec = tcia.TciaSpec()
  voxel = float(np.prod(spec.target_spacing_mm))
  spacing_xyz = np.asarray(spec.target_spacing_mm[::-1])
  texts = _strings(issues)
  for pid, truth in truths.items():
    if truth.expected_skip:
      with pytest.raises(tcia.Skip) as info:
        tcia.process_patient(patients[pid], clinical.get(pid), spec)
      assert info.value.reason == truth.expected_skip, pid
      texts += [info.value.detail]
      continue
    example, patient_issues, meta = tcia.process_patient(
        patients[pid], clinical.get(pid), spec
    )
    texts += _strings(example) + _strings(meta) + _strings(patient_issues)
    assert (example['pcr'], example['subtype'], example['arm']) == (
        truth.pcr,
        truth.subtype,
        truth.arm,
    ), pid
    np.testing.assert_array_equal(
        example['visit_mask'], truth.visit_mask, err_msg=pid
    )
    np.testing.assert_allclose(
        example['phase_times_s'], truth.phase_times_s, atol=1e-3
    )
    assert [
        m or [-1, -1, -1] for m in meta['phase_indices']
    ] == truth.phase_indices.tolist(), pid
    assert tuple(meta['mask_source']) == tuple(truth.mask_source), pid
    # Missing visits are reported with the contract's reasons (unreadable pixels: corrupt_file).
    reported = {
        (i.visit, i.reason)
        for i in patient_issues
        if not i.reason.startswith('mask_')
    }
    assert reported == {
        (v, {'unreadable_dicom': 'corrupt_file'}.get(r, r))
        for v, r in enumerate(truth.visit_reasons)
        if r not in (None, 'no_study', 'no_dce_series')
    }, pid
    assert {
        (i.visit, i.reason)
        for i in patient_issues
        if i.reason.startswith('mask_')
    } == {
        (v, 'mask_unreadable')
        for f, v in truth.faults_applied
        if f == 'corrupt_seg'
    }, pid
    for v in np.flatnonzero(truth.visit_mask):
      centre = np.asarray(meta['crop_centre_mm'][v])
      np.testing.assert_array_less(
          np.abs(centre - truth.crop_center_mm[v]),
          spacing_xyz,
          err_msg=f'{pid} T{v}',
      )
      if truth.tumor_volume_mm3[
          v
      ]:  # within 2 mm of the tumour, never on the node
        assert (
            np.linalg.norm(centre - truth.tumor_centroid_mm[v]) <= 2.0
        ), f'{pid} T{v}'
      if truth.case.node_mm is not None:
        assert (
            np.linalg.norm(centre - truth.node_centroid_mm[v]) > 40.0
        ), f'{pid} T{v}'
      mask = example['tumor_mask'][v]
      if not truth.mask_source[v].startswith('analysis_mask'):
        assert set(np.unique(mask)) <= {
            0,
            schema.TUMOUR,
        }, f'{pid} T{v}'  # no VOI from a mask
        continue
      # The mask's own FTV, and the record's: its zero voxels resampled to 2 x 1 x 1 mm (within
      # 6 %, partial volume of the fixtures' 5-mm slices), centred, inside the VOI the record keeps.
      assert meta['mask_ftv_mm3'][v] == pytest.approx(
          truth.ftv_volume_mm3[v], abs=0.1
      )
      assert (mask == schema.VOI).any(), f'{pid} T{v}'
      tumour = mask == schema.TUMOUR
      if truth.ftv_volume_mm3[v] == 0:
        assert not tumour.any(), f'{pid} T{v}'
      elif truth.ftv_volume_mm3[v] >= 1000:
        assert tumour.sum() * voxel == pytest.approx(
            truth.ftv_volume_mm3[v], rel=0.06
        ), f'{pid} T{v}'
        np.testing.assert_allclose(
            np.argwhere(tumour).mean(0),
            (np.asarray(spec.crop_shape) - 1) / 2,
            atol=1.0,
        )
  phi = _date_variants(
      [p for t in truths.values() for p in t.phi]
      + list(tcia_fixtures.PHI_STRINGS)
  )
  assert not [(p, s) for s in texts for p in phi if p in s]


def test_each_vendor_layout_is_read_by_its_own_tags(vendor_tree):
  """Phases and their times from the tags each scanner fills: Philips' TriggerTime of 0 on every
  slice must not make every phase time 0 (then early and late would both be phase 1).
  """
  root, truths = vendor_tree
  patients, _ = tcia.discover(root)
  source = {
      'GE': 'TemporalPositionIdentifier',
      'Siemens': 'AcquisitionTime',
      'Philips': 'TemporalPositionIdentifier',
  }
  for pid, truth in truths.items():
    arrays, issues, meta = tcia.read_images(patients[pid])
    assert (
        issues == []
        and meta['phase_source'][:2] == [source[truth.case.vendor]] * 2
    )
    assert meta['phase_indices'][:2] == truth.phase_indices[:2].tolist()
    np.testing.assert_allclose(
        arrays['phase_times_s'], truth.phase_times_s, atol=1e-3
    )


# ----------------------------------------------------------------------------- the header walker
def _pydicom_only(monkeypatch):
  """Every header through pydicom, as for a transfer syntax dicom_scan does not walk."""

  def unsupported(*args, **kwargs):
    raise dicom_scan.Unsupported('pydicom, for this test')

  monkeypatch.setattr(dicom_scan, 'read_header', unsupported)


PYDICOM_FILES = (
    'CT_small.dcm',
    'MR_small.dcm',
    'MR_small_implicit.dcm',
    'MR_small_bigendian.dcm',
    'MR_small_expb.dcm',
    'MR_small_RLE.dcm',
    'MR_small_padded.dcm',
    'MR_truncated.dcm',
)


def test_the_header_walker_reads_what_pydicom_reads(
    tcia_tree, vendor_tree, monkeypatch
):
  """scan_file, read_slice_header and the pixels agree with pydicom's reading of the same files:
  the fixtures' explicit-VR slices of every layout, their masks (sequences of undefined length),
  and pydicom's own MR and CT files (implicit VR, big endian and RLE: left to pydicom).
  """
  files = [str(p) for p in sorted(vendor_tree[0].rglob('*.dcm'))]
  files += [str(p) for p in sorted(tcia_tree[0].rglob('*Analysis Mask*/*.dcm'))]
  files += [pydicom.data.get_testdata_file(name) for name in PYDICOM_FILES]
  single = [f for f in files if 'original DCE' in f or 'MR_small' in f]
  fast = (
      [tcia.scan_file(f) for f in files],
      [tcia.read_slice_header(f) for f in single],
  )
  left = [os.path.basename(h.path) for h in fast[1] if h.pixels is None]
  assert left == [
      'MR_small_bigendian.dcm',
      'MR_small_expb.dcm',
      'MR_small_RLE.dcm',
      'MR_small_padded.dcm',
  ]  # big endian, compressed, longer than a frame: pydicom
  with pytest.raises(
      tcia.VisitError,
      match='MR_truncated.dcm: pixel data unreadable .PixelData'
      ' cut short: the file holds 8130 of its 8192 bytes.',
  ):
    tcia.read_slice_header(pydicom.data.get_testdata_file('MR_truncated.dcm'))
  pixels = [slices.read_pixels(h) for h in fast[1]]
  with monkeypatch.context() as m:
    _pydicom_only(m)
    slow = (
        [tcia.scan_file(f) for f in files],
        [tcia.read_slice_header(f) for f in single],
    )
  assert fast[0] == slow[0]
  assert [h._replace(pixels=None) for h in fast[1]] == slow[1]
  for header, values in zip(slow[1], pixels):
    np.testing.assert_array_equal(
        values, slices.read_pixels(header), err_msg=header.path
    )
  small = [p for h, p in zip(single, pixels) if 'MR_small' in h]
  for values in small[1:]:  # one image in every encoding
    np.testing.assert_array_equal(values, small[0])


@pytest.mark.parametrize('signed', [0, 1])
def test_pixels_are_masked_to_bits_stored_and_rescaled_as_pydicom_does(
    tmp_path, signed
):
  ds = _dataset('ISPY2-100001', generate_uid(), generate_uid())
  ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [
      1,
      0,
      0,
      0,
      1,
      0,
  ]
  ds.PixelSpacing, ds.Rows, ds.Columns = [1, 1], 2, 3
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, 'MONOCHROME2'
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (
      16,
      12,
      11,
      signed,
  )
  ds.RescaleSlope, ds.RescaleIntercept = '1.5', '-7'
  ds.PixelData = np.array(
      [0x0FFF, 0xF001, 0x0800, 0x1234, 0x0000, 0x8FFF], '<u2'
  ).tobytes()
  _save(ds, str(tmp_path / 'x.dcm'))
  header = tcia.read_slice_header(str(tmp_path / 'x.dcm'))
  assert header.pixels == tcia.PixelRef(
      header.pixels.offset, '<i2' if signed else '<u2', 12, (1.5, -7.0)
  )
  expected = pydicom.pixels.apply_rescale(
      pydicom.dcmread(tmp_path / 'x.dcm').pixel_array, ds
  )
  np.testing.assert_array_equal(
      slices.read_pixels(header), expected.astype(np.float32)
  )


def test_dicom_without_a_dce_series_is_refused_in_one_line(tmp_path):
  """Real MR and CT files (pydicom's), none a DCE series: discover says so, in one line."""
  for name in PYDICOM_FILES:
    shutil.copy(pydicom.data.get_testdata_file(name), tmp_path)
  with pytest.raises(ValueError) as info:
    tcia.discover(tmp_path)
  message = str(info.value)
  assert message.startswith(
      f'no DCE series under {str(tmp_path)!r}: 8 DICOM files in 2 series'
      ' (CT 1, MR 1) of 2 patient(s), none an MR series described as'
      ' "original DCE"; expected <manual_dir>/'
  )
  assert '\n' not in message


def test_a_real_size_series_cut_short_is_reported_in_one_line(tmp_path, caplog):
  """A real-size uni-lateral visit (256 x 256, 88 slices, 7 phases: 616 files) whose last file a
  download cut short (an unused phase: every file's length is checked): the build's one line
  names the patient, the file and PixelData, as for a small series."""
  case = tcia_fixtures.Case(
      'real_cut',
      'ISPY2-100600',
      100600,
      6,
      visits=(0,),
      size='real',
      vendor='GE',
      faults=(('truncated_last', 0),),
  )
  truth = tcia_fixtures.write_tcia_tree(tmp_path / 'manual', [case])[
      case.tcia_id
  ]
  dce = sorted((tmp_path / 'manual' / truth.dce_dirs[0]).glob('*.dcm'))
  first = pydicom.dcmread(dce[0], stop_before_pixels=True)
  assert len(dce) == 616 and (first.Rows, first.Columns) == (256, 256)
  last = max(dce, key=lambda p: int(p.stem.split('-')[1]))
  assert last.stat().st_size < dce[0].stat().st_size - 60000
  starts = [
      float(pydicom.dcmread(dce[88 * p], stop_before_pixels=True).TriggerTime)
      for p in range(7)
  ]
  assert (
      max(tcia.choose_phases(starts, 150e3, 450e3)) < 6
  )  # the last phase is not one used
  patients, _ = tcia.discover(tmp_path / 'manual')
  job = (
      patients[case.tcia_id],
      tcia.read_clinical(tmp_path / 'manual').get(case.tcia_id),
      tcia.TciaSpec(),
      str(tmp_path),
  )
  report = tcia_build.BuildReport(found=1, issues=[])
  with caplog.at_level(logging.WARNING):
    report.add(
        tcia_build.summarise(tcia_build.process(job, skips_are_fatal=False))
    )
  [line] = [r.getMessage() for r in caplog.records]
  assert line.startswith(
      f'ispy2/tcia: skipped patient {case.tcia_id}: no_t0 ({case.tcia_id}:'
      ' T0 corrupt_file: '
  )
  assert (
      f'/{last.name}: pixel data unreadable (PixelData cut short: the file holds '
      in line
  )
  assert 'of its 131072 bytes)' in line and '\n' not in line
  assert report.skipped == [
      {
          'patient_id': case.tcia_id,
          'reason': 'no_t0',
          'detail': line[line.index('(') + 1 : -1],
      }
  ]
