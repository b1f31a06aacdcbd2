"""Evidence from predictions files: pooling over folds and repeats, recalibration, pairwise tests,
subgroups, and the run contract's registry driving tables, figures and the report.
"""

import csv
import dataclasses
import pathlib
import subprocess
import sys
import zlib

import ml_collections
import numpy as np
import pytest
from scipy.stats import t as student_t
from sklearn.metrics import roc_auc_score

from pcrjax import runs
from pcrjax.evidence import calibration, loading, run_comparison, run_report, tables

REPO = pathlib.Path(__file__).resolve().parents[1]


def _write_model(
    root,
    name,
    *,
    num_repeats=2,
    num_folds=2,
    n=80,
    seed=0,
    signal=1.5,
    overconfident=False,
    fold_seed=None,
):
  """Fake predictions of one model in the protocol's layout; returns (labels, subtypes, arms).

  Models of the same `seed` share their patients and folds, as in a run; `fold_seed` draws other
  folds for the same patients, as a run with another `data.fold_seed` would.
  """
  rng = np.random.default_rng(seed)
  labels = (rng.random(n) < 0.35).astype(int)
  subtypes = np.array(['HR+/HER2-', 'HR-/HER2-', 'HR-/HER2+'])[
      rng.integers(0, 3, n)
  ]
  subtypes[:4] = 'HR+/HER2+'  # A subgroup too small for an AUROC.
  arms = np.array(['A', 'B'])[rng.integers(0, 2, n)]
  noise = np.random.default_rng(
      zlib.crc32(name.encode())
  )  # Per model, the same in every process.
  folds_rng = rng if fold_seed is None else np.random.default_rng(fold_seed)
  for repeat in range(num_repeats):
    fold_of = folds_rng.permutation(n) % num_folds
    logits = signal * (labels - 0.35) + noise.normal(0, 1, n)
    probs = 1 / (1 + np.exp(-(3 * logits if overconfident else logits)))
    for fold in range(num_folds):
      directory = pathlib.Path(runs.stage_dir(str(root), repeat, fold, name))
      directory.mkdir(parents=True)
      for split, rows in (('test', fold_of == fold), ('val', fold_of != fold)):
        runs.write_predictions(
            runs.predictions_path(str(directory), split),
            [
                runs.prediction_row(
                    patient_id=f'P{i:03d}',
                    label=labels[i],
                    prob=probs[i],
                    subtype=subtypes[i],
                    fold=fold,
                    arm=arms[i],
                )
                for i in np.flatnonzero(rows)
            ],
        )
  return labels, subtypes, arms


def _write_config(root, num_repeats=2, num_folds=2):
  config = ml_collections.ConfigDict(
      {
          'seed': 0,
          'protocol': {
              'num_repeats': num_repeats,
              'calibration': 'none',
              'bootstrap_replicates': 200,
          },
          'data': {
              'dataset': 'ispy2/synthetic_smoke',
              'num_folds': num_folds,
              'fold_seed': 0,
              'representation': 'mip',
          },
      }
  )
  runs.write_config(str(root), config)


def test_pooling_over_folds_and_repeats(tmp_path):
  labels, _, _ = _write_model(tmp_path, 'baseline')
  pred = loading.load_predictions(
      str(tmp_path), 'baseline', num_repeats=2, num_folds=2
  )
  assert (
      list(pred.patient_id) == sorted(pred.patient_id)
      and len(pred.patient_id) == 80
  )
  np.testing.assert_array_equal(
      pred.label, labels[np.argsort([f'P{i:03d}' for i in range(80)])]
  )
  assert pred.prob.shape == (2, 80) and not np.allclose(
      pred.prob[0], pred.prob[1]
  )
  np.testing.assert_allclose(pred.mean_prob, pred.prob.mean(0))
  assert pred.fold.shape == (2, 80) and not np.array_equal(
      pred.fold[0], pred.fold[1]
  )
  for repeat in range(2):
    for fold in range(2):
      ids = _test_ids(tmp_path, repeat, fold, 'baseline')
      assert set(pred.patient_id[pred.fold[repeat] == fold]) == set(ids)


