"""From the TFDS `ispy2` records to batches on the device: folds, representation, normalisation, augmentation.

Data flows one way: `load_source` (builds the dataset on first use) -> `read_cohort` (labels and strata
of every patient, for the folds; `load_cohort` keeps it per process) -> `load_examples` (decode +
represent once per process, as stacked arrays) -> placed on the device once per run -> per epoch,
`epoch_batches` says which rows (on the device at once), and per step `device_batch` (inside the
jitted step) gathers and augments its batch there. An epoch then costs its steps: no host work, no
transfer.
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from pcrjax import console, ftv, runs
from tfds_ispy2.ispy2 import ispy2_dataset_builder  # noqa: F401  (registers the `ispy2` builder)
from tfds_ispy2.ispy2 import geometry, schema

NUM_CLINICAL = schema.RECEPTORS.shape[1]


def load_source(data: ml_collections.ConfigDict, *, with_images: bool = True):
  """The `train` split of `data.dataset` as a random-access source, built on first use.

  `with_images=False` leaves `images` and `tumor_mask` undecoded (bytes): reading every patient's
  labels for the folds is then ~6x faster, as it skips decompressing the volumes.
  """
  builder = tfds.builder(
      data.dataset, data_dir=data.data_dir or None, file_format='array_record'
  )
  if not builder.is_prepared():
    console.say(
        f'Building {data.dataset} into {builder.data_dir} (first use; later runs reuse'
        ' it).'
    )
    builder.download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(
            manual_dir=data.manual_dir or None
        ),
    )
  decoders = (
      None
      if with_images
      else {
          'images': tfds.decode.SkipDecoding(),
          'tumor_mask': tfds.decode.SkipDecoding(),
      }
  )
  return builder.as_data_source(split='train', decoders=decoders)


@dataclasses.dataclass(frozen=True)
class Cohort:
  """The per-patient fields the folds, the loss and the reports need, indexed by source row."""

  patient_id: np.ndarray  # str
  pcr: np.ndarray  # int
  subtype: np.ndarray  # int
  arm: np.ndarray  # str
  visit_mask: np.ndarray  # bool [N, 4]
  subtype_names: tuple[str, ...]  # The ClassLabel names of `subtype`.

  def __len__(self) -> int:
    return len(self.patient_id)

  @property
  def receptors(self) -> np.ndarray:
    """[N, NUM_CLINICAL] float32 (HR, HER2) status, 1 = positive: the networks' clinical inputs."""
    return schema.RECEPTORS[self.subtype]

  def prediction_rows(
      self, rows: np.ndarray, probs: np.ndarray, fold: int
  ) -> list[dict]:
    """The predictions of source rows `rows`, in the run contract's schema."""
    return [
        runs.prediction_row(
            patient_id=self.patient_id[r],
            label=self.pcr[r],
            prob=p,
            subtype=self.subtype_names[self.subtype[r]],
            fold=fold,
            arm=self.arm[r],
        )
        for r, p in zip(rows, probs)
    ]


def read_cohort(source) -> Cohort:
  """One pass over the records, keeping only the small per-patient fields (not the images)."""
  fields = []
  for i in range(len(source)):
    r = source[i]
    fields.append(
        (
            text(r['patient_id']),
            r['pcr'],
            r['subtype'],
            text(r['arm']),
            np.asarray(r['visit_mask'], bool),
        )
    )
  patient_id, pcr, subtype, arm, visit_mask = zip(*fields)
  return Cohort(
      patient_id=np.array(patient_id),
      pcr=np.array(pcr, np.int64),
      subtype=np.array(subtype, np.int64),
      arm=np.array(arm),
      visit_mask=np.stack(visit_mask),
      subtype_names=tuple(source.dataset_info.features['subtype'].names),
  )


_COHORTS: dict[tuple, Cohort] = {}


def load_cohort(data: ml_collections.ConfigDict) -> Cohort:
  """`read_cohort` of `data.dataset` (built on first use), once per process and built dataset: a
  protocol's trainings and reference fits all read the same cohort."""
  source = load_source(data, with_images=False)
  key = _built_split(source)
  if key not in _COHORTS:
    _COHORTS[key] = read_cohort(source)
  return _COHORTS[key]


def _built_split(source) -> tuple[str, str]:
  """What a per-process memo of a source is keyed on: its built dataset's directory and split."""
  return source.dataset_info.data_dir, str(source.split)


def text(value) -> str:
  """A TFDS text field (bytes or str) as str."""
  return value.decode() if isinstance(value, bytes) else str(value)


# --- Representation: one patient record -> model input (numpy, per example). ---------------------


