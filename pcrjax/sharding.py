"""The device mesh: batches are split over the 'data' axis, parameters replicated."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def make_mesh() -> jax.sharding.Mesh:
  # Auto axes: the compiler propagates shardings inside the step from the inputs' shardings.
  return jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec('data'))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Places a host batch on the mesh, split along its leading (batch) axis."""
  return jax.device_put(batch, sharding)
