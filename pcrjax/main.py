"""Entry point: `python -m pcrjax.main --config=experiments/<x>.py[:smoke] --workdir=DIR`.

A config with `stage = 'protocol'` runs the paper's whole comparison (pcrjax.protocol); any other
stage trains one model on one fold (pcrjax.train). `--config` also takes an experiment's name
(`--config=paper_table:smoke`), which needs no clone. `--helpconfig` lists the config's fields with
their values; `--config.<field>=<value>` overrides one.

The console shows the protocol's progress bar and one line per finished training, or a single
training's epochs; everything else is in <workdir>/log.txt (pcrjax.console).
"""

import contextlib
import difflib
import os
import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from pcrjax import configs, console, fileio, parallel, protocol, runs, sharding, train

FLAGS = flags.FLAGS
flags.DEFINE_string(
    'workdir',
    None,
    'Directory for checkpoints, metrics, predictions and reports.',
)
config_flags.DEFINE_config_file(
    'config',
    None,
    'An experiment: a file (experiments/<x>.py) or the name of one shipped with'
    ' pcrjax (<x>), then optionally :smoke.',
    lock_config=True,
)
flags.DEFINE_bool(
    'helpconfig',
    False,
    'List every field of --config with its value, and exit.',
)
flags.DEFINE_bool(
    'epoch_lines',
    None,
    "A training's line per epoch (and its other progress lines) on the console; by"
    ' default on for a single training, off for the protocol, which shows one line'
    ' per training. Either way they are in <workdir>/log.txt (and each protocol'
    " training's log.txt); absl's --verbosity=0 shows every INFO line on the console,"
    " the libraries' too.",
)
flags.DEFINE_string(
    'compilation_cache',
    os.path.join('~', '.cache', 'pcrjax', 'xla'),
    "JAX's persistent compilation cache ('' = off): a later run of the same shapes"
    ' loads its compiled steps instead of compiling them again.',
)
flags.DEFINE_bool(
    'distributed',
    False,
    'One of several processes training together (jax.distributed.initialize): the'
    ' three flags below, else what JAX finds (JAX_COORDINATOR_ADDRESS, Slurm, Open MPI,'
    ' TPU pods).',
)
flags.DEFINE_string(
    'coordinator_address', None, '--distributed: HOST:PORT of process 0.'
)
flags.DEFINE_integer(
    'num_processes', None, '--distributed: how many processes.'
)
flags.DEFINE_integer(
    'process_id', None, '--distributed: this process, 0..num_processes-1.'
)
flags.mark_flag_as_required('config')
flags.register_multi_flags_validator(
    ['workdir', 'helpconfig'],
    lambda f: f['workdir'] is not None or f['helpconfig'],
    message='--workdir must be given',
)

_CONFIG = re.compile(r'^--?config=(.*)$')
_OVERRIDE = re.compile(r'^--?(?:no)?config\.([\w.]+)')


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, once `--config` names a file and every override names a field of it.

  Without the check an unknown field ends in a long chained traceback from ml_collections.
  """
  try:
    argv = [
        f'--config={configs.experiment_file(m[1])}'
        if (m := _CONFIG.match(a))
        else a
        for a in argv
    ]
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
      raise ValueError(
          f'--config.{field}: no such config field; {hint} (--helpconfig lists them)'
      )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  if FLAGS.helpconfig:
    for name, value in configs.fields(config).items():
      print(f'{name}={value!r}')
    return
  protocol_task = config.protocol.task if config.stage == 'protocol' else -1
  # A protocol task's console is its log (a parallel protocol's child writes it into the task's
  # directory, a job array into the job's output): pcrjax's own INFO lines too.
  epoch_lines = (
      config.stage != 'protocol'
      if FLAGS.epoch_lines is None
      else FLAGS.epoch_lines
  )
  console.setup(
      own_info=protocol_task >= 0,
      training_lines=epoch_lines or protocol_task >= 0,
      hold=protocol_task < 0,
  )
  primary = True
  if FLAGS.distributed:
    jax.config.update(
        'jax_cpu_collectives_implementation', 'gloo'
    )  # CPU hosts; GPUs use NCCL.
    jax.distributed.initialize(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
    primary = sharding.is_primary()
    if (
        not primary
    ):  # Process 0 logs the run; the others only their warnings and errors.
      logging.set_verbosity(logging.WARNING)
  if config.stage == 'protocol' and config.protocol.parallel_trainings > 1:
    # The coordinator trains nothing: its children get the accelerators (and their memory).
    jax.config.update('jax_platforms', 'cpu')
  if FLAGS.compilation_cache:
    jax.config.update(
        'jax_compilation_cache_dir', os.path.expanduser(FLAGS.compilation_cache)
    )
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  try:
    configs.validate(config)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  logging.info('Config:\n%s', config)
  # A protocol task (one job of an array) locks its own directory, not the shared workdir; of
  # several processes training together, process 0 holds the lock and writes the log.
  writes_workdir = protocol_task < 0 and primary
  try:
    with (
        fileio.exit_in_one_line_if_disk_full(
            then=' (or choose another --workdir); it resumes from the last checkpoint written whole'
        ),
        fileio.workdir_lock(runs.lock_path(FLAGS.workdir))
        if writes_workdir
        else contextlib.nullcontext(),
        # Opened once the workdir is ours: a second run on it stops without writing there.
        console.log_to(
            os.path.join(os.path.abspath(FLAGS.workdir), runs.LOG_FILE)
        )
        if writes_workdir
        else contextlib.nullcontext(),
        console.one_line_errors(parallel.TaskFailed),
    ):
      try:
        if config.stage == 'protocol':
          protocol.run(config, FLAGS.workdir)
        else:
          train.train_and_evaluate(config, FLAGS.workdir)
          if primary:
            console.say(
                f'{config.stage}, fold {config.data.fold}:'
                f' {protocol.training_result(FLAGS.workdir)}; its predictions are in'
                f' {FLAGS.workdir}.'
            )
      except train.Diverged as e:
        console.stop(f'Diverged: {e}')
  except fileio.WorkdirInUse as e:
    console.stop(f'FATAL {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
