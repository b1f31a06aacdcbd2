"""The report's figures (matplotlib, PNG), each readable at a glance; models named as in the tables."""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402
from sklearn import metrics as sk_metrics  # noqa: E402

from pcrjax import fileio, runs  # noqa: E402
from pcrjax.evidence import calibration, operating_points  # noqa: E402

CHANCE = dict(color='#bbbbbb', linestyle=':', linewidth=1)


def _line(spec: runs.Model) -> dict:
  """Networks solid, fitted references dashed: the two kinds of row apart at a glance."""
  return dict(
      color=spec.colour, linestyle='-' if spec.kind == runs.NETWORK else '--'
  )


def roc_curves(
    path: str,
    predictions: dict,
    table: list,
    *,
    seed: int,
    num_replicates: int = 500,
):
  """ROC of every model with a light 95 % stratified-bootstrap band of the sensitivity."""
  fpr_grid = np.linspace(0, 1, 101)
  fig, ax = plt.subplots(figsize=(6, 6))
  for row in table:
    pred, spec = predictions[row.name], runs.model(row.name)
    labels, probs = pred.label, pred.mean_prob
    low, high = operating_points.bootstrap_roc_band(
        labels, probs, fpr_grid, num_replicates=num_replicates, seed=seed
    )
    fpr, tpr, _ = sk_metrics.roc_curve(labels, probs)
    ax.fill_between(
        fpr_grid, low, high, color=spec.colour, alpha=0.06, linewidth=0
    )
    ax.plot(
        fpr,
        tpr,
        **_line(spec),
        linewidth=1.8,
        label=f'{spec.label}, {row.time_points}: {row.auroc:.3f} ({row.ci_low:.3f}–{row.ci_high:.3f})',
    )
  ax.plot([0, 1], [0, 1], **CHANCE)
  ax.set(
      xlabel='1 − specificity',
      ylabel='Sensitivity',
      title='Out-of-fold ROC (AUROC, 95 % CI)',
      aspect='equal',
      xlim=(0, 1),
      ylim=(0, 1),
  )
  ax.legend(loc='lower right', fontsize=7)
  _save(fig, path)


def reliability(path: str, predictions: dict, *, num_bins: int = 10):
  """Reliability diagram (decile bins, their counts) above a histogram of the predictions.

  The histogram tells at a glance when a model's predictions are bunched in a narrow range, where
  the reliability points pile up and say little.
  """
  fig, (ax, hist) = plt.subplots(
      2, 1, figsize=(6, 7.5), sharex=True, gridspec_kw={'height_ratios': [3, 1]}
  )
  for name, pred in predictions.items():
    spec = runs.model(name)
    predicted, observed, counts = calibration.reliability_curve(
        pred.label, pred.mean_prob, num_bins=num_bins
    )
    ax.plot(
        predicted,
        observed,
        marker='o',
        markersize=4,
        **_line(spec),
        label=spec.label,
    )
    for x, y, n in zip(predicted, observed, counts):
      ax.annotate(
          str(n),
          (x, y),
          textcoords='offset points',
          xytext=(3, 3),
          fontsize=6,
          color=spec.colour,
      )
    hist.hist(
        pred.mean_prob,
        bins=np.linspace(0, 1, 41),
        histtype='step',
        **_line(spec),
        linewidth=1.3,
    )
  ax.plot([0, 1], [0, 1], **CHANCE)
  ax.set(
      ylabel='Observed pCR fraction',
      xlim=(0, 1),
      ylim=(0, 1),
      title=f'Calibration ({num_bins} quantile bins; numbers: patients per bin)',
  )
  ax.legend(loc='upper left', fontsize=7)
  hist.set(xlabel='Predicted probability of pCR', ylabel='Patients')
  _save(fig, path)


def decision_curves(path: str, curves: list[dict]):
  """Net benefit against threshold probability, with the treat-all and treat-none lines."""
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  models = list(dict.fromkeys(c['model'] for c in curves))
  first = [c for c in curves if c['model'] == models[0]]
  thresholds = [c['threshold'] for c in first]
  treat_all = [c['net_benefit_all'] for c in first]
  ax.plot(
      thresholds,
      treat_all,
      color='#555555',
      linewidth=1,
      label='Treat all as pCR',
  )
  ax.axhline(
      0, color='#555555', linestyle='--', linewidth=1, label='Treat none'
  )
  for name in models:
    spec = runs.model(name)
    rows = [c for c in curves if c['model'] == name]
    ax.plot(
        [c['threshold'] for c in rows],
        [c['net_benefit_model'] for c in rows],
        **_line(spec),
        linewidth=1.6,
        label=spec.label,
    )
  top = max(max(c['net_benefit_model'] for c in curves), max(treat_all))
  ax.set(
      xlabel='Threshold probability of pCR',
      ylabel='Net benefit',
      xlim=(0, 1),
      ylim=(-0.05, max(0.05, 1.15 * top)),
      title='Decision curves (out-of-fold)',
  )
  ax.legend(fontsize=7)
  _save(fig, path)


