"""The evidence of a protocol run, built from its predictions files alone, top-down for a reviewer:
the data source, the bottom line in one sentence, the main table, the ROC and calibration figures,
decision curves, operating points, pairwise tests, subgroups, then the training curves.

Writes the evidence files of the run contract (pcrjax.runs: the tables as CSV, the figures, each
model's out-of-fold predictions, the report in markdown and as one self-contained page).
"""

from __future__ import annotations

import base64
from concurrent import futures
import csv
import html
import json
import os
import time

import markdown_it
import numpy as np

from pcrjax import fileio, runs, wall_time
from pcrjax.evidence import loading, plots, tables

# Figure files, in the order the report shows them, and their captions.
FIGURES = {
    runs.ROC_FIGURE: (
        'ROC curves of the out-of-fold predictions, with 95 % bootstrap bands.'
    ),
    runs.CALIBRATION_FIGURE: (
        'Calibration: observed pCR fraction per bin of prediction, and the'
        ' distribution of the predictions.'
    ),
    runs.DECISION_CURVE_FIGURE: (
        'Decision curves: net benefit of acting on each model at each'
        ' threshold probability, against treating all or none.'
    ),
    runs.FOREST_FIGURE: 'AUROC overall and by HR/HER2 subtype.',
    runs.LEARNING_CURVES_FIGURE: (
        'Training loss and validation AUROC per epoch; dots: the epochs'
        ' selected on the inner validation split.'
    ),
}


def build(run_dir: str) -> list[tables.Row]:
  """Writes every evidence file of `run_dir` and returns the main table."""
  started = time.perf_counter()
  run_dir = os.path.abspath(run_dir)
  config = runs.read_config(run_dir)
  predictions = loading.load_run(run_dir)
  if not predictions:
    raise FileNotFoundError(
        f'{run_dir}: no model has finished every repeat and fold yet.'
    )
  seed, replicates = config.seed, config.protocol.bootstrap_replicates
  pairs = tables.pairwise_tests(predictions)
  bootstrap = dict(seed=seed, num_replicates=replicates)
  # The bootstrapped tables are independent and their array work releases the GIL: the main table
  # in one thread, the others in a second (9.8 -> 6.6 s for a 7-model protocol on 2 cores).
  with futures.ThreadPoolExecutor(max_workers=2) as pool:
    table = pool.submit(
        tables.main_table, predictions, pairs=pairs, **bootstrap
    )
    operating = pool.submit(
        tables.operating_point_table, predictions, **bootstrap
    )
    groups = pool.submit(tables.subgroups, predictions, **bootstrap)
    table, operating, groups = (
        table.result(),
        operating.result(),
        groups.result(),
    )
  curves = tables.decision_curves(predictions)

  for name, records in (
      (runs.TABLE_FILE, [tables.table_record(row) for row in table]),
      (runs.PAIRWISE_FILE, pairs),
      (runs.OPERATING_POINTS_FILE, operating),
      (runs.DECISION_CURVE_FILE, curves),
      (runs.SUBGROUPS_FILE, groups),
  ):
    _write_csv(os.path.join(run_dir, name), records)
  for name, pred in predictions.items():
    runs.write_predictions(
        runs.oof_predictions_path(run_dir, name), tables.out_of_fold_rows(pred)
    )
  figure = lambda name: os.path.join(run_dir, name)  # noqa: E731
  plots.roc_curves(figure(runs.ROC_FIGURE), predictions, table, seed=seed)
  plots.reliability(figure(runs.CALIBRATION_FIGURE), predictions)
  plots.decision_curves(figure(runs.DECISION_CURVE_FIGURE), curves)
  plots.forest(figure(runs.FOREST_FIGURE), groups, table)
  plots.learning_curves(
      figure(runs.LEARNING_CURVES_FIGURE),
      run_dir,
      num_repeats=config.protocol.num_repeats,
      num_folds=config.data.num_folds,
  )

  spent = wall_time.read_protocol(
      run_dir, report_seconds=time.perf_counter() - started
  )
  markdown = render(config, run_dir, table, pairs, operating, groups, spent)
  with fileio.atomic_open(os.path.join(run_dir, runs.REPORT_FILE)) as f:
    f.write(markdown)
  with fileio.atomic_open(os.path.join(run_dir, runs.REPORT_PAGE_FILE)) as f:
    f.write(to_html(markdown, run_dir, config))
  print(markdown)
  return table


