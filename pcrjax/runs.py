"""The run contract, spelled once: the models a protocol compares, every file name of a workdir
and of an exported model, the predictions schema, discovery of finished models, and the code
version.

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
    table.csv, report.md, ...      the evidence (pcrjax.evidence.run_report)

An exported model (pcrjax.inference.packaging): model.json, MODEL_CARD.md and
members/repeat_<r>_fold_<k>/{config.json, params/}.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import subprocess
from collections.abc import Callable

import ml_collections

from pcrjax import fileio
from tfds_ispy2.ispy2 import schema

NETWORK = 'network'  # Trained by pcrjax.train with `config.stage = name`.
REFERENCE = 'reference'  # Fitted by the protocol inside each training fold (no epochs to select).


@dataclasses.dataclass(frozen=True)
class Model:
  """One row of the protocol's table."""

  name: str  # Directory name and key.
  label: str  # The name every table and figure shows.
  time_points: tuple[
      int, ...
  ]  # Visit indices it sees (0 = T0); () = clinical data only.
  kind: str  # How it is produced: NETWORK or REFERENCE.
  # A method predicting from the early visits: enters the pairwise DeLong tests, and as a network
  # may not see T2.
  early_predictor: bool
  colour: str
  # The network whose frozen outputs it regresses: trained first, on the same fold.
  teacher: str = ''
  synthetic_only: bool = (
      False  # Reads the phantom's truth: exists for synthetic cohorts only.
  )
  note: str = ''  # Why a row that is not an early predictor is in the table.

  @property
  def visits(self) -> str:
    return '+'.join(schema.VISITS[t] for t in self.time_points) or 'clinical'

  @property
  def is_teacher(self) -> bool:
    """Another model learns from its T2 outputs: it must see T2."""
    return any(m.teacher == self.name for m in MODELS)

  def feature_dim(self, target: str, teacher_latent: Callable[[], int]) -> int:
    """The width of its feature-regression head for the dual-task `target`: 0 without a teacher.

    `teacher_latent()`: the teacher's latent width (its `model.lstm_features`), asked only for the
    'latent' target, so that a target that needs no teacher needs no teacher's config either.
    """
    if not self.teacher:
      return 0
    if target == 'latent':
      return teacher_latent()
    if target == 'logit':
      return 1
    # Imported here: the run contract imports no JAX, and only a trainer asks for a kinetics head.
    from pcrjax import input_pipeline  # pylint: disable=g-import-not-at-top

    return (
        input_pipeline.NUM_KINETICS
    )  # The change of each tumour kinetic from T0 to T2.


def feature_dim(config) -> int:
  """A run's feature-regression head width: its stage's rule, its teacher's config read if needed."""
  return model(config.stage).feature_dim(
      config.dual_task.target,
      teacher_latent=lambda: read_config(
          config.teacher_workdir
      ).model.lstm_features,
  )


# Table order. The paper's comparison is student vs baseline (PRIMARY). References are fitted
# logistic models: what the clinic knows before treatment (subtype), the I-SPY imaging biomarker
# (FTV), and both; rows that are not early predictors are reference points, not methods.
MODELS = (
    Model(
        'baseline', 'Baseline (single-stage)', (0, 1), NETWORK, True, '#1f77b4'
    ),
    Model(
        'student',
        'Student (two-stage dual-task)',
        (0, 1),
        NETWORK,
        True,
        '#d62728',
        teacher='teacher',
    ),
    Model('subtype', 'Subtype only (HR, HER2)', (), REFERENCE, True, '#8c564b'),
    Model(
        'ftv',
        'FTV (log FTV0, change at T1)',
        (0, 1),
        REFERENCE,
        True,
        '#2ca02c',
    ),
    Model(
        'ftv_subtype',
        'FTV + subtype (I-SPY clinical model)',
        (0, 1),
        REFERENCE,
        True,
        '#17becf',
    ),
    Model(
        'oracle',
        'Oracle (phantom truth): the ceiling',
        (0, 1),
        REFERENCE,
        False,
        '#7f7f7f',
        synthetic_only=True,
        note="reads the phantom's true tumour volume and Ktrans at T0 and T1 (with subtype): the"
        ' ceiling of what T0 + T1 hold in this cohort, not a method',
    ),
    Model(
        'teacher',
        'Teacher (sees T2)',
        (0, 1, 2),
        NETWORK,
        False,
        '#9467bd',
        note='sees T2 (12 weeks): the reference the student learns from, not an early predictor',
    ),
)
PRIMARY = ('baseline', 'student')  # (reference, method) of the bottom line.


