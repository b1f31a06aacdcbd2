"""Entry point: `python -m pcrjax.main --config=experiments/<x>.py[:smoke] --workdir=DIR`.

A config with `stage = 'protocol'` runs the paper's whole comparison (pcrjax.protocol); any other
stage trains one model on one fold (pcrjax.train). `--config` also takes an experiment's name
(`--config=paper_table:smoke`), which needs no clone. `--helpconfig` lists the config's fields with
their values; `--config.<field>=<value>` overrides one.
"""

import contextlib
import difflib
import logging as std_logging
import os
import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from pcrjax import configs, parallel, protocol, runs, sharding, train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, predictions and reports.')
config_flags.DEFINE_config_file(
    'config', None, 'An experiment: a file (experiments/<x>.py) or the name of one shipped with'
    ' pcrjax (<x>), then optionally :smoke.', lock_config=True)
flags.DEFINE_bool('helpconfig', False, 'List every field of --config with its value, and exit.')
flags.DEFINE_string('compilation_cache', os.path.join('~', '.cache', 'pcrjax', 'xla'),
                    "JAX's persistent compilation cache ('' = off): a later run of the same shapes"
                    ' loads its compiled steps instead of compiling them again.')
flags.DEFINE_bool('distributed', False,
                  'One of several processes training together (jax.distributed.initialize): the'
                  ' three flags below, else what JAX finds (JAX_COORDINATOR_ADDRESS, Slurm, Open MPI,'
                  ' TPU pods).')
flags.DEFINE_string('coordinator_address', None, '--distributed: HOST:PORT of process 0.')
flags.DEFINE_integer('num_processes', None, '--distributed: how many processes.')
flags.DEFINE_integer('process_id', None, '--distributed: this process, 0..num_processes-1.')
flags.mark_flag_as_required('config')
flags.register_multi_flags_validator(['workdir', 'helpconfig'],
                                     lambda f: f['workdir'] is not None or f['helpconfig'],
                                     message='--workdir must be given')

_CONFIG = re.compile(r'^--?config=(.*)$')
_OVERRIDE = re.compile(r'^--?(?:no)?config\.([\w.]+)')


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, once `--config` names a file and every override names a field of it.

  Without the check an unknown field ends in a long chained traceback from ml_collections.
  """
  try:
    argv = [f'--config={configs.experiment_file(m[1])}' if (m := _CONFIG.match(a)) else a
            for a in argv]
    _check_overrides(argv)
  except ValueError as e:
    sys.exit(f'FATAL Flags parsing error: {e}')
  return app.parse_flags_with_usage(argv)


def _check_overrides(argv: list[str]) -> None:
  """Raises ValueError naming the first `--config.<field>` that is not a field of the config."""
  specs = [m[1] for a in argv if (m := _CONFIG.match(a))]
  overrides = [m[1] for a in argv if (m := _OVERRIDE.match(a))]
  if not (specs and overrides):
    return
  names = set()
  for name in configs.fields(configs.load(specs[-1])):
    parts = name.split('.')
    names.update('.'.join(parts[:i]) for i in range(1, len(parts) + 1))
  for field in overrides:
    if field not in names:
      close = difflib.get_close_matches(field, sorted(names), n=3, cutoff=0.6)
      hint = f'did you mean {", ".join(close)}?' if close else 'none is close'
      raise ValueError(f'--config.{field}: no such config field; {hint} (--helpconfig lists them)')


def _quiet_library_info(record) -> bool:
  """Keeps Orbax's and TFDS's per-file INFO lines out of the run log (their warnings stay), and
  Orbax's tracebacks of a full disk from its writer threads (main names the file in one line)."""
  if not any(f'/{library}/' in record.pathname for library in ('orbax', 'tensorflow_datasets')):
    return True
  error = record.exc_info[1] if record.exc_info else None
  if runs.disk_full_path(error) or runs.disk_full_path(Exception(record.getMessage())):
    return False
  return record.levelno >= std_logging.WARNING


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  if FLAGS.helpconfig:
    for name, value in configs.fields(config).items():
      print(f'{name}={value!r}')
    return
  logging.get_absl_handler().addFilter(_quiet_library_info)
  if FLAGS.distributed:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU hosts; GPUs use NCCL.
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if jax.process_index():  # Process 0 logs the run; the others only their warnings and errors.
      logging.set_verbosity(logging.WARNING)
  protocol_task = config.protocol_task if config.stage == 'protocol' else -1
  if config.stage == 'protocol' and config.parallel_trainings > 1:
    # The coordinator trains nothing: its children get the accelerators (and their memory).
    jax.config.update('jax_platforms', 'cpu')
  if FLAGS.compilation_cache:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(FLAGS.compilation_cache))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  try:
    configs.validate(config)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  logging.info('Config:\n%s', config)
  try:
    with (runs.exit_in_one_line_if_disk_full(
        then=' (or choose another --workdir); it resumes from the last checkpoint written whole'),
          # A protocol task (one job of an array) locks its own directory, not the shared workdir;
          # of several processes training together, process 0 holds the lock.
          contextlib.nullcontext() if protocol_task >= 0 or not sharding.is_primary()
          else runs.workdir_lock(FLAGS.workdir)):
      if config.stage == 'protocol':
        protocol.run(config, FLAGS.workdir)
      else:
        train.train_and_evaluate(config, FLAGS.workdir)
  except (runs.WorkdirInUse, parallel.TaskFailed) as e:
    sys.exit(f'FATAL {e}')
  except train.Diverged as e:
    logging.error('Diverged: %s', e)
    sys.exit(f'Diverged: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
