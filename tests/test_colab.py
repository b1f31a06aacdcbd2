"""pcrjax on Colab's runtimes: `pip install .` replaces none of Colab's packages, then everything runs.

For each runtime (GPU: with TensorFlow, protobuf 5; TPU: without, protobuf 7), a fresh venv of
Colab's Python holds Colab's versions of every package pcrjax shares with it
(tests/colab-<runtime>-constraints.txt) and, of the packages Colab lacks, setup.py's floors exactly,
so that the floors are what runs here. pcrjax is then installed as users install it, and run from
another directory, on the installed copy. Needs PyPI.
"""

import ast
import csv
import dataclasses
import glob
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
from packaging import requirements
from packaging.utils import canonicalize_name

import tfds_ispy2
from fake_data import tcia_fixtures
from tests import colab_constraints, test_notebook, test_packaging

pytestmark = pytest.mark.slow  # Colab's two runtimes rebuilt as venvs.

ROOT = test_packaging.ROOT
DUMMY_DATA = ROOT / test_packaging.DUMMY_DATA
RUNTIMES = ('gpu', 'tpu')


def _run(args, **kwargs):
  result = subprocess.run(args, capture_output=True, text=True, **kwargs)
  assert (
      result.returncode == 0
  ), f'{args}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}'
  return result


def _interpreter(version: str) -> str:
  """Colab's Python (pyenv's or on PATH); the running one where that version is not installed."""
  candidates = [
      *sorted(
          glob.glob(
              os.path.expanduser(f'~/.pyenv/versions/{version}.*/bin/python3')
          )
      ),
      shutil.which(f'python{version}'),
  ]
  for python in filter(
      None, candidates
  ):  # A pyenv shim is on PATH even where it cannot run.
    if subprocess.run([python, '-c', ''], capture_output=True).returncode == 0:
      return python
  return sys.executable


def floors() -> dict[str, str]:
  """setup.py's install_requires as {normalised name: 'name==floor'}."""
  tree = ast.parse((ROOT / 'setup.py').read_text())
  (node,) = [
      n
      for n in tree.body
      if isinstance(n, ast.Assign) and n.targets[0].id == 'REQUIREMENTS'
  ]
  pins = {}
  for line in ast.literal_eval(node.value):
    requirement = requirements.Requirement(line)
    (spec,) = requirement.specifier
    assert spec.operator == '>=', f'{line}: install_requires holds floors only'
    pins[canonicalize_name(requirement.name)] = (
        f'{requirement.name}=={spec.version}'
    )
  return pins


def _versions(python) -> dict[str, str]:
  listed = json.loads(
      _run(
          [
              python,
              '-m',
              'pip',
              'list',
              '--format=json',
              '--disable-pip-version-check',
          ]
      ).stdout
  )
  return {canonicalize_name(p['name']): p['version'] for p in listed}


@dataclasses.dataclass
class Venv:
  runtime: str
  python: str
  tmp: pathlib.Path
  colab: dict[
      str, str
  ]  # What the venv held before pcrjax: Colab's versions and floors.
  installed: dict[str, str]  # After `pip install .`.
  tfds_error: str  # What `import tensorflow_datasets` said then,
  pcrjax_error: str  # and the last line of what `import pcrjax` said.
  mended: (
      dict[str, str] | None
  )  # After the README's line for Colab's GPU runtime.

  def run(self, *args, cwd=None):
    # Not in the repository: its source tree would shadow the installed copy.
    return _run(
        [self.python, *args],
        timeout=1800,
        cwd=cwd or self.tmp / 'elsewhere',
        env={**os.environ, 'TFDS_DATA_DIR': str(self.tmp / 'tfds')},
    )


@pytest.fixture(scope='module')
def dummy_truth(tmp_path_factory):
  """The ground truth of the shipped dummy download (the writer is deterministic)."""
  return tcia_fixtures.write_tcia_tree(
      tmp_path_factory.mktemp('dummy'), tcia_fixtures.DUMMY_CASES
  )


