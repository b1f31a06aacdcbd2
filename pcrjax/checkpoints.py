"""Orbax checkpoints of a run: the latest two (to resume) and the best on validation AUROC (to use),
smoothed over a few epochs.

A checkpoint's step is the number of finished epochs. Items are saved separately (params, opt_state)
so that stage 2 can restore a teacher's `params` alone, read-only. A damaged checkpoint (truncated,
deleted or overwritten files) is reported in one line, deleted, and the next one is used.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

from pcrjax import runs

SELECTION_METRIC = 'val_auroc_smoothed'  # pcrjax.train.smoothed


def _selection_metric(metrics: dict) -> float:
  return metrics[SELECTION_METRIC]


def create_manager(
    workdir: str, *, read_only: bool = False
) -> ocp.CheckpointManager:
  policy = checkpoint_managers.AnyPreservationPolicy(
      [
          checkpoint_managers.LatestN(
              n=2
          ),  # Two: one to fall back on if the last is damaged.
          checkpoint_managers.BestN(get_metric_fn=_selection_metric, n=1),
      ]
  )
  options = ocp.CheckpointManagerOptions(
      best_fn=_selection_metric,
      best_mode='max',
      preservation_policy=policy,
      read_only=read_only,
      create=not read_only,
  )
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), runs.CHECKPOINTS_DIR),
      item_names=('params', 'opt_state'),
      options=options,
  )


@contextlib.contextmanager
def managed(workdir: str):
  """A manager that is closed however the body ends, so that no writer thread outlives the run.

  On an error the manager is closed quietly: the error in flight (a full disk, a divergence) is
  the one to report, not the same one again from a background save.
  """
  manager = create_manager(workdir)
  try:
    yield manager
  except BaseException:
    with contextlib.suppress(Exception):
      manager.close()
    raise
  manager.close()


def save(
    manager: ocp.CheckpointManager, epoch: int, state, metrics: dict[str, float]
) -> None:
  _check_room(manager, epoch, (state.params, state.opt_state))
  manager.save(
      epoch,
      metrics=metrics,
      args=ocp.args.Composite(
          params=ocp.args.StandardSave(state.params),
          opt_state=ocp.args.StandardSave(state.opt_state),
      ),
  )


_METADATA_BYTES = (
    1 << 20
)  # Orbax's metadata, manifests and sharding files, with room to spare.


def _check_room(manager: ocp.CheckpointManager, epoch: int, tree) -> None:
  """Refuses to start a checkpoint that the disk cannot hold (an ENOSPC naming it): a full disk met
  half-way through a save fails Orbax's writer threads one after another, each with a traceback.
  """
  need = sum(leaf.nbytes for leaf in jax.tree.leaves(tree)) + _METADATA_BYTES
  free = shutil.disk_usage(str(manager.directory)).free
  if free < need:
    raise OSError(
        errno.ENOSPC,
        f'No space left on device ({need / 2**20:.1f} MiB needed)',
        os.path.join(str(manager.directory), str(epoch)),
    )


def restore_state(manager: ocp.CheckpointManager, epoch: int, state):
  """`state` with params and optimiser state from checkpoint `epoch` (same shardings as `state`)."""
  restored = manager.restore(
      epoch,
      args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract(state.params)),
          opt_state=ocp.args.StandardRestore(abstract(state.opt_state)),
      ),
  )
  return state.replace(params=restored.params, opt_state=restored.opt_state)


def restore_params(manager: ocp.CheckpointManager, epoch: int, like):
  """Only the `params` item of checkpoint `epoch`, shaped and placed like `like`."""
  return manager.restore(
      epoch,
      args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract(like))),
  ).params


def restore_latest(manager: ocp.CheckpointManager, state):
  """(state, epoch) of the latest readable checkpoint; (`state`, 0) when there is none."""
  for epoch in sorted(manager.all_steps(), reverse=True):
    try:
      return restore_state(manager, epoch, state), epoch
    except Exception as e:  # noqa: BLE001 -- Orbax and TensorStore raise many types for bad files.
      _drop_damaged(manager, epoch, e, 'resuming from the one before')
  return state, 0


def restore_best_params(manager: ocp.CheckpointManager, like):
  """(params, epoch) of the best readable checkpoint; a damaged best falls back to the next best."""
  while (epoch := manager.best_step()) is not None:
    try:
      return restore_params(manager, epoch, like), epoch
    except Exception as e:  # noqa: BLE001 -- as in restore_latest.
      _drop_damaged(manager, epoch, e, 'using the next best')
  raise FileNotFoundError(
      f'No readable checkpoint in {manager.directory}: delete it and train again.'
  )


def _drop_damaged(
    manager: ocp.CheckpointManager, epoch: int, error: Exception, then: str
) -> None:
  logging.warning(
      'Checkpoint %d in %s is damaged (%s: %s); deleted it, %s.',
      epoch,
      manager.directory,
      type(error).__name__,
      str(error).splitlines()[0][:160] if str(error) else '',
      then,
  )
  manager.delete(epoch)


def abstract(tree):
  """Shapes, dtypes and placements to restore `tree`'s like into. A leaf without a placement (from
  `jax.eval_shape`) goes to this process's first device: Orbax would otherwise use the sharding
  the checkpoint was written with, and a model trained on 2 devices would not load on 1.
  """
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def leaf(x):
    struct = ocp.utils.to_shape_dtype_struct(x)
    if getattr(struct, 'sharding', None) is None:
      struct = jax.ShapeDtypeStruct(struct.shape, struct.dtype, sharding=here)
    return struct

  return jax.tree.map(leaf, tree)
