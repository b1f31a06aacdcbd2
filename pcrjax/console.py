"""What a command's console shows, and where the rest of its log goes; every command calls `setup`.

The console is for what a user reads: progress bars, the lines a command says (`say`: a result, one
line per finished training), warnings and errors, and an error the user can fix in one line
(`one_line_errors`, `stop`), never a usage text for it. INFO lines go to a log file: the main
command's run log (`log_to`: <workdir>/log.txt, and each protocol training's own) gets pcrjax's and
the libraries' (XLA's backend probing, TFDS's dataset loading), but not Orbax's (`_QuietOrbax`).
absl's `--verbosity` (`-v 0`: INFO, `-v 1`: DEBUG), when given, shows every line of that level on
the console too, Orbax's included.

Library warnings about what pcrjax does on purpose (`_EXPECTED_WARNINGS`: a read-only checkpoint
manager, a dataset's first build) and Orbax's tracebacks of a full disk (the command names the file
in one line) reach the log file, never the console.
"""

from __future__ import annotations

import collections
import contextlib
import logging as std_logging
import os
import re
import sys

import tqdm
from absl import flags, logging

import tfds_ispy2
from pcrjax import fileio

# `extra=` of a training's progress lines (its patients, a resumption, each epoch): on the console
# when the main command shows them (`--epoch_lines`, by default for a single training).
_TRAINING = 'pcrjax_training_line'
TRAINING_LINE = {_TRAINING: True}
_ALREADY_SHOWN = 'pcrjax_already_shown'  # A line `say` or `stop` wrote: for the log file only.

_EXPECTED_WARNINGS = re.compile(
    '|'.join(
        (
            # checkpoints.create_manager(read_only=True): a teacher's, an exported model's checkpoints.
            r'CheckpointManagerOptions\.read_only=True, setting ',
            r'Given directory is read only=',
            r'Variant folder .* has no dataset_info\.json',  # TFDS, before a dataset's first build.
            r'apitools not found',  # TFDS's Google Cloud support, which pcrjax does not use.
        )
    )
)
_OWN_DIRS = tuple(
    os.path.dirname(p) + os.sep for p in (__file__, tfds_ispy2.__file__)
)
_ORBAX_DIR = f'{os.sep}orbax{os.sep}'  # In a log record's pathname.
_held: _Held | None = None  # setup(hold=True) until the first log_to.


class _Console(std_logging.Filter):
  """Decides which lines absl's handler (stderr) prints."""

  def __init__(self, level: int, own_info: bool, training_lines: bool):
    super().__init__()
    self.level, self.own_info, self.training_lines = (
        level,
        own_info,
        training_lines,
    )

  def filter(self, record: std_logging.LogRecord) -> bool:
    if getattr(record, _ALREADY_SHOWN, False):
      return False
    ours = record.pathname.startswith(_OWN_DIRS)
    if not ours and (
        _EXPECTED_WARNINGS.search(record.getMessage()) or _disk_full(record)
    ):
      return False
    if record.levelno >= self.level:
      return True
    if getattr(record, _TRAINING, False):
      return self.training_lines
    return ours and self.own_info and record.levelno >= std_logging.INFO


class _QuietOrbax(std_logging.Filter):
  """Drops Orbax's INFO lines before any handler formats them, unless `--verbosity` asks for them.

  Its writer threads log ≈ 45 lines per checkpoint save (a protocol: ≈ 6,000 of its log's 7,700):
  writing them costs each save ≈ 20 ms of the main thread, and they bury the run's own lines.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    return (
        record.levelno >= std_logging.WARNING
        or _ORBAX_DIR not in record.pathname
    )


class _Held(std_logging.Handler):
  """The lines logged before the run's log file opens (the last 10,000)."""

  def __init__(self):
    super().__init__()
    self.records = collections.deque(maxlen=10_000)

  def emit(self, record: std_logging.LogRecord) -> None:
    self.records.append(record)


