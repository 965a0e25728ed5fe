"""Training throughput of the input pipeline at COCO size, per CPU core; padding per canvas.

Replicates the two real COCO sample images into a temporary COCO-layout
dataset, then times `build_tf_dataset(train=True)` with the paper's training
transforms (shorter side jittered in [640, 800], longer side <= 1333, flips,
each batch padded to its canvas: by default the derived 800 x 1344 / 1344 x 800,
`--canvas_sizes` to change) with 1 and 2 tf.data threads (intra-op parallelism 1),
and prints the median images/s over repeats, per thread, and per CPU-second
of the process (all threads; robust when other jobs share the cores).

  python benchmarks/input_pipeline.py --root SAMPLE [--threads 1,2] [--repeats 5]

SAMPLE is a COCO panoptic root holding val2017 (the two-image COCO sample the tests use);
`--root` defaults to $CIAE_COCO_SAMPLE.

`--padding` prints instead (no TF, no decoding: the host plan of `data/schedule.py`, which the
tests check against the graph's output) the padded pixels per image, canvas area / resized
area, mean and max, for evaluation (every image once) and training (the rows of the first
`--padding_batches` batches) over the COCO sample (`--root`) at the paper's sizes (and with the
jitter of `configs/coco_r50.py:long`) and over the synthetic main job's data
(`configs/synthetic.py`, generated under data/synthetic if missing):

  python benchmarks/input_pipeline.py --root SAMPLE --padding
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_ENV = "CIAE_COCO_SAMPLE"  # The default of --root (the tests' variable too).


def load_config(name: str, arg: str | None = None) -> Any:
  """`configs/<name>.py:get_config(arg)`, read by path: configs/ is not an installed package."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      f"configs_{name}", os.path.join(REPO_ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def make_dataset(sample_root: str, out_root: str, num_images: int) -> None:
  """Copies the sample images `num_images` times over, as split 'bench'."""
  with open(os.path.join(sample_root, "annotations",
                         "panoptic_val2017.json")) as f:
    data = json.load(f)
  os.makedirs(os.path.join(out_root, "bench"))
  os.makedirs(os.path.join(out_root, "annotations", "panoptic_bench"))
  images, annotations = [], []
  anns = {a["image_id"]: a for a in data["annotations"]}
  for i in range(num_images):
    im = data["images"][i % len(data["images"])]
    ann = anns[im["id"]]
    stem = f"{i + 1:012d}"
    shutil.copy(os.path.join(sample_root, "val2017", im["file_name"]),
                os.path.join(out_root, "bench", stem + ".jpg"))
    shutil.copy(os.path.join(sample_root, "annotations", "panoptic_val2017",
                             ann["file_name"]),
                os.path.join(out_root, "annotations", "panoptic_bench",
                             stem + ".png"))
    images.append(dict(im, id=i + 1, file_name=stem + ".jpg"))
    annotations.append(dict(ann, image_id=i + 1, file_name=stem + ".png"))
  with open(os.path.join(out_root, "annotations", "panoptic_bench.json"),
            "w") as f:
    json.dump({"images": images, "annotations": annotations,
               "categories": data["categories"]}, f)


def time_pipeline(root: str, threads: int, batch: int, batches: int,
                  warmup: int, args: argparse.Namespace) -> tuple[float, float]:
  """(images per wall second, images per CPU second) after warm-up batches.

  CPU seconds are this process's user + system time over all its threads: on
  a shared machine they measure the work per image even when other jobs
  steal cores, where wall time cannot.
  """
  from ciae_jax import hparams  # pylint: disable=g-import-not-at-top
  from ciae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  cfg = hparams.DatasetHParams(root=root, train_split="bench", val_split="bench",
                               canvas_sizes=args.canvas_sizes,
                               train_min_size_range=(640, 800), max_size=1333,
                               num_parallel_calls=threads)
  host = pipeline.build_tf_dataset(cfg, "bench", train=True, global_batch_size=batch, seed=0,
                                   num_threads=threads)
  it = host.dataset.as_numpy_iterator()
  for _ in range(warmup):
    next(it)
  start, start_cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(it)
  wall = time.perf_counter() - start
  cpu = time.process_time() - start_cpu
  return batches * batch / wall, batches * batch / cpu


def _canvases(text: str) -> tuple[tuple[int, int], ...]:
  """'800x1344,1344x800' -> ((800, 1344), (1344, 800))."""
  return tuple(tuple(int(v) for v in part.split("x")) for part in text.split(",") if part)


