"""Evaluation: the validation split through the `Predictor` on every device and host, PQ, box AP,
COCO-format export.

`evaluate(hp, ...)` is called by `evaluate.py` (a restored checkpoint) and by the training loop
(the periodic evaluation, in memory, without files). The images are read from the split's
folder and prepared on the host as the demo prepares them (`ciae_jax.inference.preprocess`), then
predicted data-parallel: one program per canvas, `inference.per_device_batch` images per
device and call.

With several processes every process runs the same plan of global batches
(`batching.eval_plan`: the images grouped by canvas, in image-id order, the last batch of each
canvas padded with blank rows) and predicts its slice of each: the program spans all devices,
so the processes must make the same calls. Each process scores its own images (PQ counts, COCO
annotation, detections) and writes their PNGs into the one output folder (file names are the
images', so processes never clash); `gather.all_gather` brings the per-image results to every
process, and process 0 adds the PQ counts in image-id order (the same float sums for any number
of hosts and devices), computes box AP and writes the JSON files; `gather.broadcast` gives its
metrics to all.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

from absl import logging
import jax
import numpy as np

from ciae_jax import files
from ciae_jax import hparams
from ciae_jax import platforms
from ciae_jax import visualize
from ciae_jax.data import coco
from ciae_jax.data import dataset as dataset_lib
from ciae_jax.evaluation import batching
from ciae_jax.evaluation import box_ap as box_ap_lib
from ciae_jax.evaluation import coco_format
from ciae_jax.evaluation import gather
from ciae_jax.evaluation import pq as pq_lib
from ciae_jax.inference import predictor as predictor_lib
from ciae_jax.inference import preprocess
from ciae_jax.models import ciae as ciae_model


def make_predict_fn(model: ciae_model.CIAE, hp: hparams.HParams, num_stuff: int) -> Any:
  """`predictor.predict_fn` jitted for one device: `(variables, memory, batch) -> results`."""
  return jax.jit(platforms.built_for(predictor_lib.predict_fn(model, hp, num_stuff),
                                     platforms.platforms_of()))


class GroundTruth:
  """The split's panoptic JSON: images, annotations (by image id) and categories."""

  def __init__(self, gt_json: str):
    data = pq_lib.load_json(gt_json)
    self.annotations = {a["image_id"]: a for a in data["annotations"]}
    self.images = {i["id"]: i for i in data["images"]}
    self.categories = data["categories"]


def evaluate(hp: hparams.HParams, *, variables: Any, memory: Any,
             output_dir: str | None = None, max_images: int | None = None,
             log_every: int = 50, devices: Sequence[Any] | None = None,
             num_pictures: int = 0) -> dict[str, Any]:
  """Predicts the validation split and returns PQ (and box AP) as in metrics.json.

  Every process of a multi-host job must call this (see the module docstring); all return the
  same metrics.

  Args:
    hp: the run's hyper-parameters (dataset, model, loss, inference, parallel).
    variables: model variables (`params` and the other collections), on the host or device.
    memory: `[M, D]` memory embeddings.
    output_dir: when set, writes `panoptic_predictions.json`, `panoptic_predictions/`,
      `detections.json` and `metrics.json` there; when None, PQ is computed in memory only.
    max_images: evaluate only the first N images (by image id).
    log_every: progress line (process 0) every N images.
    devices: this process's devices to predict on (default all).
    num_pictures: also return, under `pictures`, that many pictures (`visualize.panel`: input,
      panoptic, embedding PCA) of the first images process 0 predicts (none elsewhere).

  Returns:
    The `pq_compute` result structure (`All`, `Things`, `Stuff`, `per_class` keyed by the
    category id as a string, as in metrics.json) plus `box_ap` (pycocotools COCOeval bbox
    metrics), `num_images` and, when asked, `pictures` ({name: uint8 [H, W, 3]}).
  """
  dataset = hp.dataset
  categories = dataset_lib.load_dataset_categories(dataset)
  gt_files = dataset_lib.eval_ground_truth(dataset)
  ground_truth = GroundTruth(gt_files.gt_json)
  records, skipped = _load_records(dataset, categories)
  if jax.process_index():
    skipped = []  # Every process read the same records: process 0 reports them.
  if max_images is not None:
    records = records[:max_images]
  model = ciae_model.build_model(hp.model, categories.num_things, categories.num_stuff)
  predictor = predictor_lib.Predictor(hp, model=model, variables=variables, memory=memory,
                                      categories=categories, devices=devices)
  plan = batching.eval_plan([(r.height, r.width) for r in records], predictor.preprocessor,
                   rows_per_process=predictor.rows_per_call, num_processes=jax.process_count())
  png_folder = os.path.join(output_dir, "panoptic_predictions") if output_dir else None
  scorer = _Scorer(predictor, ground_truth, categories, png_folder, hp.dataset.max_segments)
  progress = batching.Progress(len(records), log_every)
  results, pictures = [], {}
  for batch, items in batching.load_batches(plan, lambda r: scorer.load(records[r]),
                                            predictor.rows_per_call):
    want_pictures = len(pictures) < num_pictures and jax.process_index() == 0
    raws = predictor.run(batch.canvas, [i and i.prepared for i in items],
                         segments=[i and i.segments for i in items],
                         with_embedding=want_pictures)
    for item, raw in zip(items, raws):
      if item is None:
        continue
      if item.error:
        skipped.append({"image_id": item.record.image_id, "reason": item.error})
        continue
      results.append(scorer.score(item, raw))
      if want_pictures and len(pictures) < num_pictures:
        pictures[f"image_{item.record.image_id}"] = scorer.picture(item, raw)
    progress.update(sum(row is not None for row in batch.rows))

  metrics = _combine(gather.all_gather({"results": results, "skipped": skipped}), ground_truth,
                     gt_files.gt_json, evaluated=[r.image_id for r in records]
                     if max_images is not None else None, output_dir=output_dir)
  if num_pictures:
    metrics["pictures"] = pictures
  return metrics


