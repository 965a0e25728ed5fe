"""The training loop: init or resume, data-parallel steps, metrics, checkpoints, evaluation.

`train_and_evaluate(config, workdir)` is what `train.py` calls. The workdir holds
`checkpoints/` (orbax), `config.json` and TensorBoard event files; a run started again on the
same workdir resumes from its latest checkpoint, and the input pipeline skips the batches
already seen, so that an interrupted run ends with the same parameters as an uninterrupted one.

Reliability (docs in `training.preemption`, `training.workdir`):
- before any step: the workdir is writable and has room for a checkpoint, and a workdir with
  checkpoints was made by the same config (`config.json`); a checkpoint that does not fit the
  model is an error, never a partial load;
- SIGTERM: the current step is finished, checkpointed, and the run returns early;
- a step with a non-finite loss or gradient changes nothing (see `step.train_step`) and is
  counted (`train/nonfinite_steps`); `config.max_consecutive_nonfinite` in a row are an error;
  a non-finite state is never saved;
- images the input pipeline left out (`dataset.skip_bad_examples`, images without segments)
  are listed at the end, in the log and in `skipped_examples.json`.
"""
import functools
import importlib
import json
import os
import time
from typing import Any, Callable, Iterator, Mapping, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ciae_jax import memory as memory_lib
from ciae_jax.models import ciae as ciae_model
from ciae_jax.training import checkpoint as checkpoint_lib
from ciae_jax.training import metrics as metrics_lib
from ciae_jax.training import optim
from ciae_jax.training import parallel
from ciae_jax.training import preemption
from ciae_jax.training import step as step_lib
from ciae_jax.training import train_state as train_state_lib
from ciae_jax.training import workdir as workdir_lib

# Parameters of a fully convolutional net do not depend on the input size: initialise on the
# smallest image the model accepts with all five levels (P7 has stride 128).
INIT_IMAGE_HW = (128, 128)
# evaluate_fn(config, state, *, workdir, step) -> results; the default wraps this function.
DEFAULT_EVAL_MODULE = "ciae_jax.eval_lib"
DEFAULT_EVAL_FUNCTION = "evaluate"

# Images the training input left out: listed at the end of the run (log and this file).
SKIPPED_EXAMPLES_FILE = "skipped_examples.json"
MAX_SKIPPED_LOGGED = 50

EvaluateFn = Callable[..., Optional[Mapping[str, Any]]]
InputFn = Callable[..., Iterator[Mapping[str, np.ndarray]]]


@functools.partial(jax.jit, static_argnums=(0,))
def _init_variables(model: ciae_model.CIAE, rng: jax.Array) -> Any:
  images = jnp.zeros((1, *INIT_IMAGE_HW, 3), jnp.float32)  # [1, 128, 128, 3]
  return model.init(rng, images, train=False)


def build_optimizer(config: ml_collections.ConfigDict, params: Any
                    ) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
  """(optax optimizer, learning-rate schedule) from `config.optimizer` and `config.batch_size`."""
  opt = config.optimizer
  lr = optim.scaled_learning_rate(base_lr=opt.base_lr, batch_size=config.batch_size,
                                  lr=opt.lr)
  schedule = optim.learning_rate_schedule(
      lr=lr, warmup_steps=opt.warmup_steps, warmup_factor=opt.warmup_factor,
      decay_steps=tuple(opt.decay_steps), decay_factor=opt.decay_factor)
  optimizer = optim.build_optimizer(
      params, learning_rate=schedule, momentum=opt.momentum, weight_decay=opt.weight_decay,
      grad_clip_norm=opt.grad_clip_norm, frozen_patterns=tuple(opt.frozen_patterns))
  return optimizer, schedule


