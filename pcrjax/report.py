"""Rebuilds the evidence of a protocol run from its predictions files, without retraining (no JAX).

    python -m pcrjax.report --workdir=DIR
"""

from absl import app, flags

from pcrjax import console, runs
from pcrjax.evidence import report

flags.DEFINE_string('workdir', None, 'A finished protocol workdir (experiments/paper_table.py).')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv
  console.setup()
  with runs.exit_in_one_line_if_disk_full(), console.one_line_errors(FileNotFoundError):
    report.build(flags.FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
