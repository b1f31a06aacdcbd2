"""The protocol's tasks (pcrjax.protocol.train_task) in parallel child processes.

Each child is `python -m pcrjax.main --config=workdir:W --workdir=W --config.protocol.task=T`: the
protocol's own config, read back from W/config.json, for one task. On GPUs every child sees its own
share of them (CUDA_VISIBLE_DEVICES); on CPUs the children share the cores and keep the parent's
device count (so each training computes exactly what the sequential protocol computes). A TPU host
runs one process: its trainings run in sequence.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import jax

from pcrjax import runs


class TaskFailed(RuntimeError):
  """A child stopped with an error; the message is its last line and where its log is."""


def _platform() -> tuple[str, int]:
  """The platform and device count the children will find, asked of a short-lived process: the
  coordinator itself must not take the accelerators' memory."""
  code = 'import jax, json; print(json.dumps([jax.default_backend(), jax.local_device_count()]))'
  env = {**os.environ, 'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}
  out = subprocess.run(
      [sys.executable, '-c', code],
      capture_output=True,
      text=True,
      env=env,
      check=True,
      timeout=300,
  )
  platform, count = json.loads(out.stdout.strip().splitlines()[-1])
  return platform, count


def child_environments(num_parallel: int) -> list[dict[str, str]]:
  """One environment per slot: on GPUs, its own share of them; elsewhere the parent's."""
  platform, count = _platform()
  if platform == 'tpu':
    raise ValueError(
        'protocol.parallel_trainings > 1: a TPU host runs one process; keep it at 1'
        ' (its trainings then use every TPU core).'
    )
  if platform != 'gpu':
    return [dict(os.environ) for _ in range(num_parallel)]
  if count < num_parallel:
    raise ValueError(
        f'protocol.parallel_trainings={num_parallel} needs as many GPUs; {count}'
        ' found.'
    )
  visible = os.environ.get(
      'CUDA_VISIBLE_DEVICES', ','.join(map(str, range(count)))
  ).split(',')
  share = count // num_parallel
  return [
      {
          **os.environ,
          'CUDA_VISIBLE_DEVICES': ','.join(
              visible[s * share : (s + 1) * share]
          ),
      }
      for s in range(num_parallel)
  ]


def run_tasks(
    workdir: str, num_tasks: int, num_folds: int, num_parallel: int
) -> Iterator[int]:
  """Runs tasks 0..num_tasks-1 (task = repeat * num_folds + fold), at most `num_parallel` at once;
  yields each one as it finishes.

  A task that fails stops the others (they resume later, from their checkpoints) and raises
  TaskFailed with its last line.
  """
  slots = child_environments(num_parallel)
  cache = jax.config.jax_compilation_cache_dir
  pending, running = (
      list(range(num_tasks)),
      {},
  )  # slot -> (task, process, log file)
  try:
    while pending or running:
      for slot in [s for s in range(num_parallel) if s not in running][
          : len(pending)
      ]:
        task = pending.pop(0)
        directory = runs.task_dir(workdir, *divmod(task, num_folds))
        os.makedirs(directory, exist_ok=True)
        log = open(os.path.join(directory, runs.LOG_FILE), 'a')
        command = [
            sys.executable,
            '-m',
            'pcrjax.main',
            f'--config=workdir:{workdir}',
            f'--workdir={workdir}',
            f'--config.protocol.task={task}',
            f'--compilation_cache={cache or ""}',
        ]
        running[slot] = (
            task,
            subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=slots[slot]
            ),
            log,
        )
      for slot, (task, process, log) in list(running.items()):
        if process.poll() is None:
          continue
        log.close()
        del running[slot]
        if process.returncode:
          with open(log.name) as f:
            last = (f.read().strip().splitlines() or ['(no output)'])[-1]
          raise TaskFailed(
              f'Protocol task {task} failed: {last} (its log: {log.name})'
          )
        yield task
      time.sleep(0.2)
  finally:
    for _, process, log in running.values():
      process.kill()
      process.wait()
      log.close()
