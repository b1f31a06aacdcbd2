"""End to end on a real smoke build: the three stages, the frozen teacher, resume, the protocol."""

import csv
import errno
import hashlib
import html
import itertools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import expit
from sklearn import linear_model, metrics

from experiments import baseline, stage1, stage2
from pcrjax import checkpoints, input_pipeline, models, protocol, runs, sharding, train
from pcrjax.evidence import run_comparison, run_report
from tfds_ispy2.ispy2 import schema

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
      digest.update(
          str(path.relative_to(directory)).encode() + path.read_bytes()
      )
  return digest.hexdigest()


def _best_params(workdir):
  manager = checkpoints.create_manager(workdir, read_only=True)
  like = manager.item_metadata(manager.best_step())['params']
  return checkpoints.restore_params(
      manager,
      manager.best_step(),
      jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), like),
  )


@pytest.mark.slow
def test_teacher_then_student_keeps_the_teacher_frozen(data_dir, tmp_path):
  teacher_dir, student_dir = str(tmp_path / 'teacher'), str(
      tmp_path / 'student'
  )
  train.train_and_evaluate(_config(stage1, data_dir), teacher_dir)
  for name in (
      'config.json',
      'metrics.jsonl',
      'predictions_val.csv',
      'predictions_test.csv',
  ):
    assert os.path.exists(os.path.join(teacher_dir, name)), name
  assert any(
      name.startswith('events.out.tfevents') for name in os.listdir(teacher_dir)
  )
  before_params, before_files = _best_params(teacher_dir), _tree_digest(
      teacher_dir
  )

  train.train_and_evaluate(
      _config(stage2, data_dir, teacher_workdir=teacher_dir, num_epochs=2),
      student_dir,
  )
  jax.tree.map(
      np.testing.assert_array_equal, _best_params(teacher_dir), before_params
  )
  assert _tree_digest(teacher_dir) == before_files
  lines = (pathlib.Path(student_dir) / 'metrics.jsonl').read_text().splitlines()
  assert len(lines) == 2 and '"train_feature_loss"' in lines[0]
  predictions = runs.read_predictions(
      os.path.join(student_dir, 'predictions_test.csv')
  )
  assert predictions and all(0 <= p['prob'] <= 1 for p in predictions)
  assert {p['fold'] for p in predictions} == {0}

  # The targets: clean inputs, one row per patient, standardised on the training patients with T2.
  config = _config(stage2, data_dir, teacher_workdir=teacher_dir)
  source, cohort = input_pipeline.load_source(
      config.data
  ), input_pipeline.load_cohort(config.data)
  train_rows = np.arange(0, len(cohort), 2)
  mesh = sharding.make_mesh()
  has_t2 = cohort.visit_mask[:, 2]
  fit = train_rows[has_t2[train_rows]]
  for target, width in (
      ('latent', config.model.lstm_features),
      ('logit', 1),
      ('kinetics', input_pipeline.NUM_KINETICS),
  ):
    config.dual_task.target = target
    assert runs.feature_dim(config) == width
    for standardise in (True, False):
      config.dual_task.standardise = standardise
      got = train.feature_targets(
          config, source, cohort, train_rows, mesh, batches=(2, 8)
      )
      assert got['target'].shape == (len(cohort), width)
      np.testing.assert_array_equal(got['target_mask'], has_t2)
      assert not got['target'][~has_t2].any()
      if standardise:
        np.testing.assert_allclose(got['target'][fit].mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(got['target'][fit].std(0), 1, atol=1e-4)
      elif target == 'latent':
        assert (
            np.abs(got['target']).max() <= 1
            and got['target'][fit].std(0).min() < 0.5
        )


@pytest.mark.slow
def test_cross_fitted_teachers_and_lambda_chosen_on_validation(
    data_dir, tmp_path
):
  teacher_dir, student_dir = str(tmp_path / 'teacher'), str(
      tmp_path / 'student'
  )
  train.train_and_evaluate(_config(stage1, data_dir), teacher_dir)
  config = _config(stage2, data_dir, teacher_workdir=teacher_dir)
  config.dual_task.cross_fit, config.dual_task.lambda_grid = 2, (0.5, 2.0)
  train.train_and_evaluate(config, student_dir)

  # Each cross-fitted teacher tests on one part of the fold's training patients and trains on
  # the rest; the parts cover the training patients once.
  cohort = input_pipeline.load_cohort(config.data)
  fold = train.data_split(config, cohort)
  parts = []
  for part in range(2):
    part_dir = runs.cross_fit_dir(teacher_dir, part)
    assert runs.is_finished(part_dir)
    split = train.data_split(runs.read_config(part_dir), cohort)
    np.testing.assert_array_equal(split.val, fold.val)
    assert not set(split.train) & set(split.test)
    assert set(split.train) | set(split.test) == set(fold.train)
    assert {
        p['patient_id']
        for p in runs.read_predictions(runs.predictions_path(part_dir, 'test'))
    } == set(cohort.patient_id[split.test])
    parts.append(split.test)
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), fold.train)

  # A training patient's target is the output of the teacher that did not see it; the others' are
  # the fold teacher's.
  config.dual_task.standardise, config.dual_task.lambda_grid = False, ()
  source, mesh = input_pipeline.load_source(config.data), sharding.make_mesh()
  crossed = train.feature_targets(
      config, source, cohort, fold.train, mesh, batches=(2, 8)
  )['target']
  config.dual_task.cross_fit = 0
  plain = train.feature_targets(
      config, source, cohort, fold.train, mesh, batches=(2, 8)
  )['target']
  outside = np.setdiff1d(np.arange(len(cohort)), fold.train)
  np.testing.assert_array_equal(crossed[outside], plain[outside])
  has_t2 = cohort.visit_mask[:, 2]
  assert not np.allclose(
      crossed[fold.train][has_t2[fold.train]],
      plain[fold.train][has_t2[fold.train]],
  )

  # lambda: the candidate with the best validation metric became the run.
  with open(os.path.join(student_dir, runs.LAMBDA_CHOICE_FILE)) as f:
    choice = json.load(f)
  values = {c['lambda']: c['value'] for c in choice['candidates']}
  assert set(values) == {0.5, 2.0}
  for weight, value in values.items():
    assert (
        value
        == runs.read_selection(runs.lambda_dir(student_dir, weight))['value']
    )
  assert choice['chosen'] == max(values, key=values.get)
  chosen_dir = runs.lambda_dir(student_dir, choice['chosen'])
  assert runs.read_config(student_dir).feature_loss_weight == choice['chosen']
  for split_name in runs.SPLITS:
    assert (
        pathlib.Path(runs.predictions_path(student_dir, split_name)).read_text()
        == pathlib.Path(
            runs.predictions_path(chosen_dir, split_name)
        ).read_text()
    )
  jax.tree.map(
      np.testing.assert_array_equal,
      _best_params(student_dir),
      _best_params(chosen_dir),
  )

  # Run again, nothing trains again.
  before = _tree_digest(tmp_path)
  config.dual_task.cross_fit, config.dual_task.lambda_grid = 2, (0.5, 2.0)
  config.dual_task.standardise = True
  train.train_and_evaluate(config, student_dir)
  assert _tree_digest(tmp_path) == before


