"""Export a finished smoke protocol, then predict new patients from DICOM and records with it."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pydicom.data
import pytest

from fake_data import tcia_fixtures as fx
from pcrjax import runs
from pcrjax.inference import packaging, serving

pytestmark = pytest.mark.slow  # Exports and predictions of trained runs.


@pytest.fixture(scope='module')
def model_dir(smoke_protocol, tmp_path_factory):
  """The smoke protocol exported from a copy of its workdir, deleted afterwards: loading the model
  must not need the training workdir."""
  _, run, _ = smoke_protocol
  copy = tmp_path_factory.mktemp('run') / 'table'
  shutil.copytree(run, copy)
  out = tmp_path_factory.mktemp('model') / 'student_model'
  packaging.export(str(copy), str(out))
  shutil.rmtree(copy)
  return {'dir': str(out), 'run': run}


def _patient_ids(run, fold, split):
  return {
      p['patient_id']: p['prob']
      for p in runs.read_predictions(
          str(
              run
              / 'repeat_0'
              / f'fold_{fold}'
              / 'student'
              / f'predictions_{split}.csv'
          )
      )
  }


def test_export_is_self_contained_with_a_model_card(model_dir):
  ensemble = serving.load_model(model_dir['dir'])
  assert [m['name'] for m in ensemble.description['members']] == [
      f'repeat_{r}_fold_{k}' for r in range(2) for k in range(2)
  ]
  assert len(ensemble.params) == 4 and ensemble.preprocessing['crop_size'] == [
      8,
      16,
      16,
  ]
  card = open(os.path.join(model_dir['dir'], runs.MODEL_CARD_FILE)).read()
  with open(model_dir['run'] / 'table.csv', newline='') as f:
    auroc = next(
        float(r['auroc']) for r in csv.DictReader(f) if r['name'] == 'student'
    )
  assert (
      'Research use only' in card
      and f'AUROC {auroc:.3f}' in card
      and 'synthetic' in card
  )
  assert 'Limitations' in card


def test_predict_reproduces_the_members_and_is_deterministic(
    model_dir, data_dir
):
  ensemble = serving.load_model(model_dir['dir'])
  checked = 0
  for fold in (0, 1):
    for split in ('test', 'val'):
      for pid, prob in list(
          _patient_ids(model_dir['run'], fold, split).items()
      )[:3]:
        try:
          patient = serving.read_record_patient(
              f'ispy2/synthetic_smoke:{pid}', ensemble, data_dir=data_dir
          )
        except (
            ValueError
        ) as e:  # The phantom drops visits as the trial did: no T1, no prediction.
          assert str(e) == f'{pid}: the record has no T1.'
          continue
        result = serving.predict_patient(patient, ensemble)
        member = result['members'][fold]
        assert member['uncalibrated'] == pytest.approx(
            prob, abs=2e-6
        )  # The CSV keeps 6 decimals.
        assert result['probability'] == pytest.approx(
            np.mean([m['probability'] for m in result['members']])
        )
        ignored = [
            f'{v} found and ignored: the model predicts from T0 and T1.'
            for v, present in zip(
                ('T2', 'T3'), patient.record['visit_mask'][2:]
            )
            if present
        ]
        assert result['warnings'] == ignored
        again = serving.predict_patient(
            serving.read_record_patient(
                f'ispy2/synthetic_smoke:{pid}', ensemble, data_dir=data_dir
            ),
            ensemble,
        )
        assert json.dumps(again) == json.dumps(result)  # Bit for bit.
        checked += 1
  assert checked >= 8


def test_saliency_is_larger_inside_the_tumour(model_dir, data_dir):
  ensemble = serving.load_model(model_dir['dir'])
  inside, outside = [], []
  for pid in list(_patient_ids(model_dir['run'], 0, 'test'))[:8]:
    try:
      patient = serving.read_record_patient(
          f'ispy2/synthetic_smoke:{pid}', ensemble, data_dir=data_dir
      )
    except ValueError:  # No T1.
      continue
    inputs = serving.model_inputs(patient, ensemble)
    maps = serving.saliency_maps(ensemble, inputs, patient.clinical)
    assert maps.shape == inputs['tumour'].shape and np.isfinite(maps).all()
    tumour = inputs['tumour'][0]  # T0: every patient has a tumour there.
    if tumour.any() and (~tumour).sum() >= tumour.sum():
      inside.append(maps[0][tumour].mean())
      outside.append(
          maps[0][~tumour].mean()
      )  # Per pixel: an equal area's share.
  assert len(inside) >= 4
  assert np.mean(inside) > np.mean(outside)


@pytest.fixture(scope='module')
def dicom_tree(tmp_path_factory):
  """Three fake TCIA patients: all four visits, T0 + T1 only, and one with no T1."""
  root = tmp_path_factory.mktemp('dicom')
  by_name = {c.name: c for c in fx.DEFAULT_CASES}
  fx.write_tcia_tree(
      root, [by_name['standard'], by_name['flipped'], by_name['two_phases']]
  )
  return root


def _predict_cli(*args, env=None):
  return subprocess.run(
      [sys.executable, '-m', 'pcrjax.predict', *args],
      capture_output=True,
      text=True,
      timeout=600,
      env=env,
  )


def test_predict_one_patient_from_dicom(model_dir, dicom_tree, tmp_path):
  patient_dir = tmp_path / 'patient'
  shutil.copytree(
      dicom_tree / 'ISPY2' / 'ISPY2-100101', patient_dir / 'ISPY2-100101'
  )
  out = tmp_path / 'out'
  # On one device, though the members were trained and exported on two (tests/conftest.py).
  one_device = {
      **os.environ,
      'XLA_FLAGS': '--xla_force_host_platform_device_count=1',
  }
  done = _predict_cli(
      f'--model={model_dir["dir"]}',
      f'--dicom={patient_dir}',
      f'--out={out}',
      env=one_device,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads((out / 'prediction.json').read_text())
  assert (
      result['patient_id'] == 'ISPY2-100101' and 0 <= result['probability'] <= 1
  )
  assert result['visits_used'] == ['T0', 'T1'] and result['research_use_only']
  assert any(w.startswith('T2 found and ignored') for w in result['warnings'])
  assert any(w.startswith('T3 found and ignored') for w in result['warnings'])
  assert result['inputs']['T0']['mask_source'].startswith('analysis_mask')
  page = (out / 'prediction.html').read_text()
  assert 'Research use only' in page and 'data:image/png;base64,' in page
  for written in (out / 'prediction.json', out / 'prediction.html'):
    # Not in the inline images: base64 text spells short strings ('Doe') by chance.
    text = re.sub(
        r'data:image/png;base64,[A-Za-z0-9+/=]+', '', written.read_text()
    )
    assert not any(phi in text for phi in fx.PHI_STRINGS), written


def test_predict_a_folder_reports_failures_and_goes_on(
    model_dir, dicom_tree, tmp_path
):
  out = tmp_path / 'batch'
  done = _predict_cli(
      f'--model={model_dir["dir"]}', f'--dicom={dicom_tree}', f'--out={out}'
  )
  assert done.returncode == 0, done.stderr[-2000:]
  with open(out / 'predictions.csv', newline='') as f:
    rows = {r['patient_id']: r for r in csv.DictReader(f)}
  assert set(rows) == {'ISPY2-100101', 'ISPY2-100134', 'ISPY2-100281'}
  assert (
      rows['ISPY2-100101']['status'] == rows['ISPY2-100134']['status'] == 'ok'
  )
  assert rows['ISPY2-100281']['status'] == 'failed'
  assert (
      'no T1 study' in rows['ISPY2-100281']['reason']
      and 'found: T0, T2' in rows['ISPY2-100281']['reason']
  )
  assert (out / 'ISPY2-100134' / 'prediction.html').exists()


def test_predict_refuses_dicom_without_a_dce_series_in_one_line(
    model_dir, tmp_path
):
  """Real MR and CT files (pydicom's test files, in four encodings), none a DCE series: one
  line and exit status 1, no usage text, no traceback, no output."""
  folder = tmp_path / 'not dce'
  folder.mkdir()
  for name in (
      'CT_small.dcm',
      'MR_small.dcm',
      'MR_small_implicit.dcm',
      'MR_small_bigendian.dcm',
      'MR_small_RLE.dcm',
  ):
    shutil.copy(pydicom.data.get_testdata_file(name), folder)
  done = _predict_cli(
      f'--model={model_dir["dir"]}',
      f'--dicom={folder}',
      f'--out={tmp_path / "o"}',
  )
  assert done.returncode == 1 and not done.stdout
  assert done.stderr.splitlines() == [
      f"FATAL no DCE series under '{folder}': 5 DICOM files in 2 series (CT 1, MR 1) of 2"
      ' patient(s), none an MR series described as "original DCE"; expected <manual_dir>/'
      '<collection, e.g. ISPY2>/<PatientID>/<study folder>/<series folder>/*.dcm (the NBIA/TCIA'
      ' downloader layout) or <manual_dir>/<collection>/<PatientID>/<StudyInstanceUID>/'
      '<Modality>_<SeriesInstanceUID>/*.dcm (the idc-index layout of python -m'
      ' tfds_ispy2.download), and the clinical sheet ISPY2-Imaging-Cohort-1-Clinical-Data.xlsx.'
  ]
  assert not (tmp_path / 'o').exists()


def test_predict_without_t1_stops_with_one_line(
    model_dir, dicom_tree, tmp_path
):
  patient_dir = tmp_path / 'patient'
  shutil.copytree(
      dicom_tree / 'ISPY2' / 'ISPY2-100281', patient_dir / 'ISPY2-100281'
  )
  done = _predict_cli(
      f'--model={model_dir["dir"]}',
      f'--dicom={patient_dir}',
      f'--out={tmp_path / "o"}',
  )
  assert done.returncode != 0
  # Only that: no usage text, no Orbax INFO or read-only warnings of loading the model.
  assert (
      done.stderr.splitlines()
      == ['FATAL ISPY2-100281: no T1 study with a DCE series (found: T0, T2).']
      and not done.stdout
  )
