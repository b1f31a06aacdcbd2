"""The paper's comparison, the whole protocol: for every repeat and fold, baseline (T0+T1), teacher
(T0+T1+T2), student (T0+T1, dual-task) and the clinical FTV model, each trained on that fold's
training patients; out-of-fold predictions pooled into the report (AUROC with CIs and spread over
repeats, paired DeLong tests, calibration, operating points, subgroups).

python -m pcrjax.main --config=experiments/paper_table.py --workdir=/tmp/pcr/table
"""

from pcrjax import configs


def get_config(arg: str | None = None):
  config = configs.base_config(smoke=arg == 'smoke')
  config.stage = 'protocol'
  config.data.time_points = (0, 1)  # Replaced per network by its time points in pcrjax.runs.
  config.feature_loss_weight = 1.0
  config.bootstrap_replicates = 2000
  # Repeated cross-validation: new folds and initialisation per repeat (x the training time).
  config.num_repeats = 2 if arg == 'smoke' else 1
  config.calibration = 'none'  # Or 'platt' / 'temperature', fitted on each fold's validation split.
  # Trainings of several folds at once, each in its own process (on GPUs: its own share of them).
  config.parallel_trainings = 1
  # >= 0: train only task t = repeat * num_folds + fold (a job of a cluster's job array), then stop.
  config.protocol_task = -1
  return config
