"""Faults a long run meets, for real: a full disk (a real tmpfs filled up), kill -9 at random moments,
PHI looked for in every file written; and the protocol's folds trained in parallel child processes.
"""

import base64
import errno
import glob
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from fake_data import tcia_fixtures
from pcrjax import checkpoints, fileio, runs, train
from pcrjax.inference import packaging
from tfds_ispy2.ispy2 import tcia_build

# Protocols killed and resumed, a full disk, diverging runs.
pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]


def _main(workdir, *flags, timeout=600):
  return subprocess.run(
      [sys.executable, '-m', 'pcrjax.main', f'--workdir={workdir}', *flags],
      capture_output=True,
      text=True,
      timeout=timeout,
      cwd=REPO,
  )


def test_a_full_disk_ends_in_one_line_and_keeps_what_was_written(
    smoke_config, small_disk
):
  workdir = os.path.join(small_disk.path, 'run')
  train.train_and_evaluate(
      smoke_config, workdir
  )  # One epoch, finished: checkpoint 1, predictions.
  written = {
      p: p.read_bytes() for p in pathlib.Path(workdir).glob('predictions_*.csv')
  }

  # Room for the lock, config and metrics, not for the next checkpoint.
  small_disk.fill(leave_bytes=48 * 1024)
  done = _main(
      workdir,
      '--config=experiments/baseline.py:smoke',
      '--config.num_epochs=2',
      '--config.warmup_epochs=0',
      f'--config.data.data_dir={smoke_config.data.data_dir}',
  )
  assert done.returncode == 1, done.stderr[-3000:]
  last = done.stderr.strip().splitlines()[-1]
  assert re.match(
      rf'FATAL No space left on device writing {workdir}/checkpoints/\d+ \(',
      last,
  ), last
  assert 'it resumes from the last checkpoint written whole' in last
  assert (
      'Traceback' not in done.stderr
      and 'cannot schedule new futures' not in done.stderr
  )

  # The checkpoint before it is whole, and so is every file written earlier.
  manager = checkpoints.create_manager(workdir, read_only=True)
  assert manager.all_steps() == [1]
  like = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
      manager.item_metadata(1)['params'],
  )
  checkpoints.restore_params(manager, 1, like)
  assert {p: p.read_bytes() for p in written} == written

  # A predictions file (and any file the project writes) is replaced whole or not at all.
  small_disk.fill()
  path = str(next(iter(written)))
  rows = runs.read_predictions(path)
  with pytest.raises(OSError) as error:
    runs.write_predictions(path, rows * 50)
  assert (error.value.errno, error.value.filename) == (errno.ENOSPC, path)
  assert fileio.disk_full_path(error.value) == path
  assert {p: p.read_bytes() for p in written} == written and not list(
      pathlib.Path(workdir).glob('*.tmp')
  )


# --- Kill -9 anywhere: a smoke protocol on a TCIA fixture tree, from its build to its report. -------


def _protocol_command(workdir, data_dir, manual_dir, cache_dir):
  return [
      sys.executable,
      '-m',
      'pcrjax.main',
      '--config=experiments/paper_table.py:smoke',
      f'--workdir={workdir}',
      f'--compilation_cache={cache_dir}',
      '--config.protocol.num_repeats=1',
      '--config.num_epochs=1',
      '--config.warmup_epochs=0',
      '--config.protocol.bootstrap_replicates=200',
      '--config.data.dataset=ispy2/tcia',
      f'--config.data.manual_dir={manual_dir}',
      f'--config.data.data_dir={data_dir}',
  ]


@pytest.fixture(scope='module')
def tcia_run(tcia_tree, tmp_path_factory):
  """An uninterrupted smoke protocol on the TCIA fixture tree (its build included), its two folds
  trained at once in child processes (`protocol.parallel_trainings`), and its export.
  """
  root = tmp_path_factory.mktemp('tcia_run')
  manual_dir, truth = tcia_tree
  paths = {
      'workdir': root / 'run',
      'data_dir': root / 'tfds',
      'manual_dir': manual_dir,
      'cache_dir': root / 'xla',
      'model_dir': root / 'model',
  }
  done = subprocess.run(
      _protocol_command(
          *(
              paths[k]
              for k in ('workdir', 'data_dir', 'manual_dir', 'cache_dir')
          )
      )
      + ['--config.protocol.parallel_trainings=2'],
      capture_output=True,
      text=True,
      timeout=900,
      cwd=REPO,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  logs = sorted(
      paths['workdir'].glob('repeat_0/fold_*/log.txt')
  )  # One child per fold.
  assert len(logs) == 2 and all(
      'training the student' in log.read_text() for log in logs
  )
  packaging.export(
      str(paths['workdir']), str(paths['model_dir']), model_name='student'
  )
  return paths, truth, done.stderr + ''.join(log.read_text() for log in logs)


def _records(data_dir):
  source = tfds.builder('ispy2/tcia', data_dir=str(data_dir)).as_data_source(
      split='train'
  )
  return {
      r['patient_id'].decode(): r
      for r in (source[i] for i in range(len(source)))
  }


def _run_until_killed(command, log_path, trigger, delay):
  """Starts `command` in its own process group; once `trigger(log)` holds, waits `delay` seconds and
  kills the whole group (the build's workers included) with SIGKILL. True if it was killed, False
  if it finished first."""
  with open(log_path, 'wb') as log:
    process = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        start_new_session=True,
    )
    deadline = time.time() + 900
    while process.poll() is None and time.time() < deadline:
      if trigger(pathlib.Path(log_path).read_text(errors='replace')):
        time.sleep(delay)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return True
      time.sleep(0.002)
  assert process.wait(timeout=60) == 0, pathlib.Path(log_path).read_text(
      errors='replace'
  )[-3000:]
  return False


