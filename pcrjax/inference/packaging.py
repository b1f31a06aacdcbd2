"""A finished protocol run packaged as a self-contained model directory (CLI: pcrjax.export).

The directory holds the ensemble (one member per fold and repeat: its best params as an Orbax
checkpoint and its config), each member's calibrator (fitted on its fold's validation predictions,
as the report does), the preprocessing spec, the code version, and MODEL_CARD.md generated from the
run's evidence. Nothing in it refers back to the training workdir, and nothing in it but
de-identified ids and numbers comes from the patients (the card's figures are aggregates).
"""

from __future__ import annotations

import csv
import json
import os
import shutil

import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from pcrjax import checkpoints, fileio, input_pipeline, models, runs
from pcrjax.evidence import loading
from tfds_ispy2.ispy2 import schema

# The networks that predict from the early visits alone.
EXPORTABLE = tuple(
    m.name for m in runs.MODELS if m.kind == runs.NETWORK and m.early_predictor
)


def export(
    run_dir: str,
    out_dir: str,
    *,
    model_name: str = runs.PRIMARY[1],
    calibrate: str | None = None,
) -> dict:
  """Writes MODEL_DIR; returns its model.json contents."""
  run_dir, out_dir = os.path.abspath(run_dir), os.path.abspath(out_dir)
  if model_name not in EXPORTABLE:
    raise ValueError(
        f'--model={model_name}: only {EXPORTABLE} predict from the early visits.'
    )
  run_config = runs.read_config(run_dir)
  if run_config.get('stage') != 'protocol':
    raise ValueError(
        f'{run_dir} is not a protocol run (its {runs.CONFIG_FILE} has'
        f' stage={run_config.get("stage")!r}).'
    )
  num_repeats, num_folds = (
      run_config.protocol.num_repeats,
      run_config.data.num_folds,
  )
  calibrate = calibrate or run_config.protocol.calibration
  directories = {
      (r, f): runs.stage_dir(run_dir, r, f, model_name)
      for r in range(num_repeats)
      for f in range(num_folds)
  }
  unfinished = [d for d in directories.values() if not runs.is_finished(d)]
  if unfinished:
    raise FileNotFoundError(
        f'{len(unfinished)} of the {model_name} trainings are not finished (e.g.'
        f' {unfinished[0]}): resume the protocol first.'
    )
  tmp = out_dir + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(os.path.join(tmp, runs.MEMBERS_DIR))
  members = []
  for (repeat, fold), directory in directories.items():
    config = runs.read_config(directory)
    feature_dim = runs.feature_dim(config)
    like = models.abstract_params(
        models.build(config, feature_dim), models.patient_shape(config.data)
    )
    manager = checkpoints.create_manager(directory, read_only=True)
    epoch = runs.selected_epoch(directory) or manager.best_step()
    params = checkpoints.restore_params(manager, epoch, like)
    name = runs.member_name(repeat, fold)
    member_dir = runs.member_dir(tmp, name)
    config.teacher_workdir = ''  # The member never needs its teacher again.
    runs.write_config(member_dir, config)
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(member_dir, runs.PARAMS_DIR), params)
    members.append(
        {
            'name': name,
            'repeat': repeat,
            'fold': fold,
            'epoch': int(epoch),
            'feature_dim': feature_dim,
            'calibrator': (
                loading.fold_calibrator(directory, calibrate).to_dict()
            ),
        }
    )
  first = runs.read_config(directories[0, 0])
  spec = runs.model(model_name)
  description = {
      'model': model_name,
      'label': spec.label,
      'time_points': [schema.VISITS[t] for t in spec.time_points],
      'code_version': runs.recorded_code_version(run_dir),
      'calibration': calibrate,
      'dataset': first.data.dataset,
      'preprocessing': {
          'representation': first.data.representation,
          'crop_size': list(first.data.crop_size),
          'target_spacing_mm': list(schema.DEFAULT_SPACING_MM),
          'record_crop_shape': list(schema.DEFAULT_CROP_SHAPE),
          'normalisation': (
              'all visits and phases / the 99th percentile of T0 pre-contrast'
          ),
          'channels': first.data.channels,
          'channel_names': list(input_pipeline.CHANNELS[first.data.channels]),
          'tumour_kinetics': (
              list(input_pipeline.KINETICS)
              if first.model.tumour_kinetics
              else []
          ),
          'clinical_inputs': bool(first.model.clinical_inputs),
      },
      'members': members,
      'evidence': _evidence(run_dir, model_name),
  }
  with fileio.atomic_open(os.path.join(tmp, runs.MODEL_FILE)) as f:
    json.dump(description, f, indent=2)
  with fileio.atomic_open(os.path.join(tmp, runs.MODEL_CARD_FILE)) as f:
    f.write(model_card(description, run_config))
  shutil.rmtree(out_dir, ignore_errors=True)
  os.replace(tmp, out_dir)
  logging.info(
      'Exported %d %s members to %s.', len(members), model_name, out_dir
  )
  return description


