"""Reader of a TCIA download of I-SPY2 DCE-MRI into the examples of the `ispy2/tcia` config.

Pure functions (no TFDS, no JAX) so that the builder can run them in worker processes or Beam:

* :func:`discover` groups every DICOM file under ``manual_dir`` by its headers into patients and
  visits (T0..T3) and picks the DCE series and the Analysis Mask (SEG SOP class) of each visit;
* :func:`read_clinical` reads labels from the clinical sheet (and the ancillary id mapping);
* :func:`read_analysis_mask` decodes an Analysis Mask in either of its forms: the collection's
  own (8-bit frames of exclusion bit flags, with a private Mask Legend; not a valid SEG, so
  read with pydicom) or a standard BINARY SEG whose segments are exclusion reasons (highdicom);
* :func:`process_patient` turns one patient into an example of ``schema.features``:
  pre/early/late phases and, per visit, the functional tumour volume (FTV) inside the
  radiologist's VOI, resampled by geometry onto an axis-aligned LPS grid and cropped around the
  tumour (the VOI when the FTV is empty); its metadata says where the CPU time went
  (:class:`StageTimer`).

Headers are read by `dicom_scan` (a struct walk over the elements, pydicom for what it does not
walk), once per file: a slice's header gives its geometry, its phase and where its pixels lie, so
the three phases used are read straight into arrays, and every file's length is checked against
its PixelData (a download cut short) without reading the phases that are not used.

The conventions (visit tokens, series choice, phase choice, geometry, inverse analysis mask,
PE >= 70 % fallback, clinical columns) are those of the shared `ispy2/tcia` contract. Privacy: no
DICOM header text except the TCIA PatientID (de-identified by TCIA) reaches an example, an
:class:`Issue`, a :class:`Skip` or the metadata (only numbers and defined terms such as
BitsAllocated or SegmentationType); file names in messages have dates masked.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fnmatch
import functools
import operator
import os
import re
import struct
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import highdicom
import numpy as np
import openpyxl
import pydicom
import pydicom.config
import pydicom.datadict
import pydicom.filereader
import pydicom.multival
import pydicom.pixels
import SimpleITK as sitk
from scipy import ndimage

from tfds_ispy2.ispy2 import dicom_scan, schema

__all__ = [
    'TciaSpec', 'Skip', 'VisitError', 'Issue', 'VisitFiles', 'PatientFiles', 'ClinicalRecord',
    'FileHeader', 'SliceHeader', 'PixelRef', 'Grid', 'MaskError', 'AnalysisMask', 'StageTimer',
    'discover', 'scan_file',
    'study_visit', 'laterality', 'read_clinical', 'process_patient', 'read_slice_header',
    'split_phases', 'phase_times', 'choose_phases', 'sort_slices', 'check_phases', 'load_volume',
    'target_grid', 'resample', 'read_analysis_mask', 'mask_codes', 'pe70_mask', 'grown_box',
    'centroid_mm', 'crop', 'resample_crop', 'CLINICAL_FILE', 'ANCILLARY_FILE', 'MASK_SOURCES',
    'MASK_LEGEND_TAG',
    'DOCUMENTED_BITS',
]

SEG_SOP_CLASS = '1.2.840.10008.5.1.4.1.1.66.4'
CLINICAL_FILE = 'ISPY2-Imaging-Cohort-1-Clinical-Data.xlsx'
ANCILLARY_FILE = 'Full-Collection-Ancillary-Patient-Information-file.xlsx'
_CLINICAL_GLOB = '*clinical*data*.xlsx'
_ANCILLARY_GLOB = '*ancillary*.xlsx'
LAYOUT = ('<manual_dir>/<collection, e.g. ISPY2>/<PatientID>/<study folder>/<series folder>/*.dcm'
          f' (the NBIA/TCIA downloader layout) and the clinical sheet {CLINICAL_FILE}')

# `MRI T0`, `ISPY2_MRI_T1`, `ISPY2MRIT2`, `...6698ISPY2MRIT3...`; the contract's `\b` after the
# digit is relaxed to "no letter or digit" so that `ISPY2_MRI_T0_x` also matches.
_VISIT_RE = re.compile(r'MRI[\s_-]*T([0-3])(?![0-9a-z])', re.IGNORECASE)
_TIMEPOINT_RE = re.compile(r'T?([0-3])', re.IGNORECASE)
# NBIA folder names start with the (TCIA-shifted) study date, MM-DD-YYYY; DICOM dates are YYYYMMDD.
_DATE_RE = re.compile(r'(?<!\d)(\d{2}-\d{2}-\d{4}|(?:19|20)\d{6})(?!\d)')
_FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclasses.dataclass(frozen=True)
class TciaSpec:
  """Output grid and phase choice of the `tcia` config."""

  target_spacing_mm: tuple[float, float, float] = schema.DEFAULT_SPACING_MM  # D, H, W
  crop_shape: tuple[int, int, int] = schema.DEFAULT_CROP_SHAPE  # D, H, W voxels
  early_s: float = 150.0
  late_s: float = 450.0
  voi_margin_mm: float = 10.0  # a VOI carried over to a later visit: its box grown by this


class _CodedError(Exception):
  """An error with a short ``reason`` code and a PHI-free ``detail`` message."""

  def __init__(self, reason: str, detail: str = ''):
    super().__init__(reason, detail)  # args round-trip through pickle (worker processes)
    self.reason = reason
    self.detail = detail

  def __str__(self) -> str:
    return f'{self.reason}: {self.detail}'


class Skip(_CodedError):
  """The patient cannot be written (no clinical record, no pCR label, T0 unusable, ...)."""


class VisitError(_CodedError):
  """One visit cannot be used: it becomes a missing visit (or, at T0, skips the patient)."""


class Issue(NamedTuple):
  """Something noticed while reading: kept for the build report."""

  patient_id: str
  visit: int | None
  reason: str
  detail: str


@dataclasses.dataclass(frozen=True)
class VisitFiles:
  """The files chosen for one visit: DCE slices (all phases), optional Analysis Mask SEG."""

  dce: tuple[str, ...]
  seg: str | None = None
  laterality: str = ''  # 'uni-lateral', 'bi-lateral' or '' (DCE series description)
  notes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class PatientFiles:
  """One patient's usable visits (index 0..3 = T0..T3; None = missing) as found by discover."""

  patient_id: str
  visits: tuple[VisitFiles | None, ...]


@dataclasses.dataclass(frozen=True)
class ClinicalRecord:
  """Labels of one sheet row; ``duplicate`` when the id has rows with conflicting values."""

  pcr: int | None
  subtype: int | None  # index in schema.SUBTYPES; None when HR or HER2 is missing
  arm: str
  duplicate: bool = False
  rows: tuple[int, ...] = ()  # sheet row numbers, for messages


# ============================================================================= discovery
class FileHeader(NamedTuple):
  """The header attributes discover groups by (read once per file)."""

  patient_id: str
  study_uid: str
  series_uid: str
  modality: str
  sop_class: str
  study_description: str
  series_description: str
  timepoint: str


@dataclasses.dataclass
class _Series:
  modality: str
  sop_class: str
  description: str
  files: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Study:
  description: str = ''
  timepoint: str = ''
  series: dict[str, _Series] = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def _quiet():
  """pydicom warns (and logs) invalid header values verbatim, e.g. dates: keep them out of logs."""
  with warnings.catch_warnings(), pydicom.config.disable_value_validation():
    warnings.simplefilter('ignore')
    yield


def _masked(text: str) -> str:
  return _DATE_RE.sub('<date>', text)


def _relpath(path: str, root: str) -> str:
  return _masked(os.path.relpath(path, root))


def _name(path: str) -> str:
  """`<series folder>/<file>`: enough to find a slice, without the dated study folder."""
  return _masked(os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path)))


def _text(value) -> str:
  return '' if value is None else str(value).strip()


