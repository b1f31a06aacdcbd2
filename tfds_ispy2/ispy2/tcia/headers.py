"""One DICOM file's header values, read once and fast, and its name as messages may show it.

`dicom_scan` walks the header of an uncompressed file; pydicom reads what it does not walk. Every
stage of the reader (discovery, the DCE slices, the Analysis Mask) reads headers through here, and
names files through `short_name` and `relpath`, which mask dates: no header text but defined terms
and numbers leaves the reader.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import warnings

import pydicom
import pydicom.config
import pydicom.datadict
import pydicom.filereader
import pydicom.multival

from tfds_ispy2.ispy2.tcia import dicom_scan

# NBIA folder names start with the (TCIA-shifted) study date, MM-DD-YYYY; DICOM dates are YYYYMMDD.
_DATE_RE = re.compile(r'(?<!\d)(\d{2}-\d{2}-\d{4}|(?:19|20)\d{6})(?!\d)')


@contextlib.contextmanager
def quiet():
  """pydicom warns (and logs) invalid header values verbatim, e.g. dates: keep them out of logs."""
  with warnings.catch_warnings(), pydicom.config.disable_value_validation():
    warnings.simplefilter('ignore')
    yield


def masked(message: str) -> str:
  """``message`` with every date in it replaced by `<date>`."""
  return _DATE_RE.sub('<date>', message)


def relpath(path: str, root: str) -> str:
  """``path`` relative to ``root``, dates masked."""
  return masked(os.path.relpath(path, root))


def short_name(path: str) -> str:
  """`<series folder>/<file>`: enough to find a slice, without the dated study folder."""
  return masked(
      os.path.join(
          os.path.basename(os.path.dirname(path)), os.path.basename(path)
      )
  )


def text(value) -> str:
  """A header value as stripped text; '' for a missing one."""
  return '' if value is None else str(value).strip()


def _read_until(path: str, last_tag: int) -> pydicom.Dataset:
  """The header up to ``last_tag``: what follows (private CSA headers, SEG frame sequences,
  pixels) is never parsed, which makes reading a large download several times faster.
  """
  with open(path, 'rb') as f:
    return pydicom.filereader.read_partial(
        f, stop_when=lambda tag, vr, length: tag > last_tag
    )


# Character sets whose text `dicom_scan` decodes itself (the default repertoire is ASCII); any
# other one is left to pydicom.
_CHARSETS = {
    '': 'latin-1',
    'ISO_IR 6': 'latin-1',
    'ISO_IR 100': 'latin-1',
    'ISO_IR 192': 'utf-8',
}
_CHARSET_TAG = 0x00080005


def _fast_value(header: dicom_scan.Header, tag: int, kind: str, charset: str):
  if kind == 'us':
    return header.us(tag)
  if kind == 'numbers':
    return header.numbers(tag)
  return text(header.text(tag, charset))


def _pydicom_value(value, kind: str):
  if kind == 'us':
    return None if value is None else int(value)
  if kind == 'numbers':
    if value is None or value == '':
      return None
    return tuple(
        float(x)
        for x in (
            value if isinstance(value, pydicom.multival.MultiValue) else [value]
        )
    )
  return text(value)


def header_values(
    path: str, fields: dict[str, str], through: int
) -> tuple[dict | None, dicom_scan.Header | None]:
  """The values of ``fields`` (keyword -> 'text', 'numbers' or 'us') among the elements up to
  ``through``, and the walked header (None when pydicom had to read it); (None, None) when the
  file is not DICOM. `dicom_scan` walks the header; what it does not read, pydicom does.
  """
  tags = {k: pydicom.datadict.tag_for_keyword(k) for k in fields}
  try:
    header = dicom_scan.read_header(
        path, [*tags.values(), _CHARSET_TAG], through
    )
    if header is None:
      return None, None
    charset = _CHARSETS[header.text(_CHARSET_TAG) or '']
    return {
        k: _fast_value(header, tags[k], kind, charset)
        for k, kind in fields.items()
    }, header
  except (
      dicom_scan.Unsupported,
      KeyError,
      ValueError,
      UnicodeDecodeError,
      struct.error,
  ):
    pass  # another transfer syntax or character set, or a damaged file: pydicom's turn
  with quiet():
    ds = _read_until(path, through)
    return {
        k: _pydicom_value(ds.get(k), kind) for k, kind in fields.items()
    }, None