def test_the_head_starts_at_the_training_patients_logistic_model(data_dir):
  config = _config(baseline, data_dir)
  config.model.clinical_inputs = True
  rng = np.random.default_rng(0)
  n = 200
  examples = {
      'kinetics': rng.normal(size=(n, 2, 4)).astype(np.float32),
      'visit_mask': np.c_[np.ones(n, bool), rng.random(n) > 0.2],
      'clinical': schema.RECEPTORS[rng.integers(0, 4, n)],
      'label': (rng.random(n) < 0.35).astype(np.int32),
  }
  rows = np.arange(0, n, 2)
  start = train.head_start(config, examples, rows, latent_dim=3)
  kernel = start['pcr_head']['kernel'][:, 0]
  assert (
      kernel.shape == (3 + 4 + 5,) and not kernel[:3].any()
  )  # The latent starts unread.
  present = examples['visit_mask'][:, 1:].astype(np.float32)
  change = (examples['kinetics'][:, 1] - examples['kinetics'][:, 0]) * present
  head_in = np.c_[examples['kinetics'][:, 0], change, present]
  cells = np.asarray(models.receptor_cells(examples['clinical']))
  logit = (
      head_in @ kernel[3:]
      + start['pcr_head']['bias'][0]
      + cells @ start['subtype_offset']['kernel'][:, 0]
  )
  # The same model as sklearn's on the standardised inputs, fitted on the training rows alone.
  x = np.c_[head_in, cells][rows]
  keep = x.std(0) > 1e-8
  scaled = lambda z: (z[:, keep] - x[:, keep].mean(0)) / x[:, keep].std(0)
  want = (
      linear_model.LogisticRegression(class_weight='balanced', max_iter=1000)
      .fit(scaled(x), examples['label'][rows])
      .decision_function(scaled(np.c_[head_in, cells]))
  )
  np.testing.assert_allclose(logit, want, rtol=1e-4, atol=1e-4)
  config.model.clinical_inputs = config.model.tumour_kinetics = False
  assert train.head_start(config, examples, rows, latent_dim=3) == {}


