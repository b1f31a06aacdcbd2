"""Stage 1, the teacher: pCR from T0 + T1 + T2; its latent after T2 is stage 2's target.

python -m pcrjax.main --config=experiments/stage1.py --workdir=/tmp/pcr/teacher
"""

from pcrjax import configs


def get_config(arg: str | None = None):
  config = configs.base_config(smoke=arg == 'smoke')
  config.stage = 'teacher'
  config.data.time_points = (0, 1, 2)
  return config
