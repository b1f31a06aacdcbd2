"""Where a training step's time goes, op by op: `python -m benchmarks.profile --cases=mip,volume`.

Traces `--steps` steps of a case's compiled training step (the executable `benchmarks.run` times)
with the JAX profiler, reads the trace's XLA op events, and sorts every op of the optimised HLO into
one of four kinds:
- **products**: dots and the fusions built around one (their GFLOP/s: the op's multiply-adds, read
  from the HLO shapes, over its time);
- **data movement**: pads, slices, concatenations, copies, transposes, gathers and scatters (the
  patches gathered for a product and, backwards, their gradients added back);
- **elementwise and reductions**: the rest of the fusions (activations, gates, the optimiser);
- **runtime**: the step's wall time not covered by any op (dispatch, loops, waiting threads).
Prints one table per case and writes profile.json under `--out`.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import pathlib
import re
import tempfile
import time

import jax

from benchmarks import common, jax_step

KINDS = ('products', 'data movement', 'elementwise and reductions')
_MOVEMENT = {
    'pad',
    'slice',
    'concatenate',
    'copy',
    'transpose',
    'gather',
    'scatter',
    'dynamic-slice',
    'dynamic-update-slice',
    'bitcast',
    'reshape',
    'broadcast',
    'parameter',
    'constant',
    'tuple',
    'get-tuple-element',
    'reverse',
    'iota',
}
_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?)(?:\{[^}]*\})? ([\w\-]+)\((.*)$'
)
_SHAPE = re.compile(r'^\w+\[([\d,]*)\]')


def parse_hlo(text: str) -> dict[str, dict]:
  """Optimised HLO text -> {instruction: {'opcode', 'shape', 'calls', 'line'}} and its computations."""
  instructions, computations, current = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    if line and not line.startswith(' ') and line.rstrip().endswith('{'):
      current = line.split()[1 if line.startswith('ENTRY') else 0].lstrip('%')
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, opcode, rest = match.groups()
    dims = _SHAPE.match(shape)
    calls = re.search(r'calls=%?([\w.\-]+)', rest)
    instructions[name] = {
        'opcode': opcode,
        'dims': (
            [int(d) for d in dims.group(1).split(',') if d] if dims else None
        ),
        'calls': calls.group(1) if calls else None,
        'line': line,
    }
    computations[current].append(name)
  return {'instructions': instructions, 'computations': computations}


def _dot_flops(hlo: dict, name: str) -> float:
  """2 x output elements x contracted size of a dot (its lhs read from the defining instruction)."""
  ins = hlo['instructions'][name]
  operands = re.findall(r'%([\w.\-]+)', ins['line'].split(' dot(', 1)[1])
  lhs = hlo['instructions'].get(operands[0])
  contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', ins['line'])
  if not lhs or not lhs['dims'] or not contracting:
    return 0.0
  k = math.prod(
      lhs['dims'][int(d)] for d in contracting.group(1).split(',') if d
  )
  return 2.0 * math.prod(ins['dims'] or [1]) * k


def classify(hlo: dict, name: str) -> tuple[str, float]:
  """(kind, FLOPs) of one op: a dot or a fusion holding one is a product."""
  ins = hlo['instructions'].get(name)
  if ins is None:
    return 'elementwise and reductions', 0.0
  names = [name]
  if ins['opcode'] == 'fusion' and ins['calls']:
    names = hlo['computations'].get(ins['calls'], [])
  opcodes = {hlo['instructions'][n]['opcode'] for n in names}
  if 'dot' in opcodes or 'convolution' in opcodes:
    return 'products', sum(
        _dot_flops(hlo, n)
        for n in names
        if hlo['instructions'][n]['opcode'] == 'dot'
    )
  if opcodes <= _MOVEMENT:
    return 'data movement', 0.0
  return 'elementwise and reductions', 0.0


def op_seconds(trace_dir: str, hlo: dict) -> dict[str, float]:
  """Seconds per HLO op over the trace (events of ops inside loops summed)."""
  path = next(pathlib.Path(trace_dir).rglob('*.trace.json.gz'))
  events = json.load(gzip.open(path))
  events = events['traceEvents'] if isinstance(events, dict) else events
  seconds = collections.Counter()
  for event in events:
    name = event.get('name', '')
    if event.get('ph') == 'X' and name in hlo['instructions']:
      if hlo['instructions'][name]['opcode'] not in (
          'while',
          'conditional',
          'call',
      ):
        seconds[name] += event['dur'] * 1e-6
  return seconds


def profile_case(
    case: str, *, steps: int, batch_size: int, matmul_gflops: float
) -> dict:
  prepared = jax_step.prepare_case(case, batch_size=batch_size, warmup=3)
  step, hlo = prepared.step, parse_hlo(prepared.executable.as_text())
  trace_dir = tempfile.mkdtemp(prefix=f'profile_{case}_')
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    start = time.perf_counter()
    for _ in range(steps):
      step()
    wall = (time.perf_counter() - start) / steps
  per_op = op_seconds(trace_dir, hlo)
  kinds = {kind: {'ms': 0.0, 'gflop': 0.0, 'ops': 0} for kind in KINDS}
  top = []
  for name, seconds in per_op.items():
    kind, flops = classify(hlo, name)
    kinds[kind]['ms'] += 1e3 * seconds / steps
    kinds[kind]['gflop'] += flops / 1e9
    kinds[kind]['ops'] += 1
    top.append((1e3 * seconds / steps, name, kind, flops / 1e9))
  covered = sum(k['ms'] for k in kinds.values())
  return {
      'case': case,
      'step_ms': 1e3 * wall,
      'ops_ms': covered,
      'kinds': kinds,
      'runtime_ms': max(0.0, 1e3 * wall - covered),
      'matmul_gflops': matmul_gflops,
      'top': sorted(top, reverse=True)[:12],
  }


def table(result: dict) -> str:
  step = result['step_ms']
  rows = [
      f"### `{result['case']}`: {step:.1f} ms/step under the profiler, "
      f"matmul rate {result['matmul_gflops']:.0f} GFLOP/s",
      '',
      '| kind | ops | ms/step | share of the step | GFLOP/s (% of matmul) |',
      '| --- | ---: | ---: | ---: | ---: |',
  ]
  for kind, figures in result['kinds'].items():
    rate = ''
    if figures['gflop'] and figures['ms']:
      gflops = figures['gflop'] / (figures['ms'] / 1e3)
      rate = f"{gflops:.0f} ({100 * gflops / result['matmul_gflops']:.0f} %)"
    rows.append(
        f"| {kind} | {figures['ops']} | {figures['ms']:.2f} | {100 * figures['ms'] / step:.0f} % | {rate} |"
    )
  rows.append(
      f"| runtime (no op running) | | {result['runtime_ms']:.2f} | "
      f"{100 * result['runtime_ms'] / step:.0f} % | |"
  )
  rows += [
      '',
      'Longest ops: '
      + '; '.join(
          f'{name} ({kind}) {ms:.2f} ms'
          for ms, name, kind, _ in result['top'][:6]
      ),
      '',
  ]
  return '\n'.join(rows)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cases', default=','.join(common.CASES))
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--batch_size', type=int, default=common.DEFAULT_BATCH)
  parser.add_argument('--out', default='profile_results')
  args = parser.parse_args(argv)
  matmul = jax_step.matmul_peak_gflops()
  results = [
      profile_case(
          case,
          steps=args.steps,
          batch_size=args.batch_size,
          matmul_gflops=matmul,
      )
      for case in args.cases.split(',')
      if case
  ]
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'profile.json').write_text(json.dumps(results, indent=1))
  print('\n'.join(table(r) for r in results))


if __name__ == '__main__':
  main()
