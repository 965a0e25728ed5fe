r"""Trains CIAE: `python train.py --config configs/synthetic.py --workdir runs/synthetic`.

Flags: `--config` (a file under configs/, `path.py:variant` allowed, any field overridable
with `--config.a.b=value`) and `--workdir` (checkpoints, TensorBoard events; a run started
again on the same workdir resumes).

Preemption: SIGTERM finishes the current step, saves a checkpoint there and exits with status
0; start the same command again to resume. A killed run (SIGKILL) resumes from its last
complete checkpoint.

Multi-host: every process runs the same command and reads its own slice of each global batch
(`--multihost`, JAX_COORDINATOR_ADDRESS or `--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`; see `ciae_jax/launch.py`, which also turns on the persistent compilation
cache, so that a resumed run does not compile again).
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ciae_jax import console
from ciae_jax import launch

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and TensorBoard logs go here.")
launch.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  console.configure()
  launch.start()
  import jax  # pylint: disable=g-import-not-at-top

  from ciae_jax import hparams  # pylint: disable=g-import-not-at-top
  from ciae_jax.training import loop  # pylint: disable=g-import-not-at-top
  hp = hparams.HParams.from_config(_CONFIG.value)
  logging.info("JAX process %d/%d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  state = loop.train_and_evaluate(hp, _WORKDIR.value)
  if int(state.step) < hp.total_steps:
    logging.info("Stopped at step %d of %d (preempted); the next start resumes there.",
                 int(state.step), _CONFIG.value.total_steps)


def run() -> None:
  """The console script (`ciae-train`, pyproject.toml): absl parses sys.argv, then main."""
  app.run(main)


if __name__ == "__main__":
  run()
