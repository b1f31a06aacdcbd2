"""The few header values the `tcia` reader needs from a DICOM file, and where its pixels lie, fast.

pydicom builds a Dataset of every element it passes (a GE, Siemens or Philips slice carries hundreds
of private ones), and a build reads every header of a download twice (`discover`, then each visit's
slices): on real-size series that parse would be most of the reader's time. `read_header`
walks the elements with `struct` instead, steps over values by their length (sequences of undefined
length by their delimiters), keeps the raw bytes of the tags asked for, and stops at PixelData (or
past the last tag asked for), returning where PixelData's value starts and how long it says it is,
so that the pixels can be read straight into an array (`read_pixels`).

Only the uncompressed little-endian transfer syntaxes are walked (implicit and explicit VR, which is
what TCIA serves); for any other one, or any file the walk does not understand, it raises
`Unsupported` and the caller uses pydicom, which then also gives the error a damaged file deserves.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

__all__ = [
    'Header',
    'Unsupported',
    'read_header',
    'read_pixels',
    'IMPLICIT_LE',
    'EXPLICIT_LE',
]

IMPLICIT_LE = '1.2.840.10008.1.2'
EXPLICIT_LE = '1.2.840.10008.1.2.1'
PIXEL_DATA = 0x7FE00010
_ROWS, _COLUMNS, _BITS = 0x00280010, 0x00280011, 0x00280100
_TRANSFER_SYNTAX = 0x00020010
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
# Explicit-VR elements whose length takes 4 bytes after 2 reserved ones (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {
        b'OB',
        b'OD',
        b'OF',
        b'OL',
        b'OV',
        b'OW',
        b'SQ',
        b'SV',
        b'UC',
        b'UN',
        b'UR',
        b'UT',
        b'UV',
    }
)
_CHUNK = 16384  # bytes read at a time: a whole standard header, usually
_TAG = struct.Struct('<HH')
_U16, _U32 = struct.Struct('<H'), struct.Struct('<I')
_IMPLICIT_HEAD, _EXPLICIT_HEAD = struct.Struct('<HHI'), struct.Struct('<HH2sH')


class Unsupported(Exception):
  """Not a file this walker reads (another transfer syntax, or an unexpected structure)."""


class Header(NamedTuple):
  """Raw values of the requested top-level tags, and the pixel data's place in the file."""

  values: dict[int, bytes]
  transfer_syntax: str
  pixel_offset: int | None  # where PixelData's value starts; None: not reached
  pixel_length: (
      int | None
  )  # the length PixelData declares; None: undefined (encapsulated)
  file_size: int

  def text(self, tag: int, charset: str = 'latin-1') -> str | None:
    """A string value (trailing padding and spaces removed); None when absent."""
    raw = self.values.get(tag)
    return None if raw is None else raw.decode(charset).strip(' \x00')

  def numbers(self, tag: int) -> tuple[float, ...] | None:
    """A DS or IS value as floats (one per value of its multiplicity); None when absent or empty."""
    text = self.text(tag)
    return tuple(float(part) for part in text.split('\\')) if text else None

  def us(self, tag: int) -> int | None:
    """A US value (the first, when there are several)."""
    raw = self.values.get(tag)
    return _U16.unpack_from(raw)[0] if raw and len(raw) >= 2 else None


class _Reader:
  """Random access to a file through one buffer: what a walk over a header needs."""

  def __init__(self, f, pos: int = 0):
    self._f = f
    self._f.seek(pos)
    self._base = pos
    self._buffer = f.read(_CHUNK)

  def bytes(self, pos: int, size: int) -> bytes:
    end = pos + size - self._base
    if pos < self._base or end > len(self._buffer):
      self._f.seek(pos)
      self._base, self._buffer = pos, self._f.read(max(size, _CHUNK))
      end = size
      if len(self._buffer) < size:
        raise Unsupported('the file ends inside an element')
    return self._buffer[pos - self._base : end]

  def u32(self, pos: int) -> int:
    return _U32.unpack(self.bytes(pos, 4))[0]

  def tag(self, pos: int) -> int:
    group, element = _TAG.unpack(self.bytes(pos, 4))
    return group << 16 | element


def _element(
    reader: _Reader, pos: int, implicit: bool
) -> tuple[int, int, int, bool]:
  """(tag, where its value starts, its length, whether the value is implicit-VR inside) of the
  element at ``pos``."""
  tag = reader.tag(pos)
  if implicit:
    return tag, pos + 8, reader.u32(pos + 4), True
  vr = reader.bytes(pos + 4, 2)
  if vr in _LONG_VRS:
    return (
        tag,
        pos + 12,
        reader.u32(pos + 8),
        vr == b'UN',
    )  # UN of undefined length: an SQ
  if not vr.isalpha():
    raise Unsupported(f'no VR at offset {pos}')
  return tag, pos + 8, _U16.unpack(reader.bytes(pos + 6, 2))[0], False


def _skip_sequence(reader: _Reader, pos: int, implicit: bool) -> int:
  """The position after a sequence of undefined length whose first item starts at ``pos``."""
  while True:
    tag, length = reader.tag(pos), reader.u32(pos + 4)
    pos += 8
    if tag == _SEQUENCE_END:
      return pos
    if tag != _ITEM:
      raise Unsupported(f'expected an item at offset {pos - 8}')
    if length != _UNDEFINED:
      pos += length
      continue
    while reader.tag(pos) != _ITEM_END:
      _, start, length, inner_implicit = _element(reader, pos, implicit)
      pos = (
          _skip_sequence(reader, start, inner_implicit)
          if length == _UNDEFINED
          else start + length
      )
    pos += 8


