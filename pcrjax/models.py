"""One model family for all three stages: per-visit CNN encoder -> ConvLSTM over visits -> heads.

Baseline (T0+T1), teacher (T0+T1+T2) and student (T0+T1, plus a head that regresses the teacher's
T2 latent) differ only in the visits they are fed and in `feature_dim`. Works on 2D MIPs and 3D crops
alike: the number of spatial dimensions is read from the input. `build` makes a run's network from
its config, `init_params` and `abstract_params` its parameters and their shapes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from pcrjax import input_pipeline, ops

NORMALIZATIONS = ('none', 'group')
# How every convolution is computed: 'native' (lax.conv_general_dilated), 'patches' (ops.PatchesConv),
# or 'auto': patches on the CPU backend, native elsewhere (cuDNN and TPU convolutions are fast).
CONVS = ('auto', 'native', 'patches')
DTYPES = ('float32', 'bfloat16')


def resolve_conv(conv: str) -> str:
  """'auto' -> 'patches' on the CPU backend, 'native' elsewhere."""
  if conv == 'auto':
    return 'patches' if jax.default_backend() == 'cpu' else 'native'
  return conv


def _conv_general_dilated(
    conv: str, max_patch_bytes: int, devices: int, chunk_above_bytes: int
) -> ops.PatchesConv | None:
  """nn.Conv's `conv_general_dilated` for `conv`: an ops.PatchesConv, or None (flax's own)."""
  return (
      ops.PatchesConv(max_patch_bytes, devices, chunk_above_bytes)
      if resolve_conv(conv) == 'patches'
      else None
  )


_ENCODER_KERNEL = 3


def _encoder_layers(features: Sequence[int]) -> list[tuple[int, int]]:
  """(features, stride) of each of VisitEncoder's convolutions: stride 1 first, then 2."""
  return [(f, 1 if i == 0 else 2) for i, f in enumerate(features)]


def _encoder_patches_per_image(
    image_shape: Sequence[int], features: Sequence[int]
) -> int:
  """The most patch elements one of VisitEncoder's layers gathers for one [*spatial, C] image."""
  spatial, channels, largest = image_shape[:-1], image_shape[-1], 0
  for layer_features, stride in _encoder_layers(features):
    spatial = [
        -(-size // stride) for size in spatial
    ]  # 'SAME': ceil(size / stride).
    largest = max(
        largest, math.prod(spatial) * _ENCODER_KERNEL ** len(spatial) * channels
    )
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
  patches: ops.PatchesConv | None = (
      None  # How the convolutions are computed (None: natively).
  )
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, *spatial, C] -> [N, *spatial / 2**(len(features) - 1), features[-1]]."""
    spatial_dims = x.ndim - 2
    for features, stride in _encoder_layers(self.features):
      x = nn.Conv(
          features,
          (_ENCODER_KERNEL,) * spatial_dims,
          strides=(stride,) * spatial_dims,
          use_bias=self.normalization == 'none',
          dtype=self.dtype,
          conv_general_dilated=self.patches,
      )(x)
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

  Where a layer's patches for the whole batch exceed the patches' budget (the `volume` crops), the
  encoder runs image chunk by image chunk (nn.scan, rematerialised for the backward pass), so that
  each layer's patches, outputs and gradients stay in the cache; the parameters (shared across the
  chunks) and the results are those of one VisitEncoder over the batch.
  """
  num_images, patches = x.shape[0], encoder_fields.get('patches')
  if patches is not None:
    image_bytes = (
        _encoder_patches_per_image(x.shape[1:], encoder_fields['features'])
        * x.dtype.itemsize
    )
    chunk = patches.examples_per_chunk(num_images, image_bytes)
  else:
    chunk = num_images
  if chunk == num_images:
    return VisitEncoder(**encoder_fields, name=name)(x)
  scanned = nn.scan(
      nn.remat(_EncoderChunk),
      variable_broadcast='params',
      split_rngs={'params': False},
      length=num_images // chunk,
  )
  _, out = scanned(**encoder_fields, name=name)(
      None, x.reshape((-1, chunk) + x.shape[1:])
  )
  return out.reshape((num_images,) + out.shape[2:])