def model(name: str) -> Model:
  for m in MODELS:
    if m.name == name:
      return m
  raise KeyError(
      f'No model {name!r} in the run contract (pcrjax.runs.MODELS): '
      f'{[m.name for m in MODELS]}'
  )


def networks_in_training_order() -> list[Model]:
  """The trained models, each after the teacher it learns from."""
  return sorted(
      (m for m in MODELS if m.kind == NETWORK), key=lambda m: bool(m.teacher)
  )


def is_synthetic(dataset: str) -> bool:
  """Whether `dataset` (config.data.dataset) is one of the phantom's cohorts: its figures say
  nothing about patients, and its truth allows the synthetic-only rows."""
  return dataset.startswith('ispy2/synthetic')


# --- Layout. ---------------------------------------------------------------------------------------

CONFIG_FILE = 'config.json'
CODE_VERSION_FILE = 'code_version.txt'
METRICS_FILE = 'metrics.jsonl'
SELECTION_FILE = (
    'selection.json'  # The epoch chosen on validation, and its metric.
)
CHECKPOINTS_DIR = 'checkpoints'
FTV_TABLE_FILE = 'ftv.csv'
COHORT_FACTS_FILE = (
    'cohort_facts.json'  # What the protocol measured of the cohort itself.
)
LAMBDA_CHOICE_FILE = (
    'lambda_choice.json'  # The candidates' validation metrics, the lambda kept.
)
LOCK_FILE = '.lock'  # Held by the one process writing the workdir (lock_path).
# The log of what ran in a directory, appended to by each run: the main command's in its workdir,
# each protocol training's in its stage directory, a parallel protocol task's output in its task's.
LOG_FILE = 'log.txt'
TIMING_FILE = (
    'timing.json'  # A training's wall time per phase (pcrjax.wall_time).
)
WALL_TIME_FILE = (
    'wall_time.json'  # The protocol's last run's wall time per phase.
)
PROFILE_DIR = (
    'profile'  # A training's JAX profiler trace (config.profile_steps).
)
SPLITS = (
    'val',
    'test',
)  # Written in this order: a stage with its test predictions is finished.

# The evidence of a protocol workdir (pcrjax.evidence.run_report).
TABLE_FILE = 'table.csv'
PAIRWISE_FILE = 'pairwise.csv'
OPERATING_POINTS_FILE = 'operating_points.csv'
DECISION_CURVE_FILE = 'decision_curve.csv'
SUBGROUPS_FILE = 'subgroups.csv'
REPORT_FILE = 'report.md'
REPORT_PAGE_FILE = (
    'report.html'  # report.md with its figures inline: one file to send.
)
ROC_FIGURE = 'roc.png'
CALIBRATION_FIGURE = 'calibration.png'
DECISION_CURVE_FIGURE = 'decision_curve.png'
FOREST_FIGURE = 'forest.png'
LEARNING_CURVES_FIGURE = 'learning_curves.png'

# An exported model directory (pcrjax.inference.packaging).
MODEL_FILE = 'model.json'
MODEL_CARD_FILE = 'MODEL_CARD.md'
MEMBERS_DIR = 'members'
PARAMS_DIR = (
    'params'  # In a member's directory: its params, an Orbax checkpoint.
)

# What pcrjax.predict writes into its output folder: one patient's, or a folder's one row each.
PREDICTION_FILE = 'prediction.json'
PREDICTION_PAGE_FILE = 'prediction.html'
BATCH_PREDICTIONS_FILE = 'predictions.csv'


def lock_path(workdir: str) -> str:
  """The lock of the one process writing `workdir` (fileio.workdir_lock)."""
  return os.path.join(workdir, LOCK_FILE)


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
  selection and predictions (the test predictions last: then `directory` is finished).
  """
  shutil.rmtree(os.path.join(directory, CHECKPOINTS_DIR), ignore_errors=True)
  shutil.copytree(
      os.path.join(candidate, CHECKPOINTS_DIR),
      os.path.join(directory, CHECKPOINTS_DIR),
  )
  for name in (METRICS_FILE, SELECTION_FILE) + tuple(
      os.path.basename(predictions_path(candidate, split)) for split in SPLITS
  ):
    shutil.copyfile(
        os.path.join(candidate, name), os.path.join(directory, name)
    )


def member_name(repeat: int, fold: int) -> str:
  """An exported model's member: the network of one fold of one repeat."""
  return f'repeat_{repeat}_fold_{fold}'