def _load_records(dataset: hparams.DatasetHParams, categories: Any
                  ) -> tuple[list[coco.ImageRecord], list[dict[str, Any]]]:
  """The split's records by image id; with `skip_bad_examples` bad ones listed, not raised."""
  skipped = []

  def leave_out(image_id, image_path, png_path, error):
    skipped.append({"image_id": image_id, "reason": f"{error} (image {image_path}, "
                                                    f"PNG {png_path})"})

  records = coco.load_records(dataset_lib.prepare_root(dataset), dataset.val_split,
                              categories=categories,
                              on_image_error=leave_out if dataset.skip_bad_examples else None)
  return records, skipped


@dataclasses.dataclass
class _Item:
  """One image of a batch: its record and, once loaded, its example and model input."""
  record: coco.ImageRecord
  example: dict[str, Any] | None = None
  prepared: preprocess.Prepared | None = None
  segments: dict[str, np.ndarray] | None = None
  error: str | None = None


class _Scorer:
  """Per-image work on the host of the image: loading, scoring, the PNG, pictures."""

  def __init__(self, predictor: predictor_lib.Predictor, ground_truth: GroundTruth,
               categories: Any, png_folder: str | None, max_segments: int):
    self.predictor, self.ground_truth, self.categories = predictor, ground_truth, categories
    self.png_folder, self.max_segments = png_folder, max_segments
    self.accumulator = pq_lib.PQAccumulator(ground_truth.categories)
    self.skip_bad = predictor.hp.dataset.skip_bad_examples
    self.oracle = predictor.hp.inference.oracle

  def load(self, record: coco.ImageRecord) -> _Item:
    """Decodes the image and its ground truth (`coco.decode_example`: errors name the file
    and image id) and prepares the model input."""
    item = _Item(record)
    try:
      item.example = coco.decode_example(record, self.categories)
    except ValueError as error:
      if not self.skip_bad:
        raise
      item.error = str(error)
      return item
    item.prepared = self.predictor.preprocessor(item.example["image"])
    if self.oracle:
      item.segments = preprocess.segments_at_input(item.example, item.prepared,
                                                   max_segments=self.max_segments)
    return item

  def score(self, item: _Item, raw: dict[str, np.ndarray]) -> dict[str, Any]:
    """The image's PQ counts, detections and (with files) COCO annotation, JSON-able."""
    image_id, coco_ids = item.record.image_id, self.categories.coco_ids
    prepared, example = item.prepared, item.example
    id_map, segments = coco_format.to_coco_panoptic(raw, prepared.image_size, prepared.orig_size,
                                                    coco_ids)
    # The PNG's ids: every non-void pixel belongs to a JSON segment (decode_example checks).
    gt_ids = np.where(example["segment_map"] > 0,
                      example["seg_id"][example["segment_map"] - 1], 0)  # [h0, w0]
    counts = self.accumulator.image_counts(
        gt_ids, self.ground_truth.annotations[image_id]["segments_info"], id_map, segments,
        image_id=image_id)
    annotation = None
    if self.png_folder:
      annotation = coco_format.write_panoptic_prediction(
          self.png_folder, image_id, os.path.basename(item.record.png_path), id_map, segments)
    detections = coco_format.detections_to_coco(raw, image_id, predictor_lib.image_scale(
        prepared), coco_ids)
    return {"image_id": image_id, "counts": counts.to_dict(), "detections": detections,
            "annotation": annotation}

  def picture(self, item: _Item, raw: dict[str, np.ndarray]) -> np.ndarray:
    prediction = self.predictor.to_prediction(raw, item.prepared)
    return visualize.panel(item.example["image"], prediction, self.categories,
                           min_score=self.predictor.hp.inference.instance_score_thresh)


