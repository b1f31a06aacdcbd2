"""The training step and evaluation give the same numbers on 1, 2 and 4 devices (batch sharded)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent('''
    import functools, json
    import jax, jax.numpy as jnp, numpy as np
    from pcrjax import configs, input_pipeline, sharding, train

    assert jax.device_count() == 4, jax.devices()
    config = configs.base_config(smoke=True)
    rng = np.random.default_rng(0)
    host = {'images': rng.normal(size=(32, 2, 16, 16, 3)).astype(np.float32),
            'visit_mask': np.ones((32, 2), bool), 'clinical': np.zeros((32, 2), np.float32),
            'label': (np.arange(32) % 2).astype(np.int32), 'row': np.arange(32, dtype=np.int32)}
    results = {}
    for devices in (1, 2, 4):
      mesh = sharding.make_mesh(devices)
      replicated = sharding.replicated(mesh)
      model = train.create_model(config)
      state = jax.device_put(train.create_train_state(
          jax.random.key(0), config, model, (2, 16, 16, 3), steps_per_epoch=4), replicated)
      examples = jax.device_put(host, replicated)
      keys = jax.random.split(jax.random.key(1))
      losses = []
      for rows in input_pipeline.epoch_batches(32, batch_size=8, seed=0, epoch=1):
        rows = jax.device_put(rows, sharding.batch_sharding(mesh))
        state, metrics = train._train_step(
            state, examples, rows, keys[0], keys[1], None, jax.device_put(jnp.float32(2.0), replicated),
            augmentation=input_pipeline.augmentation(config.data), feature_loss_weight=1.0,
            student_visits=(0, 1), t2_visit=None)
        losses.append(float(metrics.compute()['loss']))
      assert len(state.params['pcr_head']['kernel'].sharding.device_set) == devices
      eval_fn = functools.partial(train._eval_step, state.apply_fn, visits=(0, 1))
      probs = train.predict(eval_fn, state.params, examples, np.arange(30), batch_size=8,
                            put=functools.partial(jax.device_put, device=sharding.batch_sharding(mesh)))
      results[devices] = {'losses': losses, 'probs': probs.tolist()}
    print(json.dumps(results))
''')


def test_step_and_evaluation_agree_on_1_2_and_4_devices():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _SCRIPT], capture_output=True, text=True, env=env,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  one = results['1']
  assert len(one['losses']) == 4 and len(one['probs']) == 30
  for devices in ('2', '4'):
    # The same batches, augmentation and updates: only the reduction order differs.
    assert results[devices]['losses'] == pytest.approx(one['losses'], rel=1e-4)
    assert results[devices]['probs'] == pytest.approx(one['probs'], rel=1e-4, abs=1e-5)
  assert one['losses'][0] != one['losses'][-1]  # The steps did update the parameters.

