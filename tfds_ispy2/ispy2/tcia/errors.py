"""What the reader says when something cannot be used: a short reason code and a PHI-free detail.

A `Skip` leaves a patient out of the build, a `VisitError` one visit; an `Issue` is kept for the
build report. Every stage raises these, so they live apart from all of them.
"""

from __future__ import annotations

from typing import NamedTuple


class CodedError(Exception):
  """An error with a short ``reason`` code and a PHI-free ``detail`` message."""

  def __init__(self, reason: str, detail: str = ''):
    super().__init__(
        reason, detail
    )  # args round-trip through pickle (worker processes)
    self.reason = reason
    self.detail = detail

  def __str__(self) -> str:
    return f'{self.reason}: {self.detail}'


class Skip(CodedError):
  """The patient cannot be written (no clinical record, no pCR label, T0 unusable, ...)."""


class VisitError(CodedError):
  """One visit cannot be used: it becomes a missing visit (or, at T0, skips the patient)."""


class Issue(NamedTuple):
  """Something noticed while reading: kept for the build report."""

  patient_id: str
  visit: int | None
  reason: str
  detail: str
