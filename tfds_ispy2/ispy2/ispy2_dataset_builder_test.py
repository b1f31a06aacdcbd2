"""The `ispy2` builder: a real build into a temporary data_dir, read back as an ArrayRecord data source;
and TFDS's own builder test over dummy_data/ where TensorFlow is installed."""

import os
import pathlib
import shutil
import tempfile

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import dataset_metadata

from tfds_ispy2.ispy2 import ispy2_dataset_builder, phantom, schema

TINY = ispy2_dataset_builder.Ispy2Config(
    name='synthetic_tiny',
    description='6 patients on a 6x24x24 grid, for this test.',
    phantom=phantom.PhantomSpec(
        num_patients=6, shape=(6, 24, 24), spacing_mm=(6.0, 5.0, 5.0)
    ),
)

FEATURES = {
    'patient_id',
    'images',
    'visit_mask',
    'tumor_mask',
    'pcr',
    'subtype',
    'arm',
    'spacing_mm',
    'phase_times_s',
}


def test_build_writes_one_array_record_example_per_patient(tmp_path):
  builder = ispy2_dataset_builder.Builder(
      config=TINY, data_dir=str(tmp_path), file_format='array_record'
  )
  builder.download_and_prepare(file_format='array_record')
  shards = [f for f in os.listdir(builder.data_dir) if '.array_record' in f]
  assert shards, os.listdir(builder.data_dir)
  assert builder.info.splits['train'].num_examples == 6
  assert (
      set(builder.info.features.keys()) == FEATURES
  )  # Nothing beyond the contract (privacy).

  source = builder.as_data_source(split='train')
  records = {
      r['patient_id'].decode(): r
      for r in (source[i] for i in range(len(source)))
  }
  assert sorted(records) == [phantom.patient_id(i) for i in range(6)]
  for index in range(6):
    record, expected = records[
        phantom.patient_id(index)
    ], phantom.render_patient(TINY.phantom, index)
    assert record['images'].dtype == np.float16 and record['images'].shape == (
        4,
        3,
        6,
        24,
        24,
    )
    assert (
        record['tumor_mask'].dtype == np.uint8
        and record['visit_mask'].dtype == np.bool_
    )
    for key in (
        'images',
        'tumor_mask',
        'visit_mask',
        'spacing_mm',
        'phase_times_s',
    ):
      np.testing.assert_array_equal(record[key], expected[key], err_msg=key)
    assert (record['pcr'], record['subtype']) == (
        expected['pcr'],
        expected['subtype'],
    )
    assert record['arm'].decode() == expected['arm']
  assert builder.info.features['pcr'].names == ['non_pcr', 'pcr']
  assert builder.info.features['subtype'].names == list(schema.SUBTYPES)
  # The phantom's truth is in the metadata read back with the dataset (metadata.json), not a record.
  reloaded = ispy2_dataset_builder.Builder(config=TINY, data_dir=str(tmp_path))
  assert reloaded.info.metadata[phantom.ORACLE_TRUTH] == {
      phantom.patient_id(i): phantom.oracle_truth(
          phantom.simulate_patient(TINY.phantom, i)
      )
      for i in range(6)
  }


def test_registered_configs():
  builder_cls = tfds.builder_cls('ispy2')
  assert builder_cls is ispy2_dataset_builder.Builder
  names = [c.name for c in builder_cls.BUILDER_CONFIGS]
  assert (
      names[0] == 'synthetic' == builder_cls.DEFAULT_CONFIG_NAME
      and 'synthetic_smoke' in names
  )
  # The phantom's configs carry the truth from 1.1.0 on; `tcia` has none, and stays at 1.0.0.
  for name in names:
    builder = tfds.builder(f'ispy2/{name}')
    synthetic = builder.builder_config.phantom is not None
    assert str(builder.version) == ('1.1.0' if synthetic else '1.0.0'), name
    assert str(builder.version) in builder.release_notes, name
    assert (builder.info.metadata is not None) == synthetic, name


def test_tags_are_tfds_tags():
  tags = tfds.builder_cls('ispy2').get_metadata().tags
  assert tags and set(tags) <= set(dataset_metadata.valid_tags())


# --- The `tcia` config, on a TCIA-like DICOM tree written with pydicom (tcia_fixtures). -------------

import json  # noqa: E402

import pytest  # noqa: E402

