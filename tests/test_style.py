"""The tree is formatted (pyink) and lint-free (ruff) as pyproject.toml configures them: CI runs
this suite, so a change that skips the formatter fails there."""

import subprocess
import sys

import pytest

from tests import test_packaging


@pytest.mark.parametrize(
    'command', [('pyink', '--check', '.'), ('ruff', 'check', '.')]
)
def test_the_tree_passes(command):
  result = subprocess.run(
      [sys.executable, '-m', *command],
      cwd=test_packaging.ROOT,
      capture_output=True,
      text=True,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
