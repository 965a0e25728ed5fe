"""Workdir problems stop the run with a clear error before any training step.

Unwritable (a path through a file; a directory without write permission), a full file system
(ENOSPC on write; too little free space for one checkpoint), checkpoints written by another
config (config.json differs), and a checkpoint that does not fit the model (another structure:
an error, never a partial load). The loop runs in this process with an input function that
records whether it was ever asked for data; the failures come before that.
"""
import builtins
import errno
import json
import os
import shutil

import jax
import numpy as np
import pytest

from ciae_jax import checkpoint as checkpoint_lib
from ciae_jax import config_lib
from ciae_jax import hparams
from ciae_jax.models import ciae as ciae_model
from ciae_jax.training import loop
from ciae_jax.training import train_state as train_state_lib
from ciae_jax.training import workdir as workdir_lib
import test_train_helpers as helpers

SAVED_STEP = 2


def _config(tmp_path, **changes):
  categories = [{"id": 1, "name": "sky", "isthing": 0}, {"id": 2, "name": "grass", "isthing": 0},
                {"id": 10, "name": "disc", "isthing": 1}]
  categories_file = tmp_path / "categories.json"
  categories_file.write_text(json.dumps(categories))
  config = config_lib.base_config()
  config.total_steps = SAVED_STEP
  config.batch_size = jax.local_device_count()
  config.eval_every_steps = 0
  config.dataset.categories_file = str(categories_file)
  config.dataset.canvas_sizes = (helpers.IMAGE_HW,)
  config.model.update(helpers.TINY_MODEL)
  config.model.norm = "gn"
  for dotted, value in changes.items():
    node = config
    *parents, leaf = dotted.split(".")
    for name in parents:
      node = node[name]
    node[leaf] = value
  return hparams.HParams.from_config(config)


class SpyInput:
  """An input function that fails the test if the loop ever builds the input."""

  def __init__(self):
    self.calls = 0

  def __call__(self, *args, **kwargs):
    self.calls += 1
    raise AssertionError("the loop asked for data: a training step was about to run")


def _train(config, workdir):
  spy = SpyInput()
  try:
    return loop.train_and_evaluate(config, str(workdir), input_fn=spy)
  finally:
    assert spy.calls == 0


def _workdir_with_checkpoint(tmp_path, config):
  """A workdir as a run of `config` leaves it after saving step SAVED_STEP."""
  workdir = tmp_path / "run"
  model = ciae_model.build_model(config.model, 1)
  state, _, _ = train_state_lib.init_train_state(config, model, num_stuff=2, num_things=1,
                                                 rng=jax.random.PRNGKey(config.seed))
  manager = checkpoint_lib.create_manager(str(workdir), checkpoint_every_steps=1)
  checkpoint_lib.save(manager, SAVED_STEP, state.replace(step=np.int32(SAVED_STEP)), force=True)
  manager.wait_until_finished()
  manager.close()
  workdir_lib.check_config(config, str(workdir), resuming=False)  # Writes config.json.
  return workdir, state


