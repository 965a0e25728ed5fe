r"""Where a CIAE training step's time goes: the real step and its pieces, each jitted apart.

The step is the one benchmarks/train_speed.py times (`step.make_train_step` with the paper's
config, or `step.train_step`'s defaults without ml_collections / clu; `parallel.parallelize`,
state donated) on `--per_device_batch` synthetic images of `--size` (one device unless more are
visible). The pieces are built with the step's own hyper-parameters and fed arrays of the shapes
the step makes (the network's real outputs, the real FCOS targets of the synthetic batch):

  targets          FCOS targets of the batch (vmapped `targets.fcos_targets`)
  forward          the network (`CIAE.apply`)
  forward_backward the network and its VJP w.r.t. the trainable params (cotangents of ones)
  fcos_loss        FCOS losses from the network outputs; `_grad`: with their gradient w.r.t.
                   the head outputs
  ciae_loss        CIAE loss sums (vmapped `losses.ciae.ciae_loss`); `_grad`: with the
                   gradient w.r.t. both embedding maps
  ciae_*           CIAE sub-pieces, forward + backward: instance means (segment sums),
                   CAE triplet (similarities to the memory + top-K), IAE triplet (to stuff
                   memories and instance means, box filter, top-K), box filter alone (forward)
  memory_update    class sums of the pre-norm embeddings + momentum update
  optimizer        `optimizer.update` + `optax.apply_updates` on gradients of the params' shapes
  step             the whole parallel train step (steps dispatched back to back)

Pieces run in the same process, interleaved (one call of each per round, order rotated),
`--repeats` rounds after `--warmup`; medians of wall time and of process CPU time (all
threads; it moves less than wall time when other jobs share the machine). "share" is a piece's
median over the step's.
"covered" adds the disjoint pieces a step is made of (targets, forward_backward,
fcos_loss_grad, ciae_loss_grad, memory_update, optimizer): near 100% means the pieces explain
the step; well above it means XLA overlaps or shares work between them in the fused step.
Compile seconds and XLA's FLOP estimate of every piece are printed too. `--trace DIR` writes a
`jax.profiler` trace of `--trace_steps` steps (open it in TensorBoard / Perfetto).

  python tools/profiling/profile_step.py --size 256,384 --repeats 3
  python tools/profiling/profile_step.py --size 256,384 --pieces forward,forward_backward,step
  /opt/venv-torch/bin/python tools/profiling/profile_step.py --size 256,384 --peer  # + torchvision

`--peer` adds torchvision FCOS-R50's training forward (losses) and whole step (forward,
backward, SGD) to the rotation, with FLOPs from torch's counter (needs torch + torchvision).
Prints a table and a one-line JSON (`profile_step {...}`). No TensorFlow; torch only with --peer.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

# The user's benchmarks (benchmarks/common.py, the programs inference_speed.py and
# train_speed.py time) are imported by name from benchmarks/, beside this script's folder.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ciae_jax import hparams  # noqa: E402
from ciae_jax import memory as memory_lib  # noqa: E402
from ciae_jax import parallel  # noqa: E402
from ciae_jax import targets as targets_lib  # noqa: E402
from ciae_jax.losses import ciae as ciae_losses  # noqa: E402
from ciae_jax.losses import fcos as fcos_lib  # noqa: E402
from ciae_jax.models import ciae as ciae_model  # noqa: E402
from ciae_jax.segments import Segments  # noqa: E402
from ciae_jax.training import optim  # noqa: E402
from ciae_jax.training import train_state as train_state_lib  # noqa: E402
import common  # noqa: E402  pylint: disable=g-bad-import-order
import train_speed  # noqa: E402  pylint: disable=g-bad-import-order

# The disjoint pieces that together make a step (their sum is the "covered" line).
STEP_PIECES = ("targets", "forward_backward", "fcos_loss_grad", "ciae_loss_grad",
               "memory_update", "optimizer")
ALL_PIECES = ("targets", "forward", "forward_backward", "fcos_loss", "fcos_loss_grad",
              "ciae_loss", "ciae_loss_grad", "memory_update", "optimizer", "step")


def step_hparams(step: Any) -> hparams.HParams:
  """The hyper-parameters a step of `step.make_train_step` binds."""
  return step.keywords["hp"]


class Piece:
  """A jitted function compiled once for fixed arguments: `call()` runs it."""

  def __init__(self, fn: Callable[..., Any], *args: Any):
    start = time.perf_counter()
    self.compiled = jax.jit(fn).lower(*args).compile()
    self.compile_s = time.perf_counter() - start
    self.args = args
    self.flops = common.flops_of(self.compiled)

  def call(self) -> Any:
    return self.compiled(*self.args)


def build_pieces(model: Any, variables: Any, step: Any, optimizer: Any, batch: dict[str, Any],
                 memory: jax.Array, wanted: list[str]) -> tuple[dict[str, Piece], list[str]]:
  """The per-piece programs (see the module docstring) and lines on pieces that were skipped."""
  hp = step_hparams(step)
  num_stuff = common.NUM_STUFF
  params, model_state = ciae_model.split_variables(variables)
  images = batch["image"]  # [b, H, W, 3]
  segments = Segments.from_batch(batch)
  pieces, notes = {}, []

  def targets_fn(segments):
    return jax.vmap(lambda s: targets_lib.fcos_targets(
        s, num_stuff=num_stuff, hp=hp.fcos, strides=model.strides))(segments)

  def forward_fn(params, images):
    return model.apply({"params": params, **model_state}, images)

  # Compiled first, so that their compile times are not cache hits.
  pieces["targets"] = Piece(targets_fn, segments)
  pieces["forward"] = Piece(forward_fn, params, images)
  targets = pieces["targets"].call()
  outputs = pieces["forward"].call()
  normalizers = fcos_lib.fcos_normalizers(targets)

  def forward_backward_fn(params, images):
    out, vjp = jax.vjp(lambda p: forward_fn(p, images), params)
    return vjp(jax.tree.map(jnp.ones_like, out))[0]

  head = {k: ciae_model.flatten_levels(outputs[k]) for k in ("cls_logits", "box_reg",
                                                              "centerness")}

  def fcos_fn(head, targets, normalizers):
    losses = fcos_lib.fcos_losses(
        head["cls_logits"], head["box_reg"], head["centerness"], targets,
        normalizers["num_positives"], normalizers["centerness_target_sum"], hp.fcos)
    return losses["loss_cls"] + losses["loss_reg"] + losses["loss_ctr"]

  def ciae_fn(embedding, prenorm, segments, memory):
    sums = jax.vmap(lambda e, p, s: ciae_losses.ciae_loss(
        e, p, s, memory, hp.loss, num_stuff=num_stuff))(embedding, prenorm, segments)
    return jnp.sum(sums["loss_ciae_sum"])

  def memory_fn(prenorm, segments, memory, step_index):
    sums, counts = jax.vmap(lambda e, s: memory_lib.class_sums(
        e, s, num_stuff=num_stuff, merge_things=hp.loss.merge_things,
        num_memory=memory.shape[0]))(prenorm, segments)
    return memory_lib.update_memory(memory, jnp.sum(sums, 0), jnp.sum(counts, 0), step_index,
                                    hp.total_steps, hp.memory)

  def optimizer_fn(grads, opt_state, params):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optim.apply_updates(params, updates, 0.01), opt_state

  embedding, prenorm = outputs["embedding"], outputs["embedding_prenorm"]
  builders: dict[str, Callable[[], Piece]] = {
      "targets": lambda: pieces["targets"],
      "forward": lambda: pieces["forward"],
      "forward_backward": lambda: Piece(forward_backward_fn, params, images),
      "fcos_loss": lambda: Piece(fcos_fn, head, targets, normalizers),
      "fcos_loss_grad": lambda: Piece(jax.value_and_grad(fcos_fn), head, targets, normalizers),
      "ciae_loss": lambda: Piece(ciae_fn, embedding, prenorm, segments, memory),
      "ciae_loss_grad": lambda: Piece(jax.value_and_grad(ciae_fn, argnums=(0, 1)), embedding,
                                      prenorm, segments, memory),
      "memory_update": lambda: Piece(memory_fn, prenorm, segments, memory,
                                     jnp.asarray(10, jnp.int32)),
      "optimizer": lambda: Piece(optimizer_fn, jax.tree.map(jnp.ones_like, params),
                                 optimizer.init(params), params),
  }
  for name in ("targets", "forward"):
    if name not in wanted:
      del pieces[name]
  for name in wanted:
    if name == "step":
      continue
    if name not in builders:
      notes.append(f"{name}: skipped (not buildable with this version of the losses)")
      continue
    try:
      pieces[name] = builders[name]()
    except (AttributeError, TypeError, ValueError) as error:  # An interface that moved.
      notes.append(f"{name}: skipped ({type(error).__name__}: {str(error)[:120]})")
  return pieces, notes


def build_peer(host_batch: dict[str, np.ndarray], size: tuple[int, int]
               ) -> tuple[dict[str, Callable[[], Any]], dict[str, float], dict[str, Any]] | None:
  """torchvision FCOS-R50 training pieces (as train_speed.py's peer), or None without torch.

  peer_forward: the losses of `model(images, targets)` in train mode; peer_step: forward,
  backward and an SGD step. FLOPs from `torch.utils.flop_counter.FlopCounterMode`.
  """
  modules = common.import_torchvision()
  if modules is None:
    return None
  torch, torchvision = modules
  host = {k: v[0] for k, v in host_batch.items()}  # [b, ...]
  per_device = host["image"].shape[0]
  images = [torch.rand(3, *size, generator=torch.Generator().manual_seed(i))
            for i in range(per_device)]
  targets = train_speed.synthetic_targets(torch, host, "cpu")
  model = common.build_torchvision_fcos(torchvision, size, literal=False,
                                        score_thresh=0.05).train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  sgd = torch.optim.SGD(trainable, lr=0.01, momentum=0.9, weight_decay=1e-4)

  def forward():
    with torch.no_grad():
      return sum(model(images, targets).values())

  def step():
    loss = sum(model(images, targets).values())
    sgd.zero_grad(set_to_none=True)
    loss.backward()
    sgd.step()
    return loss.detach()
  calls = {"peer_forward": forward, "peer_step": step}
  flops = common.torch_flops(calls)
  return calls, flops, {"torch": torch.__version__, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=common.parse_size, default=(256, 384))
  parser.add_argument("--backbone", default="resnet50")
  common.add_conv_kernel_grad_flag(parser)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--per_device_batch", type=int, default=2)
  parser.add_argument("--pieces", default=",".join(ALL_PIECES),
                      help="comma-separated subset of " + ",".join(ALL_PIECES))
  parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
  parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
  parser.add_argument("--parallel", default="shard_map", choices=parallel.PARALLEL_MODES)
  parser.add_argument("--loss_stride", type=int, default=1)
  parser.add_argument("--peer", action="store_true",
                      help="also time torchvision FCOS-R50's training forward and step (torch)")
  parser.add_argument("--trace", default="", help="directory for a jax.profiler trace")
  parser.add_argument("--trace_steps", type=int, default=2)
  args = parser.parse_args(argv)
  wanted = [p for p in args.pieces.split(",") if p]
  unknown = sorted(set(wanted) - set(ALL_PIECES))
  if unknown:
    parser.error(f"unknown --pieces {unknown}; known: {ALL_PIECES}")
  size = common.round_up(args.size, ciae_model.SIZE_DIVISOR)
  info = common.device_info()
  info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  print(f"profile step: {args.backbone} {args.dtype}, {args.per_device_batch} x "
        f"{size[0]}x{size[1]} per device, {args.repeats} rounds after {args.warmup}; {info}")

  devices = jax.local_device_count()
  model = common.build_model(args.backbone, args.dtype,
                             conv_kernel_grad=args.conv_kernel_grad)
  variables = common.init_variables(model)
  params, model_state = ciae_model.split_variables(variables)
  step, optimizer, source = train_speed.make_step(
      model, params, global_batch=devices * args.per_device_batch, loss_stride=args.loss_stride)
  memory = memory_lib.init_memory(jax.random.PRNGKey(1), common.NUM_STUFF + 1, model.hp.embed_dim)
  host_batch = common.synthetic_batch(devices, args.per_device_batch, size)
  local_batch = {k: jax.device_put(v[0]) for k, v in host_batch.items()}  # [b, ...]

  pieces, notes = build_pieces(model, variables, step, optimizer, local_batch, memory, wanted)
  calls: dict[str, Callable[[], Any]] = {name: piece.call for name, piece in pieces.items()}
  compile_s = {name: piece.compile_s for name, piece in pieces.items()}
  flops = {name: piece.flops for name, piece in pieces.items()}
  step_box: dict[str, Any] = {}
  if "step" in wanted or args.trace:
    host_state = train_state_lib.create_train_state(
        params=params, optimizer=optimizer, memory=memory, rng=jax.random.PRNGKey(2),
        model_state=model_state)
    step_fn = parallel.parallelize(step, parallel=args.parallel, donate=True)
    state = parallel.replicate(host_state, parallel=args.parallel)
    batch = parallel.shard_batch(host_batch, parallel=args.parallel)
    if args.parallel == "pmap":
      mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), (parallel.AXIS_NAME,))
      batch = jax.device_put(host_batch, jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec(parallel.AXIS_NAME)))
    start = time.perf_counter()
    compiled_step = step_fn.lower(state, batch).compile()
    compile_s["step"] = time.perf_counter() - start
    flops["step"] = common.flops_of(compiled_step)
    step_box.update(state=state)

    def run_step():
      step_box["state"], metrics = compiled_step(step_box["state"], batch)
      return metrics
    if "step" in wanted:
      calls["step"] = run_step

  peer_settings = None
  if args.peer:
    peer = build_peer(host_batch, size)
    if peer is not None:
      peer_calls, peer_flops, peer_settings = peer
      calls.update(peer_calls)
      flops.update(peer_flops)
      compile_s.update({name: None for name in peer_calls})

  times, cpu_times = common.interleaved(calls, repeats=args.repeats, warmup=args.warmup)

  if args.trace:
    jax.block_until_ready(run_step())  # Compiled and warm before the trace starts.
    with jax.profiler.trace(args.trace):
      for _ in range(args.trace_steps):
        metrics = run_step()
      jax.block_until_ready(metrics)
    print(f"trace of {args.trace_steps} steps written under {args.trace}")

  results = {name: {"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts),
                    "max_ms": 1e3 * max(ts), "cpu_ms": 1e3 * statistics.median(cpu_times[name]),
                    "compile_s": compile_s.get(name),
                    "gflop": None if flops.get(name) is None else flops[name] / 1e9}
             for name, ts in times.items()}
  step_ms = results.get("step", {}).get("median_ms")
  step_cpu = results.get("step", {}).get("cpu_ms")
  rows = []
  for name, r in results.items():
    share = "" if not step_ms else f"{100 * r['median_ms'] / step_ms:.1f}%"
    cpu_share = "" if not step_cpu else f"{100 * r['cpu_ms'] / step_cpu:.1f}%"
    rows.append([name, f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}", f"{r['max_ms']:.1f}",
                 share, f"{r['cpu_ms']:.1f}", cpu_share,
                 "" if r["compile_s"] is None else f"{r['compile_s']:.1f}",
                 "" if r["gflop"] is None else f"{r['gflop']:.1f}"])
  covered = covered_cpu = None
  if step_ms and all(p in results for p in STEP_PIECES):
    covered = sum(results[p]["median_ms"] for p in STEP_PIECES)
    covered_cpu = sum(results[p]["cpu_ms"] for p in STEP_PIECES)
    rows.append(["covered (" + " + ".join(STEP_PIECES) + ")", f"{covered:.1f}", "", "",
                 f"{100 * covered / step_ms:.1f}%", f"{covered_cpu:.1f}",
                 f"{100 * covered_cpu / step_cpu:.1f}%", "", ""])
  common.print_table(["piece", "median ms", "min ms", "max ms", "share of step", "CPU ms",
                      "CPU share", "compile s", "GFLOP (XLA)"], rows)
  for note in notes:
    print("note: " + note)
  payload = {"args": {"size": list(size), "backbone": args.backbone, "dtype": args.dtype,
                      "per_device_batch": args.per_device_batch, "repeats": args.repeats,
                      "warmup": args.warmup, "parallel": args.parallel,
                      "loss_stride": args.loss_stride},
             "info": info, "step_source": source, "devices": devices, "results": results,
             "covered_ms": covered, "covered_cpu_ms": covered_cpu, "notes": notes,
             "peer_settings": peer_settings,
             "load_avg_end": round(os.getloadavg()[0], 1)}
  common.print_json("profile_step", payload)
  return payload


if __name__ == "__main__":
  main()
