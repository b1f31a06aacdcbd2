"""The Colab notebook: its jupytext script is in sync, and it runs headless on the smoke cohort."""

import pathlib

import jupytext
import nbclient
import nbformat

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / 'notebooks'
NOTEBOOK = NOTEBOOKS / 'pcrjax_colab.ipynb'


def _cells(notebook):
  return [(c.cell_type, c.source, c.metadata.get('tags', [])) for c in notebook.cells]


def test_the_script_and_the_notebook_hold_the_same_cells():
  script = jupytext.read(NOTEBOOKS / 'pcrjax_colab.py')
  assert _cells(script) == _cells(nbformat.read(NOTEBOOK, as_version=4))


def test_the_notebook_runs_headless_without_its_colab_cells(tmp_path, monkeypatch, data_dir):
  monkeypatch.setenv('PCRJAX_WORKDIR', str(tmp_path / 'smoke'))
  monkeypatch.setenv('PCRJAX_NUM_EPOCHS', '1')
  monkeypatch.setenv('PCRJAX_NUM_REPEATS', '1')
  monkeypatch.setenv('TFDS_DATA_DIR', data_dir)
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  notebook.cells = [c for c in notebook.cells if 'colab' not in c.metadata.get('tags', [])]
  nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path)}}).execute()

  outputs = [o for c in notebook.cells if c.cell_type == 'code' for o in c.outputs]
  assert any('CpuDevice' in o.get('data', {}).get('text/plain', '') for o in outputs)
  assert any('image/png' in o.get('data', {}) for o in outputs)  # The learning curves.
  assert any('**Bottom line:**' in o.get('data', {}).get('text/markdown', '') for o in outputs)
  assert (tmp_path / 'smoke' / 'report.md').exists()