@pytest.fixture(scope='module', params=RUNTIMES)
def venv(request, tmp_path_factory):
  runtime = request.param
  constraints = colab_constraints.path(runtime)
  pins = colab_constraints.read_pins(constraints.read_text().splitlines())
  tmp = tmp_path_factory.mktemp(f'colab_{runtime}')
  (tmp / 'elsewhere').mkdir()
  _run(
      [
          _interpreter(colab_constraints.python_version(constraints)),
          '-m',
          'venv',
          str(tmp / 'venv'),
      ]
  )
  python = str(tmp / 'venv' / 'bin' / 'python')
  pip = [
      python,
      '-m',
      'pip',
      'install',
      '--quiet',
      '--disable-pip-version-check',
  ]
  preinstalled = [
      *pins.values(),
      *(pin for name, pin in floors().items() if name not in pins),
  ]
  (tmp / 'preinstalled.txt').write_text('\n'.join(preinstalled) + '\n')
  _run([*pip, '-r', str(tmp / 'preinstalled.txt')], timeout=1800)
  colab = _versions(python)
  _run([*pip, str(test_packaging.copy_source(tmp / 'src'))], timeout=1200)
  installed = _versions(python)
  tfds_error, pcrjax_error = (
      subprocess.run(
          [python, '-c', f'import {module}'],
          capture_output=True,
          text=True,
          cwd=tmp / 'elsewhere',
      ).stderr
      for module in ('tensorflow_datasets', 'pcrjax')
  )
  mended = None
  if runtime == 'gpu':
    _run(
        ['bash', '-c', f'. {tmp}/venv/bin/activate && {tfds_ispy2.MEND_TFDS}'],
        cwd=tmp / 'elsewhere',
    )
    mended = _versions(python)
  return Venv(
      runtime,
      python,
      tmp,
      colab,
      installed,
      tfds_error,
      (pcrjax_error.splitlines() or [''])[-1],
      mended,
  )


def test_pip_install_replaces_no_package_of_the_runtime(venv):
  changed = {
      name: (version, venv.installed.get(name))
      for name, version in venv.colab.items()
      if venv.installed.get(name) != version
  }
  assert (
      not changed
  ), f'pip install . replaced {changed} on Colab {venv.runtime}'
  assert set(venv.installed) - set(venv.colab) == {'pcrjax'}
  location = venv.run(
      '-c', 'import pcrjax; print(pcrjax.__file__)'
  ).stdout.strip()
  assert pathlib.Path(location).is_relative_to(venv.tmp / 'venv')


def test_tfds_imports_on_the_tpu_runtime_and_after_the_readme_line_on_the_gpu_runtime(
    venv,
):
  """Colab's GPU freeze pairs tensorflow-metadata 1.21.0 (protobuf 6.31.1 code) with protobuf
  5.29.6: TFDS cannot import there, with or without pcrjax. The README's line mends it and
  replaces that one package; the TPU runtime (protobuf 7) needs nothing."""
  if venv.runtime == 'tpu':
    assert venv.tfds_error == venv.pcrjax_error == '' and venv.mended is None
  else:
    assert (
        'gencode 6.31.1 runtime 5.29.6' in venv.tfds_error
    )  # Gone: drop MEND_TFDS.
    assert venv.pcrjax_error.startswith(
        'ImportError: TFDS cannot work here: Detected incompatible'
    )
    assert venv.pcrjax_error.endswith(f'To mend it: {tfds_ispy2.MEND_TFDS}')
    readme_lines = (ROOT / 'README.md').read_text().splitlines()
    assert tfds_ispy2.MEND_TFDS in readme_lines
    assert (
        tfds_ispy2.MEND_TFDS
        in (ROOT / 'notebooks' / 'pcrjax_colab.py').read_text()
    )
    assert {
        n for n in venv.installed if venv.installed[n] != venv.mended[n]
    } == {'tensorflow-metadata'}
  venv.run('-c', 'import tensorflow_datasets, pcrjax.input_pipeline')


def test_smoke_protocol_then_export_and_predict(venv, dummy_truth):
  workdir = venv.tmp / 'smoke'
  result = venv.run(
      '-m',
      'pcrjax.main',
      f'--config={ROOT / "experiments" / "paper_table.py"}:smoke',
      f'--workdir={workdir}',
      '--config.num_epochs=1',
      '--config.warmup_epochs=0',
      '--config.protocol.num_repeats=1',
  )
  assert (workdir / 'table.csv').exists() and (workdir / 'report.html').exists()
  assert (
      'Traceback' not in result.stderr and 'Warning' not in result.stderr
  ), result.stderr[-3000:]
  venv.run(
      '-m', 'pcrjax.export', f'--run={workdir}', f'--out={venv.tmp / "model"}'
  )
  with open(
      workdir / 'ftv.csv'
  ) as f:  # A patient with a T1 (the cohort has some without).
    patient = next(
        r['patient_id'] for r in csv.DictReader(f) if r['ftv_T1_mm3'] != 'nan'
    )
  venv.run(
      '-m',
      'pcrjax.predict',
      f'--model={venv.tmp / "model"}',
      f'--out={venv.tmp / "out"}',
      f'--record=ispy2/synthetic_smoke:{patient}',
      f'--data_dir={venv.tmp / "tfds"}',
  )
  prediction = json.loads((venv.tmp / 'out' / 'prediction.json').read_text())
  assert (
      prediction['patient_id'] == patient and 0 < prediction['probability'] < 1
  )

  # From DICOM: the shipped dummy download (pydicom, SimpleITK, highdicom at these versions).
  venv.run(
      '-m',
      'pcrjax.predict',
      f'--model={venv.tmp / "model"}',
      f'--out={venv.tmp / "batch"}',
      f'--dicom={DUMMY_DATA / "ISPY2"}',
  )
  with open(venv.tmp / 'batch' / 'predictions.csv') as f:
    predicted = {
        row['patient_id'] for row in csv.DictReader(f) if row['status'] == 'ok'
    }
  assert predicted == {
      pid
      for pid, t in dummy_truth.items()
      if t.visit_mask[0] and t.visit_mask[1]
  }


