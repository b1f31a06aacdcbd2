"""The ConvLSTM against a plain NumPy recurrence of the same equations, and the model family."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from scipy import signal

from pcrjax import configs, models, ops


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _conv_same(x, kernel, bias):
  """x: [H, W, Cin], kernel: [kh, kw, Cin, Cout] -> [H, W, Cout], 'SAME' cross-correlation."""
  out = np.zeros(x.shape[:2] + (kernel.shape[-1],))
  for o in range(kernel.shape[-1]):
    for i in range(kernel.shape[-2]):
      out[..., o] += signal.correlate2d(
          x[..., i], kernel[..., i, o], mode='same'
      )
  return out + bias


def _numpy_convlstm(params, x, present):
  """flax's equations: gates = conv_ih(x) + conv_hh(h), split i, g, f, o; f = sigmoid(f + 1)."""
  ih, hh = params['ih'], params['hh']
  features = ih['kernel'].shape[-1] // 4
  batch, visits = x.shape[:2]
  hidden = np.zeros((batch, visits) + x.shape[2:4] + (features,))
  for b in range(batch):
    c = np.zeros(x.shape[2:4] + (features,))
    h = np.zeros_like(c)
    for t in range(visits):
      if present[b, t]:
        gates = _conv_same(
            x[b, t], np.asarray(ih['kernel']), np.asarray(ih['bias'])
        ) + _conv_same(h, np.asarray(hh['kernel']), 0.0)
        i, g, f, o = np.split(gates, 4, axis=-1)
        c = _sigmoid(f + 1) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
      hidden[b, t] = h
  return hidden


@pytest.mark.parametrize(
    'patches', [None, ops.PatchesConv(ops.MAX_PATCH_BYTES, devices=1)]
)
def test_convlstm_matches_numpy_recurrence_and_skips_missing_visits(patches):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 3, 6, 5, 2)).astype(np.float32)
  present = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 0]], bool)
  layer = models.ConvLSTM(features=4, kernel_size=(3, 3), patches=patches)
  variables = layer.init(jax.random.key(0), x, present)
  # Random biases too, so that the bias terms and the +1 forget offset are both exercised.
  params = jax.tree.map(
      lambda p: jnp.asarray(rng.normal(scale=0.5, size=p.shape), p.dtype),
      variables['params'],
  )
  got = np.asarray(layer.apply({'params': params}, x, present))
  want = _numpy_convlstm(params, x.astype(np.float64), present)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # A missing visit carries the state through unchanged.
  np.testing.assert_array_equal(got[1, 1], got[1, 0])
  np.testing.assert_array_equal(got[2, 2], got[2, 1])


def test_the_networks_defaults_are_the_base_configs():
  fields = [
      f.name
      for f in dataclasses.fields(models.PCRNet)
      if f.name not in ('parent', 'name')
  ]
  built = models.build(configs.base_config())
  assert {f: getattr(built, f) for f in fields} == {
      f: getattr(models.PCRNet(), f) for f in fields
  }


@pytest.mark.parametrize('feature_dim, visits', [(0, 2), (0, 3), (32, 2)])
def test_initialisation_compiled_for_speed_gives_the_default_compilations_values(
    feature_dim, visits
):
  model = models.build(configs.base_config(), feature_dim)
  shape = (visits, 32, 32, 3)
  default = jax.jit(
      models.init_params.__wrapped__, static_argnames=('model', 'input_shape')
  )
  fast = models.init_params(model, jax.random.key(7), shape)
  for got, want in zip(
      jax.tree.leaves(fast),
      jax.tree.leaves(default(model, jax.random.key(7), shape)),
  ):
    np.testing.assert_array_equal(got, want)


def test_abstract_params_are_the_shapes_of_the_initialised_ones():
  model = models.build(configs.base_config(), 32)
  shape = (2, 32, 32, 3)
  leaf = lambda x: (x.shape, x.dtype)  # noqa: E731
  assert jax.tree.map(leaf, models.abstract_params(model, shape)) == (
      jax.tree.map(leaf, models.init_params(model, jax.random.key(0), shape))
  )


