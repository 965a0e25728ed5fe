"""Inference thresholds chosen on held-out training images: `python -m ciae_jax.tune_inference`.

`tune(hp, ...)` scores a grid of `inference.instance_score_thresh` x `inference.nms_thresh` x
`inference.stuff_area` by PQ on the images `dataset.num_tuning_images` holds out of the train
split (`dataset.split_tuning_records`: the last N by image id, which training never sees), so
that the thresholds are chosen neither on training images nor on val, the split they are
reported on.

The network runs once per image: its outputs stay on the devices, and only the post-processing
(`panoptic.panoptic_inference`: decoding, NMS, the pixel assignment, the area filter) runs
again per setting. The three thresholds are traced arguments of that program (they enter only
array comparisons), so it compiles once per canvas for the whole grid. Each setting has its own
`pq.PQAccumulator` against the held-out images' ground truth (the train split's JSON and
PNGs). One process (all its local devices); multi-host jobs are not supported.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import os
import time
from typing import Any, Sequence

from absl import logging
import jax
import numpy as np

from ciae_jax import hparams
from ciae_jax import parallel
from ciae_jax.data import coco
from ciae_jax.data import dataset as dataset_lib
from ciae_jax.evaluation import batching
from ciae_jax.evaluation import coco_format
from ciae_jax.evaluation import pq as pq_lib
from ciae_jax.evaluation import runner
from ciae_jax.inference import panoptic
from ciae_jax.inference import preprocess
from ciae_jax.models import ciae as ciae_model

# The grid's defaults; the config's own value is always added (the table ranks it too).
DEFAULT_SCORE_THRESHS = (0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_NMS_THRESHS = (0.5, 0.6, 0.7)
DEFAULT_STUFF_AREA_FACTORS = (0.25, 0.5, 1.0, 2.0)  # x the config's stuff_area.
SETTING_KEYS = ("instance_score_thresh", "nms_thresh", "stuff_area")
_OUTPUT_KEYS = ("cls_logits", "centerness", "box_reg", "embedding")


@dataclasses.dataclass(frozen=True)
class Grid:
  """The values tried of each threshold; every combination is one setting."""
  instance_score_thresh: tuple[float, ...]
  nms_thresh: tuple[float, ...]
  stuff_area: tuple[float, ...]

  def __post_init__(self):
    for name in SETTING_KEYS:
      if not getattr(self, name):
        raise ValueError(f"the grid of inference.{name} is empty")

  def settings(self) -> list[tuple[float, float, float]]:
    """(instance_score_thresh, nms_thresh, stuff_area) of every setting, in table order."""
    return list(itertools.product(self.instance_score_thresh, self.nms_thresh, self.stuff_area))


def default_grid(infer: hparams.InferenceHParams,
                 score_threshs: Sequence[float] | None = None,
                 nms_threshs: Sequence[float] | None = None,
                 stuff_areas: Sequence[float] | None = None) -> Grid:
  """The given values, or the defaults plus the config's current value, sorted."""
  def values(given, defaults, current):
    return tuple(sorted({float(v) for v in (given if given else (*defaults, current))}))

  return Grid(values(score_threshs, DEFAULT_SCORE_THRESHS, infer.instance_score_thresh),
              values(nms_threshs, DEFAULT_NMS_THRESHS, infer.nms_thresh),
              values(stuff_areas, tuple(f * infer.stuff_area for f in DEFAULT_STUFF_AREA_FACTORS),
                     infer.stuff_area))


def tuning_records(dataset: hparams.DatasetHParams,
                   categories: Any) -> list[coco.ImageRecord]:
  """The held-out images of the train split: those the training input leaves out.

  Loaded as `sources.CocoSource` loads the split (with `skip_bad_examples`, images whose JSON
  entry or files are bad are left out first, as there), then `split_tuning_records`.

  Raises:
    ValueError: `dataset.num_tuning_images` is 0 (nothing held out) or too large, or the
      source is tfds.
  """
  dataset_lib.check_config(dataset)
  if dataset.num_tuning_images <= 0:
    raise ValueError("dataset.num_tuning_images is 0: no training images were held out. Train "
                     "with --config.dataset.num_tuning_images=N and pass the same value here")
  root = dataset_lib.prepare_root(dataset)
  skipped = []
  records = coco.load_records(root, dataset.train_split, categories=categories,
                              on_image_error=(lambda *a: skipped.append(a[0]))
                              if dataset.skip_bad_examples else None)
  if skipped:
    logging.warning("tuning: %d train images with bad entries or files left out (ids %s)",
                    len(skipped), skipped[:10])
  _, held_out = dataset_lib.split_tuning_records(
      records, dataset.num_tuning_images, where=coco.split_paths(root, dataset.train_split)[1])
  return held_out


