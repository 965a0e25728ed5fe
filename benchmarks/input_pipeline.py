"""Training throughput of the input pipeline at COCO size, per CPU core.

Replicates the two real COCO sample images into a temporary COCO-layout
dataset, then times `build_tf_dataset(train=True)` with the paper's training
transforms (shorter side jittered in [640, 800], longer side <= 1333, flips,
padded to 1408 x 1408) with 1 and 2 tf.data threads (intra-op parallelism 1),
and prints the median images/s over repeats, per thread, and per CPU-second
of the process (all threads; robust when other jobs share the cores).

  python benchmarks/input_pipeline.py [--threads 1,2] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                      "shared", "data", "coco_panoptic_sample")


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
                               canvas_sizes=(tuple(args.image_size),),
                               train_min_size_range=(640, 800), max_size=1333,
                               num_parallel_calls=threads)
  ds, _ = pipeline.build_tf_dataset(cfg, "bench", train=True,
                                    global_batch_size=batch, seed=0,
                                    num_threads=threads)
  it = ds.as_numpy_iterator()
  for _ in range(warmup):
    next(it)
  start, start_cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(it)
  wall = time.perf_counter() - start
  cpu = time.process_time() - start_cpu
  return batches * batch / wall, batches * batch / cpu


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--threads", default="1,2")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--batches", type=int, default=8)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--num_images", type=int, default=64)
  parser.add_argument("--image_size", type=int, nargs=2, default=(1408, 1408))
  parser.add_argument("--sample_root", default=SAMPLE)
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")
  rows = []
  load = " ".join(f"{v:.1f}" for v in os.getloadavg())
  with tempfile.TemporaryDirectory() as tmp:
    make_dataset(args.sample_root, tmp, args.num_images)
    for threads in (int(t) for t in args.threads.split(",")):
      runs = [time_pipeline(tmp, threads, args.batch, args.batches,
                            args.warmup, args) for _ in range(args.repeats)]
      wall = [r[0] for r in runs]
      cpu = [r[1] for r in runs]
      rows.append((threads, statistics.median(wall), min(wall), max(wall),
                   statistics.median(cpu)))
  print(f"train pipeline, jitter [640, 800], max 1333, pad "
        f"{args.image_size[0]}x{args.image_size[1]}, batch {args.batch}, "
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
