"""One model family for all three stages: per-visit CNN encoder -> ConvLSTM over visits -> heads.

Baseline (T0+T1), teacher (T0+T1+T2) and student (T0+T1, plus a head that regresses the teacher's
T2 latent) differ only in the visits they are fed and in `feature_dim`. Works on 2D MIPs and 3D crops
alike: the number of spatial dimensions is read from the input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


NORMALIZATIONS = ('none', 'group')


class VisitEncoder(nn.Module):
  """A small conv net applied to each visit independently (weights shared across visits).

  `normalization='group'` renormalises every visit image on its own (GroupNorm's statistics are
  per example): it erases the visit's overall enhancement level, and with it the change of
  enhancement between visits that carries the early response. 'none' keeps the input's scale (one
  per patient, set by the input pipeline) all the way to the ConvLSTM.
  """

  features: Sequence[int]
  normalization: str = 'none'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, *spatial, C] -> [N, *spatial / 2**(len(features) - 1), features[-1]]."""
    spatial_dims = x.ndim - 2
    for i, features in enumerate(self.features):
      strides = (1 if i == 0 else 2,) * spatial_dims
      x = nn.Conv(features, (3,) * spatial_dims, strides=strides,
                  use_bias=self.normalization == 'none')(x)
      if self.normalization == 'group':
        x = nn.GroupNorm(num_groups=min(8, features))(x)
      x = nn.relu(x)
    return x


class MaskedConvLSTMCell(nn.Module):
  """flax's ConvLSTMCell that carries its state unchanged through a missing visit."""

  features: int
  kernel_size: Sequence[int]

  @nn.compact
  def __call__(self, carry, inputs):
    x, present = inputs
    updated, _ = nn.ConvLSTMCell(self.features, self.kernel_size, name='cell')(carry, x)
    keep = present.reshape(present.shape + (1,) * (x.ndim - 1))
    carry = jax.tree.map(lambda new, old: jnp.where(keep, new, old), updated, carry)
    return carry, carry[1]


class ConvLSTM(nn.Module):
  """A ConvLSTM over the visit axis, built with nn.scan.

  The scan is unrolled over the (few) visits: a rolled loop makes the convolution gradients
  25-100x slower on the CPU backend (jax-ml/jax#12868; measured here, 2D batch 8, 128x128x3, 16
  features: 13.7 s per step rolled, 0.54 s unrolled).
  """

  features: int
  kernel_size: Sequence[int]

  @nn.compact
  def __call__(self, x: jax.Array, visit_mask: jax.Array) -> jax.Array:
    """x: [B, T, *spatial, C], visit_mask: [B, T] -> hidden states [B, T, *spatial, features]."""
    num_visits = x.shape[1]
    carry_shape = x.shape[:1] + x.shape[2:-1] + (self.features,)
    carry = (jnp.zeros(carry_shape, x.dtype), jnp.zeros(carry_shape, x.dtype))
    scan = nn.scan(
        MaskedConvLSTMCell,
        variable_broadcast='params',
        split_rngs={'params': False},
        in_axes=1,
        out_axes=1,
        unroll=num_visits,
    )
    _, hidden = scan(self.features, self.kernel_size, name='scan')(carry, (x, visit_mask))
    return hidden


class PCRNet(nn.Module):
  """Predicts pCR (a logit) from a patient's visits; optionally also a teacher's latent vector.

  The latent is the ConvLSTM's hidden state after the last visit, average-pooled over space;
  for the teacher that is its "T2 latent", the student's regression target. With
  `clinical_inputs`, the pCR head also reads the patient's clinical vector (HR, HER2) beside the
  image latent (late fusion); the latent, and so the student's regression target, stays the
  image's.
  """

  encoder_features: Sequence[int] = (16, 32, 32)
  lstm_features: int = 32
  kernel_size: int = 3
  dropout_rate: float = 0.3
  feature_dim: int = 0  # > 0: add the feature-regression head (the student).
  clinical_inputs: bool = False
  normalization: str = 'none'

  @nn.compact
  def __call__(self, images: jax.Array, visit_mask: jax.Array, clinical: jax.Array, *,
               train: bool) -> dict[str, Any]:
    """images: [B, T, *spatial, C]; visit_mask: [B, T] bool; clinical: [B, K] (read only with
    `clinical_inputs`)."""
    batch, visits = images.shape[:2]
    encoded = VisitEncoder(self.encoder_features, self.normalization, name='encoder')(
        images.reshape((batch * visits,) + images.shape[2:]))
    encoded = encoded.reshape((batch, visits) + encoded.shape[1:])
    spatial_dims = encoded.ndim - 3
    hidden = ConvLSTM(self.lstm_features, (self.kernel_size,) * spatial_dims, name='convlstm')(
        encoded, visit_mask)
    latent = hidden[:, -1].mean(axis=tuple(range(1, 1 + spatial_dims)))
    head_input = nn.Dropout(self.dropout_rate, deterministic=not train)(latent)
    if self.clinical_inputs:
      head_input = jnp.concatenate([head_input, clinical.astype(head_input.dtype)], axis=-1)
    outputs = {'logit': nn.Dense(1, name='pcr_head')(head_input)[:, 0], 'latent': latent}
    if self.feature_dim:
      x = nn.relu(nn.Dense(self.lstm_features, name='feature_hidden')(latent))
      outputs['feature_pred'] = nn.Dense(self.feature_dim, name='feature_head')(x)
    return outputs
