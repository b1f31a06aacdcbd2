"""Orbax round trip: latest and best kept, state and params-only restore, read-only access."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from pcrjax import checkpoints


def _state(seed):
  params = {
      'w': jax.random.normal(jax.random.key(seed), (3, 4)),
      'b': jnp.arange(4.0) + seed,
  }
  return train_state.TrainState.create(
      apply_fn=None, params=params, tx=optax.adam(1e-3)
  )


def test_round_trip_keeps_latest_and_best(tmp_path):
  manager = checkpoints.create_manager(str(tmp_path))
  states = {epoch: _state(epoch) for epoch in (1, 2, 3, 4)}
  aurocs = {1: 0.6, 2: 0.9, 3: 0.7, 4: 0.65}
  for epoch, state in states.items():
    state = state.replace(
        opt_state=state.tx.update(state.params, state.opt_state, state.params)[
            1
        ]
    )
    states[epoch] = state
    checkpoints.save(
        manager, epoch, state, {checkpoints.SELECTION_METRIC: aurocs[epoch]}
    )
  manager.wait_until_finished()
  assert sorted(manager.all_steps()) == [
      2,
      3,
      4,
  ]  # The two latest and the best.
  assert manager.best_step() == 2 and manager.latest_step() == 4

  restored = checkpoints.restore_state(manager, 4, _state(0))
  for got, want in zip(
      jax.tree.leaves((restored.params, restored.opt_state)),
      jax.tree.leaves((states[4].params, states[4].opt_state)),
  ):
    np.testing.assert_array_equal(got, want)

  reader = checkpoints.create_manager(str(tmp_path), read_only=True)
  params = checkpoints.restore_params(
      reader, reader.best_step(), _state(0).params
  )
  jax.tree.map(np.testing.assert_array_equal, params, states[2].params)


def _damage(step_dir, how):
  files = [p for p in step_dir.rglob('*') if p.is_file()]
  assert files
  for path in files:
    if how == 'truncated':
      with open(path, 'r+b') as f:
        f.truncate(min(100, path.stat().st_size // 2))
    elif how == 'deleted':
      path.unlink()
    else:
      path.write_bytes(b'\x00garbage' * 16)


@pytest.mark.parametrize('how', ['truncated', 'deleted', 'garbage'])
def test_a_damaged_latest_or_best_falls_back_with_one_line(
    tmp_path, how, caplog
):
  manager = checkpoints.create_manager(str(tmp_path))
  states = {epoch: _state(epoch) for epoch in (1, 2, 3, 4)}
  for epoch, auroc in ((1, 0.6), (2, 0.9), (3, 0.7), (4, 0.65)):
    checkpoints.save(
        manager, epoch, states[epoch], {checkpoints.SELECTION_METRIC: auroc}
    )
  manager.wait_until_finished()
  assert sorted(manager.all_steps()) == [
      2,
      3,
      4,
  ]  # The two latest and the best.
  _damage(tmp_path / 'checkpoints' / '4' / 'params', how)
  with caplog.at_level(logging.WARNING):
    restored, epoch = checkpoints.restore_latest(
        checkpoints.create_manager(str(tmp_path)), _state(0)
    )
  assert epoch == 3
  jax.tree.map(np.testing.assert_array_equal, restored.params, states[3].params)
  assert any(
      'Checkpoint 4' in r.getMessage() and 'damaged' in r.getMessage()
      for r in caplog.records
  )

  manager = checkpoints.create_manager(str(tmp_path))
  _damage(tmp_path / 'checkpoints' / '2' / 'params', how)
  params, epoch = checkpoints.restore_best_params(manager, _state(0).params)
  assert epoch == 3  # The next best (0.7) once the best (0.9) is unreadable.
  jax.tree.map(np.testing.assert_array_equal, params, states[3].params)
