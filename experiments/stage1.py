"""Stage 1, the teacher: pCR from T0 + T1 + T2; its latent after T2 is stage 2's target.

python -m pcrjax.main --config=experiments/stage1.py --workdir=/tmp/pcr/teacher
"""

from pcrjax import configs


def get_config(arg: str | None = None):
  return configs.stage_config('teacher', smoke=arg == 'smoke')
