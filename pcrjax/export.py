"""A finished protocol run -> a self-contained model directory that `pcrjax.predict` loads.

    python -m pcrjax.export --run=PROTOCOL_WORKDIR --out=MODEL_DIR [--model=student]

What the directory holds: pcrjax.inference.packaging (and the README).
"""

from absl import app, flags

from pcrjax import console, fileio, runs
from pcrjax.evidence import calibration
from pcrjax.inference import packaging

FLAGS = flags.FLAGS
flags.DEFINE_string('run', None, 'A finished protocol workdir.')
flags.DEFINE_string(
    'out', None, 'The model directory to write (replaced if it exists).'
)
flags.DEFINE_enum(
    'model',
    runs.PRIMARY[1],
    packaging.EXPORTABLE,
    'Which network of the run to export.',
)
flags.DEFINE_enum(
    'calibration',
    None,
    calibration.METHODS,
    "Per-member calibrators (default: the run's config.protocol.calibration).",
)


def main(argv):
  del argv
  console.setup()
  with fileio.exit_in_one_line_if_disk_full(), console.one_line_errors(
      FileNotFoundError, ValueError
  ):
    description = packaging.export(
        FLAGS.run,
        FLAGS.out,
        model_name=FLAGS.model,
        calibrate=FLAGS.calibration,
    )
  print(
      f"{FLAGS.out}: the {FLAGS.model}'s {len(description['members'])} fold models, exported."
  )


if __name__ == '__main__':
  flags.mark_flags_as_required(['run', 'out'])
  app.run(main)