def _flat(record: dict) -> dict:
  """CSV cells: an interval (low, high) becomes two columns."""
  out = {}
  for key, value in record.items():
    if isinstance(value, tuple):
      out[f'{key}_low'], out[f'{key}_high'] = value
    else:
      out[key] = value
  return out


def _write_csv(path: str, records: list[dict]) -> None:
  records = [_flat(r) for r in records]
  with fileio.atomic_open(path, newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(records[0]) if records else [])
    writer.writeheader()
    writer.writerows(records)


def _num(value, digits: int = 3) -> str:
  return '—' if value is None or np.isnan(value) else f'{value:.{digits}f}'


def _ci(low, high, digits: int = 3) -> str:
  """'0.61–0.71'; with a negative bound '-0.28 to 0.26', which a dash would garble."""
  separator = ' to ' if min(low, high) < 0 else '–'
  return f'{_num(low, digits)}{separator}{_num(high, digits)}'


def _p(value) -> str:
  if value is None:
    return ''
  return (
      '—'
      if np.isnan(value)
      else f'{value:.2g}'
      if value < 0.001
      else f'{value:.3f}'
  )


def _count(n: int, noun: str) -> str:
  return f'{n} {noun}' + ('' if n == 1 else 's')


def _md_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
  return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in rows])


def _label(name: str) -> str:
  return runs.model(name).label


def banner(config) -> str:
  if runs.is_synthetic(config.data.dataset):
    return (
        '> **Synthetic data.** Every number below comes from the embedded phantom'
        f' (`{config.data.dataset}`), a simulation of I-SPY2-like DCE-MRI: it tests the'
        " software and the method's mechanics and says nothing about patients."
    )
  return (
      f'> **Data: `{config.data.dataset}`**, the I-SPY2 collection (TCIA) as built by this'
      ' project. A research result on retrospective trial data, not a clinical tool.'
  )


def bottom_line(pairs: list[dict], num_pairs: int) -> str:
  """The paper's comparison in one sentence: pooled (DeLong) and per fold (corrected t-test)."""
  reference, method = runs.PRIMARY
  pair = tables.bottom_line(pairs)
  if pair is None:
    return (
        f'**Bottom line:** not available: the run holds no finished {_label(method)} and'
        f' {_label(reference)} to compare.'
    )
  if pair['difference'] == 0 and pair['fold_difference'] == 0:
    return (
        f'**Bottom line:** the {_label(method)} and the {_label(reference)} have the same AUROC,'
        f" {pair['auroc_a']:.3f} pooled and {pair['fold_auroc_a']:.3f} per fold, on the same"
        f" {pair['patients']} patients."
    )
  if np.isnan(pair['fold_p']):
    t_test = 'no t-test: every test fold gave the same difference'
  else:
    t_test = (
        f"95 % CI {pair['fold_difference_ci_low']:+.3f} to"
        f" {pair['fold_difference_ci_high']:+.3f}, p = {_p(pair['fold_p'])}"
    )
  return (
      f"**Bottom line:** on the same {pair['patients']} patients"
      f' ({runs.model(method).visits}), the {_label(method)} vs the {_label(reference)}:'
      f" pooled out-of-fold AUROC {pair['auroc_b']:.3f} vs {pair['auroc_a']:.3f}, difference"
      f" {pair['difference']:+.3f} (DeLong test: 95 % CI {pair['difference_ci_low']:+.3f} to"
      f" {pair['difference_ci_high']:+.3f}, p = {_p(pair['p'])}); mean AUROC per test fold"
      f" {pair['fold_auroc_b']:.3f} vs {pair['fold_auroc_a']:.3f}, difference"
      f" {pair['fold_difference']:+.3f} (corrected resampled t-test over"
      f" {_count(pair['repeats'], 'repeat')} × {pair['folds']} folds, which also counts the"
      f" variation between trainings: {t_test}). After Holm's adjustment over the {num_pairs}"
      f" pairwise comparisons: p = {_p(pair['p_holm'])} (DeLong) and"
      f" {_p(pair['fold_p_holm'])} (t-test)."
  )