def normalise(images: np.ndarray, visit_mask: np.ndarray) -> np.ndarray:
  """Divides all visits and phases by one per-patient scale: the 99th percentile of T0 pre-contrast.

  One scale for the whole patient keeps both the enhancement (phase ratios) and the change between
  visits, which is what carries the response, while removing the scanner's arbitrary units.
  """
  reference = images[0, 0] if visit_mask[0] else images[visit_mask][0, 0]
  scale = np.percentile(reference, 99.0)
  return images / max(float(scale), 1e-6)


# What each visit's voxels carry, by `data.channels`. 'subtraction': the pre-contrast image and the
# two subtraction images, in the patient's units. 'kinetic': the ratios radiologists read, which
# cancel what changes from visit to visit without the tumour changing (receiver gain, coil
# sensitivity): percent enhancement PE = (S1 - S0) / S0 at the early and the late phase (as a
# fraction), and the signal enhancement ratio SER = (S1 - S0) / (S2 - S0) of enhancing voxels
# (SER > 1: washout, the malignant pattern; 0 where PE < 70 %, the FTV threshold).
CHANNELS = {
    'subtraction': ('pre', 'early - pre', 'late - pre'),
    'kinetic': ('pre', 'PE early', 'PE late', 'SER'),
}
# S0 is floored at this fraction of the patient's scale (air and suppressed fat would divide by
# noise), and the ratios are clipped to what enhancing tissue shows.
S0_FLOOR = 0.1
PE_RANGE = (-1.0, 5.0)
ENHANCING_PE = 0.7
SER_MAX = 3.0
# Per visit, from its FTV voxels: log FTV (cm^3, floored at 0.1) and the mean of each kinetic map.
KINETICS = ('log FTV (cm3)', 'mean PE early', 'mean PE late', 'mean SER')
NUM_KINETICS = len(KINETICS)
_FTV_FLOOR_CM3 = 0.1


def visit_shape(data: ml_collections.ConfigDict) -> tuple[int, ...]:
  """[*spatial, C] of one visit as `represent` gives it: the H x W MIP or the D x H x W crop."""
  d, h, w = (int(s) for s in data.crop_size)
  return ((h, w) if data.representation == 'mip' else (d, h, w)) + (
      len(CHANNELS[data.channels]),
  )


def kinetic_maps(images: np.ndarray) -> np.ndarray:
  """[V, 3 phases, *spatial] (normalised) -> [V, 3, *spatial]: PE early, PE late and SER per voxel."""
  pre, early, late = images[:, 0], images[:, 1], images[:, 2]
  s0 = np.maximum(pre, S0_FLOOR)
  washin, late_gain = early - pre, late - pre
  pe_early = np.clip(washin / s0, *PE_RANGE)
  pe_late = np.clip(late_gain / s0, *PE_RANGE)
  enhancing = washin >= ENHANCING_PE * s0
  # washin / SER_MAX floors the denominator: SER <= SER_MAX, and no division by zero or a negative.
  ser = np.where(
      enhancing,
      washin / np.maximum(late_gain, np.maximum(washin, 1e-6) / SER_MAX),
      0.0,
  )
  return np.stack([pe_early, pe_late, ser], axis=1)


def to_channels(
    images: np.ndarray, channels: str = 'subtraction'
) -> np.ndarray:
  """[V, 3 phases, *spatial] (normalised) -> [V, *spatial, C], C = len(CHANNELS[channels])."""
  pre, early, late = images[:, 0], images[:, 1], images[:, 2]
  if channels == 'subtraction':
    return np.stack([pre, early - pre, late - pre], axis=-1)
  return np.moveaxis(
      np.concatenate([pre[:, None], kinetic_maps(images)], axis=1), 1, -1
  )


def tumour_kinetics(
    images: np.ndarray, ftv_voxels: np.ndarray, spacing_mm
) -> np.ndarray:
  """[V, NUM_KINETICS] per visit (KINETICS) from normalised images [V, 3, D, H, W] and the FTV voxels
  [V, D, H, W] (pcrjax.ftv.ftv_masks): what the I-SPY biomarker and the kinetic literature read,
  handed to the networks' head with `model.tumour_kinetics`. A visit without FTV voxels: the
  floored volume and zero kinetics."""
  maps = kinetic_maps(images)
  count = ftv_voxels.sum(axis=(1, 2, 3))
  means = (maps * ftv_voxels[:, None]).sum(axis=(2, 3, 4)) / np.maximum(
      count, 1
  )[:, None]
  cm3 = count * float(np.prod(np.asarray(spacing_mm, np.float64))) / 1000.0
  return np.concatenate(
      [np.log(np.maximum(cm3, _FTV_FLOOR_CM3))[:, None], means], axis=1
  ).astype(np.float32)