@pytest.mark.parametrize('spatial', [(16, 16), (4, 8, 8)])
def test_model_family_shapes(spatial):
  images = jnp.ones((2, 3) + spatial + (3,))
  visit_mask = jnp.array([[1, 1, 1], [1, 1, 0]], bool)
  clinical = jnp.zeros((2, 2))
  baseline = models.PCRNet(
      encoder_features=(4, 8), lstm_features=6, tumour_kinetics=False
  )
  params = baseline.init(
      jax.random.key(0), images, visit_mask, clinical, train=False
  )['params']
  out = baseline.apply(
      {'params': params}, images, visit_mask, clinical, train=False
  )
  assert (
      out['logit'].shape == (2,)
      and out['latent'].shape == (2, 6)
      and 'feature_pred' not in out
  )
  student = models.PCRNet(
      encoder_features=(4, 8),
      lstm_features=6,
      feature_dim=10,
      tumour_kinetics=False,
  )
  params = student.init(
      jax.random.key(0), images[:, :2], visit_mask[:, :2], clinical, train=False
  )['params']
  out = student.apply(
      {'params': params},
      images[:, :2],
      visit_mask[:, :2],
      clinical,
      train=False,
  )
  assert out['feature_pred'].shape == (2, 10)
  # The encoder is shared across visits: one set of weights, whatever the number of visits.
  assert 'encoder' in params and set(params['convlstm']) == {'ih', 'hh'}


@pytest.mark.parametrize(
    'shape, kernel, stride',
    [
        (
            (2, 9, 10, 3),
            3,
            2,
        ),  # Odd and even sizes: 'SAME' pads a stride-2 conv unevenly.
        (
            (2, 16, 16, 4),
            3,
            1,
        ),  # Short patch rows (36 values): two outputs per row.
        (
            (2, 9, 11, 3),
            3,
            1,
        ),  # The same with an odd last axis: the blocks' padding cropped.
        ((2, 5, 7, 6, 3), 3, 2),  # 3D.
        ((2, 5, 6, 7, 3), 3, 1),  # 3D, short rows (81 values), odd last axis.
        ((2, 6, 8, 8, 5), 3, 1),  # 3D, rows of 135 values: one output per row.
        ((2, 11, 4), 4, 3),  # 1D, a kernel longer than the stride.
    ],
)
# With no chunking threshold the budget decides: 4 MiB convolves these small batches at once; 1 byte,
# one example at a time (lax.map).
@pytest.mark.parametrize('max_patch_bytes', [ops.MAX_PATCH_BYTES, 1])
def test_patches_conv_gives_the_outputs_and_gradients_of_lax_conv(
    shape, kernel, stride, max_patch_bytes
):
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  dims = len(shape) - 2
  patches_conv = ops.PatchesConv(
      max_patch_bytes, devices=1, chunk_above_bytes=0
  )

  def loss(conv_general_dilated, params, x):
    layer = nn.Conv(
        6,
        (kernel,) * dims,
        strides=stride,
        conv_general_dilated=conv_general_dilated,
    )
    return jnp.sum(jnp.sin(layer.apply(params, x)))

  layer = nn.Conv(6, (kernel,) * dims, strides=stride)
  params = layer.init(jax.random.key(0), x)
  want = layer.apply(params, x)
  got = nn.Conv(
      6, (kernel,) * dims, strides=stride, conv_general_dilated=patches_conv
  ).apply(params, x)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-5)
  want_grads = jax.grad(loss, argnums=(1, 2))(
      lax.conv_general_dilated, params, x
  )
  got_grads = jax.grad(loss, argnums=(1, 2))(patches_conv, params, x)
  for got_leaf, want_leaf in zip(
      jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)
  ):
    np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-4, atol=1e-4)


