"""The wheel ships pcrjax, the TFDS dataset folder and the licence, never the test support (setup.py)."""

import pathlib
import shutil
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
DUMMY_DATA = 'tfds_ispy2/ispy2/dummy_data/'
# Not copied: VCS, environments, outputs and build leftovers (a stale build/ leaks into a wheel).
_TOP_LEVEL_SKIP = {
    '.git',
    '.venv',
    '.pytest_cache',
    'build',
    'dist',
    'workdirs',
    'data',
}


def _ignore(directory, names):
  top = pathlib.Path(directory) == ROOT
  return [
      n
      for n in names
      if (top and n in _TOP_LEVEL_SKIP)
      or n == '__pycache__'
      or n.endswith('.egg-info')
  ]


def copy_source(dest: pathlib.Path) -> pathlib.Path:
  """A copy of the working tree to build from, so that a build writes nothing into the repository."""
  shutil.copytree(ROOT, dest, ignore=_ignore)
  return dest


def build_wheel(tmp_path: pathlib.Path) -> pathlib.Path:
  """The wheel of a copy of the working tree, built in `tmp_path`."""
  src = copy_source(tmp_path / 'src')
  out = tmp_path / 'wheels'
  build = subprocess.run(
      [
          sys.executable,
          '-m',
          'pip',
          'wheel',
          '--no-deps',
          '--no-build-isolation',
          '--disable-pip-version-check',
          '-q',
          '-w',
          str(out),
          str(src),
      ],
      capture_output=True,
      text=True,
  )
  assert (
      build.returncode == 0
  ), build.stderr  # setuptools < 70.1 needs the `wheel` package
  (wheel,) = out.glob('*.whl')
  return wheel


def test_wheel_holds_the_packages_and_no_test_support(tmp_path):
  wheel = build_wheel(tmp_path)
  names = zipfile.ZipFile(wheel).namelist()
  (metadata,) = [n for n in names if n.endswith('.dist-info/METADATA')]
  metadata = zipfile.ZipFile(wheel).read(metadata).decode()
  assert (
      'License: Apache-2.0' in metadata and 'License-File: LICENSE' in metadata
  )
  (licence,) = [
      n for n in names if '.dist-info/' in n and n.endswith('/LICENSE')
  ]
  assert zipfile.ZipFile(wheel).read(licence) == (ROOT / 'LICENSE').read_bytes()

  assert {n.split('/')[0] for n in names if '.dist-info/' not in n} == {
      'pcrjax',
      'tfds_ispy2',
  }
  assert 'pcrjax/__init__.py' in names
  for module in (
      'ispy2_dataset_builder',
      'schema',
      'phantom',
      'geometry',
      'tcia/__init__',
      'tcia/patient',
      'tcia_cache',
  ):
    assert f'tfds_ispy2/ispy2/{module}.py' in names
  assert {'tfds_ispy2/ispy2/TAGS.txt', 'tfds_ispy2/ispy2/CITATIONS.bib'} <= set(
      names
  )
  dummy = {
      str(p.relative_to(ROOT))
      for p in (ROOT / DUMMY_DATA).rglob('*')
      if p.is_file()
  }
  assert dummy and {n for n in names if n.startswith(DUMMY_DATA)} == dummy
  assert not [
      n
      for n in names
      if n.endswith('_test.py')
      or 'tcia_fixtures' in n
      or n.startswith(('fake_data/', 'tests/'))
  ]
