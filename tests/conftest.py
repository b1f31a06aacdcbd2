"""Shared fixtures: two CPU devices (so batches are really sharded) and one real smoke-size build."""

import os
import shutil
import subprocess

# Before JAX initialises: two host devices, so every test shards its batches over a real 2-device mesh.
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '')
    + ' --xla_force_host_platform_device_count=2'
).strip()

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


class SmallDisk:
  """A real small file system: filled for real, its writes fail with the kernel's own ENOSPC."""

  def __init__(self, path):
    self.path = str(path)
    self._filler = os.path.join(self.path, 'filler')

  def fill(self, leave_bytes: int = 0) -> None:
    """Fills the disk until `leave_bytes` are free (0: full)."""
    with open(self._filler, 'ab') as f:
      f.write(b'\xff' * max(0, shutil.disk_usage(self.path).free - leave_bytes))

  def free(self) -> None:
    os.remove(self._filler)


@pytest.fixture
def small_disk(tmp_path):
  """A 64 MiB tmpfs (needs the right to mount: root, as in CI's container)."""
  path = tmp_path / 'disk'
  path.mkdir()
  done = subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', 'size=64m', 'tmpfs', str(path)],
      capture_output=True,
      text=True,
  )
  if done.returncode:
    pytest.skip(f'cannot mount a tmpfs here: {done.stderr.strip()}')
  yield SmallDisk(path)
  subprocess.run(['umount', '-l', str(path)], check=True)


@pytest.fixture(scope='session')
def smoke_protocol(data_dir, tmp_path_factory):
  """The smoke protocol (2 repeats x 2 folds, one epoch) on the session's build, run once: the
  evidence tests and the export and predict tests read it (none writes into it).
  """
  from experiments import paper_table
  from pcrjax import protocol

  config = paper_table.get_config('smoke')
  config.data.data_dir = data_dir
  config.num_epochs = 1
  config.warmup_epochs = 0
  config.protocol.bootstrap_replicates = 200
  workdir = tmp_path_factory.mktemp('smoke_protocol') / 'table'
  return config, workdir, protocol.run(config, str(workdir))
