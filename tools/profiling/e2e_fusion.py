r"""Is one jitted inference program (network + post-processing) slower than its two parts?

Times, in one process, interleaved (one call of each per round, order rotated), medians of wall
and of process CPU time (all threads):
  end_to_end   `inference_speed.make_end_to_end`: one program, network then post-processing
  barrier      the same program with `jax.lax.optimization_barrier` on the network outputs that
               the post-processing reads (XLA may not fuse or reorder across it)
  split        the network program, then the post-processing program (two dispatches)
  network      the network program alone
  postprocess  the post-processing program alone (on the network's outputs)
and checks that every variant returns the same arrays as `end_to_end` (max |difference|).
`--dump DIR` writes each program's optimized HLO and a summary of its top-level instructions
(library fusions, loop fusions, while loops, copies/transposes) so the programs can be diffed.

  python tools/profiling/e2e_fusion.py --size 256,384 --repeats 7

Prints a table and a one-line JSON (`e2e_fusion {...}`). No TensorFlow, no torch.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import sys
import time
from typing import Any

# The user's benchmarks (benchmarks/common.py, the programs inference_speed.py and
# train_speed.py time) are imported by name from benchmarks/, beside this script's folder.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402  pylint: disable=g-bad-import-order
import inference_speed  # noqa: E402  pylint: disable=g-bad-import-order


def entry_summary(text: str) -> dict[str, int]:
  """Counts of the entry computation's instructions by kind (fusion kinds, whiles, copies)."""
  entry = text[text.index("\nENTRY"):]
  entry = entry[:entry.index("\n}")]
  counts: collections.Counter = collections.Counter()
  for line in entry.splitlines()[1:]:
    match = re.search(r"= \S+ (\w[\w-]*)\(", line)
    if not match:
      continue
    op = match.group(1)
    if op == "fusion":
      kind = re.search(r'"kind":"(__\w+)"', line)
      op = kind.group(1) if kind else "fusion:" + re.search(r"kind=(k\w+)", line).group(1)
    counts[op] += 1
  return dict(sorted(counts.items()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=common.parse_size, default=(256, 384))
  parser.add_argument("--backbone", default="resnet50")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--dump", default="", help="directory for the optimized HLO texts")
  args = parser.parse_args(argv)
  padded = common.round_up(args.size, common.PAD_MULTIPLE)
  info = common.device_info()
  info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  print(f"e2e fusion: {args.backbone} {args.dtype}, batch {args.batch}, {padded[0]}x{padded[1]}, "
        f"{args.repeats} rounds after {args.warmup}; {info}")

  model = common.build_model(args.backbone, args.dtype)
  variables = common.init_variables(model)
  memory = common.random_memory(common.NUM_STUFF, model.hp.embed_dim)  # [M, D]
  images = jax.device_put(common.normalised_images(args.batch, padded))  # [B, H, W, 3]
  image_size = jnp.asarray(np.tile(np.asarray(args.size, np.int32), (args.batch, 1)))  # [B, 2]
  postprocess = inference_speed.postprocess_fn(num_stuff=common.NUM_STUFF)

  def network_fn(variables, images):
    return model.apply(variables, images)

  def barrier_fn(variables, memory, images, image_size):
    outputs = network_fn(variables, images)
    outputs = {k: outputs[k] for k in inference_speed.OUTPUT_KEYS}
    outputs = jax.lax.optimization_barrier(outputs)
    return postprocess(outputs, memory, image_size)

  start = time.perf_counter()
  programs = {
      "end_to_end": inference_speed.make_end_to_end(model, num_stuff=common.NUM_STUFF).lower(
          variables, memory, images, image_size).compile(),
      "barrier": jax.jit(barrier_fn).lower(variables, memory, images, image_size).compile(),
      "network": jax.jit(network_fn).lower(variables, images).compile(),
  }
  outputs = programs["network"](variables, images)
  programs["postprocess"] = jax.jit(postprocess).lower(outputs, memory, image_size).compile()
  compile_s = time.perf_counter() - start
  calls = {
      "end_to_end": lambda: programs["end_to_end"](variables, memory, images, image_size),
      "barrier": lambda: programs["barrier"](variables, memory, images, image_size),
      "split": lambda: programs["postprocess"](programs["network"](variables, images), memory,
                                               image_size),
      "network": lambda: programs["network"](variables, images),
      "postprocess": lambda: programs["postprocess"](outputs, memory, image_size),
  }

  reference = jax.device_get(calls["end_to_end"]())
  differences = {}
  for name in ("barrier", "split"):
    result = jax.device_get(calls[name]())
    differences[name] = max(
        float(np.max(np.abs(np.asarray(result[k], np.float64) - np.asarray(reference[k],
                                                                             np.float64))))
        for k in reference)
  if args.dump:
    os.makedirs(args.dump, exist_ok=True)
    for name, program in programs.items():
      with open(os.path.join(args.dump, f"{name}.hlo.txt"), "w") as f:
        f.write(program.as_text())
  summaries = {name: entry_summary(program.as_text()) for name, program in programs.items()}

  times, cpu_times = common.interleaved(calls, repeats=args.repeats, warmup=args.warmup)
  results = {n: {"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts),
                 "max_ms": 1e3 * max(ts), "cpu_ms": 1e3 * statistics.median(cpu_times[n])}
             for n, ts in times.items()}
  parts = results["network"]["median_ms"] + results["postprocess"]["median_ms"]
  parts_cpu = results["network"]["cpu_ms"] + results["postprocess"]["cpu_ms"]
  rows = [[n, f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}", f"{r['max_ms']:.1f}",
           f"{r['median_ms'] / parts:.2f}", f"{r['cpu_ms']:.1f}", f"{r['cpu_ms'] / parts_cpu:.2f}",
           f"{differences.get(n, 0.0):.1e}"]
          for n, r in results.items()]
  rows.append(["network + postprocess (sum of medians)", f"{parts:.1f}", "", "", "1.00",
               f"{parts_cpu:.1f}", "1.00", ""])
  common.print_table(["program", "median ms", "min ms", "max ms", "/ sum of parts", "CPU ms",
                      "CPU / sum of parts", "max |diff| vs end_to_end"], rows)
  for name, summary in summaries.items():
    print(f"{name}: {summary}")
  payload = {"args": {"size": list(args.size), "padded": list(padded), "batch": args.batch,
                      "backbone": args.backbone, "dtype": args.dtype, "repeats": args.repeats},
             "info": info, "compile_s": compile_s, "results": results,
             "sum_of_parts_ms": parts, "sum_of_parts_cpu_ms": parts_cpu,
             "max_abs_diff": differences, "entry_summary": summaries,
             "load_avg_end": round(os.getloadavg()[0], 1)}
  common.print_json("e2e_fusion", payload)
  return payload


if __name__ == "__main__":
  main()
