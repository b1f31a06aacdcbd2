"""Training and evaluation of one stage on one fold (Flax-examples style).

`train_and_evaluate(config, workdir)` trains the baseline, the teacher (stage 1) or the student
(stage 2), selects the epoch with the best validation AUROC, and writes that model's predictions for
the validation and test patients. Re-running it on the same workdir resumes from the latest checkpoint.
"""

import contextlib
import functools
import json
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax import lax
import ml_collections
import numpy as np
import optax
import tensorboardX
from absl import logging
from clu import metrics
from flax.training import train_state
from sklearn import linear_model

from pcrjax import (
    checkpoints,
    configs,
    console,
    fileio,
    folds,
    input_pipeline,
    models,
    runs,
    sharding,
    wall_time,
)
from pcrjax.evidence import statistics

TrainState = train_state.TrainState


@flax.struct.dataclass
class FirstNonFiniteStep(metrics.Metric):
  """The first step whose loss or gradients were not finite (-1: none); merged on the device."""

  step: jax.Array

  @classmethod
  def from_model_output(
      cls, *, step: jax.Array, finite: jax.Array, **_
  ) -> 'FirstNonFiniteStep':
    return cls(step=jnp.where(finite, -1, step).astype(jnp.int32))

  @classmethod
  def empty(cls) -> 'FirstNonFiniteStep':
    return cls(step=jnp.array(-1, jnp.int32))

  def merge(self, other: 'FirstNonFiniteStep') -> 'FirstNonFiniteStep':
    either = jnp.where(self.step < 0, other.step, self.step)
    return type(self)(
        step=jnp.where(
            (self.step >= 0) & (other.step >= 0),
            jnp.minimum(self.step, other.step),
            either,
        )
    )

  def compute(self) -> jax.Array:
    return self.step


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  # No `from __future__ import annotations` in this module: clu reads these annotations as objects.
  loss: metrics.Average.from_output('loss')
  bce: metrics.Average.from_output('bce')
  feature_loss: metrics.Average.from_output('feature_loss')
  first_nonfinite_step: FirstNonFiniteStep


class Diverged(RuntimeError):
  """The run diverged (non-finite, or exploding while finite): it stops at the end of that epoch."""


# A finite run that explodes stops as a non-finite one does: whether it turns non-finite depends on
# the CPU's arithmetic (one learning rate gave NaN on an AVX-512 CPU, and on an AVX2 CPU a finite
# loss of 1e12 with every validation prediction at 0 or 1).
EXPLODED_LOSS_RATIO = 100.0
SATURATED = 1e-6  # A probability this close to 0 or 1: a logit beyond +-13.8.


def explosion(
    loss: float, first_loss: float | None, val_probs: np.ndarray
) -> str | None:
  """Why an epoch shows an exploding run (its mean training loss and validation predictions), or
  None. `first_loss`: the first epoch's loss, None in the first epoch."""
  if not np.all(
      np.isfinite(val_probs)
  ):  # Finite steps can still leave parameters at inf.
    return 'the validation predictions are not finite'
  if first_loss is not None and loss > EXPLODED_LOSS_RATIO * first_loss:
    return (
        f'the training loss ({loss:.3g}) is over {EXPLODED_LOSS_RATIO:g} times that of the'
        f' first epoch ({first_loss:.3g})'
    )
  if np.all(np.minimum(val_probs, 1 - val_probs) < SATURATED):
    return 'every validation prediction is saturated at 0 or 1'
  return None


@flax.struct.dataclass
class Teacher:
  """A frozen stage-1 model: its params are an input of the student's step, never trained."""

  model: models.PCRNet = flax.struct.field(pytree_node=False)
  params: Any
  time_points: tuple[int, ...] = flax.struct.field(pytree_node=False)


def create_learning_rate_fn(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
  """Linear warm-up, then cosine decay to zero at the last step."""
  return _learning_rate(
      config.learning_rate,
      config.warmup_epochs * steps_per_epoch,
      config.num_epochs * steps_per_epoch,
  )


def create_train_state(
    rng: jax.Array,
    config: ml_collections.ConfigDict,
    model: models.PCRNet,
    input_shape: tuple[int, ...],
    steps_per_epoch: int,
) -> TrainState:
  tx = _optimizer(
      create_learning_rate_fn(config, steps_per_epoch),
      config.weight_decay,
      config.grad_clip_norm,
  )
  return TrainState.create(
      apply_fn=model.apply,
      params=models.init_params(model, rng, input_shape),
      tx=tx,
  )


# One instance per setting in a process (see models.build): the optimizer is a static part of the state.
@functools.cache
def _learning_rate(
    peak: float, warmup_steps: int, decay_steps: int
) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak,
      warmup_steps=warmup_steps,
      decay_steps=decay_steps,
  )


