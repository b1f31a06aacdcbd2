"""Two variants of one case's training step, compiled side by side in one process and alternated.

  python -m benchmarks.pair --case=volume --a max_patch_bytes=16777216 --b max_patch_bytes=4194304

Each variant is a set of `models.PCRNet` fields (`name=value`, the value a Python literal or else a
string: `conv=native`, `dtype=bfloat16`) that replace the network's, `configs.base_config()`'s
otherwise. Both steps are compiled first; the two executables then run in alternating blocks,
A B B A, and the result is the median over the pairs of blocks of the ratio B / A. On a VM whose
speed drifts by tens of per cent within minutes this resolves a few per cent where separate
processes do not (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import statistics

from benchmarks import common, jax_step
from pcrjax import models

_FIELDS = {field.name for field in dataclasses.fields(models.PCRNet)} - {
    'parent',
    'name',
}


def model_fields(assignments: list[str]) -> dict:
  """['max_patch_bytes=8388608', 'conv=native'] -> {'max_patch_bytes': 8388608, 'conv': 'native'}."""
  fields = {}
  for assignment in assignments:
    name, _, value = assignment.partition('=')
    if name not in _FIELDS:
      raise ValueError(
          f'{name!r} is not a field of models.PCRNet ({sorted(_FIELDS)})'
      )
    try:
      fields[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      fields[name] = value
  return fields


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--case', default='volume', choices=list(common.CASES))
  parser.add_argument(
      '--a', nargs='*', default=[], help='variant A: PCRNet fields, name=value'
  )
  parser.add_argument(
      '--b',
      nargs='+',
      required=True,
      help='variant B: PCRNet fields, name=value',
  )
  parser.add_argument(
      '--blocks', type=int, default=20, help='blocks of each variant'
  )
  parser.add_argument(
      '--block', type=int, default=5, help='timed steps per block'
  )
  parser.add_argument('--batch_size', type=int, default=common.DEFAULT_BATCH)
  args = parser.parse_args(argv)
  try:
    args.a, args.b = model_fields(args.a), model_fields(args.b)
  except ValueError as e:
    parser.error(str(e))
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  steps = [
      jax_step.prepare_case(
          args.case, batch_size=args.batch_size, warmup=2, model_fields=fields
      )[0]
      for fields in (args.a, args.b)
  ]
  times, ratios = ([], []), []
  for pair in range(args.blocks):
    medians = [0.0, 0.0]
    for variant in ((0, 1) if pair % 2 == 0 else (1, 0)):
      steps[
          variant
      ]()  # Untimed: the other variant's threads may still be busy.
      medians[variant], block = jax_step.median_seconds(
          steps[variant], args.block
      )
      times[variant].extend(block)
    ratios.append(medians[1] / medians[0])
  for name, fields, variant_times in zip('AB', (args.a, args.b), times):
    print(
        f'{name}: {1e3 * statistics.median(variant_times):.2f} ms per step  ({fields or "the config"})'
    )
  print(
      f'B / A: {statistics.median(ratios):.3f} (median of {len(ratios)} pairs of blocks;'
      f' {min(ratios):.3f}-{max(ratios):.3f})'
  )


if __name__ == '__main__':
  main()
