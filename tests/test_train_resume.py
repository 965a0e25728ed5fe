"""The loop: save, stop, resume continues the run bit-exactly; evaluation and logging hooks.

Run A trains 4 steps uninterrupted (checkpoints at steps 2 and 4). Run B starts on a fresh
workdir that holds only A's step-2 checkpoint, i.e. a run that stopped right after saving
step 2: it must resume there, ask the input for batches from step 2 on, and end with exactly
A's state (params, opt_state, memory, step, rng). Batches come from an injected input
function keyed on (seed, step), as the real pipeline's `start_step` contract promises.
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from ciae_jax import config_lib
from ciae_jax import hparams
from ciae_jax.models import ciae as ciae_model
from ciae_jax.training import loop
from ciae_jax.training import train_state as train_state_lib
import test_train_helpers as helpers

TOTAL_STEPS = 4


def _config(tmp_path):
  categories = [{"id": 1, "name": "sky", "isthing": 0}, {"id": 2, "name": "grass", "isthing": 0},
                {"id": 10, "name": "disc", "isthing": 1},
                {"id": 11, "name": "square", "isthing": 1}]
  categories_file = tmp_path / "categories.json"
  categories_file.write_text(json.dumps(categories))
  config = config_lib.base_config()
  config.seed = 3
  config.total_steps = TOTAL_STEPS
  config.batch_size = jax.local_device_count()
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  config.keep_checkpoints = 3
  config.eval_every_steps = 2
  config.dataset.source = "synthetic"
  config.dataset.categories_file = str(categories_file)
  config.dataset.canvas_sizes = (helpers.IMAGE_HW,)
  config.model.update(helpers.TINY_MODEL)
  config.model.norm = "gn"
  config.memory.momentum_coeff = helpers.MEMORY_COEFF  # Visible memory updates.
  config.optimizer.warmup_steps = 2
  config.optimizer.warmup_factor = 0.5
  return hparams.HParams.from_config(config)


class FakeInput:
  """`input_fn` whose batch at step t is a function of (seed, t) only; records start steps."""

  def __init__(self):
    self.start_steps = []

  def __call__(self, dataset_cfg, split, *, train, global_batch_size, seed, start_step):
    assert train and split == dataset_cfg.train_split
    devices = jax.local_device_count()
    self.start_steps.append(start_step)
    step = start_step
    while True:
      yield helpers.make_batch(1000 * seed + step, (devices, global_batch_size // devices))
      step += 1


class FakeEvaluate:
  """`evaluate_fn` that records when it ran and returns nested PQ-like results."""

  def __init__(self):
    self.calls = []

  def __call__(self, config, state, *, workdir, step):
    self.calls.append((step, int(state.step), workdir))
    return {"All": {"pq": 0.25, "n": 4}, "per_class": {1: {"pq": 0.5}}, "num_images": 4}


@pytest.mark.slow
def test_stop_and_resume(tmp_path):
  # One test function: pytest-xdist would run a module fixture once per worker.
  runs = _runs(tmp_path)
  _check_resume_is_bit_exact(runs)
  _check_input_continues_where_the_run_stopped(runs)
  _check_checkpoints_written_and_kept(runs)
  _check_the_run_learns_and_the_memory_moves(runs)
  _check_evaluation_hook_runs_periodically_and_at_the_end(runs)
  _check_tensorboard_events_hold_train_and_eval_scalars(runs)


def _runs(tmp_path):
  config = _config(tmp_path)
  workdir_a, workdir_b = tmp_path / "a", tmp_path / "b"
  input_a, eval_a = FakeInput(), FakeEvaluate()
  final_a = loop.train_and_evaluate(config, str(workdir_a), evaluate_fn=eval_a, input_fn=input_a)
  # B: a run that stopped right after saving step 2.
  shutil.copytree(workdir_a / "checkpoints" / "2", workdir_b / "checkpoints" / "2")
  input_b, eval_b = FakeInput(), FakeEvaluate()
  final_b = loop.train_and_evaluate(config, str(workdir_b), evaluate_fn=eval_b, input_fn=input_b)
  return dict(workdir_a=workdir_a, workdir_b=workdir_b, final_a=final_a, final_b=final_b,
              input_a=input_a, input_b=input_b, eval_a=eval_a, eval_b=eval_b)


def _check_resume_is_bit_exact(runs, total_steps=TOTAL_STEPS):
  a, b = runs["final_a"], runs["final_b"]
  assert int(a.step) == int(b.step) == total_steps
  for name in ("params", "opt_state", "memory", "rng", "model_state"):
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(getattr(a, name))
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(getattr(b, name))
    assert tree_a == tree_b, name
    for (path, x), (_, y) in zip(flat_a, flat_b):
      np.testing.assert_array_equal(x, y, err_msg=f"{name}{jax.tree_util.keystr(path)}")


def _check_input_continues_where_the_run_stopped(runs, resumed_at=2):
  assert runs["input_a"].start_steps == [0]
  assert runs["input_b"].start_steps == [resumed_at]


def _check_checkpoints_written_and_kept(runs):
  steps_a = sorted(int(d) for d in os.listdir(runs["workdir_a"] / "checkpoints") if d.isdigit())
  steps_b = sorted(int(d) for d in os.listdir(runs["workdir_b"] / "checkpoints") if d.isdigit())
  assert steps_a == [2, 4] and steps_b == [2, 4]


def _check_the_run_learns_and_the_memory_moves(runs):
  initial = runs["final_a"]  # Compared against a fresh step-0 state of the same config.
  config = _config(runs["workdir_a"].parent)
  model = ciae_model.build_model(config.model, helpers.NUM_THINGS, helpers.NUM_STUFF)
  state0, _, _ = train_state_lib.init_train_state(config, model, num_stuff=helpers.NUM_STUFF,
                                       num_things=helpers.NUM_THINGS,
                                       rng=jax.random.PRNGKey(config.seed))
  assert int(state0.step) == 0
  assert np.abs(np.asarray(initial.memory) - np.asarray(state0.memory)).max() > 1e-2
  moved = [np.abs(np.asarray(x) - np.asarray(y)).max()
           for x, y in zip(jax.tree.leaves(initial.params), jax.tree.leaves(state0.params))]
  assert max(moved) > 0


def _check_evaluation_hook_runs_periodically_and_at_the_end(runs):
  assert [c[:2] for c in runs["eval_a"].calls] == [(2, 2), (4, 4)]
  assert [c[:2] for c in runs["eval_b"].calls] == [(4, 4)]
  assert runs["eval_a"].calls[0][2] == str(runs["workdir_a"])


def _check_tensorboard_events_hold_train_and_eval_scalars(runs):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  files = [f for f in os.listdir(runs["workdir_a"]) if f.startswith("events.out.tfevents")]
  assert files, os.listdir(runs["workdir_a"])
  accumulator = event_accumulator.EventAccumulator(str(runs["workdir_a"]))
  accumulator.Reload()
  tags = set(accumulator.Tags()["tensors"]) | set(accumulator.Tags()["scalars"])
  for tag in ("train/loss", "train/loss_cls", "train/loss_reg", "train/loss_ctr",
              "train/loss_cae", "train/loss_iae", "train/loss_ciae", "train/num_positives",
              "train/grad_norm", "train/learning_rate", "train/memory_drift",
              "eval/All/pq", "eval/num_images", "steps_per_sec"):
    assert tag in tags, (tag, sorted(tags))
  assert "eval/per_class/1/pq" not in tags
