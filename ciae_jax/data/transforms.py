"""TF transforms shared by every source: id -> row, resize, flip, boxes.

The sources (COCO files, TFDS) decode an image and its panoptic PNG into a
"raw example"; `transform_example` turns it into the example dict of
docs/interfaces.md. TensorFlow is imported lazily (inside functions), so that
importing this module costs nothing where TF is absent.

The pipeline traces these functions without AutoGraph (seconds saved at every start):
branch on tensors with `tf.cond` / `tf.where`, never with a Python `if` (which fails
loudly at trace time: "Using a symbolic `tf.Tensor` as a Python `bool` is not allowed").

Raw example (per image, unbatched):
  image        uint8  [h, w, 3]
  pan          uint8  [h, w, 3]   panoptic PNG, id = R + 256 G + 256^2 B
  seg_ids      int32  [n]         segment ids, JSON order
  seg_class    int32  [n]         contiguous classes
  seg_is_thing bool   [n]
  seg_is_crowd bool   [n]
  seg_area     float32 [n]        JSON area (ranks segments for truncation)
  image_id     int32  []
  expect_size  int32  [2]         (h, w) from the annotations, or (-1, -1)
  where        string []          files or TFDS key, for error messages
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from absl import logging

if TYPE_CHECKING:  # Annotations only: no TF import at run time.
  import tensorflow as tf  # pylint: disable=g-bad-import-order

# ImageNet statistics in [0, 1] units (the backbone's pre-training).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Errors raised inside the graph carry this tag; build_input turns them into
# ValueError messages.
ERROR_TAG = "ciae_jax input error:"


def import_tf() -> Any:
  """TensorFlow, imported on first use, with every GPU hidden from it.

  The input pipeline must never take an accelerator (or its memory) from JAX; hiding the GPUs
  again is a no-op, so every TF user in `data/` calls this.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF was initialised with its GPUs before the input pipeline.
    logging.warning("TensorFlow was initialised before the input pipeline; "
                    "it may hold GPU memory")
  return tf


def check(cond: tf.Tensor, raw: dict[str, Any],
          message: tf.Tensor | str) -> tf.Operation:
  """An assert op whose error names the image id and the files (or key)."""
  tf = import_tf()
  text = tf.strings.join(["image id ", tf.strings.as_string(raw["image_id"]),
                          " (", raw["where"], "): ", message])
  return tf.debugging.Assert(cond, [ERROR_TAG, text])


def decode_rgb(contents: tf.Tensor) -> tf.Tensor:
  """Encoded image -> uint8 RGB [h, w, 3]; JPEG with the accurate DCT.

  The accurate integer DCT decodes exactly as PIL/libjpeg do by default (the
  demo and evaluation read images with PIL) and costs no more time.
  """
  tf = import_tf()
  return tf.cond(
      tf.io.is_jpeg(contents),
      lambda: tf.io.decode_jpeg(contents, channels=3,
                                dct_method="INTEGER_ACCURATE"),
      lambda: tf.io.decode_image(contents, channels=3,
                                 expand_animations=False))


def truncation_rows(seg_area: tf.Tensor, max_segments: int) -> tf.Tensor:
  """Output row (1-based, 0 = dropped) of each JSON segment.

  With more than `max_segments` segments, the largest ones (by JSON area) are
  kept, in JSON order; the others become void.
  """
  tf = import_tf()
  n = tf.shape(seg_area)[0]
  k = tf.minimum(n, max_segments)
  kept = tf.sort(tf.math.top_k(seg_area, k=k).indices)  # [k]
  keep_mask = tf.scatter_nd(kept[:, None], tf.ones([k], tf.int32), [n])  # [n]
  return tf.cumsum(keep_mask) * keep_mask  # [n]


