"""Fetches from NCI Imaging Data Commons (IDC) the I-SPY2 series that the `ispy2/tcia` build reads.

    python -m tfds_ispy2.download --out=DIR [--visits=T0,T1,T2] [--dry_run]

needs the `download` extra (idc-index, IDC's own client; it ships IDC's series index and fetches
with s5cmd from IDC's public buckets, no account). I-SPY2's DCE-MRI lies in two IDC collections,
`ispy2` and `acrin_6698` (the I-SPY2 patients of the ACRIN 6698 diffusion sub-study). From the
shipped index, offline, the selection takes every study of the chosen visits that has an
"original DCE" series, its DCE series and its "Analysis Mask" series, recognised by the rules
the builder reads a download with (`tcia.study_visit`, `tcia.is_dce`, `tcia.is_mask`), for the
patients with such a study at T0: the builder skips a patient without one (`no_t0`). A DCE series
without a mask is fetched all the same (the builder falls back to PE >= 70 %); in IDC's index
each of them has its mask. The default visits are those the method's models see
(`pcrjax.runs.MODELS`).

Before it transfers anything it prints, per visit and in total, the patients, the series and the
GB (10^9 bytes) selected and still to fetch; `--dry_run` stops there. It then fetches one patient
at a time. A series is complete when its folder holds as many DICOM files and as many bytes as
the index says (a file cut short by an interrupted transfer does not count): a rerun fetches only
the incomplete series, and a patient whose series are still incomplete after its transfer stops
the run with one line. idc-index alone would neither skip finished series (its disk-space check
counts the whole selection) nor report a failed transfer as an error.

The tree is the `--manual_dir` of the `tcia` build as it is (the builder groups files by their
DICOM headers, never by folder names):

    DIR/<collection_id>/<PatientID>/<StudyInstanceUID>/<Modality>_<SeriesInstanceUID>/<uuid>.dcm

The labels are not in the series index: the builder reads them from the collection's clinical
sheet on TCIA (`CLINICAL_SOURCE`), which goes into DIR as well; the last line says whether it is
there.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable, Sequence

import pandas as pd
from absl import app, flags

from pcrjax import fileio, runs
from tfds_ispy2.ispy2 import schema, tcia

COLLECTIONS = ('ispy2', 'acrin_6698')
# idc-index's folder template, given explicitly: `series_folder` spells the same path, where the
# completeness check looks.
DIR_TEMPLATE = (
    '%collection_id/%PatientID/%StudyInstanceUID/%Modality_%SeriesInstanceUID'
)
# The ISPY2 collection's page on TCIA, where its clinical sheet and ancillary id mapping are.
CLINICAL_SOURCE = 'https://doi.org/10.7937/TCIA.D8Z0-9T85'
METHOD_VISITS = tuple(
    sorted({v for model in runs.MODELS for v in model.time_points})
)
INDEX_COLUMNS = [
    'collection_id',
    'PatientID',
    'StudyInstanceUID',
    'SeriesInstanceUID',
    'Modality',
    'SOPClassUID',
    'StudyDescription',
    'SeriesDescription',
    'instanceCount',
    'series_size_MB',
]
_BYTES_PER_MB = (
    10**6
)  # IDC's MB; series_size_MB is an exact byte count in these units.

FLAGS = flags.FLAGS
flags.DEFINE_string(
    'out',
    None,
    'Folder to fetch into: the --manual_dir of the ispy2/tcia build.',
)
flags.DEFINE_list(
    'visits',
    [schema.VISITS[v] for v in METHOD_VISITS],
    f'Visits to fetch, among {", ".join(schema.VISITS)}; T0 is required.',
)
flags.DEFINE_boolean(
    'dry_run', False, 'Print what would be fetched, then stop.'
)


class TransferError(RuntimeError):
  """The transfer cannot start or did not complete: a rerun resumes it."""


def parse_visits(names: Sequence[str]) -> tuple[int, ...]:
  """Visit indices of `--visits`; ValueError for an unknown name or a list without T0."""
  unknown = [name for name in names if name not in schema.VISITS]
  if unknown:
    raise ValueError(
        f'--visits: unknown visit {unknown[0]!r}; choose among'
        f' {", ".join(schema.VISITS)}.'
    )
  visits = tuple(sorted({schema.VISITS.index(name) for name in names}))
  if 0 not in visits:
    raise ValueError(
        '--visits must include T0: the builder skips every patient without a T0 DCE'
        ' series.'
    )
  return visits


def _series_kind(modality: str, sop_class: str, description: str) -> str | None:
  """'dce', 'mask' or None, by the builder's own rules for a series."""
  series = tcia.Series(modality, sop_class, description)
  if tcia.is_dce(series):
    return 'dce'
  if tcia.is_mask(series):
    return 'mask'
  return None


