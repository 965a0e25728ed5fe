r"""Trains CIAE: `python train.py --config configs/synthetic.py --workdir runs/synthetic`.

Flags: `--config` (a file under configs/, `path.py:variant` allowed, any field overridable
with `--config.a.b=value`) and `--workdir` (checkpoints, TensorBoard events; a run started
again on the same workdir resumes). Multi-host runs call `jax.distributed.initialize()`
(`--multihost`, or automatically when JAX_COORDINATOR_ADDRESS is set).
"""
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and TensorBoard logs go here.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() (also when JAX_COORDINATOR_ADDRESS "
    "is set).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top
  if _MULTIHOST.value or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()
  from ciae_jax import train_lib  # pylint: disable=g-import-not-at-top
  logging.info("JAX process %d/%d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