from fake_data import tcia_fixtures  # noqa: E402
from tfds_ispy2.ispy2 import tcia, tcia_cache  # noqa: E402
from tfds_ispy2.ispy2 import tcia_build as build_steps  # noqa: E402  (tcia_build: a fixture)


def _build_tcia(manual_dir, data_dir, download_config=None, **kwargs):
  builder = tfds.builder(
      'ispy2/tcia', data_dir=str(data_dir), file_format='array_record', **kwargs
  )
  builder.download_and_prepare(
      file_format='array_record',
      download_config=download_config
      or tfds.download.DownloadConfig(manual_dir=str(manual_dir)),
  )
  return builder


def _records(builder):
  source = builder.as_data_source(split='train')
  return {
      r['patient_id'].decode(): r
      for r in (source[i] for i in range(len(source)))
  }


@pytest.fixture(scope='module')
def tcia_build(tcia_tree, tmp_path_factory):
  root, truth = tcia_tree
  builder = _build_tcia(root, tmp_path_factory.mktemp('tfds'))
  return builder, _records(builder), truth


def test_tcia_records_match_the_ground_truth(tcia_build):
  builder, records, truth = tcia_build
  expected = {pid for pid, t in truth.items() if t.expected_skip is None}
  assert set(records) == expected
  spec = builder.builder_config.tcia
  voxel_mm3 = float(np.prod(spec.target_spacing_mm))
  for pid in expected:
    record, t = records[pid], truth[pid]
    assert record['images'].shape == (4, 3) + tuple(spec.crop_shape)
    assert (record['pcr'], record['subtype'], record['arm'].decode()) == (
        t.pcr,
        t.subtype,
        t.arm,
    )
    np.testing.assert_array_equal(
        record['visit_mask'], t.visit_mask, err_msg=pid
    )
    np.testing.assert_allclose(
        record['phase_times_s'], t.phase_times_s, atol=0.01, err_msg=pid
    )
    np.testing.assert_allclose(record['spacing_mm'], spec.target_spacing_mm)
    for v in np.flatnonzero(t.visit_mask):
      mask = record['tumor_mask'][v] == schema.TUMOUR
      # The Analysis Mask's FTV, resampled to 2x1x1 mm, keeps its volume (20 %; small tumours suffer
      # the partial volume of 5 mm slices) and sits at the crop's centre. (PE >= 70 %: other tests.)
      if (
          t.mask_source[v].startswith('analysis_mask')
          and t.ftv_volume_mm3[v] >= 1000
      ):
        assert mask.sum() * voxel_mm3 == pytest.approx(
            t.ftv_volume_mm3[v], rel=0.2
        ), (pid, v)
        centre = np.argwhere(mask).mean(0)
        assert np.all(
            np.abs(centre - (np.array(spec.crop_shape) - 1) / 2) <= 1.5
        ), (pid, v, centre)
        # The tumour enhances: early > 1.7 x pre on average inside the mask (PE >= 70 %).
        pre, early = (
            record['images'][v, p].astype(np.float32)[mask > 0].mean()
            for p in (0, 1)
        )
        assert early > 1.7 * pre, (pid, v)
    assert not record['images'][~record['visit_mask']].any()


def test_tcia_build_report_counts_every_skip_and_holds_no_phi(tcia_build):
  builder, records, truth = tcia_build
  report_path = pathlib.Path(builder.data_dir) / 'build_report.json'
  report = json.loads(report_path.read_text())
  skips = [t.expected_skip for t in truth.values() if t.expected_skip]
  assert report['patients_written'] == len(records)
  assert report['skips_by_reason'] == {r: skips.count(r) for r in set(skips)}
  sources = [
      s
      for pid, t in truth.items()
      if t.expected_skip is None
      for s in t.mask_source
      if s
  ]
  assert report['visits_by_mask_source'] == {
      s: sources.count(s) for s in tcia.MASK_SOURCES
  }
  assert {
      w['patient_id']: tuple(w['mask_source']) for w in report['written']
  } == {
      pid: t.mask_source for pid, t in truth.items() if t.expected_skip is None
  }  # per visit
  assert {s['patient_id'] for s in report['skipped']} == {
      pid for pid, t in truth.items() if t.expected_skip
  }
  missing = {
      (pid, v)
      for pid, t in truth.items()
      if t.expected_skip is None
      for v in range(4)
      if not t.visit_mask[v] and t.visit_reasons[v] not in (None, 'no_study')
  }
  reported = {
      (i['patient_id'], i['visit'])
      for i in report['issues']
      if i['visit'] is not None
  }
  assert missing <= reported
  phi = {s for t in truth.values() for s in t.phi}
  texts = [report_path.read_text()] + [
      (pathlib.Path(builder.data_dir) / name).read_text()
      for name in ('dataset_info.json', 'features.json')
  ]
  texts += [
      r['arm'].decode() + r['patient_id'].decode() for r in records.values()
  ]
  for text in texts:
    assert not [s for s in phi if s in text]


