"""Tests of the TCIA-like DICOM tree writer (`fake_data/tcia_fixtures.py`), not the reader.

Only pydicom / SimpleITK / openpyxl (and highdicom's SEG parser, for the standard form) look at
the files here.
"""

import collections
import dataclasses
import hashlib
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.errors import InvalidDicomError

from fake_data import tcia_fixtures as fx
from tfds_ispy2.ispy2 import phantom

CASES = {c.name: c for c in fx.DEFAULT_CASES}
MR = '1.2.840.10008.5.1.4.1.1.4'
# Every value of a real ACRIN-6698 T0 Analysis Mask (its histogram): what VOLSER's flags give.
COLLECTION_VALUES = {0x00, 0x01, 0x02, 0x11, 0x20, 0x21, 0x22, 0x31}


@pytest.fixture(scope='session')
def tree(tcia_tree):
  """The shared fixture tree (conftest.py), by the name these tests use."""
  return tcia_tree


@pytest.fixture(scope='module')
def headers(tree):
  """Every file under the tree: path -> header (None for non-DICOM files)."""
  root, _ = tree
  out = {}
  for path in sorted(Path(root).rglob('*')):
    if path.is_file():
      try:
        out[path] = pydicom.dcmread(path, stop_before_pixels=True)
      except InvalidDicomError:
        out[path] = None
  return out


def _truth(tree, name):
  return tree[1][CASES[name].tcia_id]


def _phase_of(ds):
  if 'TemporalPositionIdentifier' in ds:
    return int(ds.TemporalPositionIdentifier) - 1
  return float(ds.TriggerTime)


def _normal(ds):
  iop = np.asarray(ds.ImageOrientationPatient, float)
  return np.cross(iop[:3], iop[3:])


def _load_series(headers, root, rel_dir):
  """Phases of one DCE folder, each [(projection, path, header)] sorted along the normal."""
  folder = Path(root) / rel_dir
  phases = collections.defaultdict(list)
  for path, ds in headers.items():
    if ds is not None and path.parent == folder:
      proj = float(np.asarray(ds.ImagePositionPatient, float) @ _normal(ds))
      phases[_phase_of(ds)].append((proj, path, ds))
  return [sorted(phases[k], key=lambda x: x[0]) for k in sorted(phases)]


def _volume(slices):
  """Rescaled float volume [D, H, W] of one phase (pixels decoded)."""
  out = []
  for _, path, _ in slices:
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array.astype(np.float64)
    out.append(
        arr * float(ds.get('RescaleSlope', 1.0))
        + float(ds.get('RescaleIntercept', 0.0))
    )
  return np.stack(out)


def _mask_ftv(mask_path, slices):
  """FTV [D, H, W] on the DCE slices' grid from an Analysis Mask of either form (pure pydicom:
  8-bit flags, FTV = 0; or 1-bit segments, FTV = in none), + its LPS points and the dataset.
  """
  seg = pydicom.dcmread(mask_path)
  pixels = seg.pixel_array.reshape(
      int(seg.NumberOfFrames), seg.Rows, seg.Columns
  )
  planes = [
      np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float)
      for f in seg.PerFrameFunctionalGroupsSequence
  ]
  ftv = []
  for _, _, ds in slices:
    ipp = np.asarray(ds.ImagePositionPatient, float)
    hits = [n for n, p in enumerate(planes) if np.allclose(p, ipp, atol=1e-3)]
    assert hits, 'every DCE slice lies in the mask extent'
    ftv.append(~np.any(pixels[hits] != 0, axis=0))
  ftv = np.stack(ftv)
  ds0 = slices[0][2]
  iop = np.asarray(ds0.ImageOrientationPatient, float)
  dy, dx = (float(x) for x in ds0.PixelSpacing)
  k, j, i = np.nonzero(ftv)
  ipps = np.stack(
      [np.asarray(s[2].ImagePositionPatient, float) for s in slices]
  )
  lps = ipps[k] + i[:, None] * dx * iop[:3] + j[:, None] * dy * iop[3:]
  return ftv, lps, seg


# ----------------------------------------------------------------------------- layout
def test_tree_holds_every_case(tree):
  root, truths = tree
  assert len(truths) == len(fx.DEFAULT_CASES)


