"""Evaluation: inference over a split, PQ in memory, box AP, COCO-format export.

`evaluate(...)` is called by `evaluate.py` (a restored checkpoint) and by the training loop
(the periodic evaluation, in memory, without writing PNGs). Inference is jitted once per
padded image size: one program for the whole split.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ciae_jax import inference
from ciae_jax.evaluation import box_ap as box_ap_lib
from ciae_jax.evaluation import export
from ciae_jax.evaluation import pq as pq_lib
from ciae_jax.models import ciae as ciae_model

# Fields of `config.inference` passed to `inference.panoptic_inference` by name.
INFERENCE_FIELDS = ("pre_nms_thresh", "pre_nms_top_n", "nms_thresh", "max_detections",
                    "stuff_area", "instance_min_area", "instance_score_thresh", "category_from",
                    "box_expand_infer", "outside_box_similarity")


def inference_kwargs(config: ml_collections.ConfigDict, num_stuff: int) -> dict[str, Any]:
  """Keyword arguments of `panoptic_inference` from `config.inference`, `fcos` and `loss`."""
  kwargs = {name: config.inference[name] for name in INFERENCE_FIELDS
            if name in config.inference}
  unknown = sorted(set(config.inference) - set(INFERENCE_FIELDS) - {"oracle", "batch_size"})
  if unknown:
    raise ValueError(f"config.inference has unknown fields {unknown}; known: "
                     f"{list(INFERENCE_FIELDS) + ['oracle', 'batch_size']}")
  return dict(kwargs, num_stuff=num_stuff, strides=tuple(config.fcos.strides),
              merge_things=bool(config.loss.merge_things))


def make_predict_fn(model: Any, config: ml_collections.ConfigDict,
                    num_stuff: int) -> Callable[..., dict[str, jax.Array]]:
  """A jitted `(variables, memory, batch) -> per-image inference results [B, ...]`.

  `batch` holds `image [B, H, W, 3]`, `image_size [B, 2]`, `orig_size [B, 2]` and, in oracle
  mode (`config.inference.oracle`, paper Table V), the ground-truth segment arrays.
  """
  kwargs = inference_kwargs(config, num_stuff)
  oracle = bool(config.inference.get("oracle", False))

  def predict(variables, memory, batch):
    outputs = model.apply(variables, batch["image"], train=False)
    scale = batch["image_size"][:, 0] / batch["orig_size"][:, 0]  # [B]
    if oracle:
      oracle_kwargs = {k: kwargs[k] for k in ("num_stuff", "stuff_area", "instance_min_area",
                                              "box_expand_infer", "outside_box_similarity")
                       if k in kwargs}
      per_image = functools.partial(inference.oracle_inference, **oracle_kwargs)
      return jax.vmap(lambda o, gt, size, s: per_image(
          o, memory, *gt, image_size=size, resize_scale=s))(
              _per_image_outputs(outputs), tuple(batch[k] for k in ORACLE_KEYS),
              batch["image_size"], scale)
    per_image = functools.partial(inference.panoptic_inference, **kwargs)
    return jax.vmap(lambda o, size, s: per_image(o, memory, size, resize_scale=s))(
        _per_image_outputs(outputs), batch["image_size"], scale)

  return jax.jit(predict)


ORACLE_KEYS = ("segment_map", "seg_class", "seg_is_thing", "seg_is_crowd", "seg_box",
               "seg_valid")


def _per_image_outputs(outputs: Mapping[str, Any]) -> dict[str, Any]:
  """The output keys inference reads, batch first (vmap maps over lists element-wise)."""
  return {k: outputs[k] for k in ("cls_logits", "centerness", "box_reg", "embedding",
                                  "embedding_prenorm")}


def _flatten_devices(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`[devices, per_device, ...]` -> `[devices * per_device, ...]`."""
  return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}