@functools.cache
def _optimizer(
    schedule: optax.Schedule, weight_decay: float, grad_clip_norm: float
) -> optax.GradientTransformation:
  """AdamW after global-norm clipping."""
  return optax.chain(
      optax.clip_by_global_norm(grad_clip_norm),
      optax.adamw(schedule, weight_decay=weight_decay),
  )


def positive_weight(
    config: ml_collections.ConfigDict, labels: np.ndarray
) -> float:
  """The BCE weight of pCR cases: n_neg / n_pos of the training patients ('balanced'), or 1."""
  if config.class_weighting == 'none':
    return 1.0
  num_pos = int(labels.sum())
  if num_pos == 0 or num_pos == len(labels):
    raise ValueError(
        'The training split holds only one class: the cohort is too small for these folds.'
    )
  return (len(labels) - num_pos) / num_pos


def weighted_bce(
    logits: jax.Array, labels: jax.Array, pos_weight: float | jax.Array
) -> jax.Array:
  weights = jnp.where(labels > 0, pos_weight, 1.0)
  return weights * optax.sigmoid_binary_cross_entropy(
      logits, labels.astype(logits.dtype)
  )


def _batch_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    dropout_rng: jax.Array,
    pos_weight: jax.Array,
    *,
    feature_loss_weight: float,
):
  """One AdamW step on weighted BCE (+ lambda * the MSE of the feature targets, for the student).

  The student's `batch['target']` holds each patient's precomputed target (`feature_targets`) and
  `batch['target_mask']` whether it has one (a patient without T2 has none).
  """
  rng = jax.random.fold_in(dropout_rng, state.step)

  def loss_fn(params):
    outputs = state.apply_fn(
        {'params': params},
        batch['images'],
        batch['visit_mask'],
        batch['clinical'],
        batch['kinetics'],
        batch['tumour'],
        train=True,
        rngs={'dropout': rng},
    )
    bce = weighted_bce(outputs['logit'], batch['label'], pos_weight).mean()
    feature_loss = jnp.zeros(())
    if 'target' in batch:
      has_target = batch['target_mask'].astype(jnp.float32)
      per_patient = jnp.mean(
          (outputs['feature_pred'] - batch['target']) ** 2, axis=-1
      )
      feature_loss = jnp.sum(per_patient * has_target) / jnp.maximum(
          has_target.sum(), 1.0
      )
    loss = bce + feature_loss_weight * feature_loss
    return loss, (bce, feature_loss)

  (loss, (bce, feature_loss)), grads = jax.value_and_grad(
      loss_fn, has_aux=True
  )(state.params)
  finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
  updated = state.apply_gradients(grads=grads)
  # A non-finite step leaves the params as they were (so the checkpoints stay usable); the loop
  # stops at the end of the epoch, reading the flag with the epoch's metrics (no sync per step).
  state = jax.tree.map(
      lambda new, old: jnp.where(finite, new, old),
      updated,
      state.replace(step=updated.step),
  )
  return state, TrainMetrics.single_from_model_output(
      loss=loss,
      bce=bce,
      feature_loss=feature_loss,
      step=updated.step,
      finite=finite,
  )


@functools.partial(jax.jit, static_argnums=0)
def eval_step(
    apply_fn, params, examples: dict[str, jax.Array], rows: jax.Array
) -> dict[str, jax.Array]:
  """The model's outputs (logit, latent; the student's feature_pred), the pCR `probability` and
  the unweighted binary cross-entropy `bce` of the examples at `rows` [num_batches, batch_rows],
  each [num_batches, batch_rows, ...].

  The batches run in one program, one after another (`lax.map`): a validation is one dispatch, and
  each batch's activations stay in the cache (benchmarks/README.md). One compilation per network
  serves a training's validation and test predictions and, for a teacher, its students' targets.
  """

  def batch(rows):
    outputs = apply_fn(
        {'params': params},
        examples['images'][rows],
        examples['visit_mask'][rows],
        examples['clinical'][rows],
        examples['kinetics'][rows],
        examples['tumour'][rows],
        train=False,
    )
    return {
        **outputs,
        'probability': jax.nn.sigmoid(outputs['logit']),
        'bce': weighted_bce(outputs['logit'], examples['label'][rows], 1.0),
    }

  return lax.map(batch, rows)


