"""The training step and evaluation give the same numbers on 1, 2 and 4 devices (batch sharded), and a
training on 2 processes (jax.distributed) the same as on 1."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import portpicker
import pytest

# Trainings in subprocesses on forced devices and 2 processes.
pytestmark = pytest.mark.slow

_SCRIPT = textwrap.dedent("""
    import functools, json
    import jax, jax.numpy as jnp, numpy as np
    from pcrjax import configs, input_pipeline, models, sharding, train

    assert jax.device_count() == 4, jax.devices()
    config = configs.base_config(smoke=True)
    rng = np.random.default_rng(0)
    host = {'images': rng.normal(size=(32, 2, 16, 16, 3)).astype(np.float32),
            'visit_mask': np.ones((32, 2), bool), 'clinical': np.zeros((32, 2), np.float32),
            'kinetics': rng.normal(size=(32, 2, 4)).astype(np.float32),
            'tumour': rng.random((32, 2, 16, 16)) < 0.1,
            'label': (np.arange(32) % 2).astype(np.int32), 'row': np.arange(32, dtype=np.int32)}
    results = {}
    for devices in (1, 2, 4):
      mesh = sharding.make_mesh(devices)
      replicated = sharding.replicated(mesh)
      model = models.build(config, devices=devices)
      state = jax.device_put(train.create_train_state(
          jax.random.key(0), config, model, (2, 16, 16, 3), steps_per_epoch=4), replicated)
      examples = jax.device_put(host, replicated)
      keys = jax.random.split(jax.random.key(1))
      losses = []
      epoch_rows = jax.device_put(input_pipeline.epoch_batches(32, batch_size=8, seed=0, epoch=1),
                                  sharding.epoch_batch_sharding(mesh))
      for _ in range(len(epoch_rows)):
        state, metrics = train.train_step(
            state, jax.device_put(train.TrainMetrics.empty(), replicated), examples, epoch_rows,
            keys[0], keys[1], jax.device_put(jnp.float32(2.0), replicated),
            augmentation=input_pipeline.augmentation(config.data), feature_loss_weight=1.0)
        losses.append(float(metrics.compute()['loss']))
      assert len(state.params['pcr_head']['kernel'].sharding.device_set) == devices
      eval_fn = functools.partial(train.eval_step, state.apply_fn)
      probs = train.predict(eval_fn, state.params, examples, np.arange(30), batches=(2, 8),
                            put=functools.partial(jax.device_put, device=sharding.epoch_batch_sharding(mesh)))['probability']
      results[devices] = {'losses': losses, 'probs': probs.tolist()}
    print(json.dumps(results))
""")


def test_step_and_evaluation_agree_on_1_2_and_4_devices():
  env = dict(
      os.environ,
      XLA_FLAGS='--xla_force_host_platform_device_count=4',
      JAX_PLATFORMS='cpu',
  )
  out = subprocess.run(
      [sys.executable, '-c', _SCRIPT],
      capture_output=True,
      text=True,
      env=env,
      timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  one = results['1']
  assert len(one['losses']) == 4 and len(one['probs']) == 30
  for devices in ('2', '4'):
    # The same batches, augmentation and updates: only the reduction order differs.
    assert results[devices]['losses'] == pytest.approx(one['losses'], rel=1e-4)
    assert results[devices]['probs'] == pytest.approx(
        one['probs'], rel=1e-4, abs=1e-5
    )
  assert (
      one['losses'][0] != one['losses'][-1]
  )  # The steps did update the parameters.


def test_two_processes_train_as_one_process_with_all_their_devices(
    data_dir, tmp_path
):
  """jax.distributed on one machine: 2 processes x 2 CPU devices (gloo collectives) against 1
  process x 4 devices, the same smoke training: the same losses, checkpoints and predictions.
  """

  def command(workdir, *flags):
    return [
        sys.executable,
        '-m',
        'pcrjax.main',
        '--config=experiments/baseline.py:smoke',
        f'--workdir={workdir}',
        f'--config.data.data_dir={data_dir}',
        '--config.num_epochs=2',
        '--compilation_cache=',
        *flags,
    ]

  repo = pathlib.Path(__file__).resolve().parents[1]
  env = lambda n: {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={n}'}  # noqa: E731
  one = subprocess.Popen(
      command(tmp_path / 'one'),
      env=env(4),
      cwd=repo,
      stderr=subprocess.PIPE,
      text=True,
  )
  address = f'localhost:{portpicker.pick_unused_port()}'
  two = [
      subprocess.Popen(
          command(
              tmp_path / 'two',
              '--distributed',
              f'--coordinator_address={address}',
              '--num_processes=2',
              f'--process_id={i}',
          ),
          env=env(2),
          cwd=repo,
          stderr=subprocess.PIPE,
          text=True,
      )
      for i in range(2)
  ]
  for process in [one, *two]:
    _, process.log = process.communicate(timeout=600)
    assert process.returncode == 0, process.log[-3000:]
  assert (
      'test patients; 4 devices in 2 process(es).' in two[0].log
  )  # Process 0 logs the run,
  assert (
      'epoch 1/2' in two[0].log and 'epoch 1/2' not in two[1].log
  )  # the others do not.

  def metrics(workdir):
    return [
        json.loads(line)
        for line in (workdir / 'metrics.jsonl').read_text().splitlines()
    ]

  ones, twos = metrics(tmp_path / 'one'), metrics(tmp_path / 'two')
  assert [m['epoch'] for m in twos] == [1, 2]
  for a, b in zip(ones, twos):
    for key in ('train_loss', 'val_auroc', 'val_bce'):
      assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
  for split in ('val', 'test'):
    a, b = (
        np.loadtxt(
            tmp_path / run / f'predictions_{split}.csv',
            delimiter=',',
            skiprows=1,
            usecols=2,
        )
        for run in ('one', 'two')
    )
    np.testing.assert_allclose(b, a, atol=2e-6)
  assert sorted(
      p.name for p in (tmp_path / 'two' / 'checkpoints').iterdir()
  ) == sorted(p.name for p in (tmp_path / 'one' / 'checkpoints').iterdir())
