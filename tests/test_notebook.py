"""The Colab notebook: its jupytext script is in sync, and it runs headless on the smoke cohort."""

import os
import pathlib
import subprocess
import sys

import jupytext
import nbformat
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / 'notebooks'
NOTEBOOK = NOTEBOOKS / 'pcrjax_colab.ipynb'


def _cells(notebook):
  return [
      (c.cell_type, c.source, c.metadata.get('tags', []))
      for c in notebook.cells
  ]


def test_the_script_and_the_notebook_hold_the_same_cells():
  script = jupytext.read(NOTEBOOKS / 'pcrjax_colab.py')
  assert _cells(script) == _cells(nbformat.read(NOTEBOOK, as_version=4))


# Run by the interpreter under test (the lock's, or a Colab venv's): its kernel is that Python.
_EXECUTE = """
import sys, nbclient, nbformat
notebook = nbformat.read(sys.argv[1], as_version=4)
notebook.cells = [c for c in notebook.cells if 'colab' not in c.metadata.get('tags', [])]
nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                        resources={'metadata': {'path': sys.argv[3]}}).execute()
nbformat.write(notebook, sys.argv[2])
"""


def execute_headless(python, tmp_path, env):
  """Runs the notebook without its `colab` cells on the smoke cohort (in `tmp_path`, the workdir
  `tmp_path/smoke`) and checks what it shows."""
  executed = tmp_path / 'executed.ipynb'
  env = {
      **env,
      'PCRJAX_WORKDIR': str(tmp_path / 'smoke'),
      'PCRJAX_NUM_EPOCHS': '1',
      'PCRJAX_NUM_REPEATS': '1',
  }
  result = subprocess.run(
      [python, '-c', _EXECUTE, str(NOTEBOOK), str(executed), str(tmp_path)],
      capture_output=True,
      text=True,
      env=env,
      cwd=tmp_path,
      timeout=1800,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  notebook = nbformat.read(executed, as_version=4)
  outputs = [
      o for c in notebook.cells if c.cell_type == 'code' for o in c.outputs
  ]
  assert any(
      'CpuDevice' in o.get('data', {}).get('text/plain', '') for o in outputs
  )
  assert any(
      'image/png' in o.get('data', {}) for o in outputs
  )  # The learning curves.
  assert any(
      '**Bottom line:**' in o.get('data', {}).get('text/markdown', '')
      for o in outputs
  )
  assert (tmp_path / 'smoke' / 'report.md').exists()


@pytest.mark.slow
def test_the_notebook_runs_headless_without_its_colab_cells(tmp_path, data_dir):
  execute_headless(
      sys.executable, tmp_path, {**os.environ, 'TFDS_DATA_DIR': data_dir}
  )
