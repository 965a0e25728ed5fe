"""tf.data input: batches of the example dict of docs/interfaces.md, one canvas per batch.

Entry point: `build_input(dataset_hp, split, train=..., global_batch_size=..., seed=...,
start_step=...)`, an `InputIterator` of NumPy batches shaped
`[jax.local_device_count(), per_device_batch, ...]` with an extra key `example_valid` (bool
`[local_devices, per_device_batch]`).

The package, by concern: `sources` (records, their checks, skipped images), `schedule` (which
records, canvas, sizes and flips make each global batch: NumPy, on the host), `transforms`
(the TF graph of one example), `dataset` (root, categories, evaluation ground truth), and this
module (the tf.data assembly, the iterator, errors naming the file and image id).

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
  canvas_sizes: the canvases `(H, W)` (multiples of 32) batches are padded to;
    empty: one per orientation derived from the sizes (`data/canvas.py`:
    800 x 1344 and 1344 x 800 for COCO).
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

Canvases and order (coco and synthetic sources; `data/schedule.py`): every global batch holds
images of one canvas bucket and is padded to that canvas, so batches of different buckets
differ in `[H, W]` (the train step compiles once per canvas). The bucket, the records, the
shorter side and the flip of every row are a pure function of (seed, global batch index),
decided on the host; the TF graph of a row is a pure function of (record, size, flip), so
`start_step` reproduces exactly the batches an uninterrupted run sees. Each host keeps its rows
of every global batch. Evaluation yields every image once, by bucket then image id, each
bucket's last batch filled with `example_valid=False` rows (zeros, image_id -1).

TFDS source: its records' sizes are known only after decoding, so it cannot be bucketed
ahead; every batch is padded to the union of the canvases (`canvas.union_canvas`: 1344 x 1344
for COCO). The order comes from a seeded shuffle buffer; the shorter side and the flip of
global position `p` are still decided on the host (`schedule.augmentation`), and the resized
size follows in the graph from the decoded size by the same `canvas` functions. For bucketed
batches, read the same files with the coco source.
"""
from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any, Callable, Iterator

import jax
import numpy as np

from ciae_jax import hparams
from ciae_jax.data import canvas as canvas_lib
from ciae_jax.data import dataset as dataset_lib
from ciae_jax.data import schedule as schedule_lib
from ciae_jax.data import sources
from ciae_jax.data import transforms

if TYPE_CHECKING:  # Annotations only: no TF import at run time.
  import tensorflow as tf  # pylint: disable=g-bad-import-order

Schedule = schedule_lib.TrainSchedule | schedule_lib.EvalSchedule


def host_rows(global_batch_size: int) -> tuple[int, int]:
  """(first row of this host, rows per host) within a global batch."""
  num_hosts = jax.process_count()
  if global_batch_size % (num_hosts * jax.local_device_count()):
    raise ValueError(f"global_batch_size {global_batch_size} must be "
                     f"divisible by processes ({num_hosts}) x local devices "
                     f"({jax.local_device_count()})")
  per_host = global_batch_size // num_hosts
  return jax.process_index() * per_host, per_host


@dataclasses.dataclass(frozen=True)
class HostPipeline:
  """The host's tf.data pipeline (flat batches `[per_host, ...]`) and what it was built from.

  Attributes:
    dataset: the tf.data pipeline.
    source: a `sources.CocoSource` or a `tfds_source.TfdsSource`.
    schedule: the plan of every global batch; None for TFDS (sizes known after decoding).
    global_batch_size: G, rows of a global batch over all hosts.
    first_row: this host's first row of every global batch.
    per_host: this host's rows.
  """
  dataset: Any
  source: Any
  schedule: Schedule | None
  global_batch_size: int
  first_row: int
  per_host: int


