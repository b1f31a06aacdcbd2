"""Discovery: the patients and visits of a download, grouped by DICOM headers, and the files each
visit is read from.

:func:`discover` reads every file's header once (`scan_file`, mappable over a process pool), groups
the files into patients, studies and series by their UIDs (never by folder names alone), gives each
study its visit (T0..T3) and picks per visit the DCE series and the Analysis Mask (SEG SOP class).
`tfds_ispy2.download` selects what to fetch by the same rules (`study_visit`, `is_dce`, `is_mask`).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from tfds_ispy2.ispy2 import schema
from tfds_ispy2.ispy2.tcia import clinical_sheet, errors, headers

SEG_SOP_CLASS = '1.2.840.10008.5.1.4.1.1.66.4'
# Both trees a user may have: what the NBIA Data Retriever writes from TCIA, and what
# `python -m tfds_ispy2.download` (idc-index) writes from IDC.
LAYOUT = (
    '<manual_dir>/<collection, e.g. ISPY2>/<PatientID>/<study folder>/<series folder>/*.dcm'
    ' (the NBIA/TCIA downloader layout) or <manual_dir>/<collection>/<PatientID>/'
    '<StudyInstanceUID>/<Modality>_<SeriesInstanceUID>/*.dcm (the idc-index layout of'
    f' python -m tfds_ispy2.download), and the clinical sheet {clinical_sheet.CLINICAL_FILE}'
)

# `MRI T0`, `ISPY2_MRI_T1`, `ISPY2MRIT2`, `...6698ISPY2MRIT3...`; the contract's `\b` after the
# digit is relaxed to "no letter or digit" so that `ISPY2_MRI_T0_x` also matches.
_VISIT_RE = re.compile(r'MRI[\s_-]*T([0-3])(?![0-9a-z])', re.IGNORECASE)
_TIMEPOINT_RE = re.compile(r'T?([0-3])', re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class VisitFiles:
  """The files chosen for one visit: DCE slices (all phases), optional Analysis Mask SEG."""

  dce: tuple[str, ...]
  seg: str | None = None
  laterality: str = (
      ''  # 'uni-lateral', 'bi-lateral' or '' (DCE series description)
  )
  notes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class PatientFiles:
  """One patient's usable visits (index 0..3 = T0..T3; None = missing) as found by discover."""

  patient_id: str
  visits: tuple[VisitFiles | None, ...]


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
class Series:
  """One series of a study: what discovery recognises it by, and its files."""

  modality: str
  sop_class: str
  description: str
  files: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Study:
  """One study of a patient: what its visit is read from, and its series by SeriesInstanceUID."""

  description: str = ''
  timepoint: str = ''
  series: dict[str, Series] = dataclasses.field(default_factory=dict)


_FILE_FIELDS = (
    'PatientID',
    'StudyInstanceUID',
    'SeriesInstanceUID',
    'Modality',
    'SOPClassUID',
    'StudyDescription',
    'SeriesDescription',
    'ClinicalTrialTimePointID',
)


def scan_file(path: str) -> FileHeader | str | None:
  """Header summary of one file; None if it is not DICOM (no DICM preamble); else an error name.

  Top-level and picklable so that a builder can map it over a process pool (see `discover`).
  """
  try:
    # SeriesInstanceUID (0020,000E): the last attribute needed.
    values, _ = headers.header_values(
        path, dict.fromkeys(_FILE_FIELDS, 'text'), 0x0020000E
    )
  except Exception as e:  # noqa: BLE001 -- any parse failure is a corrupt file, reported by name
    return type(e).__name__
  if values is None:
    return None
  header = FileHeader(*(values[k] for k in _FILE_FIELDS))
  if not (header.patient_id and header.study_uid and header.series_uid):
    return 'incomplete header (no PatientID, StudyInstanceUID or SeriesInstanceUID)'
  return header


def study_visit(
    description: str, timepoint: str = '', folders: Iterable[str] = ()
) -> tuple[int | None, str]:
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


def is_dce(s: Series) -> bool:
  """An "original DCE" MR series: the reader's rule, which `tfds_ispy2.download` selects by."""
  return s.modality == 'MR' and 'original dce' in _words(s.description)


def is_mask(s: Series) -> bool:
  """An "Analysis Mask" series of the SEG modality or SOP class (read and selected as `is_dce`)."""
  return (
      s.modality == 'SEG' or s.sop_class == SEG_SOP_CLASS
  ) and 'analysis mask' in _words(s.description)


def _visit_files(study: _Study, visit_source: str) -> VisitFiles:
  """DCE series (uni-lateral first, then most slices) and the SEG matching its laterality."""
  notes = (
      [] if visit_source == 'description' else [f'visit from {visit_source}']
  )
  series = [study.series[uid] for uid in sorted(study.series)]
  dce = sorted(
      (s for s in series if is_dce(s)),
      key=lambda s: (
          _LATERALITY_RANK[laterality(s.description)],
          -len(s.files),
      ),
  )
  if not dce:
    return VisitFiles(dce=(), notes=tuple(notes))
  side = laterality(dce[0].description)
  same_side = sum(laterality(s.description) == side for s in dce)
  if same_side > 1:
    notes.append(
        f'{same_side} {side or "DCE"} series; chose the one with most slices'
    )
  if side != 'uni-lateral':
    notes.append(f'DCE series is {side or "of unknown laterality"}')
  masks = sorted(
      (s for s in series if is_mask(s)),
      key=lambda s: laterality(s.description) != side,
  )
  seg = None
  if not masks:
    notes.append('no analysis mask')
  else:
    seg = sorted(masks[0].files)[0]
    if laterality(masks[0].description) != side:
      notes.append('analysis mask laterality differs from the DCE series')
    if len(masks[0].files) > 1:
      notes.append(
          f'analysis mask series has {len(masks[0].files)} files; using the first'
      )
  return VisitFiles(
      dce=tuple(sorted(dce[0].files)),
      seg=seg,
      laterality=side,
      notes=tuple(notes),
  )


