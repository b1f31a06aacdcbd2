"""Defaults shared by the experiment configs, and the checks every config passes before a run.

The experiment files in experiments/ start from `base_config` (a network's, from its stage in the
run contract: `stage_config`) and set what else makes them what they are, so that a reader sees in
one place how the experiments differ. An install ships them as `pcrjax.experiments`, so that
`--config=NAME` needs no clone (`experiment_file`).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
import pathlib

import jax
import ml_collections

from pcrjax import input_pipeline, models, runs
from pcrjax.evidence import calibration
from tfds_ispy2.ispy2 import schema

STAGES = tuple(m.name for m in runs.networks_in_training_order()) + (
    'protocol',
)
REPRESENTATIONS = ('mip', 'volume')
DUAL_TARGETS = ('latent', 'logit', 'kinetics')
CLASS_WEIGHTINGS = ('balanced', 'none')
T2 = schema.VISITS.index('T2')


def base_config(smoke: bool = False) -> ml_collections.ConfigDict:
  """Everything but the stage. `smoke`: a tiny cohort and a few epochs, minutes on 2 CPU cores."""
  config = ml_collections.ConfigDict()
  config.stage = 'baseline'
  config.seed = 0

  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'ispy2/synthetic_smoke' if smoke else 'ispy2/synthetic'
  data.data_dir = (
      ''  # '' = the TFDS default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
  )
  data.manual_dir = ''  # 'ispy2/tcia' only: the TCIA download ('' = <data_dir>/downloads/manual).
  data.num_folds = 2 if smoke else 5
  data.fold = 0
  data.fold_seed = 0
  data.val_fraction = (
      0.2  # Inner validation split of the training fold, for model selection.
  )
  # > 0: train without part `inner_part` of the training fold cut in `inner_parts` stratified parts,
  # and test on it (a cross-fitted teacher, `dual_task.cross_fit`; set by the student, not by hand).
  data.inner_parts = 0
  data.inner_part = 0
  data.representation = (
      'mip'  # 'mip': 2D MIPs per visit; 'volume': 3D tumour-centred crop.
  )
  # What each voxel carries: 'kinetic' (pre-contrast, PE early, PE late, SER) or 'subtraction'
  # (pre-contrast, early - pre, late - pre); see pcrjax.input_pipeline.CHANNELS.
  data.channels = 'subtraction'
  # Tumour-centred crop, D x H x W voxels; 'mip' projects through all slices of the H x W crop.
  data.crop_size = (8, 16, 16) if smoke else (16, 32, 32)
  data.time_points = runs.model('baseline').time_points
  data.augment = True
  data.max_shift = 2 if smoke else 4  # Voxels of random in-plane translation.
  data.intensity_jitter = (
      0.1  # Std of the log of a random global intensity scale.
  )
  data.read_threads = 2

  config.model = model = ml_collections.ConfigDict()
  model.encoder_features = (8, 16) if smoke else (16, 32, 32)
  model.lstm_features = 16 if smoke else 32
  model.kernel_size = 3
  model.dropout_rate = (
      0.0  # On the latent, before the pCR head (README: why none).
  )
  model.clinical_inputs = False  # A pCR logit offset per HR/HER2 subtype (from the fold's log-odds).
  model.tumour_kinetics = (
      True  # The head also reads each visit's FTV and mean PE, SER (README).
  )
  model.pooling = 'mean'  # The latent over space: 'mean', or 'tumour' (weighted by the tumour mask).
  model.normalization = (
      'none'  # In the visit encoder: 'none' or 'group' (GroupNorm; README).
  )
  model.conv = 'auto'  # 'native', 'patches' (matrix products: fast on XLA:CPU), 'auto' (README).
  model.dtype = 'float32'  # Compute dtype: 'bfloat16' for GPU/TPU (XLA:CPU runs it slowly).

  config.batch_size = 8 if smoke else 16
  # At most this many patients per evaluation batch (train.eval_batches): on the 2-core CPU a
  # patient's forward pass costs ~15 % less in batches of 12-16 than of 28 (benchmarks/README.md).
  config.eval_batch_size = 8 if smoke else 16
  config.num_epochs = 2 if smoke else 60
  config.warmup_epochs = 1 if smoke else 5
  config.learning_rate = 1e-3
  config.weight_decay = 1e-4
  config.grad_clip_norm = 1.0
  config.class_weighting = (
      'balanced'  # Positive-class weight n_neg / n_pos in the BCE.
  )

  # A checkpoint when validation AUROC improves (the best is kept for selection), every
  # `checkpoint_every_epochs` (to resume from) and at the end: each one costs wall and CPU time.
  config.checkpoint_every_epochs = 10
  # The epoch selected is the last of the `selection_window` epochs with the best mean validation
  # AUROC (1: the single best epoch).
  config.selection_window = 1
  config.profile_steps = (
      0  # > 0: a JAX profiler trace of that many steps in <workdir>/profile.
  )

  config.teacher_workdir = (
      ''  # Stage 2 (student) only: the workdir of this fold's teacher.
  )
  config.feature_loss_weight = (
      1.0  # lambda of the student's T2-feature regression.
  )
  # Stage 2 only: what the student regresses besides pCR (pcrjax.train.feature_targets).
  config.dual_task = dual = ml_collections.ConfigDict()
  dual.target = 'latent'  # 'latent' (the teacher's T2 latent), 'logit' or 'kinetics' (T2 - T0 FTV/PE/SER).
  dual.standardise = True  # Each target dimension to zero mean, unit variance on the training fold.
  dual.reads_prediction = (
      False  # The student's pCR head also reads its prediction of the target.
  )
  # K >= 2: the training patients' latent/logit targets come from K teachers cross-fitted on the
  # training fold (each trained without 1/K of it), so that no target carries its own label.
  dual.cross_fit = 0
  # Candidate lambdas: a student per value, the one best on the inner validation split is kept
  # (empty: `feature_loss_weight` alone).
  dual.lambda_grid = ()
  return config


def stage_config(stage: str, smoke: bool = False) -> ml_collections.ConfigDict:
  """`base_config` of one network of the run contract: its stage and the visits it sees."""
  config = base_config(smoke)
  config.stage = stage
  config.data.time_points = runs.model(stage).time_points
  return config


def protocol_config(smoke: bool = False) -> ml_collections.ConfigDict:
  """`base_config` of the whole protocol; its own fields are under `config.protocol`, which each
  network's config drops (pcrjax.protocol.stage_config)."""
  config = base_config(smoke)
  config.stage = 'protocol'
  config.protocol = protocol = ml_collections.ConfigDict()
  protocol.bootstrap_replicates = 2000
  # Repeated cross-validation: new folds and initialisation per repeat (x the training time).
  protocol.num_repeats = 2 if smoke else 1
  # Or one of calibration.FITS, fitted on each fold's validation split.
  protocol.calibration = calibration.NONE
  # Trainings of several folds at once, each in its own process (on GPUs: its own share of them).
  protocol.parallel_trainings = 1
  # >= 0: train only task t = repeat * num_folds + fold (a job of a cluster's job array), then stop.
  protocol.task = -1
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Stops with a message naming the field for any impossible value."""

  def check(ok: bool, field: str, message: str) -> None:
    if not ok:
      raise ValueError(
          f'config.{field}={config_value(config, field)!r}: {message}'
      )

  data = config.data
  check(config.stage in STAGES, 'stage', f'must be one of {STAGES}')
  check(
      data.representation in REPRESENTATIONS,
      'data.representation',
      f'must be one of {REPRESENTATIONS}',
  )
  check(
      data.channels in input_pipeline.CHANNELS,
      'data.channels',
      f'must be one of {tuple(input_pipeline.CHANNELS)}',
  )
  check(
      config.dual_task.target in DUAL_TARGETS,
      'dual_task.target',
      f'must be one of {DUAL_TARGETS}',
  )
  check(
      data.num_folds >= 2,
      'data.num_folds',
      'k-fold cross-validation needs at least 2 folds',
  )
  check(
      0 <= data.fold < data.num_folds,
      'data.fold',
      f'must be in [0, {data.num_folds})',
  )
  check(0 < data.val_fraction < 0.5, 'data.val_fraction', 'must be in (0, 0.5)')
  tps = tuple(data.time_points)
  check(
      len(tps) > 0
      and tps == tuple(sorted(set(tps)))
      and all(0 <= t < schema.NUM_VISITS for t in tps),
      'data.time_points',
      'must be increasing visit indices in 0..3 (T0..T3)',
  )
  check(
      len(data.crop_size) == 3 and all(int(s) > 0 for s in data.crop_size),
      'data.crop_size',
      'must be three positive voxel counts (D, H, W)',
  )
  check(
      len(config.model.encoder_features) >= 1
      and all(f > 0 for f in config.model.encoder_features),
      'model.encoder_features',
      'must be positive channel counts',
  )
  check(
      0 <= config.model.dropout_rate < 1,
      'model.dropout_rate',
      'must be in [0, 1)',
  )
  check(
      config.model.pooling in models.POOLINGS,
      'model.pooling',
      f'must be one of {models.POOLINGS}',
  )
  check(
      config.model.conv in models.CONVS,
      'model.conv',
      f'must be one of {models.CONVS}',
  )
  check(
      config.model.dtype in models.DTYPES,
      'model.dtype',
      f'must be one of {models.DTYPES}',
  )
  check(
      config.model.normalization in models.NORMALIZATIONS,
      'model.normalization',
      f'must be one of {models.NORMALIZATIONS}',
  )
  check(config.num_epochs >= 1, 'num_epochs', 'must be >= 1')
  check(config.profile_steps >= 0, 'profile_steps', 'must be >= 0')
  check(
      config.checkpoint_every_epochs >= 1,
      'checkpoint_every_epochs',
      'must be >= 1',
  )
  check(config.selection_window >= 1, 'selection_window', 'must be >= 1')
  check(
      0 <= config.warmup_epochs < config.num_epochs,
      'warmup_epochs',
      'must be in [0, num_epochs)',
  )
  check(config.learning_rate > 0, 'learning_rate', 'must be > 0')
  check(
      config.class_weighting in CLASS_WEIGHTINGS,
      'class_weighting',
      f'must be one of {CLASS_WEIGHTINGS}',
  )
  check(config.feature_loss_weight >= 0, 'feature_loss_weight', 'must be >= 0')
  check(
      all(w >= 0 for w in config.dual_task.lambda_grid),
      'dual_task.lambda_grid',
      'must be lambdas >= 0',
  )
  check(
      config.dual_task.cross_fit == 0
      or (
          config.dual_task.cross_fit >= 2
          and config.dual_task.target != 'kinetics'
      ),
      'dual_task.cross_fit',
      "must be 0 (the fold's teacher) or a number of parts >= 2, with a"
      " teacher's target (latent or logit)",
  )
  check(
      data.inner_parts == 0 or 0 <= data.inner_part < data.inner_parts,
      'data.inner_part',
      f'must be in [0, data.inner_parts={data.inner_parts})',
  )
  devices = jax.device_count()
  for field in ('batch_size', 'eval_batch_size'):
    check(
        config[field] > 0 and config[field] % devices == 0,
        field,
        f'must be a positive multiple of the {devices} devices the batch is sharded over',
    )
  if config.stage == 'protocol':
    protocol = config.protocol
    check(protocol.num_repeats >= 1, 'protocol.num_repeats', 'must be >= 1')
    check(
        protocol.calibration in calibration.METHODS,
        'protocol.calibration',
        f'must be one of {calibration.METHODS}',
    )
    check(
        protocol.bootstrap_replicates >= 100,
        'protocol.bootstrap_replicates',
        'must be >= 100',
    )
    check(
        protocol.parallel_trainings >= 1,
        'protocol.parallel_trainings',
        'must be >= 1',
    )
    num_tasks = protocol.num_repeats * config.data.num_folds
    check(
        -1 <= protocol.task < num_tasks,
        'protocol.task',
        f'must be -1 (all) or a task in [0, {num_tasks}) (repeat * num_folds + fold)',
    )
    return
  spec = runs.model(config.stage)
  if spec.is_teacher:
    check(
        T2 in tps,
        'data.time_points',
        f'the {config.stage} (stage 1) must see T2',
    )
  if spec.early_predictor:
    check(
        max(tps) < T2,
        'data.time_points',
        f'{config.stage} is an early prediction: T0/T1 only',
    )
  if spec.teacher and config.dual_task.target != 'kinetics':
    check(
        bool(config.teacher_workdir),
        'teacher_workdir',
        'stage 2 needs the workdir of a finished stage-1 run: first run'
        ' `python -m pcrjax.main --config=experiments/stage1.py --workdir=TEACHER_DIR`, then pass'
        ' --config.teacher_workdir=TEACHER_DIR',
    )


def config_value(config: ml_collections.ConfigDict, dotted: str):
  for key in dotted.split('.'):
    config = config[key]
  return config


def experiment_file(spec: str) -> str:
  """`--config`'s value as a file: PATH[:ARG] if PATH exists, else the shipped experiment NAME.

  NAME is PATH's stem, so `experiments/paper_table.py:smoke` also works outside a clone.
  """
  path, colon, arg = spec.partition(':')
  if os.path.exists(path):
    return spec
  shipped = importlib.resources.files('pcrjax.experiments')
  candidate = shipped / f'{pathlib.PurePath(path).stem}.py'
  if not candidate.is_file():
    names = sorted(
        f.name[:-3]
        for f in shipped.iterdir()
        if f.name.endswith('.py') and not f.name.startswith('_')
    )
    raise ValueError(
        f'--config={spec}: no such file, nor an experiment of that name ({", ".join(names)})'
    )
  return f'{candidate}{colon}{arg}'


def load(spec: str) -> ml_collections.ConfigDict:
  """The config that `--config=spec` gives, in a notebook or script: `load('paper_table:smoke')`."""
  path, _, arg = experiment_file(spec).partition(':')
  module_spec = importlib.util.spec_from_file_location(
      f'{pathlib.Path(path).stem}_config', path
  )
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(*([arg] if arg else []))


def fields(
    config: ml_collections.ConfigDict, prefix: str = ''
) -> dict[str, object]:
  """Every leaf field by its dotted name (`model.clinical_inputs`), as `--config.<name>=` has it."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(fields(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat
