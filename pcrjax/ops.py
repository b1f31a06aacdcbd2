"""A convolution as one matrix product over its patches: lax.conv_general_dilated's results, fast on XLA:CPU.

XLA:CPU runs the input gradient of a strided convolution (an lhs-dilated convolution) on an
unoptimised loop (jax-ml/jax#31662), and convolutions with few input channels (the 3 phases of a
visit) slowly. `PatchesConv` gathers the patches with strided slices instead and multiplies them by
the kernel; its gradients are pads, adds and matrix products. benchmarks/README.md has the figures.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

# The network's budget (PCRNet.max_patch_bytes): the `volume` step's time falls with the budget down
# to 4 MiB and no further (benchmarks/README.md); above it, a chunk's patches leave the cache.
MAX_PATCH_BYTES = 4 << 20
# A batch whose patches fit this is convolved whole: chunks pay a loop and, in training, a second
# forward pass (their rematerialisation), which only a batch far beyond the cache earns back (the
# 3D crops: ~170 MB for the first layer; the MIPs: < 20 MB; benchmarks/README.md).
CHUNK_ABOVE_BYTES = 64 << 20

# Patches rows shorter than this (the first convolution's few input channels: 27 x 3 values in 3D)
# make a memory-bound product; such a convolution computes two neighbouring outputs per row.
MIN_PATCH_ROW = 128


@dataclasses.dataclass(frozen=True)
class PatchesConv:
  """A drop-in for lax.conv_general_dilated as flax's nn.Conv calls it (`conv_general_dilated=`),
  for channels-last layouts without dilation or feature groups: the same outputs and gradients.

  The patches are gathered one spatial axis at a time (k shifted copies merged with the channels,
  so that each copy moves whole rows of channels; two outputs per row where rows would be short)
  and multiplied by the kernel viewed as a [prod(k) * C, F] matrix. The gathers are memory-bound,
  so a batch whose patches exceed `chunk_above_bytes` is convolved in chunks of examples whose
  patches fit `max_patch_bytes` (`lax.map`, the patches rematerialised for the backward pass
  rather than stored), each gathered, multiplied and, backwards, re-gathered while it is still in
  the cache. `devices`: the devices the batch is
  split over; on several, the batch is convolved at once, as chunks of it would reshard it.
  """

  max_patch_bytes: int
  devices: int
  chunk_above_bytes: int = CHUNK_ABOVE_BYTES

  def __call__(
      self,
      lhs,
      rhs,
      window_strides,
      padding,
      *,
      lhs_dilation=None,
      rhs_dilation=None,
      dimension_numbers=None,
      feature_group_count=1,
      precision=None,
  ):
    spatial_dims = lhs.ndim - 2
    if (
        feature_group_count != 1
        or any(d != 1 for d in lhs_dilation or ())
        or any(d != 1 for d in rhs_dilation or ())
    ):
      raise ValueError(
          'PatchesConv supports neither dilation nor feature groups.'
      )
    kernel_size = rhs.shape[:spatial_dims]
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(
          lhs.shape[1:-1], kernel_size, window_strides, padding
      )
    out_shape = [
        (size + sum(pad) - k) // s + 1
        for size, pad, k, s in zip(
            lhs.shape[1:-1], padding, kernel_size, window_strides
        )
    ]
    example_patch_bytes = (
        math.prod(out_shape) * math.prod(rhs.shape[:-1]) * lhs.dtype.itemsize
    )
    chunk = self.examples_per_chunk(lhs.shape[0], example_patch_bytes)
    product = functools.partial(
        _patches_product,
        rhs=rhs,
        window_strides=window_strides,
        padding=padding,
        precision=precision,
    )
    if chunk == lhs.shape[0]:
      return product(lhs)
    out = lax.map(
        jax.checkpoint(product), lhs.reshape((-1, chunk) + lhs.shape[1:])
    )
    return out.reshape((lhs.shape[0],) + out.shape[2:])

  def examples_per_chunk(
      self, num_examples: int, example_patch_bytes: int
  ) -> int:
    """The largest divisor of num_examples whose patches fit max_patch_bytes (at least 1); all of
    them where the batch's patches fit chunk_above_bytes, or on several devices.

    Patches are counted as k^d * C values per output (blocked rows gather fewer: a bound).
    """
    if (
        self.devices > 1
        or num_examples * example_patch_bytes <= self.chunk_above_bytes
    ):
      return num_examples
    limit = max(1, self.max_patch_bytes // example_patch_bytes)
    return max(
        d
        for d in range(1, min(num_examples, limit) + 1)
        if num_examples % d == 0
    )


def _patches_product(lhs, *, rhs, window_strides, padding, precision):
  """PatchesConv of one chunk: gather the patches, then one 2D matrix product.

  Where a patch row would be short (< MIN_PATCH_ROW values) and the last spatial axis has stride 1,
  each row covers `block` = 2 neighbouring outputs along it (k + 1 taps; the kernel matrix, zero
  where a tap misses an output, is [.., k + 1, C] x [2 * F]): fewer bytes gathered per output and
  a wider product. Long rows (the ConvLSTM's) are not blocked: their products are wide already,
  and blocking them too slows the `mip` step.
  """
  spatial_dims = lhs.ndim - 2
  kernel_size = rhs.shape[:spatial_dims]
  x = jnp.pad(lhs, [(0, 0)] + [tuple(p) for p in padding] + [(0, 0)])
  last, features = spatial_dims - 1, rhs.shape[-1]
  block = (
      2
      if window_strides[last] == 1 and math.prod(rhs.shape[:-1]) < MIN_PATCH_ROW
      else 1
  )
  if block > 1:
    k = kernel_size[last]
    out_last = x.shape[last + 1] - k + 1
    blocks = -(-out_last // block)
    x = jnp.pad(
        x, [(0, 0)] * (last + 1) + [(0, blocks * block - out_last), (0, 0)]
    )
    x = _shifted_copies(x, k + block - 1, block, last)
    # Output p of a block reads taps p .. p + k - 1 of its k + block - 1.
    no_pad = [(0, 0)] * rhs.ndim
    rhs = jnp.stack(
        [
            jnp.pad(rhs, no_pad[:last] + [(p, block - 1 - p)] + no_pad[:2])
            for p in range(block)
        ],
        axis=-2,
    )
  # Innermost axis first: the channels end up ordered (k_0, ..., k_{d-1}, C), the kernel's row order.
  for axis in reversed(range(last if block > 1 else spatial_dims)):
    x = _shifted_copies(x, kernel_size[axis], window_strides[axis], axis)
  # A 2D product: its kernel gradient is then one [K, M] x [M, F] product, which XLA:CPU runs
  # faster than a contraction of the N-D patches over all their leading axes.
  out = jnp.dot(
      x.reshape(-1, x.shape[-1]),
      rhs.reshape(-1, block * features),
      precision=precision,
  )
  out = out.reshape(x.shape[:-2] + (x.shape[-2] * block, features))
  return lax.slice_in_dim(out, 0, out_last, axis=last + 1) if block > 1 else out


def _shifted_copies(x, taps: int, stride: int, axis: int):
  """x [N, *spatial, C] -> [N, .., out, .., taps * C]: copy i starts at i on spatial `axis`, `stride` apart.

  Stacked on a new axis before the channels, then merged with them: the same bytes as concatenating
  on the channel axis, which XLA:CPU fuses less well.
  """
  out = (x.shape[axis + 1] - taps) // stride + 1
  copies = [
      lax.slice_in_dim(x, i, i + (out - 1) * stride + 1, stride, axis=axis + 1)
      for i in range(taps)
  ]
  return jnp.stack(copies, axis=-2).reshape(copies[0].shape[:-1] + (-1,))
