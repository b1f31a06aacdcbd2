"""Entry point: `python -m pcrjax.main --config=experiments/<x>.py[:smoke] --workdir=DIR`.

A config with `stage = 'protocol'` runs the paper's whole comparison (pcrjax.protocol); any other
stage trains one model on one fold (pcrjax.train).
"""

import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

from pcrjax import configs, protocol, train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, predictions and reports.')
config_flags.DEFINE_config_file('config', None, 'An experiments/*.py config file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_library_info(record) -> bool:
  """Keeps Orbax's and TFDS's per-file INFO lines out of the run log (their warnings stay)."""
  return record.levelno >= std_logging.WARNING or not any(
      f'/{library}/' in record.pathname for library in ('orbax', 'tensorflow_datasets'))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_quiet_library_info)
  config = FLAGS.config
  try:
    configs.validate(config)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  logging.info('Config:\n%s', config)
  if config.stage == 'protocol':
    protocol.run(config, FLAGS.workdir)
  else:
    train.train_and_evaluate(config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
