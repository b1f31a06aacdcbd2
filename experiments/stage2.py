"""Stage 2, the dual-task student: pCR from T0 + T1, plus regression of the frozen teacher's T2 latent.

python -m pcrjax.main --config=experiments/stage2.py --workdir=/tmp/pcr/student \
    --config.teacher_workdir=/tmp/pcr/teacher
The teacher must be trained on the same fold (same data.fold, num_folds, fold_seed).
"""

from pcrjax import configs


def get_config(arg: str | None = None):
  config = configs.stage_config('student', smoke=arg == 'smoke')
  config.feature_loss_weight = 1.0
  config.teacher_workdir = (
      ''  # Required: set with --config.teacher_workdir=DIR.
  )
  return config
