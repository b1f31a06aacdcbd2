"""Two protocol runs on the same patients, model by model: an ablation in one table.

For every model both runs finished (e.g. the student with lambda = 0 vs 1, or `mip` vs `volume`),
on the patients both predicted: the pooled AUROC of each run's repeat-averaged out-of-fold
predictions with the paired DeLong test of B vs A, and, when the two runs share their folds, the
mean per-fold AUROC with the corrected resampled t-test; each Holm-adjusted over the models.
"""

from __future__ import annotations

from pcrjax import runs
from pcrjax.evidence import loading, tables


def compare(run_a: str, run_b: str) -> list[dict]:
  a, b = loading.load_run(run_a), loading.load_run(run_b)
  rows = tables.paired_tests(
      [(name, a[name], name, b[name]) for name in a if name in b]
  )
  return [
      {'model': row.pop('a'), **{k: v for k, v in row.items() if k != 'b'}}
      for row in rows
  ]


def render(rows: list[dict], run_a: str, run_b: str) -> str:
  lines = [
      f'A = {run_a}',
      f'B = {run_b}',
      '',
      '| Model | Patients | AUROC A | AUROC B | B − A (95 % CI) | p (DeLong) |'
      ' p (DeLong, Holm) | Per-fold AUROC A | Per-fold AUROC B | B − A (95 % CI) |'
      ' p (t-test) | p (t-test, Holm) |',
      '|' + ' --- |' * 12,
  ]
  for r in rows:
    if r['fold_p'] is None:
      per_fold = "— | — | not paired: the runs' folds differ | | |"
    else:
      per_fold = (
          f"{r['fold_auroc_a']:.3f} | {r['fold_auroc_b']:.3f} | {r['fold_difference']:+.3f}"
          f" ({r['fold_difference_ci_low']:+.3f} to {r['fold_difference_ci_high']:+.3f}) |"
          f" {r['fold_p']:.3g} | {r['fold_p_holm']:.3g} |"
      )
    lines.append(
        f"| {runs.model(r['model']).label} | {r['patients']} | {r['auroc_a']:.3f} |"
        f" {r['auroc_b']:.3f} | {r['difference']:+.3f} ({r['difference_ci_low']:+.3f} to"
        f" {r['difference_ci_high']:+.3f}) | {r['p']:.3g} | {r['p_holm']:.3g} |"
        f' {per_fold}'
    )
  return '\n'.join(lines) + '\n'
