"""tf.data input: batches of the example dict of docs/interfaces.md.

Entry point: `build_input(dataset_hp, split, train=..., global_batch_size=...,
seed=..., start_step=...)`, a NumPy iterator of batches shaped
`[jax.local_device_count(), per_device_batch, ...]` with an extra key
`example_valid` (bool `[local_devices, per_device_batch]`).

Dataset fields (`config.dataset`, typed as `hparams.DatasetHParams`, which holds
the defaults):
  source: 'coco' (files in the COCO panoptic layout under `root`), 'tfds'
    (`tfds_name` through tensorflow-datasets) or 'synthetic' (generated under
    `root` if missing, then read exactly like 'coco').
  root: dataset root (coco, synthetic); for 'tfds' optional, where the
    ground-truth files for evaluation live.
  train_split, val_split: split names ('train2017', 'val2017'); for TFDS they
    map to 'train' / 'validation'.
  tfds_name: TFDS builder name, 'coco/2017_panoptic'.
  tfds_data_dir: TFDS data_dir of the prepared dataset (None: TFDS default).
  categories_file: panoptic JSON or bare category list (None: the split's
    JSON for coco/synthetic, the bundled COCO panoptic list for tfds).
  image_size: (H, W) every image is padded to; both divisible by 128.
  train_min_size_range: (lo, hi), training shorter side, uniform integer
    (paper: (640, 800) for the jittered runs, else (800, 800)).
  max_size: training cap of the longer side (1333).
  eval_min_size: evaluation shorter side (800).
  eval_max_size: evaluation cap of the longer side (1333).
  max_segments: S, segment rows per image; the largest S segments are kept
    (count logged), the others become void.
  flip: random horizontal flips in training.
  skip_bad_examples: False: bad data (a corrupt or truncated image or PNG,
    PNG and JSON segments that disagree, an unknown category, a missing
    file, sizes that differ) raises ValueError naming the file and image id.
    True (coco and synthetic sources): every record of the split is checked
    up front on the host with the NumPy decoder (`coco.decode_example`, in
    threads) and the bad ones are left out before the order is drawn, so
    the stream stays a function of (seed, position) and resuming stays
    exact; training also leaves out images with more than `max_segments`
    segments instead of truncating them. Left-out images are listed in the
    iterator's `skipped_examples` (and logged when an evaluation pass ends).
  shuffle_buffer: TFDS source only (the coco source permutes whole epochs).
  num_parallel_calls: parallel map calls (-1: AUTOTUNE).
  prefetch: batches prefetched (-1: AUTOTUNE).
  synthetic.num_train, synthetic.num_val, synthetic.image_size (h, w),
    synthetic.seed: the generated dataset.

Images without segments are left out of training in both modes (they teach
nothing and give no positives) and listed in `skipped_examples` too;
evaluation keeps them, and keeps images with too many segments (truncated:
evaluation reads its ground truth from the files).

Determinism: training example at global position `p` (batch `p // G` for a
global batch G) is record `perm(seed, p // n)[p % n]` of the `n` training
images with segments, augmented with stateless random ops seeded by
`(seed, p)`; `start_step` skips `start_step * G` positions of the index stream
before any decoding, so a resumed run sees exactly the batches an
uninterrupted run sees. Each host keeps the positions of its slice of every
global batch. Evaluation yields every image once (sorted by image id), and
pads the last global batch with `example_valid=False` rows (zeros, image_id -1).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import time
from typing import Any, Callable, Iterator, TYPE_CHECKING

from absl import logging
import jax
import numpy as np

from ciae_jax import hparams
from ciae_jax.data import canvas as canvas_lib
from ciae_jax.data import categories as categories_lib
from ciae_jax.data import coco
from ciae_jax.data import transforms

if TYPE_CHECKING:  # Annotations only: no TF import at run time.
  import tensorflow as tf  # pylint: disable=g-bad-import-order

def _tf() -> Any:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # The input pipeline must never grab an accelerator from JAX.
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialised with GPUs by someone else.
    logging.warning("TensorFlow was initialised before the input pipeline; "
                    "it may hold GPU memory")
  return tf


def _check_config(cfg: hparams.DatasetHParams) -> None:
  if cfg.skip_bad_examples and cfg.source == "tfds":
    raise ValueError("dataset.skip_bad_examples=True needs source 'coco' or "
                     "'synthetic' (TFDS examples were checked when the "
                     "dataset was prepared)")
  if cfg.source in ("coco", "synthetic") and not cfg.root:
    raise ValueError(f"dataset.root is required for source {cfg.source!r}")


def prepare_root(cfg: hparams.DatasetHParams) -> str:
  """The dataset root; for 'synthetic', generated there first if missing.

  A 'synthetic' root that already holds another COCO-layout dataset (an `annotations/` folder
  and no synthetic manifest) is read as it is: `--config.dataset.root=PATH` alone trains the
  synthetic config on any COCO-layout data, and nothing is ever generated into it.
  """
  if cfg.source == "synthetic":
    from ciae_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    if synthetic.holds_other_dataset(cfg.root):
      logging.info("dataset.root %s holds a COCO-layout dataset: reading it as it is "
                   "(nothing generated)", cfg.root)
      return os.fspath(cfg.root)
    s = cfg.synthetic
    synthetic.generate_synthetic_dataset(
        cfg.root, num_train=s.num_train, num_val=s.num_val,
        image_size=tuple(s.image_size), seed=s.seed)
  return os.fspath(cfg.root)


def load_dataset_categories(
    cfg: hparams.DatasetHParams) -> categories_lib.CategoryInfo:
  """The categories of the configured dataset (one set for all splits).

  Raises:
    ValueError: the file declares no thing category (CIAE's detector needs at least one).
  """
  path = _categories_path(cfg)
  categories = categories_lib.load_categories(path)
  if categories.num_things == 0:
    raise ValueError(f"{path}: no thing category (isthing=1) among its "
                     f"{categories.num_stuff} categories; CIAE detects instances and needs "
                     "at least one thing class")
  return categories


def _categories_path(cfg: hparams.DatasetHParams) -> str:
  """The file the dataset's categories are read from."""
  if cfg.categories_file:
    return cfg.categories_file
  if cfg.source == "tfds":
    from ciae_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
    return tfds_source.COCO_CATEGORIES_FILE
  root = prepare_root(cfg)
  for split in (cfg.train_split, cfg.val_split):
    json_path = coco.split_paths(root, split)[1]
    if os.path.isfile(json_path):
      return json_path
  raise FileNotFoundError(f"no annotation file for {cfg.train_split!r} or "
                          f"{cfg.val_split!r} under {root}")


def eval_ground_truth(cfg: hparams.DatasetHParams,
                      split: str | None = None) -> coco.PanopticGroundTruth:
  """Ground-truth files (JSON, PNG folder) and categories for evaluation."""
  split = split or cfg.val_split
  if cfg.source == "tfds" and not cfg.root:
    raise ValueError("evaluation of the tfds source needs dataset.root: the "
                     "COCO panoptic annotations (annotations/panoptic_"
                     f"{split}.json and its PNG folder)")
  root = prepare_root(cfg)
  gt = coco.ground_truth(root, split, cfg.categories_file)
  return coco.PanopticGroundTruth(gt.gt_json, gt.gt_folder, gt.image_folder,
                                  load_dataset_categories(cfg))


def epoch_permutation(seed: int, epoch: int, num: int) -> np.ndarray:
  """The order of the training records in an epoch: a function of (seed, epoch)."""
  rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
  return rng.permutation(num).astype(np.int64)  # [num]


@dataclasses.dataclass(frozen=True)
class SkippedExample:
  """An image the input left out: its id, its files and why."""
  image_id: int
  files: str
  reason: str


def _files(image_path: str, png_path: str) -> str:
  return f"image {image_path}, PNG {png_path}"


def _records_collecting_errors(
    root: str, split: str, categories: categories_lib.CategoryInfo
) -> tuple[list[coco.ImageRecord], list[SkippedExample]]:
  """`coco.load_records`, but per-image errors leave the image out instead.

  Errors of the whole file (not JSON, missing fields, duplicate image ids,
  annotations of unknown images) still raise ValueError.
  """
  skipped = []

  def leave_out(image_id: int, image_path: str, png_path: str, error: ValueError) -> None:
    skipped.append(SkippedExample(image_id, _files(image_path, png_path), str(error)))

  records = coco.load_records(root, split, categories=categories, on_image_error=leave_out)
  return records, skipped


def _decode_error(record: coco.ImageRecord,
                  categories: categories_lib.CategoryInfo) -> str | None:
  try:
    coco.decode_example(record, categories)
  except ValueError as e:
    return str(e)
  return None


def validate_records(
    records: list[coco.ImageRecord],
    categories: categories_lib.CategoryInfo, *,
    num_threads: int | None = None
) -> tuple[list[coco.ImageRecord], list[SkippedExample]]:
  """(records that decode cleanly, the others with their errors), in order.

  Each image and PNG is fully decoded with the NumPy decoder, which makes the
  checks the TF graph makes (sizes, PNG/JSON segment ids); PIL releases the
  GIL while decoding, so threads scale.
  """
  start = time.time()
  num_threads = num_threads or min(32, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    errors = list(pool.map(lambda r: _decode_error(r, categories), records))
  good = [r for r, e in zip(records, errors) if e is None]
  bad = [SkippedExample(r.image_id, _files(r.image_path, r.png_path), e)
         for r, e in zip(records, errors) if e is not None]
  logging.info("Checked %d images in %.1f s (%d threads): %d bad",
               len(records), time.time() - start, num_threads, len(bad))
  return good, bad


def _log_skipped(where: str, skipped: list[SkippedExample], what: str,
                 limit: int = 20) -> None:
  if not skipped:
    return
  logging.warning("%s: %d images %s:", where, len(skipped), what)
  for s in skipped[:limit]:
    logging.warning("  image id %d (%s): %s", s.image_id, s.files, s.reason)
  if len(skipped) > limit:
    logging.warning("  ... and %d more", len(skipped) - limit)


class CocoSource:
  """Records of one split in the COCO panoptic layout, as TF tables."""

  def __init__(self, root: str, split: str,
               categories: categories_lib.CategoryInfo, *, train: bool,
               max_segments: int, skip_bad_examples: bool = False):
    self.json_path = coco.split_paths(root, split)[1]
    skipped = []
    if skip_bad_examples:
      records, skipped = _records_collecting_errors(root, split, categories)
      records, bad = validate_records(records, categories)
      skipped = sorted(skipped + bad, key=lambda s: s.image_id)
      _log_skipped(self.json_path, skipped, "are bad and left out")
    else:
      records = coco.load_records(root, split, categories=categories)
    too_many = [r for r in records if len(r.segments) > max_segments]
    if train:
      empty = [SkippedExample(r.image_id, _files(r.image_path, r.png_path), "no segments")
               for r in records if not r.segments]
      if empty:
        logging.info("%s: %d of %d images have no segments; skipped in "
                     "training", self.json_path, len(empty), len(records))
      skipped += empty
      records = [r for r in records if r.segments]
      if skip_bad_examples and too_many:
        over = [SkippedExample(
            r.image_id, _files(r.image_path, r.png_path),
            f"{len(r.segments)} segments, more than dataset.max_segments={max_segments}")
                for r in too_many]
        _log_skipped(self.json_path, over, "are left out of training")
        skipped += over
        records = [r for r in records if len(r.segments) <= max_segments]
        too_many = []
      if not records:
        raise ValueError(f"{self.json_path}: no images with segments")
    if too_many:
      logging.warning("%s: %d images have more than max_segments=%d segments; "
                      "the smallest are dropped (void), e.g. image ids %s",
                      self.json_path, len(too_many), max_segments,
                      [r.image_id for r in too_many[:10]])
    self.records = records
    self.categories = categories
    self.skipped = sorted(skipped, key=lambda s: s.image_id)

  def __len__(self) -> int:
    return len(self.records)

  def _tables(self) -> dict[str, Any]:
    tf = _tf()
    recs, cats = self.records, self.categories
    segs = [s for r in recs for s in r.segments]
    classes = np.asarray([cats.contiguous_index(s.category_id) for s in segs],
                         np.int32).reshape(-1)  # [T]
    return {
        "image_path": tf.constant([r.image_path for r in recs]),
        "png_path": tf.constant([r.png_path for r in recs]),
        "image_id": tf.constant([r.image_id for r in recs], tf.int32),
        "size": tf.constant([[r.height, r.width] for r in recs], tf.int32),
        "offsets": tf.constant(np.cumsum([0] + [len(r.segments) for r in recs]),
                               tf.int64),
        "seg_ids": tf.constant(np.asarray([s.id for s in segs], np.int32)),
        "seg_class": tf.constant(classes),
        "seg_is_thing": tf.constant(
            np.asarray([cats.isthing[c] for c in classes], bool)),
        "seg_is_crowd": tf.constant(np.asarray([s.iscrowd for s in segs],
                                               bool)),
        "seg_area": tf.constant(np.asarray([s.area for s in segs],
                                           np.float32)),
    }

  def train_tokens(self, seed: int, start_position: int) -> tf.data.Dataset:
    """(position, record index) from `start_position` on, infinite."""
    tf = _tf()
    n = len(self.records)
    first_epoch, offset = divmod(start_position, n)

    def epoch_dataset(epoch):
      perm = tf.numpy_function(
          lambda e: epoch_permutation(seed, int(e), n), [epoch], tf.int64)
      perm = tf.ensure_shape(perm, [n])  # [n]
      positions = epoch * n + tf.range(n, dtype=tf.int64)  # [n]
      return tf.data.Dataset.from_tensor_slices((positions, perm))

    tokens = tf.data.Dataset.counter(first_epoch).flat_map(epoch_dataset)
    return tokens.skip(offset)

  def eval_tokens(self) -> tf.data.Dataset:
    """(position, record index) over every record once, in order."""
    tf = _tf()
    n = len(self.records)
    return tf.data.Dataset.range(n).map(lambda i: (i, i))

  def loader(self) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
    """A TF function: record index -> raw example (transforms module)."""
    tf = _tf()
    t = self._tables()

    def load(index):
      start, end = t["offsets"][index], t["offsets"][index + 1]
      image = transforms.decode_rgb(tf.io.read_file(t["image_path"][index]))
      pan = tf.io.decode_png(tf.io.read_file(t["png_path"][index]), channels=3)
      return {
          "image": image,  # [h, w, 3]
          "pan": pan,  # [h, w, 3]
          "seg_ids": t["seg_ids"][start:end],  # [n]
          "seg_class": t["seg_class"][start:end],  # [n]
          "seg_is_thing": t["seg_is_thing"][start:end],  # [n]
          "seg_is_crowd": t["seg_is_crowd"][start:end],  # [n]
          "seg_area": t["seg_area"][start:end],  # [n]
          "image_id": t["image_id"][index],
          "expect_size": t["size"][index],  # [2]
          "where": tf.strings.join(["image ", t["image_path"][index],
                                    ", PNG ", t["png_path"][index]]),
      }

    return load

  def diagnose(self, indices: list[int]) -> None:
    """Decodes records with NumPy; raises their ValueError if one is bad."""
    for i in indices:
      coco.decode_example(self.records[i], self.categories)


def _make_source(cfg: hparams.DatasetHParams, split: str, *, train: bool,
                 categories: categories_lib.CategoryInfo):
  if cfg.source == "tfds":
    from ciae_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
    return tfds_source.TfdsSource(cfg, split, categories, train=train)
  return CocoSource(prepare_root(cfg), split, categories, train=train,
                    max_segments=cfg.max_segments,
                    skip_bad_examples=cfg.skip_bad_examples)


def _host_slice(global_batch_size: int) -> tuple[int, int]:
  """(rows per host, first row of this host) within a global batch."""
  num_hosts = jax.process_count()
  if global_batch_size % (num_hosts * jax.local_device_count()):
    raise ValueError(f"global_batch_size {global_batch_size} must be "
                     f"divisible by processes ({num_hosts}) x local devices "
                     f"({jax.local_device_count()})")
  per_host = global_batch_size // num_hosts
  return per_host, jax.process_index() * per_host


def build_tf_dataset(cfg: hparams.DatasetHParams, split: str, *,
                     train: bool, global_batch_size: int, seed: int,
                     start_step: int = 0, num_threads: int | None = None
                     ) -> tuple[tf.data.Dataset, Any]:
  """The host's tf.data pipeline: flat batches `[per_host_batch, ...]`.

  Args:
    cfg: the dataset config (module docstring).
    split: split name, e.g. cfg.train_split.
    train: infinite, shuffled, augmented; else every image once, padded.
    global_batch_size: examples per step over all hosts.
    seed: data seed (order and augmentation); non-negative.
    start_step: first training step (skips `start_step * global_batch_size`
      positions of the index stream, before decoding).
    num_threads: size of a private tf.data thread pool, with intra-op
      parallelism 1 (None: TF's defaults).

  Returns:
    (dataset, source).
  """
  tf = _tf()
  _check_config(cfg)
  if seed < 0 or start_step < 0:
    raise ValueError(f"seed ({seed}) and start_step ({start_step}) must be "
                     ">= 0")
  per_host, first_row = _host_slice(global_batch_size)
  categories = load_dataset_categories(cfg)
  source = _make_source(cfg, split, train=train, categories=categories)
  if train:
    tokens = source.train_tokens(seed, start_step * global_batch_size)
    tokens = tokens.map(lambda p, t: (p, tf.constant(True), t))
  else:
    n = len(source)
    padded = -(-n // global_batch_size) * global_batch_size
    pad = source.eval_tokens().take(1).repeat(padded - n)
    tokens = source.eval_tokens().map(lambda p, t: (p, tf.constant(True), t))
    tokens = tokens.concatenate(pad.enumerate(n).map(
        lambda p, pt: (p, tf.constant(False), pt[1])))
  # Keep this host's rows of every global batch (cheap: no decoding yet).
  tokens = tokens.filter(lambda p, v, t: tf.equal(
      (p % global_batch_size) // per_host, first_row // per_host))

  load = source.loader()
  if train:
    size_range, max_size = tuple(cfg.train_min_size_range), cfg.max_size
  else:
    size_range, max_size = (cfg.eval_min_size,) * 2, cfg.eval_max_size
  # Every batch is padded to one canvas that holds all of the dataset's canvases.
  image_size = canvas_lib.union_canvas(canvas_lib.canvases(cfg))
  options = dict(image_size=image_size, min_size_range=size_range,
                 max_size=max_size, flip=cfg.flip,
                 max_segments=cfg.max_segments, pad=False)

  def make_example(position, valid, token):
    key = tf.stack([tf.constant(seed, tf.int64), position])  # [2]
    example = transforms.transform_example(load(token), train=train, key=key,
                                           **options)
    if not train:
      example = tf.cond(valid, lambda: example,
                        lambda: transforms.blank_like(example))
    example["example_valid"] = valid
    return example

  ds = tokens.map(make_example, num_parallel_calls=cfg.num_parallel_calls,
                  deterministic=True)
  # padded_batch pads image and map into the batch: one copy, not two.
  padded_shapes = {k: spec.shape for k, spec in ds.element_spec.items()}
  padded_shapes["image"] = [*image_size, 3]
  padded_shapes["segment_map"] = list(image_size)
  ds = ds.padded_batch(per_host, padded_shapes=padded_shapes,
                       drop_remainder=True)
  ds = ds.prefetch(cfg.prefetch)
  opts = tf.data.Options()
  opts.deterministic = True
  if num_threads:  # Benchmarks: a fixed number of cores, one per map call.
    opts.threading.private_threadpool_size = num_threads
    opts.threading.max_intra_op_parallelism = 1
  return ds.with_options(opts), source


_ASSERT_RE = re.compile(re.escape(transforms.ERROR_TAG) +
                        r"\]?\s*(.*?)(\n|$)", re.S)


def _as_value_error(error: Exception, source: Any, positions: list[int],
                    train: bool, seed: int) -> ValueError:
  """A clear ValueError for a failed batch: which file, which image id."""
  message = getattr(error, "message", str(error))
  match = _ASSERT_RE.search(message)
  if match:  # An in-graph check: its message names the file and image id.
    return ValueError(transforms.ERROR_TAG + " " + match.group(1).strip("[] "))
  if hasattr(source, "diagnose"):  # Decode errors: find the file with NumPy.
    n = len(source)
    if train:
      indices = [int(epoch_permutation(seed, p // n, n)[p % n])
                 for p in positions]
    else:
      indices = [p for p in positions if p < n]
    try:
      source.diagnose(indices)
    except ValueError as e:
      return e
  return ValueError(f"input pipeline failed (positions {positions[0]}.."
                    f"{positions[-1]}): {message}")


def build_input(dataset_cfg: hparams.DatasetHParams, split: str, *,
                train: bool, global_batch_size: int, seed: int,
                start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """NumPy batches `[local_devices, per_device_batch, ...]` for a split.

  Args:
    dataset_cfg: `config.dataset` (module docstring lists the fields).
    split: split name (`dataset_cfg.train_split` or `.val_split`).
    train: True: infinite, shuffled, augmented (skipping images without
      segments); False: every image exactly once, deterministic resize, the
      last batch padded with `example_valid=False` rows.
    global_batch_size: examples per step over all hosts; divisible by
      `process_count * local_device_count`.
    seed: order and augmentation seed (>= 0).
    start_step: training step to resume at; equals skipping that many batches.

  Returns:
    An `InputIterator` of dicts of the example keys (docs/interfaces.md) plus
    `example_valid`; its `skipped_examples` lists the images left out.

  Raises:
    ValueError: bad configuration, or bad data (naming file and image id).
  """
  ds, source = build_tf_dataset(dataset_cfg, split, train=train,
                                global_batch_size=global_batch_size,
                                seed=seed, start_step=start_step)
  batches = _iterate(ds, source, train=train, seed=seed,
                     global_batch_size=global_batch_size, start_step=start_step)
  mode = "training" if train else "evaluation"
  return InputIterator(batches, getattr(source, "skipped", []),
                       name=f"{split} ({mode})")


class InputIterator:
  """The batches of `build_input`, with the images the input left out.

  Attributes:
    skipped_examples: `SkippedExample`s (image id, files, reason), by image id.
      An evaluation pass logs them when it ends: these images got no
      prediction.
  """

  def __init__(self, batches: Iterator[dict[str, np.ndarray]],
               skipped: list[SkippedExample], *, name: str):
    self._batches = batches
    self.skipped_examples = list(skipped)
    self._name = name
    self._reported = False

  def __iter__(self) -> InputIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      return next(self._batches)
    except StopIteration:
      if not self._reported:
        self._reported = True
        _log_skipped(f"{self._name} ended", self.skipped_examples,
                     "were left out (no prediction)", limit=1000)
      raise

  def close(self) -> None:
    """Stops the pipeline now (its threads and buffers)."""
    self._batches.close()


def _iterate(ds: tf.data.Dataset, source: Any, *, train: bool, seed: int,
             global_batch_size: int, start_step: int
             ) -> Iterator[dict[str, np.ndarray]]:
  """Reshapes host batches per device; turns TF errors into ValueErrors."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  devices = jax.local_device_count()
  per_host, first_row = _host_slice(global_batch_size)
  iterator = ds.as_numpy_iterator()
  step = start_step if train else 0
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      first = step * global_batch_size + first_row
      raise _as_value_error(e, source, list(range(first, first + per_host)),
                            train, seed) from None
    step += 1
    yield {k: v.reshape(devices, per_host // devices, *v.shape[1:])
           for k, v in batch.items()}
