"""The dataset contract stays cheap to import: configs and training code read it at start-up."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_importing_the_schema_loads_neither_tfds_nor_jax():
  code = ('import sys; import tfds_ispy2.ispy2.schema; '
          'print(sorted({"jax", "tensorflow", "tensorflow_datasets"} & set(sys.modules)))')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True, capture_output=True,
                       text=True)
  assert out.stdout.strip() == '[]'
