"""I-SPY2 longitudinal breast DCE-MRI for early pCR prediction, one example per patient.

Configs change the bytes on disk only: `synthetic` (the default) renders the embedded phantom of
`phantom.py`; `synthetic_seed1` is another cohort of it; `synthetic_transfer` is the `synthetic` cohort
with the phantom's transfer knob on (a positive control for learning from T2); `synthetic_smoke` is the
same phantom on a coarse grid and a small cohort, for smoke runs and tests; `tcia` reads a manual
download of the I-SPY2 collection from TCIA (the `tcia` package). Everything a training run may choose
at read time (folds, 2D MIP or 3D crop, normalisation, augmentation) belongs to the input pipeline, not
here. A synthetic build also writes the phantom's truth of every patient into the dataset's metadata
(`phantom.ORACLE_TRUTH`), for the protocol's oracle reference; the records never hold it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os

import loky
import tensorflow_datasets as tfds
from absl import logging

from tfds_ispy2.ispy2 import phantom, schema, tcia, tcia_build


def _by(sizes) -> str:
  """'2x1x1' from (2.0, 1.0, 1.0): the `tcia` description quotes the schema's grid."""
  return 'x'.join(f'{s:g}' for s in sizes)


@dataclasses.dataclass(kw_only=True)
class Ispy2Config(tfds.core.BuilderConfig):
  """A builder config: the phantom's cohort and grid, or (`tcia`) the output grid of real data."""

  phantom: phantom.PhantomSpec | None = None
  tcia: tcia.TciaSpec | None = None

  @property
  def shape(self) -> tuple[int, int, int]:
    return tuple(self.phantom.shape if self.phantom else self.tcia.crop_shape)


# The phantom's configs are versioned apart from `tcia`, which has no truth to write: from 1.1.0
# their metadata holds the oracle's truth (the records are those of 1.0.0).
_SYNTHETIC_VERSION = dict(
    version='1.1.0',
    release_notes={
        '1.1.0': (
            "The phantom's truth of every patient in the metadata (phantom.ORACLE_TRUTH)"
            ' for the oracle reference; the records are unchanged.'
        ),
        '1.0.0': 'Synthetic phantom configs and the TCIA reader.',
    },
)