def select_series(index: pd.DataFrame, visits: Sequence[int]) -> pd.DataFrame:
  """The series to fetch from IDC's series index (one row per series): `INDEX_COLUMNS` plus
  `visit` (0..3) and `kind` ('dce' or 'mask'), sorted by patient, visit, kind and series.
  """
  rows = index.loc[
      index['collection_id'].isin(COLLECTIONS), INDEX_COLUMNS
  ].fillna({'StudyDescription': '', 'SeriesDescription': '', 'SOPClassUID': ''})
  visit_of = {
      d: tcia.study_visit(d)[0] for d in rows['StudyDescription'].unique()
  }
  rows = rows.assign(
      visit=rows['StudyDescription'].map(visit_of),
      kind=[
          _series_kind(*s)
          for s in zip(
              rows['Modality'], rows['SOPClassUID'], rows['SeriesDescription']
          )
      ],
  )
  rows = rows[rows['visit'].notna() & rows['kind'].notna()]
  rows = rows[
      rows['StudyInstanceUID'].isin(
          rows.loc[rows['kind'] == 'dce', 'StudyInstanceUID']
      )
  ]
  with_t0 = rows.loc[rows['visit'] == 0, 'PatientID']
  rows = rows[rows['PatientID'].isin(with_t0) & rows['visit'].isin(visits)]
  return rows.astype({'visit': int}).sort_values(
      ['PatientID', 'visit', 'kind', 'SeriesInstanceUID'], ignore_index=True
  )


def series_folder(out: str, row) -> str:
  """Where idc-index writes a series with `DIR_TEMPLATE` (`row`: a row of `select_series`)."""
  return os.path.join(
      out,
      row.collection_id,
      row.PatientID,
      row.StudyInstanceUID,
      f'{row.Modality}_{row.SeriesInstanceUID}',
  )


def _is_complete(folder: str, instances: int, size_mb: float) -> bool:
  try:
    files = [
        e for e in os.scandir(folder) if e.name.endswith('.dcm') and e.is_file()
    ]
  except FileNotFoundError:
    return False
  return len(files) == instances and sum(
      e.stat().st_size for e in files
  ) == round(size_mb * _BYTES_PER_MB)


def completed(selection: pd.DataFrame, out: str) -> pd.Series:
  """Per row of `selection`, whether `out` holds the whole series: the index's number of DICOM
  files and of bytes (so a file cut short by an interrupted transfer leaves it incomplete).
  """
  return pd.Series(
      [
          _is_complete(
              series_folder(out, row), row.instanceCount, row.series_size_MB
          )
          for row in selection.itertuples()
      ],
      index=selection.index,
      dtype=bool,
  )


def _gb(rows: pd.DataFrame) -> float:
  return rows['series_size_MB'].sum() / 1e3


def summary(
    selection: pd.DataFrame, complete: pd.Series, visits: Sequence[int]
) -> str:
  """The table printed before any transfer: per visit and in total, patients, series and GB
  selected, and series and GB still to fetch."""
  lines = [
      f'{"visit":<6}{"patients":>9}{"series":>8}{"GB":>8}   {"to fetch: series":>16}{"GB":>8}'
  ]
  parts = [(schema.VISITS[v], selection['visit'] == v) for v in visits]
  for name, chosen in parts + [
      ('total', pd.Series(True, index=selection.index))
  ]:
    rows, todo = selection[chosen], selection[chosen & ~complete]
    lines.append(
        f'{name:<6}{rows["PatientID"].nunique():>9}{len(rows):>8}{_gb(rows):>8.1f}'
        f'   {len(todo):>16}{_gb(todo):>8.1f}'
    )
  return '\n'.join(lines)