def _read_until(path: str, last_tag: int) -> pydicom.Dataset:
  """The header up to ``last_tag``: what follows (private CSA headers, SEG frame sequences,
  pixels) is never parsed, which makes reading a large download several times faster."""
  with open(path, 'rb') as f:
    return pydicom.filereader.read_partial(f, stop_when=lambda tag, vr, length: tag > last_tag)


# Character sets whose text `dicom_scan` decodes itself (the default repertoire is ASCII); any
# other one is left to pydicom.
_CHARSETS = {'': 'latin-1', 'ISO_IR 6': 'latin-1', 'ISO_IR 100': 'latin-1', 'ISO_IR 192': 'utf-8'}
_CHARSET_TAG = 0x00080005


def _fast_value(header: dicom_scan.Header, tag: int, kind: str, charset: str):
  if kind == 'us':
    return header.us(tag)
  if kind == 'numbers':
    return header.numbers(tag)
  return _text(header.text(tag, charset))


def _pydicom_value(value, kind: str):
  if kind == 'us':
    return None if value is None else int(value)
  if kind == 'numbers':
    if value is None or value == '':
      return None
    return tuple(float(x) for x in (
        value if isinstance(value, pydicom.multival.MultiValue) else [value]))
  return _text(value)


def _header_values(path: str, fields: dict[str, str],
                   through: int) -> tuple[dict | None, dicom_scan.Header | None]:
  """The values of ``fields`` (keyword -> 'text', 'numbers' or 'us') among the elements up to
  ``through``, and the walked header (None when pydicom had to read it); (None, None) when the
  file is not DICOM. `dicom_scan` walks the header; what it does not read, pydicom does."""
  tags = {k: pydicom.datadict.tag_for_keyword(k) for k in fields}
  try:
    header = dicom_scan.read_header(path, [*tags.values(), _CHARSET_TAG], through)
    if header is None:
      return None, None
    charset = _CHARSETS[header.text(_CHARSET_TAG) or '']
    return {k: _fast_value(header, tags[k], kind, charset) for k, kind in fields.items()}, header
  except (dicom_scan.Unsupported, KeyError, ValueError, UnicodeDecodeError, struct.error):
    pass  # another transfer syntax or character set, or a damaged file: pydicom's turn
  with _quiet():
    ds = _read_until(path, through)
    return {k: _pydicom_value(ds.get(k), kind) for k, kind in fields.items()}, None


_FILE_FIELDS = ('PatientID', 'StudyInstanceUID', 'SeriesInstanceUID', 'Modality', 'SOPClassUID',
                'StudyDescription', 'SeriesDescription', 'ClinicalTrialTimePointID')


def scan_file(path: str) -> FileHeader | str | None:
  """Header summary of one file; None if it is not DICOM (no DICM preamble); else an error name.

  Top-level and picklable so that a builder can map it over a process pool (see `discover`).
  """
  try:
    # SeriesInstanceUID (0020,000E): the last attribute needed.
    values, _ = _header_values(path, dict.fromkeys(_FILE_FIELDS, 'text'), 0x0020000E)
  except Exception as e:  # noqa: BLE001 -- any parse failure is a corrupt file, reported by name
    return type(e).__name__
  if values is None:
    return None
  header = FileHeader(*(values[k] for k in _FILE_FIELDS))
  if not (header.patient_id and header.study_uid and header.series_uid):
    return 'incomplete header (no PatientID, StudyInstanceUID or SeriesInstanceUID)'
  return header


def study_visit(description: str, timepoint: str = '',
                folders: Iterable[str] = ()) -> tuple[int | None, str]:
  """Visit 0..3 of a study and where it came from: description, timepoint id, or folder name."""
  if m := _VISIT_RE.search(description or ''):
    return int(m.group(1)), 'description'
  if m := _TIMEPOINT_RE.fullmatch((timepoint or '').strip()):
    return int(m.group(1)), 'timepoint'
  found = {int(m.group(1)) for name in folders if (m := _VISIT_RE.search(name))}
  if len(found) == 1:
    return found.pop(), 'folder'
  return None, ''


def _words(description: str) -> str:
  return ' '.join(re.split(r'[^a-z0-9]+', description.lower()))


def laterality(description: str) -> str:
  """'uni-lateral' / 'bi-lateral' / '' from a series description (any spelling of the hyphen)."""
  letters = re.sub(r'[^a-z]', '', description.lower())
  if 'unilateral' in letters:
    return 'uni-lateral'
  if 'bilateral' in letters:
    return 'bi-lateral'
  return ''


_LATERALITY_RANK = {'uni-lateral': 0, 'bi-lateral': 1, '': 2}


def _is_dce(s: _Series) -> bool:
  return s.modality == 'MR' and 'original dce' in _words(s.description)


def _is_mask(s: _Series) -> bool:
  return (s.modality == 'SEG' or s.sop_class == SEG_SOP_CLASS) and 'analysis mask' in _words(
      s.description)


def _visit_files(study: _Study, visit_source: str) -> VisitFiles:
  """DCE series (uni-lateral first, then most slices) and the SEG matching its laterality."""
  notes = [] if visit_source == 'description' else [f'visit from {visit_source}']
  series = [study.series[uid] for uid in sorted(study.series)]
  dce = sorted((s for s in series if _is_dce(s)),
               key=lambda s: (_LATERALITY_RANK[laterality(s.description)], -len(s.files)))
  if not dce:
    return VisitFiles(dce=(), notes=tuple(notes))
  side = laterality(dce[0].description)
  same_side = sum(laterality(s.description) == side for s in dce)
  if same_side > 1:
    notes.append(f'{same_side} {side or "DCE"} series; chose the one with most slices')
  if side != 'uni-lateral':
    notes.append(f'DCE series is {side or "of unknown laterality"}')
  masks = sorted((s for s in series if _is_mask(s)),
                 key=lambda s: laterality(s.description) != side)
  seg = None
  if not masks:
    notes.append('no analysis mask')
  else:
    seg = sorted(masks[0].files)[0]
    if laterality(masks[0].description) != side:
      notes.append('analysis mask laterality differs from the DCE series')
    if len(masks[0].files) > 1:
      notes.append(f'analysis mask series has {len(masks[0].files)} files; using the first')
  return VisitFiles(dce=tuple(sorted(dce[0].files)), seg=seg, laterality=side, notes=tuple(notes))


def _study_folders(study: _Study, root: str) -> tuple[str, set[str]]:
  """The study folder (above its series folders; relative, dates masked) for messages, and every
  folder name above its files (for visit tokens)."""
  dirs = {os.path.dirname(os.path.relpath(s.files[0], root)) for s in study.series.values()}
  names = {part for d in dirs for part in d.split(os.sep) if part}
  return _masked(os.path.commonpath([os.path.dirname(d) for d in sorted(dirs)])), names


def _patient_files(pid: str, studies: dict[str, _Study],
                   root: str) -> tuple[PatientFiles, list[Issue]]:
  """Visit of each study, duplicates resolved (most DCE slices wins), files chosen per visit."""
  issues = []
  by_visit = collections.defaultdict(list)
  for uid in sorted(studies):
    folder, names = _study_folders(studies[uid], root)
    visit, source = study_visit(studies[uid].description, studies[uid].timepoint, names)
    if visit is None:
      issues.append(Issue(pid, None, 'unknown_visit', f'study folder {folder}: no visit token in '
                          'StudyDescription, ClinicalTrialTimePointID or folder name'))
      continue
    by_visit[visit].append(_visit_files(studies[uid], source))
  visits: list[VisitFiles | None] = [None] * schema.NUM_VISITS
  for v in sorted(by_visit):
    candidates = sorted(by_visit[v], key=lambda c: -len(c.dce))  # stable: ties keep UID order
    best = candidates[0]
    if len(candidates) > 1:
      issues.append(Issue(pid, v, 'duplicate_visit', f'{len(candidates)} studies claim T{v}; kept'
                          f' the one with {len(best.dce)} DCE slices'))
    if not best.dce:
      issues.append(Issue(pid, v, 'no_dce_series',
                          f'T{v} study has no MR series described as "original DCE"'))
      continue
    visits[v] = best
  return PatientFiles(patient_id=pid, visits=tuple(visits)), issues


