"""The paper's protocol: every model of the run contract (pcrjax.runs.MODELS), on every fold of
every repeat, pooled out of fold into the report.

Each fold's teacher is trained on that fold's training patients only, and that fold's student
learns from it; a teacher that had seen the test patients would leak their labels. The reference
models (pcrjax.references) are fitted on the same training patients. Each repeat draws new
folds and a new initialisation (seeds + repeat). Finished stages are skipped, so an interrupted
protocol resumes where it stopped. The evidence is built by pcrjax.evidence.run_report from the
predictions files alone.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import time

import ml_collections
import numpy as np
import tqdm
from absl import logging

from pcrjax import (
    console,
    fileio,
    input_pipeline,
    parallel,
    references,
    runs,
    sharding,
    train,
    wall_time,
)
from pcrjax.evidence import run_report, tables
from tfds_ispy2.ispy2 import schema


def repeat_config(
    config: ml_collections.ConfigDict, repeat: int
) -> ml_collections.ConfigDict:
  """Repeat r: fold assignment and initialisation seeds shifted by r."""
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.seed = config.seed + repeat
  cfg.data.fold_seed = config.data.fold_seed + repeat
  return cfg


def stage_config(
    config: ml_collections.ConfigDict,
    stage: str,
    repeat: int,
    fold: int,
    workdir: str,
) -> ml_collections.ConfigDict:
  """The protocol's config turned into one network's config on one fold of one repeat."""
  cfg = repeat_config(config, repeat)
  del cfg['protocol']
  spec = runs.model(stage)
  cfg.stage = stage
  cfg.data.fold = fold
  cfg.data.time_points = spec.time_points
  cfg.teacher_workdir = (
      runs.stage_dir(workdir, repeat, fold, spec.teacher)
      if spec.teacher
      else ''
  )
  return cfg


def run(config: ml_collections.ConfigDict, workdir: str) -> list[tables.Row]:
  """Trains and fits whatever is not finished yet, then builds the report; returns the main table.

  With `config.protocol.task` >= 0 it trains that task alone and returns [] (a job of a job
  array; a last run without it fits the references and builds the report). A progress bar with an
  ETA counts the trainings, the reference fits of a repeat as one; a line says each training's
  result, and the last one where the wall time went (runs.WALL_TIME_FILE, in the report too).
  """
  workdir = os.path.abspath(workdir)
  started, clock = time.time(), wall_time.Clock(excludes_trainings=False)
  protocol_config = ml_collections.ConfigDict(config.to_dict())
  protocol_config.protocol.task = (
      -1
  )  # The workdir's config is the protocol's, not one job's.
  if sharding.is_primary():
    runs.write_config(workdir, protocol_config)
    runs.record_code_version(workdir)
  input_pipeline.load_cohort(config.data)  # Built once, before any training.
  clock.lap('dataset_build')
  protocol = config.protocol
  if protocol.task >= 0:
    train_task(config, workdir, protocol.task)
    return []
  networks = runs.networks_in_training_order()
  num_tasks = protocol.num_repeats * config.data.num_folds
  with tqdm.tqdm(
      total=num_tasks * len(networks) + protocol.num_repeats, unit='training'
  ) as bar:
    if protocol.parallel_trainings > 1:
      bar.set_description(f'trainings, {protocol.parallel_trainings} at a time')
      for task in parallel.run_tasks(
          workdir, num_tasks, config.data.num_folds, protocol.parallel_trainings
      ):
        repeat, fold = divmod(task, config.data.num_folds)
        for spec in networks:
          console.say(
              f'{spec.name}, repeat {repeat} fold {fold}: '
              + training_result(
                  runs.stage_dir(workdir, repeat, fold, spec.name)
              )
          )
        bar.update(len(networks))
    else:
      for task in range(num_tasks):
        train_task(config, workdir, task, bar=bar)
    clock.lap('trainings')
    if (
        not sharding.is_primary()
    ):  # Of several processes training together, one writes the rest.
      return []
    for repeat in range(protocol.num_repeats):
      bar.set_description(
          f'training {bar.n + 1}/{bar.total}: repeat {repeat} reference models'
      )
      fit_reference_models(repeat_config(config, repeat), workdir, repeat)
      bar.update()
    clock.lap('reference_fits')
  wall_time.record_protocol(
      workdir, clock, started=started
  )  # For the report's facts.
  table = run_report.build(workdir)
  clock.lap('report')
  spent = wall_time.record_protocol(workdir, clock, started=started)
  console.say(f'The protocol: {wall_time.describe(spent)}.')
  return table


def train_task(
    config: ml_collections.ConfigDict, workdir: str, task: int, bar=None
) -> None:
  """Task t = repeat * num_folds + fold: that fold's networks, each after the teacher it learns
  from; finished ones are skipped."""
  repeat, fold = divmod(task, config.data.num_folds)
  lock = (
      fileio.workdir_lock(runs.lock_path(runs.task_dir(workdir, repeat, fold)))
      if sharding.is_primary()
      else contextlib.nullcontext()
  )
  with lock:  # One writer per task, in job arrays too.
    _train_networks(config, workdir, repeat, fold, bar)


def _train_networks(config, workdir, repeat, fold, bar) -> None:
  for spec in runs.networks_in_training_order():
    if bar is not None:
      bar.set_description(
          f'training {bar.n + 1}/{bar.total}: repeat {repeat} fold {fold} {spec.name}'
      )
    directory = runs.stage_dir(workdir, repeat, fold, spec.name)
    earlier, primary = runs.is_finished(directory), sharding.is_primary()
    if not earlier:
      logging.info(
          'repeat %d/%d fold %d/%d: training the %s.',
          repeat,
          config.protocol.num_repeats,
          fold,
          config.data.num_folds,
          spec.name,
      )
      # Its own log: every line while it trains (its epochs', too).
      with (
          console.log_to(os.path.join(directory, runs.LOG_FILE))
          if primary
          else contextlib.nullcontext()
      ):
        train.train_and_evaluate(
            stage_config(config, spec.name, repeat, fold, workdir), directory
        )
    if primary:
      console.say(
          f'{spec.name}, repeat {repeat} fold {fold}: {training_result(directory)}'
          + (' (finished earlier)' if earlier else '')
      )
    if bar is not None:
      bar.update()


def training_result(directory: str) -> str:
  """A finished training in a few words: its epochs, the one selected on validation, and the
  seconds it took (its runs.TIMING_FILE, its lambda candidates' with them)."""
  config, selection = runs.read_config(directory), runs.read_selection(
      directory
  )
  window = config.selection_window
  mean = f' (mean of {window} epochs)' if window > 1 else ''
  seconds = wall_time.training_seconds(directory)
  took = f', {wall_time.format_seconds(seconds)}' if seconds is not None else ''
  return (
      f'{config.num_epochs} epochs, epoch {selection["epoch"]} selected, validation AUROC'
      f' {selection["value"]:.3f}{mean}{took}'
  )


def fit_reference_models(
    config: ml_collections.ConfigDict, workdir: str, repeat: int
) -> None:
  """Every reference model of the run contract, a logistic model per training fold."""
  source = input_pipeline.load_source(config.data)
  cohort = input_pipeline.load_cohort(config.data)
  ftv_mm3 = ftv_table(
      source, cohort, config.data, os.path.join(workdir, runs.FTV_TABLE_FILE)
  )
  inputs = references.features(
      cohort, ftv_mm3, references.phantom_truth(config.data, cohort.patient_id)
  )
  facts_path = os.path.join(workdir, runs.COHORT_FACTS_FILE)
  if not os.path.exists(facts_path):
    with fileio.atomic_open(facts_path) as f:
      json.dump(
          {
              't2_explained_r2': references.t2_explained(
                  config.data, cohort.patient_id
              )
          },
          f,
      )
  for spec in runs.MODELS:
    if spec.kind != runs.REFERENCE or (
        spec.synthetic_only and spec.name not in inputs
    ):
      continue
    for fold in range(config.data.num_folds):
      directory = runs.stage_dir(workdir, repeat, fold, spec.name)
      if runs.is_finished(directory):
        continue
      fold_config = ml_collections.ConfigDict(config.to_dict())
      fold_config.data.fold = fold
      split = train.data_split(
          fold_config, cohort
      )  # The networks' patients of that fold.
      fit_rows = np.concatenate(
          [split.train, split.val]
      )  # No epochs to select: fit on both.
      model = references.logistic_model().fit(
          inputs[spec.name][fit_rows], cohort.pcr[fit_rows]
      )
      os.makedirs(directory, exist_ok=True)
      for split_name in runs.SPLITS:
        rows = getattr(split, split_name)
        probs = model.predict_proba(inputs[spec.name][rows])[:, 1]
        runs.write_predictions(
            runs.predictions_path(directory, split_name),
            cohort.prediction_rows(rows, probs, fold),
        )


def ftv_table(
    source,
    cohort: input_pipeline.Cohort,
    data: ml_collections.ConfigDict,
    path: str,
) -> np.ndarray:
  """FTV (mm^3) of every patient at T0..T3, [N, 4]; taken once from the decoding pass the trainings
  keep (`input_pipeline.ftv_mm3`) and kept in `path` (ftv.csv)."""
  if not os.path.exists(path):
    volumes = input_pipeline.ftv_mm3(source, data)
    rows = [
        [pid] + [f'{v:.1f}' for v in mm3]
        for pid, mm3 in zip(cohort.patient_id, volumes)
    ]
    with fileio.atomic_open(path, newline='') as f:
      writer = csv.writer(f)
      writer.writerow(['patient_id'] + [f'ftv_{v}_mm3' for v in schema.VISITS])
      writer.writerows(rows)
  with open(path, newline='') as f:
    by_id = {
        row[0]: [float(x) for x in row[1:]] for row in list(csv.reader(f))[1:]
    }
  return np.array([by_id[pid] for pid in cohort.patient_id])