def init_train_state(config: ml_collections.ConfigDict, model: ciae_model.CIAE, *,
                     num_stuff: int, num_things: int, rng: jax.Array
                     ) -> tuple[train_state_lib.TrainState, optax.GradientTransformation,
                                Callable[[Any], jax.Array]]:
  """Step-0 host state, its optimizer and schedule; the backbone from `config.init_backbone`."""
  params_rng, memory_rng, state_rng = jax.random.split(rng, 3)
  variables = _init_variables(model, params_rng)
  if config.init_backbone:
    from ciae_jax.models import convert  # pylint: disable=g-import-not-at-top
    variables = convert.load_backbone_params(config.init_backbone, variables)
    logging.info("Backbone initialised from %s", config.init_backbone)
  params, model_state = train_state_lib.split_variables(variables)
  optimizer, schedule = build_optimizer(config, params)
  rows = memory_lib.num_memory(num_stuff, num_things, config.loss.merge_things)
  memory = memory_lib.init_memory(memory_rng, rows, config.model.embed_dim)  # [M, D]
  state = train_state_lib.create_train_state(params=params, optimizer=optimizer, memory=memory,
                                             rng=state_rng, model_state=model_state)
  return jax.device_get(state), optimizer, schedule


def make_train_step(config: ml_collections.ConfigDict, model: ciae_model.CIAE,
                    optimizer: optax.GradientTransformation,
                    schedule: Callable[[Any], jax.Array], *, num_stuff: int) -> Callable:
  """The per-device step with every hyper-parameter of `config` bound (not yet parallel)."""
  return functools.partial(
      step_lib.train_step, model=model, optimizer=optimizer, learning_rate_fn=schedule,
      num_stuff=num_stuff, total_steps=config.total_steps,
      strides=tuple(config.fcos.strides), sizes=tuple(config.fcos.sizes),
      positive_region=config.fcos.positive_region, focal_alpha=config.fcos.focal_alpha,
      focal_gamma=config.fcos.focal_gamma, iou_kind=config.fcos.iou_kind,
      centerness_weighted_reg=config.fcos.centerness_weighted_reg,
      margin=config.loss.margin, top_k=config.loss.top_k, alpha=config.loss.alpha,
      thing_weight=config.loss.thing_weight, box_expand=config.loss.box_expand,
      use_box_filter=config.loss.use_box_filter, merge_things=config.loss.merge_things,
      loss_stride=config.loss.loss_stride, include_own=config.loss.include_own,
      stop_query_gradient=config.loss.stop_query_gradient,
      momentum_coeff=config.memory.momentum_coeff,
      momentum_power=config.memory.momentum_power)


def flatten_eval_results(results: Mapping[str, Any], *,
                         skip: tuple[str, ...] = ("per_class",)) -> dict[str, float]:
  """Nested evaluation results -> {'All/pq': x, 'box_ap/AP': y, ...}, scalars only."""
  flat = {}

  def visit(prefix, node):
    for key, value in node.items():
      if key in skip:
        continue
      name = f"{prefix}{key}"
      if isinstance(value, Mapping):
        visit(name + "/", value)
      elif np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.number):
        flat[name] = float(value)
  visit("", results)
  return flat


def default_evaluate_fn() -> Optional[EvaluateFn]:
  """Wraps `ciae_jax.eval_lib.evaluate` as an `evaluate_fn`; None if that module is absent."""
  try:
    module = importlib.import_module(DEFAULT_EVAL_MODULE)
  except ModuleNotFoundError as error:
    if error.name != DEFAULT_EVAL_MODULE:
      raise
    return None
  evaluate = getattr(module, DEFAULT_EVAL_FUNCTION, None)
  if evaluate is None:
    return None

  def evaluate_fn(config, state, *, workdir, step):
    del workdir  # PQ is computed in memory; evaluate.py writes the prediction files.
    variables = {"params": state.params, **state.model_state}
    results = evaluate(config, variables=variables, memory=state.memory)
    from ciae_jax.evaluation import pq  # pylint: disable=g-import-not-at-top
    print(f"Panoptic quality at step {step} ({results.get('num_images', '?')} images):\n"
          f"{pq.format_pq_table(results)}", flush=True)
    return results
  return evaluate_fn


def _default_input_fn(dataset_cfg, split, **kwargs):
  from ciae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.build_input(dataset_cfg, split, **kwargs)


def _load_categories(dataset_cfg):
  from ciae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.load_dataset_categories(dataset_cfg)