def build_tf_dataset(cfg: hparams.DatasetHParams, split: str, *,
                     train: bool, global_batch_size: int, seed: int,
                     start_step: int = 0, num_threads: int | None = None) -> HostPipeline:
  """The host's tf.data pipeline: flat batches `[per_host_batch, ...]`.

  Args:
    cfg: the dataset config (module docstring).
    split: split name, e.g. cfg.train_split.
    train: infinite, shuffled, augmented; else every image once, padded.
    global_batch_size: examples per step over all hosts.
    seed: data seed (order and augmentation); non-negative.
    start_step: first training step (the plan starts at that global batch; nothing before it
      is decoded).
    num_threads: size of a private tf.data thread pool, with intra-op
      parallelism 1 (None: TF's defaults).

  Returns:
    The `HostPipeline`.
  """
  tf = transforms.import_tf()
  dataset_lib.check_config(cfg)
  if seed < 0 or start_step < 0:
    raise ValueError(f"seed ({seed}) and start_step ({start_step}) must be >= 0")
  first_row, per_host = host_rows(global_batch_size)
  categories = dataset_lib.load_dataset_categories(cfg)
  source = sources.make_source(cfg, split, train=train, categories=categories)
  schedule = _make_schedule(source, cfg, train=train, seed=seed,
                            global_batch_size=global_batch_size)
  pipe = HostPipeline(None, source, schedule, global_batch_size, first_row, per_host)
  if schedule is None:
    ds = _tfds_batches(pipe, cfg, train=train, seed=seed, start_step=start_step)
  else:
    ds = _planned_batches(pipe, cfg, train=train, start=start_step if train else 0)
  ds = ds.prefetch(cfg.prefetch)
  opts = tf.data.Options()
  opts.deterministic = True
  if num_threads:  # Benchmarks: a fixed number of cores, one per map call.
    opts.threading.private_threadpool_size = num_threads
    opts.threading.max_intra_op_parallelism = 1
  return dataclasses.replace(pipe, dataset=ds.with_options(opts))


def _make_schedule(source: Any, cfg: hparams.DatasetHParams, *, train: bool, seed: int,
                   global_batch_size: int) -> Schedule | None:
  """The plan of every batch; None for a source whose sizes are known after decoding only."""
  if getattr(source, "sizes", None) is None:  # TFDS.
    return None
  if train:
    return schedule_lib.TrainSchedule(source.sizes, cfg, seed=seed,
                                      global_batch_size=global_batch_size)
  return schedule_lib.EvalSchedule(source.sizes, cfg, global_batch_size=global_batch_size)


def _example_fn(load: Callable[[Any], dict[str, Any]], *, max_segments: int, train: bool,
                size_fn: Callable[[dict[str, Any], dict[str, Any]], Any]
                ) -> Callable[[dict[str, Any]], dict[str, Any]]:
  """token -> example: load the record, transform it at the token's size and flip."""
  tf = transforms.import_tf()

  def make_example(token):
    raw = load(token["item"])
    example = transforms.transform_example(raw, size=size_fn(token, raw), flip=token["flip"],
                                           max_segments=max_segments)
    if not train:  # Rows that fill an evaluation batch: zeros, image_id -1.
      example = tf.cond(token["valid"], lambda: example, lambda: transforms.blank_like(example))
    example["example_valid"] = token["valid"]
    return example

  # The functions hold no Python control flow on tensors (tf.cond where needed), so AutoGraph's
  # source-to-source conversion is not needed; skipping it saves seconds at every start.
  return tf.autograph.experimental.do_not_convert(make_example)


def _pad_to_canvas(ds: tf.data.Dataset, canvas: canvas_lib.Size,
                   per_host: int) -> tf.data.Dataset:
  """Batches of `per_host` examples, image and map padded to `canvas` (static shapes)."""
  # padded_batch pads image and map into the batch: one copy, not two.
  padded_shapes = {k: spec.shape for k, spec in ds.element_spec.items()}
  padded_shapes["image"] = [*canvas, 3]
  padded_shapes["segment_map"] = list(canvas)
  return ds.padded_batch(per_host, padded_shapes=padded_shapes, drop_remainder=True)


