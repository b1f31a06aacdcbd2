"""Two variants of one case's training step, compiled side by side in one process and alternated.

  python -m benchmarks.pair --case=volume --a='models.MAX_PATCH_BYTES = 16 << 20' \\
      --b='models.MAX_PATCH_BYTES = 4 << 20'

Each variant is a Python statement (`models`, `configs` and `jax` in scope) run before its step is
traced and compiled; the two executables then run in alternating blocks, A B B A, and the result is
the median over the pairs of blocks of the ratio B / A. On a VM whose speed drifts by tens of per
cent within minutes this resolves a few per cent where separate processes do not (one `mip` A/B:
0.63-1.53 per pair of processes). The jit caches are cleared between the variants: a constant
swapped under a warm cache would not be traced again, and both halves would time variant A.
"""

from __future__ import annotations

import argparse
import statistics

import jax

from benchmarks import common, jax_step
from pcrjax import configs, models


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--case', default='volume', choices=list(common.CASES))
  parser.add_argument('--a', default='pass', help='statement that sets up variant A')
  parser.add_argument('--b', required=True, help='statement that sets up variant B')
  parser.add_argument('--blocks', type=int, default=20, help='blocks of each variant')
  parser.add_argument('--block', type=int, default=5, help='timed steps per block')
  parser.add_argument('--batch_size', type=int, default=common.DEFAULT_BATCH)
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  steps = []
  for statement in (args.a, args.b):
    exec(statement, {'models': models, 'configs': configs, 'jax': jax})  # pylint: disable=exec-used
    jax.clear_caches()
    steps.append(jax_step.prepare_case(args.case, batch_size=args.batch_size, warmup=2)[0])
  times, ratios = ([], []), []
  for pair in range(args.blocks):
    medians = [0.0, 0.0]
    for variant in ((0, 1) if pair % 2 == 0 else (1, 0)):
      steps[variant]()  # Untimed: the other variant's threads may still be busy.
      medians[variant], block = jax_step.median_seconds(steps[variant], args.block)
      times[variant].extend(block)
    ratios.append(medians[1] / medians[0])
  for name, statement, variant_times in zip('AB', (args.a, args.b), times):
    print(f'{name}: {1e3 * statistics.median(variant_times):.2f} ms per step  ({statement})')
  print(f'B / A: {statistics.median(ratios):.3f} (median of {len(ratios)} pairs of blocks;'
        f' {min(ratios):.3f}-{max(ratios):.3f})')


if __name__ == '__main__':
  main()
