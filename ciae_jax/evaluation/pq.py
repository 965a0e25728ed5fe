"""Panoptic quality of COCO panoptic files, numerically identical to panopticapi's pq_compute.

The protocol and the counting are in `pq_counts` (`PQAccumulator`, `ImageCounts`) and
`pq_runs`; this module reads the files (JSON + PNG folders, over worker processes), formats
the table and is the command line. Its public names include those of `pq_counts`, so
`from ciae_jax.evaluation import pq; pq.PQAccumulator` keeps working.

A PNG whose zlib checksum is wrong while every chunk CRC is right (only a file edited on
purpose) is read where Pillow raises, when kornia-rs decodes it (see below); pq_compute raises.

PNG decoding is most of the time (Pillow's Paeth reconstruction above all):
8-bit RGB files are decoded by kornia-rs (Rust, pinned in requirements.txt;
the same pixels as Pillow, tested) when it is installed, by Pillow otherwise
or when `$CIAE_PNG_DECODER=pillow` (see `panoptic_png.decode_rgb8_png`).

Command line (a drop-in for the COCO panoptic API):
  python -m ciae_jax.evaluation.pq --gt_json F --gt_folder D \
      --pred_json F --pred_folder D [--output RESULT.json] [--workers N]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from ciae_jax.evaluation.pq_counts import OFFSET  # noqa: F401  (public name, re-exported)
from ciae_jax.evaluation.pq_counts import ImageCounts  # noqa: F401  (public name, re-exported)
from ciae_jax.evaluation.pq_counts import PanopticFormatError
from ciae_jax.evaluation.pq_counts import PQAccumulator
from ciae_jax.evaluation.pq_counts import _categories_dict
from ciae_jax.evaluation.pq_runs import VOID  # noqa: F401  (public name, re-exported)
from ciae_jax.evaluation.pq_runs import _scratch
from ciae_jax.panoptic_png import decode_rgb8_png
from ciae_jax.panoptic_png import fast_png_decoder
from ciae_jax.panoptic_png import read_panoptic_png_pillow
from ciae_jax.panoptic_png import rgb_bytes_to_ids


def _png_ids(path: str, buffer_name: str, fast: bool = True
             ) -> tuple[np.ndarray, tuple[int, int]]:
  """Flat segment ids of a panoptic PNG, read as pq_compute reads them.

  8-bit RGB files (all COCO and exported ones) are decoded by kornia-rs when
  installed (same pixels as Pillow, `panoptic_png.decode_rgb8_png`), else by
  Pillow, and their packed bytes converted into a per-thread reused uint32
  buffer (valid until the next call with the same `buffer_name`); other
  modes go through `read_panoptic_png_pillow`, which rejects what pq_compute
  cannot read.

  Args:
    path: the PNG file.
    buffer_name: names the scratch buffer the ids go to.
    fast: False skips the kornia-rs attempt (it is known to be absent).

  Returns:
    [H*W] ids and (H, W).
  """
  if fast:
    with open(path, "rb") as f:
      rgb = decode_rgb8_png(f.read())  # [H, W, 3] or None
    if rgb is not None:
      height, width = rgb.shape[:2]
      ids = _scratch(buffer_name, height * width, np.uint32)  # [N]
      return rgb_bytes_to_ids(rgb, ids), (height, width)
  with Image.open(path) as image:
    width, height = image.size
    if image.mode == "RGB" and width * height:
      ids = _scratch(buffer_name, width * height, np.uint32)  # [N]
      return rgb_bytes_to_ids(image.tobytes(), ids), (height, width)
  ids = read_panoptic_png_pillow(path)  # [H, W]
  return ids.reshape(-1), ids.shape


def format_pq_table(result: Mapping[str, Any]) -> str:
  """panopticapi's table: PQ, SQ, RQ (percent) and N for All/Things/Stuff."""
  lines = ["{:10s}| {:>5s}  {:>5s}  {:>5s} {:>5s}".format(
      "", "PQ", "SQ", "RQ", "N"), "-" * (10 + 7 * 4)]
  for name in ("All", "Things", "Stuff"):
    row = result[name]
    lines.append("{:10s}| {:5.1f}  {:5.1f}  {:5.1f} {:5d}".format(
        name, 100 * row["pq"], 100 * row["sq"], 100 * row["rq"], row["n"]))
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# Files: COCO panoptic JSON + PNG folders, over worker processes.

