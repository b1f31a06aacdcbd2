"""`python -m tfds_ispy2.download`, offline: the selection against the series index that idc-index
ships, the dry run as a command, the tree it writes as the builder reads it, and resuming.

The transfer itself needs IDC's public buckets, which no test reaches: a fake client stands in
for idc-index's download and writes the files it would write.
"""

import os
import pathlib
import subprocess
import sys
import types
import uuid

import duckdb
import idc_index_data
import pandas as pd
import pydicom
import pytest
from idc_index import IDCClient

from fake_data import tcia_fixtures
from tfds_ispy2 import download
from tfds_ispy2.ispy2 import tcia

REPO = pathlib.Path(__file__).resolve().parents[1]
INDEX = idc_index_data.IDC_INDEX_PARQUET_FILEPATH
ALL_VISITS = (0, 1, 2, 3)
# The selection written as SQL, apart from the module: the studies' visit from the end of their
# description, the two series by the exact endings of their descriptions, patients with a T0 DCE.
SELECTION_SQL = """
    WITH series AS (
      SELECT PatientID, StudyInstanceUID, SeriesInstanceUID, instanceCount, series_size_MB,
             TRY_CAST(regexp_extract(StudyDescription, 'MRI_T([0-3])$', 1) AS INTEGER) AS visit,
             Modality = 'MR' AND SeriesDescription LIKE '%: original DCE' AS dce,
             Modality = 'SEG' AND SeriesDescription LIKE '%: Analysis Mask' AS mask
      FROM read_parquet('{index}') WHERE collection_id IN ('ispy2', 'acrin_6698'))
    SELECT * FROM series
    WHERE (dce OR mask)
      AND StudyInstanceUID IN (SELECT StudyInstanceUID FROM series WHERE dce)
      AND PatientID IN (SELECT PatientID FROM series WHERE dce AND visit = 0)
      AND visit IN ({visits})
"""


@pytest.fixture(scope='module')
def index():
  """IDC's series index, the rows of the two I-SPY2 collections (all that the selection reads)."""
  return pd.read_parquet(
      INDEX,
      columns=download.INDEX_COLUMNS,
      filters=[('collection_id', 'in', list(download.COLLECTIONS))],
  )


def _expected(visits) -> pd.DataFrame:
  return duckdb.sql(
      SELECTION_SQL.format(index=INDEX, visits=', '.join(map(str, visits)))
  ).df()


def _per_visit(rows: pd.DataFrame) -> dict:
  """{visit: (patients, series, bytes)}."""
  return {
      int(v): (
          g['PatientID'].nunique(),
          len(g),
          round(g['series_size_MB'].sum() * 1e6),
      )
      for v, g in rows.groupby('visit')
  }


def test_the_selection_is_the_independent_query(index):
  selection = download.select_series(index, ALL_VISITS)
  expected = _expected(ALL_VISITS)
  assert set(selection['SeriesInstanceUID']) == set(
      expected['SeriesInstanceUID']
  )
  assert len(selection) == len(expected)
  assert _per_visit(selection) == _per_visit(expected)


