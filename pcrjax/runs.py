"""The run contract, spelled once: the models a protocol compares, the workdir layout, the
predictions schema, discovery of finished models, and the code version.

Every module that writes or reads a workdir asks this one. Adding a row to the paper's table is one
`Model` entry in `MODELS` plus the code that writes its predictions files; the evidence (tables,
tests, figures, report, comparisons) finds it here. Imports no JAX: a finished workdir can be
re-reported on any machine.

A protocol workdir:

    config.json  code_version.txt  ftv.csv  cohort_facts.json  log.txt  wall_time.json
    repeat_<r>/fold_<k>/<model>/   one stage's workdir: config.json, metrics.jsonl, checkpoints/,
                                   selection.json (networks), log.txt, timing.json,
                                   predictions_val.csv,
                                   predictions_test.csv (written last: the stage is finished)
      teacher/cross_fit/part_<k>/  a teacher trained without part k of the fold's training
                                   patients (dual_task.cross_fit): their out-of-sample targets
      student/lambda_<w>/          a candidate of dual_task.lambda_grid; the best on validation is
                                   copied into student/, lambda_choice.json says which and why
    predictions_oof_<model>.csv    each patient's repeat-averaged out-of-fold prediction
    table.csv, report.md, ...      the evidence (pcrjax.evidence.report)
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import ml_collections

from tfds_ispy2.ispy2 import schema

NETWORK = 'network'  # Trained by pcrjax.train with `config.stage = name`.
REFERENCE = 'reference'  # Fitted by the protocol inside each training fold (no epochs to select).


@dataclasses.dataclass(frozen=True)
class Model:
  """One row of the protocol's table."""

  name: str  # Directory name and key.
  label: str  # The name every table and figure shows.
  time_points: tuple[int, ...]  # Visit indices it sees (0 = T0); () = clinical data only.
  kind: str  # NETWORK or REFERENCE.
  compared: bool  # An early predictor: enters the pairwise DeLong tests.
  colour: str
  teacher: str = ''  # The network whose frozen latent it regresses: trained first, on the same fold.
  synthetic_only: bool = False  # Reads the phantom's truth: exists for synthetic cohorts only.
  note: str = ''  # Why a row that is not compared is in the table.

  @property
  def visits(self) -> str:
    return '+'.join(schema.VISITS[t] for t in self.time_points) or 'clinical'


# Table order. The paper's comparison is student vs baseline (PRIMARY). References are fitted
# logistic models: what the clinic knows before treatment (subtype), the I-SPY imaging biomarker
# (FTV), and both; rows that are not compared are reference points, not methods.
MODELS = (
    Model('baseline', 'Baseline (single-stage)', (0, 1), NETWORK, True, '#1f77b4'),
    Model('student', 'Student (two-stage dual-task)', (0, 1), NETWORK, True, '#d62728',
          teacher='teacher'),
    Model('subtype', 'Subtype only (HR, HER2)', (), REFERENCE, True, '#8c564b'),
    Model('ftv', 'FTV (log FTV0, change at T1)', (0, 1), REFERENCE, True, '#2ca02c'),
    Model('ftv_subtype', 'FTV + subtype (I-SPY clinical model)', (0, 1), REFERENCE, True,
          '#17becf'),
    Model('oracle', 'Oracle (phantom truth): the ceiling', (0, 1), REFERENCE, False, '#7f7f7f',
          synthetic_only=True,
          note='reads the phantom\'s true tumour volume and Ktrans at T0 and T1 (with subtype): the'
               ' ceiling of what T0 + T1 hold in this cohort, not a method'),
    Model('teacher', 'Teacher (sees T2)', (0, 1, 2), NETWORK, False, '#9467bd',
          note='sees T2 (12 weeks): the reference the student learns from, not an early predictor'),
)
PRIMARY = ('baseline', 'student')  # (reference, method) of the bottom line.


def model(name: str) -> Model:
  for m in MODELS:
    if m.name == name:
      return m
  raise KeyError(f'No model {name!r} in the run contract (pcrjax.runs.MODELS): '
                 f'{[m.name for m in MODELS]}')


def networks_in_training_order() -> list[Model]:
  """The trained models, each after the teacher it learns from."""
  return sorted((m for m in MODELS if m.kind == NETWORK), key=lambda m: bool(m.teacher))


# --- Layout. ---------------------------------------------------------------------------------------

