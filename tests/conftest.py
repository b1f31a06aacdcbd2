"""Shared fixtures: two CPU devices (so batches are really sharded) and one real smoke-size build."""

import os

# Before JAX initialises: two host devices, so every test shards its batches over a real 2-device mesh.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=2').strip()

import pytest  # noqa: E402

from pcrjax import input_pipeline  # noqa: E402
from experiments import baseline  # noqa: E402


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A real `ispy2/synthetic_smoke` build (ArrayRecord shards written by the TFDS builder)."""
  path = tmp_path_factory.mktemp('tensorflow_datasets')
  config = baseline.get_config('smoke')
  config.data.data_dir = str(path)
  input_pipeline.load_source(config.data)
  return str(path)


@pytest.fixture
def smoke_config(data_dir):
  """The baseline smoke config on the session's build; tests change it freely (a fresh copy)."""
  config = baseline.get_config('smoke')
  config.data.data_dir = data_dir
  config.num_epochs = 1
  config.warmup_epochs = 0
  return config
