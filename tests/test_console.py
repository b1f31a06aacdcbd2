"""Where log lines go: the run's log file, the console."""

import logging as std_logging
import os

from absl import logging

from pcrjax import console


def _log(level: int, path: str, message: str) -> None:
  absl_logger = logging.get_absl_logger()
  absl_logger.handle(
      absl_logger.makeRecord('absl', level, path, 1, message, None, None)
  )


def test_orbax_info_lines_stay_out_of_the_log_file(tmp_path):
  console.setup()
  site = os.path.join(os.sep, 'venv', 'site-packages')
  orbax = os.path.join(site, 'orbax', 'checkpoint', 'checkpoint_manager.py')
  tfds = os.path.join(site, 'tensorflow_datasets', 'core', 'reader.py')
  log = tmp_path / 'log.txt'
  with console.log_to(str(log)):
    _log(std_logging.INFO, orbax, 'orbax saving')
    _log(std_logging.WARNING, orbax, 'orbax warning')
    _log(std_logging.INFO, tfds, 'tfds loading')
  text = log.read_text()
  assert 'orbax saving' not in text
  assert 'orbax warning' in text and 'tfds loading' in text
