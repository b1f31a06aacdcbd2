"""The PyTorch half: pcrjax's model and training step re-written in PyTorch, timed on one case.

Why: the reference point users have (is a slow case the model, or XLA on this backend?). Layer for
layer it is pcrjax.models.PCRNet with flax's conventions, and `time_case` asserts that both have the
same number of parameters. Eager float32 (bfloat16: autocast), or torch.compile. Needs the
`benchmarks` extra (`pip install -e .[benchmarks]`).
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import common
from pcrjax import configs, input_pipeline, models


def conv(
    dims: int, cin: int, cout: int, k: int, stride: int = 1, bias: bool = True
) -> nn.Module:
  # padding k//2 gives the output size of flax's 'SAME' (which pads stride-2 convs asymmetrically).
  return (nn.Conv2d, nn.Conv3d)[dims - 2](
      cin, cout, k, stride=stride, padding=k // 2, bias=bias
  )


class VisitEncoder(nn.Sequential):
  """Conv 3x3 -> ReLU per layer ('group': conv without bias -> GroupNorm(min(8, F)) -> ReLU);
  stride 1, then 2."""

  def __init__(self, dims: int, cin: int, features, normalization: str):
    layers = []
    for i, f in enumerate(features):
      grouped = normalization == 'group'
      layers.append(
          conv(dims, cin, f, 3, stride=1 if i == 0 else 2, bias=not grouped)
      )
      if grouped:
        layers.append(
            nn.GroupNorm(min(8, f), f, eps=1e-6)
        )  # flax's GroupNorm epsilon.
      layers.append(nn.ReLU())
      cin = f
    super().__init__(*layers)


class ConvLSTM(nn.Module):
  """pcrjax's ConvLSTM: gates = ih(x) + hh(h), split i, g, f, o; forget bias +1; ih over every visit
  at once, the bias-free hh from the second visit on; a missing visit keeps the state.
  """

  def __init__(self, dims: int, cin: int, features: int, k: int):
    super().__init__()
    self.ih = conv(dims, cin, 4 * features, k)
    self.hh = conv(dims, features, 4 * features, k, bias=False)
    self.features = features

  def forward(self, x, visit_mask):
    b, t = x.shape[:2]
    input_gates = self.ih(x.flatten(0, 1)).unflatten(0, (b, t))
    c = h = x.new_zeros((b, self.features) + x.shape[3:])
    for v in range(t):  # Unrolled over the few visits, as in pcrjax.
      gates = input_gates[:, v] + self.hh(h) if v else input_gates[:, v]
      i, g, f, o = torch.chunk(gates, 4, dim=1)
      new_c = torch.sigmoid(f + 1) * c + torch.sigmoid(i) * torch.tanh(g)
      new_h = torch.sigmoid(o) * torch.tanh(new_c)
      keep = visit_mask[:, v].view((b,) + (1,) * (h.ndim - 1))
      c, h = torch.where(keep, new_c, c), torch.where(keep, new_h, h)
    return h


class PCRNet(nn.Module):
  """images [B, T, C, *spatial], visit_mask [B, T], kinetics [B, T, K] -> (pCR logit [B], latent,
  feature prediction); the head reads the latent, the first visit's K tumour kinetics and each later
  visit's change from it with its flag (pcrjax.models.kinetics_features)."""

  def __init__(
      self,
      dims: int,
      cin: int,
      encoder_features,
      lstm_features: int,
      kernel_size: int,
      dropout_rate: float,
      normalization: str,
      visits: int,
      feature_dim: int = 0,
  ):
    super().__init__()
    self.encoder = VisitEncoder(dims, cin, encoder_features, normalization)
    self.convlstm = ConvLSTM(
        dims, encoder_features[-1], lstm_features, kernel_size
    )
    self.dropout = nn.Dropout(dropout_rate)
    measured = input_pipeline.NUM_KINETICS + (visits - 1) * (
        input_pipeline.NUM_KINETICS + 1
    )
    self.pcr_head = nn.Linear(lstm_features + measured, 1)
    self.feature_head = (
        nn.Sequential(
            nn.Linear(lstm_features + measured, lstm_features),
            nn.ReLU(),
            nn.Linear(lstm_features, feature_dim),
        )
        if feature_dim
        else None
    )

  def forward(self, images, visit_mask, kinetics):
    b, t = images.shape[:2]
    encoded = self.encoder(images.flatten(0, 1))
    encoded = encoded.unflatten(0, (b, t))
    h = self.convlstm(encoded, visit_mask)
    latent = h.mean(dim=tuple(range(2, h.ndim)))
    present = visit_mask.float()[..., None]
    change = (kinetics[:, 1:] - kinetics[:, :1]) * present[:, 1:]
    measured = torch.cat(
        [kinetics[:, 0], change.flatten(1), present[:, 1:, 0]], 1
    )
    seen = torch.cat([latent, measured], 1)
    features = (
        self.feature_head(seen) if self.feature_head is not None else None
    )
    head_input = torch.cat([self.dropout(latent), measured], 1)
    return self.pcr_head(head_input)[:, 0], latent, features


