"""The training loop: init or resume, data-parallel steps, metrics, checkpoints, evaluation.

`train_and_evaluate(hp, workdir)` is what `train.py` calls. The workdir holds `checkpoints/`
(orbax), `config.json` and TensorBoard event files; a run started again on the same workdir
resumes from its latest checkpoint, and the input pipeline skips the batches already seen, so
that an interrupted run ends with the same parameters as an uninterrupted one.

Reliability (docs in `training.preemption`, `training.workdir`, `training.nonfinite`):
- before any step: the workdir is writable and has room for a checkpoint, and a workdir with
  checkpoints was made by the same hyper-parameters (`config.json`); a checkpoint that does not
  fit the model is an error, never a partial load;
- SIGTERM: the current step is finished, checkpointed, and the run returns early;
- a step with a non-finite loss or gradient changes nothing (see `step.train_step`) and is
  counted (`train/nonfinite_steps`); `hp.max_consecutive_nonfinite` in a row are an error; a
  non-finite state is never saved;
- images the input pipeline left out (`dataset.skip_bad_examples`, images without segments)
  are listed at the end, in the log and in `skipped_examples.json`.
"""
import dataclasses
import os
import time
from typing import Any, Callable, Iterator, Mapping, Optional

from absl import logging
from clu import metric_writers
from clu import periodic_actions
from flax import traverse_util
import jax
import numpy as np

from ciae_jax import checkpoint as checkpoint_lib
from ciae_jax import files
from ciae_jax import hparams
from ciae_jax import parallel
from ciae_jax.data import dataset as dataset_lib
from ciae_jax.data import pipeline
from ciae_jax.evaluation import pq as pq_lib
from ciae_jax.evaluation import runner as eval_runner
from ciae_jax.models import ciae as ciae_model
from ciae_jax.training import accumulate
from ciae_jax.training import metrics as metrics_lib
from ciae_jax.training import nonfinite as nonfinite_lib
from ciae_jax.training import preemption
from ciae_jax.training import step as step_lib
from ciae_jax.training import train_state as train_state_lib
from ciae_jax.training import workdir as workdir_lib

# Profiler traces of `hp.profile_first_step ..` go here (TensorBoard "profile" tab, Perfetto).
PROFILE_DIR = "profile"
# Images the training input left out: listed at the end of the run (log and this file).
SKIPPED_EXAMPLES_FILE = "skipped_examples.json"
MAX_SKIPPED_LOGGED = 50
# Pictures (input | panoptic | embedding PCA) each evaluation logs to TensorBoard.
EVAL_PICTURES = 3

EvaluateFn = Callable[..., Optional[Mapping[str, Any]]]
InputFn = Callable[..., Iterator[Mapping[str, np.ndarray]]]


def flatten_eval_results(results: Mapping[str, Any], *,
                         skip: tuple[str, ...] = ("per_class",)) -> dict[str, float]:
  """Nested evaluation results -> {'All/pq': x, 'box_ap/AP': y, ...}, numeric scalars only."""
  flat = traverse_util.flatten_dict({k: v for k, v in results.items() if k not in skip},
                                    sep="/")
  return {name: float(value) for name, value in flat.items()
          if np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.number)}


def evaluate_in_memory(hp: hparams.HParams, state: train_state_lib.TrainState, *,
                       workdir: str, step: int) -> Mapping[str, Any]:
  """The default `evaluate_fn`: PQ and box AP of the validation split, printed as a table, and
  `EVAL_PICTURES` pictures of its first images (under `pictures`)."""
  del workdir  # PQ is computed in memory; evaluate.py writes the prediction files.
  variables = {"params": state.params, **state.model_state}
  results = eval_runner.evaluate(hp, variables=variables, memory=state.memory,
                                 num_pictures=EVAL_PICTURES)
  print(f"Panoptic quality at step {step} ({results.get('num_images', '?')} images):\n"
        f"{pq_lib.format_pq_table(results)}", flush=True)
  return results


