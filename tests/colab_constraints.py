"""Writes a Colab runtime's versions of the packages pcrjax shares with it (tests/colab-*.txt).

Colab publishes each runtime's `pip freeze` in github.com/googlecolab/backend-info
(`pip-freeze.gpu.txt`, `pip-freeze.tpu.txt`). This resolves what `pip install .` needs, plus what
runs the notebook headless (nbclient, ipykernel) and, where the runtime has TensorFlow, its CPU build,
with the whole freeze as constraints, in a fresh venv of Colab's Python, then keeps the freeze's
line of every resolved package that the freeze holds. tests/test_colab.py installs these lines,
then pcrjax, and checks that pip replaced none of them.

  python -m tests.colab_constraints --runtime=gpu --python=python3.13 \
      --freeze=https://raw.githubusercontent.com/googlecolab/backend-info/COMMIT/pip-freeze.gpu.txt \
      --source='googlecolab/backend-info COMMIT (DATE)'
"""

import argparse
import datetime
import json
import pathlib
import re
import subprocess
import tempfile
import urllib.request

from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parents[1]
# What the notebook test runs in the venv, besides pcrjax.
NOTEBOOK_TOOLS = ('nbclient', 'ipykernel')


def path(runtime: str) -> pathlib.Path:
  return ROOT / 'tests' / f'colab-{runtime}-constraints.txt'


def read_pins(lines) -> dict[str, str]:
  """{normalised name: 'Name==version'} of the `==` lines (a freeze's URL lines are not on PyPI)."""
  pins = {}
  for line in lines:
    line = line.split('#', 1)[0].strip()
    if re.fullmatch(r'[A-Za-z0-9_.-]+==\S+', line):
      pins[canonicalize_name(line.split('==')[0])] = line
  return pins


def python_version(pins_file: pathlib.Path) -> str:
  """The Python of a constraints file (its `# python: X.Y` line)."""
  (version,) = re.findall(r'^# python: (\S+)$', pins_file.read_text(), re.M)
  return version


def _resolve(
    python: str, freeze: dict[str, str], extra: list[str]
) -> dict[str, str]:
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    (tmp / 'freeze.txt').write_text('\n'.join(freeze.values()) + '\n')
    subprocess.run([python, '-m', 'venv', str(tmp / 'venv')], check=True)
    subprocess.run(
        [
            str(tmp / 'venv/bin/pip'),
            'install',
            '--dry-run',
            '--quiet',
            '--report',
            str(tmp / 'report.json'),
            '-c',
            str(tmp / 'freeze.txt'),
            str(ROOT),
            *extra,
        ],
        check=True,
    )
    report = json.loads((tmp / 'report.json').read_text())
  return {
      canonicalize_name(item['metadata']['name']): item['metadata']['version']
      for item in report['install']
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
      '--runtime', required=True, help='gpu or tpu: names the output file.'
  )
  parser.add_argument(
      '--freeze', required=True, help="The runtime's pip freeze: a path or URL."
  )
  parser.add_argument(
      '--source',
      required=True,
      help='Where the freeze comes from, with its date.',
  )
  parser.add_argument(
      '--python',
      default='python3',
      help="An interpreter of Colab's Python version.",
  )
  args = parser.parse_args()
  if re.match(r'https?://', args.freeze):
    with urllib.request.urlopen(args.freeze) as response:
      freeze = read_pins(response.read().decode().splitlines())
  else:
    freeze = read_pins(pathlib.Path(args.freeze).read_text().splitlines())
  extra = list(NOTEBOOK_TOOLS)
  if (
      'tensorflow' in freeze
  ):  # Colab's build needs a GPU driver; the CPU build is the same version.
    freeze['tensorflow-cpu'] = (
        'tensorflow-cpu==' + freeze['tensorflow'].split('==')[1]
    )
    extra.append(freeze['tensorflow-cpu'])
  resolved = _resolve(args.python, freeze, extra)
  version = subprocess.run(
      [args.python, '-c', 'import sys; print("%d.%d" % sys.version_info[:2])'],
      capture_output=True,
      text=True,
      check=True,
  ).stdout.strip()
  lines = sorted(freeze[name] for name in resolved if name in freeze)
  header = [
      f"# Colab's {args.runtime.upper()} runtime: the versions of the packages that pcrjax, "
      'the headless notebook and TensorFlow need and Colab has.',
      f'# From {args.source}; written by `python -m tests.colab_constraints` on '
      f'{datetime.date.today()}.',
      f'# python: {version}',
  ]
  path(args.runtime).write_text('\n'.join(header + lines) + '\n')
  print(
      f'{path(args.runtime)}: {len(lines)} packages; not in Colab: '
      f'{", ".join(sorted(n for n in resolved if n not in freeze))}'
  )


if __name__ == '__main__':
  main()