class ConvLSTM(nn.Module):
  """A ConvLSTM over the visit axis that carries its state unchanged through a missing visit.

  The arithmetic of flax's ConvLSTMCell (gates = ih(x) + hh(h), split i, g, f, o; forget bias +1),
  arranged for speed: the input-to-gates convolution runs once over every visit (one large matrix
  product), the hidden-to-gates one (bias-free: ih's bias is the gates' bias) only from the second
  visit on, the state before the first being zero. The loop over the (few) visits is a Python loop,
  so it is unrolled: a rolled loop makes the convolution gradients many times slower on the CPU
  backend (jax-ml/jax#12868).
  """

  features: int
  kernel_size: Sequence[int]
  patches: ops.PatchesConv | None = (
      None  # How the convolutions are computed (None: natively).
  )
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, visit_mask: jax.Array) -> jax.Array:
    """x: [B, T, *spatial, C], visit_mask: [B, T] -> hidden states [B, T, *spatial, features]."""
    conv = functools.partial(
        nn.Conv,
        4 * self.features,
        self.kernel_size,
        dtype=self.dtype,
        conv_general_dilated=self.patches,
    )
    input_gates = conv(name='ih')(
        x
    )  # nn.Conv folds the visit axis into the batch.
    hidden_gates = conv(use_bias=False, name='hh')
    c = h = jnp.zeros(
        x.shape[:1] + x.shape[2:-1] + (self.features,), self.dtype
    )
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
  weight decay) then shrinks what varies little between patients, not the response (README: the
  kinetics as T0 level + change).
  """
  present = visit_mask.astype(kinetics.dtype)[..., None]
  change = (kinetics[:, 1:] - kinetics[:, :1]) * present[:, 1:]
  return jnp.concatenate(
      [kinetics[:, 0], change.reshape(change.shape[0], -1), present[:, 1:, 0]],
      axis=-1,
  )


def receptor_cells(clinical: jax.Array) -> jax.Array:
  """[B, K] binary receptor status -> [B, 2**K]: the one-hot of its combination (the subtype).

  Cell c holds the patients whose input k is bit k of c. A one-hot gives each subtype its own
  logit offset, which a linear read of the K bits cannot (HR-/HER2+ responds best, HR+/HER2-
  worst: not additive).
  """
  num = clinical.shape[-1]
  cells = [
      math.prod(
          clinical[..., k] if c >> k & 1 else 1 - clinical[..., k]
          for k in range(num)
      )
      for c in range(2**num)
  ]
  return jnp.stack(cells, axis=-1)


POOLINGS = ('mean', 'tumour')


def tumour_weights(
    tumour: jax.Array, spatial: Sequence[int], floor: float = 0.01
) -> jax.Array:
  """[B, T, *input spatial] tumour masks -> [B, *spatial] pooling weights: the share of each
  position of the ConvLSTM's grid covered by the tumour at any visit, plus `floor` (so that a
  patient whose mask is empty pools every position alike, as 'mean' does)."""
  footprint = tumour.astype(jnp.float32).max(axis=1)
  share = jax.image.resize(
      footprint, footprint.shape[:1] + tuple(spatial), 'linear', antialias=True
  )
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
  `max_patch_bytes`, `chunk_above_bytes` and `devices` set the patches path's chunks (ops.PatchesConv). The defaults are
  configs.base_config()'s.
  """

  encoder_features: Sequence[int] = (16, 32, 32)
  lstm_features: int = 32
  kernel_size: int = 3
  dropout_rate: float = 0.0
  feature_dim: int = 0  # > 0: add the feature-regression head (the student).
  reads_prediction: bool = (
      False  # The pCR head also reads the feature head's prediction.
  )
  clinical_inputs: bool = False
  tumour_kinetics: bool = True
  pooling: str = 'mean'
  normalization: str = 'none'
  conv: str = 'auto'
  max_patch_bytes: int = ops.MAX_PATCH_BYTES
  chunk_above_bytes: int = ops.CHUNK_ABOVE_BYTES
  devices: int = 1  # The devices a batch is split over (the mesh's size).
  dtype: str = 'float32'

  @nn.compact
  def __call__(
      self,
      images: jax.Array,
      visit_mask: jax.Array,
      clinical: jax.Array,
      kinetics: jax.Array | None = None,
      tumour: jax.Array | None = None,
      *,
      train: bool,
  ) -> dict[str, Any]:
    """images: [B, T, *spatial, C]; visit_mask: [B, T] bool; clinical: [B, K] (read only with
    `clinical_inputs`); kinetics: [B, T, NUM_KINETICS] (read only with `tumour_kinetics`); tumour:
    [B, T, *spatial] masks in the images' crops (read only with `pooling='tumour'`).
    """
    batch, visits = images.shape[:2]
    dtype = jnp.dtype(self.dtype)
    patches = _conv_general_dilated(
        self.conv, self.max_patch_bytes, self.devices, self.chunk_above_bytes
    )
    encoded = encode_visits(
        images.reshape((batch * visits,) + images.shape[2:]).astype(dtype),
        features=self.encoder_features,
        normalization=self.normalization,
        patches=patches,
        dtype=dtype,
        name='encoder',
    )
    encoded = encoded.reshape((batch, visits) + encoded.shape[1:])
    spatial_dims = encoded.ndim - 3
    hidden = ConvLSTM(
        self.lstm_features,
        (self.kernel_size,) * spatial_dims,
        patches=patches,
        dtype=dtype,
        name='convlstm',
    )(encoded, visit_mask)
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
      logit += nn.Dense(
          1,
          use_bias=False,
          kernel_init=nn.initializers.zeros,
          name='subtype_offset',
      )(cells)[:, 0]
    outputs = {'latent': latent}
    if self.feature_dim:
      x = nn.relu(nn.Dense(self.lstm_features, name='feature_hidden')(seen))
      outputs['feature_pred'] = nn.Dense(self.feature_dim, name='feature_head')(
          x
      )
      if (
          self.reads_prediction
      ):  # The predicted T2 (standardised: unit scale), read from 0.
        logit += nn.Dense(
            1,
            use_bias=False,
            kernel_init=nn.initializers.zeros,
            name='prediction_head',
        )(outputs['feature_pred'])[:, 0]
    outputs['logit'] = logit
    return outputs