def _walk(root: str) -> list[str]:
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    paths.extend(os.path.join(dirpath, f) for f in sorted(filenames))
  return paths


def _found(paths: Sequence[str]) -> str:
  counts = collections.Counter(os.path.splitext(p)[1].lower() or '<none>' for p in paths)
  return f'{len(paths)} files (' + ', '.join(f'{e} {n}' for e, n in counts.most_common(8)) + ')'


def discover(manual_dir: str | os.PathLike,
             map_fn: Callable = map) -> tuple[dict[str, PatientFiles], list[Issue]]:
  """Patients of a TCIA download, grouped by header UIDs (never by folder names alone).

  ``map_fn(scan_file, paths)`` reads the headers; pass e.g. ``functools.partial(pool.map,
  chunksize=256)`` to read them in parallel. Returns ``{PatientID: PatientFiles}`` and the issues
  found on the way (corrupt files, unknown or duplicate visits, visits without a DCE series).
  """
  root = os.fspath(manual_dir)
  if not os.path.isdir(root):
    raise FileNotFoundError(f'manual_dir {root!r} does not exist; expected {LAYOUT}.')
  paths = _walk(root)
  if not paths:
    raise FileNotFoundError(f'manual_dir {root!r} is empty; expected {LAYOUT}.')
  studies = collections.defaultdict(dict)  # PatientID -> StudyInstanceUID -> _Study
  issues = []
  num_dicom = 0
  for path, header in zip(paths, map_fn(scan_file, paths)):
    if header is None:
      continue
    num_dicom += 1
    if isinstance(header, str):
      issues.append(Issue('', None, 'corrupt_file', f'{_relpath(path, root)}: {header}'))
      continue
    study = studies[header.patient_id].setdefault(header.study_uid, _Study())
    study.description = study.description or header.study_description
    study.timepoint = study.timepoint or header.timepoint
    series = study.series.setdefault(header.series_uid, _Series(
        header.modality, header.sop_class, header.series_description))
    series.files.append(path)
  if not num_dicom:
    raise ValueError(f'no DICOM file (DICM preamble) under {root!r}: found {_found(paths)};'
                     f' expected {LAYOUT}.')
  found = [s for by_study in studies.values() for study in by_study.values()
           for s in study.series.values()]
  if not any(_is_dce(s) for s in found):  # e.g. another collection's CT or MR series
    modalities = collections.Counter(
        s.modality if re.fullmatch(r'[A-Z0-9_ ]{1,16}', s.modality) else 'other' for s in found)
    unreadable = sum(i.reason == 'corrupt_file' for i in issues)
    raise ValueError(
        f'no DCE series under {root!r}: {num_dicom} DICOM files'
        + (f' ({unreadable} unreadable)' if unreadable else '') + f' in {len(found)} series ('
        + ', '.join(f'{m} {n}' for m, n in modalities.most_common()) + f') of {len(studies)}'
        f' patient(s), none an MR series described as "original DCE"; expected {LAYOUT}.')
  patients = {}
  for pid in sorted(studies):
    patients[pid], more = _patient_files(pid, studies[pid], root)
    issues.extend(more)
  return patients, issues


# ============================================================================= clinical sheet
def _find_xlsx(root: str, pattern: str) -> list[str]:
  found = []
  for dirpath, _, filenames in os.walk(root):
    found.extend(os.path.join(dirpath, f) for f in filenames
                 if fnmatch.fnmatch(f.lower(), pattern) and not f.startswith(('~$', '.')))
  return sorted(found)


def _header_key(value) -> str:
  return re.sub(r'[^a-z0-9]', '', _text(value).lower())


def _read_table(path: str, columns: Sequence[str]) -> list[tuple[int, dict]]:
  """Rows (1-based row number, {column: value}) of the first sheet with all ``columns`` in one of
  its first 10 rows (names compared case- and punctuation-insensitively).

  Only the requested columns are kept, so that nothing else (age, race, ...) leaves this function.
  """
  wanted = {c: _header_key(c) for c in columns}
  wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
  try:
    for ws in wb.worksheets:
      rows = ws.iter_rows(values_only=True)
      for number, row in enumerate(rows, start=1):
        keys = [_header_key(v) for v in row]
        if all(k in keys for k in wanted.values()):
          index = {c: keys.index(k) for c, k in wanted.items()}
          return [(n, {c: (r[i] if i < len(r) else None) for c, i in index.items()})
                  for n, r in enumerate(rows, start=number + 1)]
        if number >= 10:
          break
  finally:
    wb.close()
  raise ValueError(f'{os.path.basename(path)}: no sheet with the columns {list(columns)} in its'
                   ' first 10 rows')


def _binary(value) -> int | None:
  """1 / 0 from 1, 1.0, '1', 'Yes', 'Positive', ...; None when empty or unreadable."""
  if isinstance(value, (int, float)) and value in (0, 1):
    return int(value)
  word = _text(value).lower()
  if word in ('1', '1.0', 'yes', 'y', 'positive', 'pos', 'true'):
    return 1
  if word in ('0', '0.0', 'no', 'n', 'negative', 'neg', 'false'):
    return 0
  return None


def _subtype(hr: int | None, her2: int | None) -> int | None:
  if hr is None or her2 is None:
    return None
  name = f'HR{"+" if hr else "-"}/HER2{"+" if her2 else "-"}'
  return schema.SUBTYPES.index(name)


def _research_id(value) -> str:
  """'100899' from 100899, 100899.0, '100899', ' 100899.0 '; '' if not numeric."""
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  text = _text(value)
  m = re.fullmatch(r'(\d+)(?:\.0*)?', text)
  return m.group(1) if m else ''


def _id_candidates(value) -> tuple[str, ...]:
  """TCIA PatientIDs a sheet id may stand for: numeric id <-> `ISPY2-<id>`."""
  if numeric := _research_id(value):
    return numeric, f'ISPY2-{numeric}'
  text = _text(value)
  if m := re.fullmatch(r'ISPY2-(\d+)', text, re.IGNORECASE):
    return text, m.group(1)
  return (text,) if text else ()


def _merge(old: ClinicalRecord | None, new: ClinicalRecord) -> ClinicalRecord:
  if old is None:
    return new
  conflict = (old.pcr, old.subtype, old.arm) != (new.pcr, new.subtype, new.arm)
  return dataclasses.replace(old, duplicate=old.duplicate or new.duplicate or conflict,
                             rows=tuple(sorted(set(old.rows + new.rows))))


def read_clinical(manual_dir: str | os.PathLike) -> dict[str, ClinicalRecord]:
  """Labels keyed by every PatientID a row may stand for (full id, numeric id, ancillary id)."""
  root = os.fspath(manual_dir)
  sheets = _find_xlsx(root, _CLINICAL_GLOB)
  if len(sheets) > 1:
    sheets = [s for s in sheets if os.path.basename(s) == CLINICAL_FILE] or sheets
  if not sheets:
    raise FileNotFoundError(f'no clinical sheet under {root!r}: expected {CLINICAL_FILE} (any'
                            f' file matching {_CLINICAL_GLOB}, case-insensitive) with columns'
                            ' Patient_ID, Arm, HR, HER2, pCR.')
  if len(sheets) > 1:
    raise ValueError('several clinical sheets: ' + ', '.join(_relpath(s, root) for s in sheets))
  records: dict[str, ClinicalRecord] = {}
  for row, r in _read_table(sheets[0], ('Patient_ID', 'Arm', 'HR', 'HER2', 'pCR')):
    record = ClinicalRecord(pcr=_binary(r['pCR']), subtype=_subtype(_binary(r['HR']),
                            _binary(r['HER2'])), arm=_text(r['Arm']), rows=(row,))
    for key in _id_candidates(r['Patient_ID']):
      records[key] = _merge(records.get(key), record)
  for path in _find_xlsx(root, _ANCILLARY_GLOB):
    for _, r in _read_table(path, ('TCIA PATIENT ID', 'I-SPY 2 Research ID')):
      tcia_id, research = _text(r['TCIA PATIENT ID']), _research_id(r['I-SPY 2 Research ID'])
      if tcia_id and research in records:
        records[tcia_id] = _merge(records.get(tcia_id), records[research])
  return records


