r"""XLA:CPU options on the CIAE network: time, compiled program and numbers, all in one process.

Each setting is a set of XLA debug options passed to one compilation
(`jit(...).lower(...).compile(compiler_options=...)`: the same fields XLA_FLAGS sets, but per
program), so every setting's program lives in the same process and they are timed interleaved
(one call of each per round, order rotated; medians over `--repeats` rounds), under the same
load. With `--peer` torchvision FCOS-R50's forward joins the rotation (needs torch).

Per setting: median wall ms and process-CPU ms (all threads) per call, speed against the
default, the largest absolute difference of any output from the default program's (and relative
to the largest |output|), whether the optimized HLO differs (fingerprint), and which library
fusions XLA made (`__ynn_fusion`: YNNPACK, `__onednn...`: oneDNN). A setting XLA rejects is
listed with its error. The `XLA_FLAGS` column gives the process-wide spelling of a setting.

  python tools/profiling/xla_flag_sweep.py --size 256,384 --repeats 5
  python tools/profiling/xla_flag_sweep.py --settings default,eigen --parts backbone --peer

Prints a table and a one-line JSON (`xla_flag_sweep {...}`). No TensorFlow; torch only with
--peer.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

# The user's benchmarks (benchmarks/common.py, the programs inference_speed.py and
# train_speed.py time) are imported by name from benchmarks/, beside this script's folder.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "benchmarks"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402  pylint: disable=g-bad-import-order
import network_parts  # noqa: E402  pylint: disable=g-bad-import-order

YNN = "xla_cpu_experimental_ynn_fusion_type"
CONV, DOT = "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION", "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
ELTWISE, REDUCE = "LIBRARY_FUSION_TYPE_ELTWISE", "LIBRARY_FUSION_TYPE_REDUCE"
FUSED_DOT = "LIBRARY_FUSION_TYPE_DOT"
ONEDNN = {"xla_cpu_use_onednn": True, "xla_cpu_experimental_onednn_custom_call": True}
# name: (compiler options, the XLA_FLAGS spelling). jaxlib 0.10.2's default YNN list is
# {individual_convolution, individual_dot, reduce} (checked: the same HLO fingerprint as giving
# those three explicitly): every convolution and dot, and reductions, go to YNNPACK. An empty
# list turns YNNPACK off (Eigen convolutions and dots, XLA's own reductions).
DEFAULT_YNN = [CONV, DOT, REDUCE]
SETTINGS: dict[str, tuple[dict[str, Any], str]] = {
    "default": ({}, ""),
    "eigen": ({YNN: ""}, f"--{YNN}="),
    "eigen_1thread": ({YNN: "", "xla_cpu_multi_thread_eigen": False},
                      f"--{YNN}= --xla_cpu_multi_thread_eigen=false"),
    "ynn_conv_only": ({YNN: CONV}, f"--{YNN}=individual_convolution"),
    "ynn_dot_only": ({YNN: DOT}, f"--{YNN}=individual_dot"),
    "ynn_no_reduce": ({YNN: ",".join([CONV, DOT])}, f"--{YNN}=-reduce"),
    "ynn_plus_eltwise": ({YNN: ",".join(DEFAULT_YNN + [ELTWISE])}, f"--{YNN}=+eltwise"),
    "ynn_plus_dot_fusion": ({YNN: ",".join(DEFAULT_YNN + [FUSED_DOT])}, f"--{YNN}=+dot"),
    "onednn": (dict(ONEDNN), "--xla_cpu_use_onednn=true "
               "--xla_cpu_experimental_onednn_custom_call=true"),
    "onednn_no_ynn": ({YNN: "", **ONEDNN}, f"--{YNN}= --xla_cpu_use_onednn=true "
                      "--xla_cpu_experimental_onednn_custom_call=true"),
    "onednn_fusions_no_ynn": (
        {YNN: "", "xla_cpu_use_onednn": True,
         "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,"
                                                    "LIBRARY_FUSION_TYPE_ELTWISE"},
        f"--{YNN}= --xla_cpu_use_onednn=true "
        "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise"),
    "xnnpack": ({"xla_cpu_use_xnnpack": True}, "--xla_cpu_use_xnnpack=true"),
    "fast_math": ({"xla_cpu_enable_fast_math": True}, "--xla_cpu_enable_fast_math=true"),
    "opt_fast_runtime": ({"xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_RUNTIME"},
                         "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME"),
    "concurrency_scheduler": (
        {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"},
        "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"),
    "vector_512": ({"xla_cpu_prefer_vector_width": 512}, "--xla_cpu_prefer_vector_width=512"),
    "isa_avx2": ({"xla_cpu_max_isa": "AVX2"}, "--xla_cpu_max_isa=AVX2"),
}


# Settings that kill the process on this machine (AMD EPYC Zen 4, jaxlib 0.10.2): oneDNN
# Graph fusions print "partition compile failed", then the process dies of SIGILL. Run them
# only when named in --settings (in their own process).
CRASHING = ("onednn_fusions_no_ynn",)


def max_difference(reference: Any, other: Any) -> dict[str, float]:
  """Largest |difference| of any output leaf, and that over the largest |reference value|."""
  max_abs, scale = 0.0, 0.0
  for ref, oth in zip(jax.tree.leaves(reference), jax.tree.leaves(other)):
    ref, oth = np.asarray(ref, np.float64), np.asarray(oth, np.float64)
    max_abs = max(max_abs, float(np.max(np.abs(ref - oth))))
    scale = max(scale, float(np.max(np.abs(ref))))
  return {"max_abs_diff": max_abs, "max_rel_diff": max_abs / scale if scale else 0.0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=common.parse_size, default=(256, 384))
  parser.add_argument("--backbone", default="resnet50")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--parts", default="network",
                      help="comma-separated pieces of tools/profiling/network_parts.py")
  parser.add_argument("--settings", default=",".join(n for n in SETTINGS if n not in CRASHING))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--peer", action="store_true", help="torchvision FCOS in the rotation")
  parser.add_argument("--list", action="store_true")
  args = parser.parse_args(argv)
  names = [n for n in args.settings.split(",") if n]
  unknown = sorted(set(names) - set(SETTINGS))
  if unknown:
    parser.error(f"unknown --settings {unknown}; known: {list(SETTINGS)}")
  if args.list:
    for name in names:
      print(f"{name}: compiler_options={SETTINGS[name][0]} XLA_FLAGS={SETTINGS[name][1]!r}")
    return {}
  if "default" not in names:
    names = ["default"] + names
  parts = [p for p in args.parts.split(",") if p]
  size = common.round_up(args.size, 128)
  info = common.device_info()
  info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  print(f"xla flag sweep: {args.backbone} {args.dtype}, batch {args.batch}, {size[0]}x{size[1]}, "
        f"parts {parts}, {len(names)} settings, {args.repeats} rounds after {args.warmup}; "
        f"{info}")

  model = common.build_model(args.backbone, args.dtype)
  variables = common.init_variables(model)
  images = jax.device_put(common.normalised_images(args.batch, size))
  programs, errors, compile_s = {}, {}, {}
  for name in names:
    start = time.perf_counter()
    try:
      programs[name] = network_parts.make_parts(model, variables, images, parts=parts,
                                                compiler_options=SETTINGS[name][0])
    except Exception as error:  # pylint: disable=broad-except  (XLA rejects a setting)
      errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
      print(f"  {name}: {errors[name]}")
      continue
    compile_s[name] = time.perf_counter() - start

  reference = {p: jax.device_get(programs["default"][p][0]()) for p in parts}
  calls, sync, numbers, hlo = {}, {}, {}, {}
  for name, program in programs.items():
    hlo[name] = {p: network_parts.hlo_stats(program[p][1]) for p in parts}
    numbers[name] = {}
    for p in parts:
      calls[f"{name}/{p}"] = program[p][0]
      sync[f"{name}/{p}"] = jax.block_until_ready
      if name != "default":
        numbers[name][p] = max_difference(reference[p], jax.device_get(program[p][0]()))
  peer_settings = None
  if args.peer:
    peer = network_parts.build_peer(size, args.batch)
    if peer is not None:
      peer_calls, _, peer_settings = peer
      for key in ("peer_backbone", "peer_model"):
        calls[key] = peer_calls[key]
        sync[key] = lambda r: r

  times, cpu_times = common.interleaved(calls, repeats=args.repeats, warmup=args.warmup,
                                               sync=sync)
  median_ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
  cpu_ms = {k: 1e3 * statistics.median(v) for k, v in cpu_times.items()}
  header = (["setting"] + [f"{p} ms" for p in parts] + [f"{p} CPU ms" for p in parts] +
            ["speed vs default", "max |diff|", "rel diff", "same HLO", "library fusions",
             "compile s", "XLA_FLAGS"])
  rows, summary = [], {}
  last = parts[-1]
  for name in names:
    if name in errors:
      rows.append([name] + ["error"] * (2 * len(parts)) + [errors[name][:90]] + [""] * 5 +
                  [SETTINGS[name][1]])
      summary[name] = {"error": errors[name], "xla_flags": SETTINGS[name][1]}
      continue
    diff = {key: max((numbers[name][p][key] for p in numbers[name]), default=0.0)
            for key in ("max_abs_diff", "max_rel_diff")}
    same = all(hlo[name][p]["fingerprint"] == hlo["default"][p]["fingerprint"] for p in parts)
    speed = median_ms[f"default/{last}"] / median_ms[f"{name}/{last}"]
    fusions = hlo[name][last]["library_fusions"]
    rows.append([name] + [f"{median_ms[f'{name}/{p}']:.1f}" for p in parts] +
                [f"{cpu_ms[f'{name}/{p}']:.1f}" for p in parts] +
                [f"{speed:.2f}x", f"{diff['max_abs_diff']:.1e}", f"{diff['max_rel_diff']:.1e}",
                 "yes" if same else "no",
                 ", ".join(f"{k}: {v}" for k, v in fusions.items()) or "none",
                 f"{compile_s[name]:.1f}", SETTINGS[name][1] or "(none)"])
    summary[name] = {"ms": {p: median_ms[f"{name}/{p}"] for p in parts},
                     "cpu_ms": {p: cpu_ms[f"{name}/{p}"] for p in parts},
                     "speed_vs_default": speed, **diff, "same_hlo": same, "hlo": hlo[name],
                     "compile_s": compile_s[name], "xla_flags": SETTINGS[name][1],
                     "compiler_options": SETTINGS[name][0]}
  for key in ("peer_backbone", "peer_model"):
    if key in median_ms:
      rows.append([key] + [f"{median_ms[key]:.1f}"] + [""] * (len(parts) - 1) +
                  [f"{cpu_ms[key]:.1f}"] + [""] * (len(parts) - 1) +
                  [f"{median_ms[f'default/{last}'] / median_ms[key]:.2f}x"] + [""] * 6)
      summary[key] = {"ms": median_ms[key], "cpu_ms": cpu_ms[key]}
  common.print_table(header, rows)
  payload = {"args": {"size": list(size), "backbone": args.backbone, "dtype": args.dtype,
                      "batch": args.batch, "parts": parts, "repeats": args.repeats,
                      "warmup": args.warmup},
             "info": info, "summary": summary, "peer_settings": peer_settings,
             "load_avg_end": round(os.getloadavg()[0], 1)}
  common.print_json("xla_flag_sweep", payload)
  return payload


if __name__ == "__main__":
  main()