def _planned_batches(pipe: HostPipeline, cfg: hparams.DatasetHParams, *, train: bool,
                     start: int) -> tf.data.Dataset:
  """The batches of `pipe.schedule` from global batch `start`: one pipeline per bucket (its
  own static canvas), interleaved in the schedule's bucket order."""
  tf = transforms.import_tf()
  schedule = pipe.schedule
  make_example = _example_fn(pipe.source.loader(), max_segments=cfg.max_segments, train=train,
                             size_fn=lambda token, raw: token["size"])
  buckets = schedule.buckets or [0]  # [0]: an empty split gives an empty pipeline.
  per_bucket = [_bucket_batches(pipe, k, start, make_example, cfg.num_parallel_calls)
                for k in buckets]
  if len(per_bucket) == 1:
    return per_bucket[0]
  index = {bucket: i for i, bucket in enumerate(buckets)}
  choices = tf.data.Dataset.from_generator(
      lambda: (np.int64(index[p.bucket]) for p in schedule.plans(start)),
      output_signature=tf.TensorSpec([], tf.int64))
  return tf.data.Dataset.choose_from_datasets(per_bucket, choices)


def _bucket_batches(pipe: HostPipeline, bucket: int, start: int,
                    make_example: Callable[[dict[str, Any]], dict[str, Any]],
                    num_parallel_calls: int) -> tf.data.Dataset:
  """This host's rows of the batches of one bucket, transformed and padded to its canvas."""
  tf = transforms.import_tf()
  first_row, per_host = pipe.first_row, pipe.per_host

  def tokens():
    for plan in pipe.schedule.plans(start, bucket):
      mine = plan.rows(first_row, per_host)
      yield {"position": mine.positions, "valid": mine.valid, "item": mine.records,
             "size": mine.sizes, "flip": mine.flips}

  spec = lambda dtype, *shape: tf.TensorSpec([per_host, *shape], dtype)
  signature = {"position": spec(tf.int64), "valid": spec(tf.bool), "item": spec(tf.int64),
               "size": spec(tf.int32, 2), "flip": spec(tf.bool)}
  ds = tf.data.Dataset.from_generator(tokens, output_signature=signature).unbatch()
  ds = ds.map(make_example, num_parallel_calls=num_parallel_calls, deterministic=True)
  return _pad_to_canvas(ds, pipe.schedule.canvases[bucket], per_host)


def _graph_size_fn(max_size: int, canvas: canvas_lib.Size) -> Callable[..., Any]:
  """size_fn for TFDS: the host rule (`canvas`) applied to the decoded size, in the graph."""
  tf = transforms.import_tf()

  def size(h, w, short):
    _, fitted = canvas_lib.place(int(h), int(w), min_size=int(short), max_size=max_size,
                                 options=(canvas,))
    return np.asarray(fitted, np.int32)  # [2]

  def size_fn(token, raw):
    hw = tf.shape(raw["image"])[:2]  # [2]
    out = tf.numpy_function(size, [hw[0], hw[1], token["short"]], tf.int32, stateful=False)
    return tf.ensure_shape(out, [2])

  return size_fn


