"""One model family for all three stages: per-visit CNN encoder -> ConvLSTM over visits -> heads.

Baseline (T0+T1), teacher (T0+T1+T2) and student (T0+T1, plus a head that regresses the teacher's
T2 latent) differ only in the visits they are fed and in `feature_dim`. Works on 2D MIPs and 3D crops
alike: the number of spatial dimensions is read from the input.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


NORMALIZATIONS = ('none', 'group')
# How every convolution is computed: 'native' (lax.conv_general_dilated), 'patches' (patches_conv),
# or 'auto': patches on the CPU backend, native elsewhere (cuDNN and TPU convolutions are fast).
CONVS = ('auto', 'native', 'patches')
DTYPES = ('float32', 'bfloat16')


# The most bytes of patches gathered at once: a larger batch is convolved (and the visit encoder run)
# in chunks of examples, each gathered, multiplied and, backwards, re-gathered while it is still in
# the cache. Counted as k^d * C values per output (blocked rows, below, gather fewer: a bound). The
# `volume` training step, budgets against each other compiled side by side in one process (AMD EPYC,
# 2 cores): 32 MiB 1.17x, 8 MiB 0.83x, 4 MiB 0.76x, 2 MiB 0.75x the 16 MiB step (one visit image per
# encoder chunk from 8 MiB on; the ConvLSTM's products in chunks of 4 images at 4 MiB); `mip`
# unchanged (0.99x at 8 and at 4 MiB, where its second convolution runs in two chunks).
MAX_PATCH_BYTES = 4 << 20


def patches_conv(lhs, rhs, window_strides, padding, *, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, precision=None,
                 max_patch_bytes=None):
  """A convolution as one matrix product over its patches: same outputs and gradients, fast on XLA:CPU.

  XLA:CPU runs the input gradient of a strided convolution (an lhs-dilated convolution) on an
  unoptimised loop (jax-ml/jax#31662: a 3x3x3 stride-2 conv, batch 32, 16 -> 32 features, takes
  51 ms forward but 3.4 s for its input gradient), and convolutions with few input channels (the
  3 phases of a visit) slowly. Here the patches are gathered with strided slices, one spatial axis
  at a time (k shifted copies concatenated on the channel axis, so each copy moves whole rows of
  channels; two outputs per row where rows would be short), and multiplied by the kernel viewed as
  a [prod(k) * C, F] matrix; the gradients are pads, adds and matrix products. The gathers are
  memory-bound, so a batch whose patches exceed `max_patch_bytes` (default MAX_PATCH_BYTES) is
  convolved in chunks of examples (`lax.map`, the patches rematerialised for the backward pass
  rather than stored). A drop-in for lax.conv_general_dilated as flax's nn.Conv calls it, for
  channels-last layouts without dilation or feature groups.
  """
  spatial_dims = lhs.ndim - 2
  if (feature_group_count != 1 or any(d != 1 for d in lhs_dilation or ())
      or any(d != 1 for d in rhs_dilation or ())):
    raise ValueError('patches_conv supports neither dilation nor feature groups.')
  kernel_size = rhs.shape[:spatial_dims]
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:-1], kernel_size, window_strides, padding)
  out_shape = [(size + sum(pad) - k) // s + 1
               for size, pad, k, s in zip(lhs.shape[1:-1], padding, kernel_size, window_strides)]
  example_patch_bytes = math.prod(out_shape) * math.prod(rhs.shape[:-1]) * lhs.dtype.itemsize
  chunk = _examples_per_chunk(lhs.shape[0], example_patch_bytes, max_patch_bytes)
  product = functools.partial(_patches_product, rhs=rhs, window_strides=window_strides,
                              padding=padding, precision=precision)
  if chunk == lhs.shape[0]:
    return product(lhs)
  out = lax.map(jax.checkpoint(product), lhs.reshape((-1, chunk) + lhs.shape[1:]))
  return out.reshape((lhs.shape[0],) + out.shape[2:])


def _examples_per_chunk(num_examples: int, example_patch_bytes: int, max_patch_bytes: int | None) -> int:
  """The largest divisor of num_examples whose patches fit max_patch_bytes (at least 1).

  All of them on several devices: the batch is sharded over the devices, and the chunks' reshape
  would reshard it (the `mip` step on 4 forced host devices: 36 -> 87 ms).
  """
  if jax.device_count() > 1:
    return num_examples
  limit = max(1, (MAX_PATCH_BYTES if max_patch_bytes is None else max_patch_bytes) // example_patch_bytes)
  return max(d for d in range(1, min(num_examples, limit) + 1) if num_examples % d == 0)


# Patches rows shorter than this (the first convolution's few input channels: 27 x 3 values in 3D)
# make a memory-bound product; such a convolution computes two neighbouring outputs per row.
MIN_PATCH_ROW = 128


def _patches_product(lhs, *, rhs, window_strides, padding, precision):
  """patches_conv of one chunk: gather the patches, then one 2D matrix product.

  Where a patch row would be short (< MIN_PATCH_ROW values) and the last spatial axis has stride 1,
  each row covers `block` = 2 neighbouring outputs along it (k + 1 taps; the kernel matrix, zero
  where a tap misses an output, is [.., k + 1, C] x [2 * F]): fewer bytes gathered per output and
  a wider product (the training step, blocked against unblocked, compiled side by side in one
  process: `volume` 0.89x, `mip` 0.93x; blocking every stride-1 convolution made `mip` slower, its
  ConvLSTM's rows being long already).
  """
  spatial_dims = lhs.ndim - 2
  kernel_size = rhs.shape[:spatial_dims]
  x = jnp.pad(lhs, [(0, 0)] + [tuple(p) for p in padding] + [(0, 0)])
  last, features = spatial_dims - 1, rhs.shape[-1]
  block = 2 if window_strides[last] == 1 and math.prod(rhs.shape[:-1]) < MIN_PATCH_ROW else 1
  if block > 1:
    k = kernel_size[last]
    out_last = x.shape[last + 1] - k + 1
    blocks = -(-out_last // block)
    x = jnp.pad(x, [(0, 0)] * (last + 1) + [(0, blocks * block - out_last), (0, 0)])
    x = _shifted_copies(x, k + block - 1, block, last)
    # Output p of a block reads taps p .. p + k - 1 of its k + block - 1.
    no_pad = [(0, 0)] * rhs.ndim
    rhs = jnp.stack([jnp.pad(rhs, no_pad[:last] + [(p, block - 1 - p)] + no_pad[:2]) for p in range(block)],
                    axis=-2)
  # Innermost axis first: the channels end up ordered (k_0, ..., k_{d-1}, C), the kernel's row order.
  for axis in reversed(range(last if block > 1 else spatial_dims)):
    x = _shifted_copies(x, kernel_size[axis], window_strides[axis], axis)
  # A 2D product: its kernel gradient is then one [K, M] x [M, F] product; contracting the N-D
  # patches over all their leading axes was ~15 % slower on the 2D steps (paired benchmark runs).
  out = jnp.dot(x.reshape(-1, x.shape[-1]), rhs.reshape(-1, block * features), precision=precision)
  out = out.reshape(x.shape[:-2] + (x.shape[-2] * block, features))
  return lax.slice_in_dim(out, 0, out_last, axis=last + 1) if block > 1 else out


def _shifted_copies(x, taps: int, stride: int, axis: int):
  """x [N, *spatial, C] -> [N, .., out, .., taps * C]: copy i starts at i on spatial `axis`, `stride` apart.

  Stacked on a new axis before the channels, then merged with them (the same bytes as concatenating
  on the channel axis, which XLA:CPU fuses less well: the training step, one against the other
  compiled side by side in one process, `volume` 0.94-0.95x, `mip` 0.99-1.01x).
  """
  out = (x.shape[axis + 1] - taps) // stride + 1
  copies = [lax.slice_in_dim(x, i, i + (out - 1) * stride + 1, stride, axis=axis + 1) for i in range(taps)]
  return jnp.stack(copies, axis=-2).reshape(copies[0].shape[:-1] + (-1,))


def resolve_conv(conv: str) -> str:
  """'auto' -> 'patches' on the CPU backend, 'native' elsewhere."""
  if conv == 'auto':
    return 'patches' if jax.default_backend() == 'cpu' else 'native'
  return conv


def conv_fn(conv: str):
  """The convolution function for nn.Conv's `conv_general_dilated` (None: flax's own)."""
  return patches_conv if resolve_conv(conv) == 'patches' else None


_ENCODER_KERNEL = 3


def _encoder_layers(features: Sequence[int]) -> list[tuple[int, int]]:
  """(features, stride) of each of VisitEncoder's convolutions: stride 1 first, then 2."""
  return [(f, 1 if i == 0 else 2) for i, f in enumerate(features)]


