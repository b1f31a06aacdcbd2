"""The paper's comparison, the whole protocol: for every fold, baseline (T0+T1), teacher (T0+T1+T2)
and student (T0+T1, dual-task) trained on that fold's training patients; out-of-fold predictions
pooled into one table (AUROC, 95 % bootstrap CI, paired DeLong p of student vs baseline).

python -m pcrjax.main --config=experiments/paper_table.py --workdir=/tmp/pcr/table
"""

from pcrjax import configs


def get_config(arg: str | None = None):
  config = configs.base_config(smoke=arg == 'smoke')
  config.stage = 'protocol'
  config.data.time_points = (0, 1)  # Replaced per stage by configs.STAGE_TIME_POINTS.
  config.feature_loss_weight = 1.0
  config.bootstrap_replicates = 2000
  return config
