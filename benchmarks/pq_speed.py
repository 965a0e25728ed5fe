"""Speed of PQ evaluation: panopticapi's pq_compute vs hotcoco vs ours.

Writes ~300 synthetic 512 x 512 images in COCO panoptic layout (ground truth:
Voronoi cells with random categories, VOID borders and crowd regions, saved by
PIL like COCO's PNGs; the prediction: the same scene shifted, with cells
dropped, merged, split, relabelled and extra blobs, saved by our exporter or,
with --pred_writer pil, by PIL) to a temporary folder, checks that the
evaluators agree, then times each on the same files and cores: panopticapi,
hotcoco, ours (PNGs read by kornia-rs when installed) and, unless
--no_pillow, ours with `$CIAE_PNG_DECODER=pillow` (the Pillow fallback).

  python benchmarks/pq_speed.py [--images 300] [--size 512] [--repeats 5]
      [--pred_writer ours|pil] [--data_dir DIR] [--no_pillow]

Each timing is wall-clock of one full call (JSON load, PNG decode, matching,
all worker processes); the evaluators take turns within each repeat, so a
repeat's ratios are measured under the same load. Reported: the median wall
time, the ratio of medians and the median of the per-repeat ratios.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import io
import json
import os
import resource
import statistics
import tempfile
import time
from typing import Any, Callable

import numpy as np
from PIL import Image

from ciae_jax.evaluation import pq as ours  # noqa: E402
from ciae_jax.panoptic_png import PNG_DECODER_ENV  # noqa: E402
from ciae_jax.panoptic_png import encode_panoptic_png  # noqa: E402
from ciae_jax.panoptic_png import fast_png_decoder  # noqa: E402
from ciae_jax.panoptic_png import id_map_to_rgb  # noqa: E402

NUM_THING_CATEGORIES = 80
NUM_STUFF_CATEGORIES = 53


def make_categories() -> list[dict[str, Any]]:
  """COCO-like categories: ids 1..80 things, 92.. stuff."""
  things = [{"id": i + 1, "name": f"thing{i}", "isthing": 1}
            for i in range(NUM_THING_CATEGORIES)]
  stuff = [{"id": 92 + i, "name": f"stuff{i}", "isthing": 0}
           for i in range(NUM_STUFF_CATEGORIES)]
  return things + stuff


def voronoi_cells(rng: np.random.Generator, size: int,
                  num_cells: int) -> np.ndarray:
  """[size, size] cell index of a random Voronoi partition (at half scale)."""
  half = size // 2
  seeds = rng.uniform(0, half, (num_cells, 2))  # [K, 2]
  yy, xx = np.mgrid[0:half, 0:half].astype(np.float32)  # [h, w]
  best = np.full((half, half), np.inf, np.float32)  # [h, w]
  cells = np.zeros((half, half), np.int32)  # [h, w]
  for k, (sy, sx) in enumerate(seeds):
    dist = (yy - sy) ** 2 + (xx - sx) ** 2  # [h, w]
    closer = dist < best
    best = np.where(closer, dist, best)
    cells = np.where(closer, k, cells)
  return np.kron(cells, np.ones((2, 2), np.int32))  # [size, size]


def make_pair(rng: np.random.Generator, size: int, categories: list[dict]
              ) -> tuple[np.ndarray, list[dict], np.ndarray, list[dict]]:
  """One ground-truth / prediction pair of id maps and segments."""
  num_cells = int(rng.integers(40, 90))
  cells = voronoi_cells(rng, size, num_cells)  # [H, W]
  cat_ids = np.array([c["id"] for c in categories])
  cell_cat = rng.choice(cat_ids, num_cells)  # [K]
  cell_ids = rng.choice(256**3 - 1, num_cells, replace=False) + 1  # [K]
  cell_crowd = (cell_cat <= NUM_THING_CATEGORIES) & (rng.random(num_cells) < 0.05)
  gt = cell_ids[cells]  # [H, W]
  # VOID borders (as COCO's unlabeled outlines) and one VOID cell.
  border = np.zeros_like(cells, bool)
  border[:, 1:] |= cells[:, 1:] != cells[:, :-1]
  border[1:, :] |= cells[1:, :] != cells[:-1, :]
  gt = np.where(border, 0, gt)
  gt[cells == rng.integers(num_cells)] = 0
  areas = np.bincount(np.where(gt > 0, cells, num_cells).reshape(-1),
                      minlength=num_cells + 1)[:num_cells]  # [K]
  gt_segments = [{"id": int(cell_ids[k]), "category_id": int(cell_cat[k]),
                  "iscrowd": int(cell_crowd[k]), "area": int(areas[k])}
                 for k in range(num_cells) if areas[k]]

  # Prediction: shifted cells, some dropped / merged / split / relabelled.
  dy, dx = rng.integers(-6, 7, 2)
  pred_cells = np.roll(cells, (dy, dx), axis=(0, 1))  # [H, W]
  pred_cat = cell_cat.copy()
  relabel = rng.random(num_cells) < 0.1
  pred_cat[relabel] = rng.choice(cat_ids, relabel.sum())
  merge_into = np.arange(num_cells)
  merged = rng.random(num_cells) < 0.1
  merge_into[merged] = rng.integers(num_cells, size=merged.sum())
  pred_cells = merge_into[pred_cells]
  split = rng.random(num_cells) < 0.1
  yy, xx = np.mgrid[0:size, 0:size]
  second_half = split[pred_cells] & ((xx + yy) % 64 < 32)
  pred_cells = np.where(second_half, pred_cells + num_cells, pred_cells)
  pred_ids_of_cell = 1 + rng.choice(256**3 - 1, 2 * num_cells + 8,
                                replace=False)
  pred = pred_ids_of_cell[pred_cells]  # [H, W]
  dropped = rng.random(2 * num_cells) < 0.08
  pred[dropped[pred_cells]] = 0
  for extra in range(int(rng.integers(2, 8))):
    y0, x0 = rng.integers(0, size - 40, 2)
    h, w = rng.integers(8, 40, 2)
    pred[y0:y0 + h, x0:x0 + w] = pred_ids_of_cell[2 * num_cells + extra]
  pred_cat_all = np.concatenate(
      [pred_cat, pred_cat, rng.choice(cat_ids, 8)])  # [2K + 8]
  cat_of_id = dict(zip(pred_ids_of_cell.tolist(), pred_cat_all.tolist()))
  pred_segments = [{"id": i, "category_id": int(cat_of_id[i])}
                   for i in np.unique(pred).tolist() if i != 0]
  return gt, gt_segments, pred, pred_segments


def write_dataset(root: str, num_images: int, size: int, seed: int = 0,
                  pred_writer: str = "ours") -> dict[str, str]:
  """Writes gt and prediction JSON + PNG folders; returns their paths.

  Ground-truth PNGs are saved by PIL, as COCO's are (adaptive filters);
  predictions by our exporter (`pred_writer="ours"`, filter type 0) or by
  PIL (`"pil"`).
  """
  rng = np.random.default_rng(seed)
  categories = make_categories()
  paths = {"gt_json": os.path.join(root, "gt.json"),
           "gt_folder": os.path.join(root, "gt"),
           "pred_json": os.path.join(root, "pred.json"),
           "pred_folder": os.path.join(root, "pred")}
  os.makedirs(paths["gt_folder"])
  os.makedirs(paths["pred_folder"])
  images, gt_anns, pred_anns = [], [], []
  for image_id in range(1, num_images + 1):
    gt, gt_segments, pred, pred_segments = make_pair(rng, size, categories)
    name = f"{image_id:012d}.png"
    Image.fromarray(id_map_to_rgb(gt)).save(os.path.join(paths["gt_folder"], name))
    if pred_writer == "ours":
      with open(os.path.join(paths["pred_folder"], name), "wb") as f:
        f.write(encode_panoptic_png(pred))
    else:
      Image.fromarray(id_map_to_rgb(pred)).save(
          os.path.join(paths["pred_folder"], name))
    images.append({"id": image_id, "file_name": name.replace(".png", ".jpg"),
                   "height": size, "width": size})
    gt_anns.append({"image_id": image_id, "file_name": name,
                    "segments_info": gt_segments})
    pred_anns.append({"image_id": image_id, "file_name": name,
                      "segments_info": pred_segments})
  with open(paths["gt_json"], "w") as f:
    json.dump({"images": images, "annotations": gt_anns,
               "categories": categories}, f)
  with open(paths["pred_json"], "w") as f:
    json.dump({"images": images, "annotations": pred_anns,
               "categories": categories}, f)
  return paths


def cpu_seconds() -> float:
  """User + system CPU of this process and its reaped children."""
  own = resource.getrusage(resource.RUSAGE_SELF)
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_call(fn: Callable[[], Any]) -> tuple[float, float, Any]:
  """Wall and CPU seconds of one call (stdout silenced), and its result.

  CPU is this process's plus its reaped children's: pq_compute never closes
  its process pool, so a garbage collection after the call (outside the wall
  time) finalises the pool and reaps its workers before CPU is read.
  """
  cpu_start, start = cpu_seconds(), time.perf_counter()
  with contextlib.redirect_stdout(io.StringIO()):
    result = fn()
  wall = time.perf_counter() - start
  gc.collect()
  return wall, cpu_seconds() - cpu_start, result


@contextlib.contextmanager
def pillow_decoder():
  """Our evaluator with `$CIAE_PNG_DECODER=pillow` (workers inherit it)."""
  previous = os.environ.get(PNG_DECODER_ENV)
  os.environ[PNG_DECODER_ENV] = "pillow"
  try:
    yield
  finally:
    if previous is None:
      del os.environ[PNG_DECODER_ENV]
    else:
      os.environ[PNG_DECODER_ENV] = previous


def versions() -> str:
  """Versions of the libraries timed."""
  out = []
  for dist in ("panopticapi-lite", "hotcoco", "kornia-rs", "pillow", "numpy"):
    try:
      out.append(f"{dist} {importlib.metadata.version(dist)}")
    except importlib.metadata.PackageNotFoundError:
      out.append(f"{dist} absent")
  return ", ".join(out)


def main() -> None:
  """Generates the data, checks agreement, times the three evaluators."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=300)
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--workers", type=int, default=None,
                      help="our worker processes (default: usable CPUs)")
  parser.add_argument("--pred_writer", choices=("ours", "pil"), default="ours",
                      help="who writes the prediction PNGs: our exporter "
                      "(filter type 0) or PIL (adaptive filters, like COCO gt)")
  parser.add_argument("--data_dir", default=None,
                      help="keep the generated data here and reuse it when "
                      "present (default: a temporary folder)")
  parser.add_argument("--no_pillow", action="store_true",
                      help="skip timing ours with the Pillow PNG reader")
  args = parser.parse_args()

  import hotcoco.panoptic
  from panopticapi.evaluation import pq_compute as panopticapi_pq

  cpus = len(os.sched_getaffinity(0))
  with contextlib.ExitStack() as stack:
    root = args.data_dir or stack.enter_context(tempfile.TemporaryDirectory())
    p = {"gt_json": os.path.join(root, "gt.json"),
         "gt_folder": os.path.join(root, "gt"),
         "pred_json": os.path.join(root, "pred.json"),
         "pred_folder": os.path.join(root, "pred")}
    if not os.path.exists(p["pred_json"]):
      os.makedirs(root, exist_ok=True)
      start = time.perf_counter()
      p = write_dataset(root, args.images, args.size,
                        pred_writer=args.pred_writer)
      print(f"wrote {args.images} image pairs of {args.size}x{args.size} in "
            f"{time.perf_counter() - start:.1f} s")
    with open(p["gt_json"]) as f:
      num_images = len(json.load(f)["annotations"])
    print(f"{num_images} images; {cpus} usable CPUs; {os.cpu_count()} CPUs "
          f"seen by multiprocessing.cpu_count (pq_compute's pool size)")
    print(f"versions: {versions()}; our PNG reader: "
          f"{'kornia-rs' if fast_png_decoder() else 'Pillow'}")

    def run_panopticapi():
      return panopticapi_pq(p["gt_json"], p["pred_json"], p["gt_folder"],
                            p["pred_folder"])

    def run_hotcoco():
      return hotcoco.panoptic.pq_compute(p["gt_json"], p["pred_json"],
                                         p["gt_folder"], p["pred_folder"])

    def run_ours():
      return ours.pq_compute_files(p["gt_json"], p["gt_folder"], p["pred_json"],
                                   p["pred_folder"], num_workers=args.workers)

    def run_ours_pillow():
      with pillow_decoder():
        return run_ours()

    evaluators = [("panopticapi", run_panopticapi), ("hotcoco", run_hotcoco),
                  ("ours", run_ours)]
    if not args.no_pillow:
      evaluators.append(("ours_pillow", run_ours_pillow))
    results = {}
    # Interleave the repeats so that load from other users hits all alike.
    wall = {name: [] for name, _ in evaluators}
    cpu = {name: [] for name in wall}
    for _ in range(args.repeats):
      for name, fn in evaluators:
        seconds, cpu_used, results[name] = time_call(fn)
        wall[name].append(seconds)
        cpu[name].append(cpu_used)
    timings = {name: statistics.median(values) for name, values in wall.items()}

    reference = results["panopticapi"]
    for name in wall:
      if name == "panopticapi":
        continue
      diff = max(abs(results[name][group][k] - reference[group][k])
                 for group in ("All", "Things", "Stuff")
                 for k in ("pq", "sq", "rq"))
      print(f"max |{name} - panopticapi| over All/Things/Stuff pq/sq/rq: "
            f"{diff:.2e}")
    print(ours.format_pq_table(results["ours"]))
    cpu_medians = {name: statistics.median(v) for name, v in cpu.items()}
    for name, seconds in timings.items():
      runs = ", ".join(f"{s:.2f}" for s in wall[name])
      print(f"{name:12s} wall median {seconds:5.2f} s (runs: {runs}); "
            f"{1000 * seconds / num_images:5.2f} ms/image; CPU median "
            f"{cpu_medians[name]:5.2f} s = "
            f"{1000 * cpu_medians[name] / num_images:5.2f} ms/image")

    def paired(numerator: str, denominator: str) -> float:
      """Median over repeats of the ratio of two evaluators' wall times."""
      return statistics.median(
          a / b for a, b in zip(wall[numerator], wall[denominator]))

    for name in [n for n in ("ours", "ours_pillow") if n in wall]:
      speedup = timings["panopticapi"] / timings[name]
      to_hotcoco = timings[name] / timings["hotcoco"]
      print(f"{name}: wall speed-up over panopticapi {speedup:.1f}x (paired "
            f"{paired('panopticapi', name):.1f}x, best runs "
            f"{min(wall['panopticapi']) / min(wall[name]):.1f}x); "
            f"{name} / hotcoco {to_hotcoco:.2f} (paired "
            f"{paired(name, 'hotcoco'):.2f}, best runs "
            f"{min(wall[name]) / min(wall['hotcoco']):.2f}); CPU "
            f"{cpu_medians['panopticapi'] / cpu_medians[name]:.1f}x, "
            f"{cpu_medians[name] / cpu_medians['hotcoco']:.2f}")
    met = (timings["panopticapi"] / timings["ours"] >= 5
           and timings["ours"] / timings["hotcoco"] <= 3)
    print(f"targets (ours >= 5x panopticapi, ours <= 3x hotcoco, medians): "
          f"{'met' if met else 'MISSED'}")
    print(f"load average after the runs: {os.getloadavg()}")


if __name__ == "__main__":
  main()