# ============================================================================= slices and phases
class PixelRef(NamedTuple):
  """Where a slice's stored pixels lie in its file (native little-endian data) and how to turn
  them into values, as pydicom's ``pixel_array`` and ``apply_rescale`` would."""

  offset: int
  dtype: str  # of the stored values: '<u2', '<i2', 'u1' or 'i1'
  bits_stored: int
  rescale: tuple[float, float] | None  # (RescaleSlope, RescaleIntercept) when both are present


class SliceHeader(NamedTuple):
  """Geometry and timing of one single-frame DCE slice (and, when read, where its pixels are)."""

  path: str
  position: tuple[float, float, float]  # ImagePositionPatient
  orientation: tuple[float, ...]  # ImageOrientationPatient (row direction, column direction)
  pixel_spacing: tuple[float, float]  # (between rows, between columns)
  shape: tuple[int, int]  # (Rows, Columns)
  temporal_position: int | None = None
  trigger_time_ms: float | None = None
  acquisition_time_s: float | None = None
  pixels: PixelRef | None = None  # None: pydicom decodes them (compressed, or not walked)


def _float(text: str) -> float | None:
  try:
    return float(text)
  except ValueError:
    return None


def _seconds(tm) -> float | None:
  """DICOM TM (HHMMSS.ffffff, or HH:MM:SS) as seconds after midnight."""
  text = _text(tm).replace(':', '')
  if not re.fullmatch(r'\d{2,6}(\.\d*)?', text):
    return None
  whole, _, frac = text.partition('.')
  whole = whole.ljust(6, '0')
  return int(whole[:2]) * 3600 + int(whole[2:4]) * 60 + float(f'{whole[4:6]}.{frac or 0}')


_SLICE_FIELDS = {'ImagePositionPatient': 'numbers', 'ImageOrientationPatient': 'numbers',
                 'PixelSpacing': 'numbers', 'Rows': 'us', 'Columns': 'us',
                 'TemporalPositionIdentifier': 'text', 'TriggerTime': 'text',
                 'AcquisitionTime': 'text', 'SamplesPerPixel': 'us', 'NumberOfFrames': 'text',
                 'BitsAllocated': 'us', 'BitsStored': 'us', 'PixelRepresentation': 'us',
                 'RescaleSlope': 'text', 'RescaleIntercept': 'text', 'ModalityLUTSequence': 'text'}