CONFIG_FILE = 'config.json'
CODE_VERSION_FILE = 'code_version.txt'
METRICS_FILE = 'metrics.jsonl'
SELECTION_FILE = 'selection.json'  # The epoch chosen on validation, and its metric.
CHECKPOINTS_DIR = 'checkpoints'
FTV_TABLE_FILE = 'ftv.csv'
COHORT_FACTS_FILE = 'cohort_facts.json'  # What the protocol measured of the cohort itself.
LAMBDA_CHOICE_FILE = 'lambda_choice.json'  # The candidates' validation metrics, the lambda kept.
LOCK_FILE = '.lock'  # Held by the one process writing the workdir: {pid, host, started}.
# The log of what ran in a directory, appended to by each run: the main command's in its workdir,
# each protocol training's in its stage directory, a parallel protocol task's output in its task's.
LOG_FILE = 'log.txt'
TIMING_FILE = 'timing.json'  # A training's wall time per phase (pcrjax.wall_time).
WALL_TIME_FILE = 'wall_time.json'  # The protocol's last run's wall time per phase.
SPLITS = ('val', 'test')  # Written in this order: a stage with its test predictions is finished.


def task_dir(workdir: str, repeat: int, fold: int) -> str:
  """One protocol task: the networks of one fold of one repeat (trained in order, in one process)."""
  return os.path.join(workdir, f'repeat_{repeat}', f'fold_{fold}')


def stage_dir(workdir: str, repeat: int, fold: int, model_name: str) -> str:
  return os.path.join(task_dir(workdir, repeat, fold), model_name)


def cross_fit_dir(teacher_dir: str, part: int) -> str:
  return os.path.join(teacher_dir, 'cross_fit', f'part_{part}')


def lambda_dir(student_dir: str, weight: float) -> str:
  return os.path.join(student_dir, f'lambda_{weight:g}')


def adopt_run(candidate: str, directory: str) -> None:
  """Makes the finished run in `candidate` the run in `directory`: its checkpoints, metrics,
  selection and predictions (the test predictions last: then `directory` is finished)."""
  shutil.rmtree(os.path.join(directory, CHECKPOINTS_DIR), ignore_errors=True)
  shutil.copytree(os.path.join(candidate, CHECKPOINTS_DIR), os.path.join(directory, CHECKPOINTS_DIR))
  for name in (METRICS_FILE, SELECTION_FILE) + tuple(
      os.path.basename(predictions_path(candidate, split)) for split in SPLITS):
    shutil.copyfile(os.path.join(candidate, name), os.path.join(directory, name))


def predictions_path(directory: str, split: str) -> str:
  return os.path.join(directory, f'predictions_{split}.csv')


def oof_predictions_path(workdir: str, model_name: str) -> str:
  return os.path.join(workdir, f'predictions_oof_{model_name}.csv')


def is_finished(directory: str) -> bool:
  return os.path.exists(predictions_path(directory, SPLITS[-1]))


def finished_models(workdir: str, *, num_repeats: int, num_folds: int) -> list[Model]:
  """The models whose every repeat and fold has finished, in table order."""
  return [m for m in MODELS
          if all(is_finished(stage_dir(workdir, r, k, m.name))
                 for r in range(num_repeats) for k in range(num_folds))]


def write_config(directory: str, config: ml_collections.ConfigDict) -> None:
  os.makedirs(directory, exist_ok=True)
  with atomic_open(os.path.join(directory, CONFIG_FILE)) as f:
    f.write(config.to_json_best_effort(indent=2))