@pytest.mark.slow
def test_student_refuses_a_missing_or_mismatched_teacher(data_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match='experiments/stage1.py'):
    train.train_and_evaluate(
        _config(stage2, data_dir, teacher_workdir=str(tmp_path / 'none')),
        str(tmp_path / 's1'),
    )
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


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_result(
    data_dir, tmp_path, monkeypatch
):
  config = _config(baseline, data_dir, num_epochs=2)
  train.train_and_evaluate(config, str(tmp_path / 'straight'))

  real_epoch_batches = input_pipeline.epoch_batches

  def interrupted(*args, epoch, **kwargs):
    if epoch == 2:
      raise KeyboardInterrupt
    return real_epoch_batches(*args, epoch=epoch, **kwargs)

  monkeypatch.setattr(input_pipeline, 'epoch_batches', interrupted)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  monkeypatch.setattr(input_pipeline, 'epoch_batches', real_epoch_batches)
  train.train_and_evaluate(config, str(tmp_path / 'resumed'))

  for name in ('predictions_test.csv', 'predictions_val.csv'):
    assert (tmp_path / 'straight' / name).read_text() == (
        tmp_path / 'resumed' / name
    ).read_text()
  assert (
      len((tmp_path / 'resumed' / 'metrics.jsonl').read_text().splitlines())
      == 2
  )


@pytest.mark.slow
def test_profile_steps_write_a_profiler_trace_and_checkpoints_follow_improvement(
    data_dir, tmp_path
):
  config = _config(
      baseline,
      data_dir,
      num_epochs=4,
      profile_steps=2,
      checkpoint_every_epochs=3,
      selection_window=2,
  )
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert list((tmp_path / 'run' / 'profile').rglob('*.xplane.pb'))
  lines = [
      json.loads(line)
      for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()
  ]
  aurocs = [line['val_auroc'] for line in lines]
  smoothed = [
      np.mean(aurocs[max(0, e - 1) : e + 1]) for e in range(len(lines))
  ]  # Trailing window 2.
  np.testing.assert_allclose(
      [line['val_auroc_smoothed'] for line in lines], smoothed
  )
  best = [
      e + 1
      for e in range(len(lines))
      if smoothed[e] > max([-1.0] + smoothed[:e])
  ]
  saved_ever = set(best) | {
      3,
      4,
  }  # Improvements, every third epoch, the last one.
  kept = {
      int(p.name)
      for p in (tmp_path / 'run' / 'checkpoints').iterdir()
      if p.name.isdigit()
  }
  assert (
      kept <= saved_ever and 4 in kept
  )  # The latest and the best survive the policy.
  assert (
      json.loads((tmp_path / 'run' / runs.SELECTION_FILE).read_text())['epoch']
      in kept
  )


@pytest.mark.slow
@pytest.mark.parametrize(
    'rate, isa', [('1e8', ''), ('1e8', 'AVX2'), ('1e38', ''), ('inf', '')]
)
def test_a_diverging_run_stops_with_one_message(data_dir, tmp_path, rate, isa):
  """However it shows, as the CPU's arithmetic has it (`isa` caps the instructions XLA emits).
  Here a rate of 1e8 saturates every prediction (finite: an AVX2-only CPU ended such a run with
  exit 0), 1e38 leaves parameters at inf after finite steps, and inf makes a step non-finite.
  """
  env = {
      **os.environ,
      'XLA_FLAGS': (
          os.environ.get('XLA_FLAGS', '')
          + (f' --xla_cpu_max_isa={isa}' if isa else '')
      ),
  }
  done = subprocess.run(
      [
          sys.executable,
          '-m',
          'pcrjax.main',
          '--config=experiments/baseline.py:smoke',
          f'--workdir={tmp_path / "run"}',
          f'--config.data.data_dir={data_dir}',
          '--config.num_epochs=3',
          f'--config.learning_rate={rate}',
          f'--config.grad_clip_norm={min(float(rate), 1e38):g}',
      ],
      capture_output=True,
      text=True,
      timeout=600,
      cwd=pathlib.Path(__file__).parents[1],
      env=env,
  )
  assert done.returncode == 1
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith('Diverged: baseline, fold 0, epoch '), last
  assert any(
      why in last
      for why in ('not finite', 'saturated', 'times that of the first epoch')
  )
  assert f'Lower learning_rate (now {float(rate):g})' in last
  assert (
      'Traceback' not in done.stderr
      and 'cannot schedule new futures' not in done.stderr
  )


