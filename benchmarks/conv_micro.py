r"""Single convolutions of the CIAE network: XLA:CPU backends against PyTorch, GFLOP/s.

Each shape is one convolution of ResNet-50-FPN / the FCOS head / the embedding branch at the
given image size (batch 1, NHWC for JAX, NCHW and channels-last for PyTorch). Per shape, in one
process, interleaved (one call of each per round, order rotated), medians of `--repeats`:
  xla_ynn      JAX, the default compilation (jaxlib 0.10.2: YNNPACK convolutions)
  xla_eigen    JAX with YNNPACK off (`xla_cpu_experimental_ynn_fusion_type` empty: Eigen)
  xla_ynn_nchw JAX, default compilation, NCHW / OIHW dimension numbers (XLA picks the layout)
  torch_nchw   torch.nn.functional.conv2d on NCHW tensors (oneDNN where torch picks it)
  torch_nhwc   the same on channels_last tensors
GFLOP/s = 2 * multiply-adds / median time. Also checks each JAX result against the PyTorch
one (max |difference| relative to max |output|). `--dtype bfloat16` runs every candidate in
bfloat16 (PyTorch via bf16 tensors, no autocast).

  /opt/venv-torch/bin/python benchmarks/conv_micro.py --size 256,384 --repeats 7

PyTorch is optional (its columns are skipped without it). Prints a table and a one-line JSON
(`conv_micro {...}`). No TensorFlow.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  pylint: disable=g-bad-import-order
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

EIGEN = {"xla_cpu_experimental_ynn_fusion_type": ""}


def conv_shapes(height: int, width: int) -> list[dict[str, Any]]:
  """(name, input H, W, Cin, Cout, kernel, stride) of representative convolutions."""
  def s(name, div, cin, cout, k, stride=1):
    return {"name": name, "h": height // div, "w": width // div, "cin": cin, "cout": cout,
            "k": k, "stride": stride}
  return [
      s("stem 7x7/2 3->64", 1, 3, 64, 7, 2),
      s("layer1 1x1 256->64", 4, 256, 64, 1),
      s("layer1 3x3 64->64", 4, 64, 64, 3),
      s("layer1 1x1 64->256", 4, 64, 256, 1),
      s("layer2 3x3/2 128->128", 4, 128, 128, 3, 2),
      s("layer3 3x3 256->256", 16, 256, 256, 3),
      s("layer3 1x1 1024->256", 16, 1024, 256, 1),
      s("layer4 3x3 512->512", 32, 512, 512, 3),
      s("fpn P2 3x3 256->256", 4, 256, 256, 3),
      s("head P3 3x3 256->256", 8, 256, 256, 3),
      s("head P3 3x3 256->80 (cls)", 8, 256, 80, 3),
      s("embed P2 3x3 256->128", 4, 256, 128, 3),
  ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=common.parse_size, default=(256, 384))
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--only", default="", help="substring of the shape names to keep")
  args = parser.parse_args(argv)
  info = common.device_info()
  info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  try:
    import torch  # pylint: disable=g-import-not-at-top
    info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                mkldnn=torch.backends.mkldnn.enabled)
  except ImportError:
    torch = None
    print("torch columns skipped: torch is not installed")
  print(f"conv micro: {args.dtype}, image {args.size[0]}x{args.size[1]}, {args.repeats} rounds "
        f"after {args.warmup}; {info}")
  jdtype = jnp.dtype(args.dtype)
  rng = np.random.default_rng(0)
  results, rows = {}, []
  for shape in conv_shapes(*args.size):
    if args.only and args.only not in shape["name"]:
      continue
    h, w, cin, cout, k, stride = (shape[key] for key in ("h", "w", "cin", "cout", "k", "stride"))
    x = rng.standard_normal((1, h, w, cin), dtype=np.float32)
    kernel = (rng.standard_normal((k, k, cin, cout), dtype=np.float32) / np.sqrt(k * k * cin))
    pad = k // 2
    out_h, out_w = -(-h // stride), -(-w // stride)
    flops = 2.0 * out_h * out_w * cout * cin * k * k

    def conv(x, kernel):
      return jax.lax.conv_general_dilated(
          x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    def conv_nchw(x, kernel):
      return jax.lax.conv_general_dilated(
          x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
          dimension_numbers=("NCHW", "OIHW", "NCHW"))
    jx, jk = jnp.asarray(x, jdtype), jnp.asarray(kernel, jdtype)
    jx_nchw = jnp.asarray(x.transpose(0, 3, 1, 2), jdtype)  # [1, cin, h, w]
    jk_oihw = jnp.asarray(kernel.transpose(3, 2, 0, 1), jdtype)  # [cout, cin, k, k]
    candidates: dict[str, Callable[[], Any]] = {}
    syncs: dict[str, Callable[[Any], Any]] = {}
    outputs = {}
    for name, fn, operands, options in (
        ("xla_ynn", conv, (jx, jk), {}), ("xla_eigen", conv, (jx, jk), EIGEN),
        ("xla_ynn_nchw", conv_nchw, (jx_nchw, jk_oihw), {})):
      compiled = jax.jit(fn).lower(*operands).compile(compiler_options=options)
      candidates[name] = (lambda c=compiled, o=operands: c(*o))
      syncs[name] = jax.block_until_ready
      result = np.asarray(candidates[name](), np.float32)
      outputs[name] = result.transpose(0, 2, 3, 1) if name.endswith("nchw") else result
    if torch is not None:
      tdtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
      tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(tdtype)  # [1, cin, h, w]
      tk = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()).to(tdtype)  # [cout, cin, k, k]
      tx_cl = tx.contiguous(memory_format=torch.channels_last)
      tk_cl = tk.contiguous(memory_format=torch.channels_last)
      functional = torch.nn.functional

      def torch_call(a, b):
        def call():
          with torch.inference_mode():
            return functional.conv2d(a, b, stride=stride, padding=pad)
        return call
      candidates["torch_nchw"] = torch_call(tx, tk)
      candidates["torch_nhwc"] = torch_call(tx_cl, tk_cl)
      syncs["torch_nchw"] = syncs["torch_nhwc"] = lambda r: r
      outputs["torch"] = candidates["torch_nchw"]().float().numpy().transpose(0, 2, 3, 1)
    names = list(candidates)
    times: dict[str, list[float]] = {n: [] for n in names}
    for round_index in range(args.warmup + args.repeats):
      order = names[round_index % len(names):] + names[:round_index % len(names)]
      for name in order:
        start = time.perf_counter()
        syncs[name](candidates[name]())
        if round_index >= args.warmup:
          times[name].append(time.perf_counter() - start)
    entry = {"shape": shape, "gflop": flops / 1e9,
             "ms": {n: 1e3 * statistics.median(ts) for n, ts in times.items()}}
    if "torch" in outputs:
      scale = float(np.max(np.abs(outputs["torch"])))
      entry["rel_diff_vs_torch"] = {
          n: float(np.max(np.abs(outputs[n] - outputs["torch"]))) / scale
          for n in ("xla_ynn", "xla_eigen", "xla_ynn_nchw")}
    results[shape["name"]] = entry
    gflops = {n: flops / 1e9 / (entry["ms"][n] / 1e3) for n in names}
    best_torch = max((gflops[n] for n in ("torch_nchw", "torch_nhwc") if n in gflops),
                     default=None)
    rows.append([shape["name"], f"{h}x{w}", f"{flops / 1e9:.2f}"] +
                [f"{entry['ms'][n]:.2f} ({gflops[n]:.0f})" for n in names] +
                ["" if best_torch is None else f"{gflops['xla_ynn'] / best_torch:.2f}"])
  header = (["convolution", "input HxW", "GFLOP"] + [f"{n} ms (GFLOP/s)" for n in names] +
            ["ynn / best torch"])
  common.print_table(header, rows)
  totals = {n: sum(r["ms"][n] for r in results.values()) for n in names}
  print("total ms: " + ", ".join(f"{n} {t:.1f}" for n, t in totals.items()))
  payload = {"args": {"size": list(args.size), "dtype": args.dtype, "repeats": args.repeats},
             "info": info, "results": results, "total_ms": totals,
             "load_avg_end": round(os.getloadavg()[0], 1)}
  common.print_json("conv_micro", payload)
  return payload


if __name__ == "__main__":
  main()