def design(config, run_dir: str, first: tables.Row) -> str:
  repeats = config.protocol.num_repeats
  return (
      f'{first.num_patients} patients, {first.num_pcr} pCR'
      f' ({100 * first.num_pcr / first.num_patients:.1f} %). {config.data.num_folds}-fold'
      ' cross-validation stratified by pCR × HR/HER2 subtype, every model trained or fitted on the'
      ' training patients of each fold and selected on an inner validation split of them;'
      f' {repeats} repeat(s) (fold seeds {config.data.fold_seed}..{config.data.fold_seed + repeats - 1},'
      f' init seeds {config.seed}..{config.seed + repeats - 1}); representation'
      f' `{config.data.representation}`, channels `{config.data.get("channels", "subtraction")}`;'
      f' {_networks(config)}; post-hoc calibration: {config.protocol.calibration}. Trained with code'
      f' {runs.recorded_code_version(run_dir)}; report built with {runs.code_version()}; the exact'
      f' config is `{runs.CONFIG_FILE}` (and at the end of {runs.REPORT_PAGE_FILE}).'
  )


def _networks(config) -> str:
  """What the networks' heads read and what the student regresses. A config without these fields
  is of a run whose heads read the image latent alone and whose student regressed the teacher's
  raw latent."""
  model, dual = config.get('model', {}), config.get('dual_task', {})
  inputs = ['the image latent']
  if model.get('tumour_kinetics', False):
    inputs.append(
        'the tumour kinetics (FTV, mean PE and SER) at T0 and their change'
    )
  if model.get('clinical_inputs', False):
    inputs.append('a per-subtype (HR/HER2) offset')
  standardised = 'standardised, ' if dual.get('standardise', False) else ''
  return (
      f'the pCR head reads {", ".join(inputs)}; the student regresses'
      f' `{dual.get("target", "latent")}` ({standardised}λ = {config.get("feature_loss_weight", 1.0):g})'
  )


def where_the_time_went(spent: dict | None) -> str:
  """The protocol's wall time by phase (pcrjax.wall_time), a paragraph of its own; '' for a run
  without its record."""
  if spent is None:
    return ''
  return (
      "\n\nWhere the time went in the protocol's last run: "
      f"{wall_time.describe(spent)}. Compile is the first call of each training's"
      " initialisation and steps (tracing and XLA's compilation, or a cache's copy); training"
      f" steps run until the epoch's metrics are read back. `{runs.WALL_TIME_FILE}` and each"
      f" training's `{runs.TIMING_FILE}` hold the seconds."
  )


def main_table(config, run_dir: str, table: list[tables.Row]) -> str:
  repeats, folds = config.protocol.num_repeats, config.data.num_folds
  reference = _label(runs.PRIMARY[0])
  rows = []
  for r in table:
    if r.degenerate:
      intercept, slope = f'not shown: {r.degenerate}', '—'
    else:
      intercept = f'{_num(r.calibration_intercept, 2)} ({_ci(*r.calibration_intercept_ci, 2)})'
      slope = (
          f'{_num(r.calibration_slope, 2)} ({_ci(*r.calibration_slope_ci, 2)})'
      )
    rows.append(
        [
            _label(r.name),
            r.time_points,
            f'{_num(r.auroc)} ({_ci(r.ci_low, r.ci_high)})',
            f'{np.mean(r.auroc_folds):.3f} ± {np.std(r.auroc_folds, ddof=1):.3f}'
            f' ({min(r.auroc_folds):.3f}–{max(r.auroc_folds):.3f})',
            f'{np.mean(r.auroc_repeats):.3f} ± {np.std(r.auroc_repeats):.3f}'
            f' ({min(r.auroc_repeats):.3f}–{max(r.auroc_repeats):.3f})',
            _p(r.p_vs_baseline),
            _p(r.p_vs_baseline_per_fold),
            _num(r.brier),
            intercept,
            slope,
        ]
    )
  text = _md_table(
      [
          'Model',
          'Time points',
          'AUROC, pooled (95 % CI)',
          f'AUROC, mean per fold ± SD (range) over {repeats} × {folds} test folds',
          f'AUROC, pooled, of each of {repeats} repeat(s): mean ± SD (range)',
          f'p vs {reference}, DeLong (Holm)',
          f'p vs {reference}, per fold (Holm)',
          'Brier',
          'Cal. intercept (95 % CI)',
          'Cal. slope (95 % CI)',
      ],
      rows,
  )
  notes = [
      'Pooled AUROC and its CI (stratified bootstrap,'
      f' {config.protocol.bootstrap_replicates} replicates,'
      " the pROC convention) are of each patient's out-of-fold prediction averaged over the"
      f' repeats, pooled over the {folds} fold models: pooling mixes their scales, which can lower'
      ' the AUROC of a model whose fold models are calibrated differently (a network) and not of'
      ' one calibrated in every fold (a logistic reference). The AUROC per fold is each fold'
      " model's AUROC on its own test patients, free of that effect (sample SD over the"
      ' repeat-folds). The repeats column shows the spread of the pooled AUROC between repeats.'
      f' p vs {reference}: paired DeLong test of the pooled AUROCs, and corrected resampled t-test'
      ' (Nadeau & Bengio 2003) of the per-fold AUROCs, each Holm-adjusted over the pairwise'
      ' comparisons. Calibration intercept (ideal 0) and slope (ideal 1) with stratified-bootstrap'
      ' CIs.'
  ]
  notes += [
      f'{_label(r.name)}: {runs.model(r.name).note}; not tested against the others.'
      for r in table
      if not runs.model(r.name).early_predictor
  ]
  explained = cohort_facts(run_dir).get('t2_explained_r2')
  if explained is not None and any(r.name == 'oracle' for r in table):
    notes.append(
        f"The oracle's T0/T1 truth explains R² = {explained:.2f} of the true T2 log-volume"
        ' change (linear model, 5-fold cross-validated): the share of the later shrinkage'
        ' that the early visits hold, and so the most a student regressing T2 could learn.'
    )
  return text + '\n\n' + ' '.join(notes)


