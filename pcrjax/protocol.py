"""The paper's protocol: k folds x (baseline, teacher, student), pooled out-of-fold, one table.

Each fold's teacher is trained on that fold's training patients only, and that fold's student
learns from it; a teacher that had seen the test patients would leak their labels. Finished stages
are skipped, so an interrupted protocol resumes where it stopped.
"""

from __future__ import annotations

import csv
import os
import subprocess
import time

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402
from sklearn import metrics as sk_metrics  # noqa: E402

from pcrjax import configs, evaluation, train  # noqa: E402

STAGES = ('baseline', 'teacher', 'student')
LABELS = {'baseline': 'Baseline (single-stage, single-task)', 'teacher': 'Teacher (stage 1)',
          'student': 'Student (two-stage, dual-task)'}


def stage_workdir(workdir: str, fold: int, stage: str) -> str:
  return os.path.join(workdir, f'fold_{fold}', stage)


def stage_config(config: ml_collections.ConfigDict, stage: str, fold: int,
                 workdir: str) -> ml_collections.ConfigDict:
  """The protocol's config turned into one stage's config on one fold."""
  stage_cfg = ml_collections.ConfigDict(config.to_dict())
  del stage_cfg['bootstrap_replicates']
  stage_cfg.stage = stage
  stage_cfg.data.fold = fold
  stage_cfg.data.time_points = configs.STAGE_TIME_POINTS[stage]
  stage_cfg.teacher_workdir = stage_workdir(workdir, fold, 'teacher') if stage == 'student' else ''
  return stage_cfg


def time_points_label(time_points) -> str:
  return '+'.join(configs.VISIT_NAMES[t] for t in time_points)


def run(config: ml_collections.ConfigDict, workdir: str) -> list[evaluation.Row]:
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  started, version = time.time(), code_version()
  for fold in range(config.data.num_folds):
    for stage in STAGES:  # The teacher before the student that learns from it.
      stage_dir = stage_workdir(workdir, fold, stage)
      if os.path.exists(os.path.join(stage_dir, 'predictions_test.csv')):
        logging.info('fold %d %s: finished earlier, skipped.', fold, stage)
        continue
      logging.info('fold %d/%d: training the %s.', fold, config.data.num_folds, stage)
      train.train_and_evaluate(stage_config(config, stage, fold, workdir), stage_dir)
  wall_seconds = time.time() - started

  predictions = {}
  for stage in STAGES:
    predictions[stage] = [p for fold in range(config.data.num_folds) for p in evaluation.read_predictions(
        os.path.join(stage_workdir(workdir, fold, stage), 'predictions_test.csv'))]
    evaluation.write_predictions(os.path.join(workdir, f'predictions_oof_{stage}.csv'),
                                 predictions[stage])
  time_points = {s: time_points_label(configs.STAGE_TIME_POINTS[s]) for s in STAGES}
  table = evaluation.comparison_table(predictions, time_points, reference='baseline',
                                      compared=('student',), seed=config.seed,
                                      num_replicates=config.bootstrap_replicates)
  write_table(os.path.join(workdir, 'table.csv'), table)
  plot_roc(os.path.join(workdir, 'roc.png'), predictions, table)
  report = render_report(config, table, wall_seconds, version)
  with open(os.path.join(workdir, 'report.md'), 'w') as f:
    f.write(report)
  print(report)
  return table


def write_table(path: str, table: list[evaluation.Row]) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['model', 'time_points', 'patients', 'pcr', 'auroc', 'ci_low', 'ci_high',
                     'delong_p_vs_baseline'])
    for row in table:
      writer.writerow([row.name, row.time_points, row.num_patients, row.num_pcr, f'{row.auroc:.4f}',
                       f'{row.ci_low:.4f}', f'{row.ci_high:.4f}',
                       '' if row.p_vs_reference is None else f'{row.p_vs_reference:.4g}'])


def plot_roc(path: str, predictions: dict[str, list[dict]], table: list[evaluation.Row]) -> None:
  fig, ax = plt.subplots(figsize=(5, 5))
  for row in table:
    labels = [p['label'] for p in predictions[row.name]]
    probs = [p['prob'] for p in predictions[row.name]]
    fpr, tpr, _ = sk_metrics.roc_curve(labels, probs)
    ax.plot(fpr, tpr, label=f'{LABELS[row.name]}, {row.time_points}: {row.auroc:.3f}')
  ax.plot([0, 1], [0, 1], color='grey', linestyle=':', linewidth=1)
  ax.set(xlabel='1 - specificity', ylabel='Sensitivity', title='Out-of-fold ROC, pCR', aspect='equal')
  ax.legend(loc='lower right', fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=150)
  plt.close(fig)


def code_version() -> str:
  try:
    return subprocess.run(['git', 'describe', '--always', '--dirty'], capture_output=True, text=True,
                          cwd=os.path.dirname(__file__), check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def render_report(config: ml_collections.ConfigDict, table: list[evaluation.Row],
                  wall_seconds: float, version: str) -> str:
  n, n_pcr = table[0].num_patients, table[0].num_pcr
  lines = [
      '# pCR prediction: single-stage vs two-stage dual-task',
      '',
      f'Data: `{config.data.dataset}` ({"synthetic phantom" if "synthetic" in config.data.dataset else "TCIA"}),'
      f' {n} patients, {n_pcr} pCR ({100 * n_pcr / n:.1f} %); {config.data.num_folds}-fold'
      f' cross-validation stratified by pCR x subtype (fold seed {config.data.fold_seed}),'
      f' representation `{config.data.representation}`; code {version}; wall time'
      f' {wall_seconds / 60:.1f} min.',
      '',
      '| Model | Time points | AUROC | 95 % CI | DeLong p vs baseline |',
      '| --- | --- | --- | --- | --- |',
  ]
  for row in table:
    p = '' if row.p_vs_reference is None else f'{row.p_vs_reference:.3g}'
    lines.append(f'| {LABELS[row.name]} | {row.time_points} | {row.auroc:.3f} |'
                 f' {row.ci_low:.3f}-{row.ci_high:.3f} | {p} |')
  lines += [
      '',
      'AUROC of the pooled out-of-fold test predictions; CI: stratified bootstrap with'
      f' {config.bootstrap_replicates} replicates (pROC convention); p: paired two-sided DeLong test'
      ' on the same patients. The teacher sees T2'
      ' (12 weeks) and is the upper reference the student learns from, not an early predictor.',
      '',
  ]
  return '\n'.join(lines)