def ids_to_rows(raw: dict[str, Any], seg_rows: tf.Tensor
                ) -> tuple[tf.Tensor, list[tf.Operation]]:
  """Panoptic PNG -> row map (0 void, k = row k-1), with both-way checks.

  Returns:
    (row_map int32 [h, w], list of assert ops).
  """
  tf = import_tf()
  pan = tf.cast(raw["pan"], tf.int32)  # [h, w, 3]
  ids = pan[..., 0] + 256 * pan[..., 1] + 65536 * pan[..., 2]  # [h, w]
  seg_ids = tf.cast(raw["seg_ids"], tf.int32)  # [n]
  n = tf.shape(seg_ids)[0]
  order = tf.argsort(seg_ids)  # [n]
  # A sentinel larger than any 24-bit id keeps the tables non-empty.
  sorted_ids = tf.concat([tf.gather(seg_ids, order), [2**30]], 0)  # [n+1]
  sorted_rows = tf.concat([tf.gather(seg_rows, order), [0]], 0)  # [n+1]
  flat = tf.reshape(ids, [-1])  # [h*w]
  pos = tf.searchsorted(sorted_ids, flat, side="left")  # [h*w]
  found = tf.equal(tf.gather(sorted_ids, pos), flat)  # [h*w]
  unknown = tf.logical_and(tf.not_equal(flat, 0), tf.logical_not(found))
  first_unknown = tf.reduce_max(tf.where(unknown, flat, -1))
  checks = [check(tf.logical_not(tf.reduce_any(unknown)), raw,
                  tf.strings.format("segment id {} is in the PNG but not in "
                                    "the JSON", first_unknown))]
  counts = tf.math.bincount(tf.where(found, pos, n), minlength=n + 1,
                            maxlength=n + 1)  # [n+1]
  missing = tf.equal(counts[:n], 0)  # [n]
  first_missing = tf.reduce_max(tf.where(missing, sorted_ids[:n], -1))
  checks.append(check(tf.logical_not(tf.reduce_any(missing)), raw,
                      tf.strings.format("segment id {} is in the JSON but not "
                                        "in the PNG", first_missing)))
  row_map = tf.reshape(tf.where(found, tf.gather(sorted_rows, pos), 0),
                       tf.shape(ids))  # [h, w]
  return row_map, checks


def nearest_indices(in_size: tf.Tensor, out_size: tf.Tensor) -> tf.Tensor:
  """Source index of each output pixel, nearest neighbour, half-pixel centres.

  `floor((i + 0.5) * in / out)` in integers, `((2i + 1) in) // (2 out)`: exact, also where a
  centre falls on a pixel border (in float64, `(i + 0.5) * (in / out)` can land just below).
  """
  tf = import_tf()
  in_size = tf.cast(in_size, tf.int64)
  out_size = tf.cast(out_size, tf.int64)
  src = (2 * tf.range(out_size) + 1) * in_size // (2 * out_size)  # [out_size]
  return tf.cast(tf.minimum(src, in_size - 1), tf.int32)  # [out_size]


def gather_2d(values: tf.Tensor, rows_src: tf.Tensor,
              cols_src: tf.Tensor) -> tf.Tensor:
  """`values[rows_src][:, cols_src]` (nearest resize and flip by indices)."""
  tf = import_tf()
  # Row gathers copy whole rows; gathering columns as rows of the transpose
  # is several times faster than tf.gather(axis=1).
  picked = tf.gather(values, rows_src, axis=0)  # [new_h, w]
  picked = tf.gather(tf.transpose(picked), cols_src, axis=0)  # [new_w, new_h]
  return tf.transpose(picked)  # [new_h, new_w]


