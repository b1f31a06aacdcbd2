"""Writing files safely: whole files, a full disk named in one line, one writer per directory.

Imports nothing else from pcrjax, so that commands outside the trainer (the dataset download) use
the same guarantees without loading the run contract.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import sys
import time


@contextlib.contextmanager
def atomic_open(path: str, mode: str = 'w', **kwargs):
  """`open(path, mode)` through `<path>.<pid>.tmp`, moved into place when the body finishes.

  A file that exists is whole: a killed or failed write leaves the previous version, and processes
  writing the same file (the jobs of a job array) do not mix their bytes. An OSError of the write
  names `path` (a full disk's ENOSPC, raised by write or close, names no file).
  """
  tmp = f'{path}.{os.getpid()}.tmp'
  try:
    with open(tmp, mode, **kwargs) as f:
      yield f
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    if isinstance(e, OSError) and e.filename in (None, tmp):
      raise OSError(e.errno, e.strerror, path) from None
    raise


# --- A full disk, named. --------------------------------------------------------------------------

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How Orbax and TensorStore report it: a ValueError whose message quotes the files.
_DISK_FULL_MESSAGE = re.compile(
    r"No space left on device|Disk quota exceeded|os_error_code='(28|122)'"
)
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')


def disk_full_path(error: BaseException | None) -> str | None:
  """The file a write could not finish for want of disk space, if that is what `error` or an
  exception it was raised from is (the first one that names a file); None otherwise.
  """
  paths = []
  while error is not None:
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
      paths.append(os.fspath(error.filename) if error.filename else None)
    elif _DISK_FULL_MESSAGE.search(str(error)):
      paths.append((_QUOTED_PATH.findall(str(error)) or [None])[-1])
    error = error.__cause__ or error.__context__
  if not paths:
    return None
  return next((p for p in reversed(paths) if p), '(unnamed file)')


@contextlib.contextmanager
def exit_in_one_line_if_disk_full(then: str = ''):
  """For a command's main: a full disk ends the program with one line naming the file (the free
  space left there, what to do, and `then`), not a traceback; any other error passes through.
  """
  try:
    yield
  except Exception as e:  # noqa: BLE001 -- re-raised unless it is a full disk.
    if (path := disk_full_path(e)) is None:
      raise
    folder = os.path.dirname(path)
    while folder and not os.path.isdir(folder):
      folder = os.path.dirname(folder)
    free = (
        f' ({shutil.disk_usage(folder).free / 2**20:.1f} MiB free there)'
        if folder
        else ''
    )
    sys.exit(
        f'FATAL No space left on device writing {path}{free}: free some space, then run the same'
        f' command again{then}.'
    )


# --- One writer per directory. --------------------------------------------------------------------


class WorkdirInUse(RuntimeError):
  """Another live process holds the workdir."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, another user's.
    return True
  return True


@contextlib.contextmanager
def workdir_lock(path: str):
  """Holds the lock file `path` (in the workdir it guards) while the body runs; a second run on the
  workdir stops at once.

  The lock, {pid, host, started}, is written whole and then linked into place (atomic: never seen
  half-written). One left by a killed run (its pid gone, on this host) is taken over; one held on
  another host cannot be checked from here and is refused, naming the file to delete.
  """
  workdir = os.path.dirname(path)
  os.makedirs(workdir, exist_ok=True)
  mine = {
      'pid': os.getpid(),
      'host': socket.gethostname(),
      'started': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
  }
  tmp = f'{path}.{mine["pid"]}'
  with open(tmp, 'w') as f:
    json.dump(mine, f)
  try:
    while True:
      try:
        os.link(tmp, path)
        break
      except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
          with open(path) as f:
            holder = json.load(f)
          if holder['host'] == mine['host'] and not _alive(int(holder['pid'])):
            os.remove(path)  # Stale: its run is gone.
            continue
          elsewhere = (
              ''
              if holder['host'] == mine['host']
              else f' (if that run is dead, delete {path})'
          )
          raise WorkdirInUse(
              f'{workdir} is in use by pid {holder["pid"]} on {holder["host"]} since'
              f' {holder["started"]}{elsewhere}: one run per workdir.'
          ) from None
  finally:
    os.remove(tmp)
  try:
    yield
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