def test_an_exploding_loss_or_saturated_predictions_count_as_divergence():
  calm = np.array([0.2, 0.7, 0.5])
  assert train.explosion(0.7, None, calm) is None
  assert train.explosion(60.0, 0.7, calm) is None
  assert 'over 100 times that of the first epoch (0.7)' in train.explosion(
      1.4e12, 0.7, calm
  )
  assert 'saturated' in train.explosion(
      0.7, None, np.array([0.0, 1.0, 1 - 1e-7])
  )
  assert (
      train.explosion(0.7, None, np.array([0.0, 1.0, 0.99])) is None
  )  # One patient not saturated.
  assert 'not finite' in train.explosion(0.7, None, np.array([0.5, np.nan]))


@pytest.mark.slow
def test_protocol_smoke_writes_the_evidence_and_resumes(
    smoke_protocol, tmp_path, small_disk
):
  config, workdir, table = smoke_protocol
  assert config.protocol.num_repeats == 2
  assert [(row.name, row.time_points) for row in table] == [
      ('baseline', 'T0+T1'),
      ('student', 'T0+T1'),
      ('subtype', 'clinical'),
      ('ftv', 'T0+T1'),
      ('ftv_subtype', 'T0+T1'),
      ('oracle', 'T0+T1'),
      ('teacher', 'T0+T1+T2'),
  ]
  for row in table:
    assert (
        row.num_patients == 48 and len(row.auroc_repeats) == 2
    )  # Every patient, once per repeat.
    assert row.ci_low <= row.auroc <= row.ci_high and 0 <= row.brier <= 1
  assert table[0].p_vs_baseline is None and table[-1].p_vs_baseline is None
  assert (
      table[-2].p_vs_baseline is None
  )  # The oracle is a ceiling, not a method.
  assert 0 <= table[1].p_vs_baseline <= 1
  # Each repeat draws its own folds; each fold's teacher saw that fold's training patients only.
  for repeat in range(2):
    for fold in range(config.data.num_folds):
      teacher = json.loads(
          (
              workdir
              / f'repeat_{repeat}'
              / f'fold_{fold}'
              / 'teacher'
              / 'config.json'
          ).read_text()
      )
      assert (teacher['data']['fold'], teacher['data']['fold_seed']) == (
          fold,
          repeat,
      )
  test_ids = [
      {
          p['patient_id']
          for p in runs.read_predictions(
              str(
                  workdir
                  / f'repeat_{r}'
                  / 'fold_0'
                  / 'baseline'
                  / 'predictions_test.csv'
              )
          )
      }
      for r in range(2)
  ]
  assert test_ids[0] != test_ids[1]

  with open(workdir / 'pairwise.csv') as f:
    pairs = list(csv.DictReader(f))
  compared = [row.name for row in table if runs.model(row.name).early_predictor]
  assert [(p['a'], p['b']) for p in pairs] == list(
      itertools.combinations(compared, 2)
  )
  assert all(float(p['p_holm']) >= float(p['p']) for p in pairs)
  with open(workdir / 'operating_points.csv') as f:
    assert len(list(csv.DictReader(f))) == 2 * len(table)
  with open(workdir / 'subgroups.csv') as f:
    groups = list(csv.DictReader(f))
  assert {g['kind'] for g in groups} == {'subtype', 'arm'}
  assert any(
      g['auroc'] == '' for g in groups
  )  # 48 patients: some subgroups are "too few".
  text = (workdir / 'report.md').read_text()
  assert (
      'Synthetic data' in text and '2 repeat(s)' in text and 'too few' in text
  )
  assert '**Bottom line:**' in text
  selection = json.loads(
      (
          workdir / 'repeat_1' / 'fold_0' / 'student' / runs.SELECTION_FILE
      ).read_text()
  )
  assert selection['epoch'] in (1, 2) and 0 <= selection['value'] <= 1
  page = html.unescape((workdir / 'report.html').read_text())
  assert (
      page.count('data:image/png;base64,') == len(run_report.FIGURES)
      and '"num_repeats": 2' in page
  )
  for figure in run_report.FIGURES:
    assert (workdir / figure).stat().st_size > 10_000, figure

  # A second run finds every stage finished and rebuilds the same table without training.
  assert protocol.run(config, str(workdir)) == table
  # The report command rebuilds it from the predictions files alone.
  before = (workdir / 'table.csv').read_text()
  (workdir / 'table.csv').unlink()
  subprocess.run(
      [sys.executable, '-m', 'pcrjax.report', f'--workdir={workdir}'],
      cwd=REPO,
      check=True,
      capture_output=True,
      timeout=300,
  )
  assert (workdir / 'table.csv').read_text() == before

  # On a full disk the report stops at its first file, naming it, and leaves every file whole.
  full = pathlib.Path(small_disk.path) / 'table'
  shutil.copytree(
      workdir, full, ignore=shutil.ignore_patterns('checkpoints', 'events.*')
  )
  small_disk.fill()
  digest = _tree_digest(full)
  with pytest.raises(OSError) as error:
    run_report.build(str(full))
  assert error.value.errno == errno.ENOSPC and error.value.filename.startswith(
      str(full)
  )
  assert _tree_digest(full) == digest

  # Comparing two runs: a run against itself differs by nothing; against a copy whose student
  # predictions were replaced by a much better ranking, the student row shows it.
  same = run_comparison.compare(str(workdir), str(workdir))
  assert all(r['difference'] == 0 and r['p'] == 1 for r in same)
  better = tmp_path / 'better'
  shutil.copytree(workdir, better)
  for path in better.glob('repeat_*/fold_*/student/predictions_test.csv'):
    rows = runs.read_predictions(str(path))
    runs.write_predictions(
        str(path), [{**r, 'prob': 0.2 + 0.6 * r['label']} for r in rows]
    )
  rows = {
      r['model']: r for r in run_comparison.compare(str(workdir), str(better))
  }
  assert rows['student']['auroc_b'] == 1.0 and rows['student']['p'] < 0.05
  assert rows['baseline']['difference'] == 0