def _encoder_patches_per_image(image_shape: Sequence[int], features: Sequence[int]) -> int:
  """The most patch elements one of VisitEncoder's layers gathers for one [*spatial, C] image."""
  spatial, channels, largest = image_shape[:-1], image_shape[-1], 0
  for layer_features, stride in _encoder_layers(features):
    spatial = [-(-size // stride) for size in spatial]  # 'SAME': ceil(size / stride).
    largest = max(largest, math.prod(spatial) * _ENCODER_KERNEL ** len(spatial) * channels)
    channels = layer_features
  return largest


class VisitEncoder(nn.Module):
  """A small conv net applied to each visit independently (weights shared across visits).

  `normalization='group'` renormalises every visit image on its own (GroupNorm's statistics are
  per example): it erases the visit's overall enhancement level, and with it the change of
  enhancement between visits that carries the early response. 'none' keeps the input's scale (one
  per patient, set by the input pipeline) all the way to the ConvLSTM.
  """

  features: Sequence[int]
  normalization: str = 'none'
  conv: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, *spatial, C] -> [N, *spatial / 2**(len(features) - 1), features[-1]]."""
    spatial_dims = x.ndim - 2
    for features, stride in _encoder_layers(self.features):
      x = nn.Conv(features, (_ENCODER_KERNEL,) * spatial_dims, strides=(stride,) * spatial_dims,
                  use_bias=self.normalization == 'none', dtype=self.dtype,
                  conv_general_dilated=conv_fn(self.conv))(x)
      if self.normalization == 'group':
        x = nn.GroupNorm(num_groups=min(8, features), dtype=self.dtype)(x)
      x = nn.relu(x)
    return x


class _EncoderChunk(VisitEncoder):
  """VisitEncoder as nn.scan's body: no carry, one chunk of visit images per iteration."""

  def __call__(self, carry, x):  # pylint: disable=arguments-differ
    return carry, super().__call__(x)


def encode_visits(x: jax.Array, *, name: str, **encoder_fields) -> jax.Array:
  """VisitEncoder(**encoder_fields) on x [N, *spatial, C], in chunks of images on the patches path.

  Where a layer's patches for the whole batch exceed MAX_PATCH_BYTES (the `volume` crops), the
  encoder runs image chunk by image chunk (nn.scan, rematerialised for the backward pass), so that
  each layer's patches, outputs and gradients stay in the cache; the parameters (shared across the
  chunks) and the results are those of one VisitEncoder over the batch.
  """
  num_images = x.shape[0]
  if resolve_conv(encoder_fields.get('conv', 'auto')) == 'patches':
    image_bytes = _encoder_patches_per_image(x.shape[1:], encoder_fields['features']) * x.dtype.itemsize
    chunk = _examples_per_chunk(num_images, image_bytes, None)
  else:
    chunk = num_images
  if chunk == num_images:
    return VisitEncoder(**encoder_fields, name=name)(x)
  scanned = nn.scan(nn.remat(_EncoderChunk), variable_broadcast='params', split_rngs={'params': False},
                    length=num_images // chunk)
  _, out = scanned(**encoder_fields, name=name)(None, x.reshape((-1, chunk) + x.shape[1:]))
  return out.reshape((num_images,) + out.shape[2:])


class ConvLSTM(nn.Module):
  """A ConvLSTM over the visit axis that carries its state unchanged through a missing visit.

  The arithmetic of flax's ConvLSTMCell (gates = ih(x) + hh(h), split i, g, f, o; forget bias +1),
  arranged for speed: the input-to-gates convolution runs once over every visit (one large matrix
  product), the hidden-to-gates one (bias-free: ih's bias is the gates' bias) only from the second
  visit on, the state before the first being zero. The loop over the (few) visits is a Python loop,
  so it is unrolled: a rolled loop makes the convolution gradients 25-100x slower on the CPU backend
  (jax-ml/jax#12868; measured here with nn.scan, 2D batch 8, 128x128x3, 16 features: 13.7 s per
  step rolled, 0.54 s unrolled).
  """

  features: int
  kernel_size: Sequence[int]
  conv: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, visit_mask: jax.Array) -> jax.Array:
    """x: [B, T, *spatial, C], visit_mask: [B, T] -> hidden states [B, T, *spatial, features]."""
    conv = functools.partial(nn.Conv, 4 * self.features, self.kernel_size, dtype=self.dtype,
                             conv_general_dilated=conv_fn(self.conv))
    input_gates = conv(name='ih')(x)  # nn.Conv folds the visit axis into the batch.
    hidden_gates = conv(use_bias=False, name='hh')
    c = h = jnp.zeros(x.shape[:1] + x.shape[2:-1] + (self.features,), self.dtype)
    hidden = []
    for visit in range(x.shape[1]):
      gates = input_gates[:, visit] + (hidden_gates(h) if visit else 0)
      i, g, f, o = jnp.split(gates, 4, axis=-1)
      new_c = nn.sigmoid(f + 1) * c + nn.sigmoid(i) * jnp.tanh(g)
      new_h = nn.sigmoid(o) * jnp.tanh(new_c)
      keep = visit_mask[:, visit].reshape((-1,) + (1,) * (h.ndim - 1))
      c, h = jnp.where(keep, new_c, c), jnp.where(keep, new_h, h)
      hidden.append(h)
    return jnp.stack(hidden, axis=1)


def kinetics_features(kinetics: jax.Array, visit_mask: jax.Array) -> jax.Array:
  """[B, T, K] tumour kinetics, [B, T] visit flags -> [B, K + (T - 1) * (K + 1)]: the first visit's
  kinetics, each later visit's change from it (0 where the visit is missing) and its flag.

  Changes, not levels: the response is the change, and an L2 penalty (the head's logistic start,
  weight decay) then shrinks what varies little between patients, not the response (the logistic
  start alone on `ispy2/synthetic`'s 5 inner validation splits: mean AUROC 0.749 vs 0.737 on the
  levels).
  """
  present = visit_mask.astype(kinetics.dtype)[..., None]
  change = (kinetics[:, 1:] - kinetics[:, :1]) * present[:, 1:]
  return jnp.concatenate([kinetics[:, 0], change.reshape(change.shape[0], -1),
                          present[:, 1:, 0]], axis=-1)


def receptor_cells(clinical: jax.Array) -> jax.Array:
  """[B, K] binary receptor status -> [B, 2**K]: the one-hot of its combination (the subtype).

  Cell c holds the patients whose input k is bit k of c. A one-hot gives each subtype its own
  logit offset, which a linear read of the K bits cannot (HR-/HER2+ responds best, HR+/HER2-
  worst: not additive).
  """
  num = clinical.shape[-1]
  cells = [math.prod(clinical[..., k] if c >> k & 1 else 1 - clinical[..., k] for k in range(num))
           for c in range(2 ** num)]
  return jnp.stack(cells, axis=-1)


POOLINGS = ('mean', 'tumour')


def tumour_weights(tumour: jax.Array, spatial: Sequence[int], floor: float = 0.01) -> jax.Array:
  """[B, T, *input spatial] tumour masks -> [B, *spatial] pooling weights: the share of each
  position of the ConvLSTM's grid covered by the tumour at any visit, plus `floor` (so that a
  patient whose mask is empty pools every position alike, as 'mean' does)."""
  footprint = tumour.astype(jnp.float32).max(axis=1)
  share = jax.image.resize(footprint, footprint.shape[:1] + tuple(spatial), 'linear', antialias=True)
  return jnp.clip(share, 0.0, 1.0) + floor


class PCRNet(nn.Module):
  """Predicts pCR (a logit) from a patient's visits; the student also predicts its T2 target.

  The latent is the ConvLSTM's hidden state after the last visit, pooled over space: averaged
  (`pooling='mean'`), or weighted by the tumour's footprint over the visits (`'tumour'`,
  `tumour_weights`), which makes it describe the tumour rather than the breast around it; for the
  teacher that is its "T2 latent", one of the student's possible regression targets. The pCR
  head reads the latent and, with `tumour_kinetics`, the tumour kinetics (volume and mean kinetics
  of the FTV voxels, pcrjax.input_pipeline.KINETICS) of the first visit and their change at each
  later one. With `clinical_inputs`, each subtype (HR, HER2 combination) adds its own offset to the
  logit; the trainer starts them, and the kinetics' weights, at the training fold's logistic model
  (pcrjax.train.head_start). With `reads_prediction`, the student's pCR logit also reads its own
  prediction of the target. The latent itself is the image's alone. `dtype` is the compute dtype of
  the encoder and the ConvLSTM (params stay float32; the heads and the loss run in float32).
  """

  encoder_features: Sequence[int] = (16, 32, 32)
  lstm_features: int = 32
  kernel_size: int = 3
  dropout_rate: float = 0.0
  feature_dim: int = 0  # > 0: add the feature-regression head (the student).
  reads_prediction: bool = False  # The pCR head also reads the feature head's prediction.
  clinical_inputs: bool = False
  tumour_kinetics: bool = False
  pooling: str = 'mean'
  normalization: str = 'none'
  conv: str = 'auto'
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, images: jax.Array, visit_mask: jax.Array, clinical: jax.Array,
               kinetics: jax.Array | None = None, tumour: jax.Array | None = None, *,
               train: bool) -> dict[str, Any]:
    """images: [B, T, *spatial, C]; visit_mask: [B, T] bool; clinical: [B, K] (read only with
    `clinical_inputs`); kinetics: [B, T, NUM_KINETICS] (read only with `tumour_kinetics`); tumour:
    [B, T, *spatial] masks in the images' crops (read only with `pooling='tumour'`)."""
    batch, visits = images.shape[:2]
    dtype = jnp.dtype(self.dtype)
    encoded = encode_visits(images.reshape((batch * visits,) + images.shape[2:]).astype(dtype),
                            features=self.encoder_features, normalization=self.normalization,
                            conv=self.conv, dtype=dtype, name='encoder')
    encoded = encoded.reshape((batch, visits) + encoded.shape[1:])
    spatial_dims = encoded.ndim - 3
    hidden = ConvLSTM(self.lstm_features, (self.kernel_size,) * spatial_dims, self.conv, dtype,
                      name='convlstm')(
        encoded, visit_mask)
    last = hidden[:, -1].astype(jnp.float32)
    space = tuple(range(1, 1 + spatial_dims))
    if self.pooling == 'tumour':
      weights = tumour_weights(tumour, last.shape[1:-1])[..., None]
      latent = (last * weights).sum(axis=space) / weights.sum(axis=space)
    else:
      latent = last.mean(axis=space)
    head_input = nn.Dropout(self.dropout_rate, deterministic=not train)(latent)
    seen = latent  # What the feature head reads: all that the student sees at T0/T1.
    if self.tumour_kinetics:
      measured = kinetics_features(kinetics, visit_mask)
      head_input = jnp.concatenate([head_input, measured], axis=-1)
      seen = jnp.concatenate([latent, measured], axis=-1)
    logit = nn.Dense(1, name='pcr_head')(head_input)[:, 0]
    if self.clinical_inputs:
      cells = receptor_cells(clinical.astype(jnp.float32))
      logit += nn.Dense(1, use_bias=False, kernel_init=nn.initializers.zeros,
                        name='subtype_offset')(cells)[:, 0]
    outputs = {'latent': latent}
    if self.feature_dim:
      x = nn.relu(nn.Dense(self.lstm_features, name='feature_hidden')(seen))
      outputs['feature_pred'] = nn.Dense(self.feature_dim, name='feature_head')(x)
      if self.reads_prediction:  # The predicted T2 (standardised: unit scale), read from 0.
        logit += nn.Dense(1, use_bias=False, kernel_init=nn.initializers.zeros,
                          name='prediction_head')(outputs['feature_pred'])[:, 0]
    outputs['logit'] = logit
    return outputs