def _check_config(config: ml_collections.ConfigDict) -> None:
  if config.total_steps <= 0:
    raise ValueError(f"config.total_steps must be > 0, got {config.total_steps}")
  if config.log_every_steps <= 0:
    raise ValueError(f"config.log_every_steps must be > 0, got {config.log_every_steps}")
  num_devices = jax.device_count()
  if config.batch_size % num_devices:
    raise ValueError(f"config.batch_size {config.batch_size} must be divisible by the "
                     f"{num_devices} devices")
  if config.parallel not in parallel.PARALLEL_MODES:
    raise ValueError(f"config.parallel must be one of {parallel.PARALLEL_MODES}, got "
                     f"{config.parallel!r}")
  if config.get("max_consecutive_nonfinite", 1) < 1:
    raise ValueError("config.max_consecutive_nonfinite must be >= 1, got "
                     f"{config.max_consecutive_nonfinite}")


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Config as flat {'a.b': scalar} for TensorBoard's hparams (lists become strings)."""
  return {name: value if isinstance(value, (bool, int, float, str)) else str(value)
          for name, value in workdir_lib.flat_config(config).items()}


def _create_writer(workdir: str):
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  # Only process 0 writes event files; the others only log.
  return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       evaluate_fn: Optional[EvaluateFn] = None,
                       input_fn: Optional[InputFn] = None) -> train_state_lib.TrainState:
  """Trains `config` in `workdir` (resuming from its latest checkpoint) and evaluates.

  Args:
    config: the training config (`ciae_jax.training.config_lib.base_config` fields).
    workdir: checkpoints and TensorBoard event files go here.
    evaluate_fn: `evaluate_fn(config, state, *, workdir, step) -> results` called every
      `config.eval_every_steps` and at the end with the host `TrainState` (params,
      model_state, memory); the numeric scalars of the (nested) results are written as
      `eval/<path>` (`per_class` left out). Default: `ciae_jax.eval_lib.evaluate`, skipped with
      a log line if that does not exist. `config.eval_every_steps <= 0` disables evaluation.
    input_fn: `input_fn(dataset_cfg, split, *, train, global_batch_size, seed, start_step)`
      yielding batches `[local_devices, per_device_batch, ...]`; default the tf.data pipeline.

  Returns:
    The final state, one host copy; after a SIGTERM the state of the step it was saved at
    (`state.step < config.total_steps`, no final evaluation).

  Raises:
    workdir_lib.WorkdirError: the workdir is not writable, has no room for a checkpoint, or
      holds checkpoints of another config (before any step).
    ValueError: a checkpoint that does not fit the model; bad data (file and image id).
    FloatingPointError: `config.max_consecutive_nonfinite` steps in a row were not finite.
  """
  _check_config(config)
  workdir_lib.check_writable(workdir)  # Before anything expensive.
  # Installed first: a SIGTERM during start-up or compilation also ends the run cleanly.
  with preemption.PreemptionWatcher() as watcher:
    return _train_and_evaluate(config, workdir, evaluate_fn=evaluate_fn, input_fn=input_fn,
                               watcher=watcher)


