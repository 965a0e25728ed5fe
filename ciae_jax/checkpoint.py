"""Checkpoints of the whole TrainState with orbax: save every N steps, keep the last K, resume.

The state is saved as a host copy (one replica, numpy) of its flax state dict, so a run saved
under "pmap" resumes under "shard_map" (or on another device count) and vice versa. Readers
that need only some fields (evaluation: params, model state, memory) restore those alone
(`restore_fields`), without building or reading the optimizer state.
"""
import os
from typing import Any, Mapping, Optional

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp


def create_manager(workdir: str, *, checkpoint_every_steps: int | None = None,
                   keep_checkpoints: int | None = None, create: bool = True,
                   cleanup_tmp: bool = False) -> ocp.CheckpointManager:
  """Orbax manager over `workdir/checkpoints` that saves every N steps and keeps the last K.

  Writers (the training run) give `checkpoint_every_steps` and `keep_checkpoints`
  (`HParams`); readers leave them None. `create=False` (readers such as evaluate.py) leaves a
  missing folder missing. `cleanup_tmp` (the training run, the only writer) deletes the
  unfinished checkpoints a killed run left.
  """
  if checkpoint_every_steps is not None and checkpoint_every_steps <= 0:
    raise ValueError(f"checkpoint_every_steps must be > 0, got {checkpoint_every_steps}")
  if keep_checkpoints is not None and keep_checkpoints <= 0:
    raise ValueError(f"keep_checkpoints must be > 0, got {keep_checkpoints}")
  # Orbax writes a checkpoint into a temporary folder and renames it when complete: a process
  # killed mid-save leaves the previous checkpoints intact and a temporary folder that
  # `latest_step` ignores.
  saving = {} if checkpoint_every_steps is None else dict(
      save_interval_steps=checkpoint_every_steps)
  options = ocp.CheckpointManagerOptions(**saving, max_to_keep=keep_checkpoints, create=create,
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


def _existing_step(manager: ocp.CheckpointManager, step: Optional[int]) -> Optional[int]:
  """`step` if it is saved, the latest saved step for None; None where there is no such step."""
  if step is None:
    return manager.latest_step()
  return step if step in manager.all_steps() else None


def restore(manager: ocp.CheckpointManager, template: Any,
            step: Optional[int] = None) -> Optional[Any]:
  """Checkpoint `step` (default: the latest) shaped like `template`; None if there is none."""
  step = _existing_step(manager, step)
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


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], np.dtype]:
  """(shape, dtype) of an array or a `jax.ShapeDtypeStruct`."""
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return tuple(x.shape), np.dtype(x.dtype)
  x = np.asarray(x)
  return x.shape, x.dtype


def _check_matches(restored: Any, template: Any, where: str) -> None:
  """Orbax restores arrays with their saved shapes: compare them with the template's."""
  flat_restored = jax.tree_util.tree_flatten_with_path(restored)[0]
  flat_template = jax.tree_util.tree_flatten_with_path(template)[0]
  for (path, got), (_, want) in zip(flat_restored, flat_template):
    (got_shape, got_dtype), (want_shape, want_dtype) = _shape_dtype(got), _shape_dtype(want)
    if got_shape != want_shape or got_dtype != want_dtype:
      raise ValueError(
          f"checkpoint {where} does not match the state of this config at "
          f"{jax.tree_util.keystr(path)}: saved {got_dtype}{list(got_shape)}, "
          f"expected {want_dtype}{list(want_shape)} (model or optimizer changed?)")


def restore_fields(manager: ocp.CheckpointManager, template: Mapping[str, Any],
                   step: Optional[int] = None) -> Optional[dict[str, Any]]:
  """Only the top-level fields of `template` (e.g. params, model_state, memory) of checkpoint
  `step` (default: the latest), as host NumPy arrays; None if there is no such checkpoint.

  `template` maps field names of the saved `TrainState` to trees of arrays or
  `jax.ShapeDtypeStruct`s (what `jax.eval_shape` gives); nothing else is read from disk.

  Raises:
    ValueError: the checkpoint's arrays do not fit the template (names the leaf).
  """
  step = _existing_step(manager, step)
  if step is None:
    return None
  target = flax.serialization.to_state_dict(dict(template))
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  try:
    restored = manager.restore(step, args=ocp.args.PyTreeRestore(
        target, restore_args=restore_args, partial_restore=True))
  except (ValueError, KeyError) as error:
    raise ValueError(f"checkpoint {manager.directory}/{step} does not hold the fields "
                     f"{sorted(template)} of this model: {error}") from error
  restored = {name: flax.serialization.from_state_dict(template[name], restored[name])
              for name in template}
  _check_matches(restored, dict(template), f"{manager.directory}/{step}")
  return restored