def _first_last(presence: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """First and last True along axis 1 of a bool [K, N] (0, -1 if none)."""
  tf = import_tf()
  n = tf.shape(presence)[1]
  as_int = tf.cast(presence, tf.int32)  # [K, N]
  first = tf.argmax(as_int, axis=1, output_type=tf.int32)  # [K]
  last = n - 1 - tf.argmax(tf.reverse(as_int, [1]), axis=1,
                           output_type=tf.int32)  # [K]
  return first, last


def _presence(values: tf.Tensor, num_rows: int) -> tf.Tensor:
  """presence[k - 1, j]: value k occurs in column j of `values` [M, L] -> [S, L]."""
  tf = import_tf()
  length = tf.shape(values)[1]
  flat = tf.reshape(tf.cast(values, tf.int32) * length + tf.range(length),
                    [-1])  # [M*L]
  counts = tf.math.bincount(flat, minlength=(num_rows + 1) * length,
                            maxlength=(num_rows + 1) * length)
  return tf.reshape(counts > 0, [num_rows + 1, length])[1:]  # [S, L]


def boxes_after_resize(row_map: tf.Tensor, rows_src: tf.Tensor,
                       cols_src: tf.Tensor, num_rows: int
                       ) -> tuple[tf.Tensor, tf.Tensor]:
  """Boxes of the rows of `gather_2d(row_map, rows_src, cols_src)`.

  Exact without materialising the output map: output row `i` holds segment
  `k` iff source row `rows_src[i]` holds `k` in one of the source columns
  that are used (`cols_src`), and likewise for columns. The box is
  `x0, y0, x1 + 1, y1 + 1` over the output pixels of the segment, so flips
  (reversed `cols_src`) and resizes cannot desynchronise boxes and pixels.

  Returns:
    (box float32 [S, 4], present bool [S]).
  """
  tf = import_tf()
  used_rows = tf.unique(rows_src).y  # [u_h]
  used_cols = tf.unique(cols_src).y  # [u_w]
  # Presence per source line, over the source pixels the resize uses.
  in_row = _presence(tf.gather(tf.transpose(row_map), used_cols, axis=0),
                     num_rows)  # [S, h]
  in_col = _presence(tf.gather(row_map, used_rows, axis=0),
                     num_rows)  # [S, w]
  in_out_row = tf.gather(in_row, rows_src, axis=1)  # [S, new_h]
  in_out_col = tf.gather(in_col, cols_src, axis=1)  # [S, new_w]
  y0, y1 = _first_last(in_out_row)
  x0, x1 = _first_last(in_out_col)
  present = tf.reduce_any(in_out_row, axis=1)  # [S]
  box = tf.cast(tf.stack([x0, y0, x1 + 1, y1 + 1], -1), tf.float32)  # [S, 4]
  return tf.where(present[:, None], box, 0.0), present


def normalize_image(image: tf.Tensor) -> tf.Tensor:
  """uint8 RGB -> `(x / 255 - mean) / std` float32, channels last."""
  tf = import_tf()
  scale = tf.linalg.diag(tf.constant([1.0 / (255.0 * s)
                                      for s in IMAGENET_STD]))  # [3, 3]
  offset = tf.constant([m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
  pixels = tf.reshape(tf.cast(image, tf.float32), [-1, 3])  # [h*w, 3]
  # A [3, 3] diagonal matmul + bias_add beats broadcasting over channels.
  pixels = tf.nn.bias_add(tf.matmul(pixels, scale), -offset)  # [h*w, 3]
  return tf.reshape(pixels, tf.shape(image))  # [h, w, 3]


def _per_row(values: tf.Tensor, seg_rows: tf.Tensor, num_rows: int,
             dtype: tf.DType) -> tf.Tensor:
  """Scatters per-JSON-segment values into the padded rows [S]."""
  tf = import_tf()
  kept = seg_rows > 0  # [n]
  idx = tf.boolean_mask(seg_rows - 1, kept)  # [k]
  vals = tf.boolean_mask(tf.cast(values, dtype), kept)  # [k]
  return tf.scatter_nd(idx[:, None], vals, [num_rows])  # [S]


def _size_checks(raw: dict[str, Any]) -> list[tf.Operation]:
  """The image, its PNG and the annotations agree on the size."""
  tf = import_tf()
  hw = tf.shape(raw["image"])[:2]  # [2]
  pan_hw = tf.shape(raw["pan"])[:2]  # [2]
  expect = tf.cast(raw["expect_size"], tf.int32)  # [2]
  return [
      check(tf.reduce_all(tf.equal(pan_hw, hw)), raw,
            tf.strings.format("PNG size {} differs from image size {}", (pan_hw, hw))),
      check(tf.logical_or(expect[0] < 0, tf.reduce_all(tf.equal(expect, hw))), raw,
            tf.strings.format("image size {} differs from the JSON's {}", (hw, expect))),
  ]


def transform_example(raw: dict[str, Any], *, size: tf.Tensor, flip: tf.Tensor,
                      max_segments: int) -> dict[str, Any]:
  """Raw decoded example -> the example dict of docs/interfaces.md, unpadded.

  A pure function of (raw, size, flip): the size and the flip were decided on the host
  (`data/schedule.py`: `canvas.resized_shape`, then `canvas.fit_to_canvas`), and padding to
  the batch's canvas is left to `padded_batch` (one copy less). Image bilinear (half-pixel
  centres), segment map nearest neighbour; boxes are recomputed from the transformed map;
  segments whose pixels vanish get `seg_valid=False`.

  Args:
    raw: the raw example (module docstring).
    size: int32 [2], the resized `(h, w)`.
    flip: bool [], flip horizontally (after the resize, exactly).
    max_segments: S, the number of segment rows.

  Returns:
    The example dict (without `example_valid`); `image` [h, w, 3], `segment_map` [h, w].
  """
  tf = import_tf()
  image = raw["image"]  # [h, w, 3]
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  new_h, new_w = tf.unstack(tf.cast(size, tf.int32))
  do_flip = tf.cast(flip, tf.bool)
  seg_rows = truncation_rows(tf.cast(raw["seg_area"], tf.float32), max_segments)  # [n]
  row_map, id_checks = ids_to_rows(raw, seg_rows)  # [h, w]
  if max_segments < 256:  # Gathers move 4x fewer bytes.
    row_map = tf.cast(row_map, tf.uint8)

  with tf.control_dependencies(_size_checks(raw) + id_checks):
    rows_src = nearest_indices(h, new_h)  # [new_h]
    cols_src = nearest_indices(w, new_w)  # [new_w]
  # Flips by reversed indices: exact for the map, free, after the resize.
  cols_src = tf.cond(do_flip, lambda: tf.reverse(cols_src, [0]), lambda: cols_src)  # [new_w]
  seg_map = tf.cast(gather_2d(row_map, rows_src, cols_src), tf.int32)  # [new_h, new_w]
  box, present = boxes_after_resize(row_map, rows_src, cols_src, max_segments)  # [S, 4], [S]

  # The image is flipped before the (mirror-symmetric) bilinear resize and
  # normalised at the source size: both are cheaper there.
  image = tf.cond(do_flip, lambda: tf.reverse(image, [1]), lambda: image)
  resized = tf.image.resize(normalize_image(image), tf.stack([new_h, new_w]),
                            method="bilinear")  # [new_h, new_w, 3]
  seg_class = _per_row(raw["seg_class"], seg_rows, max_segments, tf.int32)  # [S]
  is_thing = _per_row(raw["seg_is_thing"], seg_rows, max_segments, tf.int32)  # [S]
  is_crowd = _per_row(raw["seg_is_crowd"], seg_rows, max_segments, tf.int32)  # [S]
  return {
      "image": resized,
      "segment_map": seg_map,
      "seg_class": tf.where(present, seg_class, 0),
      "seg_is_thing": tf.logical_and(present, is_thing > 0),
      "seg_is_crowd": tf.logical_and(present, is_crowd > 0),
      "seg_box": box,
      "seg_valid": present,
      "image_id": tf.cast(raw["image_id"], tf.int32),
      "orig_size": tf.stack([h, w]),
      "image_size": tf.stack([new_h, new_w]),
  }


def blank_like(example: dict[str, Any]) -> dict[str, Any]:
  """A padding row: zeros everywhere, image_id -1 (with example_valid False)."""
  tf = import_tf()
  out = {k: tf.zeros_like(v) for k, v in example.items()}
  out["image_id"] = tf.constant(-1, tf.int32)
  return out