def test_tree_has_expected_patients_studies_series(tree, headers):
  root, truths = tree
  assert (Path(root) / fx.CLINICAL_SHEET_NAME).is_file()
  assert (Path(root) / fx.ANCILLARY_SHEET_NAME).is_file()
  patients = {p.name for p in (Path(root) / 'ISPY2').iterdir() if p.is_dir()}
  assert patients == set(truths)
  by_patient = collections.defaultdict(lambda: collections.defaultdict(set))
  for path, ds in headers.items():
    if ds is not None:
      by_patient[ds.PatientID][ds.StudyInstanceUID].add(
          (ds.Modality, ds.SeriesDescription)
      )
      # Grouping by header agrees with the folder layout.
      assert path.parts[-4] == ds.PatientID
  for case in fx.DEFAULT_CASES:
    studies = by_patient[case.tcia_id]
    extra = sum(
        f in ('duplicate_visit', 'unknown_study') for f, _ in case.faults
    )
    assert len(studies) == len(case.visits) + extra, case.name
    descs = [d for s in studies.values() for d in s]
    if case.laterality == 'bi':
      assert not any('uni-lateral' in d for _, d in descs)
    if case.prefix == 'ACRIN-6698':
      assert all(d.startswith('ACRIN-6698:') for _, d in descs)
  both = by_patient[CASES['uni_and_bi'].tcia_id]
  t0 = [s for s in both.values() if len(s) == 4]
  assert len(t0) == 1 and {d for _, d in t0[0]} == {
      'ISPY2: VOLSER: bi-lateral: original DCE',
      'ISPY2: VOLSER: uni-lateral cropped: original DCE',
      'ISPY2: VOLSER: bi-lateral: Analysis Mask',
      'ISPY2: VOLSER: uni-lateral cropped: Analysis Mask',
  }
  std = [
      d for s in by_patient[CASES['standard'].tcia_id].values() for _, d in s
  ]
  assert 'ISPY2: VOLSER: uni-lateral cropped: SER' in std
  no_dce = by_patient[CASES['no_dce'].tcia_id].values()
  assert {frozenset(s) for s in no_dce} >= {
      frozenset({('MR', 'ISPY2: VOLSER: uni-lateral cropped: SER')})
  }
  # Non-DICOM files: the sheets, LICENSE, .DS_Store and the one junk file.
  non_dicom = sorted(p.name for p, ds in headers.items() if ds is None)
  assert non_dicom == sorted(
      [
          '.DS_Store',
          '1-999.dcm',
          'LICENSE',
          fx.ANCILLARY_SHEET_NAME,
          fx.CLINICAL_SHEET_NAME,
      ]
  )


def test_headers_are_valid_and_carry_phi(tree, headers):
  _, truths = tree
  sops = set()
  for ds in headers.values():
    if ds is None:
      continue
    assert ds.SOPClassUID in (MR, fx.SEG_SOP_CLASS_UID)
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    sops.add(ds.SOPInstanceUID)
    assert str(ds.PatientName) == 'Doe^Jane'
    if ds.Modality == 'MR':
      assert ds.InstitutionName == fx.INSTITUTION
    truth = truths[ds.PatientID]
    assert ds.PatientBirthDate in truth.phi and ds.AccessionNumber in truth.phi
    assert ds.StudyDate in truth.phi
    if ds.Modality == 'MR':
      assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 0
      assert ds.Rows > 0 and ds.Columns > 0 and len(ds.PixelSpacing) == 2
  assert len(sops) == sum(
      ds is not None for ds in headers.values()
  )  # unique SOP UIDs


def test_good_pixels_decode_and_faulty_files_fail(tree):
  root, truths = tree
  for truth in truths.values():
    for rel in truth.dce_dirs:
      if rel is None:
        continue
      first = sorted((Path(root) / rel).glob('*.dcm'))[0]
      ds = pydicom.dcmread(first)
      assert ds.pixel_array.dtype == np.uint16
      assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
  trunc = _truth(tree, 'truncated_file')
  assert trunc.faults_applied == (('truncated_file', 2),)
  files = sorted((Path(root) / trunc.dce_dirs[2]).glob('*.dcm'))
  bad = [
      p
      for p in files
      if p.stat().st_size < 0.9 * max(q.stat().st_size for q in files)
  ]
  assert len(bad) == 1
  ds = pydicom.dcmread(bad[0], stop_before_pixels=True)  # the header is intact
  assert int(ds.TemporalPositionIdentifier) == 1  # a pre-contrast slice
  with pytest.raises(Exception):  # noqa: B017 -- whichever error pydicom's decoder raises
    pydicom.dcmread(bad[0]).pixel_array  # noqa: B018
  corrupt = _truth(tree, 'corrupt_seg')
  assert corrupt.mask_source[:2] == (
      'pe70',
      'pe70',
  )  # no readable mask, so no VOI to carry
  seg_file = next(
      (Path(root) / corrupt.dce_dirs[0]).parent.glob('*Analysis Mask*/*.dcm')
  )
  assert pydicom.dcmread(seg_file, stop_before_pixels=True).Modality == 'SEG'
  with pytest.raises(Exception):  # noqa: B017 -- whichever error pydicom's decoder raises
    pydicom.dcmread(seg_file).pixel_array  # noqa: B018
  assert not list(
      (Path(root) / corrupt.dce_dirs[1]).parent.glob('*Analysis Mask*')
  )