def test_recalibration_is_fitted_on_each_folds_validation_split(tmp_path):
  _write_model(tmp_path, 'baseline', overconfident=True)
  raw = loading.load_predictions(
      str(tmp_path), 'baseline', num_repeats=2, num_folds=2
  )
  fitted = loading.load_predictions(
      str(tmp_path),
      'baseline',
      num_repeats=2,
      num_folds=2,
      calibrate='temperature',
  )
  fold_dir = runs.stage_dir(str(tmp_path), 0, 0, 'baseline')
  val = runs.read_predictions(runs.predictions_path(fold_dir, 'val'))
  test = runs.read_predictions(runs.predictions_path(fold_dir, 'test'))
  calibrator = calibration.fit_temperature(
      np.array([p['label'] for p in val]), np.array([p['prob'] for p in val])
  )
  expected = calibrator(np.array([p['prob'] for p in test]))
  got = fitted.prob[0][
      np.searchsorted(fitted.patient_id, [p['patient_id'] for p in test])
  ]
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  # Over-confident predictions: recalibration brings the slope towards 1.
  _, raw_slope = calibration.calibration_intercept_slope(raw.label, raw.prob[0])
  _, new_slope = calibration.calibration_intercept_slope(
      fitted.label, fitted.prob[0]
  )
  assert abs(new_slope - 1) < abs(raw_slope - 1)


def test_subgroups_say_too_few_instead_of_a_number(tmp_path):
  _write_model(tmp_path, 'baseline')
  pred = loading.load_predictions(
      str(tmp_path), 'baseline', num_repeats=2, num_folds=2
  )
  rows = tables.subgroups({'baseline': pred}, seed=0, num_replicates=200)
  small = next(r for r in rows if r['group'] == 'HR+/HER2+')
  assert small['patients'] == 4 and small['auroc'] is None
  for row in rows:
    if row['auroc'] is not None:
      assert (
          min(row['pcr'], row['patients'] - row['pcr']) >= tables.MIN_PER_CLASS
      )
      assert row['ci_low'] <= row['auroc'] <= row['ci_high']
  assert {r['group'] for r in rows if r['kind'] == 'arm'} == {'A', 'B'}


def test_pairwise_tests_pair_patients_and_adjust(tmp_path):
  _write_model(tmp_path, 'baseline')
  base = loading.load_predictions(
      str(tmp_path), 'baseline', num_repeats=2, num_folds=2
  )
  perfect = dataclasses.replace(
      base, prob=np.tile(base.label * 0.8 + 0.1, (2, 1))
  )
  pairs = tables.pairwise_tests(
      {'baseline': base, 'student': perfect, 'ftv': base, 'teacher': perfect}
  )
  by_pair = {(p['a'], p['b']): p for p in pairs}
  assert set(by_pair) == {
      ('baseline', 'student'),
      ('baseline', 'ftv'),
      ('student', 'ftv'),
  }
  first = by_pair[('baseline', 'student')]
  assert first['auroc_b'] == 1.0 and first['difference'] > 0 and first['z'] > 0
  assert (
      first['difference_ci_low']
      < first['difference']
      < first['difference_ci_high']
  )
  assert tables.bottom_line(pairs) is first
  assert by_pair[('baseline', 'ftv')]['p'] == 1.0
  assert all(p['p_holm'] >= p['p'] for p in pairs)
  # Per fold: the perfect model has AUROC 1 on every one of the 2 × 2 test folds.
  base_folds = [
      roc_auc_score(
          base.label[base.fold[r] == k], base.prob[r][base.fold[r] == k]
      )
      for r in range(2)
      for k in range(2)
  ]
  assert (first['repeats'], first['folds'], first['fold_df']) == (2, 2, 3)
  assert first['fold_auroc_b'] == 1.0
  assert first['fold_difference'] == pytest.approx(
      1 - np.mean(base_folds), rel=1e-12
  )
  assert (
      first['fold_difference_ci_low']
      < first['fold_difference']
      < first['fold_difference_ci_high']
  )
  assert by_pair[('baseline', 'ftv')]['fold_p'] == 1.0
  assert all(p['fold_p_holm'] >= p['fold_p'] for p in pairs)
  shuffled = dataclasses.replace(base, label=1 - base.label)
  with pytest.raises(ValueError, match='disagree on the labels'):
    tables.pairwise_tests({'baseline': base, 'student': shuffled})
  # Other folds: nothing to pair per fold; DeLong still compares the patients.
  refolded = dataclasses.replace(base, fold=base.fold[:, ::-1])
  [row] = tables.paired_tests([('baseline', base, 'baseline', refolded)])
  assert row['p'] == 1.0 and row['p_holm'] == 1.0
  assert (
      row['fold_p'] is None
      and row['fold_p_holm'] is None
      and row['fold_difference'] is None
  )