def _evidence(run_dir: str, model_name: str) -> dict:
  """The run's own out-of-fold figures for the card and the prediction page (aggregates only)."""
  with open(os.path.join(run_dir, runs.TABLE_FILE), newline='') as f:
    table = {row['name']: row for row in csv.DictReader(f)}
  row = table[model_name]
  keys = (
      'num_patients',
      'num_pcr',
      'auroc',
      'ci_low',
      'ci_high',
      'brier',
      'calibration_intercept',
      'calibration_slope',
      'degenerate',
  )
  evidence = {k: row[k] if k == 'degenerate' else float(row[k]) for k in keys}
  reference = runs.PRIMARY[0]
  evidence['baseline_auroc'] = (
      float(table[reference]['auroc']) if reference in table else None
  )
  subgroups = os.path.join(run_dir, runs.SUBGROUPS_FILE)
  if os.path.exists(subgroups):
    with open(subgroups, newline='') as f:
      evidence['subgroups'] = [
          {
              'kind': r['kind'],
              'group': r['group'],
              'patients': int(r['patients']),
              'auroc': (
                  float(r['auroc']) if r['auroc'] not in ('', 'nan') else None
              ),
          }
          for r in csv.DictReader(f)
          if r['model'] == model_name
      ]
  return evidence


def model_card(description: dict, run_config: ml_collections.ConfigDict) -> str:
  e = description['evidence']
  synthetic = runs.is_synthetic(description['dataset'])
  lines = [
      f"# Model card: pcrjax {description['label']}",
      '',
      '**Research use only.** Not a medical device; not validated for clinical decisions.',
      '',
      '## Intended use',
      'Estimates the probability of pathological complete response (pCR) to neoadjuvant chemotherapy'
      ' of breast cancer from DCE-MRI before treatment (T0) and about three weeks in (T1), for'
      ' research on early-response prediction (I-SPY2-like protocols).',
      '',
      '## Model',
      f"{description['label']}: {len(description['members'])} members"
      f' ({run_config.protocol.num_repeats} repeat(s) x'
      f" {run_config.data.num_folds} folds), each selected on its fold's inner validation split;"
      " the prediction is the mean of the members' calibrated probabilities, with their spread."
      f" Calibration: {description['calibration']}. Code version {description['code_version']}.",
      '',
      '## Data',
      f"Trained on `{description['dataset']}`: {int(e['num_patients'])} patients, {int(e['num_pcr'])} pCR."
      + (
          ' **A synthetic phantom cohort: these figures say nothing about patients.**'
          if synthetic
          else ''
      ),
      '',
      "## Performance (the run's own out-of-fold predictions)",
      f"AUROC {e['auroc']:.3f} (95 % CI {e['ci_low']:.3f}-{e['ci_high']:.3f}); Brier {e['brier']:.3f};"
      f" calibration intercept {e['calibration_intercept']:.2f}, slope {e['calibration_slope']:.2f}"
      + (f" ({e['degenerate']})" if e['degenerate'] else '')
      + '.'
      + (
          f" The single-stage baseline of the same run: AUROC {e['baseline_auroc']:.3f}."
          if e.get('baseline_auroc') is not None
          else ''
      ),
      '',
  ]
  if e.get('subgroups'):
    lines += ['| subgroup | patients | AUROC |', '| --- | ---: | ---: |']
    lines += [
        f"| {g['kind']}: {g['group']} | {g['patients']} | "
        + (f"{g['auroc']:.3f}" if g['auroc'] is not None else 'n/a')
        + ' |'
        for g in e['subgroups']
    ]
    lines.append('')
  lines += [
      '## Limitations',
      '- Cross-validated on one cohort; no external validation. Out-of-fold AUROC of an ensemble member'
      ' overstates nothing it has not seen, but the ensemble itself was never tested on new patients.',
      f'- Inputs must follow the preprocessing spec of {runs.MODEL_FILE} (T0 and T1 DCE series with'
      ' pre, early and late phases; Analysis Mask or PE >= 70 % tumour); other protocols shift the inputs.',
      '- The per-member probabilities spread is not a confidence interval.',
      '- Subgroup figures rest on few patients.',
      '',
  ]
  return '\n'.join(lines)