# ----------------------------------------------------------------------------- geometry
@pytest.mark.parametrize(
    'name,visit',
    [
        ('standard', 0),
        ('oblique', 1),
        ('flipped', 1),
        ('spacing', 2),
        ('bilateral', 0),
        ('uni_and_bi', 0),
        ('sagittal', 1),
    ],
)
def test_sitk_reads_the_intended_geometry(tree, headers, name, visit):
  import SimpleITK as sitk

  root, _ = tree
  truth = _truth(tree, name)
  geo = truth.dce_geometry[visit]
  phases = _load_series(headers, root, truth.dce_dirs[visit])
  assert len(phases) == len(truth.all_phase_times_s[visit])
  reader = sitk.ImageSeriesReader()
  reader.SetFileNames([str(p) for _, p, _ in phases[0]])
  img = reader.Execute()
  np.testing.assert_allclose(img.GetOrigin(), geo['origin'], atol=1e-4)
  np.testing.assert_allclose(img.GetDirection(), geo['direction'], atol=1e-6)
  np.testing.assert_allclose(img.GetSpacing(), geo['spacing'], atol=1e-6)
  assert img.GetSize() == geo['size']
  direction = np.asarray(geo['direction']).reshape(3, 3)
  if name == 'oblique':
    assert (
        np.degrees(np.arccos(np.clip(direction[2, 2], -1, 1))) > 10
    )  # tilted normal
  elif name == 'flipped':
    np.testing.assert_allclose(direction, np.diag([-1.0, 1.0, -1.0]), atol=1e-9)
  elif (
      name == 'sagittal'
  ):  # rows posterior, columns inferior, slices towards the right
    np.testing.assert_allclose(
        direction, [[0, 0, -1], [1, 0, 0], [0, -1, 0]], atol=1e-9
    )
  else:
    np.testing.assert_allclose(direction, np.eye(3), atol=1e-9)
  if name == 'spacing':
    assert geo['spacing'] == (
        2.0,
        2.4,
        4.0,
    )  # anisotropic in plane: (column, row, slice)
  if name == 'bilateral':
    assert geo['size'][0] == 2 * geo['size'][1]  # both breasts
  if name == 'uni_and_bi':
    assert truth.dce_series_description[0].endswith(
        'uni-lateral cropped: original DCE'
    )


@pytest.mark.parametrize(
    'name,visit',
    [
        ('standard', 0),
        ('oblique', 1),
        ('flipped', 0),
        ('sagittal', 0),
        ('spacing', 2),
        ('bilateral', 1),
        ('uni_and_bi', 0),
        ('acrin', 0),
        ('oblique', 3),
    ],
)
def test_mask_extends_beyond_dce_and_matches_truth(tree, headers, name, visit):
  import highdicom as hd

  root, _ = tree
  truth = _truth(tree, name)
  slices = _load_series(headers, root, truth.dce_dirs[visit])[0]
  mask_path = Path(root) / truth.mask_paths[visit]
  ftv, lps, seg = _mask_ftv(mask_path, slices)
  normal = _normal(slices[0][2])
  planes = {
      round(
          float(
              np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float)
              @ normal
          ),
          3,
      )
      for f in seg.PerFrameFunctionalGroupsSequence
  }
  dce = [s[0] for s in slices]
  assert int(seg.NumberOfFrames) > len(slices) and len(planes) > len(slices)
  assert min(planes) < min(dce) - 1 and max(planes) > max(dce) + 1
  assert len([p for p in planes if p > max(dce)]) != len(
      [p for p in planes if p < min(dce)]
  )
  voxel = np.prod([float(x) for x in slices[0][2].PixelSpacing]) * abs(
      dce[1] - dce[0]
  )
  np.testing.assert_allclose(
      ftv.sum() * voxel, truth.ftv_volume_mm3[visit], rtol=1e-6
  )
  if ftv.any():
    np.testing.assert_allclose(
        lps.mean(0), truth.ftv_centroid_mm[visit], atol=1e-3
    )
  form = truth.case.mask
  if form.startswith('bitflags'):
    # The collection's form: 8-bit flags declared as one FRACTIONAL segment, one frame per plane.
    assert seg.BitsAllocated == 8 and seg.SegmentationType == 'FRACTIONAL'
    assert int(seg.NumberOfFrames) == len(planes)
    assert set(np.unique(seg.pixel_array).tolist()) <= COLLECTION_VALUES
    assert (fx.MASK_LEGEND_TAG in seg) == (form != 'bitflags_no_legend')
    if fx.MASK_LEGEND_TAG in seg:
      assert seg[fx.MASK_LEGEND_TAG].VR == 'LO'
      assert list(seg[fx.MASK_LEGEND_TAG].value) == list(fx.MASK_LEGEND)
    per_frame = (
        'PlaneOrientationSequence' in seg.PerFrameFunctionalGroupsSequence[0]
    )
    assert per_frame == (form == 'bitflags_per_frame')
    assert (
        'PlaneOrientationSequence' in seg.SharedFunctionalGroupsSequence[0]
    ) != per_frame
    assert re.fullmatch(
        r'VOLSER,BACKGROUND=\d+,SER PE THRESHOLD=70', seg.DerivationDescription
    )
    with pytest.raises(
        AttributeError
    ):  # as on the collection's masks: no SegmentSequence
      hd.seg.segread(mask_path).get_volume(combine_segments=False)
    return
  # The standard form: highdicom's own geometry (an independent SEG reader) finds the same FTV.
  volume = hd.seg.segread(mask_path).get_volume(combine_segments=False)
  idx = np.argwhere(~volume.array.astype(bool).any(-1))
  assert volume.array.shape[0] == len(planes)
  np.testing.assert_allclose(
      len(idx) * abs(np.linalg.det(volume.affine[:3, :3])),
      truth.ftv_volume_mm3[visit],
      rtol=1e-6,
  )
  if len(idx):
    lps_hd = (volume.affine @ np.c_[idx, np.ones(len(idx))].T)[:3].T.mean(0)
    np.testing.assert_allclose(lps_hd, truth.ftv_centroid_mm[visit], atol=1e-3)