class _LogFile(std_logging.FileHandler):
  """A log file that, once it cannot be written (a full disk), stops quietly: the run's own error
  says what happened, in one line, not the logging module's traceback per line.
  """

  _failed = False

  def emit(self, record: std_logging.LogRecord) -> None:
    if not self._failed:
      super().emit(record)

  def handleError(self, record: std_logging.LogRecord) -> None:
    self._failed = True


class _AroundBars:
  """stderr for log lines, written through tqdm so that a line never lands inside a progress bar."""

  def write(self, text: str) -> None:
    tqdm.tqdm.write(text, file=sys.stderr, end='')

  def flush(self) -> None:
    sys.stderr.flush()

  def close(self) -> None:
    """absl closes its stream at exit; stderr stays open."""


def _disk_full(record: std_logging.LogRecord) -> bool:
  error = record.exc_info[1] if record.exc_info else None
  return bool(
      fileio.disk_full_path(error)
      or fileio.disk_full_path(Exception(record.getMessage()))
  )


def setup(
    *, own_info: bool = False, training_lines: bool = False, hold: bool = False
) -> None:
  """Routes this process's logging; call once, after absl has parsed the flags (or for a command
  that is no absl app, at its start).

  Args:
    own_info: pcrjax's and tfds_ispy2's own INFO lines on the console too (a build's summary, a
      protocol task's log); a command's result is a line it prints, not a log line.
    training_lines: the lines marked TRAINING_LINE on the console.
    hold: keep the lines from now until the first `log_to`, which writes them first (the main
      command opens its run log once it holds the workdir).
  """
  global _held
  logging.use_absl_handler()
  verbosity = flags.FLAGS['verbosity']
  if not flags.FLAGS.is_parsed():  # No absl app: its defaults, as if parsed.
    flags.FLAGS.mark_as_parsed()
  root = std_logging.getLogger()
  level = root.level if verbosity.present else std_logging.WARNING
  root.setLevel(
      min(root.level, std_logging.INFO)
  )  # The log files get INFO, whatever the console.
  console = logging.get_absl_handler()
  for previous in [f for f in console.filters if isinstance(f, _Console)]:
    console.removeFilter(previous)
  absl_logger = logging.get_absl_logger()
  for previous in [
      f for f in absl_logger.filters if isinstance(f, _QuietOrbax)
  ]:
    absl_logger.removeFilter(previous)
  if not verbosity.present:
    absl_logger.addFilter(_QuietOrbax())
  console.addFilter(_Console(level, own_info, training_lines))
  console.python_handler.stream = _AroundBars()
  if hold:
    _held = _Held()
    root.addHandler(_held)


@contextlib.contextmanager
def log_to(path: str):
  """Every line logged while the body runs is appended to `path` too (with the lines held since
  `setup(hold=True)`, the first time)."""
  global _held
  os.makedirs(os.path.dirname(path), exist_ok=True)
  handler = _LogFile(path, encoding='utf-8')
  handler.setFormatter(logging.PythonFormatter())
  root = std_logging.getLogger()
  if _held is not None:
    root.removeHandler(_held)
    for record in _held.records:
      handler.handle(record)
    _held = None
  root.addHandler(handler)
  try:
    yield
  finally:
    root.removeHandler(handler)
    handler.close()


def say(line: str) -> None:
  """A line for the user: on stdout (around any progress bar) and in the log file."""
  tqdm.tqdm.write(line)
  logging.info(line, extra={_ALREADY_SHOWN: True})


def stop(line: str) -> None:
  """Ends the command with `line` on stderr (exit status 1), kept in the log file too."""
  logging.error(line, extra={_ALREADY_SHOWN: True})
  sys.exit(line)


# The log file names the caller of `say` and `stop`, not this module.
for _function in ('say', 'stop'):
  logging.ABSLLogger.register_frame_to_skip(__file__, _function)


@contextlib.contextmanager
def one_line_errors(*errors: type[BaseException]):
  """Ends the command with `FATAL <message>` for the `errors` that the user's data or files cause:
  no traceback, no usage text (that is for flag errors). A full disk passes through, for
  fileio.exit_in_one_line_if_disk_full to name the file."""
  try:
    yield
  except errors as e:
    if fileio.disk_full_path(e):
      raise
    stop(f'FATAL {e}')