def padding_ratios(cfg: Any, split: str, *, train: bool, batches: int, batch: int = 16
                   ) -> list[float]:
  """Canvas area / resized area of every planned row (valid rows only)."""
  import itertools  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top

  from ciae_jax.data import coco  # pylint: disable=g-import-not-at-top
  from ciae_jax.data import dataset  # pylint: disable=g-import-not-at-top
  from ciae_jax.data import schedule  # pylint: disable=g-import-not-at-top
  records = coco.load_records(dataset.prepare_root(cfg), split, check_files=False)
  sizes = np.asarray([[r.height, r.width] for r in records if r.segments or not train])
  if train:
    plans = itertools.islice(schedule.TrainSchedule(
        sizes, cfg, seed=0, global_batch_size=batch).plans(0), batches)
  else:
    plans = schedule.EvalSchedule(sizes, cfg, global_batch_size=batch).plans()
  return [plan.canvas[0] * plan.canvas[1] / float(h * w)
          for plan in plans for (h, w), valid in zip(plan.sizes, plan.valid) if valid]


def print_padding(sample_root: str, batches: int) -> None:
  """The `--padding` table (module docstring)."""
  from ciae_jax import hparams  # pylint: disable=g-import-not-at-top
  coco_fields = dict(root=sample_root, train_split="val2017", val_split="val2017")
  cases = [
      ("COCO sample, configs/coco_r50.py", hparams.HParams.from_config(
          load_config("coco_r50")).dataset.replace(**coco_fields)),
      ("COCO sample, configs/coco_r50.py:long", hparams.HParams.from_config(
          load_config("coco_r50", "long")).dataset.replace(**coco_fields)),
      ("synthetic, configs/synthetic.py", hparams.HParams.from_config(
          load_config("synthetic")).dataset),
  ]
  print(f"padded pixels per image (canvas area / resized area); training: the rows of "
        f"{batches} batches of 16")
  print(f"{'data':<40} | {'canvases':<20} | {'eval mean':>9} | {'max':>5} | "
        f"{'train mean':>10} | {'max':>5}")
  from ciae_jax.data import canvas  # pylint: disable=g-import-not-at-top
  for name, cfg in cases:
    evals = padding_ratios(cfg, cfg.val_split, train=False, batches=batches)
    trains = padding_ratios(cfg, cfg.train_split, train=True, batches=batches)
    canvases = ",".join(f"{h}x{w}" for h, w in canvas.canvases(cfg))
    print(f"{name:<40} | {canvases:<20} | {sum(evals) / len(evals):>9.3f} | "
          f"{max(evals):>5.3f} | {sum(trains) / len(trains):>10.3f} | {max(trains):>5.3f}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--threads", default="1,2")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--batches", type=int, default=8)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--num_images", type=int, default=64)
  parser.add_argument("--canvas_sizes", type=_canvases, default=(),
                      help="e.g. 800x1344,1344x800 (default: derived from the sizes)")
  parser.add_argument("--root", default=os.environ.get(SAMPLE_ENV, ""),
                      help=f"COCO panoptic root with val2017 (default: ${SAMPLE_ENV})")
  parser.add_argument("--padding", action="store_true",
                      help="print the padded pixels per image instead of timing")
  parser.add_argument("--padding_batches", type=int, default=1000)
  args = parser.parse_args()
  if not args.root or not os.path.isdir(os.path.join(args.root, "val2017")):
    parser.error(f"--root {args.root or '(unset)'}: no val2017/ there; pass --root or set "
                 f"{SAMPLE_ENV} to a COCO panoptic root (e.g. the two-image sample)")
  if args.padding:
    print_padding(args.root, args.padding_batches)
    return

  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")
  rows = []
  load = " ".join(f"{v:.1f}" for v in os.getloadavg())
  with tempfile.TemporaryDirectory() as tmp:
    make_dataset(args.root, tmp, args.num_images)
    for threads in (int(t) for t in args.threads.split(",")):
      runs = [time_pipeline(tmp, threads, args.batch, args.batches,
                            args.warmup, args) for _ in range(args.repeats)]
      wall = [r[0] for r in runs]
      cpu = [r[1] for r in runs]
      rows.append((threads, statistics.median(wall), min(wall), max(wall),
                   statistics.median(cpu)))
  canvases = ",".join(f"{h}x{w}" for h, w in args.canvas_sizes) or "derived"
  print(f"train pipeline, jitter [640, 800], max 1333, canvases "
        f"{canvases}, batch {args.batch}, "
        f"{args.batches} batches x {args.repeats} repeats, cpus "
        f"{os.cpu_count()}")
  print(f"load average before: {load}")
  print(f"{'threads':>7} | {'img/s median':>12} | {'min':>6} | {'max':>6} | "
        f"{'img/s per thread':>16} | {'img per CPU-s':>13}")
  for threads, median, lo, hi, per_cpu in rows:
    print(f"{threads:>7} | {median:>12.1f} | {lo:>6.1f} | {hi:>6.1f} | "
          f"{median / threads:>16.1f} | {per_cpu:>13.1f}")


if __name__ == "__main__":
  main()