class Builder(tfds.core.GeneratorBasedBuilder):
  """DatasetBuilder for the `ispy2` dataset."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Synthetic phantom configs and the TCIA reader.'}
  BUILDER_CONFIGS = [
      *(
          Ispy2Config(
              name='synthetic' if seed == 0 else f'synthetic_seed{seed}',
              description=(
                  f'Embedded phantom, seed {seed}: 512 patients, 16x64x64 voxels of 3.0x2.0x2.0 mm (a'
                  ' 48x128x128 mm unilateral field of view), four visits, three DCE phases.'
                  + (
                      ''
                      if seed == 0
                      else ' Another cohort drawn from the same phantom: checks that'
                      " a result is not one cohort's luck."
                  )
              ),
              phantom=phantom.PhantomSpec(
                  num_patients=512,
                  shape=(16, 64, 64),
                  spacing_mm=(3.0, 2.0, 2.0),
                  seed=seed,
              ),
              **_SYNTHETIC_VERSION,
          )
          for seed in (0, 1)
      ),
      Ispy2Config(
          name='synthetic_transfer',
          description=(
              'The `synthetic` cohort (seed 0: 512 patients, 16x64x64 voxels of 3.0x2.0x2.0 mm) with the'
              " phantom's transfer knob on (transfer=1.0): a per-patient kinetic heterogeneity, visible at"
              ' T0 and T1 only as patchier tumour enhancement, sets ~40% of the variance of the T2'
              ' shrinkage and raises the chance of pCR (AUROC ~0.7 alone). A positive control: here'
              ' regressing T2 features from T0/T1 can teach what the pCR label alone teaches poorly.'
          ),
          phantom=phantom.PhantomSpec(
              num_patients=512,
              shape=(16, 64, 64),
              spacing_mm=(3.0, 2.0, 2.0),
              seed=0,
              transfer=1.0,
          ),
          **_SYNTHETIC_VERSION,
      ),
      Ispy2Config(
          name='synthetic_smoke',
          description='The phantom on a coarse 8x32x32 grid of 6x4x4 mm, 48 patients: smoke runs and tests.',
          phantom=phantom.PhantomSpec(
              num_patients=48, shape=(8, 32, 32), spacing_mm=(6.0, 4.0, 4.0)
          ),
          **_SYNTHETIC_VERSION,
      ),
      Ispy2Config(
          name='tcia',
          description=(
              'I-SPY2 from TCIA (manual download): per visit the pre, early (closest to 150 s) and late'
              ' (closest to 450 s) phases of the DCE series, resampled to'
              f' {_by(schema.DEFAULT_SPACING_MM)} mm and cropped to {_by(schema.DEFAULT_CROP_SHAPE)}'
              ' voxels around the tumour (the Analysis Mask, else PE >= 70 %).'
          ),
          tcia=tcia.TciaSpec(),
      ),
  ]
  DEFAULT_CONFIG_NAME = 'synthetic'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
For the `tcia` config only (the synthetic configs need nothing).
1. Fetch the series from NCI Imaging Data Commons, which mirrors the collection in public buckets
   (no account), with the `download` extra (pip install '.[download]'):
     python -m tfds_ispy2.download --out=<manual_dir> --dry_run  # patients, series, GB per visit
     python -m tfds_ispy2.download --out=<manual_dir>            # fetches; rerun it to resume
   For the visits the method uses (T0-T2; --visits=T0,T1,T2,T3 adds T3) it fetches each study's
   "original DCE" and "Analysis Mask" series of the patients with a T0 DCE series (IDC v25: 1,100
   patients, 5,854 series, 395 GB) into
     <manual_dir>/<collection_id>/<PatientID>/<StudyInstanceUID>/<Modality>_<SeriesInstanceUID>/
   (tfds_ispy2/download.py; the transfer itself is not exercised by the tests, which run offline).
   Or from The Cancer Imaging Archive, collection "I-SPY 2 Breast Dynamic Contrast Enhanced MRI
   Trial (ISPY2)", https://doi.org/10.7937/TCIA.D8Z0-9T85, download with the NBIA Data Retriever,
   for the patients you want and visits T0-T3, the series
     "ISPY2: VOLSER: uni-lateral cropped: original DCE"  (or "... bi-lateral: original DCE")
     "ISPY2: VOLSER: uni-lateral cropped: Analysis Mask" (or "... bi-lateral: Analysis Mask")
   (the same descriptions in the collection ACRIN-6698, https://doi.org/10.7937/tcia.kk02-6d95,
   for its I-SPY2 patients) in the downloader's "Descriptive Directory Name" layout:
     <manual_dir>/<collection>/<PatientID>/<study folder>/<series folder>/*.dcm
   The Analysis Mask (SEG SOP class, 8-bit exclusion flags) holds the radiologist's VOI and I-SPY's
   functional tumour volume (FTV): the crop centres on the FTV (on the VOI after a complete
   response) and the FTV reference uses its volume. A visit without one falls back to the largest
   PE >= 70 % region, inside the VOI of an earlier visit's mask when there is one, else over the
   whole field of view (where an enhancing node or vessel can be larger than the tumour); the
   record then holds no VOI and build_report.json says "pe70_in_voi" or "pe70" for that visit.
2. From the collection's page on TCIA (the link above; IDC's series index holds no labels),
   download the clinical spreadsheet ISPY2-Imaging-Cohort-1-Clinical-Data.xlsx (columns
   Patient_ID, Arm, HR, HER2, pCR, ...) and, where TCIA ids differ from I-SPY2 research ids
   (ACRIN-6698 patients), Full-Collection-Ancillary-Patient-Information-file.xlsx, and put both
   anywhere under <manual_dir>.
3. Build: the default <manual_dir> is <data_dir>/downloads/manual (override with --manual_dir).
Patients without a pCR label, and patients or visits that cannot be read, are skipped and listed
with their reason in build_report.json beside the dataset, which also says per visit which mask was
used ("analysis_mask_bitflags", "analysis_mask_seg", "pe70_in_voi" or "pe70").
"""

  def __init__(self, *, skips_are_fatal: bool = False, **kwargs):
    """skips_are_fatal: (`tcia`) stop the build at the first patient that would be skipped."""
    super().__init__(**kwargs)
    self._skips_are_fatal = skips_are_fatal
    self._on_beam = False

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=schema.features(self.builder_config.shape),
        homepage='https://doi.org/10.7937/TCIA.D8Z0-9T85',
        metadata=tfds.core.MetadataDict()
        if self.builder_config.phantom is not None
        else None,
    )

  def _download_and_prepare(self, dl_manager, download_config=None):
    # A Beam runner or Beam options given to TFDS: the examples come from a Beam pipeline.
    self._on_beam = bool(
        download_config
        and (download_config.beam_runner or download_config.beam_options)
    )
    return super()._download_and_prepare(dl_manager, download_config)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    if (
        self.builder_config.phantom is not None
    ):  # The phantom needs no download.
      return {'train': self._generate_examples()}
    return {
        'train': self._generate_examples(
            dl_manager.manual_dir, dl_manager.download_dir
        )
    }

  def _generate_examples(self, manual_dir=None, download_dir=None):
    if self.builder_config.phantom is not None:
      return self._generate_synthetic(self.builder_config.phantom)
    return self._generate_tcia(manual_dir, download_dir)

  def _generate_synthetic(self, spec: phantom.PhantomSpec):
    # Patients are pure functions of (seed, index): render them in parallel processes, in order.
    # Each one's truth goes into the metadata as it comes, which TFDS writes once the records are.
    truths = self.info.metadata.setdefault(phantom.ORACLE_TRUTH, {})
    with _process_pool() as pool:
      for example, truth in pool.map(
          phantom.render_example,
          itertools.repeat(spec),
          range(spec.num_patients),
          chunksize=4,
      ):
        truths[example['patient_id']] = truth
        yield example['patient_id'], example

  def _generate_tcia(self, manual_dir, download_dir):
    """Discovers the download (DICOM headers, in a local pool), then processes the patients in
    parallel, one patient per worker at a time: in a local pool, or as a Beam pipeline.

    Each patient's result is cached under `download_dir`, keyed by the spec, the clinical record
    and the patient's files (paths, sizes, times): a build interrupted half-way and restarted only
    processes the patients it had not finished, and finishes with the same records.
    """
    spec = self.builder_config.tcia
    with _process_pool() as pool:
      patients, issues = tcia.discover(
          manual_dir, map_fn=functools.partial(pool.map, chunksize=256)
      )
    clinical = tcia.read_clinical(manual_dir)
    cache_dir = os.path.join(download_dir, 'ispy2_tcia_cache')
    os.makedirs(cache_dir, exist_ok=True)
    report = tcia_build.BuildReport(
        found=len(patients), issues=[i._asdict() for i in issues]
    )
    jobs = [
        (patients[pid], clinical.get(pid), spec, cache_dir)
        for pid in sorted(patients)
    ]
    report_path = os.path.join(self.data_dir, tcia_build.REPORT_FILE)
    if self._on_beam:
      return tcia_build.beam_pipeline(
          jobs, report, report_path, spec, self._skips_are_fatal
      )
    return self._process_locally(jobs, report, report_path, spec)

  def _process_locally(self, jobs, report, report_path, spec):
    with _process_pool() as pool:
      yield from tcia_build.process_locally(
          pool, jobs, report, report_path, spec, self._skips_are_fatal
      )


def _process_pool() -> loky.ProcessPoolExecutor:
  """The build's worker processes, safe to start from any caller.

  loky starts each worker by fork + exec (not a fork of the caller, which may already run JAX's
  threads) and, unlike multiprocessing's 'spawn', does not re-import the caller's `__main__`: a build
  runs the same from a guarded script, a guard-less one, stdin or a notebook. The workers run
  functions of importable modules (not of this one, which `tfds build` imports by file path). How
  many: $ISPY2_WORKERS, else as many as the cores and the available memory allow
  (`tcia_build.pool_size`).
  """
  workers, why = tcia_build.pool_size()
  logging.info('ispy2: %d worker processes (%s)', workers, why)
  return loky.ProcessPoolExecutor(workers)