_worker_state: dict[str, Any] = {}


def _init_worker(pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]],
                 categories: dict[int, Mapping[str, Any]], gt_folder: str,
                 pred_folder: str) -> None:
  """Pool initializer: the inputs, once per process (inherited, not pickled,
  under fork), so that tasks are just lists of image indices."""
  _worker_state.update(pairs=pairs, categories=categories, gt_folder=gt_folder,
                       pred_folder=pred_folder)


def _evaluate_indices(indices: Sequence[int]) -> tuple[Any, ...]:
  """Pool task: scores the worker's pairs at `indices`."""
  state = _worker_state
  return _evaluate_pairs([state["pairs"][i] for i in indices],
                         state["categories"], state["gt_folder"],
                         state["pred_folder"])


def _evaluate_pairs(pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]],
                    categories: dict[int, Mapping[str, Any]], gt_folder: str,
                    pred_folder: str) -> tuple[Any, ...]:
  """Reads and scores (gt, pred) annotations; returns the summed counts."""
  accumulator = PQAccumulator(categories)
  fast = fast_png_decoder() is not None
  for gt_ann, pred_ann in pairs:
    image_id = gt_ann["image_id"]
    gt_path = os.path.join(gt_folder, gt_ann["file_name"])
    pred_path = os.path.join(pred_folder, pred_ann["file_name"])
    gt_ids, gt_shape = _png_ids(gt_path, "gt_ids", fast)  # [N]
    pred_ids, pred_shape = _png_ids(pred_path, "pred_ids", fast)  # [N]
    if gt_shape != pred_shape:
      raise PanopticFormatError(
          f"In the image with ID {image_id} the ground truth {gt_path} "
          f"{gt_shape} and the prediction {pred_path} {pred_shape} "
          f"differ in size.")
    try:
      accumulator._add_flat(gt_ids, gt_ann["segments_info"], pred_ids,  # pylint: disable=protected-access
                            pred_ann["segments_info"], image_id)
    except PanopticFormatError as e:
      raise PanopticFormatError(f"{e} (prediction file {pred_path})") from None
  return (accumulator.iou, accumulator.tp, accumulator.fp, accumulator.fn,
          accumulator.num_images)


def load_json(source: str | os.PathLike[str] | Mapping[str, Any]
               ) -> Mapping[str, Any]:
  """A JSON file's content, or the dict itself."""
  if isinstance(source, Mapping):
    return source
  with open(source) as f:
    return json.load(f)


def _default_context() -> multiprocessing.context.BaseContext:
  """fork when safe (fast start); forkserver once JAX/TF threads exist."""
  if ("fork" in multiprocessing.get_all_start_methods()
      and not any(m in sys.modules for m in ("jax", "tensorflow", "torch"))):
    return multiprocessing.get_context("fork")
  return multiprocessing.get_context("forkserver" if "forkserver" in
                                     multiprocessing.get_all_start_methods()
                                     else "spawn")


