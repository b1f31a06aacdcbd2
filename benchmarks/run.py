"""The benchmark command: pcrjax's step, evaluation and input pipeline against the PyTorch twin.

  python -m benchmarks.run --out=/tmp/bench             # every case, this machine's default device
  python -m benchmarks.run --cases=volume --steps=5      # one case, fewer steps
  python -m benchmarks.run --dtype=bfloat16              # GPU/TPU: bf16 compute (MFU vs the bf16 peak)

Each case runs in its own process (so that its peak host memory is its own), where the JAX step and
the twin's alternate in blocks of `--block` steps, A B B A, so that both blocks of a pair see nearly
the same machine state; the ratio is the median of the pairs' ratios. Weak scaling runs the `mip`
step on 1, 2, 4 devices (forced host devices on a CPU: `--xla_force_host_platform_device_count`)
with the batch per device fixed.
Writes results.json, results.md (the tables, with the environment) and scaling.png under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

from benchmarks import common

SCALING_CASE = 'mip'


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      '--cases',
      default=','.join(common.CASES),
      help=f'comma-separated, of {list(common.CASES)}',
  )
  parser.add_argument(
      '--steps',
      type=int,
      default=40,
      help='timed steps of each framework (median)',
  )
  parser.add_argument(
      '--block',
      type=int,
      default=5,
      help='steps per block; blocks of the two frameworks alternate A B B A',
  )
  parser.add_argument(
      '--warmup', type=int, default=3, help='untimed steps after the first one'
  )
  parser.add_argument('--batch_size', type=int, default=common.DEFAULT_BATCH)
  parser.add_argument(
      '--dtype', default='float32', choices=('float32', 'bfloat16')
  )
  parser.add_argument(
      '--scaling',
      default='1,2,4',
      help="device counts for weak scaling ('' skips)",
  )
  parser.add_argument(
      '--no_torch', action='store_true', help='skip the PyTorch twin'
  )
  parser.add_argument(
      '--out', default='benchmark_results', help='directory for the results'
  )
  parser.add_argument(
      '--worker', default=None, help=argparse.SUPPRESS
  )  # One case, in a subprocess.
  args = parser.parse_args(argv)
  args.cases = [c for c in args.cases.split(',') if c]
  unknown = [c for c in args.cases if c not in common.CASES]
  if unknown:
    parser.error(f'unknown case(s) {unknown}; known: {list(common.CASES)}')
  return args


def worker(args: argparse.Namespace) -> dict:
  """One case in this process: JAX's and the twin's steps in pairs of blocks, A B B A, then JAX's
  memory and throughputs. Both blocks of a pair see nearly the same machine state (a 2-core VM's
  speed drifts by tens of per cent over minutes), so the ratio is the median of the pairs' ratios of
  block medians. Each block starts with one untimed step: the other framework's threads may still be
  spinning (OpenMP's and XLA's pools wait actively for a while after their work).
  """
  from benchmarks import jax_step  # Imported here: the parent process never initialises a backend.

  try:
    from benchmarks import torch_twin
  except ImportError:
    torch_twin = None
  kwargs = dict(
      batch_size=args.batch_size, warmup=args.warmup, dtype=args.dtype
  )
  cases = {'jax': jax_step.prepare_case(args.worker, **kwargs)}
  if torch_twin is not None and not args.no_torch:
    cases['torch'] = torch_twin.prepare_case(args.worker, **kwargs)
  times = {name: [] for name in cases}
  block_medians = {name: [] for name in cases}
  for pair in range(max(args.steps // args.block, 1)):
    for name in (list(cases) if pair % 2 == 0 else list(cases)[::-1]):
      step = cases[name][0]
      step()
      block = []
      for _ in range(args.block):
        start = time.perf_counter()
        step()
        block.append(time.perf_counter() - start)
      times[name] += block
      block_medians[name].append(statistics.median(block))
  result = cases['jax'][1](times['jax'])
  if 'torch' in cases:
    twin = cases['torch'][1](times['torch'])
    result.update(
        torch=twin['framework'],
        torch_threads=twin['threads'],
        torch_ms_per_step=twin['ms_per_step'],
        torch_times_ms=twin['times_ms'],
        ratio=statistics.median(
            j / t for j, t in zip(block_medians['jax'], block_medians['torch'])
        ),
    )
  result['matmul_peak_gflops'] = jax_step.matmul_peak_gflops(args.dtype)
  return result


def environment() -> dict:
  """Devices and versions, read in a subprocess that initialises JAX's default backend."""
  code = (
      'import jax, json; d = jax.devices()[0]; print(json.dumps({"backend": jax.default_backend(),'
      ' "devices": f"{jax.device_count()} x {d.device_kind}", "cpu_count": __import__("os").cpu_count()}))'
  )
  info = json.loads(
      subprocess.run(
          [sys.executable, '-c', code],
          check=True,
          capture_output=True,
          text=True,
      )
      .stdout.strip()
      .splitlines()[-1]
  )
  info.update(common.machine())
  info['versions'] = common.versions(
      'jax', 'jaxlib', 'flax', 'optax', 'numpy', 'torch'
  )
  return info


