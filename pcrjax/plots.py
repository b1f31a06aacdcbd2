"""The report's figures (matplotlib, PNG), each readable at a glance."""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as sk_metrics  # noqa: E402

from pcrjax import calibration, evaluation, stats  # noqa: E402

COLOURS = {'baseline': '#1f77b4', 'student': '#d62728', 'ftv': '#2ca02c', 'teacher': '#7f7f7f'}


def roc_curves(path: str, predictions: dict, table: list, *, seed: int, num_replicates: int = 500):
  """ROC of every model with a 95 % stratified-bootstrap band of the sensitivity."""
  fpr_grid = np.linspace(0, 1, 101)
  fig, ax = plt.subplots(figsize=(5.5, 5.5))
  for row in table:
    pred = predictions[row.name]
    labels, probs = pred.label, pred.mean_prob
    rng = np.random.default_rng(seed)
    bands = []
    for index in stats.stratified_bootstrap_indices(labels, num_replicates, rng):
      fpr, tpr, _ = sk_metrics.roc_curve(labels[index], probs[index])
      bands.append(np.interp(fpr_grid, fpr, tpr))
    low, high = np.percentile(bands, [2.5, 97.5], axis=0)
    fpr, tpr, _ = sk_metrics.roc_curve(labels, probs)
    colour = COLOURS[row.name]
    ax.fill_between(fpr_grid, low, high, color=colour, alpha=0.12, linewidth=0)
    ax.plot(fpr, tpr, color=colour,
            label=f'{evaluation.LABELS[row.name]}, {row.time_points}: {row.auroc:.3f}')
  ax.plot([0, 1], [0, 1], color='grey', linestyle=':', linewidth=1)
  ax.set(xlabel='1 - specificity', ylabel='Sensitivity', title='Out-of-fold ROC (95 % bands)',
         aspect='equal', xlim=(0, 1), ylim=(0, 1))
  ax.legend(loc='lower right', fontsize=7)
  _save(fig, path)


def reliability(path: str, predictions: dict):
  fig, ax = plt.subplots(figsize=(5.5, 5.5))
  for name, pred in predictions.items():
    predicted, observed, counts = calibration.reliability_curve(pred.label, pred.mean_prob)
    ax.plot(predicted, observed, marker='o', color=COLOURS[name], label=evaluation.LABELS[name])
  ax.plot([0, 1], [0, 1], color='grey', linestyle=':', linewidth=1)
  ax.set(xlabel='Predicted probability of pCR', ylabel='Observed pCR fraction',
         title='Calibration (deciles of prediction)', aspect='equal', xlim=(0, 1), ylim=(0, 1))
  ax.legend(loc='upper left', fontsize=7)
  _save(fig, path)


def forest(path: str, subgroup_rows: list[dict]):
  """AUROC with CI per HR/HER2 subtype and model; "too few" where a subgroup cannot support one."""
  rows = [r for r in subgroup_rows if r['kind'] == 'subtype']
  groups = sorted({r['group'] for r in rows})
  models = list(dict.fromkeys(r['model'] for r in rows))
  fig, ax = plt.subplots(figsize=(7, 0.9 + 0.55 * len(groups) * len(models)))
  y = 0
  ticks, labels = [], []
  for group in groups:
    for model in models:
      row = next(r for r in rows if r['group'] == group and r['model'] == model)
      if row['auroc'] is None:
        ax.text(0.5, y, 'too few', va='center', ha='center', fontsize=7, color='grey')
      else:
        ax.errorbar(row['auroc'], y, xerr=[[row['auroc'] - row['ci_low']], [row['ci_high'] - row['auroc']]],
                    fmt='o', color=COLOURS[model], capsize=3)
      ticks.append(y)
      labels.append(f"{group} · {model} (n={row['patients']}, pCR {row['pcr']})")
      y -= 1
    y -= 0.5
  ax.axvline(0.5, color='grey', linestyle=':', linewidth=1)
  ax.set_yticks(ticks, labels, fontsize=7)
  ax.set(xlim=(0, 1), xlabel='AUROC (95 % CI)', title='AUROC by HR/HER2 subtype')
  _save(fig, path)


def learning_curves(path: str, run_dir: str, *, num_folds: int, stages=('baseline', 'teacher', 'student')):
  """Training loss and validation AUROC per epoch, every fold of the first repeat."""
  fig, axes = plt.subplots(2, len(stages), figsize=(4 * len(stages), 6), sharex=True, squeeze=False)
  for column, stage in enumerate(stages):
    for fold in range(num_folds):
      metrics_path = os.path.join(run_dir, 'repeat_0', f'fold_{fold}', stage, 'metrics.jsonl')
      if not os.path.exists(metrics_path):
        continue
      with open(metrics_path) as f:
        lines = [json.loads(line) for line in f]
      epochs = [m['epoch'] for m in lines]
      axes[0, column].plot(epochs, [m['train_loss'] for m in lines], linewidth=1, label=f'fold {fold}')
      axes[1, column].plot(epochs, [m['val_auroc'] for m in lines], linewidth=1)
    axes[0, column].set_title(evaluation.LABELS[stage], fontsize=9)
    axes[0, column].set_ylabel('training loss')
    axes[1, column].set(xlabel='epoch', ylabel='validation AUROC', ylim=(0, 1))
  axes[0, 0].legend(fontsize=7)
  _save(fig, path)


def _save(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)
