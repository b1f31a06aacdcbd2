"""The pcrjax model and training step re-written in PyTorch, timed on the same cases as step_time.py.

Why: a reference point for the JAX step's cost (is a slow case the model, or XLA on this backend?).
Layer for layer it is pcrjax.models.PCRNet, with flax's conventions, and the script asserts that both
have the same number of parameters. Needs `pip install torch`. Eager float32 by default; --compile
wraps the model in torch.compile.

  python benchmarks/torch_twin.py --cases mip,mip_teacher,volume --steps 20 --json_out torch.json

Same flags and output line as step_time.py. compile_s is the wall time of the first step (eager:
warm-up of kernels and allocator; with --compile: the compilation). Peak memory: on CUDA the
allocator's peak for this case alone, on CPU the process's max RSS (it only grows across cases).
"""

from __future__ import annotations

import os
import statistics
import time

from common import CASES, DEFAULT_BATCH, POS_WEIGHT, format_line, max_rss_bytes, parse_args, report

os.environ['JAX_PLATFORMS'] = 'cpu'  # JAX here only counts flax params: keep it off the GPU.

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from pcrjax import configs, train  # noqa: E402


def conv(dims: int, cin: int, cout: int, k: int, stride: int = 1, bias: bool = True) -> nn.Module:
  # padding k//2 gives the output size of flax's 'SAME' (which pads stride-2 convs asymmetrically).
  return (nn.Conv2d, nn.Conv3d)[dims - 2](cin, cout, k, stride=stride, padding=k // 2, bias=bias)


class VisitEncoder(nn.Sequential):
  """Conv 3x3 -> ReLU per layer ('group': conv without bias -> GroupNorm(min(8, F)) -> ReLU);
  stride 1, then 2."""

  def __init__(self, dims: int, cin: int, features, normalization: str):
    layers = []
    for i, f in enumerate(features):
      grouped = normalization == 'group'
      layers.append(conv(dims, cin, f, 3, stride=1 if i == 0 else 2, bias=not grouped))
      if grouped:
        layers.append(nn.GroupNorm(min(8, f), f, eps=1e-6))  # flax's GroupNorm epsilon.
      layers.append(nn.ReLU())
      cin = f
    super().__init__(*layers)


class ConvLSTMCell(nn.Module):
  """flax.linen.ConvLSTMCell: gates = ih(x) + hh(h), split i, g, f, o; forget bias +1."""

  def __init__(self, dims: int, cin: int, features: int, k: int):
    super().__init__()
    self.ih = conv(dims, cin, 4 * features, k)
    self.hh = conv(dims, features, 4 * features, k)

  def forward(self, x, c, h):
    i, g, f, o = torch.chunk(self.ih(x) + self.hh(h), 4, dim=1)
    c = torch.sigmoid(f + 1) * c + torch.sigmoid(i) * torch.tanh(g)
    return c, torch.sigmoid(o) * torch.tanh(c)


class PCRNet(nn.Module):
  """images [B, T, C, *spatial], visit_mask [B, T] -> pCR logit [B]; a missing visit keeps the state."""

  def __init__(self, dims: int, cin: int, encoder_features, lstm_features: int, kernel_size: int,
               dropout_rate: float, normalization: str):
    super().__init__()
    self.encoder = VisitEncoder(dims, cin, encoder_features, normalization)
    self.cell = ConvLSTMCell(dims, encoder_features[-1], lstm_features, kernel_size)
    self.dropout = nn.Dropout(dropout_rate)
    self.pcr_head = nn.Linear(lstm_features, 1)
    self.lstm_features = lstm_features

  def forward(self, images, visit_mask):
    b, t = images.shape[:2]
    encoded = self.encoder(images.flatten(0, 1))
    encoded = encoded.unflatten(0, (b, t))
    c = h = encoded.new_zeros((b, self.lstm_features) + encoded.shape[3:])
    for v in range(t):  # Unrolled over the few visits, as in pcrjax.
      new_c, new_h = self.cell(encoded[:, v], c, h)
      keep = visit_mask[:, v].view((b,) + (1,) * (h.ndim - 1))
      c, h = torch.where(keep, new_c, c), torch.where(keep, new_h, h)
    latent = h.mean(dim=tuple(range(2, h.ndim)))
    return self.pcr_head(self.dropout(latent))[:, 0]


def flax_param_count(config, input_shape) -> int:
  model = train.create_model(config)
  shapes = jax.eval_shape(lambda rng: train.init_params(model, rng, input_shape), jax.random.key(0))
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes))


def time_case(case: str, batch_size: int, steps: int, warmup: int, compile_model: bool,
              device: torch.device) -> dict:
  config = configs.base_config()
  m = config.model
  visits, visit_shape = CASES[case]
  torch.manual_seed(0)
  model = PCRNet(len(visit_shape) - 1, visit_shape[-1], tuple(m.encoder_features), m.lstm_features,
                 m.kernel_size, m.dropout_rate, m.normalization).to(device).train()
  params = sum(p.numel() for p in model.parameters())
  flax_params = flax_param_count(config, (visits,) + visit_shape)
  assert params == flax_params, f'{case}: torch has {params} params, flax {flax_params}'
  # optax.adamw's defaults (b1 0.9, b2 0.999, eps 1e-8, decoupled decay), after global-norm clipping.
  opt = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
  forward = torch.compile(model) if compile_model else model
  channels_first = (batch_size, visits, visit_shape[-1]) + visit_shape[:-1]
  images = torch.randn(channels_first, device=device)
  visit_mask = torch.ones((batch_size, visits), dtype=torch.bool, device=device)
  labels = (torch.arange(batch_size, device=device) % 2).float()
  pos_weight = torch.tensor(POS_WEIGHT, device=device)

  def step():
    opt.zero_grad(set_to_none=True)
    loss = F.binary_cross_entropy_with_logits(forward(images, visit_mask), labels, pos_weight=pos_weight)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
    opt.step()

  def sync():
    if device.type == 'cuda':
      torch.cuda.synchronize()

  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  step()
  sync()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    step()
  sync()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    sync()
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  if device.type == 'cuda':
    peak, peak_kind, name = torch.cuda.max_memory_allocated(), 'device', torch.cuda.get_device_name()
  else:
    peak, peak_kind, name = max_rss_bytes(), 'rss', 'cpu'
  return {'framework': 'torch' + ('+c' if compile_model else ''), 'device': f'{device.type}:{name}',
          'case': case, 'batch': batch_size, 'compile_s': compile_s, 'ms_per_step': 1e3 * median,
          'examples_per_s': batch_size / median, 'peak_bytes': peak, 'peak_kind': peak_kind,
          'params': params, 'steps': steps, 'times_ms': [1e3 * t for t in times]}


def main() -> None:
  args = parse_args(__doc__.splitlines()[0], extra=lambda p: p.add_argument(
      '--compile', action='store_true', help='torch.compile the model (off: eager)'))
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  results = []
  for case in args.cases:
    results.append(time_case(case, args.batch_size or DEFAULT_BATCH, args.steps, args.warmup,
                             args.compile, device))
    print(format_line(results[-1]), flush=True)
  report(results, args.json_out)


if __name__ == '__main__':
  main()