def _study_folders(study: _Study, root: str) -> tuple[str, set[str]]:
  """The study folder (above its series folders; relative, dates masked) for messages, and every
  folder name above its files (for visit tokens)."""
  dirs = {
      os.path.dirname(os.path.relpath(s.files[0], root))
      for s in study.series.values()
  }
  names = {part for d in dirs for part in d.split(os.sep) if part}
  return (
      headers.masked(
          os.path.commonpath([os.path.dirname(d) for d in sorted(dirs)])
      ),
      names,
  )


def _patient_files(
    pid: str, studies: dict[str, _Study], root: str
) -> tuple[PatientFiles, list[errors.Issue]]:
  """Visit of each study, duplicates resolved (most DCE slices wins), files chosen per visit."""
  issues = []
  by_visit = collections.defaultdict(list)
  for uid in sorted(studies):
    folder, names = _study_folders(studies[uid], root)
    visit, source = study_visit(
        studies[uid].description, studies[uid].timepoint, names
    )
    if visit is None:
      issues.append(
          errors.Issue(
              pid,
              None,
              'unknown_visit',
              f'study folder {folder}: no visit'
              ' token in StudyDescription, ClinicalTrialTimePointID or folder'
              ' name',
          )
      )
      continue
    by_visit[visit].append(_visit_files(studies[uid], source))
  visits: list[VisitFiles | None] = [None] * schema.NUM_VISITS
  for v in sorted(by_visit):
    candidates = sorted(
        by_visit[v], key=lambda c: -len(c.dce)
    )  # stable: ties keep UID order
    best = candidates[0]
    if len(candidates) > 1:
      issues.append(
          errors.Issue(
              pid,
              v,
              'duplicate_visit',
              f'{len(candidates)} studies claim'
              f' T{v}; kept the one with {len(best.dce)} DCE slices',
          )
      )
    if not best.dce:
      issues.append(
          errors.Issue(
              pid,
              v,
              'no_dce_series',
              f'T{v} study has no MR series described as "original DCE"',
          )
      )
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
  counts = collections.Counter(
      os.path.splitext(p)[1].lower() or '<none>' for p in paths
  )
  return (
      f'{len(paths)} files ('
      + ', '.join(f'{e} {n}' for e, n in counts.most_common(8))
      + ')'
  )


def discover(
    manual_dir: str | os.PathLike, map_fn: Callable = map
) -> tuple[dict[str, PatientFiles], list[errors.Issue]]:
  """Patients of a TCIA download, grouped by header UIDs (never by folder names alone).

  ``map_fn(scan_file, paths)`` reads the headers; pass e.g. ``functools.partial(pool.map,
  chunksize=256)`` to read them in parallel. Returns ``{PatientID: PatientFiles}`` and the issues
  found on the way (corrupt files, unknown or duplicate visits, visits without a DCE series).
  """
  root = os.fspath(manual_dir)
  if not os.path.isdir(root):
    raise FileNotFoundError(
        f'manual_dir {root!r} does not exist; expected {LAYOUT}.'
    )
  paths = _walk(root)
  if not paths:
    raise FileNotFoundError(f'manual_dir {root!r} is empty; expected {LAYOUT}.')
  studies = collections.defaultdict(
      dict
  )  # PatientID -> StudyInstanceUID -> _Study
  issues = []
  num_dicom = 0
  for path, header in zip(paths, map_fn(scan_file, paths)):
    if header is None:
      continue
    num_dicom += 1
    if isinstance(header, str):
      issues.append(
          errors.Issue(
              '',
              None,
              'corrupt_file',
              f'{headers.relpath(path, root)}: {header}',
          )
      )
      continue
    study = studies[header.patient_id].setdefault(header.study_uid, _Study())
    study.description = study.description or header.study_description
    study.timepoint = study.timepoint or header.timepoint
    series = study.series.setdefault(
        header.series_uid,
        Series(header.modality, header.sop_class, header.series_description),
    )
    series.files.append(path)
  if not num_dicom:
    raise ValueError(
        f'no DICOM file (DICM preamble) under {root!r}: found {_found(paths)};'
        f' expected {LAYOUT}.'
    )
  found = [
      s
      for by_study in studies.values()
      for study in by_study.values()
      for s in study.series.values()
  ]
  if not any(
      is_dce(s) for s in found
  ):  # e.g. another collection's CT or MR series
    modalities = collections.Counter(
        s.modality if re.fullmatch(r'[A-Z0-9_ ]{1,16}', s.modality) else 'other'
        for s in found
    )
    unreadable = sum(i.reason == 'corrupt_file' for i in issues)
    raise ValueError(
        f'no DCE series under {root!r}: {num_dicom} DICOM files'
        + (f' ({unreadable} unreadable)' if unreadable else '')
        + f' in {len(found)} series ('
        + ', '.join(f'{m} {n}' for m, n in modalities.most_common())
        + f') of {len(studies)}'
        f' patient(s), none an MR series described as "original DCE"; expected {LAYOUT}.'
    )
  patients = {}
  for pid in sorted(studies):
    patients[pid], more = _patient_files(pid, studies[pid], root)
    issues.extend(more)
  return patients, issues