class _GroundTruth:
  """Ground-truth panoptic maps and segments of a split, read lazily per image."""

  def __init__(self, gt_json: str, gt_folder: str):
    with open(gt_json) as f:
      data = json.load(f)
    self.annotations = {a["image_id"]: a for a in data["annotations"]}
    self.images = {i["id"]: i for i in data["images"]}
    self.categories = data["categories"]
    self.folder = gt_folder

  def read(self, image_id: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    annotation = self.annotations[image_id]
    ids = export.read_panoptic_png(os.path.join(self.folder, annotation["file_name"]))
    return ids, annotation["segments_info"]  # [h, w] segment ids, COCO segments


def evaluate(config: ml_collections.ConfigDict, *, variables: Any, memory: Any,
             output_dir: str | None = None, max_images: int | None = None,
             log_every: int = 50) -> dict[str, Any]:
  """Runs inference on the validation split and returns PQ (and box AP) as in metrics.json.

  Args:
    config: the run's config (dataset, model, fcos, loss, inference fields).
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
  from ciae_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)
  dataset = config.dataset
  categories = pipeline.load_dataset_categories(dataset)
  gt_files = pipeline.eval_ground_truth(dataset)
  ground_truth = _GroundTruth(gt_files.gt_json, gt_files.gt_folder)
  model = ciae_model.build_model(config.model, categories.num_things)
  predict = make_predict_fn(model, config, categories.num_stuff)
  batch_size = int(config.inference.get("batch_size", 0) or config.batch_size)
  batch_size = max(jax.local_device_count(), batch_size - batch_size % jax.local_device_count())
  batches = pipeline.build_input(dataset, dataset.val_split, train=False,
                                 global_batch_size=batch_size, seed=config.seed)

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
      id_map, segments = inference.to_coco_panoptic(
          result, batch["image_size"][row], batch["orig_size"][row], categories.coco_ids)
      gt_ids, gt_segments = ground_truth.read(image_id)
      accumulator.add(gt_ids, gt_segments, id_map, segments, image_id=image_id)
      scale = batch["image_size"][row] / batch["orig_size"][row]
      detections += inference.detections_to_coco(result, image_id, tuple(scale),
                                                  categories.coco_ids)
      if png_folder:
        file_name = ground_truth.annotations[image_id]["file_name"]
        annotations.append(export.write_panoptic_prediction(
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
                   metrics: Mapping[str, Any], ground_truth: _GroundTruth) -> None:
  """The four evaluation outputs of `evaluate.py`."""
  os.makedirs(output_dir, exist_ok=True)
  images = [ground_truth.images[a["image_id"]] for a in annotations]
  export.write_panoptic_json(os.path.join(output_dir, "panoptic_predictions.json"),
                             annotations, ground_truth.categories, images)
  export.write_detections_json(os.path.join(output_dir, "detections.json"), detections)
  with open(os.path.join(output_dir, "metrics.json"), "w") as f:
    json.dump(_json_ready(metrics), f, indent=1)


def _json_ready(value: Any) -> Any:
  """Metrics with int keys and NumPy scalars made JSON-safe (keys stay as pq_compute's)."""
  if isinstance(value, Mapping):
    return {str(k): _json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_ready(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


@dataclasses.dataclass(frozen=True)
class Restored:
  """What inference needs from a checkpoint."""
  model: Any
  variables: Any
  memory: Any
  categories: Any
  step: int


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str,
                          checkpoint_step: int | None = None) -> Restored:
  """The model, its variables and memory from `workdir/checkpoints` (latest or a given step).

  Raises:
    FileNotFoundError: no checkpoint (or not that step) in the workdir.
    ValueError: the checkpoint does not fit the model of `config`.
  """
  from ciae_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)
  from ciae_jax.training import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from ciae_jax.training import loop  # pylint: disable=g-import-not-at-top
  categories = pipeline.load_dataset_categories(config.dataset)
  model = ciae_model.build_model(config.model, categories.num_things)
  template, _, _ = loop.init_train_state(config, model, num_stuff=categories.num_stuff,
                                         num_things=categories.num_things,
                                         rng=jax.random.PRNGKey(config.seed))
  manager = checkpoint_lib.create_manager(workdir, create=False)
  state = checkpoint_lib.restore(manager, template, step=checkpoint_step)
  if state is None:
    available = list(manager.all_steps())
    raise FileNotFoundError(
        f"no checkpoint{'' if checkpoint_step is None else f' at step {checkpoint_step}'} in "
        f"{workdir}/checkpoints (available steps: {available})")
  variables = {"params": state.params, **state.model_state}
  return Restored(model, variables, state.memory, categories, int(state.step))


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        checkpoint_step: int | None = None,
                        output_dir: str | None = None) -> tuple[dict[str, Any], str]:
  """Restores a checkpoint, evaluates the validation split, writes the four outputs.

  Returns the metrics and the output folder (default `workdir/eval/<step>`).
  """
  restored = restore_for_inference(config, workdir, checkpoint_step)
  output_dir = output_dir or os.path.join(workdir, "eval", str(restored.step))
  logging.info("Evaluating step %d of %s into %s", restored.step, workdir, output_dir)
  metrics = evaluate(config, variables=restored.variables, memory=restored.memory,
                     output_dir=output_dir)
  return metrics, output_dir
