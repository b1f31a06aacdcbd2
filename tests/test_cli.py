"""The command line: config files or shipped experiment names, one-line errors, --helpconfig."""

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from pcrjax import fileio, runs, wall_time
from pcrjax.evidence import run_report
from tests import test_packaging

# Every command in a subprocess, trainings included.
pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]


def _main(*args, cwd=REPO, env=None):
  return subprocess.run(
      [sys.executable, '-m', 'pcrjax.main', *args],
      cwd=cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )


@pytest.mark.parametrize(
    'override, message',
    [
        ('--config.no_such_field=1', 'no_such_field'),
        ('--config.data.representation=cube', 'config.data.representation'),
        ('--config.data.fold=7', 'config.data.fold'),
    ],
)
def test_cli_names_the_bad_field(tmp_path, override, message):
  result = _main(
      '--config=experiments/baseline.py:smoke',
      f'--workdir={tmp_path}',
      override,
  )
  assert result.returncode != 0
  assert message in result.stderr
  assert not os.path.exists(tmp_path / 'config.json')


def test_unknown_field_is_one_line_with_the_nearest_names(tmp_path):
  result = _main(
      '--config=experiments/baseline.py:smoke',
      f'--workdir={tmp_path}',
      '--config.data.foldd=1',
  )
  assert result.returncode != 0
  assert result.stderr.splitlines() == [
      'FATAL Flags parsing error: --config.data.foldd: no such config field; did you mean'
      ' data.fold, data.fold_seed, data.num_folds? (--helpconfig lists them)'
  ]


def test_helpconfig_lists_every_field_with_its_value():
  result = _main(
      '--config=experiments/paper_table.py:smoke',
      '--helpconfig',
      '--config.protocol.num_repeats=3',
  )
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert (
      'model.clinical_inputs=False' in lines
      and "data.dataset='ispy2/synthetic_smoke'" in lines
  )
  assert 'protocol.num_repeats=3' in lines and "stage='protocol'" in lines


def test_a_wheel_install_runs_the_shipped_experiments_by_name_or_path(tmp_path):
  wheel = test_packaging.build_wheel(tmp_path)
  site, elsewhere = tmp_path / 'site', tmp_path / 'elsewhere'
  subprocess.run(
      [
          sys.executable,
          '-m',
          'pip',
          '--disable-pip-version-check',
          '-q',
          'install',
          '--no-deps',
          '--target',
          str(site),
          str(wheel),
      ],
      check=True,
      capture_output=True,
  )
  elsewhere.mkdir()
  # The installed copy first: the repository's own pcrjax is neither in cwd nor ahead on the path.
  env = {**os.environ, 'PYTHONPATH': str(site)}
  for spec in ('stage1:smoke', 'experiments/stage1.py:smoke'):
    result = _main(f'--config={spec}', '--helpconfig', cwd=elsewhere, env=env)
    assert result.returncode == 0, result.stderr
    assert (
        "stage='teacher'" in result.stdout.splitlines()
        and 'num_epochs=2' in result.stdout
    )
  result = _main('--config=stage9', '--helpconfig', cwd=elsewhere, env=env)
  assert result.returncode != 0
  assert result.stderr.splitlines() == [
      'FATAL Flags parsing error: --config=stage9: no such file, nor an experiment of that name'
      ' (baseline, paper_table, stage1, stage2, workdir)'
  ]