def _on_dce(seg, slices):
  """The 8-bit values of a bit-flag mask on the DCE slices' planes, [D, H, W]."""
  depth = {
      round(
          float(
              np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float)
              @ _normal(slices[0][2])
          ),
          3,
      ): n
      for n, f in enumerate(seg.PerFrameFunctionalGroupsSequence)
  }
  return seg.pixel_array[[depth[round(p, 3)] for p, _, _ in slices]]


def test_masks_are_volser_on_the_written_images(tree, headers):
  """Every mask's FTV is enhancing (PE >= 70 % on the DCE as written) and inside its VOI, a box
  around the tumour."""
  root, truths = tree
  for truth in truths.values():
    for v in range(4):
      if truth.mask_paths[v] is None:
        continue
      phases = _load_series(headers, root, truth.dce_dirs[v])
      pre_i, early_i, _ = truth.phase_indices[v]
      pre, early = _volume(phases[pre_i]), _volume(phases[early_i])
      ftv, _, seg = _mask_ftv(Path(root) / truth.mask_paths[v], phases[0])
      assert (early[ftv] - pre[ftv] >= 0.7 * pre[ftv]).all(), (
          truth.case.name,
          v,
      )
      if seg.BitsAllocated != 8:
        continue
      voi = (_on_dce(seg, phases[0]) & fx.VOI_BIT) == 0
      lo, hi = np.argwhere(voi).min(0), np.argwhere(voi).max(0) + 1
      assert voi[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].all()  # a box
      assert not (ftv & ~voi).any()


@pytest.mark.parametrize('name', ['oblique', 'flipped', 'spacing', 'bilateral'])
def test_phantom_to_lps_places_the_rerendered_phantom(tree, name):
  """Re-rendering the phantom and mapping it with phantom_to_lps gives the truth centroids."""
  truth = _truth(tree, name)
  ex = phantom.render_patient(truth.phantom_spec, truth.phantom_index)
  for v in range(4):
    if not truth.visit_mask[v] or not ex['tumor_mask'][v].any():
      continue
    kji = np.argwhere(ex['tumor_mask'][v])
    lps = (truth.phantom_to_lps[v] @ np.c_[kji, np.ones(len(kji))].T)[
        :3
    ].T.mean(0)
    resampled = dict(truth.case.visit_spacing).get(v) is not None
    tol = 3.0 if resampled else 1e-6  # resampling re-discretises the tumour
    np.testing.assert_allclose(lps, truth.tumor_centroid_mm[v], atol=tol)


def test_dummy_cases():
  import tempfile

  with tempfile.TemporaryDirectory() as tmp:
    truths = fx.write_tcia_tree(tmp, fx.DUMMY_CASES)
    files = [p for p in Path(tmp).rglob('*') if p.is_file()]
  assert sum(t.expected_skip is None for t in truths.values()) == 5
  assert {s for t in truths.values() for s in t.mask_source if s} == {
      'analysis_mask_bitflags',
      'analysis_mask_seg',
      'pe70_in_voi',
  }
  assert len(files) < 600