def _check_devices(hp: hparams.HParams) -> None:
  num_devices = jax.device_count()
  if hp.batch_size % num_devices:
    raise ValueError(f"config.batch_size {hp.batch_size} must be divisible by the "
                     f"{num_devices} devices")
  # Before anything is built: the step would raise the same error only when traced.
  accumulate.check_divisible(hp.batch_size // num_devices, hp.grad_accum_steps)


def _tensorboard_hparams(hp: hparams.HParams) -> dict[str, Any]:
  """Flat {'a.b': scalar} for TensorBoard's hparams (sequences as strings)."""
  return {name: value if isinstance(value, (bool, int, float, str)) else str(value)
          for name, value in workdir_lib.flat_config(hp).items()}


def train_and_evaluate(hp: hparams.HParams, workdir: str, *,
                       evaluate_fn: Optional[EvaluateFn] = None,
                       input_fn: Optional[InputFn] = None) -> train_state_lib.TrainState:
  """Trains `hp` in `workdir` (resuming from its latest checkpoint) and evaluates.

  Args:
    hp: the run's hyper-parameters (`hparams.HParams.from_config(config)`).
    workdir: checkpoints and TensorBoard event files go here.
    evaluate_fn: `evaluate_fn(hp, state, *, workdir, step) -> results` called every
      `hp.eval_every_steps` and at the end with the host `TrainState` (params, model_state,
      memory); the numeric scalars of the (nested) results are written as `eval/<path>`
      (`per_class` left out), and the uint8 `[H, W, 3]` arrays under `pictures` as images.
      Default: `evaluate_in_memory`. `hp.eval_every_steps <= 0`
      disables evaluation.
    input_fn: `input_fn(dataset_hp, split, *, train, global_batch_size, seed, start_step)`
      yielding batches `[local_devices, per_device_batch, ...]`; default the tf.data pipeline.

  Returns:
    The final state, one host copy; after a SIGTERM the state of the step it was saved at
    (`state.step < hp.total_steps`, no final evaluation).

  Raises:
    workdir_lib.WorkdirError: the workdir is not writable, has no room for a checkpoint, or
      holds checkpoints of another config (before any step).
    ValueError: a checkpoint that does not fit the model; bad data (file and image id).
    FloatingPointError: `hp.max_consecutive_nonfinite` steps in a row were not finite.
  """
  _check_devices(hp)
  workdir_lib.check_writable(workdir)  # Before anything expensive.
  # Installed first: a SIGTERM during start-up or compilation also ends the run cleanly.
  with preemption.PreemptionWatcher() as watcher:
    return _train_and_evaluate(hp, workdir, evaluate_fn=evaluate_fn or evaluate_in_memory,
                               input_fn=input_fn or pipeline.build_input, watcher=watcher)


def _train_and_evaluate(hp, workdir, *, evaluate_fn, input_fn, watcher):
  """`train_and_evaluate` after the config and workdir checks, under `watcher`."""
  categories = dataset_lib.load_dataset_categories(hp.dataset)
  num_stuff, num_things = categories.num_stuff, categories.num_things
  logging.info("Dataset: %d stuff + %d thing classes", num_stuff, num_things)
  model = ciae_model.build_model(hp.model, num_things, num_stuff)

  host_state, optimizer, schedule = train_state_lib.init_train_state(
      hp, model, num_stuff=num_stuff, num_things=num_things, rng=jax.random.PRNGKey(hp.seed))
  workdir_lib.check_free_space(workdir, host_state, keep_checkpoints=hp.keep_checkpoints)
  manager = checkpoint_lib.create_manager(
      workdir, checkpoint_every_steps=hp.checkpoint_every_steps,
      keep_checkpoints=hp.keep_checkpoints, cleanup_tmp=True)
  workdir_lib.check_config(hp, workdir, resuming=manager.latest_step() is not None)
  restored = checkpoint_lib.restore_latest(manager, host_state)
  if restored is not None:
    host_state = restored
    logging.info("Resumed from checkpoint at step %d in %s", int(host_state.step), workdir)
  start_step = int(host_state.step)
  if start_step >= hp.total_steps:
    manager.close()
    logging.info("Nothing to train: the checkpoint is at step %d >= total_steps %d",
                 start_step, hp.total_steps)
    return host_state

  # Only process 0 writes event files; the others only log.
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams(_tensorboard_hparams(hp))

  mesh = parallel.make_mesh() if hp.parallel == "shard_map" else None
  step_fn = parallel.parallelize(
      step_lib.make_train_step(hp, model, optimizer, schedule, num_stuff=num_stuff),
      parallel=hp.parallel, mesh=mesh)
  state = parallel.replicate(host_state, parallel=hp.parallel, mesh=mesh)
  del host_state

  batches = input_fn(hp.dataset, hp.dataset.train_split, train=True,
                     global_batch_size=hp.batch_size, seed=hp.seed, start_step=start_step)
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=hp.total_steps, writer=writer, every_steps=hp.log_every_steps)

  def run_evaluation(step: int, state: Any) -> None:
    host = parallel.unreplicate(state, parallel=hp.parallel)
    with report_progress.timed("eval"):
      results = evaluate_fn(hp, host, workdir=workdir, step=step)
    if results:
      results = dict(results)
      pictures = results.pop("pictures", None) or {}
      scalars = {f"eval/{k}": v for k, v in flatten_eval_results(results).items()}
      writer.write_scalars(step, scalars)
      if pictures:
        writer.write_images(step, {f"eval/{name}": picture[None]  # [1, H, W, 3]
                                   for name, picture in pictures.items()})
      logging.info("Evaluation at step %d: %s", step, scalars)

  micro = (f" in {hp.grad_accum_steps} micro-batches per update"
           if hp.grad_accum_steps > 1 else "")
  logging.info("Training from step %d to %d (%s, %d devices, global batch %d%s)", start_step,
               hp.total_steps, hp.parallel, jax.device_count(), hp.batch_size, micro)
  loop = _Steps(hp, workdir, step_fn=step_fn, batches=batches, mesh=mesh, writer=writer,
                manager=manager, report_progress=report_progress,
                run_evaluation=run_evaluation, watcher=watcher)
  try:
    state = loop.run(state, start_step)
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
  return parallel.unreplicate(state, parallel=hp.parallel)