def test_the_notebook_runs_headless(venv, tmp_path):
  test_notebook.execute_headless(
      venv.python,
      tmp_path,
      {**os.environ, 'TFDS_DATA_DIR': str(venv.tmp / 'tfds')},
  )


def test_the_build_commands_build_the_synthetic_and_the_tcia_configs(
    venv, dummy_truth, tmp_path
):
  """`python -m tfds_ispy2.build` on the TPU runtime (no TensorFlow); on the GPU runtime, `tfds
  build` as typed, by name and from inside the dataset's folder, with the `tfds-cli` extra
  (tensorflow-datasets 4.9.10's `tfds` script imports TensorFlow, Apache Beam and mlcroissant at
  start-up). The `tcia` build reads the shipped dummy download end to end."""
  if venv.runtime == 'tpu':
    build = [venv.python, '-m', 'tfds_ispy2.build']
  else:
    build = [str(pathlib.Path(venv.python).parent / 'tfds'), 'build']
    without_beam = subprocess.run(
        [*build, '--help'], capture_output=True, text=True
    )
    assert (
        "No module named 'apache_beam'" in without_beam.stderr
    )  # Gone: README, 'tfds build'.
    before = _versions(venv.python)
    _run(
        [
            venv.python,
            '-m',
            'pip',
            'install',
            '--quiet',
            f'{venv.tmp / "src"}[tfds-cli]',
        ],
        timeout=1200,
    )
    after = _versions(venv.python)
    assert {n for n in before if before[n] != after[n]} == {
        'pillow',
        'protobuf',
    }  # As the README says.
  folder = (
      venv.tmp / 'src' / 'tfds_ispy2' / 'ispy2'
  )  # In a clone, as a user types it.
  elsewhere = venv.tmp / 'elsewhere'
  for name, args, cwd in (
      ('by_name', ['ispy2/synthetic_smoke', '--imports=tfds_ispy2'], elsewhere),
      ('in_folder', ['--config=synthetic_smoke'], folder),
      (
          'tcia',
          ['ispy2/tcia', '--imports=tfds_ispy2', f'--manual_dir={DUMMY_DATA}'],
          elsewhere,
      ),
  ):
    _run(
        [
            *build,
            *args,
            f'--data_dir={tmp_path / name}',
            '--file_format=array_record',
        ],
        cwd=cwd,
        timeout=1800,
    )
  for name in ('by_name', 'in_folder'):
    (info,) = (tmp_path / name).glob(
        'ispy2/synthetic_smoke/*/dataset_info.json'
    )
    assert json.loads(info.read_text())['splits'][0]['shardLengths'] == ['48']
  (report,) = (tmp_path / 'tcia').glob('ispy2/tcia/*/build_report.json')
  assert json.loads(report.read_text())['patients_written'] == sum(
      t.expected_skip is None for t in dummy_truth.values()
  )


def test_tfds_own_builder_test_passes_where_tensorflow_is(venv):
  """TFDS's DatasetBuilderTestCase (a tf.test.TestCase) over dummy_data/, on the runtime that has
  TensorFlow; the lock's venv has none, where ispy2_dataset_builder_test.py skips it.
  """
  if venv.runtime == 'tpu':
    pytest.skip('TensorFlow is on the GPU runtime only.')
  # Colab's versions of what tfds.testing needs beyond pcrjax's requirements.
  _run(
      [venv.python, '-m', 'pip', 'install', '--quiet']
      + ['pytest==8.4.2', 'dill==0.3.8'],
      timeout=600,
  )
  test = (
      venv.tmp
      / 'src'
      / 'tfds_ispy2'
      / 'ispy2'
      / 'ispy2_dataset_builder_test.py'
  )
  result = venv.run(
      '-m',
      'pytest',
      '-q',
      '-p',
      'no:cacheprovider',
      str(test),
      '-k',
      'TciaDummyDataTest',
  )
  # Its one skip is tf.test.TestCase's `test_session`.
  passed = re.search(r'(\d+) passed', result.stdout)
  assert (
      passed and int(passed.group(1)) >= 5 and 'failed' not in result.stdout
  ), result.stdout[-2000:]
