"""Images through the predictor in global batches: the plan, the loading threads, the progress.

Shared by evaluation (`runner.evaluate`) and prediction into files (`predict_files`). With
several processes every process runs the same plan of global batches (`eval_plan`: the images
grouped by canvas, in their order, the last batch of each canvas padded with blank rows) and
predicts its slice of each (`PlannedBatch.local`): a checkpoint's program spans all devices,
so the processes must make the same calls.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from typing import Any, Callable, Iterator, Sequence

from absl import logging
import jax

from ciae_jax.inference import preprocess


@dataclasses.dataclass(frozen=True)
class PlannedBatch:
  """One global batch: a canvas and, per global row, an index into the images (or None)."""
  canvas: tuple[int, int]
  rows: tuple[int | None, ...]

  def local(self, rows_per_process: int, process: int) -> tuple[int | None, ...]:
    return self.rows[process * rows_per_process:(process + 1) * rows_per_process]


def eval_plan(sizes: Sequence[tuple[int, int]], preprocessor: preprocess.Preprocessor, *,
              rows_per_process: int, num_processes: int) -> list[PlannedBatch]:
  """Global batches over images of original `sizes`: grouped by canvas (canvases in the order
  of `preprocessor.canvases`), images in their order, each canvas's last batch padded."""
  by_canvas: dict[tuple[int, int], list[int]] = {c: [] for c in preprocessor.canvases}
  for index, size in enumerate(sizes):
    by_canvas[preprocessor.plan(size)[0]].append(index)
  global_rows = rows_per_process * num_processes
  plan = []
  for canvas, indices in by_canvas.items():
    for start in range(0, len(indices), global_rows):
      rows = indices[start:start + global_rows]
      plan.append(PlannedBatch(canvas, tuple(rows) + (None,) * (global_rows - len(rows))))
  return plan


def load_batches(plan: Sequence[PlannedBatch], load: Callable[[int], Any],
                 rows_per_process: int) -> Iterator[tuple[PlannedBatch, list[Any]]]:
  """This process's rows of each planned batch, `load(index)` each (None for blank rows), in
  threads one batch ahead (PIL and NumPy release the GIL while the devices predict the previous
  batch)."""
  process = jax.process_index()
  workers = min(16, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool, \
      concurrent.futures.ThreadPoolExecutor(1) as ahead:

    def load_batch(batch):
      rows = batch.local(rows_per_process, process)
      return list(pool.map(lambda r: None if r is None else load(r), rows))

    pending = ahead.submit(load_batch, plan[0]) if plan else None
    for index, batch in enumerate(plan):
      items = pending.result()
      if index + 1 < len(plan):
        pending = ahead.submit(load_batch, plan[index + 1])
      yield batch, items


class Progress:
  """Images done, images/s and the time left, logged by process 0 every `every` images.

  The rate is measured from the end of the first batch on: the first call compiles the program
  of its canvas (seconds to minutes), which would make the first lines' estimates of the time
  left many times too long. Until a second batch is done it is the rate over the first.

  Args:
    total: images to do.
    every: a line every N images (and at the end).
    label: the line's first word ("evaluation", "predict").
  """

  def __init__(self, total: int, every: int, label: str = "evaluation"):
    self.total, self.every, self.label, self.done = total, max(1, every), label, 0
    self.start = time.time()
    self.first: tuple[float, int] | None = None  # (time, images) at the end of the first batch

  def update(self, images: int) -> None:
    before, self.done = self.done, self.done + images
    now = time.time()
    if self.first is None and images:
      self.first = (now, self.done)
    if jax.process_index() or not images:
      return
    if self.done // self.every == before // self.every and self.done != self.total:
      return
    since, done_then = self.first if self.done > self.first[1] else (self.start, 0)
    rate = (self.done - done_then) / max(now - since, 1e-9)
    left = (self.total - self.done) / max(rate, 1e-9)
    logging.info("%s: %d/%d images (%.1f images/s, %d s left)", self.label, self.done,
                 self.total, rate, round(left))
