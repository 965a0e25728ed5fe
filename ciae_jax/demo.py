r"""Visual demo: the panoptic result of one image, and its embedding map by PCA.

  python -m ciae_jax.demo --config configs/synthetic.py --workdir runs/synthetic \
      --image data/synthetic/val2017/000000000001.jpg --output demo.png

Writes OUTPUT (the panoptic segments over the image in the dataset's category colours, with the
detected boxes and labels, paper Fig. 5) and OUTPUT with suffix `_embedding` (the pixel
embeddings projected on their first three principal components, paper Fig. 4c).
"""
from __future__ import annotations

import os
from typing import Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags
from PIL import Image

from ciae_jax import hparams
from ciae_jax import visualize
from ciae_jax.data import canvas as canvas_lib
from ciae_jax.data import transforms
from ciae_jax.evaluation import coco_format
from ciae_jax.evaluation import runner

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir holding the checkpoints.")
_IMAGE = flags.DEFINE_string("image", None, "Image file (JPEG or PNG).")
_OUTPUT = flags.DEFINE_string("output", "demo.png", "Output picture (PNG).")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: latest).")


def prepare_image(image: np.ndarray, *, min_size: int, max_size: int,
                  canvases: Sequence[Sequence[int]]) -> tuple[np.ndarray, tuple[int, int]]:
  """Resizes as the evaluation pipeline does (`canvas.place`), normalises, pads to the canvas.

  Returns the `[H, W, 3]` float32 input and the `(h, w)` of the resized image inside it.
  """
  index, (new_h, new_w) = canvas_lib.place(*image.shape[:2], min_size=min_size,
                                           max_size=max_size, options=canvases)
  resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR), np.float32)
  mean, std = np.array(transforms.IMAGENET_MEAN), np.array(transforms.IMAGENET_STD)
  normalised = (resized / 255.0 - mean) / std  # [h, w, 3]
  padded = np.zeros((*canvases[index], 3), np.float32)  # [H, W, 3]
  padded[:new_h, :new_w] = normalised
  return padded, (new_h, new_w)


def run_demo(hp: hparams.HParams, workdir: str, image_path: str, output: str,
             checkpoint_step: int | None = None) -> tuple[str, str]:
  """Writes the panoptic picture and the embedding picture; returns their paths."""
  restored = runner.restore_for_inference(hp, workdir, checkpoint_step)
  categories = restored.categories
  image = np.asarray(Image.open(image_path).convert("RGB"))  # [h0, w0, 3]
  dataset = hp.dataset
  padded, valid_hw = prepare_image(
      image, min_size=dataset.eval_min_size, max_size=dataset.eval_max_size,
      canvases=canvas_lib.canvases(dataset))
  batch = {"image": padded[None], "image_size": np.array([valid_hw], np.int32),
           "orig_size": np.array([image.shape[:2]], np.int32)}
  predict = runner.make_predict_fn(restored.model, hp, categories.num_stuff)
  result = jax.tree.map(lambda x: np.asarray(x)[0], predict(
      restored.variables, restored.memory, {k: jnp.asarray(v) for k, v in batch.items()}))
  id_map, segments = coco_format.to_coco_panoptic(result, valid_hw, image.shape[:2],
                                                  categories.coco_ids)
  scale = (valid_hw[0] / image.shape[0], valid_hw[1] / image.shape[1])
  detections = coco_format.detections_to_coco(result, 0, scale, categories.coco_ids)
  min_score = hp.inference.instance_score_thresh
  colours = dict(zip(categories.coco_ids, categories.colors))
  names = dict(zip(categories.coco_ids, categories.names))
  things = frozenset(c for c, t in zip(categories.coco_ids, categories.isthing) if t)
  overlay = visualize.draw_panoptic(image, id_map, segments, colours, names, things,
                                    [d for d in detections if d["score"] >= min_score])
  embedding = restored.model.apply(restored.variables, jnp.asarray(batch["image"]))["embedding"]
  pca = visualize.embedding_pca_rgb(np.asarray(embedding[0]), valid_hw)  # [h, w, 3]
  pca = np.asarray(Image.fromarray(pca).resize(image.shape[1::-1], Image.NEAREST))
  stem, _ = os.path.splitext(output)
  embedding_path = f"{stem}_embedding.png"
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  Image.fromarray(overlay).save(output)
  Image.fromarray(pca).save(embedding_path)
  return output, embedding_path


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  paths = run_demo(hparams.HParams.from_config(_CONFIG.value), _WORKDIR.value, _IMAGE.value,
                   _OUTPUT.value, _STEP.value)
  print("wrote", *paths)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir", "image"])
  app.run(main)
