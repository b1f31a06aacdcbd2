"""`pip install pcrjax` keeps the JAX and NumPy it finds (Colab's accelerator build), then runs.

setup.py names floors, not the lock's pins: here a fresh virtualenv holds a JAX, jaxlib and NumPy other
than requirements.txt's, the package is installed into it as users install it (from PyPI, with pip's
own dependency resolution), and the smoke protocol runs on the installed copy. Needs PyPI.
"""

import json
import os
import pathlib
import subprocess
import sys

from tests import test_packaging

ROOT = test_packaging.ROOT
# Older than the lock's (jax, jaxlib 0.10.2; numpy 2.4.6, the newest releases), within setup.py's floors.
PREINSTALLED = {'jax': '0.10.1', 'jaxlib': '0.10.1', 'numpy': '2.4.5'}


def _run(args, **kwargs):
  result = subprocess.run(args, capture_output=True, text=True, **kwargs)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  return result.stdout


def test_pip_install_keeps_the_installed_jax_and_numpy_and_runs_the_smoke_protocol(tmp_path):
  venv = tmp_path / 'venv'
  _run([sys.executable, '-m', 'venv', str(venv)])
  python = str(venv / 'bin' / 'python')
  pip = [python, '-m', 'pip', 'install', '--quiet', '--disable-pip-version-check']
  _run([*pip, *(f'{name}=={version}' for name, version in PREINSTALLED.items())], timeout=900)
  _run([*pip, str(test_packaging.copy_source(tmp_path / 'src'))], timeout=1200)

  code = ('import importlib.metadata as m, json, pcrjax, tfds_ispy2; '
          f'print(json.dumps([{{n: m.version(n) for n in {sorted(PREINSTALLED)!r}}}, pcrjax.__file__]))')
  run_dir = tmp_path / 'run'  # Not the repository: `python -m` would import its source tree.
  run_dir.mkdir()
  versions, location = json.loads(_run([python, '-c', code], cwd=run_dir))
  assert versions == PREINSTALLED
  assert pathlib.Path(location).is_relative_to(venv)

  workdir = tmp_path / 'workdir'
  env = {**os.environ, 'TFDS_DATA_DIR': str(tmp_path / 'tfds')}
  _run([python, '-m', 'pcrjax.main', f'--config={ROOT / "experiments" / "paper_table.py"}:smoke',
        f'--workdir={workdir}', '--config.num_epochs=1', '--config.warmup_epochs=0',
        '--config.num_repeats=1'],
       cwd=run_dir, env=env, timeout=1800)
  assert (workdir / 'table.csv').exists() and (workdir / 'report.html').exists()