def read_config(directory: str) -> ml_collections.ConfigDict:
  """The config a run was started with; its lists are the tuples it was written from (JSON has
  none), so that it trains exactly as the original."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: {directory} is not a pcrjax run.')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f, object_hook=lambda d: {
        k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}))


def write_selection(directory: str, *, epoch: int, metric: str, value: float) -> None:
  with atomic_open(os.path.join(directory, SELECTION_FILE)) as f:
    json.dump({'epoch': int(epoch), 'metric': metric, 'value': float(value)}, f)


def read_selection(directory: str) -> dict | None:
  """{'epoch', 'metric', 'value'} of a finished network run; None before it is written."""
  path = os.path.join(directory, SELECTION_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def selected_epoch(directory: str) -> int | None:
  selection = read_selection(directory)
  return selection and selection['epoch']


# --- Predictions. ----------------------------------------------------------------------------------

PREDICTION_FIELDS = ('patient_id', 'label', 'prob', 'subtype', 'fold', 'arm')
OUT_OF_FOLD = -1  # The `fold` of a pooled out-of-fold row.


def prediction_row(*, patient_id: str, label: int, prob: float, subtype: str, fold: int,
                   arm: str) -> dict:
  """One patient's prediction: de-identified id, label, probability and the report's strata."""
  prob = float(prob)
  if not (math.isfinite(prob) and 0.0 <= prob <= 1.0):
    raise ValueError(f'Patient {patient_id}: probability {prob} is not a finite value in [0, 1].')
  if int(label) not in (0, 1):
    raise ValueError(f'Patient {patient_id}: label {label!r} is not 0 or 1.')
  return {'patient_id': str(patient_id), 'label': int(label), 'prob': prob, 'subtype': str(subtype),
          'fold': int(fold), 'arm': str(arm)}


def write_predictions(path: str, rows: list[dict]) -> None:
  """Writes atomically: a file that exists is complete (the protocol resumes on that)."""
  with atomic_open(path, newline='') as f:
    writer = csv.DictWriter(f, fieldnames=PREDICTION_FIELDS)
    writer.writeheader()
    for row in rows:
      writer.writerow({**row, 'prob': f"{row['prob']:.6f}"})


def read_predictions(path: str) -> list[dict]:
  with open(path, newline='') as f:
    return [prediction_row(**row) for row in csv.DictReader(f)]


# --- Writing: whole files, and a full disk named. -------------------------------------------------


@contextlib.contextmanager
def atomic_open(path: str, mode: str = 'w', **kwargs):
  """`open(path, mode)` through `<path>.<pid>.tmp`, moved into place when the body finishes.

  A file that exists is whole: a killed or failed write leaves the previous version, and processes
  writing the same file (the jobs of a job array) do not mix their bytes. An OSError of the write
  names `path` (a full disk's ENOSPC, raised by write or close, names no file).
  """
  tmp = f'{path}.{os.getpid()}.tmp'
  try:
    with open(tmp, mode, **kwargs) as f:
      yield f
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    if isinstance(e, OSError) and e.filename in (None, tmp):
      raise OSError(e.errno, e.strerror, path) from None
    raise


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How Orbax and TensorStore report it: a ValueError whose message quotes the files.
_DISK_FULL_MESSAGE = re.compile(r"No space left on device|Disk quota exceeded|os_error_code='(28|122)'")
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')


def disk_full_path(error: BaseException | None) -> str | None:
  """The file a write could not finish for want of disk space, if that is what `error` or an
  exception it was raised from is (the first one that names a file); None otherwise."""
  paths = []
  while error is not None:
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
      paths.append(os.fspath(error.filename) if error.filename else None)
    elif _DISK_FULL_MESSAGE.search(str(error)):
      paths.append((_QUOTED_PATH.findall(str(error)) or [None])[-1])
    error = error.__cause__ or error.__context__
  if not paths:
    return None
  return next((p for p in reversed(paths) if p), '(unnamed file)')


@contextlib.contextmanager
def exit_in_one_line_if_disk_full(then: str = ''):
  """For a command's main: a full disk ends the program with one line naming the file (the free
  space left there, what to do, and `then`), not a traceback; any other error passes through."""
  try:
    yield
  except Exception as e:  # noqa: BLE001 -- re-raised unless it is a full disk.
    if (path := disk_full_path(e)) is None:
      raise
    folder = os.path.dirname(path)
    while folder and not os.path.isdir(folder):
      folder = os.path.dirname(folder)
    free = f' ({shutil.disk_usage(folder).free / 2**20:.1f} MiB free there)' if folder else ''
    sys.exit(f'FATAL No space left on device writing {path}{free}: free some space, then run the same'
             f' command again{then}.')


# --- One writer per workdir. ----------------------------------------------------------------------


class WorkdirInUse(RuntimeError):
  """Another live process holds the workdir."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, another user's.
    return True
  return True


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds <workdir>/.lock while the body runs; a second run on the workdir stops at once.

  The lock is written whole and then linked into place (atomic: never seen half-written). One left
  by a killed run (its pid gone, on this host) is taken over; one held on another host cannot be
  checked from here and is refused, naming the file to delete.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  mine = {'pid': os.getpid(), 'host': socket.gethostname(),
          'started': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
  tmp = f'{path}.{mine["pid"]}'
  with open(tmp, 'w') as f:
    json.dump(mine, f)
  try:
    while True:
      try:
        os.link(tmp, path)
        break
      except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
          with open(path) as f:
            holder = json.load(f)
          if holder['host'] == mine['host'] and not _alive(int(holder['pid'])):
            os.remove(path)  # Stale: its run is gone.
            continue
          elsewhere = '' if holder['host'] == mine['host'] else f' (if that run is dead, delete {path})'
          raise WorkdirInUse(f'{workdir} is in use by pid {holder["pid"]} on {holder["host"]} since'
                             f' {holder["started"]}{elsewhere}: one run per workdir.')
  finally:
    os.remove(tmp)
  try:
    yield
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


# --- Code version. ---------------------------------------------------------------------------------


def code_version() -> str:
  """`git describe` of the code now running ('unknown' outside a git checkout)."""
  try:
    return subprocess.run(['git', 'describe', '--always', '--dirty'], capture_output=True, text=True,
                          cwd=os.path.dirname(__file__), check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def record_code_version(workdir: str) -> None:
  """Keeps the code that started a run: a resumed run does not overwrite it."""
  path = os.path.join(workdir, CODE_VERSION_FILE)
  if not os.path.exists(path):
    with atomic_open(path) as f:
      f.write(code_version() + '\n')


def recorded_code_version(workdir: str) -> str:
  path = os.path.join(workdir, CODE_VERSION_FILE)
  if not os.path.exists(path):
    return 'unknown'
  with open(path) as f:
    return f.read().strip()