def _tfds_batches(pipe: HostPipeline, cfg: hparams.DatasetHParams, *, train: bool, seed: int,
                  start_step: int) -> tf.data.Dataset:
  """TFDS batches, all on the union canvas (module docstring)."""
  tf = transforms.import_tf()
  g, source = pipe.global_batch_size, pipe.source
  if train:
    augment = tf.data.Dataset.from_generator(
        lambda: ({"short": s, "flip": f} for s, f in schedule_lib.augmentation_stream(
            seed, start_step, g, cfg)),
        output_signature={"short": tf.TensorSpec([g], tf.int64),
                          "flip": tf.TensorSpec([g], tf.bool)}).unbatch()
    tokens = tf.data.Dataset.zip(source.train_tokens(seed, start_step * g), augment).map(
        lambda pe, aug: {"position": pe[0], "valid": True, "item": pe[1], **aug})
  else:
    n = len(source)
    fill = source.eval_tokens().take(1).repeat(-(-n // g) * g - n).enumerate(n)
    tokens = source.eval_tokens().map(lambda p, ex: {"position": p, "valid": True, "item": ex})
    tokens = tokens.concatenate(fill.map(
        lambda p, pe: {"position": p, "valid": False, "item": pe[1]}))
    tokens = tokens.map(lambda t: {**t, "short": tf.constant(cfg.eval_min_size, tf.int64),
                                   "flip": False})
  # Keep this host's rows of every global batch (cheap: no decoding yet).
  tokens = tokens.filter(lambda t: tf.equal((t["position"] % g) // pipe.per_host,
                                            pipe.first_row // pipe.per_host))
  canvas = canvas_lib.union_canvas(canvas_lib.canvases(cfg))
  max_size = cfg.max_size if train else cfg.eval_max_size
  make_example = _example_fn(source.loader(), max_segments=cfg.max_segments, train=train,
                             size_fn=_graph_size_fn(max_size, canvas))
  ds = tokens.map(make_example, num_parallel_calls=cfg.num_parallel_calls, deterministic=True)
  return _pad_to_canvas(ds, canvas, pipe.per_host)


_ASSERT_RE = re.compile(re.escape(transforms.ERROR_TAG) + r"\]?\s*(.*?)(\n|$)", re.S)


def _as_value_error(error: Exception, pipe: HostPipeline, batch_index: int) -> ValueError:
  """A clear ValueError for a failed batch: which file, which image id."""
  message = getattr(error, "message", str(error))
  match = _ASSERT_RE.search(message)
  if match:  # An in-graph check: its message names the file and image id.
    return ValueError(transforms.ERROR_TAG + " " + match.group(1).strip("[] "))
  if pipe.schedule is not None:  # Decode errors: find the file with NumPy.
    mine = pipe.schedule.plan(batch_index).rows(pipe.first_row, pipe.per_host)
    try:
      pipe.source.diagnose(list(dict.fromkeys(mine.records.tolist())))
    except ValueError as e:
      return e
  first = batch_index * pipe.global_batch_size + pipe.first_row
  return ValueError(f"input pipeline failed (global batch {batch_index}, positions {first}.."
                    f"{first + pipe.per_host - 1}): {message}")


def build_input(dataset_cfg: hparams.DatasetHParams, split: str, *,
                train: bool, global_batch_size: int, seed: int,
                start_step: int = 0) -> InputIterator:
  """NumPy batches `[local_devices, per_device_batch, ...]` for a split.

  Args:
    dataset_cfg: `config.dataset` (module docstring lists the fields).
    split: split name (`dataset_cfg.train_split` or `.val_split`).
    train: True: infinite, shuffled, augmented (skipping images without
      segments); False: every image exactly once, deterministic resize, each
      bucket's last batch filled with `example_valid=False` rows.
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
  pipe = build_tf_dataset(dataset_cfg, split, train=train, global_batch_size=global_batch_size,
                          seed=seed, start_step=start_step)
  mode = "training" if train else "evaluation"
  return InputIterator(_iterate(pipe, start_step if train else 0),
                       getattr(pipe.source, "skipped", []), name=f"{split} ({mode})")


class InputIterator:
  """The batches of `build_input`, with the images the input left out.

  Attributes:
    skipped_examples: `SkippedExample`s (image id, files, reason), by image id.
      An evaluation pass logs them when it ends: these images got no
      prediction.
  """

  def __init__(self, batches: Iterator[dict[str, np.ndarray]],
               skipped: list[sources.SkippedExample], *, name: str):
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
        sources.log_skipped(f"{self._name} ended", self.skipped_examples,
                            "were left out (no prediction)", limit=1000)
      raise

  def close(self) -> None:
    """Stops the pipeline now (its threads and buffers)."""
    self._batches.close()


def _iterate(pipe: HostPipeline, first_batch: int) -> Iterator[dict[str, np.ndarray]]:
  """Reshapes host batches per device; turns TF errors into ValueErrors."""
  tf = transforms.import_tf()
  devices = jax.local_device_count()
  iterator = pipe.dataset.as_numpy_iterator()
  batch_index = first_batch
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      raise _as_value_error(e, pipe, batch_index) from None
    batch_index += 1
    yield {k: v.reshape(devices, pipe.per_host // devices, *v.shape[1:])
           for k, v in batch.items()}
