"""Checkpoints of the whole TrainState with orbax: save every N steps, keep the last K, resume.

The state is saved as a host copy (one replica, numpy) of its flax state dict, so a run saved
under "pmap" resumes under "shard_map" (or on another device count) and vice versa.
"""
import os
from typing import Any, Optional

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp


def create_manager(workdir: str, *, checkpoint_every_steps: int = 5000,
                   keep_checkpoints: int = 3, create: bool = True,
                   cleanup_tmp: bool = False) -> ocp.CheckpointManager:
  """Orbax manager over `workdir/checkpoints` that saves every N steps and keeps the last K.

  `create=False` (readers such as evaluate.py) leaves a missing folder missing. `cleanup_tmp`
  (the training run, the only writer) deletes the unfinished checkpoints a killed run left.
  """
  if checkpoint_every_steps <= 0:
    raise ValueError(f"checkpoint_every_steps must be > 0, got {checkpoint_every_steps}")
  if keep_checkpoints <= 0:
    raise ValueError(f"keep_checkpoints must be > 0, got {keep_checkpoints}")
  # Orbax writes a checkpoint into a temporary folder and renames it when complete: a process
  # killed mid-save leaves the previous checkpoints intact and a temporary folder that
  # `latest_step` ignores.
  options = ocp.CheckpointManagerOptions(save_interval_steps=checkpoint_every_steps,
                                         max_to_keep=keep_checkpoints, create=create,
                                         cleanup_tmp_directories=cleanup_tmp)
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  return ocp.CheckpointManager(directory, options=options)


def _host_state_dict(state: Any) -> dict:
  return flax.serialization.to_state_dict(jax.tree.map(np.asarray, jax.device_get(state)))


def save(manager: ocp.CheckpointManager, step: int, host_state: Any, *,
         force: bool = False) -> bool:
  """Saves one host copy of the state at `step` if the interval says so (or `force`).

  Raises:
    FloatingPointError: the state holds a NaN or infinity (naming the first such leaf); a
      non-finite state is never written.
  """
  state_dict = _host_state_dict(host_state)
  check_finite(state_dict, f"state at step {step}")
  return manager.save(int(step), args=ocp.args.StandardSave(state_dict), force=force)


def check_finite(tree: Any, what: str) -> None:
  """FloatingPointError naming the first floating-point leaf of `tree` with a NaN or inf."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    leaf = np.asarray(leaf)
    if np.issubdtype(leaf.dtype, np.inexact) and not np.all(np.isfinite(leaf)):
      raise FloatingPointError(f"{what} is not finite at {jax.tree_util.keystr(path)} "
                               f"({int(np.sum(~np.isfinite(leaf)))} of {leaf.size} values); "
                               "not saved")


def restore_latest(manager: ocp.CheckpointManager, template: Any) -> Optional[Any]:
  """The latest checkpoint as a host state shaped like `template`, or None if there is none."""
  return restore(manager, template)


def restore(manager: ocp.CheckpointManager, template: Any,
            step: Optional[int] = None) -> Optional[Any]:
  """Checkpoint `step` (default: the latest) shaped like `template`; None if there is none."""
  if step is None:
    step = manager.latest_step()
  elif step not in manager.all_steps():
    return None
  if step is None:
    return None
  target = _host_state_dict(template)
  try:
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
  except (ValueError, KeyError) as error:
    raise ValueError(f"checkpoint {manager.directory}/{step} does not match the state of this "
                     f"config (model or optimizer changed?): {error}") from error
  state = flax.serialization.from_state_dict(template, restored)
  _check_matches(state, template, f"{manager.directory}/{step}")
  return state


def _check_matches(restored: Any, template: Any, where: str) -> None:
  """Orbax restores arrays with their saved shapes: compare them with the template's."""
  flat_restored = jax.tree_util.tree_flatten_with_path(restored)[0]
  flat_template = jax.tree_util.tree_flatten_with_path(template)[0]
  for (path, got), (_, want) in zip(flat_restored, flat_template):
    if np.shape(got) != np.shape(want) or np.asarray(got).dtype != np.asarray(want).dtype:
      raise ValueError(
          f"checkpoint {where} does not match the state of this config at "
          f"{jax.tree_util.keystr(path)}: saved {np.asarray(got).dtype}{list(np.shape(got))}, "
          f"expected {np.asarray(want).dtype}{list(np.shape(want))} (model or optimizer "
          "changed?)")
