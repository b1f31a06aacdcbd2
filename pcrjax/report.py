"""Rebuilds the evidence of a protocol run from its predictions files, without retraining (no JAX).

python -m pcrjax.report --workdir=DIR
"""

from absl import app, flags

from pcrjax import console, fileio
from pcrjax.evidence import run_report

flags.DEFINE_string(
    'workdir', None, 'A finished protocol workdir (experiments/paper_table.py).'
)
flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv
  console.setup()
  with fileio.exit_in_one_line_if_disk_full(), console.one_line_errors(
      FileNotFoundError
  ):
    run_report.build(flags.FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