def test_the_index_holds_the_known_facts_of_i_spy2(index):
  """IDC v25's facts (idc-index-data of requirements-download.txt), and the selection's."""
  assert (
      idc_index_data.__version__ == '25.0.5'
  ), 'the numbers below are those of IDC v25'
  con = duckdb.connect()
  con.register('series', index)
  patients = dict(
      con.sql(
          'SELECT collection_id, count(DISTINCT PatientID) FROM series'
          ' GROUP BY ALL'
      ).fetchall()
  )
  assert patients == {'ispy2': 719, 'acrin_6698': 385}
  dce_and_mask = """
      SELECT StudyDescription[-1:] AS visit, PatientID, SeriesDescription, series_size_MB
      FROM series WHERE SeriesDescription LIKE '%: original DCE'
                     OR SeriesDescription LIKE '%: Analysis Mask'"""
  with_both = dict(con.sql(f"""
      SELECT visit, count(*) FROM (
        SELECT visit, PatientID FROM ({dce_and_mask}) GROUP BY ALL
        HAVING count(DISTINCT SeriesDescription[-4:]) = 2)
      GROUP BY visit""").fetchall())
  assert with_both == {'0': 1100, '1': 945, '2': 886, '3': 867}
  (all_gb,) = con.sql(
      f'SELECT sum(series_size_MB) / 1e3 FROM ({dce_and_mask})'
  ).fetchone()
  early_series, early_gb = con.sql(
      f"""SELECT count(*), sum(series_size_MB) / 1e3
                                      FROM ({dce_and_mask}) WHERE visit < '3'"""
  ).fetchone()
  assert round(all_gb) == 512 and (early_series, round(early_gb)) == (5862, 396)
  # The selection leaves out the 3 patients without a T0 DCE series (8 series of T1-T3).
  per_visit = _per_visit(download.select_series(index, ALL_VISITS))
  assert {v: n[:2] for v, n in per_visit.items()} == {
      0: (1100, 2200),
      1: (943, 1886),
      2: (884, 1768),
      3: (866, 1732),
  }
  assert round(sum(b for _, _, b in per_visit.values()) / 1e9, 1) == 511.1
  assert (
      sum(n for v, (_, n, _) in per_visit.items() if v < 3),
      round(sum(b for v, (_, _, b) in per_visit.items() if v < 3) / 1e9, 1),
  ) == (5854, 395.1)


def _table(stdout: str) -> dict:
  """{row name: its numbers} of the table that the command prints."""
  rows = {}
  for line in stdout.splitlines():
    name, *numbers = line.split()
    if name in ('T0', 'T1', 'T2', 'T3', 'total'):
      rows[name] = [float(n) for n in numbers]
  return rows


def test_the_dry_run_prints_the_table_and_writes_nothing(tmp_path):
  out = tmp_path / 'ispy2'
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'tfds_ispy2.download',
          f'--out={out}',
          '--dry_run',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 0, result.stderr
  expected = _expected(download.METHOD_VISITS)
  rows = {f'T{v}': (p, n, b) for v, (p, n, b) in _per_visit(expected).items()}
  rows['total'] = (
      expected['PatientID'].nunique(),
      len(expected),
      round(expected['series_size_MB'].sum() * 1e6),
  )
  # Nothing on disk yet: everything is still to fetch.
  assert _table(result.stdout) == {
      name: [p, n, round(b / 1e9, 1), n, round(b / 1e9, 1)]
      for name, (p, n, b) in rows.items()
  }
  assert list(rows) == [
      'T0',
      'T1',
      'T2',
      'total',
  ]  # The method's visits, by default.
  assert (
      tcia.CLINICAL_FILE in result.stdout
      and download.CLINICAL_SOURCE in result.stdout
  )
  assert not out.exists()


def test_a_wrong_visit_is_one_line():
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'tfds_ispy2.download',
          '--out=unused',
          '--visits=T0,T5',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 1
  assert result.stderr.splitlines() == [
      "FATAL --visits: unknown visit 'T5'; choose among T0, T1, T2, T3."
  ]
  with pytest.raises(ValueError, match='must include T0'):
    download.parse_visits(['T1', 'T2'])
  assert download.parse_visits(['T2', 'T0', 'T2']) == (0, 2)


def test_series_folders_are_where_idc_index_writes(index, tmp_path):
  """The completeness check looks where idc-index's own template puts each series."""
  rows = download.select_series(index, ALL_VISITS).iloc[::500]
  out = str(tmp_path)
  # idc-index's own SQL for the path of each series (a private method: what it downloads with).
  path_sql = IDCClient._generate_sql_concat_for_building_directory(  # pylint: disable=W0212
      dirTemplate=download.DIR_TEMPLATE, downloadDir=out
  )
  written = duckdb.sql(f'SELECT {path_sql} AS path FROM rows').df()['path']
  assert [os.path.normpath(p) for p in written] == [
      download.series_folder(out, r) for r in rows.itertuples()
  ]