def tumour_centre(mask: np.ndarray, fallback: np.ndarray) -> np.ndarray:
  """The centroid of the tumour (FTV) voxels; after a complete response, of the radiologist's VOI."""
  for code in (schema.TUMOUR, schema.VOI):
    centre = geometry.centroid(mask == code)
    if centre is not None:
      return centre
  return fallback


def represent(
    record: dict,
    *,
    time_points,
    representation: str,
    crop_size,
    channels: str = 'subtraction',
) -> dict[str, np.ndarray]:
  """One patient record -> {'images': [T, *spatial, C] float32, 'visit_mask': [T] bool, 'tumour':
  [T, *spatial] bool (the tumour voxels in the same crop: for display and attribution checks),
  'kinetics': [T, NUM_KINETICS] float32 (`tumour_kinetics`, from the whole volume), 'ftv_mm3': [4]
  float64 (`ftv.ftv_per_visit` of every visit: the FTV reference model's input, from the same
  decoding)}.

  Each visit is cropped around its own tumour (a missing mask: the T0 tumour, then the volume centre),
  which aligns the visits on the tumour. `volume`: the [D, H, W] = `crop_size` crop. `mip`: maximum
  intensity projections through all slices of the in-plane crop `crop_size[1:]` (axial MIPs, as
  radiologists read subtraction MIPs), of each channel computed in 3D first.
  """
  time_points = list(time_points)
  visit_mask = np.asarray(record['visit_mask'], bool)
  images = normalise(np.asarray(record['images'], np.float32), visit_mask)
  ftv_voxels = ftv.ftv_masks(record)
  kinetics = tumour_kinetics(images, ftv_voxels, record['spacing_mm'])[
      time_points
  ]
  channels = to_channels(images, channels)[time_points]  # [T, D, H, W, C]
  masks = np.asarray(record['tumor_mask'])
  centre_t0 = tumour_centre(masks[0], (np.array(masks.shape[1:]) - 1) / 2)
  size = tuple(crop_size)
  if representation == 'mip':
    size = (channels.shape[1],) + size[1:]
  centres = [tumour_centre(masks[t], centre_t0) for t in time_points]
  crops = np.stack(
      [geometry.crop(visit, c, size) for visit, c in zip(channels, centres)]
  )
  tumour = np.stack(
      [
          geometry.crop(masks[t] == schema.TUMOUR, c, size)
          for t, c in zip(time_points, centres)
      ]
  )
  if representation == 'mip':
    crops, tumour = crops.max(axis=1), tumour.max(axis=1)
  return {
      'images': crops.astype(np.float32),
      'visit_mask': visit_mask[time_points],
      'tumour': tumour,
      'kinetics': kinetics,
      'ftv_mm3': ftv.ftv_per_visit(record, ftv_voxels),
  }


def augment(
    images: jax.Array,
    key: jax.Array,
    *,
    max_shift: int,
    intensity_jitter: float,
    tumour: jax.Array | None = None,
):
  """A random left-right flip, in-plane shift and intensity scale per patient, the same for its visits.

  images: [B, T, *spatial, C], the two axes before the channels in-plane (H, W). Left-right flips are
  anatomically plausible (either breast); the shift (zero fill) stands for positioning, the scale
  for receiver gain. Nothing here changes the contrast between visits. With `tumour` ([B, T,
  *spatial] masks of the same crops), returns (images, tumour), the masks flipped and shifted with
  their images.
  """
  batch = images.shape[0]
  flip_key, shift_key, scale_key = jax.random.split(key, 3)
  per_patient = (batch,) + (1,) * (images.ndim - 1)
  flip = jax.random.bernoulli(flip_key, 0.5, (batch,)).reshape(per_patient)
  shifts = jax.random.randint(shift_key, (batch, 2), -max_shift, max_shift + 1)
  shift = jax.vmap(functools.partial(_shift_in_plane, max_shift=max_shift))

  def move(x):
    return shift(jnp.where(flip, x[..., ::-1, :], x), shifts)

  scale = jnp.exp(intensity_jitter * jax.random.normal(scale_key, (batch,)))
  images = move(images) * scale.reshape(per_patient).astype(images.dtype)
  if tumour is None:
    return images
  return images, move(tumour[..., None])[..., 0]


def _shift_in_plane(
    images: jax.Array, shift: jax.Array, *, max_shift: int
) -> jax.Array:
  """Translates the H, W axes (the two before the channels) by `shift`, |shift| <= max_shift, zero fill."""
  h, w = images.ndim - 3, images.ndim - 2
  pad = [(0, 0)] * images.ndim
  pad[h] = pad[w] = (max_shift, max_shift)
  start = [0] * images.ndim
  start[h], start[w] = max_shift - shift[0], max_shift - shift[1]
  return jax.lax.dynamic_slice(jnp.pad(images, pad), start, images.shape)


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """The augmentation of a run (hashable: a static argument of the jitted step)."""

  max_shift: int
  intensity_jitter: float


