"""What the JAX and PyTorch halves share: the cases and their input shapes, memory, the environment.

Kept free of jax and torch imports, so that both halves describe a case the same way.
"""

from __future__ import annotations

import importlib.metadata
import platform
import resource

# name -> (visits the network sees, one visit's shape [*spatial, C], whether it regresses a target).
# C = 3: the default subtraction channels (pre-contrast, early - pre, late - pre).
CASES = {
    'mip': (
        2,
        (32, 32, 3),
        False,
    ),  # Baseline: T0+T1 MIPs (the default representation).
    'mip_teacher': (3, (32, 32, 3), False),  # Stage-1 teacher: T0+T1+T2 MIPs.
    'student': (
        2,
        (32, 32, 3),
        True,
    ),  # Stage-2 student: T0+T1 MIPs + its precomputed T2 target.
    'volume': (
        2,
        (16, 32, 32, 3),
        False,
    ),  # data.representation='volume': 3D crops, D x H x W.
}
DEFAULT_BATCH = 16
POS_WEIGHT = 2.0  # A typical 'balanced' pCR weight (n_neg / n_pos); it does not change the cost.
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, for MFU on a GPU.
BF16_PEAK_TFLOPS = {
    'H200': 989.0,
    'H100': 989.0,
    'A100': 312.0,
    'L4': 121.0,
    'A10G': 125.0,
    'T4': 65.0,
    'V100': 125.0,
}


def max_rss_bytes() -> int:
  """The process's resident-memory high-water mark (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def versions(*packages: str) -> dict[str, str]:
  found = {}
  for package in packages:
    try:
      found[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def bf16_peak_tflops(device_kind: str) -> float | None:
  return next(
      (peak for name, peak in BF16_PEAK_TFLOPS.items() if name in device_kind),
      None,
  )


def machine() -> dict:
  return {
      'python': platform.python_version(),
      'machine': platform.machine(),
      'processor': platform.processor() or platform.machine(),
  }
