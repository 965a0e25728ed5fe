r"""Visual demo: the panoptic result of one image next to its embedding map (paper Fig. 5).

  python -m ciae_jax.demo --config configs/synthetic.py --workdir runs/synthetic \
      --image data/synthetic/val2017/000002000001.jpg --output demo.png

Writes OUTPUT: the input | the panoptic segments over it in the dataset's category colours, with
the detected boxes, labels and scores | the pixel embeddings projected on their first three
principal components (paper Fig. 4c), side by side, small images scaled up to at least 512
pixels. The image goes through the same `Predictor` (and preprocessing) as evaluation. The
arguments are checked (the image exists, the workdir has a checkpoint) before anything is
loaded or compiled; compiled programs are kept in the persistent cache (`ciae_jax/launch.py`),
so a second demo starts faster.
"""
from __future__ import annotations

import os
from typing import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from ciae_jax import console
from ciae_jax import launch

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir holding the checkpoints.")
_IMAGE = flags.DEFINE_string("image", None, "Image file (JPEG or PNG).")
_OUTPUT = flags.DEFINE_string("output", "demo.png", "Output picture (PNG).")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: latest).")


checkpoint_steps = launch.checkpoint_steps  # Where it used to live.


def check_arguments(workdir: str, image_path: str, checkpoint_step: int | None = None) -> None:
  """UsageError naming what is missing: the image, the workdir's checkpoints or the step.

  Reads folder listings only, so that a wrong argument fails at once, not after the loading
  and compiling it would otherwise wait for.
  """
  if not os.path.isfile(image_path):
    folder = os.path.dirname(image_path) or "."
    hint = ""
    if os.path.isdir(folder):
      names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".jpg", ".png")))
      hint = f"; {folder} holds e.g. {names[:3]}" if names else f"; {folder} holds no image"
    raise app.UsageError(f"--image {image_path}: no such file{hint}")
  launch.check_checkpoint(workdir, checkpoint_step)


def run_demo(hp, workdir: str, image_path: str, output: str,
             checkpoint_step: int | None = None) -> str:
  """Writes the demo picture of `image_path`; returns its path."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from ciae_jax import visualize  # pylint: disable=g-import-not-at-top
  from ciae_jax.inference import predictor as predictor_lib  # pylint: disable=g-import-not-at-top
  from ciae_jax.inference import preprocess  # pylint: disable=g-import-not-at-top
  check_arguments(workdir, image_path, checkpoint_step)
  # One image: one device, one row per call.
  # Traced programs are kept beside the compiled ones: a second demo neither traces nor
  # compiles the model (`program_cache.py`).
  cache = jax.config.jax_compilation_cache_dir  # launch.start's (None: the cache is off)
  predictor = predictor_lib.Predictor.from_workdir(
      hp, workdir, checkpoint_step, devices=jax.local_devices()[:1], per_device_batch=1,
      program_cache=os.path.join(cache, "programs") if cache else None)
  image = preprocess.load_rgb(image_path)  # [h0, w0, 3]
  prediction = predictor(image, with_embedding=True)
  picture = visualize.panel(image, prediction, predictor.categories,
                            min_score=hp.inference.instance_score_thresh)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  Image.fromarray(np.asarray(picture)).save(output)
  return output


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  check_arguments(_WORKDIR.value, _IMAGE.value, _STEP.value)
  console.configure()
  launch.start()
  from ciae_jax import hparams  # pylint: disable=g-import-not-at-top
  path = run_demo(hparams.HParams.from_config(_CONFIG.value), _WORKDIR.value, _IMAGE.value,
                  _OUTPUT.value, _STEP.value)
  print("wrote", path)


def run() -> None:
  """`python -m ciae_jax.demo` and the console script `ciae-demo` (pyproject.toml).

  The launch flags are defined here, not at import, so that importing the module (run_demo)
  next to train.py or evaluate.py, which define them too, is no duplicate-flag error.
  """
  launch.define_flags()
  flags.mark_flags_as_required(["config", "workdir", "image"])
  app.run(main)


if __name__ == "__main__":
  run()
