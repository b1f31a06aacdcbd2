"""The ConvLSTM against a plain NumPy recurrence of the same equations, and the model family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import signal

from pcrjax import models


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _conv_same(x, kernel, bias):
  """x: [H, W, Cin], kernel: [kh, kw, Cin, Cout] -> [H, W, Cout], 'SAME' cross-correlation."""
  out = np.zeros(x.shape[:2] + (kernel.shape[-1],))
  for o in range(kernel.shape[-1]):
    for i in range(kernel.shape[-2]):
      out[..., o] += signal.correlate2d(x[..., i], kernel[..., i, o], mode='same')
  return out + bias


def _numpy_convlstm(params, x, present):
  """flax's equations: gates = conv_ih(x) + conv_hh(h), split i, g, f, o; f = sigmoid(f + 1)."""
  ih, hh = params['cell']['ih'], params['cell']['hh']
  features = ih['kernel'].shape[-1] // 4
  batch, visits = x.shape[:2]
  hidden = np.zeros((batch, visits) + x.shape[2:4] + (features,))
  for b in range(batch):
    c = np.zeros(x.shape[2:4] + (features,))
    h = np.zeros_like(c)
    for t in range(visits):
      if present[b, t]:
        gates = (_conv_same(x[b, t], np.asarray(ih['kernel']), np.asarray(ih['bias']))
                 + _conv_same(h, np.asarray(hh['kernel']), np.asarray(hh['bias'])))
        i, g, f, o = np.split(gates, 4, axis=-1)
        c = _sigmoid(f + 1) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
      hidden[b, t] = h
  return hidden


def test_convlstm_matches_numpy_recurrence_and_skips_missing_visits():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 3, 6, 5, 2)).astype(np.float32)
  present = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 0]], bool)
  layer = models.ConvLSTM(features=4, kernel_size=(3, 3))
  variables = layer.init(jax.random.key(0), x, present)
  # Random biases too, so that the bias terms and the +1 forget offset are both exercised.
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(scale=0.5, size=p.shape), p.dtype),
                        variables['params'])
  got = np.asarray(layer.apply({'params': params}, x, present))
  want = _numpy_convlstm(params['scan'], x.astype(np.float64), present)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # A missing visit carries the state through unchanged.
  np.testing.assert_array_equal(got[1, 1], got[1, 0])
  np.testing.assert_array_equal(got[2, 2], got[2, 1])


@pytest.mark.parametrize('spatial', [(16, 16), (4, 8, 8)])
def test_model_family_shapes(spatial):
  images = jnp.ones((2, 3) + spatial + (3,))
  visit_mask = jnp.array([[1, 1, 1], [1, 1, 0]], bool)
  clinical = jnp.zeros((2, 2))
  baseline = models.PCRNet(encoder_features=(4, 8), lstm_features=6)
  params = baseline.init(jax.random.key(0), images, visit_mask, clinical, train=False)['params']
  out = baseline.apply({'params': params}, images, visit_mask, clinical, train=False)
  assert out['logit'].shape == (2,) and out['latent'].shape == (2, 6) and 'feature_pred' not in out
  student = models.PCRNet(encoder_features=(4, 8), lstm_features=6, feature_dim=10)
  params = student.init(jax.random.key(0), images[:, :2], visit_mask[:, :2], clinical,
                        train=False)['params']
  out = student.apply({'params': params}, images[:, :2], visit_mask[:, :2], clinical, train=False)
  assert out['feature_pred'].shape == (2, 10)
  # The encoder is shared across visits: one set of weights, whatever the number of visits.
  assert 'encoder' in params and set(params['convlstm']) == {'scan'}


def test_clinical_inputs_reach_the_pcr_head_only_when_asked():
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 8, 8, 3)), jnp.float32)
  visit_mask = jnp.ones((2, 2), bool)
  hr_positive, her2_positive = jnp.array([[1., 0.], [1., 0.]]), jnp.array([[0., 1.], [0., 1.]])
  for clinical_inputs in (False, True):
    model = models.PCRNet(encoder_features=(4,), lstm_features=4, clinical_inputs=clinical_inputs)
    params = model.init(jax.random.key(1), images, visit_mask, hr_positive, train=False)['params']
    a, b = (model.apply({'params': params}, images, visit_mask, c, train=False)
            for c in (hr_positive, her2_positive))
    np.testing.assert_array_equal(a['latent'], b['latent'])  # The image latent never reads them.
    assert params['pcr_head']['kernel'].shape == (4 + 2 * clinical_inputs, 1)
    assert np.array_equal(a['logit'], b['logit']) != clinical_inputs