@pytest.mark.parametrize(
    'num_rows, batch_size, multiple, batches',
    [
        (82, 16, 1, (6, 14)),
        (82, 32, 1, (3, 28)),
        (103, 16, 1, (7, 15)),
        (30, 8, 4, (4, 8)),
        (5, 32, 2, (1, 6)),
    ],
)
def test_eval_batches_pad_the_validation_split_by_less_than_a_batch(
    num_rows, batch_size, multiple, batches
):
  assert train.eval_batches(num_rows, batch_size, multiple) == batches


@pytest.mark.parametrize(
    'num_rows, batches, calls', [(82, (6, 14), 1), (103, (6, 14), 2)]
)
def test_predict_calls_evaluations_of_one_shape(num_rows, batches, calls):
  values = jnp.arange(1000, dtype=jnp.float32) / 1000
  rows = np.random.default_rng(0).permutation(1000)[:num_rows]
  seen = []

  def eval_fn(params, examples, batch):
    seen.append(batch.shape)
    return {'probability': examples['x'][batch] + params}

  probs = train.predict(
      eval_fn,
      0.0,
      {'x': values},
      rows,
      batches=batches,
      put=jnp.asarray,
  )['probability']
  assert seen == [batches] * calls
  np.testing.assert_array_equal(probs, np.asarray(values)[rows])


def _scaled_logit(
    variables, images, visit_mask, clinical, kinetics, tumour, train
):
  del visit_mask, clinical, kinetics, tumour, train
  return {'logit': variables['params'] * images}


def test_eval_step_runs_every_batch_and_scores_it_as_log_loss():
  rng = np.random.default_rng(0)
  examples = {
      name: jnp.zeros(12)
      for name in ('visit_mask', 'clinical', 'kinetics', 'tumour')
  }
  examples['images'] = jnp.asarray(rng.normal(size=12), jnp.float32)
  labels = np.arange(12) % 2
  examples['label'] = jnp.asarray(labels, jnp.int32)
  rows = np.array([[3, 1, 7, 0], [11, 2, 5, 9]], np.int32)

  out = train.eval_step(_scaled_logit, 2.0, examples, rows)

  assert out['probability'].shape == out['bce'].shape == rows.shape
  probs = expit(2.0 * np.asarray(examples['images'], np.float64)[rows])
  np.testing.assert_allclose(out['probability'], probs, rtol=1e-6)
  assert float(out['bce'].mean()) == pytest.approx(
      metrics.log_loss(labels[rows].ravel(), probs.ravel()), rel=1e-6
  )