@pytest.mark.parametrize(
    'name,visit',
    [('oblique', 0), ('flipped', 1), ('spacing', 2), ('bilateral', 0)],
)
def test_enhancing_tumour_is_where_the_truth_says(tree, headers, name, visit):
  """Pixels and geometry agree: SimpleITK's physical position of the PE >= 70 % blob."""
  truth = _truth(tree, name)
  _, lps = _largest_enhancing(tree, headers, truth, visit)
  assert np.linalg.norm(np.subtract(lps, truth.tumor_centroid_mm[visit])) < 5.0


def _largest_enhancing(tree, headers, truth, visit):
  """The largest PE >= 70 % blob over the whole field of view (SimpleITK's reading of the
  series): its voxels [k, j, i] and its LPS centroid."""
  import SimpleITK as sitk
  from scipy import ndimage

  root, _ = tree
  phases = _load_series(headers, root, truth.dce_dirs[visit])
  images = []
  for p in truth.phase_indices[visit][:2]:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(path) for _, path, _ in phases[p]])
    images.append(reader.Execute())
  pre, early = (
      sitk.GetArrayFromImage(im).astype(float) for im in images
  )  # [k, j, i]
  pe = 100 * (early - pre) / np.maximum(pre, 1.0)
  blob = (pe >= 70) & (pre >= 0.6 * np.percentile(pre, 95))
  labels, n = ndimage.label(blob, np.ones((3, 3, 3)))
  largest = labels == 1 + np.argmax(ndimage.sum(blob, labels, range(1, n + 1)))
  k, j, i = np.argwhere(largest).mean(0)
  return largest, images[0].TransformContinuousIndexToPhysicalPoint((i, j, k))


def test_node_outside_the_voi_is_the_largest_enhancing_structure(tree, headers):
  """The `node` patient: over the whole field, PE >= 70 % finds the node, not the tumour; the node
  lies outside the radiologist's VOI and enhances over more voxels than the FTV.
  """
  root, _ = tree
  truth = _truth(tree, 'node')
  for v in (0, 1, 2):
    largest, lps = _largest_enhancing(tree, headers, truth, v)
    assert np.linalg.norm(np.subtract(lps, truth.node_centroid_mm[v])) < 2.0
    assert (
        np.linalg.norm(truth.node_centroid_mm[v] - truth.tumor_centroid_mm[v])
        > 40.0
    )
    if truth.mask_paths[v] is None:
      assert (
          truth.mask_source[v] == 'pe70_in_voi'
      )  # T1: the VOI of T0 is carried over
      continue
    slices = _load_series(headers, root, truth.dce_dirs[v])[0]
    ftv, _, seg = _mask_ftv(Path(root) / truth.mask_paths[v], slices)
    assert (
        _on_dce(seg, slices)[largest] & fx.VOI_BIT
    ).all() and largest.sum() > ftv.sum()


def test_spacing_visits_are_the_same_physical_tumour(tree):
  truth = _truth(tree, 'spacing')
  # T0 and its resampled T1 (3 x 2 x 2 mm): same tumour, volumes within discretisation.
  np.testing.assert_allclose(
      truth.tumor_volume_mm3[1], truth.phantom_volume_mm3[1], rtol=0.25
  )
  shift = np.linalg.norm(
      truth.tumor_centroid_mm[1] - truth.tumor_centroid_mm[0]
  )
  assert shift < 25.0  # misregistration (<= 3 mm) + table offset (<= 10 mm)


# ----------------------------------------------------------------------------- intensities
@pytest.mark.parametrize(
    'name,visit',
    [
        ('standard', 0),
        ('oblique', 0),
        ('acrin', 1),
        ('bilateral', 0),
        ('no_tpi', 1),
    ],
)
def test_tumour_enhances_more_than_70_percent(tree, headers, name, visit):
  root, _ = tree
  truth = _truth(tree, name)
  phases = _load_series(headers, root, truth.dce_dirs[visit])
  pre_i, early_i, late_i = truth.phase_indices[visit]
  pre, early = _volume(phases[pre_i]), _volume(phases[early_i])
  ftv, _, _ = _mask_ftv(Path(root) / truth.mask_paths[visit], phases[0])
  pe = 100.0 * (early - pre) / np.maximum(pre, 1.0)
  assert np.median(pe[ftv]) > 70.0
  assert (
      np.median(pe[~ftv & (pre > np.percentile(pre, 50))]) < 70.0
  )  # the breast enhances less


