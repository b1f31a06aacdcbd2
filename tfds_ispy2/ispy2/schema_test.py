"""The dataset contract loads no JAX: the evidence code (pcrjax.runs) reads it where JAX may be absent.

Importing it imports tfds_ispy2, which registers the builder, hence TensorFlow Datasets (not TensorFlow).
"""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_importing_the_schema_loads_neither_jax_nor_tensorflow():
  code = (
      'import sys; import tfds_ispy2.ispy2.schema; '
      'print(sorted({"jax", "jaxlib", "flax", "tensorflow"} & set(sys.modules)))'
  )
  out = subprocess.run(
      [sys.executable, '-c', code],
      cwd=ROOT,
      check=True,
      capture_output=True,
      text=True,
  )
  assert out.stdout.strip() == '[]'