def _in_download_layout(tree: pathlib.Path, out: str) -> None:
  """Copies the DCE and Analysis Mask files of a TCIA-like tree into the download's layout,
  named as IDC names them (a UUID each)."""
  for path in sorted(tree.rglob('*')):
    if not path.is_file() or path.suffix != '.dcm':
      continue
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if not ds.SeriesDescription.endswith(('original DCE', 'Analysis Mask')):
      continue
    collection = 'acrin_6698' if ds.PatientID.startswith('ACRIN') else 'ispy2'
    row = types.SimpleNamespace(
        collection_id=collection,
        PatientID=ds.PatientID,
        StudyInstanceUID=ds.StudyInstanceUID,
        Modality=ds.Modality,
        SeriesInstanceUID=ds.SeriesInstanceUID,
    )
    folder = pathlib.Path(download.series_folder(out, row))
    folder.mkdir(parents=True, exist_ok=True)
    name = uuid.uuid5(uuid.NAMESPACE_OID, ds.SOPInstanceUID)
    (folder / f'{name}.dcm').write_bytes(path.read_bytes())


def _found(patients: dict) -> dict:
  return {
      pid: [
          None if v is None else (len(v.dce), v.seg is not None, v.laterality)
          for v in p.visits
      ]
      for pid, p in patients.items()
  }


def test_the_builder_discovers_the_download_layout(tmp_path):
  by_name = {c.name: c for c in tcia_fixtures.DEFAULT_CASES}
  tree = tmp_path / 'tcia'
  tcia_fixtures.write_tcia_tree(tree, [by_name['standard'], by_name['acrin']])
  out = tmp_path / 'idc'
  _in_download_layout(tree, str(out))
  assert {p.name for p in out.iterdir()} == {'ispy2', 'acrin_6698'}
  patients, issues = tcia.discover(out)
  original, _ = tcia.discover(tree)
  assert _found(patients) == _found(original)
  assert sorted(patients) == ['ACRIN-6698-102345', 'ISPY2-100101']
  assert all(v is not None for v in patients['ISPY2-100101'].visits)
  assert not issues


# --- Resuming, with a fake client in place of idc-index. ------------------------------------------
DCE = 'ISPY2: VOLSER: uni-lateral cropped: original DCE'
MASK = 'ISPY2: VOLSER: uni-lateral cropped: Analysis Mask'
FILE_BYTES = 10


def _small_index(patients=('ISPY2-100001', 'ISPY2-100002')) -> pd.DataFrame:
  """A series index of two visits per patient (a DCE series of 3 files, a mask of 1), 10 bytes
  a file, and a series of another collection, which is never selected."""
  rows = []
  for pid in patients:
    for visit in (0, 1):
      study = f'{pid}.study{visit}'
      rows += [
          (
              'ispy2',
              pid,
              study,
              f'{study}.dce',
              'MR',
              '1.2.840.10008.5.1.4.1.1.4',
              f'ISPY2_MRI_T{visit}',
              DCE,
              3,
          ),
          (
              'ispy2',
              pid,
              study,
              f'{study}.mask',
              'SEG',
              tcia.SEG_SOP_CLASS,
              f'ISPY2_MRI_T{visit}',
              MASK,
              1,
          ),
      ]
  rows.append(
      ('ispy1', 'ISPY1-1', 's', 's.dce', 'MR', '', 'ISPY1_MRI_T0', DCE, 3)
  )
  frame = pd.DataFrame(rows, columns=download.INDEX_COLUMNS[:-1])
  return frame.assign(series_size_MB=frame['instanceCount'] * FILE_BYTES / 1e6)


def _write_series(out: str, row, files: int | None = None) -> None:
  folder = pathlib.Path(download.series_folder(out, row))
  folder.mkdir(parents=True, exist_ok=True)
  for n in range(row.instanceCount if files is None else files):
    (folder / f'{n}.dcm').write_bytes(b'x' * FILE_BYTES)


