"""Trace, lowering and compile time of the train step: built for this host's platform or not.

`platforms.built_for` (what `parallel.parallelize` does) names the platforms a program is built
for, so each fast-path switch traces one branch; undeclared, every switch is a
`jax.lax.platform_dependent` whose branches are all traced and differentiated. Both programs
compute the same values (tests/test_platforms.py); this measures what the choice costs before
the first step runs. One device, shapes only (no initialisation, no step run).

  python tools/profiling/trace_time.py                  # tiny model, 2 x 128 x 128, optimised
  python tools/profiling/trace_time.py --quick          # XLA's quick mode, as the tests compile
  python tools/profiling/trace_time.py --backbone resnet50 --size 800,1344 --no_compile
"""
import argparse
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from ciae_jax import parallel  # noqa: E402
from ciae_jax import platforms  # noqa: E402
from ciae_jax.models import ciae as ciae_model  # noqa: E402
from ciae_jax.training import train_state as train_state_lib  # noqa: E402
import common  # noqa: E402  pylint: disable=g-bad-import-order
import train_speed  # noqa: E402  pylint: disable=g-bad-import-order

MODES = ("built_for", "undeclared")


def _specs(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def time_once(args: argparse.Namespace, mode: str) -> dict[str, float]:
  """Seconds to trace, lower and (unless --no_compile) compile a freshly built step."""
  model = common.build_model(args.backbone, "float32")
  variables = jax.eval_shape(lambda: ciae_model.init_variables(model, jax.random.PRNGKey(0)))
  params, model_state = ciae_model.split_variables(variables)
  step, optimizer, _ = train_speed.make_step(model, params, global_batch=args.batch)
  state = jax.eval_shape(lambda p, s: train_state_lib.create_train_state(
      params=p, optimizer=optimizer, memory=jnp.zeros((common.NUM_STUFF + 1, 32)),
      rng=jax.random.PRNGKey(1), model_state=s), params, model_state)
  batch = _specs(common.synthetic_batch(1, args.batch, args.size))  # [1, b, ...]

  def per_block(state, batch):
    return step(state, jax.tree.map(lambda x: x[0], batch))

  mesh = parallel.make_mesh(jax.devices()[:1])
  mapped = jax.shard_map(per_block, mesh=mesh, in_specs=(P(), P(parallel.AXIS_NAME)),
                         out_specs=(P(), P()))
  if mode == "built_for":
    mapped = platforms.built_for(mapped, platforms.platforms_of(jax.devices()[:1]))
  result, start = {}, time.perf_counter()
  traced = jax.jit(mapped).trace(state, batch)
  result["trace_s"] = time.perf_counter() - start
  start = time.perf_counter()
  lowered = traced.lower()
  result["lower_s"] = time.perf_counter() - start
  if not args.no_compile:
    start = time.perf_counter()
    lowered.compile()
    result["compile_s"] = time.perf_counter() - start
  return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--backbone", default="resnet_tiny", help="resnet_tiny or resnet50")
  parser.add_argument("--size", type=common.parse_size, default=(128, 128), help="H,W")
  parser.add_argument("--batch", type=int, default=2, help="images on the one device")
  parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each mode")
  parser.add_argument("--quick", action="store_true",
                      help="jax_disable_most_optimizations, as the test suite compiles")
  parser.add_argument("--no_compile", action="store_true", help="trace and lower only")
  args = parser.parse_args(argv)
  if args.quick:
    jax.config.update("jax_disable_most_optimizations", True)
  runs = {mode: [] for mode in MODES}
  for _ in range(args.repeats):  # Alternating, so that a loaded machine hits both alike.
    for mode in MODES:
      runs[mode].append(time_once(args, mode))
  print(f"{args.backbone}, {args.batch} x {args.size[0]} x {args.size[1]}, "
        f"{'quick' if args.quick else 'optimised'} XLA, medians of {args.repeats}:")
  medians = {}
  for mode in MODES:
    medians[mode] = {key: statistics.median(r[key] for r in runs[mode]) for key in runs[mode][0]}
    print(f"  {mode:>10}: " + ", ".join(f"{k} {v:.2f}" for k, v in medians[mode].items()))
  return medians


if __name__ == "__main__":
  main()