def test_workdir_through_a_file_is_an_error(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  with pytest.raises(workdir_lib.WorkdirError, match=f"cannot create the workdir "
                     f"{blocker}/run: Not a directory"):
    _train(_config(tmp_path), blocker / "run")


def _failing_open(error_number, workdir):
  """`open` that fails like the OS would for new files in `workdir`."""
  real_open = builtins.open

  def fake_open(path, mode="r", *args, **kwargs):
    if str(path).startswith(str(workdir)) and "w" in mode:
      raise OSError(error_number, os.strerror(error_number), str(path))
    return real_open(path, mode, *args, **kwargs)
  return fake_open


def test_permission_denied_is_an_error(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  monkeypatch.setattr(builtins, "open", _failing_open(errno.EACCES, workdir))
  with pytest.raises(workdir_lib.WorkdirError, match=f"workdir {workdir}: it is not writable "
                     r"\(Permission denied\); checkpoints could not be saved"):
    _train(_config(tmp_path), workdir)


def test_full_file_system_is_an_error(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  with monkeypatch.context() as patch:
    patch.setattr(builtins, "open", _failing_open(errno.ENOSPC, workdir))
    with pytest.raises(workdir_lib.WorkdirError, match=f"workdir {workdir}: the file system is "
                       r"full \(no space left on device\)"):
      _train(_config(tmp_path), workdir)

  # Room for the probe but not for one checkpoint of this state.
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2**20))
  with pytest.raises(workdir_lib.WorkdirError, match=r"1\.0 MiB free, but one checkpoint of "
                     r"this state needs [0-9.]+ MiB") as info:
    _train(_config(tmp_path), workdir)
  needed = float(str(info.value).split("needs ")[1].split(" MiB")[0])
  model = ciae_model.build_model(_config(tmp_path).model, 1)
  state, _, _ = train_state_lib.init_train_state(_config(tmp_path), model, num_stuff=2,
                                                 num_things=1, rng=jax.random.PRNGKey(0))
  expected = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state)) / 2**20
  # The message prints MiB with one decimal: within 0.05 of the exact size when it is the
  # state's bytes (no float arithmetic beyond the division).
  assert needed == pytest.approx(expected, abs=0.05)
  assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")


@pytest.mark.slow
def test_checkpoint_of_another_config_is_an_error(tmp_path):
  config = _config(tmp_path)
  workdir, _ = _workdir_with_checkpoint(tmp_path, config)
  other = _config(tmp_path, **{"loss.params.margin": 0.3, "optimizer.base_lr": 0.02})
  with pytest.raises(workdir_lib.WorkdirError) as info:
    _train(other, workdir)
  message = str(info.value)
  assert f"workdir {workdir} holds checkpoints of another config" in message
  assert "loss.params.margin: 0.15 -> 0.3" in message
  assert "optimizer.base_lr: 0.01 -> 0.02" in message
  assert "--config.allow_resume_with_other_config=True" in message
  assert "log_every_steps" not in message

  # Fields that do not change the trained model may change; the override resumes anyway.
  _train(_config(tmp_path, log_every_steps=7, keep_checkpoints=5, parallel="shard_map"),
         workdir)
  other = other.replace(allow_resume_with_other_config=True)
  state = _train(other, workdir)
  assert int(state.step) == SAVED_STEP
  recorded = json.loads((workdir / workdir_lib.CONFIG_FILE).read_text())
  assert recorded["loss.params.margin"] == 0.3  # The record follows the run that resumed.
  assert recorded["loss.params.top_k"] == 5  # recorded in full: the function's default too


@pytest.mark.parametrize("change", [{"model.head_convs": 2}, {"model.fpn_dim": 8}],
                         ids=["more_layers", "narrower"])
def test_checkpoint_of_another_model_is_never_loaded(tmp_path, change):
  config = _config(tmp_path)
  workdir, _ = _workdir_with_checkpoint(tmp_path, config)
  (workdir / workdir_lib.CONFIG_FILE).unlink()  # No record: the checkpoint itself must tell.
  with pytest.raises(ValueError, match=f"checkpoint {workdir}/checkpoints/{SAVED_STEP} does "
                     "not match the state of this config"):
    _train(_config(tmp_path, **change), workdir)


def test_records_of_the_former_loss_fields_compare_under_their_new_names():
  """`loss.margin`, `loss.top_k`, `loss.include_own` of older records are the paper's loss
  parameters, now `loss.params.*`: equal values resume, other values are named."""
  current = workdir_lib.flat_config(hparams.HParams())
  saved = {k: v for k, v in current.items() if not k.startswith("loss.params.")}
  saved.update({"loss.margin": 0.15, "loss.top_k": 5, "loss.include_own": True})
  assert workdir_lib.config_differences(saved, current) == []
  saved["loss.margin"] = 0.3
  assert workdir_lib.config_differences(saved, current) == ["loss.params.margin: 0.3 -> 0.15"]
