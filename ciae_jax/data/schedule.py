"""The input's plan, decided on the host (NumPy only, no TF): for every global batch, its canvas
bucket and, per row, which record, at which size, flipped or not.

Every global batch is drawn from ONE canvas bucket (`data/canvas.py`: an image's bucket is the
canvas that holds it), so that a batch is padded to its own canvas instead of to the union of
all of them. The plan is a pure function of (dataset, seed, global batch size, batch index):
resuming at step `b` recomputes batch `b` exactly, and every host of a multi-host run computes
the same plan and keeps its own rows of each global batch.

Training (`TrainSchedule`):
- bucket of an image: the canvas of its resized size at the largest training size (the upper
  end of `train_min_size_range`, `max_size`), so that every jittered size fits it too;
- bucket of global batch `b`: drawn with probabilities proportional to the buckets' image
  counts (so every image is seen at the same average rate), in chunks of `BUCKET_CHUNK`
  batches, chunk `c` from the seed sequence `(seed, _BUCKETS, c)`;
- records of batch `b` (bucket `k`): the next G entries of bucket `k`'s own infinite stream,
  one seeded permutation of its images per epoch (`epoch_permutation(seed, epoch, n_k, k)`);
  the number of earlier batches of bucket `k` is a prefix count over the bucket draws, cheap
  to recompute at resume;
- row `r` of batch `b` (global position `b * G + r`): shorter side uniform in
  `train_min_size_range`, horizontal flip with probability 1/2 (if `flip`), drawn from
  `(seed, _AUGMENT, b)`; the size is `canvas.resized_shape`, then `canvas.fit_to_canvas`.

Evaluation (`EvalSchedule`): every image exactly once, grouped by the canvas of its evaluation
size, buckets in canvas order and images by id within a bucket; each bucket's last batch is
filled with `valid=False` rows (copies of its last image, blanked by the pipeline).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from ciae_jax import hparams
from ciae_jax.data import canvas as canvas_lib

# Tags that keep the seed sequences of the three random streams apart.
_ORDER, _BUCKETS, _AUGMENT = 0, 1, 2
# Bucket draws come in chunks of this many batches: a resume at step b draws b / BUCKET_CHUNK
# chunks to count the earlier batches of each bucket.
BUCKET_CHUNK = 1024


def epoch_permutation(seed: int, epoch: int, num: int, bucket: int = 0) -> np.ndarray:
  """The order of a bucket's `num` images in one epoch of its stream: int64 [num]."""
  rng = np.random.default_rng(np.random.SeedSequence([seed, _ORDER, bucket, epoch]))
  return rng.permutation(num).astype(np.int64)  # [num]


def augmentation(seed: int, batch: int, global_batch_size: int,
                 min_size_range: Sequence[int], flip: bool) -> tuple[np.ndarray, np.ndarray]:
  """(shorter side int64 [G], flip bool [G]) of the rows of global batch `batch`.

  Both are drawn whatever `flip` is, so that turning flips off keeps the sizes.
  """
  rng = np.random.default_rng(np.random.SeedSequence([seed, _AUGMENT, batch]))
  lo, hi = (int(v) for v in min_size_range)
  shorts = rng.integers(lo, hi + 1, size=global_batch_size)  # [G]
  flips = rng.random(global_batch_size) < 0.5  # [G]
  return shorts, flips & bool(flip)


def record_buckets(sizes: np.ndarray, *, min_size: int, max_size: int,
                   options: Sequence[canvas_lib.Size]) -> np.ndarray:
  """Canvas index of each image (original `sizes` int [n, 2]) resized to (min_size, max_size)."""
  return np.asarray([canvas_lib.canvas_for(canvas_lib.resized_shape(
      h, w, min_size=min_size, max_size=max_size), options) for h, w in sizes],
                    np.int64).reshape(-1)  # [n]


