"""The device mesh: batches are split over the 'data' axis, parameters replicated."""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1D 'data' mesh over the first `num_devices` devices (all by default).

  Auto axes: the compiler propagates shardings inside the step from the inputs' shardings.
  """
  num_devices = num_devices or jax.device_count()
  return jax.make_mesh((num_devices,), ('data',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:num_devices])


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec('data'))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
