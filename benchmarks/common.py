"""What step_time.py (JAX) and torch_twin.py (PyTorch) share: the cases, the flags, the output line.

Kept free of jax and torch imports so that both scripts describe a case, parse flags and print a
result in exactly the same way, and their lines can be compared side by side.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # Run as `python benchmarks/x.py` without installing pcrjax.
  sys.path.insert(0, str(REPO))

# name -> (visits T, one visit's shape [*spatial, C]); batch 16 unless --batch_size says otherwise.
CASES = {
    'mip': (2, (32, 32, 3)),  # Baseline / student: T0+T1 MIPs (the default representation).
    'mip_teacher': (3, (32, 32, 3)),  # Stage-1 teacher: T0+T1+T2 MIPs.
    'volume': (2, (16, 32, 32, 3)),  # 3D tumour-centred crops, D x H x W.
}
DEFAULT_BATCH = 16
POS_WEIGHT = 2.0  # A typical 'balanced' pCR weight (n_neg / n_pos); it does not change the cost.


def parse_args(description: str, extra=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument('--cases', default=','.join(CASES), help=f'comma-separated, of {list(CASES)}')
  parser.add_argument('--steps', type=int, default=20, help='timed steps (median reported)')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps after the first one')
  parser.add_argument('--batch_size', type=int, default=None, help=f'default {DEFAULT_BATCH}')
  parser.add_argument('--json_out', default=None, help='also write the results here as JSON')
  if extra:
    extra(parser)
  args = parser.parse_args()
  args.cases = [c.strip() for c in args.cases.split(',') if c.strip()]
  unknown = [c for c in args.cases if c not in CASES]
  if unknown:
    parser.error(f'unknown case(s) {unknown}; known: {list(CASES)}')
  return args


def max_rss_bytes() -> int:
  """The process's resident-memory high-water mark (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def format_line(r: dict) -> str:
  mem = f"{r['peak_bytes'] / 2**20:8.0f} MiB ({r['peak_kind']})" if r['peak_bytes'] else 'n/a'
  return (f"{r['framework']:<7} {r['device']:<24} {r['case']:<12} batch={r['batch']:<4}"
          f" compile_s={r['compile_s']:7.2f}  ms/step={r['ms_per_step']:9.2f}"
          f"  ex/s={r['examples_per_s']:8.1f}  peak={mem}  params={r['params']}")


def report(results: list[dict], json_out: str | None) -> None:
  if json_out:
    pathlib.Path(json_out).write_text(json.dumps(results, indent=2) + '\n')
