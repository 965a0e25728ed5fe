r"""Speed and XLA memory plan of the CIAE loss (forward + backward), dense reference vs chunked.

Times `jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))` with respect to `embedding` and
`embedding_prenorm`, where `loss` is the train step's use of the loss: `ciae_loss` vmapped over
the batch (memory unbatched), summed, `ciae_total(...)["loss_ciae"]`. Two implementations:

* `dense`: `benchmarks/ciae_dense.py`, today's formulation kept as the reference (`[P, Q]`
  arrays for the whole image, the `[P, S]` box mask, `lax.top_k` differentiated by a scatter);
* `chunked`: `ciae_jax.losses.ciae`, which calls the chunked kernel `ciae_jax.losses.triplet`.

Inputs are COCO-like (53 stuff classes, 80 thing classes merged into one memory row, 100
segment rows per image): 4 stuff bands, `--things` thing rectangles of 32-400 px sides painted
over them (one of them crowd), a void strip at the bottom, random unit embeddings.

Each size: `--warmup` calls, then `--repeats` timed calls (each synchronised; the variants take
turns within each repeat, so they share the machine's load): median / min / max wall ms, the
process CPU time per call ("CPU ms", all threads; less sensitive to other jobs on a shared
machine), and the medians over repeats of the per-repeat ratios to dense ("paired"). Then XLA's
static memory plan (arguments + outputs + temporaries - aliased) of both programs compiled at
`--memory_size` (not run). Prints a table and a one-line JSON summary (`loss_speed {...}`).
Imports no TensorFlow.

  python benchmarks/loss_speed.py                                  # 256x384 and 512x768, batch 2
  python benchmarks/loss_speed.py --sizes 256x384 --chunk_sizes 256,1024,4096  # chunk sweep
  python benchmarks/loss_speed.py --sizes '' --memory_size 800x1344  # memory plans only
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable
from unittest import mock

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ciae_dense  # noqa: E402  pylint: disable=g-bad-import-order
from ciae_jax import hparams  # noqa: E402
from ciae_jax.losses import ciae as ciae_chunked  # noqa: E402
from ciae_jax.losses import triplet  # noqa: E402
from ciae_jax.segments import SEGMENT_KEYS  # noqa: E402
from ciae_jax.segments import Segments  # noqa: E402
import common  # noqa: E402  pylint: disable=g-bad-import-order

LOSS = hparams.LossHParams()  # The paper's settings.
IMPLEMENTATIONS = {"dense": ciae_dense, "chunked": ciae_chunked}
MAX_SEGMENTS = 100
EMBED_DIM = 32


def parse_sizes(text: str) -> list[tuple[int, int]]:
  """'256x384,512x768' -> [(256, 384), (512, 768)] ('' -> [])."""
  return [common.parse_size(part) for part in text.split(",") if part.strip()]


def coco_like_inputs(batch: int, size: tuple[int, int], things: tuple[int, int],
                     seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
  """(segments `[B, ...]`, embedding `[B, H, W, D]`, embedding_prenorm `[B, H, W, D]`)."""
  rng = np.random.default_rng(seed)
  examples = []
  for _ in range(batch):
    num_things = int(rng.integers(things[0], things[1] + 1))
    example = common.synthetic_example(rng, size, num_stuff=common.NUM_STUFF,
                                       num_things=common.NUM_THINGS, max_segments=MAX_SEGMENTS,
                                       things=num_things)
    height = size[0]
    example["segment_map"][height - max(1, height // 32):] = 0  # a void strip
    thing_rows = np.nonzero(example["seg_is_thing"] & example["seg_valid"])[0]
    if thing_rows.size:
      example["seg_is_crowd"][thing_rows[0]] = True
    examples.append(example)
  segments = {k: np.stack([e[k] for e in examples]) for k in SEGMENT_KEYS}
  prenorm = rng.standard_normal((batch, *size, EMBED_DIM), dtype=np.float32)
  embedding = prenorm / np.linalg.norm(prenorm, axis=-1, keepdims=True)
  return segments, embedding.astype(np.float32), prenorm


def per_image_loss(lib: Any, embedding: Any, prenorm: Any, segments: dict[str, Any],
                   memory: Any) -> dict[str, Any]:
  """`ciae_loss` of one image through either implementation (paper hyper-parameters)."""
  if lib is ciae_dense:  # The former keyword interface.
    return ciae_dense.ciae_loss(embedding, prenorm, *(segments[k] for k in SEGMENT_KEYS), memory,
                                num_stuff=common.NUM_STUFF, include_own=LOSS.include_own)
  return ciae_chunked.ciae_loss(embedding, prenorm, Segments(**segments), memory, LOSS,
                                num_stuff=common.NUM_STUFF)


def loss_and_grad(lib: Any, segments: dict[str, np.ndarray], memory: np.ndarray) -> Callable:
  """jit(value_and_grad) of the step's CIAE loss w.r.t. (embedding, embedding_prenorm)."""

  def loss(embedding, prenorm):
    sums = jax.vmap(lambda e, p, s: per_image_loss(lib, e, p, s, memory))(
        embedding, prenorm, segments)  # each [B]
    sums = jax.tree.map(lambda x: jnp.sum(x, axis=0), sums)
    num_pixels = jnp.maximum(sums["num_pixels"], 1.0)
    # The combined sum, as `ciae_total` and the train step take it: the chunked kernel's
    # gradient of it comes from its forward pass (a sub-loss would run the loop again).
    return sums["loss_ciae_sum"] / num_pixels

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def chunk_context(name: str, chunk_size: int | None):
  """Patches the kernel's default chunk size for `chunked` (ciae_loss has no chunk keyword)."""
  if name != "chunked" or chunk_size is None:
    return mock.patch.object(triplet, "DEFAULT_CHUNK_SIZE", triplet.DEFAULT_CHUNK_SIZE)
  return mock.patch.object(triplet, "DEFAULT_CHUNK_SIZE", chunk_size)


