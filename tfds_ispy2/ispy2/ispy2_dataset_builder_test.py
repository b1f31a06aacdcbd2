"""The `ispy2` builder: a real build into a temporary data_dir, read back as an ArrayRecord data source."""

import os

import numpy as np
import tensorflow_datasets as tfds

from tfds_ispy2.ispy2 import ispy2_dataset_builder, phantom

TINY = ispy2_dataset_builder.Ispy2Config(
    name='synthetic_tiny', description='6 patients on a 6x24x24 grid, for this test.',
    phantom=phantom.PhantomSpec(num_patients=6, shape=(6, 24, 24), spacing_mm=(6.0, 5.0, 5.0)))

FEATURES = {'patient_id', 'images', 'visit_mask', 'tumor_mask', 'pcr', 'subtype', 'arm', 'spacing_mm',
            'phase_times_s'}


def test_build_writes_one_array_record_example_per_patient(tmp_path):
  builder = ispy2_dataset_builder.Builder(config=TINY, data_dir=str(tmp_path), file_format='array_record')
  builder.download_and_prepare(file_format='array_record')
  shards = [f for f in os.listdir(builder.data_dir) if '.array_record' in f]
  assert shards, os.listdir(builder.data_dir)
  assert builder.info.splits['train'].num_examples == 6
  assert set(builder.info.features.keys()) == FEATURES  # Nothing beyond the contract (privacy).

  source = builder.as_data_source(split='train')
  records = {r['patient_id'].decode(): r for r in (source[i] for i in range(len(source)))}
  assert sorted(records) == [phantom.patient_id(i) for i in range(6)]
  for index in range(6):
    record, expected = records[phantom.patient_id(index)], phantom.render_patient(TINY.phantom, index)
    assert record['images'].dtype == np.float16 and record['images'].shape == (4, 3, 6, 24, 24)
    assert record['tumor_mask'].dtype == np.uint8 and record['visit_mask'].dtype == np.bool_
    for key in ('images', 'tumor_mask', 'visit_mask', 'spacing_mm', 'phase_times_s'):
      np.testing.assert_array_equal(record[key], expected[key], err_msg=key)
    assert (record['pcr'], record['subtype']) == (expected['pcr'], expected['subtype'])
    assert record['arm'].decode() == expected['arm']
  assert builder.info.features['pcr'].names == ['non_pcr', 'pcr']
  assert builder.info.features['subtype'].names == list(phantom.SUBTYPES)


def test_registered_configs():
  builder_cls = tfds.builder_cls('ispy2')
  assert builder_cls is ispy2_dataset_builder.Builder
  names = [c.name for c in builder_cls.BUILDER_CONFIGS]
  assert names[0] == 'synthetic' == builder_cls.DEFAULT_CONFIG_NAME and 'synthetic_smoke' in names