def _existing_folder(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.isdir(path):
    path = os.path.dirname(path)
  return path


def fetch(
    client, todo: pd.DataFrame, out: str, log: Callable[[str], None] = print
) -> None:
  """Fetches the series of `todo` (rows of `select_series`) into `out`, one patient at a time.

  Each patient's series are checked once its transfer returns (idc-index only logs s5cmd's
  errors): TransferError names the first patient left incomplete, and a rerun resumes there.
  """
  from idc_index import IDCClientInsufficientDiskSpaceError  # pylint: disable=g-import-not-at-top

  free = shutil.disk_usage(_existing_folder(out)).free
  if free < _gb(todo) * 1e9:
    raise TransferError(
        f'{out}: {_gb(todo):.1f} GB to fetch, {free / 1e9:.1f} GB free there: free'
        ' some space or choose fewer --visits, then run the same command again.'
    )
  patients = todo.groupby('PatientID', sort=True)
  for number, (patient, rows) in enumerate(patients, start=1):
    try:
      client.download_from_selection(
          downloadDir=out,
          seriesInstanceUID=rows['SeriesInstanceUID'].tolist(),
          dirTemplate=DIR_TEMPLATE,
          quiet=True,
          show_progress_bar=False,
      )
    except IDCClientInsufficientDiskSpaceError as e:
      raise TransferError(
          f'{out}: {e} Free some space, then run the same command again.'
      ) from None
    missing = ~completed(rows, out)
    if missing.any():
      free = shutil.disk_usage(out).free / 1e9
      raise TransferError(
          f'{patient}: {missing.sum()} of {len(rows)} series incomplete after the'
          f' transfer (idc-index logged why above; {free:.1f} GB free in {out}):'
          ' run the same command again to resume.'
      )
    log(
        f'[{number}/{len(patients)}] {patient}: {len(rows)} series, {_gb(rows):.2f} GB'
    )


def clinical_note(out: str, patients: Sequence[str]) -> str:
  """Whether `out` holds the clinical sheet that the builder takes the labels from, and if so,
  how many of `patients` it labels; else where the sheet comes from."""
  try:
    records = tcia.read_clinical(out)
  except FileNotFoundError:
    return (
        f"Labels: not in IDC's series index. From the ISPY2 collection on TCIA,"
        f' {CLINICAL_SOURCE}, put {tcia.CLINICAL_FILE} and {tcia.ANCILLARY_FILE} (which maps'
        f' the ACRIN-6698 PatientIDs to research ids) into {out}.'
    )
  except ValueError as e:
    return f'Labels: {e}'
  labelled = sum(
      1
      for p in patients
      if (r := records.get(p))
      and not r.duplicate
      and r.pcr is not None
      and r.subtype is not None
  )
  return f'Labels: the clinical sheet in {out} labels {labelled} of the {len(patients)} patients.'


def run(
    client,
    out: str,
    visits: Sequence[int],
    dry_run: bool,
    log: Callable[[str], None] = print,
) -> None:
  """The command with an `idc_index.IDCClient`: select, print the table, then (unless `dry_run`)
  fetch what is missing; last, say where the labels stand."""
  selection = select_series(client.index, visits)
  complete = completed(selection, out)
  log(
      f'I-SPY2 in IDC {client.get_idc_version()} (collections {", ".join(COLLECTIONS)}): the DCE'
      ' and Analysis Mask series of the patients with a T0 DCE series'
  )
  log(summary(selection, complete, visits))
  if not dry_run:
    fetch(client, selection[~complete], out, log)
    log(f'All {len(selection)} series are in {out}.')
  log(clinical_note(out, sorted(selection['PatientID'].unique())))


def main(argv):
  if len(argv) > 1:
    sys.exit(f'FATAL Unexpected arguments: {argv[1:]}')
  try:
    visits = parse_visits(FLAGS.visits)
  except ValueError as e:
    sys.exit(f'FATAL {e}')
  try:
    from idc_index import IDCClient  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    sys.exit(
        f'FATAL {e.name} is not installed: this command needs the `download` extra'
        " (pip install '.[download]')."
    )
  logging.getLogger('idc_index').setLevel(
      logging.WARNING
  )  # Its errors still show.
  try:
    with fileio.exit_in_one_line_if_disk_full(
        then=': it fetches only the series not yet complete'
    ):
      run(IDCClient(), FLAGS.out, visits, FLAGS.dry_run)
  except TransferError as e:
    sys.exit(f'FATAL {e}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['out'])
  app.run(main)
