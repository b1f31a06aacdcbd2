"""The read-time pipeline on a real build: representations, augmentation, determinism, sharding."""

import jax
import numpy as np
import pytest

from pcrjax import input_pipeline, sharding
from tfds_ispy2.ispy2 import schema


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
  out = input_pipeline.represent(record, time_points=(0, 1, 2), representation='mip',
                                 crop_size=(4, 12, 12))
  assert out['images'].shape == (3, 12, 12, 3) and out['images'].dtype == np.float32
  np.testing.assert_array_equal(out['visit_mask'], record['visit_mask'][:3])
  images = np.asarray(record['images'], np.float32)
  pre, early = images[0, 0], images[0, 1]
  scale = np.percentile(pre, 99)
  # The projection runs through every slice; in-plane it is centred on the T0 tumour.
  h, w = np.round(np.argwhere(np.asarray(record['tumor_mask'][0])).mean(0)[1:] - 5.5).astype(int)
  np.testing.assert_allclose(out['images'][0, ..., 0], pre.max(0)[h:h + 12, w:w + 12] / scale, rtol=1e-5)
  # Channels 1 and 2 are subtraction MIPs: early - pre, late - pre.
  np.testing.assert_allclose(out['images'][0, ..., 1], (early - pre).max(0)[h:h + 12, w:w + 12] / scale,
                             rtol=1e-5, atol=1e-6)
  # The tumour enhances: the subtraction MIP is brightest near the centre of the crop.
  peak = np.unravel_index(out['images'][0, ..., 1].argmax(), (12, 12))
  assert all(2 <= p <= 9 for p in peak)


def test_volume_crop_is_centred_on_each_visits_tumour(source_and_cohort):
  source, _, _ = source_and_cohort
  record = source[1]
  crop = (4, 12, 12)
  out = input_pipeline.represent(record, time_points=(0, 1), representation='volume', crop_size=crop)
  assert out['images'].shape == (2,) + crop + (3,)
  channels = input_pipeline.to_channels(input_pipeline.normalise(
      np.asarray(record['images'], np.float32), np.asarray(record['visit_mask'])))
  for t in (0, 1):
    mask = np.asarray(record['tumor_mask'][t if record['tumor_mask'][t].any() else 0])
    manual = input_pipeline.crop_around(channels[t], np.argwhere(mask).mean(0), crop)
    np.testing.assert_allclose(out['images'][t], manual)


def test_crop_around_pads_at_the_border():
  volume = np.arange(4 * 6 * 6, dtype=np.float32).reshape(4, 6, 6, 1)
  crop = input_pipeline.crop_around(volume, np.array([0.0, 0.0, 0.0]), (3, 5, 5))
  assert crop.shape == (3, 5, 5, 1)
  np.testing.assert_array_equal(crop[1:, 2:, 2:, 0], volume[:2, :3, :3, 0])
  assert crop[0].sum() == 0 and crop[:, :2].sum() == 0 and crop[:, :, :2].sum() == 0


def test_augmentation_treats_all_visits_alike():
  rng = np.random.default_rng(0)
  visit = rng.random((8, 8, 3)).astype(np.float32)
  element = {'images': np.stack([visit, visit]), 'visit_mask': np.array([True, True])}
  for seed in range(5):
    out = input_pipeline.augment(element, np.random.default_rng(seed), max_shift=2, intensity_jitter=0.1)
    np.testing.assert_array_equal(out['images'][0], out['images'][1])
    assert not np.array_equal(out['images'][0], visit)


def test_batches_are_deterministic_per_epoch_and_cover_the_split(source_and_cohort):
  source, cohort, data = source_and_cohort
  rows = np.arange(0, 24)
  examples = input_pipeline.load_examples(source, cohort, rows, data)
  np.testing.assert_array_equal([e['row'] for e in examples], rows)

  def epoch_batches(epoch, seed=0):
    return list(input_pipeline.train_dataset(examples, data, batch_size=8, seed=seed, epoch=epoch))

  first = epoch_batches(1)
  order = np.concatenate([b['row'] for b in first])
  assert len(first) == 3 and sorted(order) == list(rows)
  again = epoch_batches(1)
  np.testing.assert_array_equal(order, np.concatenate([b['row'] for b in again]))
  np.testing.assert_array_equal(first[0]['images'], again[0]['images'])
  assert not np.array_equal(order, np.concatenate([b['row'] for b in epoch_batches(2)]))
  assert not np.array_equal(order, np.concatenate([b['row'] for b in epoch_batches(1, seed=1)]))
  np.testing.assert_array_equal(first[0]['label'], cohort.pcr[first[0]['row']])


def test_eval_batches_pad_and_are_sharded_over_the_mesh(source_and_cohort):
  source, cohort, data = source_and_cohort
  rows = np.arange(5, 16)  # 11 patients -> one full batch of 8 and one padded one.
  examples = input_pipeline.load_examples(source, cohort, rows, data)
  batches = list(input_pipeline.eval_dataset(examples, batch_size=8))
  assert [b['valid'].sum() for b in batches] == [8, 3]
  np.testing.assert_array_equal(np.concatenate([b['row'][b['valid']] for b in batches]), rows)
  mesh = sharding.make_mesh()
  assert jax.device_count() == 2
  placed = sharding.put_batch(batches[0], sharding.batch_sharding(mesh))
  assert placed['images'].sharding == sharding.batch_sharding(mesh)
  assert len(placed['images'].addressable_shards) == 2
  assert placed['images'].addressable_shards[0].data.shape[0] == 4


def test_labels_only_source_gives_the_same_cohort(source_and_cohort):
  _, cohort, data = source_and_cohort
  labels_only = input_pipeline.load_source(data, with_images=False)
  assert isinstance(labels_only[0]['images'], bytes)  # Left compressed: not decoded.
  fast = input_pipeline.read_cohort(labels_only)
  for field in ('patient_id', 'pcr', 'subtype', 'arm', 'visit_mask'):
    np.testing.assert_array_equal(getattr(fast, field), getattr(cohort, field))
  assert fast.subtype_names == cohort.subtype_names


def test_crop_centre_is_the_tumour_then_the_voi_after_a_complete_response():
  mask = np.zeros((4, 10, 10), np.uint8)
  mask[1:3, 1:9, 1:9] = schema.VOI
  mask[1:3, 2:4, 2:4] = schema.TUMOUR
  fallback = np.array([0., 0., 0.])
  np.testing.assert_allclose(input_pipeline.tumour_centre(mask, fallback), [1.5, 2.5, 2.5])
  mask[mask == schema.TUMOUR] = schema.VOI  # No FTV left: the VOI's centre.
  np.testing.assert_allclose(input_pipeline.tumour_centre(mask, fallback), [1.5, 4.5, 4.5])
  np.testing.assert_allclose(input_pipeline.tumour_centre(np.zeros_like(mask), fallback), fallback)
