"""Compares two protocol runs on the same patients, model by model (no JAX).

python -m pcrjax.compare --a=runs/lambda0 --b=runs/lambda1 [--output=compare.md]
"""

from absl import app, flags

from pcrjax import console
from pcrjax.evidence import run_comparison

flags.DEFINE_string('a', None, 'The first protocol workdir.')
flags.DEFINE_string('b', None, 'The second protocol workdir.')
flags.DEFINE_string('output', '', 'Also write the comparison (markdown) here.')
flags.mark_flags_as_required(['a', 'b'])


def main(argv):
  del argv
  args = flags.FLAGS
  console.setup()
  with console.one_line_errors(FileNotFoundError, ValueError):
    text = run_comparison.render(
        run_comparison.compare(args.a, args.b), args.a, args.b
    )
  print(text)
  if args.output:
    with open(args.output, 'w') as f:
      f.write(text)


if __name__ == '__main__':
  app.run(main)
