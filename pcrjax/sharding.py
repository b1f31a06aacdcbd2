"""The device mesh: batches are split over the 'data' axis, parameters replicated; on one process or
on several (`jax.distributed`: each process places and reads only its own devices' shards).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1D 'data' mesh over the first `num_devices` devices (all by default).

  Auto axes: the compiler propagates shardings inside the step from the inputs' shardings.
  """
  num_devices = num_devices or jax.device_count()
  return jax.make_mesh(
      (num_devices,),
      ('data',),
      axis_types=(jax.sharding.AxisType.Auto,),
      devices=jax.devices()[:num_devices],
  )


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec('data'))


def epoch_batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """[steps, batch] rows of an epoch: each step's batch split over 'data'."""
  return NamedSharding(mesh, PartitionSpec(None, 'data'))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def put(tree, sharding: NamedSharding):
  """Host values (the same on every process) as global arrays of `sharding`.

  Each process places only the shards its own devices hold (jax.make_array_from_callback): the same
  call on one host or on several (`jax.distributed`), where jax.device_put cannot place a value on
  another process's devices.
  """

  def one(value):
    value = np.asarray(value)
    return jax.make_array_from_callback(
        value.shape, sharding, lambda index: value[index]
    )

  return jax.tree.map(one, tree)


def fetch(array: jax.Array) -> np.ndarray:
  """A global array's whole value on this host (gathered from the other processes if need be)."""
  if array.is_fully_addressable:
    return np.asarray(array)
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def is_primary() -> bool:
  """The process that writes the files every process would write alike (logs, predictions)."""
  return jax.process_index() == 0
