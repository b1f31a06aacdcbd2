"""End to end on a real smoke build: the three stages, the frozen teacher, resume, the protocol, the CLI."""

import csv
import hashlib
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import baseline, paper_table, stage1, stage2
from pcrjax import checkpoints, evaluation, input_pipeline, protocol, train

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(module, data_dir, **changes):
  config = module.get_config('smoke')
  config.data.data_dir = data_dir
  config.num_epochs = 1
  config.warmup_epochs = 0
  for key, value in changes.items():
    config[key] = value
  return config


def _tree_digest(directory):
  digest = hashlib.sha256()
  for path in sorted(pathlib.Path(directory).rglob('*')):
    if path.is_file():
      digest.update(str(path.relative_to(directory)).encode() + path.read_bytes())
  return digest.hexdigest()


def _best_params(workdir):
  manager = checkpoints.create_manager(workdir, read_only=True)
  like = manager.item_metadata(manager.best_step())['params']
  return checkpoints.restore_params(manager, manager.best_step(), jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), like))


def test_teacher_then_student_keeps_the_teacher_frozen(data_dir, tmp_path):
  teacher_dir, student_dir = str(tmp_path / 'teacher'), str(tmp_path / 'student')
  train.train_and_evaluate(_config(stage1, data_dir), teacher_dir)
  for name in ('config.json', 'metrics.jsonl', 'predictions_val.csv', 'predictions_test.csv'):
    assert os.path.exists(os.path.join(teacher_dir, name)), name
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(teacher_dir))
  before_params, before_files = _best_params(teacher_dir), _tree_digest(teacher_dir)

  train.train_and_evaluate(_config(stage2, data_dir, teacher_workdir=teacher_dir, num_epochs=2),
                           student_dir)
  jax.tree.map(np.testing.assert_array_equal, _best_params(teacher_dir), before_params)
  assert _tree_digest(teacher_dir) == before_files
  lines = (pathlib.Path(student_dir) / 'metrics.jsonl').read_text().splitlines()
  assert len(lines) == 2 and '"train_feature_loss"' in lines[0]
  predictions = evaluation.read_predictions(os.path.join(student_dir, 'predictions_test.csv'))
  assert predictions and all(0 <= p['prob'] <= 1 for p in predictions)
  assert {p['fold'] for p in predictions} == {0}


def test_student_refuses_a_missing_or_mismatched_teacher(data_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match='experiments/stage1.py'):
    train.train_and_evaluate(_config(stage2, data_dir, teacher_workdir=str(tmp_path / 'none')),
                             str(tmp_path / 's1'))
  teacher_dir = str(tmp_path / 'teacher')
  train.train_and_evaluate(_config(stage1, data_dir), teacher_dir)
  other_fold = _config(stage2, data_dir, teacher_workdir=teacher_dir)
  other_fold.data.fold = 1
  with pytest.raises(ValueError, match='data.fold'):
    train.train_and_evaluate(other_fold, str(tmp_path / 's2'))
  volume = _config(stage2, data_dir, teacher_workdir=teacher_dir)
  volume.data.representation = 'volume'
  with pytest.raises(ValueError, match='data.representation'):
    train.train_and_evaluate(volume, str(tmp_path / 's3'))


def test_interrupted_run_resumes_to_the_same_result(data_dir, tmp_path, monkeypatch):
  config = _config(baseline, data_dir, num_epochs=2)
  train.train_and_evaluate(config, str(tmp_path / 'straight'))

  real_train_dataset = input_pipeline.train_dataset

  def interrupted(*args, epoch, **kwargs):
    if epoch == 2:
      raise KeyboardInterrupt
    return real_train_dataset(*args, epoch=epoch, **kwargs)

  monkeypatch.setattr(input_pipeline, 'train_dataset', interrupted)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  monkeypatch.setattr(input_pipeline, 'train_dataset', real_train_dataset)
  train.train_and_evaluate(config, str(tmp_path / 'resumed'))

  for name in ('predictions_test.csv', 'predictions_val.csv'):
    assert ((tmp_path / 'straight' / name).read_text() == (tmp_path / 'resumed' / name).read_text())
  assert len((tmp_path / 'resumed' / 'metrics.jsonl').read_text().splitlines()) == 2


def test_protocol_smoke_writes_the_table_and_resumes(data_dir, tmp_path):
  config = _config(paper_table, data_dir, bootstrap_replicates=200)
  workdir = str(tmp_path / 'table')
  table = protocol.run(config, workdir)
  assert [row.name for row in table] == ['baseline', 'teacher', 'student']
  assert [row.time_points for row in table] == ['T0+T1', 'T0+T1+T2', 'T0+T1']
  student = table[2]
  assert 0 <= student.p_vs_reference <= 1 and student.ci_low <= student.auroc <= student.ci_high
  assert table[0].num_patients == 48  # Every patient predicted once, out of fold.
  for fold in range(config.data.num_folds):
    teacher_config = (pathlib.Path(workdir) / f'fold_{fold}' / 'teacher' / 'config.json').read_text()
    assert f'"fold": {fold}' in teacher_config
  with open(os.path.join(workdir, 'table.csv')) as f:
    assert len(list(csv.DictReader(f))) == 3
  report = (pathlib.Path(workdir) / 'report.md').read_text()
  assert 'synthetic' in report and 'DeLong' in report
  assert (pathlib.Path(workdir) / 'roc.png').stat().st_size > 10_000
  # A second run finds every stage finished and rebuilds the same table without training.
  assert protocol.run(config, workdir) == table


@pytest.mark.parametrize('override, message', [
    ('--config.no_such_field=1', 'no_such_field'),
    ('--config.data.representation=cube', 'config.data.representation'),
    ('--config.data.fold=7', 'config.data.fold'),
])
def test_cli_names_the_bad_field(tmp_path, override, message):
  result = subprocess.run(
      [sys.executable, '-m', 'pcrjax.main', '--config=experiments/baseline.py:smoke',
       f'--workdir={tmp_path}', override], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert message in result.stderr
  assert not os.path.exists(tmp_path / 'config.json')
