"""From the TFDS `ispy2` records to sharded batches: folds, representation, normalisation, augmentation.

Data flows one way: `load_source` (builds the dataset on first use) -> `read_cohort` (labels and strata
of every patient, for the folds) -> `load_examples` (decode + represent, once per run) ->
`train_dataset` / `eval_dataset` (grain: shuffle, augment, batch) -> batches of numpy arrays, which
train.py places on the mesh.
"""

from __future__ import annotations

import dataclasses

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from pcrjax import runs
from tfds_ispy2.ispy2 import ispy2_dataset_builder  # noqa: F401  (registers the `ispy2` builder)
from tfds_ispy2.ispy2 import schema

NUM_CLINICAL = schema.RECEPTORS.shape[1]


def load_source(data: ml_collections.ConfigDict, *, with_images: bool = True):
  """The `train` split of `data.dataset` as a random-access source, built on first use.

  `with_images=False` leaves `images` and `tumor_mask` undecoded (bytes): reading every patient's
  labels for the folds is then ~6x faster, as it skips decompressing the volumes.
  """
  builder = tfds.builder(data.dataset, data_dir=data.data_dir or None, file_format='array_record')
  if not builder.is_prepared():
    logging.info('Building %s into %s (first use; later runs reuse it).', data.dataset, builder.data_dir)
    builder.download_and_prepare(file_format='array_record', download_config=tfds.download.DownloadConfig(
        manual_dir=data.manual_dir or None))
  decoders = None if with_images else {
      'images': tfds.decode.SkipDecoding(), 'tumor_mask': tfds.decode.SkipDecoding()}
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

  def prediction_rows(self, rows: np.ndarray, probs: np.ndarray, fold: int) -> list[dict]:
    """The predictions of source rows `rows`, in the run contract's schema."""
    return [runs.prediction_row(patient_id=self.patient_id[r], label=self.pcr[r], prob=p,
                                subtype=self.subtype_names[self.subtype[r]], fold=fold, arm=self.arm[r])
            for r, p in zip(rows, probs)]


def read_cohort(source) -> Cohort:
  """One pass over the records, keeping only the small per-patient fields (not the images)."""
  fields = []
  for i in range(len(source)):
    r = source[i]
    fields.append((_text(r['patient_id']), r['pcr'], r['subtype'], _text(r['arm']),
                   np.asarray(r['visit_mask'], bool)))
  patient_id, pcr, subtype, arm, visit_mask = zip(*fields)
  return Cohort(
      patient_id=np.array(patient_id), pcr=np.array(pcr, np.int64),
      subtype=np.array(subtype, np.int64), arm=np.array(arm), visit_mask=np.stack(visit_mask),
      subtype_names=tuple(source.dataset_info.features['subtype'].names))


def _text(value) -> str:
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


def to_channels(images: np.ndarray) -> np.ndarray:
  """[V, 3 phases, *spatial] -> [V, *spatial, 3]: pre-contrast and the two subtraction images."""
  pre, early, late = images[:, 0], images[:, 1], images[:, 2]
  return np.stack([pre, early - pre, late - pre], axis=-1)


def tumour_centre(mask: np.ndarray, fallback: np.ndarray) -> np.ndarray:
  """The centroid of the tumour (FTV) voxels; after a complete response, of the radiologist's VOI."""
  voxels = np.argwhere(mask == schema.TUMOUR)
  if not len(voxels):
    voxels = np.argwhere(mask == schema.VOI)
  return voxels.mean(axis=0) if len(voxels) else fallback


def crop_around(volume: np.ndarray, centre: np.ndarray, size) -> np.ndarray:
  """A [*size, C] crop of a [D, H, W, C] volume centred on `centre`, zero-padded at the borders."""
  starts = [int(round(c - (s - 1) / 2)) for c, s in zip(centre, size)]
  pad = [(max(0, -st), max(0, st + s - n)) for st, s, n in zip(starts, size, volume.shape)]
  padded = np.pad(volume, pad + [(0, 0)])
  index = tuple(slice(st + p[0], st + p[0] + s) for st, s, p in zip(starts, size, pad))
  return padded[index]