def test_tcia_skips_can_be_fatal(tcia_tree, tmp_path):
  root, _ = tcia_tree
  with pytest.raises(RuntimeError, match='would be skipped .*skips_are_fatal'):
    _build_tcia(root, tmp_path, skips_are_fatal=True)


def test_interrupted_tcia_build_resumes_with_the_same_records(
    tcia_tree, tcia_build, tmp_path
):
  root, _ = tcia_tree
  _, first_records, _ = tcia_build
  # An interrupted build: half of the patients were processed (and cached) before it stopped.
  patients, _ = tcia.discover(root)
  clinical = tcia.read_clinical(root)
  cache_dir = tmp_path / 'downloads' / 'ispy2_tcia_cache'
  cache_dir.mkdir(parents=True)
  done = sorted(patients)[: len(patients) // 2]
  for pid in done:
    tcia_cache.process_patient_cached(
        (patients[pid], clinical.get(pid), tcia.TciaSpec(), str(cache_dir))
    )
  before = {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()}
  assert len(before) == len(done)

  records = _records(_build_tcia(root, tmp_path))
  after = {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()}
  assert len(after) == len(patients) and all(
      after[name] == t for name, t in before.items()
  )
  assert records.keys() == first_records.keys()
  for pid, record in records.items():
    for key in ('images', 'tumor_mask', 'visit_mask', 'phase_times_s'):
      np.testing.assert_array_equal(
          record[key], first_records[pid][key], err_msg=f'{pid} {key}'
      )


def test_the_pool_fits_the_largest_series_in_the_available_memory(monkeypatch):
  """One worker per core while each can hold the largest series (WORKER_BYTES) beside the building
  process; $ISPY2_WORKERS when the user sets it."""
  monkeypatch.delenv(build_steps.WORKERS_ENV, raising=False)
  gib = 1 << 30
  assert (
      build_steps.pool_size(cores=2, available=24 * gib)[0] == 2
  )  # 2 cores, 24 GB: both
  assert build_steps.pool_size(cores=64, available=24 * gib) == (
      15,
      '64 cores, 24.0 GiB available at 1.5 GiB per worker',
  )  # (24 - 1) / 1.5
  assert build_steps.pool_size(cores=16, available=gib)[0] == 1
  assert build_steps.available_memory() > build_steps.WORKER_BYTES
  monkeypatch.setenv(build_steps.WORKERS_ENV, '3')
  assert build_steps.pool_size(cores=64, available=gib) == (3, '$ISPY2_WORKERS')


def test_tcia_manual_dir_errors_say_what_was_expected(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(
      AssertionError, match='ISPY2-Imaging-Cohort-1-Clinical-Data.xlsx'
  ):
    _build_tcia(empty, tmp_path / 'a')
  wrong = tmp_path / 'wrong'
  wrong.mkdir()
  (wrong / 'notes.txt').write_text('not a DICOM file')
  with pytest.raises((FileNotFoundError, ValueError), match='DICOM'):
    _build_tcia(wrong, tmp_path / 'b')


def test_tcia_records_feed_the_training_pipeline(tcia_build):
  """Every experiment runs on real data by changing data.dataset: the records have the same form."""
  from pcrjax import input_pipeline  # The consumer of these records.

  _, records, _ = tcia_build
  record = next(r for r in records.values() if r['visit_mask'][:2].all())
  for representation, shape in (
      ('mip', (2, 24, 24, 3)),
      ('volume', (2, 8, 24, 24, 3)),
  ):
    out = input_pipeline.represent(
        record,
        time_points=(0, 1),
        representation=representation,
        crop_size=(8, 24, 24),
    )
    assert out['images'].shape == shape and np.isfinite(out['images']).all()
    # The tumour enhances at the centre of the tumour-centred crop (early - pre channel).
    subtraction = out['images'][0, ..., 1]
    assert subtraction[tuple(s // 2 for s in shape[1:-1])] > np.median(
        subtraction
    )


@pytest.mark.parametrize('dataset', ['ispy2/tcia', 'FOLDER'])
def test_tfds_build_command_on_dummy_data(tmp_path, dataset):
  """The `tfds build` command as users type it (through tfds_ispy2.build: no TensorFlow needed).

  From any working directory, with the dataset given by name or by its folder and `--config`.
  """
  import subprocess
  import sys

  folder = pathlib.Path(__file__).parent
  args = (
      ['ispy2/tcia']
      if dataset == 'ispy2/tcia'
      else [str(folder), '--config=tcia']
  )
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  subprocess.run(
      [
          sys.executable,
          '-m',
          'tfds_ispy2.build',
          *args,
          f'--manual_dir={folder / "dummy_data"}',
          f'--data_dir={tmp_path}',
          '--file_format=array_record',
      ],
      cwd=cwd,
      check=True,
      capture_output=True,
      timeout=600,
  )
  builder = tfds.builder('ispy2/tcia', data_dir=str(tmp_path))
  report = json.loads(
      (pathlib.Path(builder.data_dir) / 'build_report.json').read_text()
  )
  written = {
      pid for pid, case in _dummy_truth().items() if case.expected_skip is None
  }
  assert set(_records(builder)) == written
  assert (
      report['patients_written'] == len(written)
      and report['patients_skipped'] >= 1
  )


def test_importing_the_package_registers_the_builder(tmp_path):
  """`import tfds_ispy2`, as `import tensorflow_datasets`, is all that `tfds.builder('ispy2')` needs."""
  import subprocess
  import sys

  code = 'import tensorflow_datasets as tfds, tfds_ispy2; print(tfds.builder_cls("ispy2").__module__)'
  out = subprocess.run(
      [sys.executable, '-c', code],
      cwd=tmp_path,
      check=True,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert out.stdout.strip() == 'tfds_ispy2.ispy2.ispy2_dataset_builder'


def _dummy_truth():
  """The ground truth of dummy_data/ (re-rendered in memory: the writer is deterministic)."""
  import tempfile

  with tempfile.TemporaryDirectory() as root:
    return tcia_fixtures.write_tcia_tree(root, tcia_fixtures.DUMMY_CASES)


# A user's build code at top level, without `if __name__ == '__main__':` (the TFDS docs' pattern).
_UNGUARDED_BUILD = """
import os
import tensorflow_datasets as tfds
import tfds_ispy2
from tfds_ispy2.ispy2 import ispy2_dataset_builder, phantom
data_dir = os.environ['BUILD_DATA_DIR']
tfds.builder('ispy2/tcia', data_dir=data_dir, file_format='array_record').download_and_prepare(
    file_format='array_record',
    download_config=tfds.download.DownloadConfig(manual_dir=os.environ['BUILD_MANUAL_DIR']))
tiny = ispy2_dataset_builder.Ispy2Config(
    name='synthetic_tiny', phantom=phantom.PhantomSpec(num_patients=6, shape=(6, 24, 24),
                                                       spacing_mm=(6.0, 5.0, 5.0)))
ispy2_dataset_builder.Builder(config=tiny, data_dir=data_dir).download_and_prepare(
    file_format='array_record')
print('built')
"""


@pytest.mark.parametrize('caller', ['script', 'stdin', 'notebook'])
def test_builds_run_from_unguarded_code(
    caller, tcia_tree, tcia_build, tmp_path, monkeypatch
):
  """The pool's workers do not re-import the caller's `__main__`: same records from anywhere."""
  import subprocess
  import sys

  root, _ = tcia_tree
  monkeypatch.setenv('BUILD_MANUAL_DIR', str(root))
  monkeypatch.setenv('BUILD_DATA_DIR', str(tmp_path / 'tfds'))
  if caller == 'notebook':
    import nbclient
    import nbformat

    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(_UNGUARDED_BUILD)]
    )
    nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name='python3',
        resources={'metadata': {'path': str(tmp_path)}},
    ).execute()
    stdout = ''.join(
        o['text']
        for o in notebook.cells[0].outputs
        if o.get('name') == 'stdout'
    )
    assert stdout.split()[-1] == 'built', notebook.cells[0].outputs
  else:
    script = tmp_path / 'build_ispy2.py'
    script.write_text(_UNGUARDED_BUILD)
    command, stdin = (
        ([sys.executable, str(script)], None)
        if caller == 'script'
        else ([sys.executable, '-'], _UNGUARDED_BUILD)
    )
    out = subprocess.run(
        command,
        input=stdin,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert (
        out.returncode == 0 and out.stdout.split()[-1] == 'built'
    ), out.stderr[-3000:]

  records = _records(
      tfds.builder('ispy2/tcia', data_dir=str(tmp_path / 'tfds'))
  )
  _, expected, _ = tcia_build
  assert records.keys() == expected.keys()
  for pid, record in records.items():
    np.testing.assert_array_equal(
        record['images'], expected[pid]['images'], err_msg=pid
    )
  tiny = ispy2_dataset_builder.Builder(
      config=TINY, data_dir=str(tmp_path / 'tfds')
  )
  source = tiny.as_data_source(split='train')
  assert sorted(
      source[i]['patient_id'].decode() for i in range(len(source))
  ) == [phantom.patient_id(i) for i in range(6)]


def test_tcia_build_on_beam_gives_the_local_records_and_report(
    tcia_tree, tcia_build, tmp_path, monkeypatch
):
  """TFDS given a Beam runner (here the DirectRunner) builds through `tcia_build.beam_pipeline`."""
  import apache_beam as beam

  pipelines = []
  real_pipeline = build_steps.beam_pipeline
  monkeypatch.setattr(
      build_steps,
      'beam_pipeline',
      lambda *a, **k: pipelines.append(1) or real_pipeline(*a, **k),
  )
  root, _ = tcia_tree
  builder = _build_tcia(
      root,
      tmp_path,
      download_config=tfds.download.DownloadConfig(
          manual_dir=str(root), beam_runner=beam.runners.DirectRunner()
      ),
  )
  local_builder, local, _ = tcia_build
  records = _records(builder)
  assert records.keys() == local.keys()
  for pid, record in records.items():
    for key in FEATURES - {'patient_id'}:
      np.testing.assert_array_equal(
          record[key], local[pid][key], err_msg=f'{pid} {key}'
      )
  report, local_report = (
      build_steps.untimed(
          json.loads(
              (pathlib.Path(b.data_dir) / 'build_report.json').read_text()
          )
      )
      for b in (builder, local_builder)
  )
  assert report == local_report and pipelines == [1]


# --- TFDS's own builder test over dummy_data/. Its base class is TensorFlow's tf.test.TestCase (and
# tfds.testing imports dill): it runs where those are installed, which this project does not need.
try:
  _DatasetBuilderTestCase = (
      tfds.testing.DatasetBuilderTestCase
  )  # imported on first use
except ImportError as missing:
  _DatasetBuilderTestCase = None
  _MISSING = (
      f'tfds.testing.DatasetBuilderTestCase cannot be imported: {missing}'
  )

if _DatasetBuilderTestCase is None:

  def test_tfds_dataset_builder_test_case():
    pytest.skip(_MISSING)

else:

  class TciaDummyDataTest(_DatasetBuilderTestCase):
    """Registration, info, tags, and a build of dummy_data/ read back, on the `tcia` config (the
    phantom's configs need no test data, and the tests above build them)."""

    DATASET_CLASS = ispy2_dataset_builder.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ['tcia']
    SPLITS = {
        'train': 5
    }  # dummy_data/ holds 6 patients, one of whom is skipped
    MOCK_OUT_FORBIDDEN_OS_FUNCTIONS = (
        False  # the reader walks the manual dir with `os`
    )
    # TFDS passes dummy_data/ as the download dir too, where a build caches its patients: the test
    # reads a copy, made here because collecting the class already fixes its `dummy_data`.
    EXAMPLE_DIR = shutil.copytree(
        pathlib.Path(__file__).parent / 'dummy_data',
        pathlib.Path(tempfile.mkdtemp()) / 'dummy_data',
    )

    @classmethod
    def tearDownClass(cls):
      shutil.rmtree(pathlib.Path(cls.EXAMPLE_DIR).parent)
      super().tearDownClass()
