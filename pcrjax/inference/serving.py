"""Serving an exported model: new patients' predictions (CLI: pcrjax.predict).

The scans are read by the `tcia` build's own reader (`tcia.read_images`: phases, resampling, tumour
mask, crop; no label needed) and represented exactly as in training (`input_pipeline.represent`).
Every member of the ensemble predicts; its calibrator maps its probability; the answer is their mean
with the spread. `prediction.json` and `prediction.html` (the inputs with the tumour outline, an
integrated-gradients saliency map per visit, the model card's headline, the research-use warning)
go to OUT. Only the de-identified PatientID and numbers reach the outputs.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import functools
import html
import io
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from pcrjax import checkpoints, fileio, input_pipeline, models, runs
from pcrjax.evidence import calibration
from tfds_ispy2.ispy2 import schema, tcia

SALIENCY_STEPS = (
    16  # Riemann steps of integrated gradients from an all-zero input.
)


@dataclasses.dataclass(frozen=True)
class Ensemble:
  description: dict
  model: object  # The members' shared architecture (a PCRNet).
  params: list  # One params tree per member.
  calibrators: list[calibration.Calibrator]

  @property
  def preprocessing(self) -> dict:
    return self.description['preprocessing']

  @property
  def visits(self) -> tuple[int, ...]:
    """The visits its members predict from (the exported network's time points)."""
    return runs.model(self.description['model']).time_points

  def visit_names(self) -> str:
    return ' and '.join(schema.VISITS[v] for v in self.visits)


def load_model(model_dir: str) -> Ensemble:
  """The exported ensemble, from MODEL_DIR alone."""
  path = os.path.join(model_dir, runs.MODEL_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{model_dir} is not an exported model (no {runs.MODEL_FILE}): write one'
        ' with python -m pcrjax.export --run=PROTOCOL_WORKDIR --out=MODEL_DIR'
    )
  with open(path) as f:
    description = json.load(f)
  params, calibrators, model = [], [], None
  for member in description['members']:
    member_dir = runs.member_dir(model_dir, member['name'])
    config = runs.read_config(member_dir)
    model = models.build(config, member['feature_dim'])
    like = models.abstract_params(model, models.patient_shape(config.data))
    with ocp.StandardCheckpointer() as checkpointer:
      params.append(
          checkpointer.restore(
              os.path.join(member_dir, runs.PARAMS_DIR),
              checkpoints.abstract(like),
          )
      )
    calibrators.append(calibration.Calibrator.from_dict(member['calibrator']))
  return Ensemble(
      description=description,
      model=model,
      params=params,
      calibrators=calibrators,
  )


# --- Reading a patient. ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Patient:
  patient_id: str
  record: dict  # images, visit_mask, tumor_mask as in an ispy2 record (T0 and T1 only).
  clinical: np.ndarray  # [NUM_CLINICAL] (HR, HER2), 1 = positive.
  inputs: dict  # What was read: mask source, phases, per visit.
  warnings: list[str]


def _receptors(
    hr: int | None, her2: int | None, ensemble: Ensemble, patient_id: str
) -> np.ndarray:
  if ensemble.preprocessing['clinical_inputs'] and (hr is None or her2 is None):
    raise ValueError(
        f'{patient_id}: this model reads HR and HER2 status; pass --hr and --her2 (0 or 1).'
    )
  return np.array([hr or 0, her2 or 0], np.float32)


def read_dicom_patient(
    files: tcia.PatientFiles, ensemble: Ensemble, *, hr=None, her2=None
) -> Patient:
  """One patient's visits that the model reads, through the build's reader; a missing one stops
  with what was found (the first, as the build's reader does: tcia.Skip)."""
  pid = files.patient_id
  visits, later = ensemble.visits, ensemble.visits[1:]
  found = [
      schema.VISITS[v] for v, f in enumerate(files.visits) if f is not None
  ]
  warnings = [
      f'{schema.VISITS[v]} found and ignored: the model predicts from'
      f' {ensemble.visit_names()}.'
      for v, f in enumerate(files.visits)
      if f is not None and v not in visits
  ]
  for v in later:
    if files.visits[v] is None:
      raise ValueError(
          f'{pid}: no {schema.VISITS[v]} study with a DCE series (found:'
          f' {", ".join(found) or "no visit"}).'
      )
  spec = tcia.TciaSpec()
  arrays, issues, meta = tcia.read_images(files, spec, visits=visits)
  for v in later:
    if not arrays['visit_mask'][v]:
      reasons = '; '.join(
          f'{i.reason}: {i.detail}' for i in issues if i.visit == v
      )
      raise ValueError(
          f'{pid}: {schema.VISITS[v]} could not be used ({reasons}).'
      )
  warnings += [
      f'{schema.VISITS[i.visit] if i.visit is not None else "-"} {i.reason}: {i.detail}'
      for i in issues
  ]
  inputs = {
      schema.VISITS[v]: {
          k: meta[k][v]
          for k in (
              'mask_source',
              'phase_indices',
              'phase_times_s',
              'num_phases',
          )
      }
      for v in visits
  }
  return Patient(
      pid, arrays, _receptors(hr, her2, ensemble, pid), inputs, warnings
  )


def read_record_patient(
    spec: str, ensemble: Ensemble, *, data_dir: str = '', hr=None, her2=None
) -> Patient:
  """`DATASET:PATIENT_ID` from a built TFDS dataset (its labels are not read)."""
  dataset, _, pid = spec.rpartition(':')
  data = ml_collections.ConfigDict(
      {'dataset': dataset, 'data_dir': data_dir, 'manual_dir': ''}
  )
  ids = input_pipeline.load_cohort(data).patient_id
  rows = np.flatnonzero(ids == pid)
  if not len(rows):
    raise ValueError(f'{pid}: no such patient in {dataset}.')
  record = input_pipeline.load_source(data)[int(rows[0])]
  if hr is None and her2 is None:
    hr, her2 = (int(x) for x in schema.RECEPTORS[record['subtype']])
  arrays = {
      k: np.asarray(record[k])
      for k in ('images', 'visit_mask', 'tumor_mask', 'spacing_mm')
  }
  warnings = [
      f'{schema.VISITS[v]} found and ignored: the model predicts from'
      f' {ensemble.visit_names()}.'
      for v in range(schema.NUM_VISITS)
      if arrays['visit_mask'][v] and v not in ensemble.visits
  ]
  for v in ensemble.visits:
    if not arrays['visit_mask'][v]:
      raise ValueError(f'{pid}: the record has no {schema.VISITS[v]}.')
  return Patient(
      pid,
      arrays,
      _receptors(hr, her2, ensemble, pid),
      {'record': dataset},
      warnings,
  )


# --- Predicting. ---------------------------------------------------------------------------------


def model_inputs(patient: Patient, ensemble: Ensemble) -> dict[str, np.ndarray]:
  """images [T, *spatial, C] (the patient as the members were trained on it) and its tumour crop."""
  p = ensemble.preprocessing
  return input_pipeline.represent(
      patient.record,
      time_points=ensemble.visits,
      representation=p['representation'],
      crop_size=p['crop_size'],
      channels=p['channels'],
  )


@functools.partial(jax.jit, static_argnums=0)
def _logit(model, params, images, clinical, kinetics, tumour):
  return model.apply(
      {'params': params},
      images[None],
      jnp.ones((1, images.shape[0]), bool),
      clinical[None],
      kinetics[None],
      tumour[None],
      train=False,
  )['logit'][0]


@functools.partial(jax.jit, static_argnums=0)
def integrated_gradients(model, params, images, clinical, kinetics, tumour):
  """Attribution of the logit to each image value, from an all-zero image (Sundararajan et al. 2017);
  the tumour kinetics, tumour mask and clinical inputs stay as they are."""
  alphas = (jnp.arange(SALIENCY_STEPS) + 0.5) / SALIENCY_STEPS
  grad = jax.grad(
      lambda x: _logit(model, params, x, clinical, kinetics, tumour)
  )
  mean_grad = jnp.mean(jax.vmap(lambda a: grad(a * images))(alphas), axis=0)
  return images * mean_grad


def saliency_maps(
    ensemble: Ensemble, inputs: dict[str, np.ndarray], clinical: np.ndarray
) -> np.ndarray:
  """[T, H, W]: |attribution| summed over channels (and depth), averaged over the members."""
  images, kinetics, tumour = (
      jnp.asarray(inputs[k]) for k in ('images', 'kinetics', 'tumour')
  )
  maps = np.mean(
      [
          np.asarray(
              integrated_gradients(
                  ensemble.model,
                  p,
                  images,
                  jnp.asarray(clinical),
                  kinetics,
                  tumour,
              )
          )
          for p in ensemble.params
      ],
      axis=0,
  )
  maps = np.abs(maps).sum(axis=-1)
  return (
      maps.sum(axis=1) if maps.ndim == 4 else maps
  )  # volume: [T, D, H, W] -> [T, H, W].


def predict_patient(patient: Patient, ensemble: Ensemble) -> dict:
  inputs = model_inputs(patient, ensemble)
  x, kinetics, tumour = (
      jnp.asarray(inputs[k]) for k in ('images', 'kinetics', 'tumour')
  )
  clinical = jnp.asarray(patient.clinical)
  raw = [
      float(
          jax.nn.sigmoid(
              _logit(ensemble.model, p, x, clinical, kinetics, tumour)
          )
      )
      for p in ensemble.params
  ]
  calibrated = [
      float(c(np.array([r]))[0]) for c, r in zip(ensemble.calibrators, raw)
  ]
  d = ensemble.description
  return {
      'patient_id': patient.patient_id,
      'probability': float(np.mean(calibrated)),
      'spread': {
          'sd': float(np.std(calibrated)),
          'min': float(np.min(calibrated)),
          'max': float(np.max(calibrated)),
      },
      'members': [
          {'name': m['name'], 'probability': c, 'uncalibrated': r}
          for m, c, r in zip(d['members'], calibrated, raw)
      ],
      'model': d['label'],
      'calibration': d['calibration'],
      'code_version': d['code_version'],
      'visits_used': [schema.VISITS[v] for v in ensemble.visits],
      'clinical_inputs': (
          {'hr': int(patient.clinical[0]), 'her2': int(patient.clinical[1])}
          if d['preprocessing']['clinical_inputs']
          else None
      ),
      'inputs': patient.inputs,
      'warnings': patient.warnings,
      'research_use_only': True,
  }


# --- Writing. ------------------------------------------------------------------------------------


def _figure_png(
    images: np.ndarray,
    tumour: np.ndarray,
    maps: np.ndarray,
    channel: str,
    visits: tuple[int, ...],
) -> str:
  """Per visit, `channel` (channel 1 of the representation) beside the saliency."""
  import matplotlib

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  fig, axes = plt.subplots(
      len(visits), 2, figsize=(6, 3 * len(visits)), dpi=110, squeeze=False
  )
  for row, v in enumerate(visits):
    enhancement = images[row, ..., 1]
    enhancement = (
        enhancement.max(axis=0) if enhancement.ndim == 3 else enhancement
    )
    mask = tumour[row].max(axis=0) if tumour[row].ndim == 3 else tumour[row]
    for col, (title, picture) in enumerate(
        ((f'{channel} (MIP)', enhancement), ('saliency', maps[row]))
    ):
      ax = axes[row, col]
      ax.imshow(picture, cmap='gray' if col == 0 else 'inferno')
      ax.contour(mask > 0.5, levels=[0.5], colors='cyan', linewidths=0.8)
      ax.set_title(f'{schema.VISITS[v]}: {title}', fontsize=9)
      ax.axis('off')
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png')
  plt.close(fig)
  return base64.b64encode(buffer.getvalue()).decode()


def write_outputs(
    out_dir: str, result: dict, patient: Patient, ensemble: Ensemble
) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with fileio.atomic_open(os.path.join(out_dir, runs.PREDICTION_FILE)) as f:
    json.dump(result, f, indent=2)
  inputs = model_inputs(patient, ensemble)
  png = _figure_png(
      inputs['images'],
      inputs['tumour'],
      saliency_maps(ensemble, inputs, patient.clinical),
      ensemble.preprocessing['channel_names'][1],
      ensemble.visits,
  )
  e = ensemble.description['evidence']
  s = result['spread']
  warnings = ''.join(f'<li>{html.escape(w)}</li>' for w in result['warnings'])
  page = f"""<!doctype html><html><head><meta charset="utf-8"><title>pCR prediction</title></head>
<body style="font-family: sans-serif; max-width: 720px; margin: auto">
<p style="background:#fee; padding:8px"><b>Research use only.</b> Not a medical device; not for clinical decisions.</p>
<h1>pCR probability {100 * result['probability']:.0f} %</h1>
<p>Patient {html.escape(result['patient_id'])}. {html.escape(result['model'])}: mean of
{len(result['members'])} members' calibrated probabilities (spread: sd {100 * s['sd']:.1f} points,
range {100 * s['min']:.0f}&ndash;{100 * s['max']:.0f} %), from {', '.join(result['visits_used'])}.</p>
<img src="data:image/png;base64,{png}" alt="inputs and saliency" style="width:100%">
<p>Cyan: the tumour mask used for the crop. Saliency: |integrated gradients| of the logit, summed over
channels, averaged over the members.</p>
<h2>The model's evidence</h2>
<p>Out-of-fold AUROC {e['auroc']:.3f} (95 % CI {e['ci_low']:.3f}&ndash;{e['ci_high']:.3f}) on
{int(e['num_patients'])} patients of <code>{html.escape(ensemble.description['dataset'])}</code>; Brier {e['brier']:.3f};
calibration slope {e['calibration_slope']:.2f}. See {runs.MODEL_CARD_FILE} of the model.</p>
{f'<h2>Warnings</h2><ul>{warnings}</ul>' if warnings else ''}
</body></html>
"""
  with fileio.atomic_open(
      os.path.join(out_dir, runs.PREDICTION_PAGE_FILE)
  ) as f:
    f.write(page)


BATCH_FIELDS = (
    'patient_id',
    'status',
    'probability',
    'sd',
    'min',
    'max',
    'reason',
)


def predict_folder(
    patients: dict[str, tcia.PatientFiles],
    ensemble: Ensemble,
    out_dir: str,
    *,
    hr=None,
    her2=None,
) -> list[dict]:
  """One CSV row per patient (runs.BATCH_PREDICTIONS_FILE), each patient's page in OUT/<id>/; a
  patient that fails gets its reason and the others go on."""
  rows = []
  for pid in tqdm.tqdm(sorted(patients), unit='patient'):
    try:
      patient = read_dicom_patient(patients[pid], ensemble, hr=hr, her2=her2)
      result = predict_patient(patient, ensemble)
      write_outputs(os.path.join(out_dir, pid), result, patient, ensemble)
      s = result['spread']
      rows.append(
          {
              'patient_id': pid,
              'status': 'ok',
              'probability': f"{result['probability']:.6f}",
              'sd': f"{s['sd']:.6f}",
              'min': f"{s['min']:.6f}",
              'max': f"{s['max']:.6f}",
              'reason': '',
          }
      )
    except (tcia.Skip, ValueError) as e:
      rows.append(
          {
              'patient_id': pid,
              'status': 'failed',
              'probability': '',
              'sd': '',
              'min': '',
              'max': '',
              'reason': str(e),
          }
      )
  os.makedirs(out_dir, exist_ok=True)
  with fileio.atomic_open(
      os.path.join(out_dir, runs.BATCH_PREDICTIONS_FILE), newline=''
  ) as f:
    writer = csv.DictWriter(f, fieldnames=BATCH_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
  return rows