class _Programs:
  """The network (once per batch) and the post-processing (once per batch and setting)."""

  def __init__(self, hp: hparams.HParams, model: ciae_model.CIAE, variables: Any, memory: Any,
               num_stuff: int, devices: Sequence[Any] | None):
    self.hp = hp
    self.devices = list(devices) if devices else jax.local_devices()
    self.mesh = parallel.make_mesh(self.devices) if hp.parallel == "shard_map" else None
    kw = {"parallel": hp.parallel, "mesh": self.mesh,
          "devices": self.devices if hp.parallel == "pmap" else None}
    self.consts = parallel.replicate((variables, memory), parallel=hp.parallel, mesh=self.mesh,
                                     devices=self.devices)
    infer = hp.inference

    stuff_from = hp.model.stuff_from
    keys = _OUTPUT_KEYS + (("semantic_logits",) if stuff_from == "semantic" else ())

    def net(consts, batch):
      outputs = model.apply(consts[0], batch["image"])
      return {k: outputs[k] for k in keys}

    def post(consts, batch):
      def one(outputs, size, scale, thresholds):
        setting = infer.replace(instance_score_thresh=thresholds[0], nms_thresh=thresholds[1],
                                stuff_area=thresholds[2])
        return panoptic.panoptic_inference(
            outputs, consts[1], size, setting, num_stuff=num_stuff,
            merge_things=hp.loss.merge_things, strides=model.strides, resize_scale=scale,
            stuff_from=stuff_from)
      results = jax.vmap(one)(batch["outputs"], batch["image_size"], batch["scale"],
                              batch["thresholds"])
      return {k: results[k] for k in ("panoptic", "query_class")}

    self.net = parallel.parallelize_map(net, **kw)
    self.post = parallel.parallelize_map(post, **kw)
    self.rows = len(self.devices) * hp.inference.per_device_batch

  def _shard(self, arrays: dict[str, np.ndarray]) -> Any:
    devices = len(self.devices)
    arrays = {k: v.reshape(devices, -1, *v.shape[1:]) for k, v in arrays.items()}
    return parallel.shard_batch(arrays, parallel=self.hp.parallel, mesh=self.mesh)

  def outputs(self, canvas: tuple[int, int], prepared: Sequence[preprocess.Prepared | None]
              ) -> tuple[Any, dict[str, Any]]:
    """(the network outputs on the devices, the per-row sizes) of one batch (None: blank)."""
    image = np.zeros((self.rows, *canvas, 3), np.float32)  # [L, H, W, 3]
    # Blank rows claim the whole canvas, as in `Predictor.run`: finite scales.
    size = np.tile(np.asarray(canvas, np.int32), (self.rows, 1))  # [L, 2]
    scale = np.ones((self.rows,), np.float32)  # [L]
    for row, item in enumerate(prepared):
      if item is not None:
        image[row], size[row] = item.image, item.image_size
        scale[row] = np.float32(item.image_size[0]) / np.float32(item.orig_size[0])
    outputs = self.net(self.consts, self._shard({"image": image}))
    return outputs, {"image_size": size, "scale": scale}

  def results(self, outputs: Any, rows: dict[str, np.ndarray],
              setting: tuple[float, float, float]) -> list[dict[str, np.ndarray]]:
    """Host `panoptic` / `query_class` of every row under one setting."""
    thresholds = np.tile(np.asarray(setting, np.float32), (self.rows, 1))  # [L, 3]
    batch = {**self._shard({**rows, "thresholds": thresholds}), "outputs": outputs}
    host = parallel.local_rows(self.post(self.consts, batch), parallel=self.hp.parallel)
    host = {k: v.reshape(self.rows, *v.shape[2:]) for k, v in host.items()}
    return [{k: v[row] for k, v in host.items()} for row in range(self.rows)]