def _combine(gathered: list[dict[str, Any]], ground_truth: GroundTruth, gt_json: str, *,
             evaluated: list[int] | None, output_dir: str | None) -> dict[str, Any]:
  """Process 0 turns every process's per-image results into the metrics (and files); every
  process gets process 0's metrics."""
  metrics = None
  if jax.process_index() == 0:
    results = sorted((r for g in gathered for r in g["results"]), key=lambda r: r["image_id"])
    skipped = sorted((s for g in gathered for s in g["skipped"]), key=lambda s: s["image_id"])
    _log_skipped(skipped)
    accumulator = pq_lib.PQAccumulator(ground_truth.categories)
    for result in results:
      accumulator.add_counts(pq_lib.ImageCounts.from_dict(result["counts"]))
    detections = [d for r in results for d in r["detections"]]
    metrics = accumulator.result()
    metrics["box_ap"] = box_ap_lib.box_ap(gt_json, detections, image_ids=evaluated)
    metrics["num_images"] = len(results)
    # As metrics.json holds them (string keys), on every process and with or without files.
    metrics = json.loads(json.dumps(files.to_builtin(metrics)))
    if output_dir:
      _write_outputs(output_dir, [r["annotation"] for r in results], detections, metrics,
                     ground_truth)
  return gather.broadcast(metrics)


def _log_skipped(skipped: list[dict[str, Any]], limit: int = 50) -> None:
  if not skipped:
    return
  logging.warning("evaluation: %d images were left out (no prediction):", len(skipped))
  for entry in skipped[:limit]:
    logging.warning("  image id %d: %s", entry["image_id"], entry["reason"])


def _write_outputs(output_dir: str, annotations: list, detections: list,
                   metrics: dict[str, Any], ground_truth: GroundTruth) -> None:
  """The four evaluation outputs of `evaluate.py` (process 0; the PNGs are already written)."""
  os.makedirs(output_dir, exist_ok=True)
  images = [ground_truth.images[a["image_id"]] for a in annotations]
  coco_format.write_panoptic_json(os.path.join(output_dir, "panoptic_predictions.json"),
                                  annotations, ground_truth.categories, images)
  coco_format.write_detections_json(os.path.join(output_dir, "detections.json"), detections)
  files.write_json(os.path.join(output_dir, "metrics.json"), metrics, indent=1)


def evaluate_checkpoint(hp: hparams.HParams, workdir: str, *,
                        checkpoint_step: int | None = None,
                        output_dir: str | None = None) -> tuple[dict[str, Any], str]:
  """Restores a checkpoint, evaluates the validation split, writes the four outputs.

  Returns the metrics and the output folder (default `workdir/eval/<step>`).
  """
  restored = predictor_lib.restore_for_inference(hp, workdir, checkpoint_step)
  output_dir = output_dir or os.path.join(workdir, "eval", str(restored.step))
  if jax.process_index() == 0:
    logging.info("Evaluating step %d of %s into %s (%d processes, %d devices)", restored.step,
                 workdir, output_dir, jax.process_count(), jax.device_count())
  metrics = evaluate(hp, variables=restored.variables, memory=restored.memory,
                     output_dir=output_dir)
  return metrics, output_dir
