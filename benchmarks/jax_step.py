"""The JAX half: pcrjax's own jitted training step, evaluation and input pipeline, timed on one case.

Everything is the code a run executes: `train.train_step` (the step's row of the epoch's batches,
gathered and augmented on the device, AdamW, donation, the metrics merged), `train.eval_step`,
`input_pipeline.device_batch`, on the mesh of every visible device (the batch split over it,
parameters replicated), with `configs.base_config()`'s hyperparameters and random inputs. The
student case adds the regression of a precomputed target, as stage 2 does.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from pcrjax import configs, input_pipeline, models, sharding, train


def median_seconds(fn, steps: int) -> tuple[float, list[float]]:
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def _examples(
    num: int,
    visits: int,
    visit_shape,
    feature_dim: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
  examples = {
      'images': (
          rng.normal(size=(num, visits) + tuple(visit_shape)).astype(np.float32)
      ),
      'visit_mask': np.ones((num, visits), bool),
      'kinetics': (
          rng.normal(size=(num, visits, input_pipeline.NUM_KINETICS)).astype(
              np.float32
          )
      ),
      'tumour': rng.random((num, visits) + tuple(visit_shape)[:-1]) < 0.1,
      'clinical': np.zeros((num, input_pipeline.NUM_CLINICAL), np.float32),
      'label': (np.arange(num) % 2).astype(np.int32),
      'row': np.arange(num, dtype=np.int32),
  }
  if feature_dim:
    examples.update(
        target=rng.normal(size=(num, feature_dim)).astype(np.float32),
        target_mask=np.ones(num, bool),
    )
  return examples


def _model_flops(
    model: models.PCRNet, state, args: tuple, pos_weight, kwargs: dict
) -> float | None:
  """The training step's arithmetic: XLA's cost analysis of the step with `model.conv='native'`.

  Not of the step that runs: cost analysis counts a loop's body once, and the patches path runs
  batches larger than its budget in a loop of chunks (and recomputes their forward); native
  convolutions are the model's multiply-adds, counted without the padding, once, as MFU counts them.
  """
  native = model.clone(conv='native')
  analysis = train.train_step.lower(
      state.replace(apply_fn=native.apply), *args, pos_weight, **kwargs
  ).cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return (
      float(analysis['flops']) if analysis and analysis.get('flops') else None
  )


class Prepared(NamedTuple):
  """A case ready to time: `step()` runs one training step to completion, `figures(step_times)`
  measures the rest; `executable` is the compiled step (its HLO: `benchmarks.profile`).
  """

  step: Callable[[], Any]
  figures: Callable[[list[float]], dict]
  executable: Any


def prepare_case(
    case: str,
    *,
    batch_size: int,
    warmup: int,
    dtype: str = 'float32',
    model_fields: dict | None = None,
):
  """The case's `Prepared` step (compiled and warmed up here) and figures (evaluation, pipeline).
  `model_fields`: PCRNet fields that replace the config's network's (`benchmarks.pair`'s variants).
  """
  config = configs.base_config()
  config.model.dtype = dtype
  visits, visit_shape, with_target = common.CASES[case]
  mesh = sharding.make_mesh()
  replicated = sharding.replicated(mesh)
  init_rng, dropout_rng, augment_rng = jax.random.split(jax.random.key(0), 3)
  feature_dim = config.model.lstm_features if with_target else 0
  model = models.build(config, feature_dim, devices=mesh.size).clone(
      **(model_fields or {})
  )
  state = jax.device_put(
      train.create_train_state(
          init_rng, config, model, (visits,) + visit_shape, steps_per_epoch=100
      ),
      replicated,
  )
  num_examples = 8 * batch_size
  rng = np.random.default_rng(0)
  host = _examples(num_examples, visits, visit_shape, feature_dim, rng)
  examples = jax.device_put(host, replicated)
  pos_weight = jax.device_put(jnp.float32(common.POS_WEIGHT), replicated)
  augmentation = input_pipeline.augmentation(config.data)
  kwargs = dict(augmentation=augmentation, feature_loss_weight=1.0)
  batches = input_pipeline.epoch_batches(
      num_examples, batch_size=batch_size, seed=0, epoch=1
  )
  epoch_rows = jax.device_put(batches, sharding.epoch_batch_sharding(mesh))
  epoch_metrics = jax.device_put(train.TrainMetrics.empty(), replicated)

  args = (epoch_metrics, examples, epoch_rows, dropout_rng, augment_rng)
  start = time.perf_counter()
  compiled = train.train_step.lower(
      state, *args, pos_weight, **kwargs
  ).compile()
  compile_s = time.perf_counter() - start  # Trace and compile.

  def step():  # This executable, whatever later traces of the step compile (`benchmarks.pair`).
    nonlocal state
    state, _ = compiled(state, *args, pos_weight)
    return state

  flops = _model_flops(model, state, args, pos_weight, kwargs)
  jax.block_until_ready(step())
  for _ in range(warmup):
    step()
  jax.block_until_ready(state)
  peak = _peak_memory()  # Before the twin allocates anything in this process.

  def figures(times: list[float]) -> dict:
    step_s = statistics.median(times)
    eval_rows = jax.device_put(
        np.arange(config.eval_batch_size, dtype=np.int32)[None],
        sharding.epoch_batch_sharding(mesh),
    )

    def evaluate():
      return train.eval_step(state.apply_fn, state.params, examples, eval_rows)

    jax.block_until_ready(evaluate())
    eval_s, _ = median_seconds(evaluate, 10)

    # The input pipeline alone, as the step sees it: the epoch's shuffled rows placed on the mesh
    # once, then each step's batch gathered and augmented on the device.
    @jax.jit
    def gather(examples, epoch_rows, step):
      return input_pipeline.device_batch(
          examples,
          epoch_rows[step],
          jax.random.fold_in(augment_rng, step),
          augmentation,
      )

    def pipeline_epoch():
      epoch_rows = jax.device_put(
          input_pipeline.epoch_batches(
              num_examples, batch_size=batch_size, seed=0, epoch=2
          ),
          sharding.epoch_batch_sharding(mesh),
      )
      return [
          gather(examples, epoch_rows, np.int32(step))
          for step in range(len(epoch_rows))
      ][-1]

    jax.block_until_ready(pipeline_epoch())
    pipeline_s, _ = median_seconds(pipeline_epoch, 5)
    device = jax.devices()[0]
    return {
        'framework': 'jax',
        'case': case,
        'batch': batch_size,
        'dtype': dtype,
        'devices': (
            f'{jax.device_count()} x {device.platform}:{device.device_kind}'
        ),
        'compile_s': compile_s,
        'ms_per_step': 1e3 * step_s,
        'examples_per_s': batch_size / step_s,
        'times_ms': [1e3 * t for t in times],
        'eval_examples_per_s': config.eval_batch_size / eval_s,
        'pipeline_examples_per_s': (
            num_examples // batch_size * batch_size / pipeline_s
        ),
        'gflop_per_step': flops / 1e9 if flops else None,
        'gflops_achieved': flops / step_s / 1e9 if flops else None,
        'peak_bytes': peak[0],
        'peak_kind': peak[1],
        'params': sum(
            int(np.prod(p.shape)) for p in jax.tree.leaves(state.params)
        ),
    }

  return Prepared(lambda: jax.block_until_ready(step()), figures, compiled)


def _peak_memory() -> tuple[int, str]:
  stats = (
      jax.devices()[0].memory_stats()
      if jax.default_backend() != 'cpu'
      else None
  )
  if stats and 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device'
  return common.max_rss_bytes(), 'host RSS'


def matmul_peak_gflops(dtype: str = 'float32') -> float:
  """The backend's best matmul rate in this process, over a few shapes, timed as the steps are."""
  shapes = (
      [(2048, 2048, 2048), (4096, 1024, 256), (8192, 512, 128)]
      if jax.default_backend() == 'cpu'
      else [(8192, 8192, 8192), (16384, 4096, 4096)]
  )
  best = 0.0
  for m, k, n in shapes:
    a = jax.random.normal(jax.random.key(0), (m, k), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (k, n), jnp.dtype(dtype))
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))
    seconds, _ = median_seconds(lambda: matmul(a, b), 10)  # noqa: B023 -- called here
    best = max(best, 2 * m * k * n / seconds / 1e9)
  return best
