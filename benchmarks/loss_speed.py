r"""Speed and XLA memory plan of the CIAE loss (forward + backward) for each per-pixel loss.

Times `jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))` with respect to `embedding` and
`embedding_prenorm`, where `loss` is the train step's use of the loss: `ciae_loss` vmapped over
the batch (memory unbatched), summed, `ciae_total(...)["loss_ciae"]`. Variants: each `--kinds`
(`loss.kind`: the shipped per-pixel losses, or `module:function`) through each `--impls`:

* `engine`: `ciae_jax.losses.engine.loss_sums` (pixel chunks, gradients by autodiff per chunk
  under one custom VJP: what training runs);
* `dense`: `engine.dense_loss_sums`, the reference (`[P, Q]` arrays for the whole image).

Inputs are COCO-like (53 stuff classes, 80 thing classes merged into one memory row, 100
segment rows per image): 4 stuff bands, `--things` thing rectangles of 32-400 px sides painted
over them (one of them crowd), a void strip at the bottom, random unit embeddings.

Each size: `--warmup` calls, then `--repeats` timed calls (each synchronised; the variants take
turns within each repeat, so they share the machine's load): median / min / max wall ms, the
process CPU time per call ("CPU ms", all threads; less sensitive to other jobs on a shared
machine), and the medians over repeats of the per-repeat time ratios to the first variant
("paired"). Then XLA's static memory plan (arguments + outputs + temporaries - aliased) of each
program compiled at `--memory_size` (not run). Prints a table and a one-line JSON summary
(`loss_speed {...}`). Imports no TensorFlow.

  python benchmarks/loss_speed.py                     # every shipped loss, 256x384 and 512x768
  python benchmarks/loss_speed.py --kinds ciae --impls engine,dense --sizes 256x384
  python benchmarks/loss_speed.py --kinds ciae --sizes 256x384 --chunk_sizes 256,1024,4096
  python benchmarks/loss_speed.py --sizes '' --memory_size 800x1344  # memory plans only
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ciae_jax import hparams  # noqa: E402
from ciae_jax import platforms  # noqa: E402
from ciae_jax.losses import ciae as ciae_lib  # noqa: E402
from ciae_jax.losses import engine  # noqa: E402
from ciae_jax.losses import pixel_losses  # noqa: E402
from ciae_jax.segments import SEGMENT_KEYS  # noqa: E402
from ciae_jax.segments import Segments  # noqa: E402
import common  # noqa: E402  pylint: disable=g-bad-import-order

IMPLEMENTATIONS = {"engine": engine.loss_sums, "dense": engine.dense_loss_sums}
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


def _default_chunk_size() -> int:
  """The chunk size the loss takes on the devices this benchmark runs on."""
  on_cpu = platforms.platforms_of() == ("cpu",)
  return ciae_lib.CPU_CHUNK_SIZE if on_cpu else ciae_lib.ACCELERATOR_CHUNK_SIZE


def loss_and_grad(kind: str, impl: str, chunk_size: int | None,
                  segments: dict[str, np.ndarray], memory: np.ndarray) -> Callable:
  """jit(value_and_grad) of the step's CIAE loss w.r.t. (embedding, embedding_prenorm)."""
  hp = hparams.LossHParams(kind=kind, chunk_size=chunk_size)  # the paper's other settings

  def loss(embedding, prenorm):
    sums = jax.vmap(lambda e, p, s: ciae_lib.ciae_loss(
        e, p, Segments(**s), memory, hp, num_stuff=common.NUM_STUFF,
        sums_fn=IMPLEMENTATIONS[impl]))(embedding, prenorm, segments)  # each [B]
    sums = jax.tree.map(lambda x: jnp.sum(x, axis=0), sums)
    # The combined sum, as the train step takes it: the engine's gradient of it comes from its
    # forward pass (a sub-loss would run the loop again).
    return ciae_lib.ciae_total(sums)["loss_ciae"]

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def bench_size(args: argparse.Namespace, size: tuple[int, int],
               variants: list[tuple[str, int | None]]) -> list[dict[str, Any]]:
  """Timings of every (kind, implementation, chunk size) at one size, taking turns.

  Each repeat calls every variant once in turn, so that all see the same load (the machine may
  be shared); `paired_ratio` is the median over repeats of this variant's time / the first's.
  """
  segments, embedding, prenorm = coco_like_inputs(args.batch, size, args.things, args.seed)
  memory = np.asarray(common.random_memory(common.NUM_STUFF, EMBED_DIM))
  compiled, outputs = [], []
  for kind, impl, chunk_size in variants:
    compiled.append(loss_and_grad(kind, impl, chunk_size, segments, memory).lower(
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
  results = []
  for i, (kind, impl, chunk_size) in enumerate(variants):
    loss, grads = outputs[i]
    result = {"kind": kind, "impl": impl, "size": list(size),
              "chunk_size": chunk_size or _default_chunk_size(), "loss": float(loss),
              "grad_norms": [float(jnp.linalg.norm(g)) for g in grads],
              **common.summary(wall[i]), "cpu_median_ms": 1e3 * statistics.median(cpu[i]),
              "paired_ratio": statistics.median(t / f for f, t in zip(wall[0], wall[i])),
              "paired_cpu_ratio": statistics.median(t / f for f, t in zip(cpu[0], cpu[i]))}
    if kind == variants[0][0] and i:
      result["loss_rel_diff"] = abs(float(loss) - float(outputs[0][0])) / abs(
          float(outputs[0][0]))
    results.append(result)
  return results


def memory_plan(args: argparse.Namespace, kind: str, impl: str) -> dict[str, int] | None:
  """XLA's memory plan of one variant at `--memory_size` (compiled, not run)."""
  segments, embedding, _ = coco_like_inputs(args.batch, args.memory_size, args.things, args.seed)
  memory = np.asarray(common.random_memory(common.NUM_STUFF, EMBED_DIM))
  spec = jax.ShapeDtypeStruct(embedding.shape, jnp.float32)
  compiled = loss_and_grad(kind, impl, None, segments, memory).lower(spec, spec).compile()
  return common.compiled_memory(compiled)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="256x384,512x768", help="H x W list, comma separated")
  parser.add_argument("--batch", type=int, default=2, help="images per call (vmapped)")
  parser.add_argument("--kinds", default=",".join(pixel_losses.REGISTRY),
                      help="loss.kind list: shipped names or module:function")
  parser.add_argument("--impls", default="engine", help="subset of engine,dense")
  parser.add_argument("--chunk_sizes", default="",
                      help="chunk sizes to time for `engine` (default: the platform's)")
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
  kinds = [k for k in args.kinds.split(",") if k]
  unknown = set(impls) - set(IMPLEMENTATIONS)
  if unknown or not kinds or args.repeats < 1 or args.batch < 1:
    parser.error(f"bad --impls {sorted(unknown)} / --kinds / --repeats / --batch")
  for kind in kinds:
    hparams.LossHParams(kind=kind)  # an unknown kind is an error naming it, before any work
  chunk_sizes = [int(c) for c in args.chunk_sizes.split(",") if c] or [None]

  variants = [(kind, impl, chunk) for kind in kinds for impl in impls
              for chunk in (chunk_sizes if impl == "engine" else [None])]
  results = []
  for size in sizes:
    for result in bench_size(args, size, variants):
      results.append(result)
      print(f"# {result}", flush=True)
  plans = ({f"{kind} {impl}": memory_plan(args, kind, impl) for kind in kinds for impl in impls}
           if args.memory_size else {})

  first = f"{variants[0][0]} {variants[0][1]}"
  rows = []
  for r in results:
    rows.append([r["kind"], r["impl"], f"{args.batch} x {r['size'][0]} x {r['size'][1]}",
                 r["chunk_size"] if r["impl"] == "engine" else "-",
                 f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}", f"{r['max_ms']:.1f}",
                 f"{r['paired_ratio']:.2f}x", f"{r['cpu_median_ms']:.1f}",
                 f"{r['paired_cpu_ratio']:.2f}x",
                 f"{r['loss_rel_diff']:.1e}" if "loss_rel_diff" in r else "-"])
  common.print_table(["kind", "impl", "batch x H x W", "chunk", "fwd+bwd ms (median)", "min",
                      "max", f"time / {first} (paired)", "CPU ms (median)", "CPU ratio (paired)",
                      "loss rel. diff"], rows)
  if plans:
    print()
    base = next(iter(plans.values()))
    common.print_table(
        ["variant", "memory plan at", "arguments", "outputs", "temporaries", "total",
         f"total / {first}"],
        [[name, f"{args.batch} x {args.memory_size[0]} x {args.memory_size[1]}",
          common.gib(p and p["argument_bytes"]), common.gib(p and p["output_bytes"]),
          common.gib(p and p["temp_bytes"]), common.gib(p and p["total_bytes"]),
          f"{p['total_bytes'] / base['total_bytes']:.3f}" if p and base else "n/a"]
         for name, p in plans.items()])
  payload = {"device": common.device_info(), "args": {
      "sizes": [list(s) for s in sizes], "batch": args.batch, "kinds": kinds, "impls": impls,
      "chunk_sizes": chunk_sizes, "things": list(args.things), "repeats": args.repeats,
      "warmup": args.warmup, "default_chunk_size": _default_chunk_size(),
      "memory_size": list(args.memory_size) if args.memory_size else None},
      "results": results, "memory_plans": plans}
  common.print_json("loss_speed", payload)
  return payload


if __name__ == "__main__":
  main()
