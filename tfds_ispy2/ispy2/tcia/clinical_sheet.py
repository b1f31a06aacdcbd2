"""The labels of a download: pCR, the HR/HER2 subtype and the arm, from the collection's clinical
sheet, keyed by every PatientID a row may stand for (with the ancillary sheet's id mapping).

Only the columns asked for leave the sheet (not age, race, ...).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
from collections.abc import Sequence

import openpyxl

from tfds_ispy2.ispy2 import schema
from tfds_ispy2.ispy2.tcia import headers

CLINICAL_FILE = 'ISPY2-Imaging-Cohort-1-Clinical-Data.xlsx'
ANCILLARY_FILE = 'Full-Collection-Ancillary-Patient-Information-file.xlsx'
_CLINICAL_GLOB = '*clinical*data*.xlsx'
_ANCILLARY_GLOB = '*ancillary*.xlsx'


@dataclasses.dataclass(frozen=True)
class ClinicalRecord:
  """Labels of one sheet row; ``duplicate`` when the id has rows with conflicting values."""

  pcr: int | None
  subtype: (
      int | None
  )  # index in schema.SUBTYPES; None when HR or HER2 is missing
  arm: str
  duplicate: bool = False
  rows: tuple[int, ...] = ()  # sheet row numbers, for messages


def _find_xlsx(root: str, pattern: str) -> list[str]:
  found = []
  for dirpath, _, filenames in os.walk(root):
    found.extend(
        os.path.join(dirpath, f)
        for f in filenames
        if fnmatch.fnmatch(f.lower(), pattern) and not f.startswith(('~$', '.'))
    )
  return sorted(found)


def _header_key(value) -> str:
  return re.sub(r'[^a-z0-9]', '', headers.text(value).lower())


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
          return [
              (n, {c: r[i] if i < len(r) else None for c, i in index.items()})
              for n, r in enumerate(rows, start=number + 1)
          ]
        if number >= 10:
          break
  finally:
    wb.close()
  raise ValueError(
      f'{os.path.basename(path)}: no sheet with the columns {list(columns)} in its'
      ' first 10 rows'
  )


def _binary(value) -> int | None:
  """1 / 0 from 1, 1.0, '1', 'Yes', 'Positive', ...; None when empty or unreadable."""
  if isinstance(value, (int, float)) and value in (0, 1):
    return int(value)
  word = headers.text(value).lower()
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
  text = headers.text(value)
  m = re.fullmatch(r'(\d+)(?:\.0*)?', text)
  return m.group(1) if m else ''


def _id_candidates(value) -> tuple[str, ...]:
  """TCIA PatientIDs a sheet id may stand for: numeric id <-> `ISPY2-<id>`."""
  if numeric := _research_id(value):
    return numeric, f'ISPY2-{numeric}'
  text = headers.text(value)
  if m := re.fullmatch(r'ISPY2-(\d+)', text, re.IGNORECASE):
    return text, m.group(1)
  return (text,) if text else ()


def _merge(old: ClinicalRecord | None, new: ClinicalRecord) -> ClinicalRecord:
  if old is None:
    return new
  conflict = (old.pcr, old.subtype, old.arm) != (new.pcr, new.subtype, new.arm)
  return dataclasses.replace(
      old,
      duplicate=old.duplicate or new.duplicate or conflict,
      rows=tuple(sorted(set(old.rows + new.rows))),
  )


def read_clinical(manual_dir: str | os.PathLike) -> dict[str, ClinicalRecord]:
  """Labels keyed by every PatientID a row may stand for (full id, numeric id, ancillary id)."""
  root = os.fspath(manual_dir)
  sheets = _find_xlsx(root, _CLINICAL_GLOB)
  if len(sheets) > 1:
    sheets = [
        s for s in sheets if os.path.basename(s) == CLINICAL_FILE
    ] or sheets
  if not sheets:
    raise FileNotFoundError(
        f'no clinical sheet under {root!r}: expected {CLINICAL_FILE} (any'
        f' file matching {_CLINICAL_GLOB}, case-insensitive) with columns'
        ' Patient_ID, Arm, HR, HER2, pCR.'
    )
  if len(sheets) > 1:
    raise ValueError(
        'several clinical sheets: '
        + ', '.join(headers.relpath(s, root) for s in sheets)
    )
  records: dict[str, ClinicalRecord] = {}
  for row, r in _read_table(
      sheets[0], ('Patient_ID', 'Arm', 'HR', 'HER2', 'pCR')
  ):
    record = ClinicalRecord(
        pcr=_binary(r['pCR']),
        subtype=_subtype(_binary(r['HR']), _binary(r['HER2'])),
        arm=headers.text(r['Arm']),
        rows=(row,),
    )
    for key in _id_candidates(r['Patient_ID']):
      records[key] = _merge(records.get(key), record)
  for path in _find_xlsx(root, _ANCILLARY_GLOB):
    for _, r in _read_table(path, ('TCIA PATIENT ID', 'I-SPY 2 Research ID')):
      tcia_id, research = headers.text(r['TCIA PATIENT ID']), _research_id(
          r['I-SPY 2 Research ID']
      )
      if tcia_id and research in records:
        records[tcia_id] = _merge(records.get(tcia_id), records[research])
  return records