def _run_worker(
    case: str,
    args: argparse.Namespace,
    *,
    devices: int | None = None,
    batch_size: int | None = None,
) -> dict:
  argv = [
      sys.executable,
      '-m',
      'benchmarks.run',
      f'--worker={case}',
      f'--steps={args.steps}',
      f'--block={args.block}',
      f'--warmup={args.warmup}',
      f'--dtype={args.dtype}',
      f'--batch_size={batch_size or args.batch_size}',
      f'--cases={case}',
  ]
  env = dict(
      os.environ, XLA_PYTHON_CLIENT_PREALLOCATE='false'
  )  # Leave the GPU to the twin too.
  if args.no_torch or devices:
    argv.append('--no_torch')
  if devices:
    env['XLA_FLAGS'] = (
        env.get('XLA_FLAGS', '')
        + f' --xla_force_host_platform_device_count={devices}'
    )
    env['CUDA_VISIBLE_DEVICES'] = ','.join(map(str, range(devices)))
  out = subprocess.run(
      argv, check=True, capture_output=True, text=True, env=env
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def weak_scaling(args: argparse.Namespace, counts: list[int]) -> list[dict]:
  rows = []
  for n in counts:
    r = _run_worker(
        SCALING_CASE, args, devices=n, batch_size=args.batch_size * n
    )
    rows.append(
        {
            'devices': n,
            'batch': args.batch_size * n,
            'ms_per_step': r['ms_per_step'],
            'device_kind': r['devices'],
        }
    )
  for row in rows:
    row['efficiency'] = rows[0]['ms_per_step'] / row['ms_per_step']
  return rows


def markdown(env: dict, results: list[dict], scaling: list[dict]) -> str:
  versions = ', '.join(f'{k} {v}' for k, v in env['versions'].items())
  lines = [
      f"Backend `{env['backend']}`, {env['devices']}, {env['cpu_count']} CPU cores, "
      f"Python {env['python']}; {versions}.",
      '',
  ]
  peak = results[0]['matmul_peak_gflops'] if results else None
  if peak:
    lines += [
        f'Matmul rate measured in the same runs ({results[0]["dtype"]}): {peak:,.0f} GFLOP/s.',
        '',
    ]
  lines += [
      '| case | batch | compile s | ms/step | examples/s | eval ex/s | pipeline ex/s (x step) '
      '| GFLOP/step | GFLOP/s (% of matmul) | peak memory | PyTorch ms/step | ratio |',
      '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
  ]
  for r in results:
    achieved = (
        f"{r['gflops_achieved']:,.0f} ({100 * r['gflops_achieved'] / r['matmul_peak_gflops']:.0f} %)"
        if r.get('gflops_achieved')
        else 'n/a'
    )
    mfu = common.bf16_peak_tflops(r['devices'])
    if mfu and r.get('gflops_achieved'):
      achieved += (
          f", MFU {100 * r['gflops_achieved'] / (1e3 * mfu):.2f} % of bf16 peak"
      )
    pipeline = f"{r['pipeline_examples_per_s']:,.0f} (x{r['pipeline_examples_per_s'] / r['examples_per_s']:.1f})"
    torch_ms = (
        f"{r['torch_ms_per_step']:,.2f}" if 'torch_ms_per_step' in r else 'n/a'
    )
    ratio = f"{r['ratio']:.2f}" if 'ratio' in r else 'n/a'
    lines.append(
        f"| {r['case']} | {r['batch']} | {r['compile_s']:.1f} | {r['ms_per_step']:,.2f} | "
        f"{r['examples_per_s']:,.0f} | {r['eval_examples_per_s']:,.0f} | {pipeline} | "
        f"{r['gflop_per_step'] or float('nan'):.2f} | {achieved} | "
        f"{r['peak_bytes'] / 2**20:,.0f} MiB {r['peak_kind']} | {torch_ms} | {ratio} |"
    )
  if any('torch' in r for r in results):
    r = next(r for r in results if 'torch' in r)
    lines += [
        '',
        f"PyTorch: {r['torch']}, {r['torch_threads']} threads. Ratio = pcrjax / PyTorch "
        'ms per step (< 1: pcrjax is faster): the median, over pairs of blocks of steps taken '
        "A B B A, of the blocks' median ratio; ms/step: each framework's median step.",
    ]
  if scaling:
    lines += [
        '',
        f'Weak scaling, `{SCALING_CASE}` step, batch {scaling[0]["batch"]} per device:',
        '',
        '| devices | batch | ms/step | efficiency |',
        '| ---: | ---: | ---: | ---: |',
    ]
    lines += [
        f"| {s['devices']} | {s['batch']} | {s['ms_per_step']:,.2f} | {s['efficiency']:.2f} |"
        for s in scaling
    ]
  return '\n'.join(lines) + '\n'


def plot_scaling(scaling: list[dict], path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  fig, ax = plt.subplots(figsize=(4, 3), dpi=150)
  ax.plot(
      [s['devices'] for s in scaling],
      [s['efficiency'] for s in scaling],
      'o-',
      label='measured',
  )
  ax.axhline(1.0, color='grey', ls='--', lw=1, label='ideal')
  ax.set(
      xlabel='devices',
      ylabel='weak-scaling efficiency',
      ylim=(0, 1.1),
      xticks=[s['devices'] for s in scaling],
      title=f"{SCALING_CASE} step, {scaling[0]['device_kind']}",
  )
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.worker:
    print(json.dumps(worker(args)))
    return
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  env = environment()
  results = []
  for case in args.cases:
    results.append(_run_worker(case, args))
    r = results[-1]
    print(
        f"{case:<12} {r['ms_per_step']:9.2f} ms/step  {r['examples_per_s']:8.0f} ex/s"
        + (
            f"  PyTorch {r['torch_ms_per_step']:9.2f} ms  ratio {r['ratio']:.2f}"
            if 'ratio' in r
            else ''
        ),
        flush=True,
    )
  counts = [int(n) for n in args.scaling.split(',') if n]
  if env['backend'] != 'cpu':
    counts = [n for n in counts if n <= int(env['devices'].split(' x ')[0])]
  scaling = weak_scaling(args, counts) if counts else []
  (out / 'results.json').write_text(
      json.dumps(
          {'environment': env, 'cases': results, 'weak_scaling': scaling},
          indent=2,
      )
      + '\n'
  )
  table = markdown(env, results, scaling)
  (out / 'results.md').write_text(table)
  if len(scaling) > 1:
    plot_scaling(scaling, out / 'scaling.png')
  print(table)


if __name__ == '__main__':
  main()
