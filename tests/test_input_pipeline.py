"""The read-time pipeline on a real build: representations, augmentation, determinism, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcrjax import ftv, input_pipeline, sharding
from tfds_ispy2.ispy2 import geometry, schema


@pytest.fixture(scope='module')
def source_and_cohort(data_dir):
  from experiments import baseline

  config = baseline.get_config('smoke')
  config.data.data_dir = data_dir
  source = input_pipeline.load_source(config.data)
  return source, input_pipeline.read_cohort(source), config.data


def test_mip_representation_is_a_tumour_centred_projection(source_and_cohort):
  source, _, _ = source_and_cohort
  record = source[0]
  out = input_pipeline.represent(
      record, time_points=(0, 1, 2), representation='mip', crop_size=(4, 12, 12)
  )
  assert (
      out['images'].shape == (3, 12, 12, 3)
      and out['images'].dtype == np.float32
  )
  np.testing.assert_array_equal(out['visit_mask'], record['visit_mask'][:3])
  images = np.asarray(record['images'], np.float32)
  pre, early = images[0, 0], images[0, 1]
  scale = np.percentile(pre, 99)
  # The projection runs through every slice; in-plane it is centred on the T0 tumour.
  h, w = np.round(
      np.argwhere(np.asarray(record['tumor_mask'][0])).mean(0)[1:] - 5.5
  ).astype(int)
  np.testing.assert_allclose(
      out['images'][0, ..., 0],
      pre.max(0)[h : h + 12, w : w + 12] / scale,
      rtol=1e-5,
  )
  # Channels 1 and 2 are subtraction MIPs: early - pre, late - pre.
  np.testing.assert_allclose(
      out['images'][0, ..., 1],
      (early - pre).max(0)[h : h + 12, w : w + 12] / scale,
      rtol=1e-5,
      atol=1e-6,
  )
  # The tumour enhances: the subtraction MIP is brightest near the centre of the crop.
  peak = np.unravel_index(out['images'][0, ..., 1].argmax(), (12, 12))
  assert all(2 <= p <= 9 for p in peak)


def test_volume_crop_is_centred_on_each_visits_tumour(source_and_cohort):
  source, _, _ = source_and_cohort
  record = source[1]
  crop = (4, 12, 12)
  out = input_pipeline.represent(
      record, time_points=(0, 1), representation='volume', crop_size=crop
  )
  assert out['images'].shape == (2,) + crop + (3,)
  channels = input_pipeline.to_channels(
      input_pipeline.normalise(
          np.asarray(record['images'], np.float32),
          np.asarray(record['visit_mask']),
      )
  )
  for t in (0, 1):
    mask = np.asarray(
        record['tumor_mask'][t if record['tumor_mask'][t].any() else 0]
    )
    manual = geometry.crop(channels[t], np.argwhere(mask).mean(0), crop)
    np.testing.assert_allclose(out['images'][t], manual)


def test_kinetic_channels_are_ratios_that_a_visits_gain_does_not_change(
    source_and_cohort,
):
  source, cohort, _ = source_and_cohort
  record = dict(source[int(np.flatnonzero(cohort.visit_mask[:, 1])[0])])
  kwargs = dict(
      time_points=(0, 1),
      representation='volume',
      crop_size=(4, 12, 12),
      channels='kinetic',
  )
  out = input_pipeline.represent(record, **kwargs)
  assert out['images'].shape == (
      2,
      4,
      12,
      12,
      len(input_pipeline.CHANNELS['kinetic']),
  )
  images = np.asarray(record['images'], np.float32)
  gained = images.copy()
  gained[1] *= 1.25  # T1's receiver gain: the same tissue reads 25 % brighter.
  # A floor in the patient's units moves with the gain only where S0 is near it (air): compare
  # where S0 is well above it.
  changed = input_pipeline.represent(
      {**record, 'images': gained.astype(np.float16)}, **kwargs
  )
  tissue = out['images'][1, ..., 0] > 3 * input_pipeline.S0_FLOOR
  # SER is set where PE early passes ENHANCING_PE: float16 rounding may flip a voxel right at it.
  clear = tissue & (
      np.abs(out['images'][1, ..., 1] - input_pipeline.ENHANCING_PE) > 0.05
  )
  for channel, where in (
      (1, tissue),
      (2, tissue),
      (3, clear),
  ):  # PE early, PE late, SER.
    np.testing.assert_allclose(
        changed['images'][1, ..., channel][where],
        out['images'][1, ..., channel][where],
        rtol=2e-2,
        atol=2e-2,
    )
  assert (out['images'][1, ..., 3][clear] > 0).any()
  # The subtraction images scale with the gain instead.
  kwargs['channels'] = 'subtraction'
  a, b = (
      input_pipeline.represent(r, **kwargs)['images'][1, ..., 1]
      for r in (record, {**record, 'images': gained.astype(np.float16)})
  )
  assert np.abs(b).sum() > 1.2 * np.abs(a).sum()


def test_tumour_kinetics_are_the_ftv_voxels_volume_and_mean_kinetics():
  rng = np.random.default_rng(0)
  images = rng.uniform(0.5, 1.0, (2, 3, 4, 6, 6)).astype(np.float32)
  images[:, 1] = images[:, 0] * 2.0  # PE early 1.0 everywhere.
  images[:, 2] = images[:, 0] * 1.5  # PE late 0.5: SER 2.
  ftv = np.zeros((2, 4, 6, 6), bool)
  ftv[0, 1:3, 2:4, 2:4] = True  # 8 voxels
  got = input_pipeline.tumour_kinetics(images, ftv, spacing_mm=(2.0, 5.0, 5.0))
  np.testing.assert_allclose(
      got[0], [np.log(8 * 50 / 1000), 1.0, 0.5, 2.0], rtol=1e-5
  )
  np.testing.assert_allclose(
      got[1], [np.log(0.1), 0, 0, 0]
  )  # No FTV voxels: floored, zero means.


def test_augmentation_moves_the_tumour_masks_with_their_images():
  rng = np.random.default_rng(1)
  tumour = jnp.asarray(rng.random((6, 2, 8, 8)) < 0.3)
  images = jnp.where(tumour[..., None], 1.0, 0.0) * jnp.ones((1, 1, 1, 1, 3))
  moved, moved_tumour = input_pipeline.augment(
      images,
      jax.random.key(3),
      max_shift=2,
      intensity_jitter=0.1,
      tumour=tumour,
  )
  assert moved_tumour.dtype == jnp.bool_
  np.testing.assert_array_equal(moved[..., 0] > 0, moved_tumour)
  np.testing.assert_array_equal(
      moved,
      input_pipeline.augment(
          images, jax.random.key(3), max_shift=2, intensity_jitter=0.1
      ),
  )  # The images as without masks.


def test_augmentation_treats_all_visits_alike_and_is_deterministic_per_key():
  visit = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
  images = jnp.asarray(
      np.stack([np.stack([visit, visit])] * 6)
  )  # [B=6, T=2, H, W, C]
  out = input_pipeline.augment(
      images, jax.random.key(0), max_shift=2, intensity_jitter=0.1
  )
  np.testing.assert_array_equal(out[:, 0], out[:, 1])
  assert all(not np.array_equal(out[b, 0], visit) for b in range(6))
  assert (
      len({np.asarray(out[b, 0]).tobytes() for b in range(6)}) == 6
  )  # Each patient its own draw.
  np.testing.assert_array_equal(
      out,
      input_pipeline.augment(
          images, jax.random.key(0), max_shift=2, intensity_jitter=0.1
      ),
  )
  no_change = input_pipeline.augment(
      images, jax.random.key(0), max_shift=0, intensity_jitter=0.0
  )
  assert all(
      np.array_equal(no_change[b, 0], visit)
      or np.array_equal(no_change[b, 0], visit[:, ::-1])
      for b in range(6)
  )  # Without shift or jitter only the flip is left.


def test_shift_moves_the_image_in_plane_with_zero_fill():
  image = jnp.arange(1, 26, dtype=jnp.float32).reshape(
      1, 5, 5, 1
  )  # [T, H, W, C]
  shifted = input_pipeline._shift_in_plane(
      image, jnp.array([1, -2]), max_shift=2
  )
  np.testing.assert_array_equal(shifted[0, 1:, :3], image[0, :4, 2:])
  assert shifted[0, 0].sum() == 0 and shifted[0, :, 3:].sum() == 0


def test_epoch_batches_are_deterministic_per_epoch_and_cover_the_split():
  first = input_pipeline.epoch_batches(27, batch_size=8, seed=0, epoch=1)
  assert (
      first.shape == (3, 8)
      and len(set(first.ravel())) == 24
      and first.max() < 27
  )
  np.testing.assert_array_equal(
      first, input_pipeline.epoch_batches(27, batch_size=8, seed=0, epoch=1)
  )
  assert not np.array_equal(
      first, input_pipeline.epoch_batches(27, batch_size=8, seed=0, epoch=2)
  )
  assert not np.array_equal(
      first, input_pipeline.epoch_batches(27, batch_size=8, seed=1, epoch=1)
  )
  with pytest.raises(ValueError, match='fewer than batch_size=8'):
    input_pipeline.epoch_batches(5, batch_size=8, seed=0, epoch=1)


def test_examples_are_stacked_per_split_and_batches_gathered_on_the_sharded_mesh(
    source_and_cohort,
):
  source, cohort, data = source_and_cohort
  rows = np.arange(5, 16)
  examples = input_pipeline.load_examples(source, cohort, rows, data)
  np.testing.assert_array_equal(examples['row'], rows)
  np.testing.assert_array_equal(examples['label'], cohort.pcr[rows])
  np.testing.assert_array_equal(examples['clinical'], cohort.receptors[rows])
  want = input_pipeline.represent(
      source[7],
      time_points=data.time_points,
      representation=data.representation,
      crop_size=data.crop_size,
  )
  np.testing.assert_array_equal(examples['images'][2], want['images'])
  np.testing.assert_array_equal(examples['visit_mask'][2], want['visit_mask'])
  mesh = sharding.make_mesh()
  assert jax.device_count() == 2
  on_device = jax.device_put(examples, sharding.replicated(mesh))
  batch_rows = jax.device_put(
      np.array([3, 0, 7, 1], np.int32), sharding.batch_sharding(mesh)
  )
  batch = jax.jit(input_pipeline.device_batch, static_argnums=3)(
      on_device, batch_rows, jax.random.key(0), None
  )
  np.testing.assert_array_equal(
      batch['images'], examples['images'][[3, 0, 7, 1]]
  )
  assert (
      batch['images'].sharding.spec[0] == 'data'
  )  # Each device gathered its half of the batch.
  assert batch['images'].addressable_shards[0].data.shape[0] == 2


def test_the_kept_pass_gives_each_patients_ftv_as_a_decoding_of_its_own(
    source_and_cohort,
):
  """The FTV reference reads the trainings' decoding pass: the volumes of `ftv.ftv_per_visit`."""
  source, cohort, data = source_and_cohort
  kept = input_pipeline.ftv_mm3(source, data)
  assert kept.shape == (len(cohort), 4)
  for row in (0, 7, len(cohort) - 1):
    np.testing.assert_array_equal(kept[row], ftv.ftv_per_visit(source[row]))
  assert (kept[~np.isnan(kept)] >= 0).all()


