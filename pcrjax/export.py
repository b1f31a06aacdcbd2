"""A finished protocol run -> a self-contained model directory that `pcrjax.predict` loads.

    python -m pcrjax.export --run=PROTOCOL_WORKDIR --out=MODEL_DIR [--model=student]

The directory holds the ensemble (one member per fold and repeat: its best params as an Orbax
checkpoint and its config), each member's calibrator (fitted on its fold's validation predictions,
as the report does), the preprocessing spec, the code version, and MODEL_CARD.md generated from the
run's evidence. Nothing in it refers back to the training workdir, and nothing in it but
de-identified ids and numbers comes from the patients (the card's figures are aggregates).
"""

from absl import app, flags

from pcrjax.inference import export

FLAGS = flags.FLAGS
flags.DEFINE_string('run', None, 'A finished protocol workdir.')
flags.DEFINE_string('out', None, 'The model directory to write (replaced if it exists).')
flags.DEFINE_enum('model', 'student', export.EXPORTABLE, 'Which network of the run to export.')
flags.DEFINE_enum('calibration', None, ['none', 'platt', 'temperature'],
                  "Per-member calibrators (default: the run's config.calibration).")


def main(argv):
  del argv
  try:
    export.export(FLAGS.run, FLAGS.out, model_name=FLAGS.model, calibrate=FLAGS.calibration)
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e)) from None


if __name__ == '__main__':
  flags.mark_flags_as_required(['run', 'out'])
  app.run(main)