def test_kill_9_anywhere_then_the_same_command_gives_the_same_results(
    tcia_run, tmp_path
):
  """The run killed five times and resumed trains its folds in sequence: it also shows that the
  parallel trainings of `tcia_run` give the sequential protocol's predictions and table.
  """
  paths, _, _ = tcia_run
  workdir, data_dir = tmp_path / 'run', tmp_path / 'tfds'
  command = _protocol_command(
      workdir, data_dir, paths['manual_dir'], paths['cache_dir']
  )
  rng = np.random.default_rng(0)
  moments = [  # (where, when it holds, how long after it to kill)
      (
          'the TCIA build',
          lambda log: 'ispy2/tcia:' in log,
          rng.uniform(0.5, 2.0),
      ),
      (
          'a training',
          lambda log: 'fold 0 baseline' in log,
          rng.uniform(0.0, 2.0),
      ),  # The bar's.
      (
          'a checkpoint write',
          lambda log: bool(
              glob.glob(str(workdir / '*/*/*/checkpoints/*-tmp*'))
          ),
          0.0,
      ),
      (
          'the FTV fit',
          lambda log: 'reference models' in log,
          rng.uniform(0.0, 0.3),
      ),
      (
          'the report',
          lambda _: (workdir / 'table.csv').exists(),
          rng.uniform(0.0, 1.0),
      ),
  ]
  for i, (where, trigger, delay) in enumerate(moments):
    assert _run_until_killed(
        command, tmp_path / f'log{i}', trigger, delay
    ), f'finished before {where}'
  assert not _run_until_killed(
      command, tmp_path / 'log_last', lambda _: False, 0
  )

  # The records equal a clean build's, and so do the build report, every prediction and the table.
  clean, resumed = _records(paths['data_dir']), _records(data_dir)
  assert clean.keys() == resumed.keys()
  for pid, record in clean.items():
    for key in (
        'images',
        'tumor_mask',
        'visit_mask',
        'phase_times_s',
        'pcr',
        'subtype',
    ):
      np.testing.assert_array_equal(
          resumed[pid][key], record[key], err_msg=f'{pid} {key}'
      )
  report_path = 'ispy2/tcia/1.0.0/build_report.json'
  assert tcia_build.untimed(
      json.loads((data_dir / report_path).read_text())
  ) == tcia_build.untimed(
      json.loads((paths['data_dir'] / report_path).read_text())
  )
  outputs = sorted(
      p.relative_to(paths['workdir'])
      for p in paths['workdir'].rglob('predictions_*.csv')
  )
  assert outputs == sorted(
      p.relative_to(workdir) for p in workdir.rglob('predictions_*.csv')
  )
  for name in [*outputs, 'table.csv', 'pairwise.csv', 'subgroups.csv']:
    assert (workdir / name).read_text() == (
        paths['workdir'] / name
    ).read_text(), name
  assert (workdir / 'report.md').exists() and not list(workdir.rglob('*.tmp'))


def test_no_phi_in_any_file_written_from_build_to_export(tcia_run):
  """The planted PHI (names, institution, physicians, address, dates, accession numbers) of the
  DICOM headers and the clinical sheet reaches no record, log, checkpoint, report or exported model.
  """
  paths, truth, log = tcia_run
  phi = sorted(
      {s for t in truth.values() for s in t.phi}
      | set(tcia_fixtures.PHI_STRINGS)
  )
  written = [
      p
      for key in ('workdir', 'data_dir', 'model_dir')
      for p in paths[key].rglob('*')
      if p.is_file()
  ]
  assert len(written) > 100 and any('array_record' in p.name for p in written)
  texts = {
      'the run log': log,
      'the records': ' '.join(  # Decoded: the shards may be compressed.
          f'{r["patient_id"].decode()} {r["arm"].decode()}'
          for r in _records(paths['data_dir']).values()
      ),
  }
  binaries = {}
  for path in written:
    data = path.read_bytes()
    try:
      text = data.decode()
    except UnicodeDecodeError:
      binaries[str(path)] = data
      continue
    # A page's inline images are binary too (base64 text spells short strings by chance).
    images = re.findall(r'data:image/png;base64,([A-Za-z0-9+/=]+)', text)
    binaries.update(
        {
            f'{path} image {i}': base64.b64decode(png)
            for i, png in enumerate(images)
        }
    )
    texts[str(path)] = re.sub(
        r'data:image/png;base64,[A-Za-z0-9+/=]+', '', text
    )
  found = {name: [s for s in phi if s in text] for name, text in texts.items()}
  # In binary data (arrays, PNG), only the strings that bytes do not spell by chance.
  found.update(
      {
          name: [s for s in phi if len(s) >= 5 and s.encode() in data]
          for name, data in binaries.items()
      }
  )
  assert not {name: hits for name, hits in found.items() if hits}