def test_one_run_per_workdir_and_a_stale_lock_is_taken_over(tmp_path):
  workdir = tmp_path / 'run'
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import time; time.sleep(120)']
  )
  try:
    with fileio.workdir_lock(runs.lock_path(str(workdir))):
      pass  # Takes and releases the lock.
    assert not (workdir / runs.LOCK_FILE).exists()
    (workdir / runs.LOCK_FILE).write_text(
        json.dumps(
            {
                'pid': holder.pid,
                'host': socket.gethostname(),
                'started': '2026-12-01 10:00:00 UTC',
            }
        )
    )
    done = subprocess.run(
        [
            sys.executable,
            '-m',
            'pcrjax.main',
            '--config=experiments/baseline.py:smoke',
            f'--workdir={workdir}',
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f'FATAL {workdir} is in use by pid {holder.pid} on {socket.gethostname()} since'
        ' 2026-12-01 10:00:00 UTC: one run per workdir.'
    )
  finally:
    holder.kill()
    holder.wait()
  with fileio.workdir_lock(
      runs.lock_path(str(workdir))
  ):  # Its holder is dead now: taken over.
    assert (
        json.loads((workdir / runs.LOCK_FILE).read_text())['pid'] == os.getpid()
    )


# --- The console: what a user reads, and where the rest goes. -------------------------------------

_RESULT = re.compile(
    r'^(baseline|teacher|student), repeat (\d) fold (\d): 1 epochs, epoch 1'
    r' selected, validation AUROC \d\.\d{3}, [\d.]+ s( \(finished earlier\))?$'
)
# Lines the console must not show: per-epoch lines, and the libraries' INFO lines and expected
# warnings (Orbax's per checkpoint and of read-only managers, XLA's backend probing, TFDS's).
_NOT_ON_THE_CONSOLE = (
    'epoch 1/1',
    'orbax',
    'Checkpoint',
    'read only',
    'read_only',
    'Unable to initialize backend',
    'Load dataset info',
    'dataset_info.json',
    'Config:',
)


def _smoke_protocol(workdir, data_dir, *args):
  return subprocess.run(
      [
          sys.executable,
          '-m',
          'pcrjax.main',
          '--config=paper_table:smoke',
          f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}',
          '--config.protocol.num_repeats=1',
          '--config.num_epochs=1',
          '--config.warmup_epochs=0',
          '--config.protocol.bootstrap_replicates=200',
          *args,
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
  )


@pytest.fixture(scope='module')
def protocol_run(data_dir, tmp_path_factory):
  """One repeat of the smoke protocol, run as a user runs it."""
  workdir = tmp_path_factory.mktemp('console') / 'table'
  done = _smoke_protocol(workdir, data_dir)
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir, done


def test_the_protocol_console_shows_its_progress_and_one_line_per_training(
    protocol_run,
):
  workdir, done = protocol_run
  assert (
      '7/7 [' in done.stderr and 'training/s' in done.stderr
  )  # tqdm's bar, to its end.
  results = [
      m.groups() for m in map(_RESULT.match, done.stdout.splitlines()) if m
  ]
  assert sorted(results) == sorted(
      (name, '0', str(fold), None)
      for fold in (0, 1)
      for name in ('baseline', 'teacher', 'student')
  )
  console = done.stdout + done.stderr
  assert not [s for s in _NOT_ON_THE_CONSOLE if s in console]
  assert (
      done.stderr.replace('\r', '\n')
      .strip()
      .splitlines()[-1]
      .startswith('training 7/7')
  )
  assert (
      done.stdout.strip()
      .splitlines()[-1]
      .startswith('The protocol: wall time ')
  )

  # Everything else is in the run's log, and each training's lines in its own.
  log = (workdir / runs.LOG_FILE).read_text()
  assert (
      'Config:' in log
      and 'Load dataset info' in log
      and 'epoch 1/1: train_loss=' in log
  )
  for fold in (0, 1):
    for name in ('baseline', 'teacher', 'student'):
      own = (
          workdir / f'repeat_0/fold_{fold}/{name}' / runs.LOG_FILE
      ).read_text()
      assert (
          f'{name}, fold {fold}/2:' in own and 'epoch 1/1: train_loss=' in own
      )


def test_where_the_wall_time_went_is_in_the_log_and_the_report(
    protocol_run, tmp_path
):
  workdir, done = protocol_run
  spent = json.loads((workdir / runs.WALL_TIME_FILE).read_text())
  timings = [
      json.loads(p.read_text())
      for p in workdir.glob(f'repeat_0/fold_*/*/{runs.TIMING_FILE}')
  ]
  assert (
      len(timings) == spent['trainings'] == 6
  )  # The networks; the references are fitted.
  assert all(
      set(t['seconds']) == set(wall_time.TRAINING_PHASES) for t in timings
  )
  assert spent['steps'] == sum(t['steps'] for t in timings) > 0
  assert set(spent['seconds']) == set(wall_time.PHASES)
  assert sum(spent['seconds'].values()) == pytest.approx(
      spent['wall'], rel=1e-6
  )
  assert spent['seconds']['compile'] > 0 and spent['seconds']['steps'] > 0
  last = done.stdout.strip().splitlines()[-1]
  assert (
      wall_time.describe(spent) in last
      and 'training steps' in last
      and 'report' in last
  )
  report = (workdir / 'report.md').read_text()
  assert "Where the time went in the protocol's last run: wall time " in report
  for phase in (
      'compile',
      'training steps',
      'validation',
      'checkpoints',
      'reference fits',
  ):
    assert f', {phase} ' in report

  # A workdir from before these records still makes its report, without the paragraph.
  older = tmp_path / 'older'
  shutil.copytree(workdir, older)
  (older / runs.WALL_TIME_FILE).unlink()
  for timing in older.rglob(runs.TIMING_FILE):
    timing.unlink()
  run_report.build(str(older))
  assert 'Where the time went' not in (older / 'report.md').read_text()


def test_the_clock_counts_a_first_call_as_compile_and_an_inner_training_once(
    tmp_path,
):
  outer = wall_time.Clock()
  inner = (
      wall_time.Clock()
  )  # A cross-fitted teacher, trained in the student's set-up.
  step = inner.first_call(time.sleep, before='setup')
  step(0.2)
  step(0.1)
  inner.lap('steps')
  inner.finish(str(tmp_path), steps=2, devices='1 cpu device(s)')
  time.sleep(0.1)
  outer.lap('setup')
  assert (
      0.2 <= inner.seconds['compile'] < 0.3
      and 0.1 <= inner.seconds['steps'] < 0.2
  )
  assert (
      0.1 <= outer.seconds['setup'] < 0.2
  )  # Without the inner training's 0.3 s.
  assert wall_time.training_seconds(str(tmp_path)) == pytest.approx(
      sum(inner.seconds.values())
  )


def test_the_flag_brings_the_epoch_lines_back(protocol_run, data_dir, tmp_path):
  workdir, _ = protocol_run
  resumed = tmp_path / 'table'
  shutil.copytree(workdir, resumed)
  shutil.rmtree(
      resumed / 'repeat_0/fold_1/student'
  )  # Trained again; the rest finished earlier.
  done = _smoke_protocol(resumed, data_dir, '--epoch_lines')
  assert done.returncode == 0, done.stderr[-3000:]
  assert (
      'student, fold 1/2:' in done.stderr
      and 'epoch 1/1: train_loss=' in done.stderr
  )
  assert done.stderr.count('epoch 1/1: train_loss=') == 1
  results = [
      m.groups() for m in map(_RESULT.match, done.stdout.splitlines()) if m
  ]
  assert ('student', '0', '1', None) in results and len(results) == 6
  assert sum(note is not None for *_, note in results) == 5


@pytest.mark.parametrize(
    'command, flags',
    [
        ('pcrjax.report', ['--workdir={run}']),
        ('pcrjax.export', ['--run={run}', '--out={run}/model']),
    ],
)
def test_a_data_error_is_one_line_without_usage(tmp_path, command, flags):
  done = subprocess.run(
      [sys.executable, '-m', command, *(f.format(run=tmp_path) for f in flags)],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert done.returncode == 1
  assert done.stderr.splitlines() == [
      f'FATAL {tmp_path}/config.json does not exist: {tmp_path} is not a pcrjax run.'
  ]