def bench_size(args: argparse.Namespace, size: tuple[int, int],
               variants: list[tuple[str, int | None]]) -> list[dict[str, Any]]:
  """Timings of every (implementation, chunk size) at one size, taking turns within each repeat.

  Each repeat calls every variant once in turn, so that all see the same load (the machine may
  be shared); `paired_speedup` is the median over repeats of dense time / this variant's time.
  """
  segments, embedding, prenorm = coco_like_inputs(args.batch, size, args.things, args.seed)
  memory = np.asarray(common.random_memory(common.NUM_STUFF, EMBED_DIM))
  compiled, outputs = [], []
  for name, chunk_size in variants:
    with chunk_context(name, chunk_size):
      compiled.append(loss_and_grad(IMPLEMENTATIONS[name], segments, memory).lower(
          embedding, prenorm).compile())
    outputs.append(jax.block_until_ready(compiled[-1](embedding, prenorm)))
  for _ in range(args.warmup):
    for fn in compiled:
      jax.block_until_ready(fn(embedding, prenorm))
  wall = [[] for _ in variants]
  cpu = [[] for _ in variants]
  for _ in range(args.repeats):
    for i, fn in enumerate(compiled):
      start_wall, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(embedding, prenorm))
      wall[i].append(time.perf_counter() - start_wall)
      cpu[i].append(time.process_time() - start_cpu)
  dense = next((i for i, (name, _) in enumerate(variants) if name == "dense"), None)
  results = []
  for i, (name, chunk_size) in enumerate(variants):
    loss, grads = outputs[i]
    result = {"impl": name, "size": list(size), "chunk_size": chunk_size, "loss": float(loss),
              "grad_norms": [float(jnp.linalg.norm(g)) for g in grads],
              **common.summary(wall[i]), "cpu_median_ms": 1e3 * statistics.median(cpu[i])}
    if dense is not None:
      result["paired_speedup"] = statistics.median(d / t for d, t in zip(wall[dense], wall[i]))
      result["paired_cpu_speedup"] = statistics.median(d / t for d, t in zip(cpu[dense], cpu[i]))
      result["loss_rel_diff"] = abs(float(loss) - float(outputs[dense][0])) / abs(
          float(outputs[dense][0]))
    results.append(result)
  return results