def _train_and_evaluate(config, workdir, *, evaluate_fn, input_fn, watcher):
  """`train_and_evaluate` after the config and workdir checks, under `watcher`."""
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  input_fn = input_fn or _default_input_fn
  if evaluate_fn is None and config.eval_every_steps > 0:
    evaluate_fn = default_evaluate_fn()
    if evaluate_fn is None:
      logging.info("No %s.%s: evaluation is skipped.", DEFAULT_EVAL_MODULE,
                   DEFAULT_EVAL_FUNCTION)

  categories = _load_categories(config.dataset)
  num_stuff, num_things = categories.num_stuff, categories.num_things
  logging.info("Dataset: %d stuff + %d thing classes", num_stuff, num_things)
  model = ciae_model.build_model(config.model, num_things)

  rng = jax.random.PRNGKey(config.seed)
  host_state, optimizer, schedule = init_train_state(config, model, num_stuff=num_stuff,
                                                     num_things=num_things, rng=rng)
  workdir_lib.check_free_space(workdir, host_state, keep_checkpoints=config.keep_checkpoints)
  manager = checkpoint_lib.create_manager(
      workdir, checkpoint_every_steps=config.checkpoint_every_steps,
      keep_checkpoints=config.keep_checkpoints, cleanup_tmp=True)
  workdir_lib.check_config(config, workdir, resuming=manager.latest_step() is not None)
  restored = checkpoint_lib.restore_latest(manager, host_state)
  if restored is not None:
    host_state = restored
    logging.info("Resumed from checkpoint at step %d in %s", int(host_state.step), workdir)
  start_step = int(host_state.step)
  if start_step >= config.total_steps:
    manager.close()
    logging.info("Nothing to train: the checkpoint is at step %d >= total_steps %d",
                 start_step, config.total_steps)
    return host_state

  writer = _create_writer(workdir)
  if start_step == 0:
    writer.write_hparams(_flat_hparams(config))

  mesh = parallel.make_mesh() if config.parallel == "shard_map" else None
  step_fn = parallel.parallelize(
      make_train_step(config, model, optimizer, schedule, num_stuff=num_stuff),
      parallel=config.parallel, mesh=mesh)
  state = parallel.replicate(host_state, parallel=config.parallel, mesh=mesh)
  del host_state

  batches = input_fn(config.dataset, config.dataset.train_split, train=True,
                     global_batch_size=config.batch_size, seed=config.seed,
                     start_step=start_step)
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=config.total_steps, writer=writer, every_steps=config.log_every_steps)

  def run_evaluation(step: int, state: Any) -> None:
    if evaluate_fn is None:
      return
    host = parallel.unreplicate(state, parallel=config.parallel)
    with report_progress.timed("eval"):
      results = evaluate_fn(config, host, workdir=workdir, step=step)
    if results:
      scalars = {f"eval/{k}": v for k, v in flatten_eval_results(results).items()}
      writer.write_scalars(step, scalars)
      logging.info("Evaluation at step %d: %s", step, scalars)

  logging.info("Training from step %d to %d (%s, %d devices, global batch %d)", start_step,
               config.total_steps, config.parallel, jax.device_count(), config.batch_size)
  try:
    state = _train_steps(config, state, start_step=start_step, step_fn=step_fn,
                         batches=batches, mesh=mesh, writer=writer, manager=manager,
                         report_progress=report_progress, run_evaluation=run_evaluation,
                         watcher=watcher)
  finally:
    _report_skipped_examples(batches, workdir)
    # A checkpoint still being written (e.g. when the input fails) is completed first.
    manager.wait_until_finished()
    # Closed here, in this thread: the event-file writer is a TensorFlow resource that must not
    # be left to the garbage collector (or to another thread) to destroy.
    writer.close()
    manager.close()
    if hasattr(batches, "close"):
      batches.close()  # Releases the input pipeline's threads and buffers now.
  return parallel.unreplicate(state, parallel=config.parallel)


class _NonfiniteCounter:
  """Counts skipped steps in a row from the step's `finite` flag, read one step late.

  Reading the flag of step t right after dispatching step t + 1 lets the device run ahead (no
  host sync per step); the error comes at most one step late, and the state stays finite
  anyway (a skipped step changes nothing).
  """

  def __init__(self, max_in_a_row: int):
    self.max_in_a_row = max_in_a_row
    self.in_a_row = 0
    self.total = 0
    self._pending = None  # (step, device bool) not yet read.

  def push(self, step: int, finite: Any) -> None:
    """Records step `step`'s flag and reads the previous one."""
    self.flush()
    self._pending = (step, finite)

  def flush(self) -> None:
    """Reads the pending flag; FloatingPointError after `max_in_a_row` skipped steps."""
    if self._pending is None:
      return
    step, finite = self._pending
    self._pending = None
    if bool(jax.device_get(finite)):
      self.in_a_row = 0
      return
    self.in_a_row += 1
    self.total += 1
    logging.warning("step %d skipped: non-finite loss, gradients or memory update (%d in a "
                    "row, %d in this run); the state is that of step %d", step,
                    self.in_a_row, self.total, step - self.in_a_row)
    if self.in_a_row >= self.max_in_a_row:
      raise FloatingPointError(
          f"{self.in_a_row} consecutive steps ({step - self.in_a_row + 1}..{step}) had a "
          "non-finite loss, gradients or memory update and were skipped "
          f"(config.max_consecutive_nonfinite={self.max_in_a_row}). The parameters are those "
          f"of step {step - self.in_a_row}. Lower the learning rate, set "
          "config.optimizer.grad_clip_norm, or check the input data of these steps.")