def test_the_encoder_in_chunks_of_images_gives_the_whole_batch_results():
  rng = np.random.default_rng(0)
  images = jnp.asarray(
      rng.normal(size=(2, 2, 4, 8, 8, 3)), jnp.float32
  )  # 3D: 4 visit images.
  visit_mask, clinical = jnp.ones((2, 2), bool), jnp.zeros((2, 2))

  def run(max_patch_bytes):
    model = models.PCRNet(
        encoder_features=(4, 8),
        lstm_features=6,
        tumour_kinetics=False,
        conv='patches',
        max_patch_bytes=max_patch_bytes,
        chunk_above_bytes=0,
        devices=1,
    )
    params = model.init(
        jax.random.key(0), images, visit_mask, clinical, train=False
    )['params']
    apply = lambda p: model.apply(
        {'params': p}, images, visit_mask, clinical, train=False
    )
    loss = lambda p: jnp.sum(jnp.sin(apply(p)['logit']))
    scans = str(jax.make_jaxpr(loss)(params)).count('scan[')
    return params, apply(params), jax.grad(loss)(params), scans

  whole = run(ops.MAX_PATCH_BYTES)
  chunked = run(1)  # One image per chunk, in every convolution.
  assert (whole[3], chunked[3]) == (
      0,
      3,
  )  # The encoder's chunks; the ConvLSTM's ih, and hh (visit 2).
  assert jax.tree.structure(whole[0]) == jax.tree.structure(chunked[0])
  for want, got in zip(
      jax.tree.leaves(whole[:3]), jax.tree.leaves(chunked[:3])
  ):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_batch_whose_patches_fit_the_threshold_is_convolved_whole():
  conv = ops.PatchesConv(max_patch_bytes=1 << 10, devices=1)
  # 4 examples of 1 KiB patches: within the threshold, whole; beyond it, chunks of the budget.
  assert conv.examples_per_chunk(4, 1 << 10) == 4
  assert conv.examples_per_chunk(4, ops.CHUNK_ABOVE_BYTES) == 1
  assert conv.examples_per_chunk(8, ops.CHUNK_ABOVE_BYTES // 4) == 1
  wide = ops.PatchesConv(ops.CHUNK_ABOVE_BYTES // 2, devices=1)
  assert wide.examples_per_chunk(8, ops.CHUNK_ABOVE_BYTES // 4) == 2


def test_a_batch_on_several_devices_is_convolved_at_once():
  # Chunking a batch that is sharded over the devices would reshard it.
  x, kernel = jnp.ones((4, 6, 6, 3)), jnp.ones((3, 3, 3, 5))
  jaxpr = lambda devices: str(
      jax.make_jaxpr(  # noqa: E731
          lambda x: ops.PatchesConv(1, devices, chunk_above_bytes=0)(
              x, kernel, (1, 1), 'SAME'
          )
      )(x)
  )
  assert 'scan[' in jaxpr(1) and 'scan[' not in jaxpr(2)


def test_tumour_pooling_weighs_the_latent_by_the_tumour_footprint():
  images = jnp.asarray(
      np.random.default_rng(0).normal(size=(2, 2, 16, 16, 3)), jnp.float32
  )
  args = (images, jnp.ones((2, 2), bool), jnp.zeros((2, 2)), None)
  mean = models.PCRNet(
      encoder_features=(4, 8), lstm_features=6, tumour_kinetics=False
  )
  tumour_pooled = models.PCRNet(
      encoder_features=(4, 8),
      lstm_features=6,
      tumour_kinetics=False,
      pooling='tumour',
  )
  params = mean.init(jax.random.key(0), *args, train=False)['params']
  latent = lambda model, mask: model.apply(
      {'params': params}, *args, mask, train=False
  )['latent']
  everywhere, nowhere = jnp.ones((2, 2, 16, 16), bool), jnp.zeros(
      (2, 2, 16, 16), bool
  )
  # A mask that covers all, or nothing, pools every position alike.
  np.testing.assert_allclose(
      latent(tumour_pooled, everywhere), latent(mean, None), atol=1e-6
  )
  np.testing.assert_allclose(
      latent(tumour_pooled, nowhere), latent(mean, None), atol=1e-6
  )
  # A tumour in one corner at T0 only (gone at T1): its footprint's positions dominate.
  corner = nowhere.at[:, 0, :6, :6].set(True)
  weights = models.tumour_weights(corner, (4, 4))
  assert weights.shape == (2, 4, 4) and weights[:, 0, 0].min() > 0.9
  assert np.allclose(weights[:, 3, 3], 0.01)
  assert not np.allclose(
      latent(tumour_pooled, corner), latent(mean, None), atol=1e-3
  )


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  images = jnp.ones((2, 2, 8, 8, 3))
  model = models.PCRNet(
      encoder_features=(4, 8),
      lstm_features=6,
      tumour_kinetics=False,
      dtype='bfloat16',
  )
  params = model.init(
      jax.random.key(0),
      images,
      jnp.ones((2, 2), bool),
      jnp.zeros((2, 2)),
      train=False,
  )['params']
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {
      jnp.dtype(jnp.float32)
  }
  out = model.apply(
      {'params': params},
      images,
      jnp.ones((2, 2), bool),
      jnp.zeros((2, 2)),
      train=False,
  )
  assert (
      out['logit'].dtype == jnp.float32 and out['latent'].dtype == jnp.float32
  )
  reference = models.PCRNet(
      encoder_features=(4, 8), lstm_features=6, tumour_kinetics=False
  ).apply(
      {'params': params},
      images,
      jnp.ones((2, 2), bool),
      jnp.zeros((2, 2)),
      train=False,
  )
  np.testing.assert_allclose(out['logit'], reference['logit'], atol=0.05)
  assert not np.array_equal(
      out['logit'], reference['logit']
  )  # It did compute in bfloat16.


def test_each_subtype_adds_its_own_offset_to_the_logit_only_when_asked():
  images = jnp.asarray(
      np.random.default_rng(0).normal(size=(4, 2, 8, 8, 3)), jnp.float32
  )
  visit_mask = jnp.ones((4, 2), bool)
  receptors = jnp.array(
      [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
  )  # Cells 0, 1, 2, 3.
  np.testing.assert_array_equal(models.receptor_cells(receptors), np.eye(4))
  same_image = jnp.broadcast_to(images[:1], images.shape)
  for clinical_inputs in (False, True):
    model = models.PCRNet(
        encoder_features=(4,),
        lstm_features=4,
        tumour_kinetics=False,
        clinical_inputs=clinical_inputs,
    )
    params = model.init(
        jax.random.key(1), same_image, visit_mask, receptors, train=False
    )['params']
    assert ('subtype_offset' in params) == clinical_inputs
    if clinical_inputs:
      params['subtype_offset']['kernel'] = jnp.array(
          [[0.0], [1.0], [-2.0], [0.5]]
      )
    out = model.apply(
        {'params': params}, same_image, visit_mask, receptors, train=False
    )
    want = [0.0, 1.0, -2.0, 0.5] if clinical_inputs else [0.0, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(out['logit'] - out['logit'][0], want, atol=1e-5)
    np.testing.assert_array_equal(
        out['latent'], jnp.broadcast_to(out['latent'][:1], (4, 4))
    )


def test_the_head_reads_the_tumour_kinetics_of_present_visits_only():
  images = jnp.zeros((2, 2, 8, 8, 3))
  kinetics = jnp.asarray(
      np.random.default_rng(0).normal(size=(2, 2, 4)), jnp.float32
  )
  model = models.PCRNet(
      encoder_features=(4,), lstm_features=4, tumour_kinetics=True
  )
  mask = jnp.array([[True, True], [True, False]])
  params = model.init(
      jax.random.key(0), images, mask, jnp.zeros((2, 2)), kinetics, train=False
  )['params']
  assert params['pcr_head']['kernel'].shape == (4 + 4 + (4 + 1), 1)
  logit = lambda k: model.apply(
      {'params': params}, images, mask, jnp.zeros((2, 2)), k, train=False
  )['logit']
  changed_t1 = kinetics.at[:, 1].add(1.0)
  assert logit(changed_t1)[0] != logit(kinetics)[0]  # T1 present: read.
  assert logit(changed_t1)[1] == logit(kinetics)[1]  # T1 missing: ignored.


def test_the_students_head_reads_its_own_prediction_only_when_asked():
  images = jnp.asarray(
      np.random.default_rng(0).normal(size=(3, 2, 8, 8, 3)), jnp.float32
  )
  args = (images, jnp.ones((3, 2), bool), jnp.zeros((3, 2)))
  for reads in (False, True):
    model = models.PCRNet(
        encoder_features=(4,),
        lstm_features=4,
        tumour_kinetics=False,
        feature_dim=5,
        reads_prediction=reads,
    )
    params = model.init(jax.random.key(0), *args, train=False)['params']
    assert ('prediction_head' in params) == reads
    out = model.apply({'params': params}, *args, train=False)
    if reads:  # Starts unread (0), then adds w . prediction to the logit.
      w = jnp.arange(5.0)[:, None]
      moved = model.apply(
          {'params': {**params, 'prediction_head': {'kernel': w}}},
          *args,
          train=False
      )
      np.testing.assert_allclose(
          moved['logit'] - out['logit'],
          out['feature_pred'] @ w[:, 0],
          rtol=1e-5,
          atol=1e-6,
      )
