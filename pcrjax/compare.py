"""Compares two protocol runs on the same patients, model by model: an ablation in one command.

    python -m pcrjax.compare --a=runs/lambda0 --b=runs/lambda1 [--output=compare.md]

For every model both runs have (e.g. the student with lambda = 0 vs 1, or `mip` vs `volume`), the
AUROC of each run's repeat-averaged out-of-fold predictions and the paired DeLong test of B vs A on
the patients both predicted, with Holm's adjustment over the models compared.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from pcrjax import evaluation, stats

def _load(run_dir: str) -> dict[str, evaluation.Predictions]:
  with open(os.path.join(run_dir, 'config.json')) as f:
    config = json.load(f)
  return {m: evaluation.load_predictions(run_dir, m, num_repeats=config['num_repeats'],
                                         num_folds=config['data']['num_folds'],
                                         calibrate=config['calibration'])
          for m in evaluation.MODELS if os.path.isdir(os.path.join(run_dir, 'repeat_0', 'fold_0', m))}


def compare(run_a: str, run_b: str) -> list[dict]:
  runs_a, runs_b = _load(run_a), _load(run_b)
  rows = []
  for model in [m for m in runs_a if m in runs_b]:
    labels, probs_a, probs_b = evaluation.paired(runs_a[model], runs_b[model])
    result = stats.delong_test(labels, probs_a, probs_b)
    rows.append({'model': model, 'patients': len(labels), 'auroc_a': result.auc_a,
                 'auroc_b': result.auc_b, 'difference': result.auc_b - result.auc_a, 'p': result.p_value})
  for row, adjusted in zip(rows, evaluation.holm([r['p'] for r in rows]) if rows else []):
    row['p_holm'] = float(adjusted)
  return rows


def render(rows: list[dict], run_a: str, run_b: str) -> str:
  lines = [f'A = {run_a}', f'B = {run_b}', '',
           '| Model | Patients | AUROC A | AUROC B | B − A | p (DeLong) | p (Holm) |',
           '| --- | --- | --- | --- | --- | --- | --- |']
  lines += [f"| {r['model']} | {r['patients']} | {r['auroc_a']:.3f} | {r['auroc_b']:.3f} |"
            f" {r['difference']:+.3f} | {r['p']:.3g} | {r['p_holm']:.3g} |" for r in rows]
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  args = flags.FLAGS
  text = render(compare(args.a, args.b), args.a, args.b)
  print(text)
  if args.output:
    with open(args.output, 'w') as f:
      f.write(text)


if __name__ == '__main__':
  # Defined here, not at import, like pcrjax.report: importing this module defines no flags.
  flags.DEFINE_string('a', None, 'The first protocol workdir.')
  flags.DEFINE_string('b', None, 'The second protocol workdir.')
  flags.DEFINE_string('output', '', 'Also write the comparison (markdown) here.')
  flags.mark_flags_as_required(['a', 'b'])
  app.run(main)