def eval_batches(
    num_rows: int, batch_size: int, multiple: int = 1
) -> tuple[int, int]:
  """(num_batches, batch_rows): the one shape of a training's evaluations, its `num_rows`
  validation patients in the fewest batches of at most `batch_size`, all of one size, a multiple of
  `multiple` (the devices a batch is split over).

  Equal batches pad the validation split, which the protocol evaluates at every epoch, by less than
  a batch (82 patients in batches of at most 16: 6 of 14, 84 rows, not 96); its test patients and
  a teacher's targets then take evaluations of the same shape, so that each network compiles one.
  """
  num_batches = max(1, -(-num_rows // batch_size))
  size = -(-num_rows // num_batches)
  return num_batches, -(-size // multiple) * multiple


def predict(
    eval_fn,
    params,
    examples: dict[str, jax.Array],
    rows: np.ndarray,
    *,
    batches: tuple[int, int],
    put,
    outputs: tuple[str, ...] = ('probability',),
) -> dict[str, np.ndarray]:
  """`eval_fn`'s `outputs` for the examples at `rows`, in evaluations of `batches` (num_batches,
  batch_rows) rows, the last padded with copies of the first row."""
  per_call = batches[0] * batches[1]
  num_calls = max(1, -(-len(rows) // per_call))
  padded = np.concatenate(
      [rows, np.repeat(rows[:1], num_calls * per_call - len(rows))]
  ).astype(np.int32)
  calls = [
      eval_fn(params, examples, put(group.reshape(batches)))
      for group in padded.reshape(num_calls, per_call)
  ]
  # Joined on the host: a validation is one call, and a device concatenation would copy it.
  return {
      name: (
          np.concatenate([sharding.fetch(c[name]) for c in calls]).reshape(
              (num_calls * per_call,) + calls[0][name].shape[2:]
          )[: len(rows)]
      )
      for name in outputs
  }


# --- Stage 2: the teacher. -----------------------------------------------------------------------

# Config fields that must agree between a student and its teacher: the same patients in the same
# folds (otherwise the teacher has seen the student's test patients), and the same input representation.
TEACHER_MUST_MATCH = (
    'data.dataset',
    'data.num_folds',
    'data.fold',
    'data.fold_seed',
    'data.val_fraction',
    'data.representation',
    'data.crop_size',
    'data.channels',
)


def load_teacher(
    config: ml_collections.ConfigDict, teacher_dir: str = '', *, devices: int
) -> Teacher:
  """The best params of the finished stage-1 run in `teacher_dir` (default: `config.teacher_workdir`),
  read-only, its model for batches split over `devices`."""
  teacher_dir = os.path.abspath(teacher_dir or config.teacher_workdir)
  how = (
      f'train it first: python -m pcrjax.main --config=experiments/stage1.py --workdir={teacher_dir}'
      f' --config.data.fold={config.data.fold}'
  )
  config_path = os.path.join(teacher_dir, runs.CONFIG_FILE)
  if not os.path.exists(config_path):
    raise FileNotFoundError(
        f'No teacher run in {teacher_dir} (no {runs.CONFIG_FILE}): {how}'
    )
  teacher_config = runs.read_config(teacher_dir)
  if teacher_config.stage != runs.model(config.stage).teacher:
    raise ValueError(
        f'{config_path} is a {teacher_config.stage!r} run, not a stage-1 teacher: {how}'
    )
  for field in TEACHER_MUST_MATCH:
    ours, theirs = configs.config_value(config, field), configs.config_value(
        teacher_config, field
    )
    if tuple(np.atleast_1d(ours)) != tuple(np.atleast_1d(theirs)):
      raise ValueError(
          f'The teacher in {teacher_dir} has {field}={theirs!r} but this student has'
          f' {ours!r}: train a teacher for this fold and representation ({how}).'
      )
  if not runs.is_finished(teacher_dir):
    raise FileNotFoundError(
        f'The teacher run in {teacher_dir} has not finished: resume it with the'
        f' same command ({how}).'
    )
  model = models.build(teacher_config, devices=devices)
  like = models.abstract_params(
      model, models.patient_shape(teacher_config.data)
  )
  manager = checkpoints.create_manager(teacher_dir, read_only=True)
  try:
    params = checkpoints.restore_params(manager, manager.best_step(), like)
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
        f'The checkpoint in {teacher_dir} does not match the architecture its'
        f' {runs.CONFIG_FILE} describes (config.model ='
        f' {teacher_config.model.to_dict()}): {e}'
    ) from e
  return Teacher(
      model=model,
      params=params,
      time_points=tuple(teacher_config.data.time_points),
  )


def feature_targets(
    config: ml_collections.ConfigDict,
    source,
    cohort: input_pipeline.Cohort,
    train_rows: np.ndarray,
    mesh,
    *,
    batches: tuple[int, int],
) -> dict[str, np.ndarray]:
  """The student's regression target for every patient: {'target': [N, D], 'target_mask': [N]}.

  `config.dual_task.target`: 'latent' (the frozen teacher's T2 latent), 'logit' (its pCR logit) or
  'kinetics' (the change of the T2 tumour kinetics from T0, from the images alone: no teacher).
  With `dual_task.cross_fit`, a training patient's teacher target comes from the cross-fitted
  teacher that did not train on it (`cross_fitted_teachers`): the fold's teacher has fitted the
  training patients' labels, and its latent of them carries those labels, which the student would
  then learn to regress from T0/T1 as if they were visible there.
  Computed once, on clean (unaugmented) inputs, so that the target is a property of the patient,
  not of an augmented view. With `dual_task.standardise`, each dimension is centred and scaled by
  the training patients' statistics, so that every dimension weighs the same in the MSE, whatever
  its range (the teacher's latent is bounded to +-1 and most of its dimensions vary little).
  `target_mask`: the patient has T2 (no T2, no target). `batches`: the shape of the teacher's
  evaluations (`eval_batches`).
  """
  dual = config.dual_task
  data = ml_collections.ConfigDict(config.data.to_dict())
  rows = np.arange(len(cohort))
  if dual.target == 'kinetics':
    data.time_points = (0, configs.T2)
    kinetics = input_pipeline.load_examples(source, cohort, rows, data)[
        'kinetics'
    ]
    raw = kinetics[:, 1] - kinetics[:, 0]
  else:
    raw = _teacher_outputs(
        config, source, cohort, mesh, config.teacher_workdir, batches
    )
    for teacher_dir in cross_fitted_teachers(config):
      held_out = data_split(runs.read_config(teacher_dir), cohort).test
      raw[held_out] = _teacher_outputs(
          config, source, cohort, mesh, teacher_dir, batches
      )[held_out]
  mask = cohort.visit_mask[:, configs.T2]
  fit = train_rows[mask[train_rows]]
  mean, std = raw[fit].mean(axis=0), raw[fit].std(axis=0)
  logging.info(
      '%s target: %d dimensions, variance over the training patients min %.3g, median %.3g,'
      ' max %.3g%s.',
      dual.target,
      raw.shape[1],
      (std**2).min(),
      np.median(std**2),
      (std**2).max(),
      ', standardised' if dual.standardise else '',
  )
  if dual.standardise:
    raw = (raw - mean) / np.maximum(std, 1e-6)
  return {
      'target': np.where(mask[:, None], raw, 0.0).astype(np.float32),
      'target_mask': mask,
  }


def _teacher_outputs(
    config,
    source,
    cohort: input_pipeline.Cohort,
    mesh,
    teacher_dir: str,
    batches: tuple[int, int],
) -> np.ndarray:
  """[N, D]: the teacher's `dual_task.target` output of every patient, on clean inputs."""
  teacher = load_teacher(config, teacher_dir, devices=mesh.size)
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.time_points = teacher.time_points
  rows = np.arange(len(cohort))
  replicated = sharding.replicated(mesh)
  examples = sharding.put(
      input_pipeline.load_examples(source, cohort, rows, data), replicated
  )
  raw = predict(
      functools.partial(eval_step, teacher.model.apply),
      sharding.put(teacher.params, replicated),
      examples,
      rows,
      batches=batches,
      put=functools.partial(
          sharding.put, sharding=sharding.epoch_batch_sharding(mesh)
      ),
      outputs=(config.dual_task.target,),
  )[config.dual_task.target]
  return np.array(raw).reshape(
      len(rows), -1
  )  # A writable copy: cross-fitting fills in rows.


def cross_fitted_teachers(config: ml_collections.ConfigDict) -> list[str]:
  """The `dual_task.cross_fit` teachers of the student's fold, trained where not finished yet.

  Each is the fold's teacher (its config.json) trained without one of K stratified parts of the
  fold's training patients (`data.inner_parts`), in <teacher workdir>/cross_fit/part_<k>: shared by
  every student of that teacher (the lambda candidates, a resumed run).
  """
  teachers, fold_teacher = [], runs.read_config(config.teacher_workdir)
  for part in range(config.dual_task.cross_fit):
    teacher_config = ml_collections.ConfigDict(fold_teacher.to_dict())
    teacher_config.data.inner_parts, teacher_config.data.inner_part = (
        config.dual_task.cross_fit,
        part,
    )
    directory = runs.cross_fit_dir(
        os.path.abspath(config.teacher_workdir), part
    )
    if not runs.is_finished(directory):
      logging.info(
          'Cross-fitting teacher %d/%d of fold %d.',
          part + 1,
          config.dual_task.cross_fit,
          config.data.fold,
          extra=console.TRAINING_LINE,
      )
      train_and_evaluate(teacher_config, directory)
    teachers.append(directory)
  return teachers


def head_start(
    config: ml_collections.ConfigDict,
    examples: dict[str, np.ndarray],
    rows: np.ndarray,
    latent_dim: int,
) -> dict[str, dict[str, np.ndarray]]:
  """The pCR head's starting parameters: a logistic regression fitted on the training patients `rows`
  to what the head reads besides the image latent (tumour kinetics, subtype), the latent's weights 0.

  A gradient step from a random head takes most of a run to find a few well-known effects (the
  subtype's log-odds, the FTV change), and the epoch selected on a small validation split is then
  an under-fitted one; started at the logistic model, training spends its steps on what the images
  add. Fitted standardised, L2 (sklearn's default C = 1), weighted as the loss weighs the classes,
  then mapped back to the raw inputs. Only where the model has such inputs (`tumour_kinetics`,
  `clinical_inputs`); {} otherwise.
  """
  m = config.model
  blocks = {}
  if m.tumour_kinetics:
    blocks['pcr_head'] = np.asarray(
        models.kinetics_features(
            examples['kinetics'][rows], examples['visit_mask'][rows]
        )
    )
  if m.clinical_inputs:
    blocks['subtype_offset'] = np.asarray(
        models.receptor_cells(examples['clinical'][rows])
    )
  if not blocks:
    return {}
  x = np.concatenate(list(blocks.values()), axis=1).astype(np.float64)
  labels = examples['label'][rows]
  mean, std = x.mean(axis=0), x.std(axis=0)
  varies = std > 1e-8
  fit = linear_model.LogisticRegression(
      class_weight='balanced' if config.class_weighting == 'balanced' else None,
      max_iter=1000,
  ).fit((x[:, varies] - mean[varies]) / std[varies], labels)
  weights = np.zeros(x.shape[1])
  weights[varies] = fit.coef_[0] / std[varies]
  bias = fit.intercept_[0] - weights @ mean
  start, sizes = {}, [b.shape[1] for b in blocks.values()]
  for (name, _), part in zip(
      blocks.items(), np.split(weights, np.cumsum(sizes)[:-1])
  ):
    start[name] = {'kernel': part[:, None].astype(np.float32)}
  if 'pcr_head' in start:
    start['pcr_head']['kernel'] = np.concatenate(
        [np.zeros((latent_dim, 1), np.float32), start['pcr_head']['kernel']]
    )
    start['pcr_head']['bias'] = np.array([bias], np.float32)
  else:  # Subtype cells sum to 1: the intercept goes into their offsets.
    start['subtype_offset']['kernel'] += np.float32(bias)
  return start


# --- The loop. ------------------------------------------------------------------------------------


def data_split(
    config: ml_collections.ConfigDict, cohort: input_pipeline.Cohort
) -> folds.FoldSplit:
  """The run's train / validation / test patients: its fold, or a part of it (`data.inner_parts`)."""
  data = config.data
  stratum = folds.strata(cohort.pcr, cohort.subtype)
  split = folds.split_fold(
      cohort.patient_id,
      stratum,
      num_folds=data.num_folds,
      fold=data.fold,
      seed=data.fold_seed,
      val_fraction=data.val_fraction,
  )
  if data.inner_parts:
    split = folds.hold_out_part(
        split,
        cohort.patient_id,
        stratum,
        parts=data.inner_parts,
        part=data.inner_part,
        seed=data.fold_seed + 3,
    )
  return split


def choose_feature_weight(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  """lambda (`feature_loss_weight`) chosen on the inner validation split.

  A student per candidate of `dual_task.lambda_grid`, in <workdir>/lambda_<w>, each with its epoch
  selected as any run's; the candidate whose selected epoch has the best validation metric (the
  first in the grid's order on a tie) becomes this run: its checkpoints, metrics, selection and
  predictions are copied here, config.json gets its lambda, lambda_choice.json every candidate's
  metric. The test patients play no part in the choice.
  """
  scores = {}
  for weight in config.dual_task.lambda_grid:
    candidate = ml_collections.ConfigDict(config.to_dict())
    candidate.feature_loss_weight, candidate.dual_task.lambda_grid = (
        float(weight),
        (),
    )
    directory = runs.lambda_dir(workdir, weight)
    if not runs.is_finished(directory):
      train_and_evaluate(candidate, directory)
    scores[float(weight)] = runs.read_selection(directory)['value']
  chosen = max(scores, key=scores.get)
  logging.info(
      'lambda %g chosen on validation (%s).',
      chosen,
      ', '.join(f'{w:g}: {v:.4f}' for w, v in scores.items()),
      extra=console.TRAINING_LINE,
  )
  if sharding.is_primary():
    config = ml_collections.ConfigDict(config.to_dict())
    config.feature_loss_weight = chosen
    runs.write_config(workdir, config)
    with fileio.atomic_open(
        os.path.join(workdir, runs.LAMBDA_CHOICE_FILE)
    ) as f:
      json.dump(
          {
              'metric': checkpoints.SELECTION_METRIC,
              'chosen': chosen,
              'candidates': [
                  {'lambda': w, 'value': v} for w, v in scores.items()
              ],
          },
          f,
          indent=2,
      )
    runs.adopt_run(runs.lambda_dir(workdir, chosen), workdir)
  return {
      'best_epoch': runs.selected_epoch(workdir),
      'workdir': workdir,
      'lambda': chosen,
  }


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  """Trains one stage on one fold, then predicts its validation and test patients with the best
  epoch. Its wall time per phase (pcrjax.wall_time) lands in runs.TIMING_FILE.
  """
  configs.validate(config)
  workdir = os.path.abspath(workdir)
  primary = (
      sharding.is_primary()
  )  # Of several processes (jax.distributed), one writes the files.
  if primary:
    runs.write_config(workdir, config)
  learns_from_teacher = bool(runs.model(config.stage).teacher)
  if learns_from_teacher and config.dual_task.lambda_grid:
    return choose_feature_weight(config, workdir)

  clock = wall_time.Clock()
  mesh = sharding.make_mesh()
  replicated = sharding.replicated(mesh)
  # [steps or batches, batch] rows: each batch split over the devices.
  put_rows = functools.partial(
      sharding.put, sharding=sharding.epoch_batch_sharding(mesh)
  )

  source = input_pipeline.load_source(config.data)
  cohort = input_pipeline.load_cohort(config.data)
  split = data_split(config, cohort)
  logging.info(
      '%s, fold %d/%d: %d train, %d val, %d test patients; %d devices in %d process(es).',
      config.stage,
      config.data.fold,
      config.data.num_folds,
      len(split.train),
      len(split.val),
      len(split.test),
      jax.device_count(),
      jax.process_count(),
      extra=console.TRAINING_LINE,
  )
  batches = eval_batches(len(split.val), config.eval_batch_size, mesh.size)

  # Every patient goes to the device once (one shape for every fold: one compilation); a step
  # gathers and augments its batch there, by source row.
  host_examples = input_pipeline.load_examples(
      source, cohort, np.arange(len(cohort)), config.data
  )
  clock.lap('data')
  if learns_from_teacher:
    host_examples.update(
        feature_targets(
            config, source, cohort, split.train, mesh, batches=batches
        )
    )
  model = models.build(config, runs.feature_dim(config), devices=mesh.size)
  input_shape = models.patient_shape(config.data)

  steps_per_epoch = len(split.train) // config.batch_size
  rng = jax.random.fold_in(jax.random.key(config.seed), config.data.fold)
  init_rng, dropout_rng, augment_rng = jax.random.split(rng, 3)
  clock.lap('setup')
  state = create_train_state(
      init_rng, config, model, input_shape, steps_per_epoch
  )
  clock.lap('compile')
  start = head_start(
      config, host_examples, split.train, config.model.lstm_features
  )
  state = state.replace(params=flax.core.copy(state.params, start))
  state = sharding.put(state, replicated)
  with checkpoints.managed(
      workdir
  ) as manager, contextlib.ExitStack() as cleanup:
    clock.lap('setup')
    state, start_epoch = checkpoints.restore_latest(manager, state)
    if start_epoch:
      logging.info(
          'Resuming from epoch %d in %s.',
          start_epoch,
          workdir,
          extra=console.TRAINING_LINE,
      )
      state = state.replace(
          step=sharding.put(np.int32(start_epoch * steps_per_epoch), replicated)
      )
    clock.lap('checkpoints')

    examples = sharding.put(host_examples, replicated)
    clock.lap('data')
    pos_weight = sharding.put(
        np.float32(positive_weight(config, cohort.pcr[split.train])), replicated
    )
    step_kwargs = dict(
        augmentation=input_pipeline.augmentation(config.data),
        feature_loss_weight=float(config.feature_loss_weight),
    )
    eval_fn = clock.first_call(
        functools.partial(eval_step, state.apply_fn), before='validation'
    )
    train_step_fn = clock.first_call(train_step, before='steps')
    empty_metrics = sharding.put(TrainMetrics.empty(), replicated)
    # One dispatch per epoch's log line, not the schedule's dozen eager operations.
    learning_rate = jax.jit(create_learning_rate_fn(config, steps_per_epoch))

    evaluate = functools.partial(
        predict, eval_fn, examples=examples, batches=batches, put=put_rows
    )

    log = cleanup.enter_context(
        contextlib.closing(_MetricsLog(workdir, start_epoch, primary))
    )
    best_auroc = log.best(checkpoints.SELECTION_METRIC)
    profiler = _Profiler(workdir, config.profile_steps if primary else 0)
    cleanup.callback(profiler.stop)
    clock.lap('setup')
    for epoch in range(start_epoch + 1, config.num_epochs + 1):
      started = time.time()
      # The epoch's batches go to the device at once; each step takes its own row there and merges
      # its metrics into the epoch's: one dispatch per step, no transfer.
      epoch_rows = put_rows(
          split.train[
              input_pipeline.epoch_batches(
                  len(split.train),
                  batch_size=config.batch_size,
                  seed=config.seed,
                  epoch=epoch,
              )
          ]
      )
      train_metrics = empty_metrics
      for _ in range(steps_per_epoch):
        profiler.before_step()
        state, train_metrics = train_step_fn(
            state,
            train_metrics,
            examples,
            epoch_rows,
            dropout_rng,
            augment_rng,
            pos_weight,
            **step_kwargs,
        )
        profiler.after_step(state)
      computed = train_metrics.compute()
      first_bad = int(
          computed.pop('first_nonfinite_step')
      )  # Waits for the epoch's last step.
      clock.lap('steps')
      if first_bad >= 0:
        _diverged(
            config,
            manager,
            workdir,
            f'epoch {epoch}, step {first_bad}: the loss or a'
            ' gradient is not finite',
        )
      val = evaluate(
          state.params, rows=split.val, outputs=('probability', 'bce')
      )
      probs, labels = val['probability'], cohort.pcr[split.val]
      summary = {f'train_{k}': float(v) for k, v in computed.items()}
      exploded = explosion(
          summary['train_loss'],
          log.value(1, 'train_loss') if epoch > 1 else None,
          probs,
      )
      if exploded:
        _diverged(config, manager, workdir, f'epoch {epoch}: {exploded}')
      val_auroc = float(statistics.auroc(labels, probs))
      summary.update(
          {
              'val_auroc': val_auroc,
              checkpoints.SELECTION_METRIC: smoothed(
                  log.values('val_auroc') + [val_auroc], config.selection_window
              ),
              'val_bce': float(val['bce'].mean()),
              'learning_rate': float(learning_rate(state.step)),
              'epoch_seconds': time.time() - started,
          }
      )
      selection = summary[checkpoints.SELECTION_METRIC]
      clock.lap('validation')
      if (
          selection > best_auroc
          or epoch % config.checkpoint_every_epochs == 0
          or epoch == config.num_epochs
      ):
        checkpoints.save(
            manager, epoch, state, {checkpoints.SELECTION_METRIC: selection}
        )
      best_auroc = max(best_auroc, selection)
      clock.lap('checkpoints')
      log.write(epoch, int(state.step), summary)
      logging.info(
          'epoch %d/%d: %s',
          epoch,
          config.num_epochs,
          ', '.join(f'{k}={v:.4g}' for k, v in summary.items()),
          extra=console.TRAINING_LINE,
      )
      clock.lap('logs')
    profiler.stop()
    manager.wait_until_finished()

    params, best_epoch = checkpoints.restore_best_params(manager, state.params)
    clock.lap('checkpoints')
    if primary:
      runs.write_selection(
          workdir,
          epoch=best_epoch,
          metric=checkpoints.SELECTION_METRIC,
          value=log.value(best_epoch, checkpoints.SELECTION_METRIC),
      )
    for split_name in runs.SPLITS:  # Test last: its file marks a finished run.
      rows = getattr(split, split_name)
      # On every process: a collective.
      probs = evaluate(params, rows=rows)['probability']
      if primary:
        runs.write_predictions(
            runs.predictions_path(workdir, split_name),
            cohort.prediction_rows(rows, probs, config.data.fold),
        )
    clock.lap('validation')
  clock.lap('checkpoints')  # Closing the manager.
  clock.finish(
      workdir if primary else None,
      steps=(config.num_epochs - start_epoch) * steps_per_epoch,
      devices=f'{jax.device_count()} {jax.default_backend()} device(s)',
  )
  return {'best_epoch': best_epoch, 'workdir': workdir}


def smoothed(values: list[float], window: int) -> float:
  """The mean of the last `window` values: the selection metric. The AUROC of ~80 validation
  patients moves by a few hundredths from one epoch to the next; the best single epoch is then
  mostly the luckiest, and a window of epochs selects a good stretch of training instead.
  """
  return float(np.mean(values[-window:]))


def _diverged(
    config: ml_collections.ConfigDict, manager, workdir: str, what: str
):
  manager.wait_until_finished()
  last_good = manager.latest_step()
  raise Diverged(
      f'{config.stage}, fold {config.data.fold}, {what}. The last good checkpoint is epoch'
      f' {last_good or "none"} in {workdir}. Lower learning_rate (now {config.learning_rate:g}) or'
      f' grad_clip_norm (now {config.grad_clip_norm:g}), or check the inputs; then delete the'
      ' workdir or resume.'
  )


@functools.partial(
    jax.jit,
    donate_argnums=0,
    static_argnames=('augmentation', 'feature_loss_weight'),
)
def train_step(
    state,
    epoch_metrics,
    examples,
    epoch_rows,
    dropout_rng,
    augment_rng,
    pos_weight,
    *,
    augmentation,
    **kwargs,
):
  """_batch_step on the next batch of the epoch, `epoch_rows[state.step % steps]`, gathered and
  augmented on the device; its metrics merged into `epoch_metrics`.

  Jitted once per process: the protocol's trainings of one network share the compiled step (and,
  through the persistent compilation cache, later runs do too).
  """
  rows = epoch_rows[state.step % epoch_rows.shape[0]]
  batch = input_pipeline.device_batch(
      examples, rows, jax.random.fold_in(augment_rng, state.step), augmentation
  )
  state, step_metrics = _batch_step(
      state, batch, dropout_rng, pos_weight, **kwargs
  )
  return state, epoch_metrics.merge(step_metrics)


class _Profiler:
  """Traces `num_steps` training steps with the JAX profiler into runs.PROFILE_DIR (TensorBoard's
  profile plugin and Perfetto read it), from the run's second step on: the first one compiles.
  """

  def __init__(self, workdir: str, num_steps: int):
    self._dir = os.path.join(workdir, runs.PROFILE_DIR)
    self._num_steps, self._steps, self._tracing = num_steps, 0, False

  def before_step(self) -> None:
    if self._num_steps and self._steps == 1:
      jax.profiler.start_trace(self._dir)
      self._tracing = True
    self._steps += 1

  def after_step(self, state) -> None:
    if self._tracing and self._steps == 1 + self._num_steps:
      jax.block_until_ready(state)
      self.stop()

  def stop(self) -> None:
    if self._tracing:
      jax.profiler.stop_trace()
      self._tracing = False
      logging.info(
          'Profiler trace of %d training steps written to %s.',
          self._steps - 1,
          self._dir,
      )


class _MetricsLog:
  """metrics.jsonl (one line per epoch, rewritten whole: never a half line) and TensorBoard events;
  a resumed run drops the lines of epochs after its checkpoint. Every process keeps the lines (the
  best epoch so far decides a checkpoint on all of them); the primary writes the files.
  """

  def __init__(self, workdir: str, start_epoch: int, writes_files: bool = True):
    self._path = os.path.join(workdir, runs.METRICS_FILE)
    self._lines = []
    if os.path.exists(self._path):
      with open(self._path) as f:
        self._lines = [
            line for line in f if json.loads(line)['epoch'] <= start_epoch
        ]
    self._writer = tensorboardX.SummaryWriter(workdir) if writes_files else None

  def write(self, epoch: int, step: int, summary: dict[str, float]) -> None:
    self._lines.append(
        json.dumps({'epoch': epoch, 'step': step, **summary}) + '\n'
    )
    if self._writer is None:
      return
    with fileio.atomic_open(self._path) as f:
      f.writelines(self._lines)
    for key, value in summary.items():
      self._writer.add_scalar(key, value, step)

  def values(self, key: str) -> list[float]:
    """`key` of every kept epoch, in order."""
    return [json.loads(line)[key] for line in self._lines]

  def value(self, epoch: int, key: str) -> float:
    return next(
        line[key]
        for line in map(json.loads, self._lines)
        if line['epoch'] == epoch
    )

  def best(self, key: str) -> float:
    """The largest `key` of the kept lines (-inf before the first epoch)."""
    return max(
        (line[key] for line in map(json.loads, self._lines)), default=-np.inf
    )

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