def _test_ids(root, repeat, fold, name):
  return [
      p['patient_id']
      for p in runs.read_predictions(
          runs.predictions_path(
              runs.stage_dir(str(root), repeat, fold, name), 'test'
          )
      )
  ]


def _fold_aurocs(root, name, num_repeats, num_folds):
  """Each (repeat, fold)'s AUROC on its test patients, by sklearn, straight from the files."""
  out = []
  for repeat in range(num_repeats):
    for fold in range(num_folds):
      path = runs.predictions_path(
          runs.stage_dir(str(root), repeat, fold, name), 'test'
      )
      with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
      out.append(
          roc_auc_score(
              [int(r['label']) for r in rows], [float(r['prob']) for r in rows]
          )
      )
  return np.array(out)


def test_per_fold_aurocs_the_corrected_t_test_and_the_bottom_line(tmp_path):
  """table.csv, pairwise.csv and the bottom line against sklearn and the t-test by hand."""
  num_repeats, num_folds = 2, 3
  _write_config(tmp_path, num_repeats=num_repeats, num_folds=num_folds)
  for name, signal in (('baseline', 1.0), ('student', 2.0), ('ftv', 1.5)):
    _write_model(
        tmp_path,
        name,
        num_repeats=num_repeats,
        num_folds=num_folds,
        signal=signal,
    )
  run_report.build(str(tmp_path))
  with open(tmp_path / 'table.csv') as f:
    table = {r['name']: r for r in csv.DictReader(f)}
  folds = {
      name: _fold_aurocs(tmp_path, name, num_repeats, num_folds)
      for name in table
  }
  for name, row in table.items():
    aurocs = folds[name]
    assert int(row['test_folds']) == 6
    assert float(row['auroc_fold_mean']) == pytest.approx(
        aurocs.mean(), rel=1e-9
    )
    assert float(row['auroc_fold_sd']) == pytest.approx(
        aurocs.std(ddof=1), rel=1e-9
    )
    assert float(row['auroc_fold_min']) == pytest.approx(aurocs.min(), rel=1e-9)
    assert float(row['auroc_fold_max']) == pytest.approx(aurocs.max(), rel=1e-9)

  with open(tmp_path / 'pairwise.csv') as f:
    pairs = {(r['a'], r['b']): r for r in csv.DictReader(f)}
  assert set(pairs) == {
      ('baseline', 'student'),
      ('baseline', 'ftv'),
      ('student', 'ftv'),
  }
  expected = {}
  for (a, b), row in pairs.items():
    d = folds[b] - folds[a]
    se = np.sqrt(
        (1 / 6 + 1 / (num_folds - 1)) * d.var(ddof=1)
    )  # J = 6, n_test/n_train = 1/2.
    t = d.mean() / se
    half_width = student_t.ppf(0.975, 5) * se
    expected[a, b] = {
        'fold_auroc_a': folds[a].mean(),
        'fold_auroc_b': folds[b].mean(),
        'fold_difference': d.mean(),
        'fold_t': t,
        'fold_df': 5,
        'fold_p': 2 * student_t.sf(abs(t), 5),
        'fold_difference_ci_low': d.mean() - half_width,
        'fold_difference_ci_high': d.mean() + half_width,
    }
    for key, value in expected[a, b].items():
      assert float(row[key]) == pytest.approx(value, rel=1e-9), (a, b, key)
    assert (int(row['repeats']), int(row['folds'])) == (num_repeats, num_folds)
  # Holm over the three per-fold p-values, by its definition.
  ordered = sorted(pairs, key=lambda pair: expected[pair]['fold_p'])
  running = 0.0
  for i, pair in enumerate(ordered):
    running = min(1.0, max(running, (3 - i) * expected[pair]['fold_p']))
    assert float(pairs[pair]['fold_p_holm']) == pytest.approx(running, rel=1e-9)
  assert (
      table['student']['p_vs_baseline_per_fold']
      == pairs['baseline', 'student']['fold_p_holm']
  )
  assert table['baseline']['p_vs_baseline_per_fold'] == ''

  line = next(
      l
      for l in (tmp_path / 'report.md').read_text().splitlines()
      if l.startswith('**Bottom line:**')
  )
  pooled = {
      k: float(v)
      for k, v in pairs['baseline', 'student'].items()
      if k
      in (
          'auroc_a',
          'auroc_b',
          'difference',
          'difference_ci_low',
          'difference_ci_high',
          'p',
          'p_holm',
      )
  }
  fold = expected['baseline', 'student']
  fold_p_holm = float(pairs['baseline', 'student']['fold_p_holm'])
  assert line == (
      '**Bottom line:** on the same 80 patients (T0+T1), the Student (two-stage dual-task) vs the'
      f" Baseline (single-stage): pooled out-of-fold AUROC {pooled['auroc_b']:.3f} vs"
      f" {pooled['auroc_a']:.3f}, difference {pooled['difference']:+.3f} (DeLong test: 95 % CI"
      f" {pooled['difference_ci_low']:+.3f} to {pooled['difference_ci_high']:+.3f},"
      f" p = {pooled['p']:.3f}); mean AUROC per test fold {fold['fold_auroc_b']:.3f} vs"
      f" {fold['fold_auroc_a']:.3f}, difference {fold['fold_difference']:+.3f} (corrected resampled"
      ' t-test over 2 repeats × 3 folds, which also counts the variation between trainings: 95 % CI'
      f" {fold['fold_difference_ci_low']:+.3f} to {fold['fold_difference_ci_high']:+.3f},"
      f" p = {fold['fold_p']:.3f}). After Holm's adjustment over the 3 pairwise comparisons:"
      f" p = {pooled['p_holm']:.3f} (DeLong) and {fold_p_holm:.3f} (t-test)."
  )
  text = (tmp_path / 'report.md').read_text()
  assert '| AUROC, mean per fold ± SD (range) over 2 × 3 test folds |' in text
  student = next(
      l
      for l in text.splitlines()
      if l.startswith('| Student (two-stage dual-task) |')
  )
  aurocs = folds['student']
  assert (
      f'| {aurocs.mean():.3f} ± {aurocs.std(ddof=1):.3f}'
      f' ({aurocs.min():.3f}–{aurocs.max():.3f}) |'
  ) in student


def test_compare_pairs_folds_only_between_runs_that_share_them(tmp_path):
  runs_dirs = {}
  for run, fold_seed in (('a', None), ('same', None), ('other', 7)):
    runs_dirs[run] = tmp_path / run
    _write_config(runs_dirs[run])
    _write_model(
        runs_dirs[run],
        'baseline',
        fold_seed=fold_seed,
        signal=1.0 if run == 'a' else 2.0,
    )
  [same] = run_comparison.compare(str(runs_dirs['a']), str(runs_dirs['same']))
  [other] = run_comparison.compare(str(runs_dirs['a']), str(runs_dirs['other']))
  assert same['fold_p'] is not None and same['fold_difference'] > 0
  # The same predictions on other folds: the same DeLong test, no per-fold one.
  assert other['fold_p'] is None and (other['difference'], other['p']) == (
      same['difference'],
      same['p'],
  )
  assert "not paired: the runs' folds differ" in run_comparison.render(
      [other], 'a', 'other'
  )
  assert f"| {same['fold_p']:.3g} |" in run_comparison.render(
      [same], 'a', 'same'
  )


def test_predictions_rows_are_checked():
  with pytest.raises(ValueError, match='P1: probability nan'):
    runs.prediction_row(
        patient_id='P1', label=1, prob=float('nan'), subtype='x', fold=0, arm=''
    )
  with pytest.raises(ValueError, match='P2: label 2'):
    runs.prediction_row(
        patient_id='P2', label=2, prob=0.5, subtype='x', fold=0, arm=''
    )


def test_discovery_lists_finished_models_in_table_order(tmp_path):
  for name in ('teacher', 'baseline'):
    _write_model(tmp_path, name)
  _write_model(
      tmp_path, 'student', num_folds=1
  )  # Fold 1 of the student has not finished.
  assert [
      m.name
      for m in runs.finished_models(str(tmp_path), num_repeats=2, num_folds=2)
  ] == ['baseline', 'teacher']
  assert [m.name for m in runs.networks_in_training_order()] == [
      'baseline',
      'teacher',
      'student',
  ]


