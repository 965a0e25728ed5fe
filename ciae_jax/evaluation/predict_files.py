"""Predictions of many images as COCO panoptic files, resumable, on every device and host.

  images = image_inputs.list_images("photos/")
  summary = predict_files(Predictor.from_workdir(config, "runs/synthetic"), images, "out/")

writes the layout `evaluate.py` writes, so the files go to the COCO evaluation server or to
`python -m ciae_jax.evaluation.pq` as they are:
- `OUT/panoptic_predictions/<stem>.png`: the segment ids (`R + 256 G + 256^2 B`), one per image;
- `OUT/panoptic_predictions.json`: `annotations` (`image_id`, `file_name`, `segments_info` with
  `id`, `category_id`, `iscrowd`, `area`, `bbox`, in the dataset's category ids), `images` (the
  predicted images' entries) and `categories` (the model's), written atomically (a temporary
  file, then a rename) once all images are done;
- with `overlays`, `OUT/overlays/<stem>.jpg`: the segments and boxes over the image
  (`visualize.overlay`);
- `OUT/failed_images.json` when images could not be read: their id, file and the reason.

The images go through `batching` as in evaluation (grouped by canvas, one batch ahead in
threads, each process its slice of every global batch) and `Predictor.run`; each prediction is
`Predictor.to_prediction`'s, so the files hold exactly what the Python API returns. An image
that cannot be read (missing, corrupt, truncated, another size than its image-info entry) is
named in the log, counted and left out; the others are predicted.

Resuming: after each image's PNG is written, its annotation is appended to this process's
journal `OUT/panoptic_predictions.part-<process>.jsonl` (the PNG first, so a journal line means
a complete PNG). A run into an OUT that holds a journal or a `panoptic_predictions.json`
predicts only the images that have neither their annotation there nor their PNG (nor, with
`overlays`, their overlay); the JSON then lists all of them and the journals are removed.
The skipped images are taken as they are: resume with the same model and input.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Sequence

from absl import logging
import jax
import numpy as np
from PIL import Image

from ciae_jax import files
from ciae_jax import visualize
from ciae_jax.data import coco
from ciae_jax.evaluation import batching
from ciae_jax.evaluation import coco_format
from ciae_jax.evaluation import gather
from ciae_jax.evaluation import image_inputs
from ciae_jax.inference import predictor as predictor_lib
from ciae_jax.inference import preprocess

PREDICTIONS_JSON = "panoptic_predictions.json"
PNG_FOLDER = "panoptic_predictions"
OVERLAY_FOLDER = "overlays"
FAILED_JSON = "failed_images.json"
JOURNAL_PATTERN = "panoptic_predictions.part-*.jsonl"
# The segment fields evaluate.py writes (Prediction.segments_info adds `isthing` and `score`).
SEGMENT_FIELDS = ("id", "category_id", "iscrowd", "area", "bbox")


@dataclasses.dataclass(frozen=True)
class Summary:
  """What a run did (the same on every process).

  Attributes:
    predicted: images predicted by this run.
    skipped: images already written by an earlier run into the same folder.
    failed: `{"image_id", "file", "reason"}` of each image that could not be read.
    output_dir: the folder written.
  """
  predicted: int
  skipped: int
  failed: list[dict[str, Any]]
  output_dir: str


@dataclasses.dataclass
class _Item:
  """One image of a batch, loaded: its pixels (kept for overlays) and the model input."""
  image: image_inputs.InputImage
  rgb: np.ndarray | None = None
  prepared: preprocess.Prepared | None = None
  error: str | None = None


def predict_files(predictor: predictor_lib.BasePredictor, images: Sequence[image_inputs.InputImage],
                  output_dir: str, *, overlays: bool = False, log_every: int = 50) -> Summary:
  """Predicts `images` into COCO panoptic files under `output_dir` (see the module docstring).

  Every process of a multi-host job must call this with the same images; all return the same
  summary.

  Args:
    predictor: a `Predictor` (`from_workdir`: every local device) or an exported one
      (`export_lib.ExportedPredictor`).
    images: from `image_inputs.list_images`.
    output_dir: the folder of the files (created; on a filesystem every host sees).
    overlays: also write `OUT/overlays/<stem>.jpg`.
    log_every: a progress line (process 0) every N images.
  """
  if predictor.oracle:
    raise ValueError("inference.oracle=True needs the ground truth of each image: it runs in "
                     "evaluation (evaluate.py), not on plain images")
  png_folder = os.path.join(output_dir, PNG_FOLDER)
  os.makedirs(png_folder, exist_ok=True)
  if overlays:
    os.makedirs(os.path.join(output_dir, OVERLAY_FOLDER), exist_ok=True)
  failed, todo, sizes = [], [], []
  for image, size in zip(images, image_inputs.read_sizes(images)):
    if isinstance(size, ValueError):
      failed.append(_failure(image, str(size)))
    else:  # The entry of the JSON's `images`, with the size where a folder's lacks it.
      todo.append(dataclasses.replace(image, info=dict(image.info, height=size[0],
                                                         width=size[1])))
      sizes.append(size)
  # Process 0 decides what is done (the others may not see its files yet) and tells all.
  written = _written(output_dir, todo, overlays) if jax.process_index() == 0 else {}
  done = set(gather.broadcast(sorted(written)))
  sizes = [s for image, s in zip(todo, sizes) if image.image_id not in done]
  todo = [image for image in todo if image.image_id not in done]
  if jax.process_index() == 0:
    logging.info("predict: %d images, %d already written in %s, %d to predict, %d unreadable",
                 len(images), len(done), output_dir, len(todo), len(failed))
  writer = _Writer(predictor, output_dir, overlays)
  plan = batching.eval_plan(sizes, predictor.preprocessor, rows_per_process=predictor.rows_per_call,
                            num_processes=jax.process_count())
  progress = batching.Progress(len(todo), log_every, label="predict")
  entries, read_failures = [], []
  for batch, items in batching.load_batches(plan, lambda i: writer.load(todo[i], sizes[i]),
                                            predictor.rows_per_call):
    raws = predictor.run(batch.canvas, [i and i.prepared for i in items])
    for item, raw in zip(items, raws):
      if item is not None and item.error:
        logging.warning("predict: %s", item.error)
        read_failures.append(_failure(item.image, item.error))
      elif item is not None:
        entries.append(writer.write(item, raw))
    progress.update(sum(row is not None for row in batch.rows))
  writer.close()

  gathered = gather.all_gather({"entries": entries, "failed": read_failures})
  summary = None
  if jax.process_index() == 0:
    for part in gathered:
      written.update({e["annotation"]["image_id"]: e for e in part["entries"]})
      failed += part["failed"]
    failed.sort(key=lambda f: f["image_id"])
    _write_json(output_dir, [written[i.image_id] for i in images if i.image_id in written],
                predictor.categories, failed)
    summary = {"predicted": sum(len(part["entries"]) for part in gathered),
               "skipped": len(done), "failed": failed, "output_dir": output_dir}
    _log_failed(failed)
  return Summary(**gather.broadcast(summary))


def _failure(image: image_inputs.InputImage, reason: str) -> dict[str, Any]:
  return {"image_id": image.image_id, "file": image.path, "reason": reason}


def _log_failed(failed: list[dict[str, Any]], limit: int = 50) -> None:
  if not failed:
    return
  logging.error("predict: %d images could not be read (no prediction; %s lists them):",
                len(failed), FAILED_JSON)
  for entry in failed[:limit]:
    logging.error("  image id %d: %s", entry["image_id"], entry["reason"])


class _Writer:
  """Per-image work on the process of the image: loading, the PNG, the overlay, the journal."""

  def __init__(self, predictor: predictor_lib.BasePredictor, output_dir: str, overlays: bool):
    self.predictor, self.output_dir, self.overlays = predictor, output_dir, overlays
    journal = os.path.join(output_dir, JOURNAL_PATTERN.replace("*", f"{jax.process_index():05d}"))
    self.journal = open(journal, "a")  # pylint: disable=consider-using-with
    # Boxes drawn on overlays: those the instances' threshold keeps (an export does not say
    # it: then those scored at least as high as the image's weakest instance).
    self.min_score = (predictor.hp.inference.instance_score_thresh
                      if isinstance(predictor, predictor_lib.Predictor) else None)

  def load(self, image: image_inputs.InputImage, size: tuple[int, int]) -> _Item:
    """Decodes the image (errors name the file and the image id) and prepares the input."""
    item = _Item(image)
    try:
      rgb = coco.read_rgb(image.path, image.image_id, "image")  # [h0, w0, 3]
    except ValueError as error:
      item.error = str(error)
      return item
    if rgb.shape[:2] != tuple(size):  # The plan's canvas came from the header's size.
      item.error = (f"{image.path}: decoded {rgb.shape[0]} x {rgb.shape[1]} pixels, its header "
                    f"says {size[0]} x {size[1]} (image id {image.image_id})")
      return item
    item.prepared = self.predictor.preprocessor(rgb)
    item.rgb = rgb if self.overlays else None
    return item

  def write(self, item: _Item, raw: dict[str, np.ndarray]) -> dict[str, Any]:
    """The PNG (and overlay) of one image, then its journal line; returns the line's entry."""
    image = item.image
    prediction = self.predictor.to_prediction(raw, item.prepared)
    segments = [{k: s[k] for k in SEGMENT_FIELDS} for s in prediction.segments_info]
    annotation = coco_format.write_panoptic_prediction(
        os.path.join(self.output_dir, PNG_FOLDER), image.image_id, image.info["file_name"],
        prediction.panoptic, segments)
    if self.overlays:
      self._write_overlay(item, prediction)
    entry = {"image": image.info, "annotation": annotation}
    self.journal.write(json.dumps(files.to_builtin(entry)) + "\n")
    self.journal.flush()
    return entry

  def _write_overlay(self, item: _Item, prediction: predictor_lib.Prediction) -> None:
    min_score = self.min_score
    if min_score is None:
      scores = [s["score"] for s in prediction.segments_info if s["isthing"]]
      min_score = min(scores, default=1.0)
    picture = visualize.overlay(item.rgb, prediction, self.predictor.categories,
                                min_score=min_score)
    Image.fromarray(picture).save(_overlay_path(self.output_dir, item.image), quality=90)

  def close(self) -> None:
    self.journal.close()


