r"""Predicts many images into COCO panoptic files (for the evaluation server or the PQ tool).

  python -m ciae_jax.predict --config configs/synthetic.py --workdir runs/synthetic \
      --input data/synthetic/val2017 --output_dir predictions [--overlays]
  python -m ciae_jax.predict --export exported --input "photos/*.jpg" --output_dir predictions
  python -m ciae_jax.predict --config configs/coco_r50.py --workdir runs/coco_r50 \
      --config.dataset.root=/data/coco \
      --input /data/coco/annotations/image_info_test-dev2017.json \
      --image_dir /data/coco/test2017 --output_dir test-dev

The model: a training workdir's latest checkpoint (or `--checkpoint_step N`) with its
`--config`, or an export (`--export DIR`, `python -m ciae_jax.export`; no config needed).
`--input`: a folder (its image files), a glob pattern (quoted), a single image, or a COCO
image-info JSON (`images` with `id`, `file_name`, `height`, `width`, e.g.
`image_info_test-dev2017.json`) whose images are read from `--image_dir`. Image ids are the
JSON's; a folder's or a glob's images are numbered 1, 2, ... in sorted file-name order.

Writes, under `--output_dir` OUT, the panoptic files `evaluate.py` writes:
`panoptic_predictions.json` (COCO panoptic `annotations`, `images`, `categories`; written
atomically at the end) and `panoptic_predictions/<stem>.png`; with `--overlays`,
`overlays/<stem>.jpg` (segments and boxes over each image). Predicts on every local device
(`--config.inference.per_device_batch` images each per call; an export takes its own batch size
on one device), and on several hosts with the multi-host flags of evaluate.py (`--multihost`, or
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`; OUT on a filesystem all
hosts see). Logs images/s and the time left. An image that cannot be read is named and counted,
the others are predicted, and the command exits with status 1 at the end
(`OUT/failed_images.json` lists them). Run it again into the same OUT to resume: images already
written are skipped. The library: `ciae_jax/evaluation/predict_files.py`; the guide:
docs/predict.md.
"""
from __future__ import annotations

import os
from typing import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from ciae_jax import console
from ciae_jax import launch

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (with --workdir).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: latest).")
_EXPORT = flags.DEFINE_string("export", None, "An export folder (python -m ciae_jax.export) "
                              "instead of --config and --workdir.")
_INPUT = flags.DEFINE_string("input", None, "A folder of images, a quoted glob pattern, an image "
                             "or a COCO image-info JSON (with --image_dir).")
_IMAGE_DIR = flags.DEFINE_string("image_dir", None, "Folder of the images of an image-info JSON.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Folder of panoptic_predictions.json and "
                                  "panoptic_predictions/.")
_OVERLAYS = flags.DEFINE_bool("overlays", False, "Also write OUT/overlays/<stem>.jpg.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 50, "A progress line every N images.")


def check_arguments() -> list:
  """The input images; UsageError naming a missing or conflicting argument, before JAX starts."""
  from ciae_jax.evaluation import image_inputs  # pylint: disable=g-import-not-at-top
  if bool(_EXPORT.value) == bool(_WORKDIR.value):
    raise app.UsageError("give either --workdir (with --config) or --export")
  if _WORKDIR.value:
    if _CONFIG.value is None:
      raise app.UsageError("--workdir needs --config (the training config)")
    launch.check_checkpoint(_WORKDIR.value, _STEP.value)
  elif _CONFIG.value is not None or _STEP.value is not None:
    raise app.UsageError("--export takes no --config or --checkpoint_step (the export holds "
                         "its model, preprocessing and categories)")
  elif not os.path.isfile(os.path.join(_EXPORT.value, "export.json")):
    raise app.UsageError(f"--export {_EXPORT.value}: no export.json there (export first: "
                         "python -m ciae_jax.export --config ... --workdir ... --output DIR)")
  try:
    return image_inputs.list_images(_INPUT.value, _IMAGE_DIR.value)
  except (FileNotFoundError, ValueError) as error:
    raise app.UsageError(str(error)) from None


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  images = check_arguments()
  console.configure()
  launch.start()
  from ciae_jax import hparams  # pylint: disable=g-import-not-at-top
  from ciae_jax.evaluation import predict_files  # pylint: disable=g-import-not-at-top
  from ciae_jax.inference import export_lib  # pylint: disable=g-import-not-at-top
  from ciae_jax.inference import predictor as predictor_lib  # pylint: disable=g-import-not-at-top
  if _EXPORT.value:
    predictor = export_lib.ExportedPredictor(_EXPORT.value)
  else:
    predictor = predictor_lib.Predictor.from_workdir(
        hparams.HParams.from_config(_CONFIG.value), _WORKDIR.value, _STEP.value)
  summary = predict_files.predict_files(predictor, images, _OUTPUT_DIR.value,
                                        overlays=_OVERLAYS.value, log_every=_LOG_EVERY.value)
  print(f"wrote {summary.output_dir}: {summary.predicted} images predicted, {summary.skipped} "
        f"already written, {len(summary.failed)} failed")
  for entry in summary.failed:
    print(f"failed: image id {entry['image_id']}: {entry['reason']}")
  return 1 if summary.failed else 0


def run() -> None:
  """`python -m ciae_jax.predict` and the console script `ciae-predict` (pyproject.toml).

  The launch flags are defined here, not at import, as in the demo: importing the module next
  to train.py or evaluate.py, which define them too, is no duplicate-flag error.
  """
  launch.define_flags()
  flags.mark_flags_as_required(["input", "output_dir"])
  app.run(main)


if __name__ == "__main__":
  run()
