"""Where a run's wall time goes, from cheap timers: none adds a device sync.

A training (pcrjax.train) splits its time into phases with a `Clock` and writes them into its stage
directory (runs.TIMING_FILE). The protocol times its own phases, adds those of the trainings that
finished during its run (runs.WALL_TIME_FILE), logs them in one line (`describe`) and the report
shows that line. Imports no JAX: a workdir's report is rebuilt anywhere.
"""

from __future__ import annotations

import glob
import json
import os
import time

from pcrjax import fileio, runs

# Every phase, in the order a protocol spends them, with what `describe` calls it.
PHASES = {
    'dataset_build': (
        'dataset build'
    ),  # The protocol's first read of the cohort: built if not yet.
    'data': (
        'reading patients'
    ),  # A training's patients, decoded and cropped, onto the device.
    'setup': (
        'set-up'
    ),  # The student's targets, the model, its head start, the checkpoint manager.
    # A training's initialisation (a jitted function, and the optimiser's state) and the first call
    # of its training and evaluation steps: tracing and XLA's compilation, or a cache's copy.
    'compile': 'compile',
    'steps': (
        'training steps'
    ),  # Every other step, until the epoch's metrics are read back.
    'validation': (
        'validation'
    ),  # Each epoch's validation AUROC, the selected model's predictions.
    'checkpoints': (
        'checkpoints'
    ),  # Saving, waiting for the writes, restoring the selected epoch.
    'logs': (
        'metrics and logs'
    ),  # metrics.jsonl, TensorBoard, the epoch's log line.
    'reference_fits': 'reference fits',
    'report': 'report',
    'other': (
        'other'
    ),  # What no timer covers: the protocol's bookkeeping between its phases.
}
TRAINING_PHASES = (
    'data',
    'setup',
    'compile',
    'steps',
    'validation',
    'checkpoints',
    'logs',
)

_finished_training_seconds = 0.0  # Of the trainings finished in this process.


class Clock:
  """Wall time per phase: `lap(phase)` adds the time since the previous lap to `phase`.

  A training's clock leaves out the trainings that finish inside its laps (a cross-fitted teacher
  trained in a student's set-up): their time is theirs, in their own timing file.
  """

  def __init__(self, *, excludes_trainings: bool = True):
    self.seconds: dict[str, float] = {}
    self._excludes_trainings = excludes_trainings
    self._last, self._trainings = (
        time.perf_counter(),
        _finished_training_seconds,
    )

  def lap(self, phase: str) -> None:
    now = time.perf_counter()
    inner = (
        _finished_training_seconds - self._trainings
        if self._excludes_trainings
        else 0.0
    )
    self.seconds[phase] = (
        self.seconds.get(phase, 0.0) + now - self._last - inner
    )
    self._last, self._trainings = now, _finished_training_seconds

  def first_call(self, fn, before: str):
    """`fn`, its first call timed as 'compile' and the time up to it as `before`.

    A jitted function's first call returns once it is traced, compiled and dispatched, without
    waiting for its result (asynchronous dispatch): 'compile' is then that, not the step's run.
    """
    first = True

    def call(*args, **kwargs):
      nonlocal first
      if not first:
        return fn(*args, **kwargs)
      first = False
      self.lap(before)
      result = fn(*args, **kwargs)
      self.lap('compile')
      return result

    return call

  def finish(self, directory: str | None, **facts) -> None:
    """Ends a training's clock; writes its phases (and `facts`) into `directory` unless None."""
    global _finished_training_seconds
    _finished_training_seconds += sum(self.seconds.values())
    if directory is not None:
      with fileio.atomic_open(os.path.join(directory, runs.TIMING_FILE)) as f:
        json.dump(
            {'seconds': self.seconds, **facts, 'finished': time.time()},
            f,
            indent=1,
        )


def training_seconds(directory: str) -> float | None:
  """The seconds of the trainings recorded in `directory` and below (a student's lambda
  candidates), None where none is."""
  records = _timing_records(directory)
  return sum(sum(r['seconds'].values()) for r in records) if records else None


def _timing_records(directory: str, finished_after: float = 0.0) -> list[dict]:
  records = []
  for path in glob.glob(
      os.path.join(directory, '**', runs.TIMING_FILE), recursive=True
  ):
    with open(path) as f:
      record = json.load(f)
    if record['finished'] >= finished_after:
      records.append(record)
  return records


def record_protocol(workdir: str, clock: Clock, *, started: float) -> dict:
  """Writes and returns the protocol's phases so far (runs.WALL_TIME_FILE): its clock's, with the
  phases of the trainings that finished since `started` (time.time()) in place of its 'trainings'.

  Trainings that ran side by side (protocol.parallel_trainings) spend more seconds than the wall
  time they took; their phases are then scaled to it, each keeping its share.
  """
  trainings = _timing_records(workdir, finished_after=started)
  spent = {
      p: sum(r['seconds'].get(p, 0.0) for r in trainings)
      for p in TRAINING_PHASES
  }
  own = dict(clock.seconds)
  wall = sum(own.values())
  scale = min(1.0, own.pop('trainings', 0.0) / max(sum(spent.values()), 1e-9))
  seconds = {
      p: own.get(p, spent.get(p, 0.0) * scale) for p in PHASES if p != 'other'
  }
  seconds['other'] = max(0.0, wall - sum(seconds.values()))
  devices = ''.join(
      f', trainings on {d}' for d in sorted({r['devices'] for r in trainings})
  )
  record = {
      'wall': wall,
      'seconds': seconds,
      'trainings': len(trainings),
      'steps': sum(r['steps'] for r in trainings),
      'machine': f'{os.cpu_count()} CPU cores{devices}',
  }
  with fileio.atomic_open(os.path.join(workdir, runs.WALL_TIME_FILE)) as f:
    json.dump(record, f, indent=1)
  return record


def read_protocol(workdir: str, report_seconds: float) -> dict | None:
  """The protocol's last record (None: a workdir without one), with
  `report_seconds` as its report when it has none yet (the protocol's own report being built).
  """
  path = os.path.join(workdir, runs.WALL_TIME_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    record = json.load(f)
  if not record['seconds']['report']:
    record['seconds']['report'] = report_seconds
    record['wall'] += report_seconds
  return record


def describe(record: dict) -> str:
  """One line: the wall time, then each phase that took any, in seconds and share."""
  wall = record['wall']
  parts = [
      f'{PHASES[p]} {format_seconds(s)} ({100 * s / wall:.0f} %)'
      for p, s in record['seconds'].items()
      if s >= 0.05
  ]
  steps = record['steps']
  each = steps and 1000 * record['seconds']['steps'] / steps
  per_step = f'; {steps} training steps, {each:.1f} ms each' if steps else ''
  return (
      f'wall time {format_seconds(wall)} on {record["machine"]},'
      f' {record["trainings"]} trainings: {", ".join(parts)}{per_step}'
  )


def format_seconds(value: float) -> str:
  return f'{value:.1f} s' if value < 10 else f'{value:.0f} s'