def _overlay_path(output_dir: str, image: image_inputs.InputImage) -> str:
  return os.path.join(output_dir, OVERLAY_FOLDER, image.png_name[:-len(".png")] + ".jpg")


def _written(output_dir: str, images: Sequence[image_inputs.InputImage],
             overlays: bool) -> dict[int, dict[str, Any]]:
  """The entries (`image`, `annotation`) of `images` an earlier run wrote completely: listed in
  the JSON or a journal, with the same PNG name, the PNG (and the overlay) present."""
  listed: dict[int, dict[str, Any]] = {}
  path = os.path.join(output_dir, PREDICTIONS_JSON)
  if os.path.isfile(path):
    with open(path) as f:
      for annotation in json.load(f).get("annotations", []):
        listed[annotation["image_id"]] = annotation
  for journal in sorted(glob.glob(os.path.join(output_dir, JOURNAL_PATTERN))):
    with open(journal) as f:
      for line in f:
        try:
          annotation = json.loads(line)["annotation"]
        except (json.JSONDecodeError, KeyError, TypeError):
          continue  # The last line of a killed run may be cut short.
        listed[annotation["image_id"]] = annotation
  written = {}
  for image in images:
    annotation = listed.get(image.image_id)
    if (annotation is None or annotation.get("file_name") != image.png_name
        or not os.path.isfile(os.path.join(output_dir, PNG_FOLDER, image.png_name))
        or (overlays and not os.path.isfile(_overlay_path(output_dir, image)))):
      continue
    written[image.image_id] = {"image": image.info, "annotation": annotation}
  return written


def _write_json(output_dir: str, entries: list[dict[str, Any]], categories: Any,
                failed: list[dict[str, Any]]) -> None:
  """The COCO panoptic JSON (atomic: `files.write_json`), the failures, no journals left."""
  categories_list = sorted(({"id": int(i), "name": n, "isthing": int(t),
                             "color": [int(v) for v in c]}
                            for i, n, t, c in zip(categories.coco_ids, categories.names,
                                                  categories.isthing, categories.colors)),
                           key=lambda c: c["id"])
  coco_format.write_panoptic_json(os.path.join(output_dir, PREDICTIONS_JSON),
                                  [e["annotation"] for e in entries], categories_list,
                                  [e["image"] for e in entries])
  failed_path = os.path.join(output_dir, FAILED_JSON)
  if failed:
    files.write_json(failed_path, failed, indent=1)
  elif os.path.exists(failed_path):
    os.remove(failed_path)  # An earlier run's failures, all predicted now.
  for journal in glob.glob(os.path.join(output_dir, JOURNAL_PATTERN)):
    os.remove(journal)
