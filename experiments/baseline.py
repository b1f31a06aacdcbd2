"""Single-stage, single-task baseline: pCR from T0 + T1.

python -m pcrjax.main --config=experiments/baseline.py --workdir=/tmp/pcr/baseline
"""

from pcrjax import configs


def get_config(arg: str | None = None):
  config = configs.base_config(smoke=arg == 'smoke')
  config.stage = 'baseline'
  config.data.time_points = (0, 1)
  return config
