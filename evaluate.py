r"""Evaluates a CIAE checkpoint: panoptic predictions, PQ, box AP.

  python evaluate.py --config configs/synthetic.py --workdir runs/synthetic \
      [--checkpoint_step N] [--output_dir OUT]

Restores the latest checkpoint of WORKDIR (or step N): params, model state and memory only, no
optimizer. Predicts the validation split of the config's dataset (`--config.dataset.root=PATH`
for any COCO-layout dataset) on every local device (`--config.inference.per_device_batch`
images each per call) and writes, under OUT (default WORKDIR/eval/<step>):
`panoptic_predictions.json` and `panoptic_predictions/` (COCO panoptic format),
`detections.json` (COCO detection results) and `metrics.json` (the `pq_compute` result
structure plus `box_ap`); then prints the PQ table.

Several hosts: the multi-host flags of train.py (`--multihost`, JAX_COORDINATOR_ADDRESS or
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`, `ciae_jax/launch.py`); each
host predicts its shard of the images and writes their PNGs into OUT, process 0 writes the JSON
files, and every host prints the same metrics.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from ciae_jax import console
from ciae_jax import launch

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step; default the latest.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Output folder; default WORKDIR/eval/STEP.")
launch.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  console.configure()
  launch.start()
  from ciae_jax import hparams  # pylint: disable=g-import-not-at-top
  from ciae_jax.evaluation import pq  # pylint: disable=g-import-not-at-top
  from ciae_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
  metrics, output_dir = runner.evaluate_checkpoint(
      hparams.HParams.from_config(_CONFIG.value), _WORKDIR.value, checkpoint_step=_STEP.value,
      output_dir=_OUTPUT_DIR.value)
  print(pq.format_pq_table(metrics))
  print("box AP: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics["box_ap"].items()))
  print(f"wrote {output_dir}")


def run() -> None:
  """The console script (`ciae-evaluate`, pyproject.toml): absl parses sys.argv, then main."""
  app.run(main)


if __name__ == "__main__":
  run()
