r"""Per-operation time of a compiled CIAE program on XLA:CPU, from a `jax.profiler` trace.

The program is compiled with `xla_cpu_enable_xprof_traceme` (each thunk: fusion, library call,
copy, ... records a trace event named after its HLO instruction), run `--calls` times inside
`jax.profiler.trace`, and the trace (an XSpace protobuf) is read back with jaxlib's
`_profile_data` reader. Every event whose name is an instruction of the program is charged to
that instruction; instructions are grouped by
  kind       YNNPACK convolution / YNNPACK dot / oneDNN / Eigen convolution or dot / loop fusion
             (elementwise, GroupNorm arithmetic, resizes...) / reduction / while loop / other
  direction  forward, or backward when XLA's op_name says `transpose(...)` (a VJP)
  part       backbone / fpn / head / embedding (from the flax module path), or the loss, targets,
             optimizer, post-processing.
Times are milliseconds per call summed over the threads that ran thunks (thunks can run
concurrently, so the sum may exceed the wall time, which is printed too).

Programs (`--program`): network (forward), network_grad (forward + backward, VJP w.r.t. the
params with cotangents of ones, as in training), inference (network + post-processing, as
benchmarks/inference_speed.py), step (the train step of benchmarks/train_speed.py).

  python tools/profiling/op_profile.py --program network_grad --size 256,384 --batch 2

Prints tables and a one-line JSON (`op_profile {...}`). No TensorFlow, no torch.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time
from typing import Any

# The user's benchmarks (benchmarks/common.py, the programs inference_speed.py and
# train_speed.py time) are imported by name from benchmarks/, beside this script's folder.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ciae_jax.models import ciae as ciae_model  # noqa: E402
import common  # noqa: E402  pylint: disable=g-bad-import-order

PARTS = ("backbone", "fpn", "head", "embedding")


def instruction_table(text: str) -> dict[str, dict[str, Any]]:
  """HLO instruction name -> kind, op_name, shape, for every computation of a compiled program."""
  computations: dict[str, str] = {}
  for block in re.split(r"\n(?=%\S+ \(|ENTRY )", text):
    match = re.match(r"(?:ENTRY )?%(\S+) \(", block)
    if match:
      computations[match.group(1)] = block
  table = {}
  for block in computations.values():
    for line in block.splitlines():
      # The shape is one array type or a parenthesised tuple of them (TopK's custom call,
      # multi-output fusions, while loops), which holds spaces.
      match = re.match(r"\s*(?:ROOT )?%(\S+) = (\([^()]*\)|\S+) (\w[\w-]*)\(", line)
      if not match:
        continue
      name, shape, op = match.groups()
      op_name = re.search(r'op_name="([^"]*)"', line)
      kind = op
      if op == "fusion":
        library = re.search(r'"kind":"(__\w+)"', line)
        called = re.search(r"calls=%([\w.\-]+)", line)
        body = computations.get(called.group(1), "") if called else ""
        if not op_name:  # Take the fused root's (or any fused instruction's) op_name.
          root = re.search(r'ROOT [^\n]*op_name="([^"]*)"', body)
          op_name = root or re.search(r'op_name="([^"]*)"', body)
        inner = ("convolution" if "convolution(" in body else "dot" if " dot(" in body
                 else "reduce" if " reduce(" in body else "other")
        if library:
          kind = f"{library.group(1).strip('_').replace('_fusion', '')} {inner}"
        else:
          loop_kind = re.search(r"kind=(k\w+)", line)
          kind = f"fusion {loop_kind.group(1) if loop_kind else ''}".strip()
          if name.startswith(("transpose", "copy")) or " transpose(" in body:
            kind += " (transpose/copy)"
          if inner in ("convolution", "dot"):
            kind = f"eigen {inner} (fused)"
      elif op in ("convolution", "dot"):
        kind = f"eigen {op}"
      elif op == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', line)
        kind = f"custom-call {target.group(1) if target else ''}"
      table[name] = {"kind": kind, "op_name": op_name.group(1) if op_name else "",
                     "shape": shape}
  return table


def attribute(op_name: str) -> tuple[str, str]:
  """(direction, part) of an instruction from its op_name metadata."""
  direction = "backward" if "transpose(" in op_name else "forward"
  match = re.search(r"CIAE\)*/(\w+)", op_name)
  if match and match.group(1) in PARTS:
    return direction, match.group(1)
  if "CIAE" in op_name:
    return direction, "network (other)"
  for key, part in (("ciae", "loss: CIAE"), ("engine", "loss: CIAE"),
                    ("pixel_losses", "loss: CIAE"),
                    ("instance_means", "loss: CIAE"), ("fcos", "loss: FCOS"),
                    ("focal", "loss: FCOS"), ("iou", "loss: FCOS"), ("target", "targets"),
                    ("sgd", "optimizer"), ("optax", "optimizer"), ("memory", "memory")):
    if key in op_name.lower():
      return direction, part
  return direction, "other" if op_name else "unattributed"


def build_program(args: argparse.Namespace, options: dict[str, Any]) -> tuple[Any, Any]:
  """(compiled program, its arguments) for --program."""
  size = common.round_up(args.size, 128)
  model = common.build_model(args.backbone, args.dtype)
  variables = common.init_variables(model)
  images = jax.device_put(common.normalised_images(args.batch, size))
  if args.program == "network":
    fn = jax.jit(lambda v, x: model.apply(v, x))
    call_args = (variables, images)
  elif args.program == "network_grad":
    import network_parts  # pylint: disable=g-import-not-at-top
    fn = jax.jit(network_parts.network_grad(model))
    call_args = (variables["params"], {k: v for k, v in variables.items() if k != "params"},
                 images)
  elif args.program == "inference":
    import inference_speed  # pylint: disable=g-import-not-at-top
    fn = inference_speed.make_end_to_end(model, num_stuff=common.NUM_STUFF)
    memory = common.random_memory(common.NUM_STUFF, model.hp.embed_dim)
    image_size = jnp.asarray(np.tile(np.asarray(size, np.int32), (args.batch, 1)))
    call_args = (variables, memory, images, image_size)
  else:  # step
    from ciae_jax import memory as memory_lib  # pylint: disable=g-import-not-at-top
    from ciae_jax import parallel  # pylint: disable=g-import-not-at-top
    from ciae_jax.training import train_state as train_state_lib  # pylint: disable=g-import-not-at-top
    import train_speed  # pylint: disable=g-import-not-at-top
    params, model_state = ciae_model.split_variables(variables)
    step, optimizer, _ = train_speed.make_step(model, params, global_batch=args.batch)
    memory = memory_lib.init_memory(jax.random.PRNGKey(1), common.NUM_STUFF + 1,
                                    model.hp.embed_dim)
    state = train_state_lib.create_train_state(
        params=params, optimizer=optimizer, memory=memory, rng=jax.random.PRNGKey(2),
        model_state=model_state)
    fn = parallel.parallelize(step, parallel="shard_map", donate=False)
    state = parallel.replicate(state, parallel="shard_map")
    batch = parallel.shard_batch(common.synthetic_batch(1, args.batch, size),
                                 parallel="shard_map")
    call_args = (state, batch)
  return fn.lower(*call_args).compile(compiler_options=options), call_args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--program", default="network_grad",
                      choices=("network", "network_grad", "inference", "step"))
  parser.add_argument("--size", type=common.parse_size, default=(256, 384))
  parser.add_argument("--backbone", default="resnet50")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--calls", type=int, default=3, help="calls inside the trace")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--trace_dir", default="", help="keep the trace here (default: temp)")
  parser.add_argument("--eigen", action="store_true", help="YNNPACK off (Eigen)")
  args = parser.parse_args(argv)
  from jax._src.lib import _profile_data  # pylint: disable=g-import-not-at-top
  info = common.device_info()
  options: dict[str, Any] = {"xla_cpu_enable_xprof_traceme": True}
  if args.eigen:
    options["xla_cpu_experimental_ynn_fusion_type"] = ""
  print(f"op profile: {args.program}, {args.backbone} {args.dtype}, batch {args.batch}, "
        f"{args.size[0]}x{args.size[1]}, {args.calls} traced calls, options {options}; {info}")
  compiled, call_args = build_program(args, options)
  table = instruction_table(compiled.as_text())
  jax.block_until_ready(compiled(*call_args))  # Warm.
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="op_profile_")
  start = time.perf_counter()
  with jax.profiler.trace(trace_dir):
    for _ in range(args.calls):
      jax.block_until_ready(compiled(*call_args))
  wall_ms = 1e3 * (time.perf_counter() - start) / args.calls
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
  profile = _profile_data.ProfileData.from_file(path)
  per_instruction: collections.Counter = collections.Counter()
  counts: collections.Counter = collections.Counter()
  for plane in profile.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in table:
          per_instruction[event.name] += event.duration_ns / 1e6 / args.calls
          counts[event.name] += 1
  total = sum(per_instruction.values())
  by_group: collections.Counter = collections.Counter()
  by_kind: collections.Counter = collections.Counter()
  by_part: collections.Counter = collections.Counter()
  for name, ms in per_instruction.items():
    kind = table[name]["kind"]
    direction, part = attribute(table[name]["op_name"])
    by_group[(kind, direction, part)] += ms
    by_kind[kind] += ms
    by_part[(part, direction)] += ms
  print(f"wall {wall_ms:.1f} ms per call; thunk time {total:.1f} ms per call (summed over "
        f"threads); {len(per_instruction)} instructions seen; trace {path}")
  common.print_table(["kind", "ms per call", "share"],
                     [[k, f"{v:.1f}", f"{100 * v / total:.1f}%"] for k, v in by_kind.most_common()])
  common.print_table(["part", "direction", "ms per call", "share"],
                     [[p, d, f"{v:.1f}", f"{100 * v / total:.1f}%"]
                      for (p, d), v in by_part.most_common()])
  common.print_table(["kind", "direction", "part", "ms per call", "share"],
                     [[k, d, p, f"{v:.1f}", f"{100 * v / total:.1f}%"]
                      for (k, d, p), v in by_group.most_common(30)])
  top = []
  for name, ms in per_instruction.most_common(args.top):
    entry = table[name]
    op_name = re.sub(r"^jit\([^)]*\)/", "", entry["op_name"])
    top.append([name, entry["kind"], entry["shape"][:40], op_name[:90], f"{ms:.2f}",
                f"{100 * ms / total:.1f}%"])
  common.print_table(["instruction", "kind", "shape", "op_name", "ms per call", "share"], top)
  payload = {"args": {"program": args.program, "size": list(args.size), "batch": args.batch,
                      "backbone": args.backbone, "dtype": args.dtype, "calls": args.calls,
                      "eigen": args.eigen},
             "info": info, "wall_ms": wall_ms, "thunk_ms": total,
             "by_kind": dict(by_kind), "by_part": {f"{p}/{d}": v for (p, d), v in by_part.items()},
             "top": {n: per_instruction[n] for n, _ in per_instruction.most_common(args.top)},
             "load_avg_end": round(os.getloadavg()[0], 1)}
  common.print_json("op_profile", payload)
  return payload


if __name__ == "__main__":
  main()
