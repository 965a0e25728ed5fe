"""Non-finite steps: skipped (state unchanged) and counted; N in a row stop the run; no NaN saved.

One training run in a subprocess (this file run as a script: train.py's flags and loop, with
the real input pipeline wrapped to turn the images of some batches into NaN): NaN batches at
steps 2, 4, 5 and 6, a checkpoint after every step, `max_consecutive_nonfinite=3`. The
checkpoints are read back with orbax directly (not through the code under test) and compared
with each other: a skipped step must leave params, optimizer state and memory bit-identical
to the previous step's while step and rng advance, and the third NaN step in a row must stop
the run, with a message naming the steps, before its state is saved.
"""
import os
import re
import sys

import jax
import numpy as np
import pytest

import test_reliability_helpers as rh

NAN_STEPS = (2, 4, 5, 6)


class _NanInput:
  """Wraps the pipeline's iterator: the batch of step t (the t-th) is NaN for t in NAN_STEPS."""

  def __init__(self, batches, start_step):
    self._batches = batches
    self._step = start_step
    self.skipped_examples = getattr(batches, "skipped_examples", [])

  def __iter__(self):
    return self

  def __next__(self):
    batch = dict(next(self._batches))
    self._step += 1
    if self._step in NAN_STEPS:
      batch["image"] = np.full_like(batch["image"], np.nan)
    return batch

  def close(self):
    self._batches.close()


def _train(argv):
  """The subprocess: train.py's config flags, the loop, NaN batches; exit 3 on the error."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from ciae_jax import hparams  # pylint: disable=g-import-not-at-top
  from ciae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from ciae_jax.training import loop  # pylint: disable=g-import-not-at-top
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
  flag_values(argv)
  logging.use_absl_handler()  # As under absl.app (train.py): timestamps, INFO.
  logging.set_verbosity(logging.INFO)

  def input_fn(dataset_cfg, split, **kwargs):
    return _NanInput(pipeline.build_input(dataset_cfg, split, **kwargs), kwargs["start_step"])
  try:
    loop.train_and_evaluate(hparams.HParams.from_config(flag_values.config),
                            flag_values.workdir, input_fn=input_fn)
  except FloatingPointError as error:
    print(f"FloatingPointError: {error}", flush=True)
    sys.exit(3)


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_counted_and_never_saved(tmp_path, cache_dir):
  workdir = tmp_path / "run"
  flags = rh.train_flags(tmp_path / "synthetic", workdir, extra=[
      "--config.checkpoint_every_steps=1", f"--config.keep_checkpoints={rh.TOTAL_STEPS}",
      "--config.log_every_steps=3", "--config.max_consecutive_nonfinite=3"])
  code, output = rh.run([sys.executable, __file__, *flags], rh.subprocess_env(cache_dir))
  assert code == 3, output[-4000:]
  assert re.search(r"FloatingPointError: 3 consecutive steps \(4\.\.6\) had a non-finite "
                   r"loss.*max_consecutive_nonfinite=3\)\. The parameters are those of step 3",
                   output), output[-4000:]
  for step in (2, 4, 5, 6):
    assert f"step {step} skipped: non-finite loss" in output, output[-4000:]
  assert "step 3 skipped" not in output and "step 1 skipped" not in output

  # The error comes before step 6 is saved; every saved state is finite.
  assert rh.checkpoint_steps(workdir) == [1, 2, 3, 4, 5]
  checkpoints = {s: rh.read_checkpoint(workdir, s) for s in rh.checkpoint_steps(workdir)}
  for step, state in checkpoints.items():
    assert int(state["step"]) == step
    for leaf in jax.tree.leaves(state):
      if np.issubdtype(np.asarray(leaf).dtype, np.floating):
        assert np.isfinite(leaf).all(), f"checkpoint {step} holds a non-finite value"

  # Skipped steps change nothing but the step counter and the rng.
  for skipped, before in ((2, 1), (4, 3), (5, 3)):
    for name in ("params", "opt_state", "memory"):
      rh.assert_trees_equal(checkpoints[skipped][name], checkpoints[before][name],
                            f"step {skipped} vs {before}: {name}")
    assert not np.array_equal(checkpoints[skipped]["rng"], checkpoints[skipped - 1]["rng"])
  # A finite step after a skipped one trains again.
  assert rh.trees_differ(checkpoints[3]["params"], checkpoints[2]["params"])
  assert rh.trees_differ(checkpoints[3]["memory"], checkpoints[2]["memory"])

  # Counted in the metrics of the window that held them (steps 1-3); the averages stay finite.
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(str(workdir))
  events.Reload()

  def scalar(tag, step):
    return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)}[step]
  assert scalar("train/nonfinite_steps", 3) == 1
  assert np.isfinite(scalar("train/loss", 3)) and scalar("train/loss", 3) > 0
  assert np.isfinite(scalar("train/grad_norm", 3))
  assert re.search(r"step 3/8: loss [0-9.]+ .*, 1 non-finite steps skipped", output)


def test_a_non_finite_state_is_never_saved(tmp_path):
  from ciae_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  manager = checkpoint_lib.create_manager(str(tmp_path), checkpoint_every_steps=1)
  state = {"params": {"w": np.ones(3, np.float32), "b": np.array([0.0, np.inf], np.float32)},
           "step": np.int32(4)}
  with pytest.raises(FloatingPointError, match=r"state at step 4 is not finite at "
                     r"\['params'\]\['b'\] \(1 of 2 values\); not saved"):
    checkpoint_lib.save(manager, 4, state, force=True)
  manager.wait_until_finished()
  assert not list(manager.all_steps())
  assert not [p for p in os.listdir(tmp_path / "checkpoints") if p.startswith("4")]


if __name__ == "__main__":
  _train(sys.argv)