def tune(hp: hparams.HParams, *, variables: Any, memory: Any, grid: Grid,
         devices: Sequence[Any] | None = None, log_every_s: float = 10.0) -> dict[str, Any]:
  """PQ of every setting of `grid` on the held-out training images, and the best setting.

  Args:
    hp: the run's hyper-parameters (`dataset.num_tuning_images` > 0, as in training).
    variables: model variables; memory: `[M, D]` memory embeddings.
    grid: the thresholds to try.
    devices: this process's devices to predict on (default all).
    log_every_s: seconds between progress lines.

  Returns:
    `{"image_ids", "skipped_image_ids", "settings": [{instance_score_thresh, nms_thresh,
    stuff_area, All, Things, Stuff}], "best"}` (`skipped_image_ids`: images that did not
    decode, with `skip_bad_examples`), PQ/SQ/RQ as fractions (`pq_compute`'s
    `{pq, sq, rq, n}`); `best` is the first setting of highest All PQ.
  """
  if hp.inference.oracle:
    raise ValueError("inference.oracle=True: tune_inference tunes the detector's thresholds; "
                     "oracle mode has no detections to threshold")
  if jax.process_count() > 1:
    raise ValueError("tune_inference runs in one process (its local devices)")
  dataset = hp.dataset
  categories = dataset_lib.load_dataset_categories(dataset)
  records = tuning_records(dataset, categories)
  root = dataset_lib.prepare_root(dataset)
  ground_truth = runner.GroundTruth(coco.split_paths(root, dataset.train_split)[1])
  model = ciae_model.build_model(hp.model, categories.num_things, categories.num_stuff)
  programs = _Programs(hp, model, variables, memory, categories.num_stuff, devices)
  preprocessor = preprocess.Preprocessor(dataset)
  settings = grid.settings()
  accumulators = [pq_lib.PQAccumulator(ground_truth.categories) for _ in settings]
  plan = batching.eval_plan([(r.height, r.width) for r in records], preprocessor,
                          rows_per_process=programs.rows, num_processes=1)
  progress = _Progress(len(records) * len(settings), log_every_s)
  logging.info("tuning: %d settings on %d held-out train images (ids %d..%d)", len(settings),
               len(records), records[0].image_id, records[-1].image_id)

  skipped = []

  def load(record):
    try:
      example = coco.decode_example(record, categories)
    except ValueError as error:  # As in evaluation: listed with skip_bad_examples, else raised.
      if not dataset.skip_bad_examples:
        raise
      skipped.append(record.image_id)
      logging.warning("tuning: image id %d left out: %s", record.image_id, error)
      return None
    gt_ids = np.where(example["segment_map"] > 0,
                      example["seg_id"][example["segment_map"] - 1], 0)  # [h0, w0]
    return preprocessor(example["image"]), gt_ids

  with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
    for batch in plan:
      loaded = list(pool.map(lambda r: None if r is None else load(records[r]), batch.rows))
      outputs, rows = programs.outputs(batch.canvas, [x and x[0] for x in loaded])
      for accumulator, setting in zip(accumulators, settings):
        for index, x, raw in zip(batch.rows, loaded, programs.results(outputs, rows, setting)):
          if index is None or x is None:
            continue
          (prepared, gt_ids), image_id = x, records[index].image_id
          id_map, segments = coco_format.to_coco_panoptic(
              raw, prepared.image_size, prepared.orig_size, categories.coco_ids)
          accumulator.add(gt_ids, ground_truth.annotations[image_id]["segments_info"], id_map,
                          segments, image_id=image_id)
        progress.update(sum(i is not None for i in batch.rows))
  used = [r.image_id for r in records if r.image_id not in set(skipped)]

  table = []
  for setting, accumulator in zip(settings, accumulators):
    result = accumulator.result()
    table.append({**dict(zip(SETTING_KEYS, setting)),
                  **{g: result[g] for g in ("All", "Things", "Stuff")}})
  best = max(table, key=lambda row: row["All"]["pq"])  # The first of equal PQs.
  return {"image_ids": used, "skipped_image_ids": sorted(skipped), "settings": table,
          "best": best}


class _Progress:
  """(image, setting) pairs done, their rate and the time left over the whole grid."""

  def __init__(self, total: int, every_s: float):
    self.total, self.every_s, self.done = total, every_s, 0
    self.start = self.last = time.time()

  def update(self, pairs: int) -> None:
    self.done += pairs
    now = time.time()
    if now - self.last < self.every_s and self.done != self.total:
      return
    self.last = now
    rate = self.done / max(now - self.start, 1e-9)
    logging.info("tuning: %d/%d (image, setting) pairs (%.1f/s, %d s left)", self.done,
                 self.total, rate, round((self.total - self.done) / max(rate, 1e-9)))


def format_table(result: dict[str, Any]) -> str:
  """One line per setting (PQ / SQ / RQ in percent for All, Things, Stuff); `*` the best."""
  head = (f"{'score':>6s} {'nms':>5s} {'stuff_area':>10s} |" + "".join(
      f" {g + ' PQ':>9s} {'SQ':>5s} {'RQ':>5s} |" for g in ("All", "Th", "St")))
  lines = [head, "-" * len(head)]
  best = result["best"]
  for row in result["settings"]:
    cells = "".join(f" {100 * row[g]['pq']:9.1f} {100 * row[g]['sq']:5.1f} "
                    f"{100 * row[g]['rq']:5.1f} |" for g in ("All", "Things", "Stuff"))
    mark = " *" if row is best else ""
    lines.append(f"{row['instance_score_thresh']:6.2f} {row['nms_thresh']:5.2f} "
                 f"{row['stuff_area']:10.1f} |{cells}{mark}")
  lines.append(f"best (by All PQ): instance_score_thresh={best['instance_score_thresh']:g} "
               f"nms_thresh={best['nms_thresh']:g} stuff_area={best['stuff_area']:g} "
               f"(PQ {100 * best['All']['pq']:.1f})")
  return "\n".join(lines)
