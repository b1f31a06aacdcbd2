"""Times one training step of the real pcrjax model, jitted exactly as pcrjax/train.py does.

Why: to know what a step costs per input representation (2D MIPs, 3D crops) and per backend before
sizing a run, and to compare with the PyTorch twin (torch_twin.py), which prints the same line.

  python benchmarks/step_time.py --cases mip,mip_teacher,volume --steps 20 --json_out jax.json

Inputs are random; the model and optimiser are pcrjax's (configs.base_config(), not smoke), on the
default device without shardings, with teacher=None (baseline and teacher steps; the student's step
adds one teacher forward pass). compile_s is the wall time of the first call (trace, compile, run).
Peak memory is process-wide (GPU: the allocator's peak bytes; CPU: max RSS), so it only grows from one
case to the next: run one case per process for a per-case figure.
"""

from __future__ import annotations

import functools
import statistics
import time

from common import CASES, DEFAULT_BATCH, POS_WEIGHT, format_line, max_rss_bytes, parse_args, report

import jax  # noqa: E402  (after common, which puts the repo on sys.path)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pcrjax import configs, input_pipeline, train  # noqa: E402


def param_count(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def peak_memory() -> tuple[int, str]:
  stats = jax.devices()[0].memory_stats() if jax.default_backend() != 'cpu' else None
  if stats and 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device'
  return max_rss_bytes(), 'rss'


def time_case(case: str, batch_size: int, steps: int, warmup: int) -> dict:
  config = configs.base_config()
  visits, visit_shape = CASES[case]
  model = train.create_model(config)
  init_rng, dropout_rng, data_rng = jax.random.split(jax.random.key(0), 3)
  state = train.create_train_state(init_rng, config, model, (visits,) + visit_shape,
                                   steps_per_epoch=100)
  images = jax.random.normal(data_rng, (batch_size, visits) + visit_shape, jnp.float32)
  batch = {'images': images, 'visit_mask': jnp.ones((batch_size, visits), bool),
           'clinical': jnp.zeros((batch_size, input_pipeline.NUM_CLINICAL), jnp.float32),
           'label': jnp.arange(batch_size) % 2}
  step_fn = jax.jit(
      functools.partial(train.train_step, pos_weight=POS_WEIGHT,
                        feature_loss_weight=config.feature_loss_weight,
                        student_visits=tuple(range(visits)), t2_visit=None),
      donate_argnums=0)
  params = param_count(state.params)

  start = time.perf_counter()
  state, _ = step_fn(state, batch, dropout_rng, None)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    state, _ = step_fn(state, batch, dropout_rng, None)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, _ = step_fn(state, batch, dropout_rng, None)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  peak, peak_kind = peak_memory()
  device = jax.devices()[0]
  return {'framework': 'jax', 'device': f'{jax.default_backend()}:{device.device_kind}', 'case': case,
          'batch': batch_size, 'compile_s': compile_s, 'ms_per_step': 1e3 * median,
          'examples_per_s': batch_size / median, 'peak_bytes': peak, 'peak_kind': peak_kind,
          'params': params, 'steps': steps, 'times_ms': [1e3 * t for t in times]}


def main() -> None:
  args = parse_args(__doc__.splitlines()[0])
  results = []
  for case in args.cases:
    results.append(time_case(case, args.batch_size or DEFAULT_BATCH, args.steps, args.warmup))
    print(format_line(results[-1]), flush=True)
  report(results, args.json_out)


if __name__ == '__main__':
  main()