def represent(record: dict, *, time_points, representation: str, crop_size) -> dict[str, np.ndarray]:
  """One patient record -> {'images': [T, *spatial, 3] float32, 'visit_mask': [T] bool}.

  Each visit is cropped around its own tumour (a missing mask: the T0 tumour, then the volume centre),
  which aligns the visits on the tumour. `volume`: the [D, H, W] = `crop_size` crop. `mip`: maximum
  intensity projections through all slices of the in-plane crop `crop_size[1:]` (axial MIPs, as
  radiologists read subtraction MIPs).
  """
  time_points = list(time_points)
  images = np.asarray(record['images'], np.float32)
  visit_mask = np.asarray(record['visit_mask'], bool)
  channels = to_channels(normalise(images, visit_mask))[time_points]  # [T, D, H, W, 3]
  masks = np.asarray(record['tumor_mask'])
  centre_t0 = tumour_centre(masks[0], (np.array(masks.shape[1:]) - 1) / 2)
  size = tuple(crop_size)
  if representation == 'mip':
    size = (channels.shape[1],) + size[1:]
  crops = np.stack([crop_around(visit, tumour_centre(masks[t], centre_t0), size)
                    for visit, t in zip(channels, time_points)])
  if representation == 'mip':
    crops = crops.max(axis=1)
  return {'images': crops.astype(np.float32), 'visit_mask': visit_mask[time_points]}


def augment(element: dict, rng: np.random.Generator, *, max_shift: int, intensity_jitter: float) -> dict:
  """The same random left-right flip, in-plane shift and intensity scale for all visits of a patient.

  Left-right flips are anatomically plausible (either breast); the shift stands for positioning, the
  scale for receiver gain. Nothing here changes the contrast between visits.
  """
  images = element['images']
  if rng.random() < 0.5:
    images = images[..., ::-1, :]
  shifts = rng.integers(-max_shift, max_shift + 1, size=2)
  images = _shift_in_plane(images, shifts)
  images = images * np.float32(np.exp(rng.normal(0.0, intensity_jitter)))
  return {**element, 'images': np.ascontiguousarray(images, np.float32)}


def _shift_in_plane(images: np.ndarray, shifts) -> np.ndarray:
  """Translates the H, W axes (the two before the channels) with zero fill."""
  out = np.zeros_like(images)
  src, dst = [slice(None)] * images.ndim, [slice(None)] * images.ndim
  for axis, shift in zip((images.ndim - 3, images.ndim - 2), shifts):
    n = images.shape[axis]
    src[axis] = slice(max(0, -shift), n - max(0, shift))
    dst[axis] = slice(max(0, shift), n - max(0, -shift))
  out[tuple(dst)] = images[tuple(src)]
  return out


# --- grain datasets. --------------------------------------------------------------------------------


class _Represent(grain.transforms.Map):

  def __init__(self, source, cohort: Cohort, data: ml_collections.ConfigDict):
    self._source, self._cohort = source, cohort
    self._kwargs = dict(time_points=tuple(data.time_points), representation=data.representation,
                        crop_size=tuple(data.crop_size))

  def map(self, row: int) -> dict:
    element = represent(self._source[int(row)], **self._kwargs)
    element.update(label=np.int32(self._cohort.pcr[row]), clinical=self._cohort.receptors[row],
                   row=np.int32(row), valid=np.bool_(True))
    return element


def load_examples(source, cohort: Cohort, rows: np.ndarray, data: ml_collections.ConfigDict) -> list[dict]:
  """Decodes and represents `rows` once per run (in `data.read_threads` threads).

  The model inputs are small next to the stored volumes, and decoding dominates an epoch on a CPU:
  epochs then only shuffle, augment and batch these arrays.
  """
  ds = grain.MapDataset.source(np.asarray(rows)).map(_Represent(source, cohort, data))
  return list(ds.to_iter_dataset(grain.ReadOptions(num_threads=data.read_threads)))


class _Augment(grain.transforms.RandomMap):

  def __init__(self, data: ml_collections.ConfigDict):
    self._max_shift, self._jitter = int(data.max_shift), float(data.intensity_jitter)

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    return augment(element, rng, max_shift=self._max_shift, intensity_jitter=self._jitter)


def train_dataset(examples: list[dict], data: ml_collections.ConfigDict, *, batch_size: int, seed: int,
                  epoch: int) -> grain.MapDataset:
  """One epoch of shuffled, augmented, full batches; deterministic from (seed, epoch)."""
  if len(examples) < batch_size:
    raise ValueError(f'The training split has {len(examples)} patients, fewer than'
                     f' batch_size={batch_size}.')
  epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
  ds = grain.MapDataset.source(examples).shuffle(seed=epoch_seed)
  if data.augment:
    ds = ds.random_map(_Augment(data), seed=epoch_seed)
  return ds.batch(batch_size, drop_remainder=True)


def eval_dataset(examples: list[dict], *, batch_size: int) -> grain.MapDataset:
  """Every example once, in order; the last batch is padded with `valid=False` copies of the first."""
  padding = [{**examples[0], 'valid': np.bool_(False)}] * (-len(examples) % batch_size)
  return grain.MapDataset.source(examples + padding).batch(batch_size)
