"""The command line: config files or shipped experiment names, one-line errors, --helpconfig."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from pcrjax import runs
from tests import test_packaging

REPO = pathlib.Path(__file__).resolve().parents[1]


def _main(*args, cwd=REPO, env=None):
  return subprocess.run([sys.executable, '-m', 'pcrjax.main', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('override, message', [
    ('--config.no_such_field=1', 'no_such_field'),
    ('--config.data.representation=cube', 'config.data.representation'),
    ('--config.data.fold=7', 'config.data.fold'),
])
def test_cli_names_the_bad_field(tmp_path, override, message):
  result = _main('--config=experiments/baseline.py:smoke', f'--workdir={tmp_path}', override)
  assert result.returncode != 0
  assert message in result.stderr
  assert not os.path.exists(tmp_path / 'config.json')


def test_unknown_field_is_one_line_with_the_nearest_names(tmp_path):
  result = _main('--config=experiments/baseline.py:smoke', f'--workdir={tmp_path}',
                 '--config.data.foldd=1')
  assert result.returncode != 0
  assert result.stderr.splitlines() == [
      'FATAL Flags parsing error: --config.data.foldd: no such config field; did you mean'
      ' data.fold, data.fold_seed, data.num_folds? (--helpconfig lists them)']


def test_helpconfig_lists_every_field_with_its_value():
  result = _main('--config=experiments/paper_table.py:smoke', '--helpconfig',
                 '--config.num_repeats=3')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert 'model.clinical_inputs=False' in lines and "data.dataset='ispy2/synthetic_smoke'" in lines
  assert 'num_repeats=3' in lines and "stage='protocol'" in lines


def test_a_wheel_install_runs_the_shipped_experiments_by_name_or_path(tmp_path):
  wheel = test_packaging.build_wheel(tmp_path)
  site, elsewhere = tmp_path / 'site', tmp_path / 'elsewhere'
  subprocess.run([sys.executable, '-m', 'pip', '--disable-pip-version-check', '-q', 'install',
                  '--no-deps', '--target', str(site), str(wheel)], check=True, capture_output=True)
  elsewhere.mkdir()
  # The installed copy first: the repository's own pcrjax is neither in cwd nor ahead on the path.
  env = {**os.environ, 'PYTHONPATH': str(site)}
  for spec in ('stage1:smoke', 'experiments/stage1.py:smoke'):
    result = _main(f'--config={spec}', '--helpconfig', cwd=elsewhere, env=env)
    assert result.returncode == 0, result.stderr
    assert "stage='teacher'" in result.stdout.splitlines() and 'num_epochs=2' in result.stdout
  result = _main('--config=stage9', '--helpconfig', cwd=elsewhere, env=env)
  assert result.returncode != 0
  assert result.stderr.splitlines() == [
      'FATAL Flags parsing error: --config=stage9: no such file, nor an experiment of that name'
      ' (baseline, paper_table, stage1, stage2, workdir)']


def test_one_run_per_workdir_and_a_stale_lock_is_taken_over(tmp_path):
  workdir = tmp_path / 'run'
  holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
  try:
    with runs.workdir_lock(str(workdir)):
      pass  # Takes and releases the lock.
    assert not (workdir / runs.LOCK_FILE).exists()
    (workdir / runs.LOCK_FILE).write_text(json.dumps(
        {'pid': holder.pid, 'host': socket.gethostname(), 'started': '2026-12-01 10:00:00 UTC'}))
    done = subprocess.run([sys.executable, '-m', 'pcrjax.main', '--config=experiments/baseline.py:smoke',
                           f'--workdir={workdir}'], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f'FATAL {workdir} is in use by pid {holder.pid} on {socket.gethostname()} since'
        ' 2026-12-01 10:00:00 UTC: one run per workdir.')
  finally:
    holder.kill()
    holder.wait()
  with runs.workdir_lock(str(workdir)):  # Its holder is dead now: taken over.
    assert json.loads((workdir / runs.LOCK_FILE).read_text())['pid'] == os.getpid()