def _pixel_ref(values: dict, header: dicom_scan.Header | None, path: str) -> PixelRef | None:
  """Where the native pixels of a walked slice lie; None when pydicom must decode them (another
  transfer syntax, several frames or samples, a modality LUT). VisitError when the file ends before
  its pixel data does (a download cut short): checked for every slice, not only the phases used."""
  if header is None or header.pixel_offset is None or header.pixel_length is None:
    return None
  bits, stored, signed = (values[k] for k in ('BitsAllocated', 'BitsStored',
                                               'PixelRepresentation'))
  if (values['SamplesPerPixel'] not in (None, 1) or values['NumberOfFrames'] not in ('', '1')
      or header.values.get(pydicom.datadict.tag_for_keyword('ModalityLUTSequence')) is not None
      or bits not in (8, 16) or signed not in (0, 1) or not 0 < (stored or bits) <= bits):
    return None
  expected = values['Rows'] * values['Columns'] * bits // 8
  if header.pixel_length not in (expected, expected + 1):  # + 1: odd-length padding
    return None  # pydicom says what is wrong with it
  have = header.file_size - header.pixel_offset
  if have < expected:
    raise VisitError('corrupt_file', f'{_name(path)}: pixel data unreadable (PixelData cut short:'
                     f' the file holds {max(have, 0)} of its {expected} bytes)')
  slope, intercept = values['RescaleSlope'], values['RescaleIntercept']
  return PixelRef(header.pixel_offset, ('<' if bits == 16 else '') + 'ui'[signed] + str(bits // 8),
                  stored or bits, (float(slope), float(intercept)) if slope and intercept else None)


def read_slice_header(path: str) -> SliceHeader:
  """Header of one DCE slice, with where its pixels lie (not the pixels); VisitError if it is
  unreadable, has no geometry or is cut short."""
  try:
    values, header = _header_values(path, _SLICE_FIELDS, dicom_scan.PIXEL_DATA)
    if values is None:
      raise ValueError('not a DICOM file')
    ipp, iop, spacing = (values[k] for k in (
        'ImagePositionPatient', 'ImageOrientationPatient', 'PixelSpacing'))
    if ipp is None or iop is None or spacing is None or len(ipp) != 3 or len(iop) != 6:
      raise VisitError('missing_geometry', f'{_name(path)}: no ImagePositionPatient,'
                       ' ImageOrientationPatient or PixelSpacing')
    tpi = _float(values['TemporalPositionIdentifier'])
    return SliceHeader(
        path=path, position=ipp, orientation=iop, pixel_spacing=(spacing[0], spacing[1]),
        shape=(int(values['Rows']), int(values['Columns'])),
        temporal_position=None if tpi is None else int(tpi),
        trigger_time_ms=_float(values['TriggerTime']),
        acquisition_time_s=_seconds(values['AcquisitionTime']),
        pixels=_pixel_ref(values, header, path))
  except VisitError:
    raise
  except Exception as e:  # noqa: BLE001 -- a broken header makes the visit unusable
    raise VisitError('corrupt_file', f'{_name(path)}: header unreadable ({type(e).__name__})')


def split_phases(slices: Sequence[SliceHeader]) -> tuple[list[list[SliceHeader]], str]:
  """Slices per temporal phase, in acquisition order, and the attribute that split them.

  The first of TemporalPositionIdentifier, TriggerTime and AcquisitionTime that every slice has
  and that takes more than one value (GE writes one AcquisitionTime for the whole series, Philips
  TriggerTime 0 on every slice); else one phase.
  """
  present = [(field, name) for field, name in (
      ('temporal_position', 'TemporalPositionIdentifier'), ('trigger_time_ms', 'TriggerTime'),
      ('acquisition_time_s', 'AcquisitionTime'))
             if slices and all(getattr(s, field) is not None for s in slices)]
  for field, name in present:
    groups = collections.defaultdict(list)
    for s in slices:
      groups[round(getattr(s, field), 3)].append(s)
    if len(groups) > 1:
      return [groups[k] for k in sorted(groups)], name
  return [list(slices)], present[0][1] if present else 'none'


def phase_times(phases: Sequence[Sequence[SliceHeader]]) -> np.ndarray:
  """Seconds after the first (pre-contrast) phase: from TriggerTime, else AcquisitionTime, the first
  that every slice has and that differs between the phases (see `split_phases`)."""
  for field, scale in (('trigger_time_ms', 1e-3), ('acquisition_time_s', 1.0)):
    if all(getattr(s, field) is not None for p in phases for s in p):
      starts = np.array([min(getattr(s, field) for s in p) for p in phases], np.float64) * scale
      if len(phases) > 1 and np.all(starts == starts[0]):
        continue
      times = starts - starts[0]
      if field == 'acquisition_time_s':
        times[times < 0] += 86400.0  # acquisition across midnight
      return times
  raise VisitError('no_phase_times', 'DCE slices have no TriggerTime or AcquisitionTime that'
                   ' differs between phases')


def choose_phases(times: Sequence[float], early_s: float = 150.0,
                  late_s: float = 450.0) -> tuple[int, int, int]:
  """(pre, early, late): the first phase, and the post-contrast phases closest to early_s and
  late_s (ties: the earlier). Early and late may coincide when one phase is closest to both."""
  post = range(1, len(times))

  def closest(target):
    return min(post, key=lambda i: (abs(times[i] - target), times[i]))

  return 0, closest(early_s), closest(late_s)


def _axes(orientation: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Orthonormal row direction, column direction and slice normal from an IOP."""
  row = np.asarray(orientation[:3], np.float64)
  row /= np.linalg.norm(row)
  col = np.asarray(orientation[3:], np.float64)
  col -= row * (row @ col)
  col /= np.linalg.norm(col)
  return row, col, np.cross(row, col)


def sort_slices(slices: Sequence[SliceHeader]) -> tuple[list[SliceHeader], float]:
  """One stack's slices (a phase, or a mask's frames) sorted along the normal (never by file order
  or InstanceNumber), and the slice spacing (median step); a step > 1.5 x the median is a missing
  slice."""
  first = slices[0]
  if any(s.shape != first.shape or not np.allclose(s.orientation, first.orientation, atol=1e-3)
         or not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=1e-3) for s in slices):
    raise VisitError('inconsistent_geometry',
                     'slices of a stack differ in orientation, pixel spacing or matrix size')
  if len(slices) < 2:
    raise VisitError('missing_slices', 'a stack of a single slice')
  normal = _axes(first.orientation)[2]
  depth = np.array([np.dot(s.position, normal) for s in slices])
  order = np.argsort(depth, kind='stable')
  steps = np.diff(depth[order])
  if steps.min() < 1e-3:
    raise VisitError('duplicate_slices', f'{int(np.sum(steps < 1e-3))} slice positions occur twice'
                     ' within a stack')
  spacing = float(np.median(steps))
  if steps.max() > 1.5 * spacing:
    raise VisitError('missing_slices', f'gap of {steps.max():.2f} mm between slices spaced'
                     f' {spacing:.2f} mm')
  return [slices[i] for i in order], spacing


def check_phases(phases: Sequence[Sequence[SliceHeader]]) -> tuple[list[list[SliceHeader]], float]:
  """Sorted slices per phase; every phase must hold the same slice positions, >= 3 phases."""
  if len(phases) < 3:
    raise VisitError('missing_phases', f'{len(phases)} temporal phase(s); at least 3 needed')
  counts = [len(p) for p in phases]
  if min(counts) != max(counts):
    short = counts.index(min(counts))
    raise VisitError('missing_slices', f'phase {short} has {min(counts)} slices, others up to'
                     f' {max(counts)}')
  stacks = [sort_slices(p) for p in phases]
  reference = np.array([s.position for s in stacks[0][0]])
  for i, (stack, _) in enumerate(stacks[1:], start=1):
    if not np.allclose(np.array([s.position for s in stack]), reference, atol=0.01):
      raise VisitError('missing_slices', f'phase {i} slice positions differ from phase 0')
  return [stack for stack, _ in stacks], stacks[0][1]


def _read_pixels(header: SliceHeader) -> np.ndarray:
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
      if ref.bits_stored < bits:  # the unused high bits: cleared, or the sign extended
        shift = bits - ref.bits_stored
        stored = (stored << shift) >> shift if stored.dtype.kind == 'i' else (
            stored & ((1 << ref.bits_stored) - 1))
      if ref.rescale is None:
        return stored.astype(np.float32)
      return (stored * ref.rescale[0] + ref.rescale[1]).astype(np.float32)
    with _quiet():
      ds = pydicom.dcmread(header.path)
      pixels = pydicom.pixels.apply_rescale(ds.pixel_array, ds)
  except Exception as e:  # noqa: BLE001 -- truncated or damaged pixel data
    raise VisitError('corrupt_file',
                     f'{_name(header.path)}: pixel data unreadable ({type(e).__name__})')
  if pixels.shape != header.shape:
    raise VisitError('corrupt_file', f'{_name(header.path)}: pixel matrix {pixels.shape} !='
                     f' Rows x Columns {header.shape}')
  return pixels.astype(np.float32)


def load_volume(stack: Sequence[SliceHeader], slice_spacing: float) -> sitk.Image:
  """One phase as a SimpleITK image in LPS (see `_stack_image`), filled slice by slice."""
  array = np.empty((len(stack),) + stack[0].shape, np.float32)
  for k, s in enumerate(stack):
    array[k] = _read_pixels(s)
  return _stack_image(array, stack, slice_spacing)


def _stack_image(array: np.ndarray | None, stack: Sequence[SliceHeader],
                 slice_spacing: float) -> sitk.Image:
  """[slice, row, column] pixels of a sorted stack as an LPS image: origin = first IPP,
  direction (row, column, normal); without ``array``, an image of bytes with that geometry."""
  row, col, normal = _axes(stack[0].orientation)
  image = sitk.GetImageFromArray(array) if array is not None else sitk.Image(
      [stack[0].shape[1], stack[0].shape[0], len(stack)], sitk.sitkUInt8)
  image.SetOrigin(stack[0].position)
  image.SetSpacing((stack[0].pixel_spacing[1], stack[0].pixel_spacing[0], slice_spacing))
  image.SetDirection(np.column_stack([row, col, normal]).ravel().tolist())
  return image


# ============================================================================= grids
class Grid(NamedTuple):
  """An axis-aligned (identity direction) LPS grid, in SimpleITK's x, y, z order."""

  origin: tuple[float, float, float]
  spacing: tuple[float, float, float]
  size: tuple[int, int, int]

  def to_physical(self, index_zyx: np.ndarray) -> np.ndarray:
    """Physical x, y, z of a numpy [z, y, x] index (fractional allowed)."""
    return np.asarray(self.origin) + np.asarray(index_zyx, np.float64)[::-1] * self.spacing

  def to_index(self, point_xyz: np.ndarray) -> np.ndarray:
    """Fractional numpy [z, y, x] index of a physical point."""
    return ((np.asarray(point_xyz, np.float64) - self.origin) / self.spacing)[::-1]


def target_grid(image: sitk.Image, spacing_dhw: Sequence[float]) -> Grid:
  """The axis-aligned grid covering an image's voxel centres at spacing (D, H, W)."""
  size = np.array(image.GetSize())
  corners = np.array([image.TransformContinuousIndexToPhysicalPoint(
      (size - 1) * np.array(c, np.float64)) for c in np.ndindex(2, 2, 2)])
  low, high = corners.min(0), corners.max(0)
  spacing = np.asarray(spacing_dhw, np.float64)[::-1]
  count = np.ceil((high - low) / spacing - 1e-6).astype(int) + 1
  return Grid(tuple(low.tolist()), tuple(spacing.tolist()), tuple(count.tolist()))


def resample(image: sitk.Image, grid: Grid, interpolator=sitk.sitkLinear,
             pixel_type=sitk.sitkFloat32) -> np.ndarray:
  """``image`` on ``grid`` as a numpy [z, y, x] array; zeros outside the image."""
  out = sitk.Resample(image, [int(n) for n in grid.size], sitk.Transform(), interpolator,
                      grid.origin, grid.spacing, (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), 0, pixel_type)
  return sitk.GetArrayFromImage(out)


# ============================================================================= Analysis Mask
class MaskError(_CodedError):
  """An Analysis Mask that cannot be used: the visit falls back to PE >= 70 %."""


class AnalysisMask(NamedTuple):
  """A decoded Analysis Mask on its own geometry (its slab may be wider than the DCE series)."""

  form: str  # 'bitflags' (the collection's own form) or 'seg' (a standard BINARY SEG)
  codes: sitk.Image  # uint8: 0 outside the slab, then _FTV, _IN_VOI or _OUTSIDE_VOI
  ftv_mm3: float  # the FTV at the mask's own resolution: the volume I-SPY reports


# Voxel codes of a decoded mask. The record's `tumor_mask` (schema.features) keeps the first two
# (schema.TUMOUR = _FTV, schema.VOI = _IN_VOI) and writes the rest as 0.
_FTV, _IN_VOI, _OUTSIDE_VOI = schema.TUMOUR, schema.VOI, 3
MASK_SOURCES = ('analysis_mask_bitflags', 'analysis_mask_seg', 'pe70_in_voi', 'pe70')
# The bit-flag form: each voxel is an OR of exclusion bits, 0 = in the FTV; a mask's private Mask
# Legend names them, else these documented meanings hold.
MASK_LEGEND_TAG = (0x0117, 0x10D3)
DOCUMENTED_BITS = {1: 'PE threshold', 2: 'SER / minimum-neighbour filter',
                   16: 'background threshold', 32: 'manual VOI'}
_VOI_BIT = 32
_LEGEND_RE = re.compile(r'\s*([01]{8})\s*\(\s*(\d+)\s*\)\s*:\s*(.*?)\s*')
_SEGMENTATION_TYPES = ('BINARY', 'FRACTIONAL', 'LABELMAP')


def _legend(ds: pydicom.Dataset, name: str) -> dict[int, str]:
  """{bit value: meaning} of the Mask Legend (0117,10D3); {} without one."""
  element = ds.get(MASK_LEGEND_TAG)
  if element is None:
    return {}
  value = element.value
  if isinstance(value, bytes):  # VR UN: an implicit-VR file, or a dictionary without the tag
    value = value.decode('latin-1').rstrip('\0 ').split('\\')
  legend = {}
  for n, entry in enumerate([value] if isinstance(value, str) else list(value), start=1):
    m = _LEGEND_RE.fullmatch(str(entry))
    if not m or int(m.group(1), 2) != int(m.group(2)):
      raise MaskError('mask_unrecognised', f'{name}: Mask Legend entry {n} is not "<8 binary'
                      ' digits> (<value>) : <meaning>"')
    legend[int(m.group(2))] = m.group(3)
  return legend


def _frame_stack(ds: pydicom.Dataset, name: str) -> list[SliceHeader]:
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
    raise MaskError('mask_unrecognised', f'{name}: {len(frames)} per-frame functional groups for'
                    f' {int(ds.get("NumberOfFrames") or 1)} frames')
  headers = []
  for n, group in enumerate(frames):
    ipp, iop, spacing = (attribute(group, *where) for where in (
        ('PlanePositionSequence', 'ImagePositionPatient'),
        ('PlaneOrientationSequence', 'ImageOrientationPatient'),
        ('PixelMeasuresSequence', 'PixelSpacing')))
    if ipp is None or iop is None or spacing is None or len(ipp) != 3 or len(iop) != 6:
      raise MaskError('mask_unrecognised', f'{name}: frame {n + 1} has no ImagePositionPatient,'
                      ' ImageOrientationPatient or PixelSpacing')
    headers.append(SliceHeader(path=str(n), position=tuple(map(float, ipp)),
                               orientation=tuple(map(float, iop)),
                               pixel_spacing=(float(spacing[0]), float(spacing[1])),
                               shape=(int(ds.Rows), int(ds.Columns))))
  return headers


def _bitflag_mask(ds: pydicom.Dataset, name: str) -> AnalysisMask:
  """The collection's form, from pydicom: 8-bit frames of exclusion bits placed by their
  functional groups (any order); meanings from the Mask Legend where present."""
  legend = _legend(ds, name)
  known = functools.reduce(operator.or_, {**DOCUMENTED_BITS, **legend})
  # The VOI bit is the one the legend names so; without such an entry, the documented bit 32.
  voi_bit = functools.reduce(operator.or_, [b for b, m in legend.items() if 'voi' in m.lower()],
                             0) or _VOI_BIT
  stack = _frame_stack(ds, name)
  values = ds.pixel_array.reshape((len(stack),) + stack[0].shape)
  found = np.flatnonzero(np.bincount(values.ravel(), minlength=256))
  unexplained = [f'0x{v:02x}' for v in found.tolist() if v & ~known]
  if unexplained:
    raise MaskError('mask_unrecognised', f'{name}: 8-bit values {", ".join(unexplained[:8])}'
                    f' are not made of the bits of its Mask Legend or the documented ones'
                    f' ({", ".join(map(str, sorted({**DOCUMENTED_BITS, **legend})))})')
  codes = np.full(values.shape, _IN_VOI, np.uint8)  # uint8 throughout: 50 M voxels bi-laterally
  codes[(values & voi_bit) != 0] = _OUTSIDE_VOI
  codes[values == 0] = _FTV
  return _mask_from_frames('bitflags', codes, stack, name)


def _mask_from_frames(form: str, codes: np.ndarray, frames: Sequence[SliceHeader],
                      name: str) -> AnalysisMask:
  """Decoded codes [frame, row, column] placed by their frames' headers, as the DCE slices are."""
  try:
    stack, spacing = sort_slices(frames)
  except VisitError as e:
    raise MaskError('mask_geometry', f'{name}: its frames: {e.detail}') from None
  image = _stack_image(codes[[int(s.path) for s in stack]], stack, spacing)
  voxel_mm3 = float(np.prod(image.GetSpacing()))
  return AnalysisMask(form, image, float((codes == _FTV).sum()) * voxel_mm3)


def _binary_seg_mask(ds: pydicom.Dataset, name: str) -> AnalysisMask:
  """The standard form, from highdicom: segments are exclusion reasons, the one whose label names
  the VOI marks voxels outside it; a voxel of the slab in no segment is in the FTV."""
  seg = highdicom.seg.Segmentation.from_dataset(ds, copy=False)
  volume = seg.get_volume(combine_segments=False)
  excluded = np.asarray(volume.array).reshape(volume.array.shape[:3] + (-1,)) >= 0.5
  labels = [seg.get_segment_description(n).segment_label for n in seg.segment_numbers]
  outside_voi = excluded[..., ['voi' in label.lower() for label in labels]].any(-1)
  codes = np.where(~excluded.any(-1), _FTV, np.where(outside_voi, _OUTSIDE_VOI, _IN_VOI))
  image = sitk.GetImageFromArray(codes.astype(np.uint8))  # [slice, row, column]
  steps = volume.affine[:3, :3][:, ::-1]  # columns: steps along column, row, slice
  spacing = np.linalg.norm(steps, axis=0)
  image.SetSpacing(spacing.tolist())
  image.SetDirection((steps / spacing).ravel().tolist())
  image.SetOrigin(volume.affine[:3, 3].tolist())
  return AnalysisMask('seg', image, float((codes == _FTV).sum() * np.prod(spacing)))


def read_analysis_mask(path: str) -> AnalysisMask:
  """Either form of an Analysis Mask, on its own geometry; MaskError says why it cannot be used.

  8-bit frames are the collection's own form (SEG SOP class, invalid as a SEG): a voxel is in
  the FTV when its value is 0 and in the radiologist's VOI when the VOI bit is clear. 1-bit frames
  of a BINARY SEG are the standard form. A mask that flags no voxel as outside the VOI (a SEG
  without a VOI segment) has its whole slab as VOI.
  """
  name = _name(path)
  try:
    with _quiet():
      ds = pydicom.dcmread(path)
  except Exception as e:  # noqa: BLE001 -- not DICOM, or a damaged header
    raise MaskError('mask_unreadable', f'{name}: {type(e).__name__}') from None
  bits, kind = ds.get('BitsAllocated'), _text(ds.get('SegmentationType'))
  try:
    with _quiet():
      if bits == 8:
        return _bitflag_mask(ds, name)
      if bits == 1 and kind == 'BINARY':
        return _binary_seg_mask(ds, name)
  except MaskError:
    raise
  except Exception as e:  # noqa: BLE001 -- truncated pixel data, broken functional groups
    raise MaskError('mask_unreadable', f'{name}: {type(e).__name__} while decoding') from None
  found = [f'BitsAllocated {bits}' if bits is not None else 'no BitsAllocated',
           kind if kind in _SEGMENTATION_TYPES else
           ('another SegmentationType' if kind else 'no SegmentationType')]
  raise MaskError('mask_unrecognised', f'{name}: neither the I-SPY2 bit-flag form (8-bit frames)'
                  f' nor a BINARY SEG (1-bit frames): {", ".join(found)}')


def mask_codes(mask: AnalysisMask, grid: Grid) -> np.ndarray:
  """The decoded mask on ``grid`` by geometry (nearest neighbour; 0 outside its slab)."""
  return resample(mask.codes, grid, sitk.sitkNearestNeighbor, sitk.sitkUInt8)


# ============================================================================= tumour mask
def _largest_component(mask: np.ndarray) -> np.ndarray:
  labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))  # 26-connected
  if count == 0:
    return mask
  return labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))


