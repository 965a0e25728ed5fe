r"""The network's bilinear resizes: `jax.image.resize` against `models.resize.resize_bilinear`.

Every `layers.resize_bilinear` call the CIAE network makes at `--size` (semantic path 2x
upsamplings at 128 channels, box embeddings P3..P7 -> P2 at 32 channels, the final P2 -> image
at 32 channels), batch `--batch`. Per call, in one process, interleaved, medians of
`--repeats`: forward, and forward + backward (VJP with a cotangent of ones, as in training), for
the dense-matrix `jax.image.resize` ("dense") and the two-tap `resize_bilinear` ("two-tap"); XLA's
FLOP estimate of each; the largest difference of values and of gradients between the two.

  python tools/profiling/resize_micro.py --size 256,384 --batch 2

Prints a table and a one-line JSON (`resize_micro {...}`). No TensorFlow, no torch.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
from typing import Any

# The user's benchmarks (benchmarks/common.py, the programs inference_speed.py and
# train_speed.py time) are imported by name from benchmarks/, beside this script's folder.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ciae_jax.models import resize as resize_lib  # noqa: E402
import common  # noqa: E402  pylint: disable=g-bad-import-order


def dense(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """What `ciae_jax.models.layers.resize_bilinear` calls today."""
  return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), method="bilinear",
                          antialias=False)


def network_resizes(height: int, width: int) -> list[tuple[str, tuple[int, int], tuple[int, int],
                                                           int]]:
  """(name, input hw, output hw, channels) of the resizes the CIAE network makes."""
  def level(k):
    size = (height, width)
    for _ in range(k):
      size = (-(-size[0] // 2), -(-size[1] // 2))
    return size
  p2 = level(2)
  calls = [("semantic P3->P2 (x3)", level(3), p2, 128), ("semantic P4->P3 (x2)", level(4),
                                                           level(3), 128),
           ("semantic P5->P4", level(5), level(4), 128)]
  for k in range(3, 8):
    calls.append((f"box embed P{k}->P2", level(k), p2, 32))
  calls.append(("final P2->image (x2: prenorm)", p2, (height, width), 32))
  return calls


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=common.parse_size, default=(256, 384))
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--warmup", type=int, default=1)
  args = parser.parse_args(argv)
  info = common.device_info()
  print(f"resize micro: {args.size[0]}x{args.size[1]}, batch {args.batch}, {args.dtype}; {info}")
  rng = np.random.default_rng(0)
  rows, results = [], {}
  totals = {k: 0.0 for k in ("dense_fwd", "twotap_fwd", "dense_fwdbwd", "twotap_fwdbwd")}
  for name, in_hw, out_hw, channels in network_resizes(*args.size):
    x = jnp.asarray(rng.standard_normal((args.batch, *in_hw, channels)), args.dtype)

    def fwdbwd(fn, x):
      y, vjp = jax.vjp(fn, x)
      return y, vjp(jnp.ones_like(y))[0]
    programs = {}
    for label, fn in (("dense", dense), ("twotap", resize_lib.resize_bilinear)):
      f = lambda x, fn=fn, out_hw=out_hw: fn(x, out_hw)
      programs[f"{label}_fwd"] = jax.jit(f).lower(x).compile()
      programs[f"{label}_fwdbwd"] = jax.jit(lambda x, f=f: fwdbwd(f, x)).lower(x).compile()
    outs = {k: jax.device_get(p(x)) for k, p in programs.items()}
    value_diff = float(np.max(np.abs(np.asarray(outs["dense_fwd"], np.float64)
                                     - np.asarray(outs["twotap_fwd"], np.float64))))
    grad_diff = float(np.max(np.abs(np.asarray(outs["dense_fwdbwd"][1], np.float64)
                                    - np.asarray(outs["twotap_fwdbwd"][1], np.float64))))
    grad_scale = float(np.max(np.abs(np.asarray(outs["dense_fwdbwd"][1], np.float64))))
    times, _ = common.interleaved({n: functools.partial(p, x) for n, p in programs.items()},
                                  repeats=args.repeats, warmup=args.warmup)
    ms = {n: 1e3 * statistics.median(ts) for n, ts in times.items()}
    gflop = {n: float((p.cost_analysis() or {}).get("flops", float("nan"))) / 1e9
             for n, p in programs.items()}
    for k in totals:
      totals[k] += ms[k]
    results[name] = {"in_hw": in_hw, "out_hw": out_hw, "channels": channels, "ms": ms,
                     "gflop": gflop, "max_value_diff": value_diff,
                     "max_grad_diff": grad_diff, "grad_scale": grad_scale,
                     "out_dtype": str(outs["twotap_fwd"].dtype),
                     "dense_out_dtype": str(outs["dense_fwd"].dtype)}
    rows.append([name, f"{in_hw[0]}x{in_hw[1]} -> {out_hw[0]}x{out_hw[1]} x{channels}",
                 f"{ms['dense_fwd']:.2f} ({gflop['dense_fwd']:.3f})",
                 f"{ms['twotap_fwd']:.2f} ({gflop['twotap_fwd']:.3f})",
                 f"{ms['dense_fwdbwd']:.2f}", f"{ms['twotap_fwdbwd']:.2f}",
                 f"{value_diff:.1e}", f"{grad_diff:.1e} / {grad_scale:.1f}"])
  common.print_table(["resize", "shape", "dense fwd ms (GFLOP)", "two-tap fwd ms (GFLOP)",
                      "dense fwd+bwd ms", "two-tap fwd+bwd ms", "max |value diff|",
                      "max |grad diff| / max |grad|"], rows)
  print("totals ms (each call once): " + ", ".join(f"{k} {v:.1f}" for k, v in totals.items()))
  payload = {"args": {"size": list(args.size), "batch": args.batch, "dtype": args.dtype,
                      "repeats": args.repeats}, "info": info, "results": results,
             "totals_ms": totals, "load_avg_end": round(os.getloadavg()[0], 1)}
  common.print_json("resize_micro", payload)
  return payload


if __name__ == "__main__":
  main()