def test_labels_only_source_gives_the_same_cohort(source_and_cohort):
  _, cohort, data = source_and_cohort
  labels_only = input_pipeline.load_source(data, with_images=False)
  assert isinstance(
      labels_only[0]['images'], bytes
  )  # Left compressed: not decoded.
  fast = input_pipeline.read_cohort(labels_only)
  for field in ('patient_id', 'pcr', 'subtype', 'arm', 'visit_mask'):
    np.testing.assert_array_equal(getattr(fast, field), getattr(cohort, field))
  assert fast.subtype_names == cohort.subtype_names


def test_crop_centre_is_the_tumour_then_the_voi_after_a_complete_response():
  mask = np.zeros((4, 10, 10), np.uint8)
  mask[1:3, 1:9, 1:9] = schema.VOI
  mask[1:3, 2:4, 2:4] = schema.TUMOUR
  fallback = np.array([0.0, 0.0, 0.0])
  np.testing.assert_allclose(
      input_pipeline.tumour_centre(mask, fallback), [1.5, 2.5, 2.5]
  )
  mask[mask == schema.TUMOUR] = schema.VOI  # No FTV left: the VOI's centre.
  np.testing.assert_allclose(
      input_pipeline.tumour_centre(mask, fallback), [1.5, 4.5, 4.5]
  )
  np.testing.assert_allclose(
      input_pipeline.tumour_centre(np.zeros_like(mask), fallback), fallback
  )
