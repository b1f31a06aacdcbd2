"""pCR for a new patient, from T0 and T1 DICOM, with an exported model (pcrjax.export).

    python -m pcrjax.predict --model=MODEL_DIR --dicom=PATIENT_DIR --out=OUT [--hr=1 --her2=0]
    python -m pcrjax.predict --model=MODEL_DIR --dicom=FOLDER_OF_PATIENTS --out=OUT   # one CSV row each
    python -m pcrjax.predict --model=MODEL_DIR --record=ispy2/synthetic:SYN-00001 --out=OUT

What is read, how, and what is written: pcrjax.inference.serving (and the README). A patient that
cannot be predicted ends the command with one line (-v 0 shows the libraries' INFO lines as well).
"""

from absl import app, flags

from pcrjax import console, fileio, runs
from pcrjax.inference import serving
from tfds_ispy2.ispy2 import tcia

FLAGS = flags.FLAGS
flags.DEFINE_string(
    'model', None, 'An exported model directory (python -m pcrjax.export).'
)
flags.DEFINE_string(
    'dicom',
    None,
    "One patient's DICOM folder (T0 and T1 studies), or a folder of patients.",
)
flags.DEFINE_string(
    'record',
    None,
    'DATASET:PATIENT_ID of a built TFDS dataset, instead of --dicom.',
)
flags.DEFINE_string('data_dir', '', 'The TFDS data_dir of --record.')
flags.DEFINE_enum(
    'hr',
    None,
    ['0', '1'],
    'Hormone-receptor status (models with clinical inputs).',
)
flags.DEFINE_enum(
    'her2', None, ['0', '1'], 'HER2 status (models with clinical inputs).'
)
flags.DEFINE_string('out', None, 'Output folder.')


def main(argv):
  del argv
  if bool(FLAGS.dicom) == bool(FLAGS.record):
    raise app.UsageError('Give exactly one of --dicom and --record.')
  console.setup()
  hr = None if FLAGS.hr is None else int(FLAGS.hr)
  her2 = None if FLAGS.her2 is None else int(FLAGS.her2)
  with (
      fileio.exit_in_one_line_if_disk_full(),
      console.one_line_errors(FileNotFoundError, ValueError, tcia.Skip),
  ):
    ensemble = serving.load_model(FLAGS.model)
    if FLAGS.record:
      patient = serving.read_record_patient(
          FLAGS.record, ensemble, data_dir=FLAGS.data_dir, hr=hr, her2=her2
      )
    else:
      patients, _ = tcia.discover(FLAGS.dicom)
      if len(patients) > 1:
        rows = serving.predict_folder(
            patients, ensemble, FLAGS.out, hr=hr, her2=her2
        )
        failed = sum(r['status'] != 'ok' for r in rows)
        print(
            f'{len(rows) - failed} of {len(rows)} patients predicted;'
            f' {runs.BATCH_PREDICTIONS_FILE} in {FLAGS.out}'
        )
        return
      if not patients:
        raise ValueError(f'{FLAGS.dicom}: no patient with a DCE series found.')
      patient = serving.read_dicom_patient(
          next(iter(patients.values())), ensemble, hr=hr, her2=her2
      )
    result = serving.predict_patient(patient, ensemble)
    serving.write_outputs(FLAGS.out, result, patient, ensemble)
  print(
      f"{result['patient_id']}: pCR probability {result['probability']:.3f}"
      f" (sd {result['spread']['sd']:.3f}); {FLAGS.out}/{runs.PREDICTION_PAGE_FILE}"
  )


if __name__ == '__main__':
  flags.mark_flags_as_required(['model', 'out'])
  app.run(main)