@dataclasses.dataclass
class _Steps:
  """Steps `start_step + 1 .. total_steps` with logging, checkpoints and evaluation."""
  hp: hparams.HParams
  workdir: str
  step_fn: Callable[..., Any]
  batches: Iterator[Mapping[str, np.ndarray]]
  mesh: Any
  writer: Any
  manager: Any
  report_progress: Any
  run_evaluation: Callable[[int, Any], None]
  watcher: preemption.PreemptionWatcher

  def run(self, state: Any, start_step: int) -> Any:
    profile = _Profile(self.hp, self.workdir)
    try:
      return self._run(state, start_step, profile)
    finally:
      profile.close()

  def _run(self, state: Any, start_step: int, profile: "_Profile") -> Any:
    hp = self.hp
    nonfinite = nonfinite_lib.NonfiniteCounter(hp.max_consecutive_nonfinite)
    metrics_type = metrics_lib.train_metrics_type(hp.model.stuff_from)
    if self.watcher.should_stop(start_step):
      logging.warning("Stop requested before step %d: nothing trained, nothing saved.",
                      start_step + 1)
      return state
    train_metrics, last_log = None, (time.time(), start_step)
    for step in range(start_step + 1, hp.total_steps + 1):
      # `step` counts updates: after this iteration state.step == step.
      profile.before(step)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = next(self.batches)
        step_lib.check_batch(batch, leading_axes=2)  # [local_devices, per_device_batch, ...]
        state, outputs = self.step_fn(state, parallel.shard_batch(
            batch, parallel=hp.parallel, mesh=self.mesh))
      outputs = parallel.first_copy(outputs, parallel=hp.parallel)
      profile.after(step, state)
      nonfinite.push(step, outputs["finite"])
      update = metrics_type.single_from_model_output(**outputs)
      train_metrics = update if train_metrics is None else train_metrics.merge(update)
      self.report_progress(step, time.time())

      is_last = step == hp.total_steps
      if step % hp.log_every_steps == 0 or is_last:
        nonfinite.flush()
        last_log = self._log(step, train_metrics, last_log)
        train_metrics = None
      stop = self.watcher.should_stop(step)
      if step % hp.checkpoint_every_steps == 0 or is_last or stop:
        nonfinite.flush()
        self._save(step, state)
      if stop:
        self.manager.wait_until_finished()
        logging.warning("Preempted: checkpoint saved at step %d of %d in %s; start the same "
                        "command again to resume.", step, hp.total_steps,
                        self.manager.directory)
        return state
      if hp.eval_every_steps > 0 and (step % hp.eval_every_steps == 0 or is_last):
        self.run_evaluation(step, state)
    nonfinite.flush()
    return state

  def _log(self, step: int, train_metrics: Any, last_log: tuple[float, int]
           ) -> tuple[float, int]:
    """Writes the averaged metrics and one log line; returns the new (time, step) mark."""
    scalars = {f"train/{k}": float(v) for k, v in train_metrics.compute().items()}
    self.writer.write_scalars(step, scalars)
    now = time.time()
    steps_per_sec = (step - last_log[1]) / max(now - last_log[0], 1e-9)
    skipped = int(scalars["train/nonfinite_steps"])
    # Time left at this interval's speed (the first interval includes compiling).
    left = (self.hp.total_steps - step) / max(steps_per_sec, 1e-9)
    logging.info("step %d/%d: loss %.4f (cls %.4f reg %.4f ctr %.4f ciae %.4f) lr %.2e, "
                 "%.2f steps/s, ETA %s%s", step, self.hp.total_steps, scalars["train/loss"],
                 scalars["train/loss_cls"], scalars["train/loss_reg"],
                 scalars["train/loss_ctr"], scalars["train/loss_ciae"],
                 scalars["train/learning_rate"], steps_per_sec, _duration(left),
                 f", {skipped} non-finite steps skipped" if skipped else "")
    if "train/loss_semantic" in scalars:
      logging.info("step %d: semantic branch cross-entropy %.4f", step,
                   scalars["train/loss_semantic"])
    return now, step

  def _save(self, step: int, state: Any) -> None:
    if step in self.manager.all_steps():
      return  # Already saved (e.g. SIGTERM right after a periodic checkpoint).
    host = parallel.unreplicate(state, parallel=self.hp.parallel)
    checkpoint_lib.save(self.manager, step, host, force=True)


