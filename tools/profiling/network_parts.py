r"""Forward time of the CIAE network piece by piece, against torchvision FCOS-R50's pieces.

Ours (random weights, frozen BN as in training from ImageNet), each piece its own jitted
function fed the previous piece's outputs (already on the device):
  backbone   images [B, H, W, 3] -> C2..C5
  fpn        C2..C5 -> P2..P7
  head       P3..P7 -> class logits, centerness, box regression, box embeddings
  embedding  P2..P5 + box embeddings -> (pre-norm, unit) embedding maps [B, H, W, D]
  network    the whole `CIAE.apply` in one program (its sum-of-parts is printed beside it)
Each piece's FLOPs come from XLA's cost analysis of its compiled program ("flops": 2 per
multiply-add), so the table also gives GFLOP/s: the backend's efficiency independent of how
much work the architecture asks for.

Peer (`--peer`, needs torch + torchvision; skipped with a line otherwise): torchvision FCOS
R50-FPN (frozen BN) in eval mode under `torch.inference_mode`, its `transform`, `backbone.body`,
`backbone.fpn` (P3..P7), `head` and the whole `model(images)`, FLOPs from
`torch.utils.flop_counter.FlopCounterMode`.

All functions are timed in the same process, interleaved (one call of each per round, order
rotated), `--repeats` rounds after `--warmup` rounds: medians of calls made under the same load.
`--save` writes our pieces' outputs to an .npz (for comparing XLA flags: tools/profiling/
xla_flag_sweep.py). Prints a table and a one-line JSON (`network_parts {...}`). No TensorFlow;
runs with plain `python` (torch only with --peer).

  python tools/profiling/network_parts.py --size 256,384 --repeats 5 --peer
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import statistics
import sys
import time
from typing import Any, Callable, Sequence

# The user's benchmarks (benchmarks/common.py, the programs inference_speed.py and
# train_speed.py time) are imported by name from benchmarks/, beside this script's folder.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ciae_jax.models import embedding as embedding_lib  # noqa: E402
from ciae_jax.models import fpn as fpn_lib  # noqa: E402
from ciae_jax.models import head as head_lib  # noqa: E402
from ciae_jax.models import layers  # noqa: E402
from ciae_jax.models import resnet  # noqa: E402
import common  # noqa: E402  pylint: disable=g-bad-import-order

PARTS = ("backbone", "fpn", "head", "embedding")
# Also available with --parts: "network" (whole forward) and "network_grad" (forward + backward).
EXTRA_PARTS = ("network", "network_grad")


def sub_variables(variables: Any, name: str) -> dict[str, Any]:
  """The variables of submodule `name` of CIAE, every collection that has it."""
  return {col: tree[name] for col, tree in variables.items() if name in tree}


def _other_collections(variables: Any) -> dict[str, Any]:
  return {k: v for k, v in variables.items() if k != "params"}


def network_grad(model: Any) -> Callable[..., Any]:
  """`(params, other collections, images) -> d(sum of all outputs)/d params`: the network's
  forward and backward pass as in training (VJP with cotangents of ones)."""
  def grad(params, others, images):
    outputs, vjp = jax.vjp(
        lambda p: model.apply({"params": p, **others}, images), params)
    return vjp(jax.tree.map(jnp.ones_like, outputs))[0]
  return grad


def make_parts(model: Any, variables: Any, images: jax.Array, *,
               parts: Sequence[str] = PARTS + ("network",),
               compiler_options: dict[str, Any] | None = None
               ) -> dict[str, tuple[Callable[[], Any], Any]]:
  """{part: (call, compiled)} of jitted pieces fed the previous pieces' outputs.

  The inputs of every piece come from default-compiled programs (the same arrays whatever
  `compiler_options`, XLA debug options given to this compilation only, as XLA_FLAGS would).
  """
  dtype = layers.canonical_dtype(model.hp.dtype)
  backbone = resnet.ResNet(model.hp.backbone, model.hp.norm, model.hp.resolved_freeze_at, dtype)
  fpn = fpn_lib.FPN(model.hp.fpn_dim, dtype)
  box_embed_dim = model.hp.box_embed_dim or model.hp.embed_dim
  head = head_lib.ProposalHead(
      num_classes=model.num_thing_classes, head_dim=model.hp.fpn_dim,
      head_convs=model.hp.head_convs,
      box_embed_dim=box_embed_dim if model.hp.use_box_embedding else 0,
      prior_prob=model.hp.prior_prob, dtype=dtype)
  embedding = embedding_lib.EmbeddingBranch(
      semantic_dim=model.hp.semantic_dim, embed_dim=model.hp.embed_dim,
      use_box_embedding=model.hp.use_box_embedding, use_coordconv=model.hp.use_coordconv,
      dtype=dtype)
  image_hw = images.shape[1:3]

  fns = {
      "backbone": jax.jit(lambda v, x: backbone.apply(v, x.astype(dtype))),
      "fpn": jax.jit(lambda v, c: fpn.apply(v, c)),
      "head": jax.jit(lambda v, p: head.apply(v, [p[n] for n in head_lib.LEVEL_NAMES])),
      "embedding": jax.jit(lambda v, p, h: embedding.apply(v, p, h.get("box_embed"), image_hw)),
      "network": jax.jit(lambda v, x: model.apply(v, x)),
      "network_grad": jax.jit(network_grad(model)),
  }
  args = {"backbone": (sub_variables(variables, "backbone"), images),
          "network": (variables, images),
          "network_grad": (variables["params"], _other_collections(variables), images)}
  if any(p in parts for p in ("fpn", "head", "embedding")):
    c = fns["backbone"](*args["backbone"])
    args["fpn"] = (sub_variables(variables, "fpn"), c)
    p = fns["fpn"](*args["fpn"])
    args["head"] = (sub_variables(variables, "head"), p)
    h = fns["head"](*args["head"])
    args["embedding"] = (sub_variables(variables, "embedding"), p, h)
  calls = {}
  for part in parts:
    compiled = fns[part].lower(*args[part]).compile(compiler_options=compiler_options or {})
    calls[part] = (lambda compiled=compiled, a=args[part]: compiled(*a), compiled)
  return calls


def hlo_stats(compiled: Any) -> dict[str, Any]:
  """What the backend made of a program: library fusions, plain convolutions, a fingerprint.

  The fingerprint hashes the optimized HLO without metadata, so that two XLA flag settings
  that compile to the same program get the same value.
  """
  text = compiled.as_text()
  stripped = re.sub(r", metadata=\{[^}]*\}", "", text)
  stripped = re.sub(r"^(FileNames|FunctionNames|FileLocations|StackFrames).*?(?=^%|^ENTRY)", "",
                    stripped, flags=re.S | re.M)
  kinds = re.findall(r'"kind":"(__\w+)"', text)
  return {"fingerprint": hashlib.sha1(stripped.encode()).hexdigest()[:12],
          "library_fusions": {k: kinds.count(k) for k in sorted(set(kinds))},
          "custom_calls": sorted(set(re.findall(r'custom_call_target="([^"]+)"', text))),
          "convolutions": len(re.findall(r"\bconvolution\(", text)),
          "dots": len(re.findall(r"\bdot\(", text))}


def build_peer(size: tuple[int, int], batch: int
               ) -> tuple[dict[str, Callable[[], Any]], dict[str, float], dict[str, Any]] | None:
  """torchvision FCOS-R50 pieces: (calls, FLOPs per piece, settings), or None without torch."""
  modules = common.import_torchvision()
  if modules is None:
    return None
  torch, torchvision = modules
  model = common.build_torchvision_fcos(torchvision, size, literal=False, score_thresh=0.0)
  model.eval()
  generator = torch.Generator().manual_seed(0)
  images = [torch.rand(3, *size, generator=generator) for _ in range(batch)]
  with torch.inference_mode():
    image_list, _ = model.transform(images)
    tensors = image_list.tensors  # [B, 3, H, W]
    body = model.backbone.body(tensors)
    pyramid = model.backbone.fpn(body)
    levels = list(pyramid.values())

  def wrap(fn):
    def call():
      with torch.inference_mode():
        return fn()
    return call

  calls = {"peer_transform": wrap(lambda: model.transform(images)),
           "peer_backbone": wrap(lambda: model.backbone.body(tensors)),
           "peer_fpn": wrap(lambda: model.backbone.fpn(body)),
           "peer_head": wrap(lambda: model.head(levels)),
           "peer_model": wrap(lambda: model(images))}
  flops = common.torch_flops(calls)
  settings = {"torch": torch.__version__, "torchvision": torchvision.__version__,
              "threads": torch.get_num_threads(),
              "interop_threads": torch.get_num_interop_threads(),
              "mkldnn_enabled": torch.backends.mkldnn.enabled,
              "mkldnn_available": torch.backends.mkldnn.is_available(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "pyramid_shapes": {k: list(v.shape) for k, v in pyramid.items()}}
  return calls, flops, settings


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=common.parse_size, default=(256, 384))
  parser.add_argument("--backbone", default="resnet50")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--parts", default=",".join(PARTS + ("network",)),
                      help="comma-separated subset of " + ",".join(PARTS + EXTRA_PARTS))
  parser.add_argument("--peer", action="store_true", help="also time torchvision FCOS pieces")
  parser.add_argument("--save", default="", help=".npz path for our pieces' outputs")
  args = parser.parse_args(argv)
  info = common.device_info()
  info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  size = common.round_up(args.size, 128)
  print(f"network parts: {args.backbone} {args.dtype}, batch {args.batch}, {size[0]}x{size[1]}, "
        f"{args.repeats} interleaved rounds after {args.warmup}; {info}")

  model = common.build_model(args.backbone, args.dtype)
  variables = common.init_variables(model)
  images = jax.device_put(common.normalised_images(args.batch, size))
  start = time.perf_counter()
  wanted = [p for p in args.parts.split(",") if p]
  unknown = sorted(set(wanted) - set(PARTS + EXTRA_PARTS))
  if unknown:
    parser.error(f"unknown --parts {unknown}")
  ours = make_parts(model, variables, images, parts=wanted)
  compile_s = time.perf_counter() - start
  calls = {p: ours[p][0] for p in wanted}
  sync = {p: jax.block_until_ready for p in wanted}
  flops = {p: common.flops_of(ours[p][1]) for p in wanted}
  peer = build_peer(size, args.batch) if args.peer else None
  peer_settings = None
  if peer is not None:
    peer_calls, peer_flops, peer_settings = peer
    calls.update(peer_calls)
    sync.update({n: (lambda r: r) for n in peer_calls})
    flops.update(peer_flops)
  elif args.peer:
    print("peer skipped")

  if args.save:
    arrays = {}
    for part in wanted:
      for i, leaf in enumerate(jax.tree.leaves(ours[part][0]())):
        arrays[f"{part}/{i}"] = np.asarray(leaf, np.float32)
    np.savez(args.save, **arrays)

  times, cpu_times = common.interleaved(calls, repeats=args.repeats, warmup=args.warmup, sync=sync)
  results = {}
  rows = []
  for name, ts in times.items():
    median = statistics.median(ts)
    gflop = flops.get(name)
    results[name] = {"median_ms": 1e3 * median, "min_ms": 1e3 * min(ts),
                     "max_ms": 1e3 * max(ts), "cpu_ms": 1e3 * statistics.median(cpu_times[name]),
                     "gflop": None if gflop is None else gflop / 1e9}
    rows.append([name, f"{1e3 * median:.1f}", f"{1e3 * min(ts):.1f}", f"{1e3 * max(ts):.1f}",
                 f"{results[name]['cpu_ms']:.1f}",
                 "n/a" if gflop is None else f"{gflop / 1e9:.2f}",
                 "n/a" if gflop is None else f"{gflop / 1e9 / median:.1f}"])
  if all(p in results for p in PARTS):
    total = sum(results[p]["median_ms"] for p in PARTS)
    results["sum_of_parts"] = {"median_ms": total}
    rows.append(["sum of our parts", f"{total:.1f}", "", "", "", ""])
  common.print_table(["piece", "median ms", "min ms", "max ms", "CPU ms",
                      "GFLOP (XLA / torch counter)", "GFLOP/s"], rows)
  payload = {"args": {"size": list(size), "backbone": args.backbone, "batch": args.batch,
                      "dtype": args.dtype, "repeats": args.repeats, "warmup": args.warmup},
             "info": info, "compile_s": compile_s, "results": results,
             "peer_settings": peer_settings,
             "hlo": {p: hlo_stats(ours[p][1]) for p in wanted},
             "load_avg_end": round(os.getloadavg()[0], 1)}
  common.print_json("network_parts", payload)
  return payload


if __name__ == "__main__":
  main()
