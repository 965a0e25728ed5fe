r"""Chooses the inference thresholds on training images held out of training.

  python train.py --config configs/synthetic.py --workdir runs/tune \
      --config.dataset.num_tuning_images=32
  python -m ciae_jax.tune_inference --config configs/synthetic.py --workdir runs/tune \
      --config.dataset.num_tuning_images=32 [--checkpoint_step N] \
      [--score_threshs=0.1,0.3] [--nms_threshs=0.5,0.6] [--stuff_areas=64,128] [--output F]

Restores the latest checkpoint of WORKDIR (or step N), predicts the `dataset.num_tuning_images`
images that training left out (the last N of the train split by image id; the same value as in
training), scores every combination of `inference.instance_score_thresh`,
`inference.nms_thresh` and `inference.stuff_area` by PQ on them (the network once per image,
the post-processing once per setting: `ciae_jax/evaluation/tuning.py`), prints the table and
the best setting (by All PQ) and writes both to F (default
WORKDIR/tune_inference_<step>.json). Without a grid flag, a threshold is tried at the defaults
of `tuning.py` plus the config's own value. One process, all its local devices.
"""
import os

from absl import app
from absl import flags
from ml_collections import config_flags

from ciae_jax import launch

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step; default the latest.")
_SCORES = flags.DEFINE_list("score_threshs", None, "inference.instance_score_thresh values.")
_NMS = flags.DEFINE_list("nms_threshs", None, "inference.nms_thresh values.")
_STUFF = flags.DEFINE_list("stuff_areas", None, "inference.stuff_area values (original pixels).")
_OUTPUT = flags.DEFINE_string("output", None, "JSON file; default "
                              "WORKDIR/tune_inference_<step>.json.")
flags.DEFINE_bool("compilation_cache", True, "Keep compiled programs in JAX's persistent cache "
                  "(launch.cache_dir).")
flags.mark_flags_as_required(["config", "workdir"])


def _floats(name: str, values: list[str] | None) -> list[float] | None:
  if values is None:
    return None
  try:
    return [float(v) for v in values]
  except ValueError:
    raise app.UsageError(f"--{name} takes numbers separated by commas, got {values}") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  launch.enable_compilation_cache(flags.FLAGS.compilation_cache)
  from ciae_jax import files  # pylint: disable=g-import-not-at-top
  from ciae_jax import hparams  # pylint: disable=g-import-not-at-top
  from ciae_jax.evaluation import tuning  # pylint: disable=g-import-not-at-top
  from ciae_jax.inference import predictor  # pylint: disable=g-import-not-at-top
  hp = hparams.HParams.from_config(_CONFIG.value)
  grid = tuning.default_grid(hp.inference, _floats("score_threshs", _SCORES.value),
                             _floats("nms_threshs", _NMS.value),
                             _floats("stuff_areas", _STUFF.value))
  restored = predictor.restore_for_inference(hp, _WORKDIR.value, _STEP.value)
  result = tuning.tune(hp, variables=restored.variables, memory=restored.memory, grid=grid)
  result = {"step": restored.step, "workdir": os.path.abspath(_WORKDIR.value), **result}
  output = _OUTPUT.value or os.path.join(_WORKDIR.value,
                                         f"tune_inference_{restored.step}.json")
  files.write_json(output, files.to_builtin(result), indent=1)
  print(tuning.format_table(result))
  print(f"wrote {output}")


if __name__ == "__main__":
  app.run(main)