def member_dir(model_dir: str, name: str) -> str:
  return os.path.join(model_dir, MEMBERS_DIR, name)


def predictions_path(directory: str, split: str) -> str:
  return os.path.join(directory, f'predictions_{split}.csv')


def oof_predictions_path(workdir: str, model_name: str) -> str:
  return os.path.join(workdir, f'predictions_oof_{model_name}.csv')


def is_finished(directory: str) -> bool:
  return os.path.exists(predictions_path(directory, SPLITS[-1]))


def finished_models(
    workdir: str, *, num_repeats: int, num_folds: int
) -> list[Model]:
  """The models whose every repeat and fold has finished, in table order."""
  return [
      m
      for m in MODELS
      if all(
          is_finished(stage_dir(workdir, r, k, m.name))
          for r in range(num_repeats)
          for k in range(num_folds)
      )
  ]


def write_config(directory: str, config: ml_collections.ConfigDict) -> None:
  os.makedirs(directory, exist_ok=True)
  with fileio.atomic_open(os.path.join(directory, CONFIG_FILE)) as f:
    f.write(config.to_json_best_effort(indent=2))


def read_config(directory: str) -> ml_collections.ConfigDict:
  """The config a run was started with; its lists are the tuples it was written from (JSON has
  none), so that it trains exactly as the original."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{path} does not exist: {directory} is not a pcrjax run.'
    )
  with open(path) as f:
    return ml_collections.ConfigDict(
        json.load(
            f,
            object_hook=lambda d: {
                k: tuple(v) if isinstance(v, list) else v for k, v in d.items()
            },
        )
    )


def write_selection(
    directory: str, *, epoch: int, metric: str, value: float
) -> None:
  with fileio.atomic_open(os.path.join(directory, SELECTION_FILE)) as f:
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


def prediction_row(
    *,
    patient_id: str,
    label: int,
    prob: float,
    subtype: str,
    fold: int,
    arm: str,
) -> dict:
  """One patient's prediction: de-identified id, label, probability and the report's strata."""
  prob = float(prob)
  if not (math.isfinite(prob) and 0.0 <= prob <= 1.0):
    raise ValueError(
        f'Patient {patient_id}: probability {prob} is not a finite value in [0, 1].'
    )
  if int(label) not in (0, 1):
    raise ValueError(f'Patient {patient_id}: label {label!r} is not 0 or 1.')
  return {
      'patient_id': str(patient_id),
      'label': int(label),
      'prob': prob,
      'subtype': str(subtype),
      'fold': int(fold),
      'arm': str(arm),
  }


def write_predictions(path: str, rows: list[dict]) -> None:
  """Writes atomically: a file that exists is complete (the protocol resumes on that)."""
  with fileio.atomic_open(path, newline='') as f:
    writer = csv.DictWriter(f, fieldnames=PREDICTION_FIELDS)
    writer.writeheader()
    for row in rows:
      writer.writerow({**row, 'prob': f"{row['prob']:.6f}"})


def read_predictions(path: str) -> list[dict]:
  with open(path, newline='') as f:
    return [prediction_row(**row) for row in csv.DictReader(f)]


# --- Code version. ---------------------------------------------------------------------------------


def code_version() -> str:
  """`git describe` of the code now running ('unknown' outside a git checkout)."""
  try:
    return subprocess.run(
        ['git', 'describe', '--always', '--dirty'],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(__file__),
        check=True,
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def record_code_version(workdir: str) -> None:
  """Keeps the code that started a run: a resumed run does not overwrite it."""
  path = os.path.join(workdir, CODE_VERSION_FILE)
  if not os.path.exists(path):
    with fileio.atomic_open(path) as f:
      f.write(code_version() + '\n')


def recorded_code_version(workdir: str) -> str:
  path = os.path.join(workdir, CODE_VERSION_FILE)
  if not os.path.exists(path):
    return 'unknown'
  with open(path) as f:
    return f.read().strip()
