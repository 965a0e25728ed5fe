"""Workdir checks made before the first training step: writable, room for a checkpoint, same config.

A run that cannot save its checkpoints, or that would resume another run's checkpoints, must
fail at start-up with a message that says what to do, not hours later or silently.

- `check_writable(workdir)`: the folder can be created and written (a probe file, fsync-ed).
- `check_free_space(workdir, state)`: the file system has room for at least one checkpoint of
  `state` (error) and for `keep_checkpoints + 1` of them (warning).
- `check_config(hp, workdir, resuming=...)`: the workdir's `config.json` (written by the
  first start) matches these hyper-parameters, up to fields that do not change the trained model
  (`RESUME_IGNORED_FIELDS`); `config.allow_resume_with_other_config=True` overrides.
"""
import dataclasses
import errno
import json
import os
import shutil
from typing import Any

from absl import logging
from flax import traverse_util
import jax
import numpy as np

from ciae_jax import files
from ciae_jax import hparams
from ciae_jax.losses import registry

CONFIG_FILE = "config.json"
# Fields that may change between the starts of one run: they do not change the parameters
# trained (logging, checkpoint and evaluation cadence, the device layout and the split of an
# update into micro-batches, which change float32 rounding only, input threads, inference).
# Names are dotted paths; a group name covers all its fields.
RESUME_IGNORED_FIELDS = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                         "eval_every_steps", "parallel", "grad_accum_steps",
                         "max_consecutive_nonfinite",
                         "allow_resume_with_other_config", "inference",
                         "profile_first_step", "profile_num_steps",
                         "dataset.num_parallel_calls", "dataset.prefetch")
_MIB = 2**20


class WorkdirError(OSError):
  """The workdir cannot hold this run's checkpoints (or holds another run's)."""


def check_writable(workdir: str) -> None:
  """Creates `workdir` and writes a probe file in it; WorkdirError with the reason if not."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as error:
    raise WorkdirError(error.errno, f"cannot create the workdir {workdir}: "
                       f"{error.strerror or error}") from error
  probe = os.path.join(workdir, f".write_probe.{jax.process_index()}.{os.getpid()}")
  try:
    with open(probe, "wb") as f:
      f.write(b"\0" * 4096)
      f.flush()
      os.fsync(f.fileno())
  except OSError as error:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
      reason = "the file system is full (no space left on device)"
    else:
      reason = f"it is not writable ({error.strerror or error})"
    raise WorkdirError(error.errno, f"workdir {workdir}: {reason}; checkpoints could not be "
                       "saved. Choose another --workdir or free the space.") from error
  finally:
    try:
      os.remove(probe)
    except OSError:
      pass


def state_bytes(state: Any) -> int:
  """Bytes of one host copy of `state` (the payload of one checkpoint)."""
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(state)))


def check_free_space(workdir: str, state: Any, *, keep_checkpoints: int = 1) -> None:
  """WorkdirError if `workdir` has no room for one checkpoint of `state`; warns below K + 1."""
  needed = state_bytes(state)
  free = shutil.disk_usage(workdir).free
  if free < needed:
    raise WorkdirError(errno.ENOSPC, f"workdir {workdir}: {free / _MIB:.1f} MiB free, but one "
                       f"checkpoint of this state needs {needed / _MIB:.1f} MiB. Free the "
                       "space or choose another --workdir.")
  if free < (keep_checkpoints + 1) * needed:
    logging.warning("workdir %s: %.1f MiB free; keeping %d checkpoints of %.1f MiB (plus one "
                    "being written) may not fit.", workdir, free / _MIB, keep_checkpoints,
                    needed / _MIB)


# Records written when the paper's loss parameters were fields of `loss` itself.
_RENAMED_FIELDS = {f"loss.{name}": f"loss.params.{name}"
                   for name in ("margin", "top_k", "include_own")}


def flat_config(hp: hparams.HParams) -> dict[str, Any]:
  """The hyper-parameters as {'a.b': JSON value} (tuples as lists), as `config.json` holds them.

  `loss.params` is recorded in full: the given values and the loss function's defaults.
  """
  tree = dataclasses.asdict(hp)
  tree["loss"]["params"] = registry.resolved_params(hp.loss.kind, hp.loss.params)
  flat = traverse_util.flatten_dict(tree, sep=".")
  return json.loads(json.dumps(flat, default=str))


def _ignored(name: str) -> bool:
  return any(name == f or name.startswith(f + ".") for f in RESUME_IGNORED_FIELDS)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """'field: saved -> current' for every field that differs and may change the model.

  A field absent from one side (a record written before the field existed) counts as its
  default, so that adding a field (e.g. `dataset.num_tuning_images`) does not stop old runs
  from resuming unless they set it.
  """
  differences = []
  defaults = flat_config(hparams.HParams())
  saved = {_RENAMED_FIELDS.get(name, name): value for name, value in saved.items()}
  for name in sorted(set(saved) | set(current)):
    if _ignored(name):
      continue
    absent = defaults.get(name, "<absent>")
    old, new = saved.get(name, absent), current.get(name, absent)
    if old != new:
      differences.append(f"{name}: {old!r} -> {new!r}")
  return differences


def check_config(hp: hparams.HParams, workdir: str, *, resuming: bool) -> None:
  """Compares `hp` with the workdir's record; writes the record (process 0).

  Args:
    hp: this run's hyper-parameters.
    workdir: the run's folder.
    resuming: a checkpoint exists in the workdir (else the record is simply rewritten).

  Raises:
    WorkdirError: resuming with a config that differs in fields that change the model, its
      optimisation or its data (listed), unless `config.allow_resume_with_other_config`.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  current = flat_config(hp)
  if resuming and os.path.isfile(path):
    with open(path) as f:
      saved = json.load(f)
    differences = config_differences(saved, current)
    if differences:
      listing = "\n  ".join(differences)
      if not hp.allow_resume_with_other_config:
        raise WorkdirError(
            errno.EEXIST, f"workdir {workdir} holds checkpoints of another config "
            f"({path} differs):\n  {listing}\nUse a fresh --workdir, or set "
            "--config.allow_resume_with_other_config=True to resume anyway.")
      logging.warning("Resuming %s with a changed config (allowed):\n  %s", workdir, listing)
  elif resuming:
    logging.warning("%s has checkpoints but no %s: cannot check that they come from this "
                    "config; recording this one.", workdir, CONFIG_FILE)
  if jax.process_index() == 0:
    files.write_json(path, current, indent=1, sort_keys=True)
