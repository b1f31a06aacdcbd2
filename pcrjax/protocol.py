"""The paper's protocol: repeats x folds x (baseline, teacher, student, FTV), pooled out of fold.

Each fold's teacher is trained on that fold's training patients only, and that fold's student
learns from it; a teacher that had seen the test patients would leak their labels. The clinical
FTV model (pcrjax.ftv) is fitted on the same training patients. Each repeat draws new folds and a
new initialisation (seeds + repeat). Finished stages are skipped, so an interrupted protocol resumes
where it stopped. The evidence (tables, figures, report) is built by pcrjax.report from the
predictions files alone.
"""

from __future__ import annotations

import csv
import os

import ml_collections
import numpy as np
from absl import logging

from pcrjax import configs, evaluation, folds, ftv, input_pipeline, report, train

NETWORK_STAGES = ('baseline', 'teacher', 'student')  # In training order: teacher before student.


def stage_workdir(workdir: str, repeat: int, fold: int, model: str) -> str:
  return os.path.join(workdir, f'repeat_{repeat}', f'fold_{fold}', model)


def repeat_config(config: ml_collections.ConfigDict, repeat: int) -> ml_collections.ConfigDict:
  """Repeat r: fold assignment and initialisation seeds shifted by r."""
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.seed = config.seed + repeat
  cfg.data.fold_seed = config.data.fold_seed + repeat
  return cfg


def stage_config(config: ml_collections.ConfigDict, stage: str, repeat: int, fold: int,
                 workdir: str) -> ml_collections.ConfigDict:
  """The protocol's config turned into one stage's config on one fold of one repeat."""
  cfg = repeat_config(config, repeat)
  for protocol_only in ('bootstrap_replicates', 'num_repeats', 'calibration'):
    del cfg[protocol_only]
  cfg.stage = stage
  cfg.data.fold = fold
  cfg.data.time_points = configs.STAGE_TIME_POINTS[stage]
  cfg.teacher_workdir = (stage_workdir(workdir, repeat, fold, 'teacher') if stage == 'student' else '')
  return cfg


def run(config: ml_collections.ConfigDict, workdir: str) -> list[evaluation.Row]:
  """Trains whatever is not finished yet, then builds the report; returns the main table."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  version_path = os.path.join(workdir, 'code_version.txt')
  if not os.path.exists(version_path):  # The code that started the run (a resumed run keeps it).
    with open(version_path, 'w') as f:
      f.write(report.code_version() + '\n')
  for repeat in range(config.num_repeats):
    for fold in range(config.data.num_folds):
      for stage in NETWORK_STAGES:
        stage_dir = stage_workdir(workdir, repeat, fold, stage)
        if os.path.exists(os.path.join(stage_dir, 'predictions_test.csv')):
          logging.info('repeat %d fold %d %s: finished earlier, skipped.', repeat, fold, stage)
          continue
        logging.info('repeat %d/%d fold %d/%d: training the %s.', repeat, config.num_repeats, fold,
                     config.data.num_folds, stage)
        train.train_and_evaluate(stage_config(config, stage, repeat, fold, workdir), stage_dir)
    fit_ftv_models(repeat_config(config, repeat), workdir, repeat)
  return report.build(workdir)


def fit_ftv_models(config: ml_collections.ConfigDict, workdir: str, repeat: int) -> None:
  """The clinical baseline: FTV at T0 and its change at T1, a logistic model per training fold."""
  source = input_pipeline.load_source(config.data)
  cohort = input_pipeline.read_cohort(input_pipeline.load_source(config.data, with_images=False))
  volumes = ftv_table(source, cohort, os.path.join(workdir, 'ftv.csv'))
  stratum = folds.strata(cohort.pcr, cohort.subtype)
  for fold in range(config.data.num_folds):
    split = folds.split_fold(cohort.patient_id, stratum, num_folds=config.data.num_folds, fold=fold,
                             seed=config.data.fold_seed, val_fraction=config.data.val_fraction)
    train_rows = np.concatenate([split.train, split.val])  # No epochs to select: fit on both.
    model = ftv.FTVModel().fit(volumes[train_rows], cohort.pcr[train_rows])
    out_dir = stage_workdir(workdir, repeat, fold, 'ftv')
    os.makedirs(out_dir, exist_ok=True)
    for name, rows in (('val', split.val), ('test', split.test)):
      evaluation.write_predictions(os.path.join(out_dir, f'predictions_{name}.csv'), [
          {'patient_id': cohort.patient_id[r], 'label': int(cohort.pcr[r]), 'prob': float(p),
           'subtype': cohort.subtype_names[cohort.subtype[r]], 'fold': fold, 'arm': cohort.arm[r]}
          for r, p in zip(rows, model.predict_proba(volumes[rows]))])


def ftv_table(source, cohort: input_pipeline.Cohort, path: str) -> np.ndarray:
  """FTV (mm^3) of every patient at T0..T3, [N, 4]; computed once and kept in `path` (ftv.csv)."""
  if not os.path.exists(path):
    rows = [[cohort.patient_id[i]] + [f'{v:.1f}' for v in ftv.ftv_per_visit(source[i])]
            for i in range(len(cohort))]
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
      writer = csv.writer(f)
      writer.writerow(['patient_id'] + [f'ftv_{v}_mm3' for v in configs.VISIT_NAMES])
      writer.writerows(rows)
    os.replace(tmp, path)
  with open(path, newline='') as f:
    by_id = {row[0]: [float(x) for x in row[1:]] for row in list(csv.reader(f))[1:]}
  return np.array([by_id[pid] for pid in cohort.patient_id])