def _save(manager, step: int, state: Any, *, parallel_mode: str) -> None:
  host = parallel.unreplicate(state, parallel=parallel_mode)
  if step in manager.all_steps():
    return  # Already saved (e.g. SIGTERM right after a periodic checkpoint).
  checkpoint_lib.save(manager, step, host, force=True)


def _train_steps(config, state, *, start_step, step_fn, batches, mesh, writer, manager,
                 report_progress, run_evaluation, watcher):
  """Steps `start_step + 1 .. total_steps` with logging, checkpoints and evaluation."""
  train_metrics = None
  last_log_time, last_log_step = time.time(), start_step
  nonfinite = _NonfiniteCounter(config.get("max_consecutive_nonfinite", 10))
  if start_step < config.total_steps and watcher.should_stop(start_step):
    logging.warning("Stop requested before step %d: nothing trained, nothing saved.",
                    start_step + 1)
    return state
  for step in range(start_step + 1, config.total_steps + 1):
    # `step` counts updates: after this iteration state.step == step.
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      batch = next(batches)
      step_lib.check_batch(batch, leading_axes=2)  # [local_devices, per_device_batch, ...]
      state, outputs = step_fn(state, parallel.shard_batch(batch, parallel=config.parallel,
                                                           mesh=mesh))
    outputs = parallel.first_copy(outputs, parallel=config.parallel)
    nonfinite.push(step, outputs["finite"])
    update = metrics_lib.TrainMetrics.single_from_model_output(**outputs)
    train_metrics = update if train_metrics is None else train_metrics.merge(update)
    report_progress(step, time.time())

    is_last = step == config.total_steps
    if step % config.log_every_steps == 0 or is_last:
      nonfinite.flush()
      scalars = {f"train/{k}": float(v) for k, v in train_metrics.compute().items()}
      writer.write_scalars(step, scalars)
      now = time.time()
      steps_per_sec = (step - last_log_step) / max(now - last_log_time, 1e-9)
      last_log_time, last_log_step = now, step
      logging.info("step %d/%d: loss %.4f (cls %.4f reg %.4f ctr %.4f ciae %.4f) lr %.2e, "
                   "%.2f steps/s%s", step, config.total_steps, scalars["train/loss"],
                   scalars["train/loss_cls"], scalars["train/loss_reg"],
                   scalars["train/loss_ctr"], scalars["train/loss_ciae"],
                   scalars["train/learning_rate"], steps_per_sec,
                   f", {int(scalars['train/nonfinite_steps'])} non-finite steps skipped"
                   if scalars["train/nonfinite_steps"] else "")
      train_metrics = None
    stop = watcher.should_stop(step)
    if step % config.checkpoint_every_steps == 0 or is_last or stop:
      nonfinite.flush()
      _save(manager, step, state, parallel_mode=config.parallel)
    if stop:
      manager.wait_until_finished()
      logging.warning("Preempted: checkpoint saved at step %d of %d in %s; start the same "
                      "command again to resume.", step, config.total_steps, manager.directory)
      return state
    if config.eval_every_steps > 0 and (step % config.eval_every_steps == 0 or is_last):
      run_evaluation(step, state)
  nonfinite.flush()
  return state


def _report_skipped_examples(batches: Any, workdir: str) -> None:
  """Logs every image the input left out and writes them to `workdir/skipped_examples.json`."""
  skipped = list(getattr(batches, "skipped_examples", None) or ())
  if not skipped:
    return
  path = os.path.join(workdir, SKIPPED_EXAMPLES_FILE)
  logging.warning("The training input left out %d images (all in %s):", len(skipped), path)
  for example in skipped[:MAX_SKIPPED_LOGGED]:
    logging.warning("  skipped image id %s (%s): %s", example.image_id, example.files,
                    example.reason)
  if len(skipped) > MAX_SKIPPED_LOGGED:
    logging.warning("  ... and %d more", len(skipped) - MAX_SKIPPED_LOGGED)
  if jax.process_index() == 0:
    try:
      with open(path, "w") as f:
        json.dump([{"image_id": e.image_id, "files": e.files, "reason": e.reason}
                   for e in skipped], f, indent=1)
    except OSError as error:
      logging.warning("Could not write %s: %s", path, error)