def test_a_registered_model_reaches_every_part_of_the_report(
    tmp_path, monkeypatch
):
  """One registry entry plus its predictions files: the table, the tests, figures and report."""
  oracle = runs.Model(
      'dummy',
      'Dummy reference (test only)',
      (0, 1),
      runs.REFERENCE,
      True,
      '#8c564b',
  )
  monkeypatch.setattr(runs, 'MODELS', runs.MODELS + (oracle,))
  _write_config(tmp_path)
  for name, signal in (('baseline', 1.0), ('student', 2.0), ('dummy', 6.0)):
    _write_model(tmp_path, name, signal=signal)
  table = run_report.build(str(tmp_path))
  assert [row.name for row in table] == ['baseline', 'student', 'dummy']
  assert table[2].auroc > table[1].auroc > table[0].auroc
  assert table[2].p_vs_baseline is not None
  with open(tmp_path / 'pairwise.csv') as f:
    pairs = {(r['a'], r['b']) for r in csv.DictReader(f)}
  assert pairs == {
      ('baseline', 'student'),
      ('baseline', 'dummy'),
      ('student', 'dummy'),
  }
  for name in ('table', 'operating_points', 'decision_curve', 'subgroups'):
    with open(tmp_path / f'{name}.csv') as f:
      assert 'dummy' in {
          r.get('model', r.get('name')) for r in csv.DictReader(f)
      }, name
  assert (tmp_path / 'predictions_oof_dummy.csv').exists()
  text = (tmp_path / 'report.md').read_text()
  assert (
      text.count('Dummy reference (test only)') >= 5
  )  # Table, operating points, pairs, subgroups.
  assert (
      text.index('**Synthetic data.**')
      < text.index('**Bottom line:**')
      < text.index('## Main table')
      < text.index('roc.png')
      < text.index('## Pairwise')
      < text.index('## Subgroups')
  )
  page = (tmp_path / 'report.html').read_text()
  assert '<table>' in page and page.count('data:image/png;base64,') == len(
      run_report.FIGURES
  )
  for figure in run_report.FIGURES:
    assert (tmp_path / figure).stat().st_size > 10_000, figure


def test_degenerate_calibration_is_flagged_not_printed(tmp_path):
  _write_config(tmp_path)
  _write_model(tmp_path, 'baseline')
  _write_model(tmp_path, 'student', signal=2.0)
  for path in tmp_path.glob(
      'repeat_*/fold_*/student/predictions_*.csv'
  ):  # Bunched predictions.
    rows = runs.read_predictions(str(path))
    runs.write_predictions(
        str(path), [{**r, 'prob': 0.4 + 0.02 * r['prob']} for r in rows]
    )
  table = {row.name: row for row in run_report.build(str(tmp_path))}
  assert table['student'].degenerate and not table['baseline'].degenerate
  line = next(
      l
      for l in (tmp_path / 'report.md').read_text().splitlines()
      if l.startswith(f"| {runs.model('student').label} |")
  )
  assert f'not shown: {table["student"].degenerate}' in line


def _run_without_jax(module, *args):
  """`python -m pcrjax.<module> ARGS` in a process where importing JAX fails."""
  # As if not installed: the import fails and the name stays out of sys.modules (which libraries
  # such as etils read as 'JAX is in use').
  script = (
      'import sys\n'
      'class NoJax:\n'
      '  def find_spec(self, name, path=None, target=None):\n'
      "    if name.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax', 'orbax'):\n"
      "      raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
      'sys.meta_path.insert(0, NoJax())\n'
      'from absl import app\n'
      f'from pcrjax import {module}\n'
      f'sys.argv = {[module, *args]!r}\n'
      f'app.run({module}.main)\n'
  )
  result = subprocess.run(
      [sys.executable, '-c', script],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout


def test_a_finished_run_is_re_reported_without_jax(tmp_path):
  """The evidence imports no JAX: report and compare run where JAX cannot be imported."""
  _write_config(tmp_path)
  for name in ('baseline', 'student'):
    _write_model(tmp_path, name)
  _run_without_jax('report', f'--workdir={tmp_path}')
  assert (tmp_path / 'report.html').exists() and (
      tmp_path / 'table.csv'
  ).exists()
  assert '+0.000' in _run_without_jax(
      'compare', f'--a={tmp_path}', f'--b={tmp_path}'
  )
