"""Rebuilds the evidence of a protocol run from its predictions files, without retraining (no JAX).

    python -m pcrjax.report --workdir=DIR
"""

from absl import app, flags

from pcrjax.evidence import report

flags.DEFINE_string('workdir', None, 'A finished protocol workdir (experiments/paper_table.py).')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv
  report.build(flags.FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