def sizes_in_canvas(sizes: np.ndarray, shorts: np.ndarray, *, max_size: int,
                    canvas: canvas_lib.Size) -> np.ndarray:
  """Resized `(h, w)` int32 [m, 2] of images of original `sizes` [m, 2] on `canvas`."""
  out = [canvas_lib.fit_to_canvas(canvas_lib.resized_shape(
      h, w, min_size=s, max_size=max_size), canvas) for (h, w), s in zip(sizes, shorts)]
  return np.asarray(out, np.int32).reshape(-1, 2)  # [m, 2]


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """One global batch (or a host's rows of it): one canvas, and per row what to load.

  Attributes:
    index: the global batch index (training step, or evaluation batch).
    bucket: index of its canvas in `canvas.canvases(hp)`.
    canvas: `(H, W)` every row is padded to.
    positions: int64 [R], global positions `index * G + row`.
    records: int64 [R], record indices into the source (padding rows repeat a real one).
    sizes: int32 [R, 2], resized `(h, w)` inside the canvas.
    flips: bool [R].
    valid: bool [R], False for the rows that pad an evaluation bucket.
  """
  index: int
  bucket: int
  canvas: canvas_lib.Size
  positions: np.ndarray
  records: np.ndarray
  sizes: np.ndarray
  flips: np.ndarray
  valid: np.ndarray

  def rows(self, first: int, count: int) -> BatchPlan:
    """The rows `first .. first + count - 1` (one host's share)."""
    part = slice(first, first + count)
    return dataclasses.replace(
        self, positions=self.positions[part], records=self.records[part],
        sizes=self.sizes[part], flips=self.flips[part], valid=self.valid[part])