def flax_param_count(config, input_shape, feature_dim: int) -> int:
  shapes = models.abstract_params(
      models.build(config, feature_dim), input_shape
  )
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes))


def prepare_case(
    case: str,
    *,
    batch_size: int,
    warmup: int,
    dtype: str = 'float32',
    compile_model: bool = False,
):
  """(step, figures) as `jax_step.prepare_case`: the twin's step, warmed up; its figures."""
  config = configs.base_config()
  m = config.model
  visits, visit_shape, with_target = common.CASES[case]
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  torch.manual_seed(0)

  feature_dim = m.lstm_features if with_target else 0
  model = (
      PCRNet(
          len(visit_shape) - 1,
          visit_shape[-1],
          tuple(m.encoder_features),
          m.lstm_features,
          m.kernel_size,
          m.dropout_rate,
          m.normalization,
          visits,
          feature_dim,
      )
      .to(device)
      .train()
  )
  params = sum(p.numel() for p in model.parameters())
  flax_params = flax_param_count(config, (visits,) + visit_shape, feature_dim)
  assert (
      params == flax_params
  ), f'{case}: torch has {params} params, flax {flax_params}'
  # optax.adamw's defaults (b1 0.9, b2 0.999, eps 1e-8, decoupled decay), after global-norm clipping.
  opt = torch.optim.AdamW(
      model.parameters(),
      lr=config.learning_rate,
      weight_decay=config.weight_decay,
  )
  forward = torch.compile(model) if compile_model else model
  images = torch.randn(
      (batch_size, visits, visit_shape[-1]) + visit_shape[:-1], device=device
  )
  visit_mask = torch.ones((batch_size, visits), dtype=torch.bool, device=device)
  kinetics = torch.randn(
      (batch_size, visits, input_pipeline.NUM_KINETICS), device=device
  )
  target = torch.randn((batch_size, feature_dim), device=device)
  labels = (torch.arange(batch_size, device=device) % 2).float()
  pos_weight = torch.tensor(common.POS_WEIGHT, device=device)
  autocast = torch.autocast(
      device.type, dtype=torch.bfloat16, enabled=dtype == 'bfloat16'
  )

  def step():
    opt.zero_grad(set_to_none=True)
    with autocast:
      logits, _, features = forward(images, visit_mask, kinetics)
      loss = F.binary_cross_entropy_with_logits(
          logits.float(), labels, pos_weight=pos_weight
      )
      if features is not None:
        loss = loss + F.mse_loss(features.float(), target)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
    opt.step()

  def sync():
    if device.type == 'cuda':
      torch.cuda.synchronize()

  start = time.perf_counter()
  step()
  sync()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    step()
  sync()

  def figures(times: list[float]) -> dict:
    median = statistics.median(times)
    name = torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'
    return {
        'framework': (
            f'torch {torch.__version__}'
            + (' compile' if compile_model else ' eager')
        ),
        'case': case,
        'batch': batch_size,
        'dtype': dtype,
        'devices': f'{device.type}:{name}',
        'threads': torch.get_num_threads(),
        'compile_s': compile_s,
        'ms_per_step': 1e3 * median,
        'examples_per_s': batch_size / median,
        'times_ms': [1e3 * t for t in times],
        'params': params,
    }

  def blocking_step():
    step()
    sync()

  return blocking_step, figures