def pq_compute_files(
    gt_json: str | os.PathLike[str] | Mapping[str, Any],
    gt_folder: str | os.PathLike[str] | None,
    pred_json: str | os.PathLike[str] | Mapping[str, Any],
    pred_folder: str | os.PathLike[str] | None,
    num_workers: int | None = None,
    mp_context: str | None = None,
) -> dict[str, Any]:
  """PQ of a COCO panoptic prediction (JSON + PNG folder), like pq_compute.

  Args:
    gt_json: ground-truth panoptic JSON path (or its loaded dict).
    gt_folder: ground-truth PNG folder; None: the JSON path without ".json".
    pred_json: predicted panoptic JSON path (or its loaded dict).
    pred_folder: predicted PNG folder; None: the JSON path without ".json".
    num_workers: processes; None: the CPUs this process may use; 1: inline.
    mp_context: multiprocessing start method ("fork", "forkserver",
      "spawn"); None: fork, or forkserver once JAX / TensorFlow are imported
      (forking a process that runs their threads can deadlock).

  Returns:
    pq_compute's result dict (see `PQAccumulator.result`).
  """
  gt = load_json(gt_json)
  pred = load_json(pred_json)
  gt_folder = _default_folder(gt_folder, gt_json, "gt_folder")
  pred_folder = _default_folder(pred_folder, pred_json, "pred_folder")
  for folder, what in ((gt_folder, "ground truth"), (pred_folder, "predicted")):
    if not os.path.isdir(folder):
      raise FileNotFoundError(
          f"Folder {folder} with {what} segmentations doesn't exist")
  categories = _categories_dict(gt["categories"])
  pred_by_image = {a["image_id"]: a for a in pred["annotations"]}
  pairs = []
  for gt_ann in gt["annotations"]:
    if gt_ann["image_id"] not in pred_by_image:
      raise PanopticFormatError(
          f"no prediction for the image with id: {gt_ann['image_id']} "
          f"(in {pred_json if not isinstance(pred_json, Mapping) else 'pred_json'})")
    pairs.append((gt_ann, pred_by_image[gt_ann["image_id"]]))

  if num_workers is None:
    num_workers = len(os.sched_getaffinity(0)) if hasattr(
        os, "sched_getaffinity") else (os.cpu_count() or 1)
  num_workers = max(1, min(num_workers, len(pairs)))
  accumulator = PQAccumulator(categories)
  fast_png_decoder()  # imported once here, inherited by forked workers
  if num_workers == 1:
    chunk_counts = [_evaluate_pairs(pairs, categories, gt_folder, pred_folder)]
  else:
    # A few interleaved chunks per worker balance the load.
    num_chunks = min(len(pairs), 4 * num_workers)
    chunks = [list(range(i, len(pairs), num_chunks)) for i in range(num_chunks)]
    context = (multiprocessing.get_context(mp_context) if mp_context
               else _default_context())
    with context.Pool(num_workers, _init_worker,
                      (pairs, categories, gt_folder, pred_folder)) as pool:
      chunk_counts = pool.map(_evaluate_indices, chunks, chunksize=1)
      pool.close()
      pool.join()
  for iou, tp, fp, fn, num_images in chunk_counts:
    accumulator.iou += iou
    accumulator.tp += tp
    accumulator.fp += fp
    accumulator.fn += fn
    accumulator.num_images += num_images
  return accumulator.result()


def _default_folder(folder: str | os.PathLike[str] | None,
                    json_source: Any, flag: str) -> str:
  """pq_compute's default: the JSON path without its ".json"."""
  if folder is not None:
    return os.fspath(folder)
  if isinstance(json_source, Mapping):
    raise ValueError(f"{flag} is required when the JSON is given as a dict")
  return os.fspath(json_source).replace(".json", "")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """CLI: prints the PQ table and writes the result dict as JSON."""
  parser = argparse.ArgumentParser(
      description="Panoptic quality, identical to panopticapi's pq_compute.")
  parser.add_argument("--gt_json", required=True,
                      help="COCO panoptic ground-truth JSON")
  parser.add_argument("--gt_folder", default=None,
                      help="ground-truth PNG folder (default: gt_json minus .json)")
  parser.add_argument("--pred_json", required=True,
                      help="COCO panoptic prediction JSON")
  parser.add_argument("--pred_folder", default=None,
                      help="predicted PNG folder (default: pred_json minus .json)")
  parser.add_argument("--output", default=None,
                      help="write the result dict to this JSON file")
  parser.add_argument("--workers", type=int, default=None,
                      help="worker processes (default: all usable CPUs)")
  args = parser.parse_args(argv)
  start = time.time()
  result = pq_compute_files(args.gt_json, args.gt_folder, args.pred_json,
                            args.pred_folder, num_workers=args.workers)
  print(format_pq_table(result))
  print(f"Time elapsed: {time.time() - start:0.2f} seconds")
  if args.output:
    parent = os.path.dirname(args.output)
    if parent:
      os.makedirs(parent, exist_ok=True)
    with open(args.output, "w") as f:
      json.dump(result, f, indent=1)
  return result


def cli(argv: Sequence[str] | None = None) -> None:
  """`python -m ciae_jax.evaluation.pq` and the console script `ciae-pq` (pyproject.toml).

  A bad input exits with status 1 and one line naming it (no traceback); `main` returns the
  result dict for callers in Python, which a console script would take for an exit status.
  """
  try:
    main(argv)
  except (PanopticFormatError, FileNotFoundError) as error:
    sys.exit(f"pq: error: {error}")


if __name__ == "__main__":
  cli()