class FakeClient:
  """What `download.run` uses of idc_index.IDCClient; its download writes the requested series
  (or, with `fails`, nothing) and records what was requested."""

  def __init__(self, index: pd.DataFrame, fails: bool = False):
    self.index = index
    self.fails = fails
    self.requested = []

  @staticmethod
  def get_idc_version():
    return 'v25'

  def download_from_selection(
      self,
      *,
      downloadDir,
      seriesInstanceUID,
      dirTemplate,
      quiet,
      show_progress_bar,
  ):
    assert (
        dirTemplate == download.DIR_TEMPLATE and quiet and not show_progress_bar
    )
    self.requested.append(sorted(seriesInstanceUID))
    if not self.fails:
      for row in self.index[
          self.index['SeriesInstanceUID'].isin(seriesInstanceUID)
      ].itertuples():
        _write_series(downloadDir, row)


def test_a_series_is_complete_with_all_its_files_and_bytes(tmp_path):
  out = str(tmp_path)
  selection = download.select_series(_small_index(['ISPY2-100001']), ALL_VISITS)
  assert len(selection) == 4 and not download.completed(selection, out).any()
  for row in selection.itertuples():
    _write_series(out, row)
  (
      pathlib.Path(download.series_folder(out, selection.iloc[0])) / '.DS_Store'
  ).write_text('x')
  assert download.completed(selection, out).all()
  dce = [r for r in selection.itertuples() if r.kind == 'dce']
  os.remove(os.path.join(download.series_folder(out, dce[0]), '0.dcm'))
  with open(
      os.path.join(download.series_folder(out, dce[1]), '0.dcm'), 'r+b'
  ) as f:
    f.truncate(FILE_BYTES - 1)  # As an interrupted transfer leaves it.
  assert download.completed(selection, out).tolist() == [
      r.kind != 'dce' for r in selection.itertuples()
  ]


def test_a_rerun_fetches_only_the_incomplete_series(tmp_path):
  out = str(tmp_path)
  client = FakeClient(_small_index())
  first = download.select_series(client.index, ALL_VISITS).iloc[0]
  for row in download.select_series(client.index, ALL_VISITS).itertuples():
    if (
        row.PatientID == 'ISPY2-100001'
    ):  # Fetched by an earlier run, but for its first series.
      _write_series(out, row, files=0 if row.Index == first.name else None)
  log = []
  download.run(client, out, (0, 1), dry_run=False, log=log.append)
  assert client.requested == [
      [first.SeriesInstanceUID],
      sorted(
          f'ISPY2-100002.study{v}.{k}' for v in (0, 1) for k in ('dce', 'mask')
      ),
  ]
  assert log[-3:-1] == [
      '[2/2] ISPY2-100002: 4 series, 0.00 GB',
      f'All 8 series are in {out}.',
  ]
  assert tcia.CLINICAL_FILE in log[-1]
  client.requested.clear()
  tcia_fixtures.write_clinical_sheet(
      tmp_path / tcia.CLINICAL_FILE,
      [
          {
              'Patient_ID': 100002,
              'Arm': 'Paclitaxel',
              'HR': 1,
              'HER2': 0,
              'pCR': 1,
          }
      ],
  )
  download.run(client, out, (0, 1), dry_run=False, log=log.append)
  assert client.requested == []
  assert (
      log[-1]
      == f'Labels: the clinical sheet in {out} labels 1 of the 2 patients.'
  )


def test_a_transfer_left_incomplete_stops_the_run(tmp_path):
  client = FakeClient(_small_index(), fails=True)
  with pytest.raises(
      download.TransferError,
      match=r'^ISPY2-100001: 4 of 4 series incomplete after the transfer',
  ):
    download.run(
        client, str(tmp_path), (0, 1), dry_run=False, log=lambda line: None
    )
  assert len(client.requested) == 1


def test_the_dry_run_of_a_partial_download_counts_what_is_left(tmp_path):
  out = str(tmp_path)
  client = FakeClient(_small_index())
  selection = download.select_series(client.index, (0, 1))
  for row in selection[selection['visit'] == 0].itertuples():
    _write_series(out, row)
  log = []
  download.run(client, out, (0, 1), dry_run=True, log=log.append)
  assert client.requested == []
  assert _table(log[1]) == {
      'T0': [2, 4, 0.0, 0, 0.0],
      'T1': [2, 4, 0.0, 4, 0.0],
      'total': [2, 8, 0.0, 4, 0.0],
  }