class TrainSchedule:
  """The infinite training plan (module docstring); random access and sequential."""

  def __init__(self, record_sizes: np.ndarray, hp: hparams.DatasetHParams, *, seed: int,
               global_batch_size: int):
    """`record_sizes`: int [n, 2] original `(height, width)` of the source's records."""
    self.canvases = canvas_lib.canvases(hp)
    self.record_sizes = np.asarray(record_sizes, np.int64).reshape(-1, 2)  # [n, 2]
    if not len(self.record_sizes):
      raise ValueError("no training images")
    self._hp, self._seed, self._size = hp, seed, global_batch_size
    buckets = record_buckets(self.record_sizes, min_size=hp.train_min_size_range[1],
                             max_size=hp.max_size, options=self.canvases)  # [n]
    self.members = [np.flatnonzero(buckets == k) for k in range(len(self.canvases))]
    self.counts = np.asarray([len(m) for m in self.members], np.int64)  # [K]
    self._cumulative = np.cumsum(self.counts)  # [K]
    self._chunks: dict[int, np.ndarray] = {}
    self._epochs: dict[tuple[int, int], np.ndarray] = {}

  @property
  def buckets(self) -> list[int]:
    """The buckets that hold images (the others are never drawn)."""
    return [k for k, n in enumerate(self.counts) if n]

  def _draw(self, chunk: int) -> np.ndarray:
    """Buckets of the batches `chunk * BUCKET_CHUNK ...`: int64 [BUCKET_CHUNK]."""
    rng = np.random.default_rng(np.random.SeedSequence([self._seed, _BUCKETS, chunk]))
    draws = rng.integers(0, self._cumulative[-1], size=BUCKET_CHUNK)  # [BUCKET_CHUNK]
    # Bucket k for draws in [cumulative[k-1], cumulative[k]): probability counts[k] / n.
    return np.searchsorted(self._cumulative, draws, side="right")

  def bucket_of(self, batch: int) -> int:
    """The bucket of global batch `batch`."""
    chunk = batch // BUCKET_CHUNK
    # The generators of several buckets share this cache from tf.data's threads: every value
    # is pure, so a race only recomputes one, and a local reference survives a clear().
    buckets = self._chunks.get(chunk)
    if buckets is None:
      buckets = self._draw(chunk)
      if len(self._chunks) > 8:
        self._chunks.clear()
      self._chunks[chunk] = buckets
    return int(buckets[batch % BUCKET_CHUNK])

  def batches_before(self, batch: int) -> np.ndarray:
    """int64 [K]: how many of the batches `0 .. batch - 1` each bucket has."""
    full, rest = divmod(batch, BUCKET_CHUNK)
    counts = np.zeros(len(self.canvases), np.int64)  # [K]
    for chunk in range(full):
      counts += np.bincount(self._draw(chunk), minlength=len(counts))
    counts += np.bincount(self._draw(full)[:rest], minlength=len(counts))
    return counts

  def _stream(self, bucket: int, stream_positions: np.ndarray) -> np.ndarray:
    """Record indices at positions of bucket `bucket`'s stream (one permutation per epoch)."""
    members = self.members[bucket]
    n = len(members)
    out = np.empty(len(stream_positions), np.int64)
    for i, q in enumerate(stream_positions):
      key = (bucket, int(q // n))
      order = self._epochs.get(key)  # Shared like `_chunks` (see bucket_of).
      if order is None:
        order = epoch_permutation(self._seed, key[1], n, bucket)
        if len(self._epochs) > 2 * len(self.canvases):
          self._epochs.clear()
        self._epochs[key] = order
      out[i] = members[order[q % n]]
    return out

  def _plan(self, batch: int, bucket: int, earlier: int) -> BatchPlan:
    """Batch `batch`, the `earlier`-th batch of `bucket`."""
    g = self._size
    records = self._stream(bucket, earlier * g + np.arange(g))  # [G]
    shorts, flips = augmentation(self._seed, batch, g, self._hp.train_min_size_range,
                                 self._hp.flip)
    canvas = self.canvases[bucket]
    sizes = sizes_in_canvas(self.record_sizes[records], shorts, max_size=self._hp.max_size,
                            canvas=canvas)
    return BatchPlan(index=batch, bucket=bucket, canvas=canvas,
                     positions=batch * g + np.arange(g, dtype=np.int64), records=records,
                     sizes=sizes, flips=flips, valid=np.ones(g, bool))

  def plan(self, batch: int) -> BatchPlan:
    """Global batch `batch` (random access: recounts the earlier batches)."""
    bucket = self.bucket_of(batch)
    return self._plan(batch, bucket, int(self.batches_before(batch)[bucket]))

  def plans(self, start: int, bucket: int | None = None) -> Iterator[BatchPlan]:
    """Batches `start, start + 1, ...` (only those of `bucket` if given), forever."""
    counts = self.batches_before(start)
    batch = start
    while True:
      k = self.bucket_of(batch)
      if bucket is None or k == bucket:
        yield self._plan(batch, k, int(counts[k]))
      counts[k] += 1
      batch += 1


class EvalSchedule:
  """Every image once, grouped by canvas bucket (module docstring)."""

  def __init__(self, record_sizes: np.ndarray, hp: hparams.DatasetHParams, *,
               global_batch_size: int):
    """`record_sizes`: int [n, 2] original `(height, width)`, records in image-id order."""
    self.canvases = canvas_lib.canvases(hp)
    placed = [canvas_lib.place(h, w, min_size=hp.eval_min_size, max_size=hp.eval_max_size,
                               options=self.canvases)
              for h, w in np.asarray(record_sizes, np.int64).reshape(-1, 2)]
    buckets = np.asarray([k for k, _ in placed], np.int64)  # [n]
    sizes = np.asarray([size for _, size in placed], np.int32).reshape(-1, 2)  # [n, 2]
    g = global_batch_size
    self._plans = []
    for bucket in sorted(set(buckets.tolist())):
      members = np.flatnonzero(buckets == bucket)  # Ascending: image-id order.
      for first in range(0, len(members), g):
        real = members[first:first + g]
        records = np.concatenate([real, np.full(g - len(real), real[-1])])  # [G]
        index = len(self._plans)
        self._plans.append(BatchPlan(
            index=index, bucket=bucket, canvas=self.canvases[bucket],
            positions=index * g + np.arange(g, dtype=np.int64), records=records,
            sizes=sizes[records], flips=np.zeros(g, bool), valid=np.arange(g) < len(real)))

  def __len__(self) -> int:
    return len(self._plans)

  @property
  def buckets(self) -> list[int]:
    """The buckets that hold images, in the order their batches come."""
    return sorted({p.bucket for p in self._plans})

  def plan(self, batch: int) -> BatchPlan:
    return self._plans[batch]

  def plans(self, start: int = 0, bucket: int | None = None) -> Iterator[BatchPlan]:
    """Batches `start ..` (only those of `bucket` if given), then the end."""
    return (p for p in self._plans[start:] if bucket is None or p.bucket == bucket)


def augmentation_stream(seed: int, start: int, global_batch_size: int,
                        hp: hparams.DatasetHParams) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(shorter sides [G], flips [G]) of the global batches `start, start + 1, ...`, forever.

  For a source whose records' sizes are known only after decoding (TFDS): the random
  augmentation is still decided here; the size follows in the graph.
  """
  batch = start
  while True:
    yield augmentation(seed, batch, global_batch_size, hp.train_min_size_range, hp.flip)
    batch += 1
