"""What the entry points (train.py, evaluate.py, the demo) share: multi-host flags and
`jax.distributed.initialize`, and JAX's persistent compilation cache.

  from ciae_jax import launch
  launch.define_flags()          # at import time of the entry point, next to its own flags
  ...
  def main(argv):
    launch.start()               # before anything touches a device

Multi-host: `jax.distributed.initialize()` runs with `--multihost` (cluster auto-detection:
SLURM, Open MPI, Kubernetes, Cloud TPU), when `JAX_COORDINATOR_ADDRESS` is set (with
`JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`), or with `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I` (e.g. several processes on one machine).

Compilation cache: on by default, in `$CIAE_JAX_CACHE_DIR` or else `~/.cache/ciae_jax/jax_cache`,
so that a second run of the same programs (a demo, an evaluation, a resumed training) loads
them instead of compiling. `--nocompilation_cache` or `CIAE_JAX_CACHE=0` turns it off; a cache
folder set the JAX way (`JAX_COMPILATION_CACHE_DIR`, as the tests do) is left as it is.
"""
from __future__ import annotations

import os

from absl import flags
from absl import logging

CACHE_DIR_ENV = "CIAE_JAX_CACHE_DIR"
CACHE_SWITCH_ENV = "CIAE_JAX_CACHE"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "ciae_jax", "jax_cache")
# Programs that compile faster than this are not worth a file (JAX's default is 1 s).
_MIN_COMPILE_SECS = 0.5


def define_flags() -> None:
  """Defines `--multihost`, `--coordinator_address`, `--num_processes`, `--process_id` and
  `--compilation_cache` (once per process)."""
  if "multihost" in flags.FLAGS:
    return
  flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (also when "
                    "JAX_COORDINATOR_ADDRESS or --coordinator_address is set).")
  flags.DEFINE_string("coordinator_address", None,
                      "HOST:PORT of process 0 for jax.distributed.initialize().")
  flags.DEFINE_integer("num_processes", None, "Processes in the job.")
  flags.DEFINE_integer("process_id", None, "This process's index, 0..N-1.")
  flags.DEFINE_bool("compilation_cache", True,
                    f"JAX's persistent compilation cache in ${CACHE_DIR_ENV} (default "
                    f"{DEFAULT_CACHE_DIR}); also off with {CACHE_SWITCH_ENV}=0.")


def start() -> None:
  """Turns the compilation cache on and joins the multi-host job, from the flags."""
  values = flags.FLAGS
  enable_compilation_cache(values.compilation_cache)
  initialize_distributed(multihost=values.multihost,
                         coordinator_address=values.coordinator_address,
                         num_processes=values.num_processes, process_id=values.process_id)


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the complete checkpoints in `workdir/checkpoints`, from the folder names (orbax
  names a finished checkpoint by its step; unfinished ones carry a temporary suffix)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def check_checkpoint(workdir: str, checkpoint_step: int | None = None) -> None:
  """UsageError unless `workdir` has a checkpoint (at `checkpoint_step` if given).

  Reads a folder listing only, so that a wrong argument fails at once, before the loading and
  compiling it would otherwise wait for.
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  steps = checkpoint_steps(workdir)
  if not steps:
    raise app.UsageError(f"--workdir {workdir}: no checkpoint in {workdir}/checkpoints (train "
                         "first: python train.py --config ... --workdir ...)")
  if checkpoint_step is not None and checkpoint_step not in steps:
    raise app.UsageError(f"--checkpoint_step {checkpoint_step}: not in {workdir}/checkpoints "
                         f"(steps {steps})")


def initialize_distributed(*, multihost: bool = False, coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """`jax.distributed.initialize` when asked for (see the module docstring); whether it ran."""
  if not (multihost or coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")):
    return False
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


def cache_dir(enabled: bool = True) -> str | None:
  """The compilation cache folder the flags and environment ask for, or None (off)."""
  if not enabled or os.environ.get(CACHE_SWITCH_ENV, "1").strip().lower() in ("0", "false",
                                                                                 "off", "no"):
    return None
  return os.path.expanduser(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR)


def enable_compilation_cache(enabled: bool = True) -> str | None:
  """Points JAX's persistent compilation cache at `cache_dir()`; returns the folder in use."""
  import jax  # pylint: disable=g-import-not-at-top
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # Set the JAX way: JAX reads it itself.
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  folder = cache_dir(enabled)
  if folder is None:
    return None
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as error:  # A read-only home must not stop a run: it only compiles more.
    logging.warning("compilation cache %s not usable (%s); compiling every time", folder, error)
    return None
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_COMPILE_SECS)
  return folder
