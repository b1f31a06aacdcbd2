"""How the `tcia` config turns patients into records: in a local process pool (the default) or as an
Apache Beam pipeline (when TFDS is given a Beam runner), with the same records and build report.

Its functions run in worker processes, so they live here, in an importable module, and not in the
builder's module (which `tfds build` imports by file path).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os

import tqdm
from absl import logging

from tfds_ispy2.ispy2 import tcia, tcia_cache

REPORT_FILE = 'build_report.json'
WORKERS_ENV = (
    'ISPY2_WORKERS'  # the user's pool size; unset: `pool_size` chooses
)
# A worker's peak resident memory on the largest series of the collection (bi-lateral, 1,792
# files, 768 MB; `python -m benchmarks.build` measures it), with margin for larger matrices; and
# what the building process itself keeps beside its workers (TFDS's writer).
WORKER_BYTES = 3 << 29  # 1.5 GiB
MAIN_BYTES = 1 << 30


def available_memory() -> int | None:
  """Bytes this process may still use: MemAvailable (else the free pages), capped by a cgroup v2
  limit (a container's, which /proc/meminfo does not show); None when the system says nothing.
  """
  available = None
  try:
    with open('/proc/meminfo') as f:
      available = next(
          int(line.split()[1]) * 1024
          for line in f
          if line.startswith('MemAvailable:')
      )
  except (OSError, StopIteration, ValueError):
    try:
      available = os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):
      pass
  try:
    with open('/sys/fs/cgroup/memory.max') as f, open(
        '/sys/fs/cgroup/memory.current'
    ) as g:
      limit, used = f.read().strip(), int(g.read())
    if limit != 'max':
      available = min(available or int(limit), int(limit) - used)
  except (OSError, ValueError):
    pass
  return available


def pool_size(
    cores: int | None = None, available: int | None = None
) -> tuple[int, str]:
  """(worker processes, why) for a local build: $ISPY2_WORKERS when set; else one per core, as
  many as the available memory holds at `WORKER_BYTES` each (beside `MAIN_BYTES`), at least one:
  a build on many cores and little memory never runs out of it on the largest series.
  """
  if os.environ.get(WORKERS_ENV):
    return max(1, int(os.environ[WORKERS_ENV])), f'${WORKERS_ENV}'
  cores = cores or os.cpu_count() or 1
  available = available_memory() if available is None else available
  if available is None:
    return cores, f'{cores} cores (available memory unknown)'
  by_memory = max(1, (available - MAIN_BYTES) // WORKER_BYTES)
  return min(cores, by_memory), (
      f'{cores} cores, {available / 2**30:.1f} GiB available at'
      f' {WORKER_BYTES / 2**30:.1f} GiB per worker'
  )


@dataclasses.dataclass
class BuildReport:
  """build_report.json: what was found, written and skipped, and why (ids and reasons only, no PHI)."""

  found: int
  issues: list[dict]
  written: list[dict] = dataclasses.field(default_factory=list)
  skipped: list[dict] = dataclasses.field(default_factory=list)

  def add(self, summary: tuple) -> None:
    """One patient's summary (see `summarise`), in patient order."""
    pid, kind, payload, issues = summary
    self.issues += [i._asdict() for i in issues]
    if kind == 'skip':
      reason, detail = payload
      logging.warning(
          'ispy2/tcia: skipped patient %s: %s (%s)', pid, reason, detail
      )
      self.skipped.append(
          {'patient_id': pid, 'reason': reason, 'detail': detail}
      )
    else:
      self.written.append({'patient_id': pid, **payload})

  def write(self, path: str, spec: tcia.TciaSpec) -> None:
    summary = {
        'spec': dataclasses.asdict(spec),
        'patients_found': self.found,
        'patients_written': len(self.written),
        'patients_skipped': len(self.skipped),
        'skips_by_reason': dict(
            collections.Counter(s['reason'] for s in self.skipped)
        ),
        'issues_by_reason': dict(
            collections.Counter(i['reason'] for i in self.issues)
        ),
        'visits_by_mask_source': {
            **dict.fromkeys(tcia.MASK_SOURCES, 0),
            **collections.Counter(
                source
                for w in self.written
                for source in w['mask_source']
                if source
            ),
        },
        'cpu_s_by_stage': {
            stage: round(sum(w['stage_cpu_s'][stage] for w in self.written), 3)
            for stage in tcia.StageTimer.STAGES
        },
        'skipped': self.skipped,
        'issues': self.issues,
        'written': self.written,
    }
    with open(path, 'w') as f:
      json.dump(summary, f, indent=1)
    logging.info(
        'ispy2/tcia: %d patients found, %d written, %d skipped %s; report: %s',
        self.found,
        len(self.written),
        len(self.skipped),
        summary['skips_by_reason'],
        path,
    )


def untimed(report: dict) -> dict:
  """A build report (build_report.json) less its CPU seconds per stage: what two builds of the
  same files agree on, however and wherever they ran."""
  report = dict(
      report,
      written=[
          {k: v for k, v in w.items() if k != 'stage_cpu_s'}
          for w in report['written']
      ],
  )
  del report['cpu_s_by_stage']
  return report


def process(job, skips_are_fatal: bool) -> tuple[str, tuple]:
  """(patient id, outcome) of one job (tcia_cache.process_patient_cached); a skip raises if fatal."""
  pid = job[0].patient_id
  outcome = tcia_cache.process_patient_cached(job)
  if skips_are_fatal and outcome[0] == 'skip':
    reason, detail = outcome[1]
    raise RuntimeError(
        f'Patient {pid} would be skipped ({reason}: {detail}) and skips_are_fatal=True.'
    )
  return pid, outcome


def summarise(processed: tuple[str, tuple]) -> tuple:
  """(pid, kind, metadata or (reason, detail), issues): what the report keeps, without the images."""
  pid, (kind, payload, issues) = processed
  return pid, kind, payload if kind == 'skip' else payload[1], issues


def examples(processed: tuple[str, tuple]):
  """(key, example) of a written patient; nothing for a skipped one."""
  pid, (kind, payload, _) = processed
  if kind == 'ok':
    yield pid, payload[0]


def process_locally(
    pool,
    jobs: list,
    report: BuildReport,
    report_path: str,
    spec: tcia.TciaSpec,
    skips_are_fatal: bool,
):
  """Yields the examples of `jobs` in order from `pool`; the report is written at the end."""
  outcomes = pool.map(process, jobs, [skips_are_fatal] * len(jobs))
  for processed in tqdm.tqdm(
      outcomes, total=len(jobs), desc='ispy2/tcia', unit='patient'
  ):
    report.add(summarise(processed))
    yield from examples(processed)
  report.write(report_path, spec)


def _write_report(
    summaries: list[tuple], report: BuildReport, path: str, spec: tcia.TciaSpec
) -> None:
  for summary in sorted(
      summaries, key=lambda s: s[0]
  ):  # Patient order, as the local build.
    report.add(summary)
  report.write(path, spec)


def beam_pipeline(
    jobs: list,
    report: BuildReport,
    report_path: str,
    spec: tcia.TciaSpec,
    skips_are_fatal: bool,
):
  """The same as `process_locally`, as a Beam PTransform yielding (key, example) for TFDS's writer;
  each patient is one element (a worker processes it end to end), the report one more output.
  """
  import apache_beam as beam  # pylint: disable=g-import-not-at-top  # The optional `beam` extra.

  @beam.ptransform_fn
  def build(pipeline):
    processed = (
        pipeline
        | 'Patients' >> beam.Create(jobs)
        | 'Process' >> beam.Map(process, skips_are_fatal=skips_are_fatal)
    )
    _ = (
        processed
        | 'Summarise' >> beam.Map(summarise)
        | 'Gather' >> beam.combiners.ToList()
        | 'WriteReport'
        >> beam.Map(_write_report, report=report, path=report_path, spec=spec)
    )
    return processed | 'Examples' >> beam.FlatMap(examples)

  return build()  # pylint: disable=no-value-for-parameter
