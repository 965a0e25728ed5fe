"""Evaluation: inference over a split, PQ in memory, box AP, COCO-format export.

`evaluate(hp, ...)` is called by `evaluate.py` (a restored checkpoint) and by the training loop
(the periodic evaluation, in memory, without writing PNGs). Inference is jitted once per
padded image size: one program for the whole split.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from ciae_jax import checkpoint as checkpoint_lib
from ciae_jax import files
from ciae_jax import hparams
from ciae_jax import inference
from ciae_jax import memory as memory_lib
from ciae_jax import panoptic_png
from ciae_jax.data import dataset as dataset_lib
from ciae_jax.data import pipeline
from ciae_jax.evaluation import box_ap as box_ap_lib
from ciae_jax.evaluation import coco_format
from ciae_jax.evaluation import pq as pq_lib
from ciae_jax.models import ciae as ciae_model
from ciae_jax.segments import Segments


def make_predict_fn(model: ciae_model.CIAE, hp: hparams.HParams,
                    num_stuff: int) -> Callable[..., dict[str, jax.Array]]:
  """A jitted `(variables, memory, batch) -> per-image inference results [B, ...]`.

  `batch` holds `image [B, H, W, 3]`, `image_size [B, 2]`, `orig_size [B, 2]` and, in oracle
  mode (`hp.inference.oracle`, paper Table V), the ground-truth segment arrays.
  """
  infer = hp.inference

  def predict(variables, memory, batch):
    outputs = _per_image_outputs(model.apply(variables, batch["image"]))
    scale = batch["image_size"][:, 0] / batch["orig_size"][:, 0]  # [B]
    if infer.oracle:
      return jax.vmap(lambda o, s, size, r: inference.oracle_inference(
          o, memory, s, infer, image_size=size, num_stuff=num_stuff, resize_scale=r))(
              outputs, Segments.from_batch(batch), batch["image_size"], scale)
    return jax.vmap(lambda o, size, r: inference.panoptic_inference(
        o, memory, size, infer, num_stuff=num_stuff, merge_things=hp.loss.merge_things,
        strides=model.strides, resize_scale=r))(outputs, batch["image_size"], scale)

  return jax.jit(predict)


def _per_image_outputs(outputs: Mapping[str, Any]) -> dict[str, Any]:
  """The output keys inference reads, batch first (vmap maps over lists element-wise)."""
  return {k: outputs[k] for k in ("cls_logits", "centerness", "box_reg", "embedding",
                                  "embedding_prenorm")}


def _flatten_devices(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`[devices, per_device, ...]` -> `[devices * per_device, ...]`."""
  return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}


