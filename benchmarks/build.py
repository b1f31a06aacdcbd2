"""What building the `tcia` config costs on series of the collection's real sizes, and what the
whole collection (about 512 GB of DCE series and masks) would take.

  python -m benchmarks.build                            # 2 real-size patients + the largest series
  python -m benchmarks.build --patients=6 --json=/tmp/build.json
  python -m benchmarks.build --nolargest --workers=1    # without the 1,792-file series (1.5 min)

Writes, into a temporary directory (never the repository), `--patients` fixture patients of real
size (uni-lateral 256 x 256 x 88 slices x 7 phases, T0 and T1: 1,232 files, ~190 MB each; the
vendors' header layouts in turn: GE, Siemens, Philips) and, with `--largest`, one bi-lateral
series at the collection's upper end (384 x 512 x 256 slices x 7 phases: 1,792 files, ~700 MB).
Each set is built with the `tcia` config exactly as a user builds it (TFDS, the local process
pool, ArrayRecord shards), in a subprocess of its own so that its workers' peak memory is its own.
On the same files it measures the two raw limits of one core: reading the bytes, and
`pydicom.dcmread(f).pixel_array` of every file.

Reported: the build's DICOM megabytes per second per core, from its CPU seconds (every patient's
stages in the workers, `tcia.StageTimer`; discovering the headers; the building process's own,
i.e. TFDS encoding and writing the shards, and the pools' bookkeeping; not the workers' start-up,
a fixed cost), the share of each stage, its ratio to the raw decode rate (CPU seconds too), a
worker's peak resident memory, and the projected time of the whole collection on 2, 16 and 64
cores and on a Beam runner with `--beam_workers` one-core workers (and the storage bandwidth and
memory that needs). CPU seconds keep the rates comparable on a machine other jobs share; the
wall-clock rate is shown beside them. Files are read from the page cache (just written): the
storage column says what real disks must deliver.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer(
    'patients', 2, 'Uni-lateral real-size patients (T0, T1) to write and build.'
)
flags.DEFINE_bool(
    'largest',
    True,
    'Also build one bi-lateral series of 1,792 files (~700 MB).',
)
flags.DEFINE_integer(
    'workers',
    None,
    'Worker processes of the builds ($ISPY2_WORKERS); default: '
    "the builder's own choice from the cores and the available memory.",
)
flags.DEFINE_list(
    'cores',
    ['2', '16', '64'],
    'Core counts to project the whole collection on.',
)
flags.DEFINE_integer(
    'beam_workers', 100, 'One-core Beam workers to project the collection on.'
)
flags.DEFINE_float(
    'collection_gb', 512.0, 'The whole collection: DCE series and masks, GB.'
)
flags.DEFINE_string(
    'json', None, 'Also write every figure as JSON to this file.'
)
flags.DEFINE_string(
    'build_only', None, 'Internal: build this manual_dir, print a JSON summary.'
)
flags.DEFINE_string('data_dir', None, 'Internal: the data_dir of --build_only.')

_MB = 1e6
_VENDORS = ('GE', 'Siemens', 'Philips')
# Phantom patients with T0 and T1 (the writer drops visits the phantom's trial lost).
_PHANTOM_INDICES = (4, 3, 13, 5, 1, 12, 0, 8, 11, 14)


def real_cases(patients: int, largest: bool) -> tuple[list, list]:
  """(uni-lateral cases, the largest series' case) of real size, from the fixture writer."""
  from fake_data import tcia_fixtures as fx  # pylint: disable=g-import-not-at-top

  uni = [
      fx.Case(
          f'real_{n}',
          f'ISPY2-9{n:05d}',
          900000 + n,
          _PHANTOM_INDICES[n % len(_PHANTOM_INDICES)],
          visits=(0, 1),
          size='real',
          vendor=_VENDORS[n % len(_VENDORS)],
      )
      for n in range(patients)
  ]
  big = (
      [
          fx.Case(
              'largest',
              'ISPY2-999999',
              999999,
              0,
              visits=(0,),
              laterality='bi',
              size='real',
              vendor='GE',
          )
      ]
      if largest
      else []
  )
  return uni, big


def dicom_files(root: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in root.rglob('*.dcm') if p.is_file())


def raw_limits(files: list[pathlib.Path]) -> dict:
  """One core's plain read and pydicom decode rates (MB per CPU second) over ``files`` (as the
  page cache holds them: just written)."""
  import pydicom  # pylint: disable=g-import-not-at-top

  size = sum(f.stat().st_size for f in files)
  start = time.process_time()
  for f in files:
    f.read_bytes()
  read_s = time.process_time() - start
  start = time.process_time()
  for f in files:
    pydicom.dcmread(f).pixel_array  # noqa: B018 -- the decode is what is timed
  decode_s = time.process_time() - start
  return {
      'files': len(files),
      'mb': size / _MB,
      'read_mb_s': size / _MB / read_s,
      'decode_mb_s': size / _MB / decode_s,
  }


def build_only(manual_dir: str, data_dir: str) -> dict:
  """One `tcia` build of ``manual_dir`` in this process: wall time, this process's CPU time in
  it, discovery's on one core, the report's CPU seconds per stage, the workers' peak memory.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import tfds_ispy2  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from tfds_ispy2.ispy2 import tcia, tcia_build  # pylint: disable=g-import-not-at-top

  start = time.process_time()
  tcia.discover(manual_dir)  # the headers of every file, on one core
  discover_s = time.process_time() - start
  builder = tfds.builder(
      'ispy2/tcia', data_dir=data_dir, file_format='array_record'
  )
  self_before = resource.getrusage(resource.RUSAGE_SELF)
  start = time.perf_counter()
  builder.download_and_prepare(
      file_format='array_record',
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
  )
  wall_s = time.perf_counter() - start
  self_after = resource.getrusage(resource.RUSAGE_SELF)
  report = json.loads(
      (pathlib.Path(builder.data_dir) / tcia_build.REPORT_FILE).read_text()
  )
  return {
      'wall_s': wall_s,
      'discover_s': discover_s,
      'workers': tcia_build.pool_size()[0],
      'main_cpu_s': (
          self_after.ru_utime
          + self_after.ru_stime
          - self_before.ru_utime
          - self_before.ru_stime
      ),
      'stages_s': report['cpu_s_by_stage'],
      'written': report['patients_written'],
      'issues': [f"{i['patient_id']} {i['reason']}" for i in report['issues']],
      # Linux reports KiB: the largest resident set of any worker (children) of this build.
      'worker_peak_mb': (
          resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / _MB
      ),
  }


def run_build(manual_dir: pathlib.Path, data_dir: pathlib.Path) -> dict:
  env = dict(os.environ)
  if FLAGS.workers:
    env['ISPY2_WORKERS'] = str(FLAGS.workers)
  done = subprocess.run(
      [
          sys.executable,
          '-m',
          'benchmarks.build',
          f'--build_only={manual_dir}',
          f'--data_dir={data_dir}',
      ],
      check=True,
      capture_output=True,
      text=True,
      env=env,
  )
  return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(
    name: str, build: dict, files: list[pathlib.Path], limits: dict
) -> dict:
  """Rates of one build: MB per CPU second, and its stages' shares; MB/s per worker in wall time."""
  mb = sum(f.stat().st_size for f in files) / _MB
  stages = {
      'discover': build['discover_s'],
      **build['stages_s'],
      'write': build['main_cpu_s'],
  }
  core_s = sum(stages.values())
  per_core = mb / core_s
  return {
      'name': name,
      'files': len(files),
      'mb': mb,
      'written': build['written'],
      'workers': build['workers'],
      'wall_s': build['wall_s'],
      'core_s': core_s,
      'mb_s_per_core': per_core,
      'mb_s_per_core_wall': mb / (build['wall_s'] * build['workers']),
      'of_decode': per_core / limits['decode_mb_s'],
      'stages_s': stages,
      'worker_peak_mb': build['worker_peak_mb'],
      'issues': build['issues'],
  }


def _duration(seconds: float) -> str:
  if seconds < 3600:
    return f'{seconds / 60:.0f} min'
  return f'{seconds / 3600:.1f} h'


def projection(per_core: float) -> list[dict]:
  """The whole collection at ``per_core`` MB/s on each core count (and on Beam's workers), with
  the storage bandwidth and the workers' memory that needs."""
  from tfds_ispy2.ispy2 import tcia_build  # pylint: disable=g-import-not-at-top

  total = FLAGS.collection_gb * 1e9 / _MB
  rows = [(f'{c} cores', int(c)) for c in FLAGS.cores]
  rows.append((f'Beam, {FLAGS.beam_workers} workers', FLAGS.beam_workers))
  return [
      {
          'where': where,
          'cores': cores,
          'seconds': total / (per_core * cores),
          'storage_gb_s': per_core * cores / 1e3,
          'worker_memory_gb': cores * tcia_build.WORKER_BYTES / 1e9,
      }
      for where, cores in rows
  ]


def table(limits: dict, builds: list[dict], rows: list[dict]) -> str:
  lines = [
      f"Raw limits, one core, {limits['files']} files, {limits['mb']:,.0f} MB (page cache):"
      f" read {limits['read_mb_s']:,.0f} MB/s, pydicom decode {limits['decode_mb_s']:,.0f}"
      ' MB/s (per CPU second).',
      '',
      '| build | files | MB | workers | wall s | CPU s | MB/s per core | (wall) | of decode '
      '| worker peak RSS |',
      '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
  ]
  for b in builds:
    lines.append(
        f"| {b['name']} | {b['files']:,} | {b['mb']:,.0f} | {b['workers']} | "
        f"{b['wall_s']:.1f} | {b['core_s']:.1f} | {b['mb_s_per_core']:,.0f} | "
        f"{b['mb_s_per_core_wall']:,.0f} | {b['of_decode']:.2f} | "
        f"{b['worker_peak_mb']:,.0f} MB |"
    )
  stages = list(builds[0]['stages_s'])
  lines += [
      '',
      '| share of CPU s | ' + ' | '.join(stages) + ' |',
      '| --- |' + ' ---: |' * len(stages),
  ]
  for b in builds:
    lines.append(
        f"| {b['name']} | "
        + ' | '.join(
            f"{100 * b['stages_s'][s] / b['core_s']:.0f} %" for s in stages
        )
        + ' |'
    )
  lines += [
      '',
      f"Whole collection ({FLAGS.collection_gb:,.0f} GB) at {builds[0]['name']}'s "
      f"{builds[0]['mb_s_per_core']:,.0f} MB/s per core:",
      '',
      "| on | time | storage read | workers' memory |",
      '| --- | ---: | ---: | ---: |',
  ]
  lines += [
      f"| {r['where']} | {_duration(r['seconds'])} | {r['storage_gb_s']:.1f} GB/s | "
      f"{r['worker_memory_gb']:.0f} GB |"
      for r in rows
  ]
  for b in builds:
    if b['issues']:
      lines.append(f"\n{b['name']}: issues {b['issues']}")
  return '\n'.join(lines)


def main(argv):
  del argv
  if FLAGS.build_only:
    print(json.dumps(build_only(FLAGS.build_only, FLAGS.data_dir)))
    return
  from fake_data import tcia_fixtures as fx  # pylint: disable=g-import-not-at-top

  uni, big = real_cases(FLAGS.patients, FLAGS.largest)
  with tempfile.TemporaryDirectory(prefix='ispy2_build_bench_') as tmp:
    tmp = pathlib.Path(tmp)
    sets = [(f'{len(uni)} uni-lateral', tmp / 'uni', uni)] + (
        [('largest bi-lateral', tmp / 'largest', big)] if big else []
    )
    for name, root, cases in sets:
      start = time.perf_counter()
      fx.write_tcia_tree(root, cases)
      print(f'wrote {name}: {time.perf_counter() - start:.0f} s', flush=True)
    files = {name: dicom_files(root) for name, root, _ in sets}
    limits = raw_limits([f for fs in files.values() for f in fs])
    print(
        f"raw limits: read {limits['read_mb_s']:,.0f} MB/s, decode {limits['decode_mb_s']:,.0f}"
        ' MB/s',
        flush=True,
    )
    builds = []
    for name, root, _ in sets:
      built = run_build(root, tmp / f'data_{root.name}')
      builds.append(summarise(name, built, files[name], limits))
      print(
          f"built {name}: {builds[-1]['mb_s_per_core']:,.0f} MB/s per core",
          flush=True,
      )
  rows = projection(builds[0]['mb_s_per_core'])
  print(table(limits, builds, rows))
  if FLAGS.json:
    pathlib.Path(FLAGS.json).write_text(
        json.dumps(
            {
                'raw_limits': limits,
                'builds': builds,
                'projection': rows,
                'cases': [dataclasses.asdict(c) for c in uni + big],
            },
            indent=1,
        )
        + '\n'
    )


if __name__ == '__main__':
  app.run(main)
