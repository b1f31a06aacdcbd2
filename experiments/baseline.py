"""Single-stage, single-task baseline: pCR from T0 + T1.

python -m pcrjax.main --config=experiments/baseline.py --workdir=/tmp/pcr/baseline
"""

from pcrjax import configs


def get_config(arg: str | None = None):
  return configs.stage_config('baseline', smoke=arg == 'smoke')