class GroundTruth:
  """Ground-truth panoptic maps and segments of a split, read lazily per image."""

  def __init__(self, gt_json: str, gt_folder: str):
    data = pq_lib.load_json(gt_json)
    self.annotations = {a["image_id"]: a for a in data["annotations"]}
    self.images = {i["id"]: i for i in data["images"]}
    self.categories = data["categories"]
    self.folder = gt_folder

  def read(self, image_id: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    annotation = self.annotations[image_id]
    ids = panoptic_png.read_panoptic_png(os.path.join(self.folder, annotation["file_name"]))
    return ids, annotation["segments_info"]  # [h, w] segment ids, COCO segments


def evaluate(hp: hparams.HParams, *, variables: Any, memory: Any,
             output_dir: str | None = None, max_images: int | None = None,
             log_every: int = 50) -> dict[str, Any]:
  """Runs inference on the validation split and returns PQ (and box AP) as in metrics.json.

  Args:
    hp: the run's hyper-parameters (dataset, model, loss, inference).
    variables: model variables (`params` and the other collections), on the host or device.
    memory: `[M, D]` memory embeddings.
    output_dir: when set, writes `panoptic_predictions.json`, `panoptic_predictions/`,
      `detections.json` and `metrics.json` there; when None, PQ is computed in memory only.
    max_images: evaluate only the first N images (quick checks in training).
    log_every: progress line every N images.

  Returns:
    The `pq_compute` result structure (`All`, `Things`, `Stuff`, `per_class`) plus `box_ap`
    (pycocotools COCOeval bbox metrics) and `num_images`.
  """
  dataset = hp.dataset
  categories = dataset_lib.load_dataset_categories(dataset)
  gt_files = dataset_lib.eval_ground_truth(dataset)
  ground_truth = GroundTruth(gt_files.gt_json, gt_files.gt_folder)
  model = ciae_model.build_model(hp.model, categories.num_things)
  predict = make_predict_fn(model, hp, categories.num_stuff)
  batch_size = hp.inference.batch_size or hp.batch_size
  batch_size = max(jax.local_device_count(), batch_size - batch_size % jax.local_device_count())
  batches = pipeline.build_input(dataset, dataset.val_split, train=False,
                                 global_batch_size=batch_size, seed=hp.seed)

  accumulator = pq_lib.PQAccumulator(ground_truth.categories)
  annotations, detections = [], []
  png_folder = os.path.join(output_dir, "panoptic_predictions") if output_dir else None
  total = len(ground_truth.annotations) if max_images is None else max_images
  start, done = time.time(), 0
  for batch in batches:
    batch = _flatten_devices(batch)
    results = jax.device_get(predict(variables, memory, {k: jnp.asarray(v) for k, v in
                                                          batch.items()}))
    for row in np.flatnonzero(batch["example_valid"]):
      result = jax.tree.map(lambda x, r=row: x[r], results)
      image_id = int(batch["image_id"][row])
      id_map, segments = coco_format.to_coco_panoptic(
          result, batch["image_size"][row], batch["orig_size"][row], categories.coco_ids)
      gt_ids, gt_segments = ground_truth.read(image_id)
      accumulator.add(gt_ids, gt_segments, id_map, segments, image_id=image_id)
      scale = batch["image_size"][row] / batch["orig_size"][row]
      detections += coco_format.detections_to_coco(result, image_id, tuple(scale),
                                                  categories.coco_ids)
      if png_folder:
        file_name = ground_truth.annotations[image_id]["file_name"]
        annotations.append(coco_format.write_panoptic_prediction(
            png_folder, image_id, file_name, id_map, segments))
      done += 1
      if done % log_every == 0 or done == total:
        rate = done / max(time.time() - start, 1e-9)
        logging.info("evaluation: %d/%d images (%.1f images/s)", done, total, rate)
      if max_images is not None and done >= max_images:
        break
    if max_images is not None and done >= max_images:
      break

  metrics = accumulator.result()
  evaluated = sorted(ground_truth.annotations)[:done] if max_images else None
  metrics["box_ap"] = box_ap_lib.box_ap(gt_files.gt_json, detections, image_ids=evaluated)
  metrics["num_images"] = done
  if output_dir:
    _write_outputs(output_dir, annotations, detections, metrics, ground_truth)
  return metrics


def _write_outputs(output_dir: str, annotations: list, detections: list,
                   metrics: Mapping[str, Any], ground_truth: GroundTruth) -> None:
  """The four evaluation outputs of `evaluate.py`."""
  os.makedirs(output_dir, exist_ok=True)
  images = [ground_truth.images[a["image_id"]] for a in annotations]
  coco_format.write_panoptic_json(os.path.join(output_dir, "panoptic_predictions.json"),
                                  annotations, ground_truth.categories, images)
  coco_format.write_detections_json(os.path.join(output_dir, "detections.json"), detections)
  files.write_json(os.path.join(output_dir, "metrics.json"), metrics, indent=1)


@dataclasses.dataclass(frozen=True)
class Restored:
  """What inference needs from a checkpoint."""
  model: Any
  variables: Any
  memory: Any
  categories: Any
  step: int


def inference_template(hp: hparams.HParams, model: ciae_model.CIAE, *, num_stuff: int,
                       num_things: int) -> dict[str, Any]:
  """Shapes of what inference reads from a checkpoint: params, model state, memory.

  From `jax.eval_shape`: nothing is computed, and no optimizer state is built.
  """
  variables = jax.eval_shape(lambda rng: ciae_model.init_variables(model, rng),
                             jax.random.PRNGKey(0))
  params, model_state = ciae_model.split_variables(variables)
  rows = memory_lib.num_memory(num_stuff, num_things, hp.loss.merge_things)
  memory = jax.ShapeDtypeStruct((rows, hp.model.embed_dim), jnp.float32)
  return {"params": params, "model_state": model_state, "memory": memory}


def restore_for_inference(hp: hparams.HParams, workdir: str,
                          checkpoint_step: int | None = None) -> Restored:
  """The model, its variables and memory from `workdir/checkpoints` (latest or a given step).

  Reads the params, the model state and the memory only (`checkpoint.restore_fields`).

  Raises:
    FileNotFoundError: no checkpoint (or not that step) in the workdir.
    ValueError: the checkpoint does not fit the model of `hp`.
  """
  categories = dataset_lib.load_dataset_categories(hp.dataset)
  model = ciae_model.build_model(hp.model, categories.num_things)
  template = inference_template(hp, model, num_stuff=categories.num_stuff,
                                num_things=categories.num_things)
  manager = checkpoint_lib.create_manager(workdir, create=False)
  step = manager.latest_step() if checkpoint_step is None else checkpoint_step
  fields = checkpoint_lib.restore_fields(manager, template, step)
  if fields is None:
    available = list(manager.all_steps())
    raise FileNotFoundError(
        f"no checkpoint{'' if checkpoint_step is None else f' at step {checkpoint_step}'} in "
        f"{workdir}/checkpoints (available steps: {available})")
  variables = {"params": fields["params"], **fields["model_state"]}
  return Restored(model, variables, fields["memory"], categories, int(step))


def evaluate_checkpoint(hp: hparams.HParams, workdir: str, *,
                        checkpoint_step: int | None = None,
                        output_dir: str | None = None) -> tuple[dict[str, Any], str]:
  """Restores a checkpoint, evaluates the validation split, writes the four outputs.

  Returns the metrics and the output folder (default `workdir/eval/<step>`).
  """
  restored = restore_for_inference(hp, workdir, checkpoint_step)
  output_dir = output_dir or os.path.join(workdir, "eval", str(restored.step))
  logging.info("Evaluating step %d of %s into %s", restored.step, workdir, output_dir)
  metrics = evaluate(hp, variables=restored.variables, memory=restored.memory,
                     output_dir=output_dir)
  return metrics, output_dir
