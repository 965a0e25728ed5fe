r"""What `ciae_jax.resize.resize_bilinear` (two-tap) instead of `jax.image.resize` would give.

The CIAE network resizes through `ciae_jax.models.layers.resize_bilinear`, which calls
`jax.image.resize` (dense interpolation matrices). This script traces the network twice: as it
is ("dense"), and with `layers.resize_bilinear` replaced by `ciae_jax.resize.resize_bilinear`
while tracing ("two-tap": what the one-line patch in layers.py would do), then times, in one
process, interleaved, medians of `--repeats`:
  network       the forward pass (inference), batch `--batch`
  network_grad  forward + backward w.r.t. the params (cotangents of ones), as in training
  inference     network + post-processing (benchmarks/inference_speed.py's end-to-end program)
and compares the two variants' outputs (max |difference|, relative to max |value|).

  python benchmarks/resize_impact.py --size 256,384 --programs network,inference
  python benchmarks/resize_impact.py --size 256,384 --batch 2 --programs network_grad

Prints a table and a one-line JSON (`resize_impact {...}`). No TensorFlow, no torch.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Any, Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  pylint: disable=g-bad-import-order
import inference_speed  # noqa: E402  pylint: disable=g-bad-import-order
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import network_parts  # noqa: E402  pylint: disable=g-bad-import-order
import numpy as np  # noqa: E402

from ciae_jax import resize as resize_lib  # noqa: E402
from ciae_jax.models import layers  # noqa: E402


@contextlib.contextmanager
def two_tap_resize(enabled: bool) -> Iterator[None]:
  """Within the block (while tracing), layers.resize_bilinear is the two-tap version."""
  original = layers.resize_bilinear
  if enabled:
    layers.resize_bilinear = resize_lib.resize_bilinear
  try:
    yield
  finally:
    layers.resize_bilinear = original


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=common.parse_size, default=(256, 384))
  parser.add_argument("--backbone", default="resnet50")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--programs", default="network,inference")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  args = parser.parse_args(argv)
  size = common.round_up(args.size, 128)
  info = common.device_info()
  info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  programs = [p for p in args.programs.split(",") if p]
  print(f"resize impact: {args.backbone} {args.dtype}, batch {args.batch}, {size[0]}x{size[1]}, "
        f"{programs}, {args.repeats} rounds after {args.warmup}; {info}")
  model = common.build_model(args.backbone, args.dtype)
  variables = common.init_variables(model)
  images = jax.device_put(common.normalised_images(args.batch, size))
  memory = common.random_memory(common.NUM_STUFF, model.embed_dim)
  image_size = jnp.asarray(np.tile(np.asarray(size, np.int32), (args.batch, 1)))
  others = {k: v for k, v in variables.items() if k != "params"}
  builders = {
      "network": (lambda: jax.jit(lambda v, x: model.apply(v, x, train=False)),
                  (variables, images)),
      "network_grad": (lambda: jax.jit(network_parts.network_grad(model)),
                       (variables["params"], others, images)),
      "inference": (lambda: inference_speed.make_end_to_end(model, num_stuff=common.NUM_STUFF),
                    (variables, memory, images, image_size)),
  }
  calls, compiled, flops = {}, {}, {}
  for program in programs:
    make, call_args = builders[program]
    for variant in ("dense", "two-tap"):
      with two_tap_resize(variant == "two-tap"):
        exe = make().lower(*call_args).compile()
      key = f"{program}/{variant}"
      compiled[key] = exe
      calls[key] = lambda exe=exe, a=call_args: exe(*a)
      flops[key] = network_parts.flops_of(exe)
  diffs = {}
  for program in programs:
    dense = jax.device_get(calls[f"{program}/dense"]())
    two_tap = jax.device_get(calls[f"{program}/two-tap"]())
    max_abs, scale, mismatched = 0.0, 0.0, 0
    for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(two_tap)):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      max_abs = max(max_abs, float(np.max(np.abs(a - b))))
      scale = max(scale, float(np.max(np.abs(a))))
      mismatched += int(np.sum(a != b)) if a.dtype.kind in "iub" else 0
    diffs[program] = {"max_abs_diff": max_abs, "max_rel_diff": max_abs / scale if scale else 0,
                      "integer_mismatches": mismatched}
  sync = {k: jax.block_until_ready for k in calls}
  times, cpu_times = network_parts.interleaved(calls, repeats=args.repeats, warmup=args.warmup,
                                               sync=sync)
  rows, results = [], {}
  for program in programs:
    d, t = f"{program}/dense", f"{program}/two-tap"
    md, mt = (1e3 * statistics.median(times[k]) for k in (d, t))
    cd, ct = (1e3 * statistics.median(cpu_times[k]) for k in (d, t))
    results[program] = {"dense_ms": md, "two_tap_ms": mt, "dense_cpu_ms": cd,
                        "two_tap_cpu_ms": ct, "dense_gflop": (flops[d] or 0) / 1e9,
                        "two_tap_gflop": (flops[t] or 0) / 1e9, **diffs[program]}
    rows.append([program, f"{md:.1f}", f"{mt:.1f}", f"{md / mt:.2f}x", f"{cd:.1f}", f"{ct:.1f}",
                 f"{cd / ct:.2f}x", f"{(flops[d] or 0) / 1e9:.2f} -> {(flops[t] or 0) / 1e9:.2f}",
                 f"{diffs[program]['max_abs_diff']:.1e} ({diffs[program]['max_rel_diff']:.1e})",
                 diffs[program]["integer_mismatches"]])
  common.print_table(["program", "dense ms", "two-tap ms", "speed-up", "dense CPU ms",
                      "two-tap CPU ms", "CPU speed-up", "GFLOP", "max |diff| (rel)",
                      "integer outputs differing"], rows)
  payload = {"args": {"size": list(size), "backbone": args.backbone, "dtype": args.dtype,
                      "batch": args.batch, "programs": programs, "repeats": args.repeats},
             "info": info, "results": results, "load_avg_end": round(os.getloadavg()[0], 1)}
  common.print_json("resize_impact", payload)
  return payload


if __name__ == "__main__":
  main()