def read_header(
    path: str, tags: Iterable[int], through: int = PIXEL_DATA
) -> Header | None:
  """The raw values of ``tags`` among the top-level elements up to ``through`` (by default up to
  PixelData, whose place it then gives); None when the file is not DICOM (no DICM prefix).

  Past the last tag asked for, PixelData of a single-frame image is first looked for where it
  nearly always is, at the end of the file (its element header just before the last Rows x
  Columns x BitsAllocated / 8 bytes, when those were asked for): the private elements between
  (a Philips slice has a hundred) are then never walked. Anywhere else, the walk finds it.
  """
  wanted = frozenset(tags)
  last_wanted = max(wanted, default=0)
  values = {}
  with open(path, 'rb') as f:
    size = os.fstat(f.fileno()).st_size
    reader = _Reader(f)
    if size < 132 or reader.bytes(0, 132)[128:] != b'DICM':
      return None
    pos, syntax = 132, ''
    while (
        pos + 8 <= size and reader.tag(pos) >> 16 == 0x0002
    ):  # file meta: explicit VR LE
      tag, start, length, _ = _element(reader, pos, False)
      if tag == _TRANSFER_SYNTAX:
        syntax = reader.bytes(start, length).decode('ascii').strip(' \x00')
      pos = start + length
    if syntax not in (IMPLICIT_LE, EXPLICIT_LE) and not (
        syntax.startswith('1.2.840.10008.1.2.4.')
        or syntax.startswith('1.2.840.10008.1.2.5')
    ):
      raise Unsupported(
          f'transfer syntax {syntax or "missing"}'
      )  # big endian, deflate, ...
    implicit = syntax == IMPLICIT_LE
    # The hot loop (hundreds of elements a file): one unpack per element, on a local buffer.
    head = _IMPLICIT_HEAD if implicit else _EXPLICIT_HEAD
    base, buffer = pos, reader.bytes(pos, min(_CHUNK, size - pos))
    while pos + 8 <= size:
      off = pos - base
      if off < 0 or off + 12 > len(buffer):
        f.seek(pos)
        base, buffer, off = pos, f.read(_CHUNK), 0
      if implicit:
        group, element, length = head.unpack_from(buffer, off)
        start, inner_implicit = pos + 8, True
      else:
        group, element, vr, length = head.unpack_from(buffer, off)
        start, inner_implicit = pos + 8, False
        if vr in _LONG_VRS:
          length = _U32.unpack_from(buffer, off + 8)[0]
          start, inner_implicit = (
              pos + 12,
              vr == b'UN',
          )  # UN of undefined length: an SQ
        elif not vr.isalpha():
          raise Unsupported(f'no VR at offset {pos}')
      tag = group << 16 | element
      if tag > through:
        break
      if tag > last_wanted and through == PIXEL_DATA:
        found = _pixel_data_at_end(reader, values, size, implicit)
        if found is not None:
          return Header(values, syntax, *found, size)
        last_wanted = PIXEL_DATA  # not there: walk on
      if tag == PIXEL_DATA:
        return Header(
            values,
            syntax,
            start,
            None if length == _UNDEFINED else length,
            size,
        )
      if length == _UNDEFINED:  # a sequence: only whether it is there
        values.update({tag: b''} if tag in wanted else {})
        pos = _skip_sequence(
            _Reader(f, start), start, implicit or inner_implicit
        )
        continue
      if tag in wanted:
        end = start - base + length
        values[tag] = (
            buffer[start - base : end]
            if end <= len(buffer)
            else reader.bytes(start, length)
        )
      pos = start + length
  return Header(values, syntax, None, None, size)


def _pixel_data_at_end(
    reader: _Reader, values: dict[int, bytes], size: int, implicit: bool
) -> tuple[int, int] | None:
  """(offset, length) of a PixelData element that ends the file and holds exactly one frame of
  Rows x Columns x BitsAllocated / 8 bytes (odd lengths padded by one); None if not there.
  """
  try:
    rows, columns, bits = (
        _U16.unpack(values[t][:2])[0] for t in (_ROWS, _COLUMNS, _BITS)
    )
  except (KeyError, struct.error):
    return None
  length = rows * columns * bits // 8
  length += length % 2
  start = size - length
  head = 8 if implicit else 12
  if start - head < 132:
    return None
  raw = reader.bytes(start - head, head)
  if (
      _TAG.unpack_from(raw)[0] << 16 | _TAG.unpack_from(raw)[1] != PIXEL_DATA
      or (_U32.unpack_from(raw, head - 4)[0] != length)
      or (not implicit and raw[4:6] not in (b'OW', b'OB'))
  ):
    return None
  return start, length


def read_pixels(path: str, offset: int, out: np.ndarray) -> None:
  """Fill ``out`` (a contiguous array of the file's stored type) with the bytes at ``offset``."""
  with open(path, 'rb') as f:
    f.seek(offset)
    if f.readinto(memoryview(out).cast('B')) != out.nbytes:
      raise EOFError(
          f'{out.nbytes} bytes of pixel data expected at offset {offset}'
      )