# --- A run's network. -----------------------------------------------------------------------------


def build(
    config: ml_collections.ConfigDict, feature_dim: int = 0, *, devices: int = 1
) -> PCRNet:
  """The network of `config.model`; feature_dim > 0 adds the student's feature head (and, with
  `dual_task.reads_prediction`, its read by the pCR head); `devices`: those its batches are split
  over."""
  m = config.model
  return _network(
      encoder_features=tuple(m.encoder_features),
      lstm_features=m.lstm_features,
      kernel_size=m.kernel_size,
      dropout_rate=m.dropout_rate,
      feature_dim=feature_dim,
      reads_prediction=bool(feature_dim) and config.dual_task.reads_prediction,
      clinical_inputs=m.clinical_inputs,
      tumour_kinetics=m.tumour_kinetics,
      pooling=m.pooling,
      normalization=m.normalization,
      conv=m.conv,
      devices=devices,
      dtype=m.dtype,
  )


@functools.cache
def _network(**fields) -> PCRNet:
  """One instance per architecture in a process: a jitted step takes the model's `apply` (and the
  optimizer) as static arguments, so the protocol's trainings of one network share its compiled
  step and evaluation only if they share these objects (otherwise each training retraces them).
  """
  return PCRNet(**fields)


# Initialisation runs once per training and is random-number generation: XLA's level-1 backend
# optimisation compiles it in a third of the time of the default level 2 (1.1 s against 3.5 s per
# network on the 2-core CPU), to the same values (tests/test_models.py).
INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 1}


def _init_params(model: PCRNet, rng: jax.Array, input_shape: tuple[int, ...]):
  images = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
  visit_mask = jnp.ones((1, input_shape[0]), bool)
  clinical = jnp.zeros((1, input_pipeline.NUM_CLINICAL), jnp.float32)
  kinetics = jnp.zeros(
      (1, input_shape[0], input_pipeline.NUM_KINETICS), jnp.float32
  )
  tumour = jnp.zeros(images.shape[:-1], bool)
  return model.init(
      {'params': rng},
      images,
      visit_mask,
      clinical,
      kinetics,
      tumour,
      train=False,
  )['params']


# input_shape: [T, *spatial, C] of one patient. Jitted: one compilation (kept by the persistent
# cache) instead of one per initialiser and layer, slow eagerly on a CPU; the same values.
init_params = jax.jit(
    _init_params,
    static_argnames=('model', 'input_shape'),
    compiler_options=INIT_COMPILER_OPTIONS,
)


def patient_shape(data: ml_collections.ConfigDict) -> tuple[int, ...]:
  """[T, *spatial, C]: one patient's images as `data` (a config's) represents them."""
  return (len(data.time_points),) + tuple(input_pipeline.visit_shape(data))


def abstract_params(model: PCRNet, input_shape: tuple[int, ...]):
  """The shapes and dtypes of the model's params, computing nothing: what a checkpoint restores into."""
  return jax.eval_shape(
      functools.partial(_init_params, model, input_shape=tuple(input_shape)),
      jax.random.key(0),
  )
