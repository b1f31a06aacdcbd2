"""Builds the evidence of a protocol run from its predictions files, without retraining.

    python -m pcrjax.report --workdir=DIR

writes table.csv, pairwise.csv, operating_points.csv, subgroups.csv, the figures (roc.png,
calibration.png, forest.png, learning_curves.png), report.md and a self-contained report.html.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import json
import os
import subprocess

import ml_collections
import numpy as np
from absl import app, flags

from pcrjax import evaluation, plots

FIGURES = {'roc.png': 'ROC curves', 'calibration.png': 'Calibration', 'forest.png': 'Subtypes',
           'learning_curves.png': 'Learning curves'}


def build(run_dir: str) -> list[evaluation.Row]:
  run_dir = os.path.abspath(run_dir)
  with open(os.path.join(run_dir, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  models = [m for m in evaluation.MODELS
            if os.path.isdir(os.path.join(run_dir, 'repeat_0', 'fold_0', m))]
  predictions = {m: evaluation.load_predictions(
      run_dir, m, num_repeats=config.num_repeats, num_folds=config.data.num_folds,
      calibrate=config.calibration) for m in models}
  seed, replicates = config.seed, config.bootstrap_replicates
  pairs = evaluation.pairwise_tests(predictions)
  table = evaluation.main_table(predictions, seed=seed, num_replicates=replicates, pairs=pairs)
  operating = evaluation.operating_points(predictions, seed=seed, num_replicates=replicates)
  groups = evaluation.subgroups(predictions, seed=seed, num_replicates=replicates)

  _write_csv(os.path.join(run_dir, 'table.csv'), [_table_record(row) for row in table])
  _write_csv(os.path.join(run_dir, 'pairwise.csv'), pairs)
  _write_csv(os.path.join(run_dir, 'operating_points.csv'), operating)
  _write_csv(os.path.join(run_dir, 'subgroups.csv'), groups)
  for name, pred in predictions.items():
    evaluation.write_predictions(os.path.join(run_dir, f'predictions_oof_{name}.csv'), [
        {'patient_id': i, 'label': int(y), 'prob': float(p), 'subtype': s, 'fold': -1, 'arm': a}
        for i, y, p, s, a in zip(pred.patient_id, pred.label, pred.mean_prob, pred.subtype, pred.arm)])
  plots.roc_curves(os.path.join(run_dir, 'roc.png'), predictions, table, seed=seed)
  plots.reliability(os.path.join(run_dir, 'calibration.png'), predictions)
  plots.forest(os.path.join(run_dir, 'forest.png'), groups)
  plots.learning_curves(os.path.join(run_dir, 'learning_curves.png'), run_dir,
                        num_folds=config.data.num_folds)

  sections = _sections(config, run_dir, table, pairs, operating, groups)
  markdown = '\n\n'.join(f'## {title}\n\n{body}' if title else body for title, body in sections)
  with open(os.path.join(run_dir, 'report.md'), 'w') as f:
    f.write(markdown + '\n')
  with open(os.path.join(run_dir, 'report.html'), 'w') as f:
    f.write(_html(sections, run_dir, config))
  print(markdown)
  return table


def _table_record(row: evaluation.Row) -> dict:
  record = dataclasses.asdict(row)
  repeats = record.pop('auroc_repeats')
  record.update(auroc_repeats_mean=float(np.mean(repeats)), auroc_repeats_sd=float(np.std(repeats)),
                auroc_repeats_min=min(repeats), auroc_repeats_max=max(repeats))
  return record


def _write_csv(path: str, records: list[dict]) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(records[0]) if records else [])
    writer.writeheader()
    writer.writerows(records)


def _num(value, digits=3) -> str:
  return '—' if value is None or (isinstance(value, float) and np.isnan(value)) else f'{value:.{digits}f}'


def _p(value) -> str:
  return '' if value is None else f'{value:.3g}'


def _md_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
  return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in rows])


def code_version() -> str:
  try:
    return subprocess.run(['git', 'describe', '--always', '--dirty'], capture_output=True, text=True,
                          cwd=os.path.dirname(__file__), check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def _sections(config, run_dir, table, pairs, operating, groups) -> list[tuple[str, str]]:
  first = table[0]
  trained_with = 'unknown'
  version_path = os.path.join(run_dir, 'code_version.txt')
  if os.path.exists(version_path):
    with open(version_path) as f:
      trained_with = f.read().strip()
  source = 'synthetic phantom' if 'synthetic' in config.data.dataset else 'TCIA I-SPY2'
  repeats = config.num_repeats
  header = (
      f'# pCR prediction: single-stage vs two-stage dual-task vs FTV\n\n'
      f'Data: `{config.data.dataset}` ({source}), {first.num_patients} patients, {first.num_pcr} pCR'
      f' ({100 * first.num_pcr / first.num_patients:.1f} %). {config.data.num_folds}-fold'
      f' cross-validation stratified by pCR x subtype, {repeats} repeat(s) (fold seeds'
      f' {config.data.fold_seed}..{config.data.fold_seed + repeats - 1}, init seeds'
      f' {config.seed}..{config.seed + repeats - 1}); representation `{config.data.representation}`;'
      f' post-hoc calibration: {config.calibration}. Trained with code {trained_with}; report built'
      f' with {code_version()}; the exact config is `config.json` (and below, in report.html).')
  main = _md_table(
      ['Model', 'Time points', 'AUROC', '95 % CI', f'AUROC over {repeats} repeat(s): mean ± SD (range)',
       'p vs baseline (Holm)', 'Brier', 'Cal. intercept', 'Cal. slope'],
      [[evaluation.LABELS[r.name], r.time_points, _num(r.auroc), f'{_num(r.ci_low)}–{_num(r.ci_high)}',
        f'{np.mean(r.auroc_repeats):.3f} ± {np.std(r.auroc_repeats):.3f} ({min(r.auroc_repeats):.3f}–'
        f'{max(r.auroc_repeats):.3f})', _p(r.p_vs_baseline), _num(r.brier), _num(r.calibration_intercept),
        _num(r.calibration_slope)] for r in table])
  main += ('\n\nAUROC and its CI (stratified bootstrap, '
           f'{config.bootstrap_replicates} replicates, pROC convention) are of each patient\'s'
           ' out-of-fold prediction averaged over the repeats; the repeat column shows the spread'
           ' of the pooled AUROC between repeats. The teacher sees T2 (12 weeks): it is the'
           ' reference the student learns from, not an early predictor, and is not tested.')
  pairwise = _md_table(['A', 'B', 'AUROC A', 'AUROC B', 'B − A', 'z', 'p', 'p (Holm)'], [
      [p['a'], p['b'], _num(p['auroc_a']), _num(p['auroc_b']), f"{p['difference']:+.3f}",
       f"{p['z']:.2f}", _p(p['p']), _p(p['p_holm'])] for p in pairs])
  pairwise += ('\n\nPaired two-sided DeLong tests on the same patients between every pair of T0+T1'
               f' models ({len(pairs)} tests); Holm\'s step-down adjustment controls the family-wise'
               ' error rate at 5 %.')
  ops = _md_table(['Model', 'Rule', 'Threshold', 'Sensitivity', 'Specificity', 'PPV', 'NPV'], [
      [o['model'], {'youden': 'Youden', 'sens90': '90 % sensitivity'}[o['rule']], _num(o['threshold']),
       *[f"{_num(o[k])} ({_num(o[k + '_ci'][0])}–{_num(o[k + '_ci'][1])})"
         for k in ('sensitivity', 'specificity', 'ppv', 'npv')]] for o in operating])
  ops += ('\n\nCIs: stratified bootstrap in which the threshold is re-derived in every replicate, so'
          ' they include the uncertainty of the threshold itself.')
  subs = _md_table(['Model', 'Group', 'Patients', 'pCR', 'AUROC (95 % CI)'], [
      [g['model'], g['group'], str(g['patients']), str(g['pcr']),
       'too few' if g['auroc'] is None else f"{g['auroc']:.3f} ({g['ci_low']:.3f}–{g['ci_high']:.3f})"]
      for g in groups])
  subs += (f'\n\n"too few": fewer than {evaluation.MIN_PER_CLASS} pCR or non-pCR patients in the'
           ' subgroup, where an AUROC would be noise.')
  figures = '\n'.join(f'![{title}]({name})' for name, title in FIGURES.items())
  return [('', header), ('Main table', main), ('Pairwise comparisons', pairwise),
          ('Operating points', ops), ('Subgroups', subs), ('Figures', figures)]


def _html(sections, run_dir, config) -> str:
  """One file with everything inline (tables, base64 figures, the config): easy to send."""
  parts = []
  for title, body in sections:
    if title:
      parts.append(f'<h2>{html.escape(title)}</h2>')
    if title == 'Figures':
      for name, caption in FIGURES.items():
        with open(os.path.join(run_dir, name), 'rb') as f:
          data = base64.b64encode(f.read()).decode()
        parts.append(f'<figure><img alt="{caption}" src="data:image/png;base64,{data}">'
                     f'<figcaption>{caption}</figcaption></figure>')
      continue
    parts.append(_markdown_block_to_html(body))
  parts.append('<details><summary>config.json</summary><pre>'
               f'{html.escape(config.to_json_best_effort(indent=2))}</pre></details>')
  style = ('body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}'
           'table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;'
           'font-size:14px}th{background:#f4f4f4}img{max-width:100%}figure{display:inline-block;'
           'margin:1em}')
  return (f'<!doctype html><html><head><meta charset="utf-8"><title>pcrjax report</title>'
          f'<style>{style}</style></head><body>{"".join(parts)}</body></html>\n')


def _markdown_block_to_html(body: str) -> str:
  """Our own markdown only: a '# ' title, paragraphs and pipe tables."""
  out = []
  for block in body.split('\n\n'):
    lines = block.split('\n')
    if block.startswith('# '):
      out.append(f'<h1>{html.escape(block[2:])}</h1>')
    elif lines[0].startswith('|'):
      cells = [[c.strip() for c in line.strip('|').split('|')] for line in lines if '---' not in line]
      head = ''.join(f'<th>{html.escape(c)}</th>' for c in cells[0])
      rows = ''.join('<tr>' + ''.join(f'<td>{html.escape(c)}</td>' for c in r) + '</tr>' for r in cells[1:])
      out.append(f'<table><tr>{head}</tr>{rows}</table>')
    else:
      out.append(f'<p>{html.escape(block).replace("`", "")}</p>')
  return '\n'.join(out)


def main(argv):
  del argv
  build(flags.FLAGS.workdir)


if __name__ == '__main__':
  # Defined here, not at import: pcrjax.main imports this module and has its own --workdir.
  flags.DEFINE_string('workdir', None, 'A finished protocol workdir (experiments/paper_table.py).')
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