def forest(path: str, subgroup_rows: list[dict], table: list):
  """AUROC with CI per HR/HER2 subtype and model, the overall row first, numbers at the right."""
  rows = [r for r in subgroup_rows if r['kind'] == 'subtype']
  overall = [
      {
          'model': t.name,
          'group': 'All patients',
          'patients': t.num_patients,
          'pcr': t.num_pcr,
          'auroc': t.auroc,
          'ci_low': t.ci_low,
          'ci_high': t.ci_high,
      }
      for t in table
  ]
  groups = ['All patients'] + sorted({r['group'] for r in rows})
  models = [t.name for t in table]
  fig, ax = plt.subplots(
      figsize=(9, 1.2 + 0.32 * len(groups) * (len(models) + 0.6))
  )
  y, ticks, labels = 0.0, [], []
  for group in groups:
    for name in models:
      row = next(
          (
              r
              for r in overall + rows
              if r['group'] == group and r['model'] == name
          ),
          None,
      )
      if row is None:
        continue
      spec = runs.model(name)
      if (
          row['auroc'] is None
      ):  # Said at the right, not drawn near the chance line.
        text = 'too few'
      else:
        ax.errorbar(
            row['auroc'],
            y,
            xerr=[
                [row['auroc'] - row['ci_low']],
                [row['ci_high'] - row['auroc']],
            ],
            fmt='D' if group == 'All patients' else 'o',
            color=spec.colour,
            capsize=3,
            markersize=5,
        )
        text = f"{row['auroc']:.3f} ({row['ci_low']:.3f}–{row['ci_high']:.3f})"
      ax.text(
          1.02,
          y,
          text,
          va='center',
          ha='left',
          fontsize=7,
          transform=ax.get_yaxis_transform(),
      )
      ticks.append(y)
      labels.append(
          f"{group} · {spec.label} (n={row['patients']}, pCR {row['pcr']})"
      )
      y -= 1
    y -= 0.6
  ax.axvline(0.5, **CHANCE)
  ax.set_yticks(ticks, labels, fontsize=7)
  ax.set(
      xlim=(0, 1),
      xlabel='AUROC (95 % CI)',
      title='AUROC overall and by HR/HER2 subtype',
  )
  _save(fig, path)


def learning_curves(
    path: str, run_dir: str, *, num_repeats: int, num_folds: int
):
  """Training loss and validation AUROC per epoch of every network, fold and repeat; the epoch
  selected on validation marked with a dot."""
  stages = runs.networks_in_training_order()
  fig, axes = plt.subplots(
      2,
      len(stages),
      figsize=(4.2 * len(stages), 6.5),
      sharex=True,
      squeeze=False,
  )
  for column, spec in enumerate(stages):
    for repeat in range(num_repeats):
      for fold in range(num_folds):
        directory = runs.stage_dir(run_dir, repeat, fold, spec.name)
        metrics_path = os.path.join(directory, runs.METRICS_FILE)
        if not os.path.exists(metrics_path):
          continue
        with open(metrics_path) as f:
          lines = [json.loads(line) for line in f]
        epochs = [m['epoch'] for m in lines]
        style = dict(
            linewidth=0.9,
            alpha=0.8,
            color=plt.cm.tab10(fold % 10),
            linestyle=('-', '--', ':', '-.')[repeat % 4],
        )
        axes[0, column].plot(
            epochs,
            [m['train_loss'] for m in lines],
            **style,
            label=f'repeat {repeat}, fold {fold}',
        )
        axes[1, column].plot(epochs, [m['val_auroc'] for m in lines], **style)
        best = runs.selected_epoch(directory)
        if best is not None and best in epochs:
          axes[1, column].plot(
              best,
              lines[epochs.index(best)]['val_auroc'],
              'o',
              markersize=4,
              color=style['color'],
          )
    axes[0, column].set_title(spec.label, fontsize=9)
    axes[0, column].set_ylabel('training loss')
    axes[1, column].set(
        xlabel='epoch', ylabel='validation AUROC (dot: selected)', ylim=(0, 1)
    )
    axes[1, column].xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  if axes[0, 0].get_legend_handles_labels()[0]:
    axes[0, 0].legend(fontsize=6, ncol=max(1, num_repeats))
  _save(fig, path)


def _save(fig, path: str) -> None:
  fig.tight_layout()
  with fileio.atomic_open(path, 'wb') as f:
    fig.savefig(f, format='png', dpi=130)
  plt.close(fig)