def memory_plan(args: argparse.Namespace, name: str) -> dict[str, int] | None:
  """XLA's memory plan of one implementation at `--memory_size` (compiled, not run)."""
  size = args.memory_size
  segments, embedding, _ = coco_like_inputs(args.batch, size, args.things, args.seed)
  memory = np.asarray(common.random_memory(common.NUM_STUFF, EMBED_DIM))
  spec = jax.ShapeDtypeStruct(embedding.shape, jnp.float32)
  with chunk_context(name, None):
    compiled = loss_and_grad(IMPLEMENTATIONS[name], segments, memory).lower(spec, spec).compile()
  return common.compiled_memory(compiled)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="256x384,512x768", help="H x W list, comma separated")
  parser.add_argument("--batch", type=int, default=2, help="images per call (vmapped)")
  parser.add_argument("--impls", default="dense,chunked", help="subset of dense,chunked")
  parser.add_argument("--chunk_sizes", default="",
                      help="chunk sizes to time for `chunked` (default: the kernel's default)")
  parser.add_argument("--things", default="7,20", help="min,max thing segments per image")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--memory_size", default="800x1344",
                      help="H x W of the memory plans ('' to skip)")
  args = parser.parse_args(argv)
  sizes = parse_sizes(args.sizes)
  args.memory_size = common.parse_size(args.memory_size) if args.memory_size else None
  args.things = tuple(int(v) for v in args.things.split(","))
  impls = [n for n in args.impls.split(",") if n]
  unknown = set(impls) - set(IMPLEMENTATIONS)
  if unknown or args.repeats < 1 or args.batch < 1:
    parser.error(f"bad --impls {sorted(unknown)} / --repeats / --batch")
  chunk_sizes = [int(c) for c in args.chunk_sizes.split(",") if c] or [None]

  variants = [(name, chunk) for name in impls
              for chunk in (chunk_sizes if name == "chunked" else [None])]
  results = []
  for size in sizes:
    for result in bench_size(args, size, variants):
      results.append(result)
      print(f"# {result}", flush=True)
  plans = {name: memory_plan(args, name) for name in impls} if args.memory_size else {}

  rows = []
  for r in results:
    chunk = r["chunk_size"] or (triplet.default_chunk_size() if r["impl"] == "chunked" else "-")
    paired = lambda key, r=r: f"{r[key]:.2f}x" if key in r else "n/a"
    rows.append([r["impl"], f"{args.batch} x {r['size'][0]} x {r['size'][1]}", chunk,
                 f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}", f"{r['max_ms']:.1f}",
                 paired("paired_speedup"), f"{r['cpu_median_ms']:.1f}",
                 paired("paired_cpu_speedup"),
                 f"{r['loss_rel_diff']:.1e}" if "loss_rel_diff" in r else "n/a"])
  common.print_table(["impl", "batch x H x W", "chunk", "fwd+bwd ms (median)", "min", "max",
                      "speedup vs dense (paired)", "CPU ms (median)", "CPU speedup (paired)",
                      "loss rel. diff"], rows)
  if plans:
    print()
    common.print_table(
        ["impl", "memory plan at", "arguments", "outputs", "temporaries", "total"],
        [[name, f"{args.batch} x {args.memory_size[0]} x {args.memory_size[1]}",
          common.gib(p and p["argument_bytes"]), common.gib(p and p["output_bytes"]),
          common.gib(p and p["temp_bytes"]), common.gib(p and p["total_bytes"])]
         for name, p in plans.items()])
  payload = {"device": common.device_info(), "args": {
      "sizes": [list(s) for s in sizes], "batch": args.batch, "impls": impls,
      "chunk_sizes": chunk_sizes, "things": list(args.things), "repeats": args.repeats,
      "warmup": args.warmup, "default_chunk_size": triplet.default_chunk_size(),
      "memory_size": list(args.memory_size) if args.memory_size else None},
      "results": results, "memory_plans": plans}
  common.print_json("loss_speed", payload)
  return payload


if __name__ == "__main__":
  main()
