"""The paper's comparison, the whole protocol: for every repeat and fold, baseline (T0+T1), teacher
(T0+T1+T2), student (T0+T1, dual-task) and the clinical FTV model, each trained on that fold's
training patients; out-of-fold predictions pooled into the report (AUROC with CIs and spread over
repeats, paired DeLong tests, calibration, operating points, subgroups).

python -m pcrjax.main --config=experiments/paper_table.py --workdir=/tmp/pcr/table
"""

from pcrjax import configs


def get_config(arg: str | None = None):
  config = configs.protocol_config(smoke=arg == 'smoke')
  config.feature_loss_weight = 1.0
  return config
