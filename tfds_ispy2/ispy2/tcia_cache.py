"""Per-patient results of the `tcia` build, cached on disk so an interrupted build resumes.

A result is keyed by everything it depends on: the reader's version, the processing spec, the
patient's clinical record and its files (paths, sizes, modification times). A restarted build
reprocesses only the patients without a result, and writes the same records.
"""

from __future__ import annotations

import hashlib
import os
import pickle

from tfds_ispy2.ispy2 import tcia

# Part of every key: bump it whenever `tcia.process_patient` gives other results for the same files
# and spec, so that no result cached by an older reader is reused.
READER_VERSION = 3


def cache_key(
    patient: tcia.PatientFiles,
    clinical: tcia.ClinicalRecord | None,
    spec: tcia.TciaSpec,
) -> str:
  files = sorted(
      f
      for visit in patient.visits
      if visit
      for f in visit.dce + ((visit.seg,) if visit.seg else ())
  )
  stamp = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
  return hashlib.sha256(
      repr((READER_VERSION, spec, clinical, patient, stamp)).encode()
  ).hexdigest()


def process_patient_cached(job) -> tuple[str, tuple, list]:
  """('ok', (example, metadata), issues) or ('skip', (reason, detail), []) of one patient.

  job = (patient, clinical, spec, cache_dir): one picklable argument, for process pools.
  """
  patient, clinical, spec, cache_dir = job
  path = os.path.join(cache_dir, cache_key(patient, clinical, spec) + '.pkl')
  if os.path.exists(path):
    with open(path, 'rb') as f:
      return pickle.load(f)
  try:
    example, issues, meta = tcia.process_patient(patient, clinical, spec)
    outcome = ('ok', (example, meta), issues)
  except tcia.Skip as e:
    outcome = ('skip', (e.reason, e.detail), [])
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'wb') as f:
    pickle.dump(outcome, f)
  os.replace(
      tmp, path
  )  # Atomic: a killed worker leaves no half-written result.
  return outcome