def augmentation(data: ml_collections.ConfigDict) -> Augmentation | None:
  return (
      Augmentation(int(data.max_shift), float(data.intensity_jitter))
      if data.augment
      else None
  )


def device_batch(
    examples: dict[str, jax.Array],
    rows: jax.Array,
    key: jax.Array,
    augmentation: Augmentation | None,
) -> dict[str, jax.Array]:
  """The training batch of `rows` (indices into `examples`), gathered and augmented on the device."""
  names = (
      'images',
      'visit_mask',
      'clinical',
      'kinetics',
      'tumour',
      'label',
      'target',
      'target_mask',
  )
  batch = {name: examples[name][rows] for name in names if name in examples}
  if augmentation is not None:
    batch['images'], batch['tumour'] = augment(
        batch['images'],
        key,
        max_shift=augmentation.max_shift,
        intensity_jitter=augmentation.intensity_jitter,
        tumour=batch['tumour'],
    )
  return batch


def epoch_batches(
    num_examples: int, *, batch_size: int, seed: int, epoch: int
) -> np.ndarray:
  """[steps, batch_size] example indices of one epoch: shuffled, full batches; deterministic from
  (seed, epoch)."""
  if num_examples < batch_size:
    raise ValueError(
        f'The training split has {num_examples} patients, fewer than'
        f' batch_size={batch_size}.'
    )
  order = np.random.default_rng(
      np.random.SeedSequence([seed, epoch])
  ).permutation(num_examples)
  steps = num_examples // batch_size
  return order[: steps * batch_size].reshape(steps, batch_size).astype(np.int32)


# --- Examples: decoded and represented once per process. -----------------------------------------


class _Represent(grain.transforms.Map):

  def __init__(self, source, kwargs: dict):
    self._source, self._kwargs = source, kwargs

  def map(self, row: int) -> dict:
    return represent(self._source[int(row)], **self._kwargs)


def load_examples(
    source, cohort: Cohort, rows: np.ndarray, data: ml_collections.ConfigDict
) -> dict[str, np.ndarray]:
  """The model inputs of source rows `rows`, stacked: images, visit_mask, kinetics, tumour, clinical,
  label, row.

  Every visit of every patient of the source is decoded and represented (in `data.read_threads`
  threads) once per process and representation, then kept: the inputs are small next to the stored
  volumes, decoding dominates an epoch on a CPU, and a protocol's trainings all read the same
  patients.
  """
  represented = _represented_cohort(source, data)
  rows, visits = np.asarray(rows), list(data.time_points)
  return {
      'images': represented['images'][rows][:, visits],
      'visit_mask': represented['visit_mask'][rows][:, visits],
      'kinetics': represented['kinetics'][rows][:, visits],
      'tumour': represented['tumour'][rows][:, visits],
      'clinical': cohort.receptors[rows],
      'label': cohort.pcr[rows].astype(np.int32),
      'row': rows.astype(np.int32),
  }


def ftv_mm3(source, data: ml_collections.ConfigDict) -> np.ndarray:
  """[N, 4] FTV (mm^3, NaN at a missing visit) of every source row, from the pass that `load_examples`
  keeps: the reference models need no second decoding of the cohort."""
  return _represented_cohort(source, data)['ftv_mm3']


def _represented_cohort(source, data: ml_collections.ConfigDict) -> dict:
  return _represented(
      source,
      int(data.read_threads),
      representation=data.representation,
      crop_size=tuple(int(s) for s in data.crop_size),
      channels=data.channels,
  )


_REPRESENTED: dict[tuple, dict[str, np.ndarray]] = {}


def _represented(source, read_threads: int, **kwargs) -> dict[str, np.ndarray]:
  """`represent` of every visit of every row of `source`, memoised on the built dataset (its directory
  and split) and the representation; one is kept at a time (a 3D cohort takes a few hundred MB).
  """
  key = _built_split(source) + (tuple(sorted(kwargs.items())),)
  kwargs['time_points'] = tuple(range(schema.NUM_VISITS))
  if key not in _REPRESENTED:
    ds = grain.MapDataset.source(np.arange(len(source))).map(
        _Represent(source, kwargs)
    )
    examples = list(
        ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads))
    )
    _REPRESENTED.clear()
    _REPRESENTED[key] = {
        name: np.stack([e[name] for e in examples]) for name in examples[0]
    }
  return _REPRESENTED[key]