def test_phase_headers_match_truth(tree, headers):
  root, truths = tree
  for truth in truths.values():
    for v in range(4):
      if not truth.visit_mask[v]:
        continue
      phases = _load_series(headers, root, truth.dce_dirs[v])
      times = np.array([float(p[0][2].TriggerTime) / 1000.0 for p in phases])
      np.testing.assert_allclose(times, truth.all_phase_times_s[v], atol=1e-3)
      np.testing.assert_allclose(
          times[list(truth.phase_indices[v])], truth.phase_times_s[v], atol=1e-3
      )
      assert truth.phase_indices[v].tolist() == list(fx.choose_phases(times))
      acq = [p[0][2].AcquisitionTime for p in phases]
      secs = np.array(
          [int(a[:2]) * 3600 + int(a[2:4]) * 60 + float(a[4:]) for a in acq]
      )
      np.testing.assert_allclose(secs - secs[0], times, atol=1e-3)
      has_tpi = 'TemporalPositionIdentifier' in phases[0][0][2]
      assert has_tpi == truth.case.temporal_position
      assert 5 <= len(phases) <= 9
      assert len({len(p) for p in phases}) == 1
  ties = _truth(tree, 'ties')
  assert ties.phase_indices[0].tolist() == [0, 1, 4]
  np.testing.assert_allclose(ties.phase_times_s[0], [0, 100, 400])


def test_fault_visits(tree, headers):
  root, truths = tree
  expect = {
      'truncated_file': (2, 'unreadable_dicom'),
      'missing_slice': (1, 'missing_slices'),
      'two_phases': (2, 'missing_phases'),
      'missing_visit': (2, 'no_study'),
      'no_dce': (1, 'no_dce_series'),
  }
  for name, (v, reason) in expect.items():
    truth = _truth(tree, name)
    assert not truth.visit_mask[v] and truth.visit_reasons[v] == reason, name
    assert truth.visit_mask[0]
  miss = _truth(tree, 'missing_slice')
  phases = _load_series(headers, root, miss.dce_dirs[1])
  counts = [len(p) for p in phases]
  assert sorted(counts)[0] == counts[0] - 1 and counts.count(counts[0] - 1) == 1
  two = _truth(tree, 'two_phases')
  assert len(_load_series(headers, root, two.dce_dirs[2])) == 2
  extra = _truth(tree, 'extra_studies')
  assert [r for r, _ in extra.study_reports] == [
      'unknown_visit',
      'duplicate_visit',
  ]
  assert len(extra.all_phase_times_s[1]) == extra.case.num_phases
  skips = {
      t.case.name: t.expected_skip for t in truths.values() if t.expected_skip
  }
  assert skips == {
      'not_in_sheet': 'not_in_clinical_sheet',
      'empty_pcr': 'no_pcr_label',
      'dup_conflict': 'duplicate_clinical_id',
  }
  for truth in truths.values():  # every requested fault was written
    assert sorted(truth.faults_applied) == sorted(truth.case.faults)


def test_visit_tokens(tree, headers):
  root, truths = tree
  cttp = CASES['cttp_visit'].tcia_id
  folder = CASES['folder_visit'].tcia_id
  seen = collections.defaultdict(set)
  for path, ds in headers.items():
    if ds is None or ds.PatientID not in (cttp, folder):
      continue
    seen[ds.PatientID].add(
        (
            ds.get('StudyDescription'),
            ds.get('ClinicalTrialTimePointID'),
            path.parts[-3],
        )
    )
  assert {c for _, c, _ in seen[cttp]} == {'T0', '1', 'T2', '3'}
  assert all(
      'MRI' not in (d or '') and 'MRI' not in f for d, _, f in seen[cttp]
  )
  assert all(c is None and 'MRIT' not in (d or '') for d, c, _ in seen[folder])
  assert {f.split('-')[3] for _, _, f in seen[folder]} == {
      f'ISPY2MRIT{v}' for v in range(4)
  }


# ----------------------------------------------------------------------------- vendors
def _seconds(tm):
  return int(tm[:2]) * 3600 + int(tm[2:4]) * 60 + float(tm[4:])