def cohort_facts(run_dir: str) -> dict:
  """What the protocol measured of the cohort (`runs.COHORT_FACTS_FILE`); {} where it did not."""
  path = os.path.join(run_dir, runs.COHORT_FACTS_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def operating_points(operating: list[dict]) -> str:
  text = _md_table(
      [
          'Model',
          'Rule',
          'Threshold',
          'Sensitivity',
          'Specificity',
          'PPV',
          'NPV',
      ],
      [
          [
              _label(o['model']),
              tables.RULES[o['rule']],
              _num(o['threshold']),
              *[
                  f"{_num(o[k])} ({_ci(*o[k + '_ci'])})"
                  for k in ('sensitivity', 'specificity', 'ppv', 'npv')
              ],
          ]
          for o in operating
      ],
  )
  return text + (
      '\n\nThe thresholds are chosen on the same out-of-fold predictions they are evaluated on, so'
      ' these figures are optimistic for new patients; the CIs (stratified bootstrap, the threshold'
      ' re-derived in every replicate) include the uncertainty of choosing it. Decision curves:'
      f' `{runs.DECISION_CURVE_FILE}`.'
  )


def pairwise(pairs: list[dict]) -> str:
  rows = [
      [
          _label(p['a']),
          _label(p['b']),
          _num(p['auroc_a']),
          _num(p['auroc_b']),
          f"{p['difference']:+.3f} ({_ci(p['difference_ci_low'], p['difference_ci_high'])})",
          _p(p['p']),
          _p(p['p_holm']),
          _num(p['fold_auroc_a']),
          _num(p['fold_auroc_b']),
          f"{p['fold_difference']:+.3f}"
          f" ({_ci(p['fold_difference_ci_low'], p['fold_difference_ci_high'])})",
          _p(p['fold_p']),
          _p(p['fold_p_holm']),
      ]
      for p in pairs
  ]
  text = _md_table(
      [
          'A',
          'B',
          'Pooled AUROC A',
          'Pooled AUROC B',
          'B − A (95 % CI)',
          'p (DeLong)',
          'p (DeLong, Holm)',
          'Per-fold AUROC A',
          'Per-fold AUROC B',
          'B − A (95 % CI)',
          'p (t-test)',
          'p (t-test, Holm)',
      ],
      rows,
  )
  return text + (
      f'\n\nEvery pair of early (T0+T1) models ({len(pairs)} comparisons), on the same patients.'
      ' Pooled: paired two-sided DeLong test of the AUROCs of the repeat-averaged out-of-fold'
      ' predictions. Per fold: the mean over the repeats × folds of the AUROC of each fold model on'
      ' its test patients, with the corrected resampled t-test (Nadeau & Bengio 2003; J − 1 degrees'
      ' of freedom, variance (1/J + 1/(K − 1)) s² for J repeat-folds of K-fold cross-validation),'
      " which also counts the variation between trainings. Holm's step-down adjustment controls"
      " the family-wise error rate at 5 % within each test's family. z and t:"
      f' `{runs.PAIRWISE_FILE}`.'
  )


def subgroups(groups: list[dict]) -> str:
  """One row per subgroup, one column per model (the patients are the same for every model)."""
  models = list(dict.fromkeys(g['model'] for g in groups))
  by_group = {}
  for g in groups:
    by_group.setdefault((g['kind'], g['group']), {})[g['model']] = g
  rows = []
  for (kind, group), cells in by_group.items():
    first = next(iter(cells.values()))
    rows.append(
        [kind, group, str(first['patients']), str(first['pcr'])]
        + [
            'too few'
            if c['auroc'] is None
            else f"{c['auroc']:.3f} ({_ci(c['ci_low'], c['ci_high'])})"
            for c in (cells[m] for m in models)
        ]
    )
  text = _md_table(
      ['By', 'Group', 'Patients', 'pCR'] + [_label(m) for m in models], rows
  )
  return text + (
      f'\n\nAUROC (95 % CI) per subgroup. "too few": fewer than {tables.MIN_PER_CLASS}'
      ' pCR or non-pCR patients in the subgroup, where an AUROC would be noise.'
  )


def _figure(name: str) -> str:
  return f'![{FIGURES[name]}]({name})\n\n*{FIGURES[name]}*'


def render(
    config, run_dir, table, pairs, operating, groups, spent: dict | None = None
) -> str:
  """The report's markdown, its sections in the order a reviewer reads them; `spent`: the
  protocol's wall time (wall_time.read_protocol)."""
  sections = [
      '# pCR prediction from early DCE-MRI: two-stage dual-task vs single-stage',
      banner(config),
      bottom_line(pairs, len(pairs)),
      design(config, run_dir, table[0]) + where_the_time_went(spent),
      '## Main table\n\n' + main_table(config, run_dir, table),
      '## Discrimination and calibration\n\n'
      + _figure(runs.ROC_FIGURE)
      + '\n\n'
      + _figure(runs.CALIBRATION_FIGURE),
      '## Clinical usefulness\n\n'
      + _figure(runs.DECISION_CURVE_FIGURE)
      + '\n\n### Operating points\n\n'
      + operating_points(operating),
      '## Pairwise comparisons\n\n' + pairwise(pairs),
      '## Subgroups\n\n'
      + _figure(runs.FOREST_FIGURE)
      + '\n\n'
      + subgroups(groups),
      '## Training\n\n' + _figure(runs.LEARNING_CURVES_FIGURE),
  ]
  return '\n\n'.join(sections) + '\n'


def to_html(markdown: str, run_dir: str, config) -> str:
  """One self-contained file (figures inline as data URIs, the config at the end): easy to send."""
  body = (
      markdown_it.MarkdownIt('commonmark', {'html': False})
      .enable('table')
      .render(markdown)
  )
  # The figures go in after rendering: the renderer re-encodes a link character by character
  # (seconds for a figure's megabyte of base64), and base64 needs no encoding in an attribute.
  for name in FIGURES:
    with open(os.path.join(run_dir, name), 'rb') as f:
      data = base64.b64encode(f.read()).decode()
    body = body.replace(f'src="{name}"', f'src="data:image/png;base64,{data}"')
  config_json = html.escape(config.to_json_best_effort(indent=2))
  style = (
      'body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}'
      'table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;'
      'font-size:14px}th{background:#f4f4f4}img{max-width:100%}blockquote{background:#fff6e0;'
      'border-left:4px solid #e0a000;margin:1em 0;padding:0.5em 1em}'
  )
  return (
      f'<!doctype html><html><head><meta charset="utf-8"><title>pcrjax report</title>'
      f'<style>{style}</style></head><body>{body}<details><summary>{runs.CONFIG_FILE}'
      f'</summary><pre>{config_json}</pre></details></body></html>\n'
  )