def _duration(seconds: float) -> str:
  """`1h02m`, `3m05s` or `12s`."""
  seconds = int(round(min(seconds, 1e8)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else \
      f"{secs}s"


class _Profile:
  """A `jax.profiler` trace of steps `first .. first + num - 1` (0: none) under WORKDIR/profile.

  The trace holds the host and device timelines of those steps (compilation left out when the
  first traced step is not the first of the run), as TensorBoard's `.xplane.pb` and a Perfetto
  `perfetto_trace.json.gz`.
  """

  def __init__(self, hp: hparams.HParams, workdir: str):
    self.first = hp.profile_first_step
    self.last = hp.profile_first_step + hp.profile_num_steps - 1
    self.log_dir = os.path.join(workdir, PROFILE_DIR)
    self.active = False

  def before(self, step: int) -> None:
    if self.first and step == self.first:
      logging.info("Profiling steps %d..%d into %s", self.first, self.last, self.log_dir)
      jax.profiler.start_trace(self.log_dir, create_perfetto_trace=True)
      self.active = True

  def after(self, step: int, state: Any) -> None:
    if self.active and step == self.last:
      jax.block_until_ready(state)  # The trace ends when the traced steps' work does.
      self.close()

  def close(self) -> None:
    """Ends the trace if one is running (also when the run stops inside the traced steps)."""
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      logging.info("Profiler trace written to %s (tensorboard --logdir %s, or Perfetto)",
                   self.log_dir, self.log_dir)


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
      files.write_json(path, [dataclasses.asdict(e) for e in skipped], indent=1)
    except OSError as error:
      logging.warning("Could not write %s: %s", path, error)