def test_vendor_layouts_say_phase_time_and_scale_as_the_scanners_do(
    vendor_tree,
):
  """GE: TemporalPositionIdentifier and TriggerTime per phase, one AcquisitionTime, no rescale;
  Siemens: only the AcquisitionTime of each phase; Philips: TriggerTime 0 everywhere, the
  AcquisitionTime of each phase, a rescale and its private scale slope; each with its private
  elements."""
  root, truths = vendor_tree
  assert sorted(t.case.vendor for t in truths.values()) == sorted(fx.VENDORS)
  for truth in truths.values():
    layout = fx.VENDORS[truth.case.vendor]
    for v in (0, 1):
      times = truth.all_phase_times_s[v]
      files = sorted((Path(root) / truth.dce_dirs[v]).glob('*.dcm'))
      headers = sorted(
          (pydicom.dcmread(f, stop_before_pixels=True) for f in files),
          key=lambda ds: int(ds.InstanceNumber),
      )
      per_phase = len(headers) // len(times)
      phase = [(int(ds.InstanceNumber) - 1) // per_phase for ds in headers]
      assert {ds.Manufacturer for ds in headers} == {layout.manufacturer}
      assert {'TemporalPositionIdentifier' in ds for ds in headers} == {
          layout.temporal_position
      }
      assert {'NumberOfTemporalPositions' in ds for ds in headers} == {
          layout.temporal_position
      }
      trigger = [
          float(ds.TriggerTime) / 1000.0 if 'TriggerTime' in ds else None
          for ds in headers
      ]
      expected = {
          'phase': [times[p] for p in phase],
          'zero': [0.0] * len(phase),
          None: [None] * len(phase),
      }[layout.trigger]
      np.testing.assert_allclose(
          np.array(trigger, float), np.array(expected, float), atol=1e-3
      )
      acq = np.array([_seconds(ds.AcquisitionTime) for ds in headers])
      since = acq - acq[0]
      np.testing.assert_allclose(
          since,
          [times[p] if layout.acquisition == 'phase' else 0.0 for p in phase],
          atol=1e-3,
      )
      if layout.rescale is None:
        assert not any('RescaleSlope' in ds for ds in headers)
      else:
        assert {
            (float(ds.RescaleSlope), float(ds.RescaleIntercept))
            for ds in headers
        } == {layout.rescale}
      for group, creator, elements in layout.private:
        block = headers[0].private_block(group, creator)
        assert [(e, block[e].VR) for e, _, _ in elements] == [
            (e, vr) for e, vr, _ in elements
        ]
  philips = next(t for t in truths.values() if t.case.vendor == 'Philips')
  ds = pydicom.dcmread(next((Path(root) / philips.dce_dirs[0]).glob('*.dcm')))
  assert ds.private_block(0x2005, 'Philips MR Imaging DD 001')[
      0x0E
  ].value == pytest.approx(
      0.0123457
  )  # the MR scale slope: a reader of displayed values leaves it alone


def test_case_options_are_checked():
  base = CASES['standard']
  with pytest.raises(ValueError, match='vendor'):
    dataclasses.replace(base, vendor='Toshiba')
  with pytest.raises(ValueError, match='its layout sets'):
    dataclasses.replace(base, vendor='GE', rescale=(2.0, 0.0))
  with pytest.raises(ValueError, match='one grid'):
    dataclasses.replace(CASES['spacing'], size='real')
  assert (
      dataclasses.replace(base, vendor='Siemens').layout
      == fx.VENDORS['Siemens']
  )
  assert base.layout.rescale is None and CASES['acrin'].layout.rescale == (
      1.0,
      -50.0,
  )


# ----------------------------------------------------------------------------- sheets
def test_clinical_sheet_reads_back(tree):
  import openpyxl

  root, truths = tree
  ws = openpyxl.load_workbook(Path(root) / fx.CLINICAL_SHEET_NAME).active
  rows = list(ws.iter_rows(values_only=True))
  assert rows[0] == fx.CLINICAL_COLUMNS
  by_id = collections.defaultdict(list)
  for row in rows[1:]:
    by_id[row[0]].append(dict(zip(rows[0], row)))
  assert CASES['not_in_sheet'].research_id not in by_id
  assert by_id[CASES['empty_pcr'].research_id][0]['pCR'] is None
  dup = by_id[CASES['dup_conflict'].research_id]
  assert len(dup) == 2 and dup[0]['pCR'] != dup[1]['pCR']
  same = by_id[CASES['standard'].research_id]
  assert len(same) == 2 and same[0] == same[1]
  assert by_id[CASES['ties'].tcia_id][0]['pCR'] in ('0.0', '1.0')
  assert by_id[CASES['no_tpi'].research_id][0]['HR'] in ('Positive', 'Negative')
  std = _truth(tree, 'standard')
  assert same[0]['pCR'] == std.pcr and same[0]['Arm'] == std.arm
  assert same[0]['HR'] == int(std.subtype in (0, 1))
  assert same[0]['HER2'] == int(std.subtype in (1, 2))
  anc = openpyxl.load_workbook(Path(root) / fx.ANCILLARY_SHEET_NAME).active
  pairs = dict(list(anc.iter_rows(values_only=True))[1:])
  assert pairs[CASES['acrin'].tcia_id] == CASES['acrin'].research_id
  assert CASES['acrin'].research_id in by_id


# ----------------------------------------------------------------------------- DICOM validity
def test_files_are_valid_dicom_under_strict_validation(tmp_path, monkeypatch):
  """A sample tree written and read back with pydicom's validation set to RAISE."""
  import highdicom as hd

  monkeypatch.setattr(
      pydicom.config.settings, 'writing_validation_mode', pydicom.config.RAISE
  )
  monkeypatch.setattr(
      pydicom.config.settings, 'reading_validation_mode', pydicom.config.RAISE
  )
  sample = (
      dataclasses.replace(
          CASES['standard'], visits=(0,), derived=(('SER', 0),)
      ),
      dataclasses.replace(CASES['oblique'], visits=(0, 3)),
      dataclasses.replace(CASES['uni_and_bi'], visits=(0,)),
      dataclasses.replace(CASES['spacing'], visits=(0,)),
  )
  fx.write_tcia_tree(tmp_path, sample)
  files = sorted(tmp_path.rglob('*.dcm'))
  kinds = collections.Counter()
  for path in files:
    ds = pydicom.dcmread(
        path
    )  # no force: preamble, DICM prefix and file meta present
    for (
        elem
    ) in (
        ds.iterall()
    ):  # every value (nested sequences included) passes validation
      elem.value  # noqa: B018 -- reading a value validates it
    meta = ds.file_meta
    assert meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert meta.ImplementationVersionName == fx._IMPL_VERSION
    kinds[ds.Modality, ds.get('BitsAllocated')] += 1
    if ds.Modality == 'MR':
      assert ds['PixelData'].VR == 'OW'
      assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
      continue
    assert ds['PixelData'].VR == 'OB'
    assert ds.pixel_array.shape == (int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    assert len(ds.PerFrameFunctionalGroupsSequence) == int(ds.NumberOfFrames)
    if ds.BitsAllocated == 1:  # the standard form is a valid SEG
      assert hd.seg.segread(path).number_of_segments == len(ds.SegmentSequence)
  # Bit-flag masks: standard T0, oblique T0 + T3; BINARY SEGs: uni_and_bi bi + uni, spacing T0.
  assert kinds['SEG', 8] == 3 and kinds['SEG', 1] == 3 and kinds['MR', 16] > 100


def test_render_dce_series_is_the_phantom_physics():
  spec = fx.FIXTURE_SPEC
  index = CASES['standard'].phantom_index
  ex, maps, truth = phantom.render_patient_maps(spec, index)
  times = truth.phase_times_s[0]
  mine = fx.render_dce_series(spec, index, 0, times, noise=False)
  labels = maps['labels'][0]
  for name in ('tumour', 'fgt', 'muscle'):
    sel = labels == phantom.LABELS[name]
    for p in range(3):
      ref = ex['images'][0, p].astype(np.float64)[sel].mean()
      assert abs(mine[p][sel].mean() / ref - 1) < 0.1, (name, p)


def _digest(base, sub='.'):
  """Hash of the files' paths and bytes, the xlsx sheets excepted (openpyxl stamps save times)."""
  h = hashlib.sha256()
  base = Path(base)
  for p in sorted((base / sub).rglob('*')):
    if p.is_file() and p.suffix != '.xlsx':
      h.update(str(p.relative_to(base)).encode())
      h.update(p.read_bytes())
  return h.hexdigest()


def _sheet_cells(path):
  import openpyxl

  return [
      list(ws.iter_rows(values_only=True))
      for ws in openpyxl.load_workbook(path).worksheets
  ]


def test_output_is_deterministic(tree, tmp_path):
  root, truths = tree
  subset = tuple(CASES[n] for n in ('oblique', 'uni_and_bi', 'dup_conflict'))
  a = fx.write_tcia_tree(tmp_path / 'a', subset)
  b = fx.write_tcia_tree(tmp_path / 'b', subset)
  assert _digest(tmp_path / 'a') == _digest(
      tmp_path / 'b'
  )  # every DICOM / clutter file
  for name in (
      fx.CLINICAL_SHEET_NAME,
      fx.ANCILLARY_SHEET_NAME,
  ):  # the sheets: same cells
    assert _sheet_cells(tmp_path / 'a' / name) == _sheet_cells(
        tmp_path / 'b' / name
    )
  assert {k: t.visit_mask.tolist() for k, t in a.items()} == {
      k: t.visit_mask.tolist() for k, t in b.items()
  }
  for (
      case
  ) in subset:  # a patient's files do not depend on the rest of the cohort
    sub = Path('ISPY2') / case.tcia_id
    assert _digest(tmp_path / 'a', sub) == _digest(root, sub)
    np.testing.assert_array_equal(
        a[case.tcia_id].tumor_centroid_mm,
        truths[case.tcia_id].tumor_centroid_mm,
    )
  one = (CASES['dup_conflict'],)
  fx.write_tcia_tree(tmp_path / 's1', one, seed=1)
  sub = Path('ISPY2') / CASES['dup_conflict'].tcia_id
  assert _digest(tmp_path / 's1', sub) != _digest(tmp_path / 'a', sub)