def pe70_mask(pre: np.ndarray, early: np.ndarray, background: float,
              region: np.ndarray | None = None) -> np.ndarray:
  """Largest 26-connected component of PE >= 70 % among voxels with S_pre >= background (and in
  ``region`` when given)."""
  valid = (pre >= background) & (pre > 0)
  if region is not None:
    valid &= region
  pe = 100.0 * (early - pre) / np.where(valid, pre, 1.0)
  return _largest_component(valid & (pe >= 70.0))


def grown_box(mask: np.ndarray, grid: Grid, margin_mm: float) -> np.ndarray:
  """The bounding box of ``mask`` grown by ``margin_mm`` per side (clipped to the grid)."""
  voxels = np.argwhere(mask)
  box = np.zeros(mask.shape, bool)
  if len(voxels):
    pad = np.ceil(margin_mm / np.asarray(grid.spacing[::-1])).astype(int)
    lo = np.maximum(voxels.min(0) - pad, 0)
    hi = np.minimum(voxels.max(0) + pad + 1, mask.shape)
    box[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
  return box


def centroid_mm(mask: np.ndarray, grid: Grid) -> np.ndarray | None:
  """Physical (x, y, z) centroid of a mask on ``grid``; None when it is empty."""
  if not mask.any():
    return None
  return grid.to_physical(np.argwhere(mask).mean(0))


def _window(size_zyx: Sequence[int], grid: Grid, centre_xyz: np.ndarray,
            shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
  """(the [z, y, x] slices of an array of ``size_zyx`` on ``grid``, the window's) of the
  ``shape`` window nearest to centred on ``centre_xyz`` (within half a voxel); None when it
  misses the array."""
  start = np.round(grid.to_index(centre_xyz) - (np.asarray(shape) - 1) / 2.0).astype(int)
  src, dst = [], []
  for s, n, size in zip(start, shape, size_zyx):
    lo, hi = max(s, 0), min(s + n, size)
    if hi <= lo:
      return None
    src.append(slice(lo, hi))
    dst.append(slice(lo - s, hi - s))
  return tuple(src), tuple(dst)


def crop(array: np.ndarray, grid: Grid, centre_xyz: np.ndarray,
         shape: Sequence[int]) -> np.ndarray:
  """The [D, H, W] window of ``shape`` voxels of ``grid`` nearest to centred on ``centre_xyz``
  (within half a voxel), zero-padded outside ``array`` (its last three axes)."""
  out = np.zeros(array.shape[:-3] + tuple(shape), array.dtype)
  if window := _window(array.shape[-3:], grid, centre_xyz, shape):
    out[(..., *window[1])] = array[(..., *window[0])]
  return out


def resample_crop(image: sitk.Image, grid: Grid, centre_xyz: np.ndarray,
                  shape: Sequence[int]) -> np.ndarray:
  """``crop(resample(image, grid), grid, centre_xyz, shape)``, resampling only the window's
  voxels (a real-size field of view has ten times as many)."""
  out = np.zeros(tuple(shape), np.float32)
  if window := _window(grid.size[::-1], grid, centre_xyz, shape):
    src, dst = window
    out[dst] = resample(image, Grid(tuple(grid.to_physical([s.start for s in src]).tolist()),
                                    grid.spacing, tuple(s.stop - s.start for s in src[::-1])))
  return out


# ============================================================================= one patient
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

  grid: Grid
  centre: np.ndarray  # the crop's centre, LPS mm
  empty_t0: str | None  # at T0 without a tumour voxel: what the crop was centred on
  images: np.ndarray  # float32 [3, *crop_shape]
  codes: np.ndarray  # uint8 [z, y, x]: the record's tumor_mask codes (schema.TUMOUR, schema.VOI, 0)
  voi: np.ndarray | None  # bool [z, y, x]: the VOI used (the visit's mask's, or carried over)
  voi_image: sitk.Image | None  # the VOI of the visit's own mask, to carry to later visits
  mask_source: str  # one of MASK_SOURCES
  mask_ftv_mm3: float | None  # the mask's own FTV (None without a mask)
  phases: tuple[int, int, int]
  times: np.ndarray  # [3]
  num_phases: int
  phase_source: str
  issues: list[tuple[str, str]]


def _analysis_mask_tumour(seg: str | None, grid: Grid,
                          timer: StageTimer) -> tuple[dict | None, list[tuple[str, str]]]:
  """The visit's tumour from its Analysis Mask (the fields of `_Visit` after ``codes``): the FTV
  inside the mask's VOI; None when there is no usable mask (the issues say why)."""
  if seg is None:
    return None, []
  try:
    with timer('mask'):
      mask = read_analysis_mask(seg)
  except MaskError as e:  # an unusable mask falls back to PE >= 70 %
    return None, [(e.reason, f'{e.detail}; using PE >= 70 %')]
  with timer('resample'):
    codes = mask_codes(mask, grid)
  voi = (codes == _FTV) | (codes == _IN_VOI)
  if not voi.any():
    return None, [('mask_outside_image', f'{_name(seg)}: its VOI does not overlap the DCE series;'
                   ' using PE >= 70 %')]
  return dict(codes=np.where(voi, codes, 0).astype(np.uint8), voi=voi,
              voi_image=sitk.BinaryThreshold(mask.codes, _FTV, _IN_VOI, 1, 0),
              mask_source=f'analysis_mask_{mask.form}', mask_ftv_mm3=mask.ftv_mm3), []


def _pe70_tumour(grid: Grid, images: np.ndarray, background: float, carried: sitk.Image | None,
                 spec: TciaSpec, timer: StageTimer) -> dict:
  """Without a usable Analysis Mask: PE >= 70 % inside the VOI carried over from an earlier
  visit (its box grown by ``spec.voi_margin_mm``: the patient is repositioned between visits),
  else over the field of view (``images``: pre and early on the full grid)."""
  voi = None
  with timer('mask'):
    if carried is not None:
      voi = grown_box(resample(carried, grid, sitk.sitkNearestNeighbor, sitk.sitkUInt8) > 0,
                      grid, spec.voi_margin_mm)
      voi = voi if voi.any() else None  # the carried VOI misses this visit's field of view
    codes = pe70_mask(images[0], images[1], background, voi).astype(np.uint8)
  return dict(codes=codes, voi=voi, voi_image=None,
              mask_source='pe70' if voi is None else 'pe70_in_voi', mask_ftv_mm3=None)


def _load_visit(files: VisitFiles, spec: TciaSpec, carried: sitk.Image | None, timer: StageTimer,
                centre_of: Callable[[np.ndarray, np.ndarray | None, Grid],
                                    tuple[np.ndarray, str | None]]) -> _Visit:
  """Headers -> phases -> target grid -> tumour -> crop of pre/early/late (VisitError if bad).

  Every file's header is read once (with where its pixels lie); only the three phases used are
  read, one at a time. The target grid is the series' geometry's, and the Analysis Mask is read
  before any phase (a bi-lateral mask and phase are 50 M voxels each). With a usable mask the
  tumour, and so the crop, is known from the grid alone, and each phase is resampled in the crop
  only; without one, PE >= 70 % needs the pre and early phases over the whole field of view.
  ``centre_of(codes, voi, grid)`` gives the crop's centre (`_crop_centre`).
  """
  with timer('headers'):
    phases, phase_source = split_phases([read_slice_header(p) for p in files.dce])
    stacks, slice_spacing = check_phases(phases)
    times = phase_times(stacks)
    chosen = choose_phases(times, spec.early_s, spec.late_s)
  with timer('resample'):
    grid = target_grid(_stack_image(None, stacks[0], slice_spacing), spec.target_spacing_mm)
  tumour, issues = _analysis_mask_tumour(files.seg, grid, timer)
  shape = tuple(spec.crop_shape)
  centre = empty_t0 = background = None
  if tumour is not None:
    with timer('crop'):
      centre, empty_t0 = centre_of(tumour['codes'], tumour['voi'], grid)
  cropped = {}
  for i in sorted(set(chosen)):  # the pre phase first: it sets the background threshold
    with timer('pixels'):
      volume = load_volume(stacks[i], slice_spacing)
    with timer('resample'):
      if background is None:
        background = 0.6 * float(np.percentile(sitk.GetArrayViewFromImage(volume), 95))
      cropped[i] = (resample_crop(volume, grid, centre, shape) if centre is not None
                    else resample(volume, grid))
    del volume
  if tumour is None:
    tumour = _pe70_tumour(grid, [cropped[i] for i in chosen[:2]], background, carried, spec, timer)
    with timer('crop'):
      centre, empty_t0 = centre_of(tumour['codes'], tumour['voi'], grid)
      cropped = {i: crop(full, grid, centre, shape) for i, full in cropped.items()}
  return _Visit(grid=grid, centre=centre, empty_t0=empty_t0,
                images=np.stack([cropped[i] for i in chosen]), phases=chosen,
                times=times[list(chosen)], num_phases=len(stacks), phase_source=phase_source,
                issues=issues, **tumour)


def _check_labels(pid: str, clinical: ClinicalRecord | None) -> ClinicalRecord:
  rows = '' if clinical is None else ', '.join(map(str, clinical.rows))
  if clinical is None:
    raise Skip('not_in_clinical_sheet', f'{pid} has no row in the clinical sheet')
  if clinical.duplicate:
    raise Skip('duplicate_clinical_id', f'{pid}: conflicting clinical rows {rows}')
  if clinical.pcr is None:
    raise Skip('no_pcr_label', f'{pid}: empty or unreadable pCR (row {rows})')
  if clinical.subtype is None:
    raise Skip('no_subtype', f'{pid}: empty or unreadable HR or HER2 (row {rows})')
  return clinical


def _visit_or_issue(pid: str, v: int, files: VisitFiles | None, spec: TciaSpec,
                    carried: sitk.Image | None, issues: list[Issue], timer: StageTimer,
                    t0_centre: np.ndarray | None) -> _Visit | None:
  """The visit, or None with an issue recorded; at T0 a failure skips the patient instead."""
  if files is None:
    if v == 0:
      raise Skip('no_t0', f'{pid}: no T0 study with a DCE series')
    return None  # discover reported why (no study, unknown visit, no DCE series)
  try:
    visit = _load_visit(files, spec, carried, timer, functools.partial(
        _crop_centre, v, t0_centre=t0_centre))
  except Exception as e:  # noqa: BLE001 -- a failing visit is missing, not a failed build
    if not isinstance(e, VisitError):
      e = VisitError('visit_error', f'{type(e).__name__}: {_masked(str(e))[:160]}')
    if v == 0:
      raise Skip('no_t0', f'{pid}: T0 {e.reason}: {e.detail}') from None
    issues.append(Issue(pid, v, e.reason, e.detail))
    return None
  issues.extend(Issue(pid, v, reason, detail) for reason, detail in visit.issues)
  if visit.empty_t0:
    issues.append(Issue(pid, 0, 'empty_t0_mask',
                        f'no tumour voxel at T0; crop centred on {visit.empty_t0}'))
  return visit


def _crop_centre(v: int, codes: np.ndarray, voi: np.ndarray | None, grid: Grid, *,
                 t0_centre: np.ndarray | None) -> tuple[np.ndarray, str | None]:
  """The tumour's centroid; if empty (a complete response), the VOI's; without a VOI the T0
  crop centre (T0 itself: the image centre). And, at T0 without a tumour voxel, what it is."""
  centre = centroid_mm(codes == schema.TUMOUR, grid)
  if centre is not None:
    return centre, None
  voi = None if voi is None else centroid_mm(voi, grid)
  empty_t0 = ('its VOI' if voi is not None else 'the image') if v == 0 else None
  if voi is not None:
    return voi, empty_t0
  if v > 0:
    return t0_centre, None
  return grid.to_physical((np.asarray(grid.size[::-1]) - 1) / 2.0), empty_t0


_META_KEYS = ('mask_source', 'phase_indices', 'phase_times_s', 'num_phases', 'phase_source',
              'laterality', 'ftv_mm3', 'mask_ftv_mm3', 'crop_centre_mm', 'notes')


def _visit_meta(visit: _Visit, files: VisitFiles, centre: np.ndarray) -> dict:
  """Build-report facts of one visit (JSON-ready; codes and numbers only, no header text)."""
  voxel_mm3 = float(np.prod(visit.grid.spacing))
  return {
      'mask_source': visit.mask_source,
      'phase_indices': [int(i) for i in visit.phases],
      'phase_times_s': [round(float(t), 3) for t in visit.times],
      'num_phases': visit.num_phases,
      'phase_source': visit.phase_source,
      'laterality': files.laterality,
      'ftv_mm3': round(float((visit.codes == schema.TUMOUR).sum() * voxel_mm3), 1),
      'mask_ftv_mm3': None if visit.mask_ftv_mm3 is None else round(visit.mask_ftv_mm3, 1),
      'crop_centre_mm': [round(float(c), 2) for c in centre],
      'notes': list(files.notes),
  }


def read_images(patient: PatientFiles, spec: TciaSpec = TciaSpec(),
                visits: Sequence[int] = tuple(range(schema.NUM_VISITS))) -> tuple[dict, list[Issue], dict]:
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
  issues: list[Issue] = []
  t0_centre = carried = None
  timer = StageTimer()
  for v, files in enumerate(patient.visits):
    if v not in visits:
      continue
    visit = _visit_or_issue(pid, v, files, spec, carried, issues, timer, t0_centre)
    if visit is None:
      continue
    carried = visit.voi_image if visit.voi_image is not None else carried
    centre = visit.centre
    t0_centre = centre if v == 0 else t0_centre
    with timer('crop'):
      images[v] = np.clip(visit.images, -_FLOAT16_MAX, _FLOAT16_MAX).astype(np.float16)
      masks[v] = crop(visit.codes, visit.grid, centre, shape)
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


def process_patient(patient: PatientFiles, clinical: ClinicalRecord | None,
                    spec: TciaSpec = TciaSpec()) -> tuple[dict, list[Issue], dict]:
  """(example, issues, metadata) of one patient; raises Skip when it cannot be written.

  `read_images` of every visit, with the clinical sheet's labels (required: a patient without a
  pCR label or a subtype is skipped).
  """
  labels = _check_labels(patient.patient_id, clinical)
  arrays, issues, meta = read_images(patient, spec)
  example = {'patient_id': patient.patient_id, **arrays, 'pcr': int(labels.pcr),
             'subtype': int(labels.subtype), 'arm': labels.arm}
  return example, issues, meta
