r"""Training speed and memory of CIAE, against a torchvision FCOS-R50 training step in the same run.

Ours, per dtype: the real data-parallel step (`ciae_jax.training.step.make_train_step` with the
paper's config, wrapped by `parallel.parallelize`, state donated) on every local device, with
`--per_device_batch` synthetic images of `--size` per device (a fixed batch already on the
devices: the input pipeline is measured apart, benchmarks/input_pipeline.py). Images/s is
`steps x global batch / wall time` of `--steps` steps dispatched back to back and synchronised
at the end (as training runs), after `--warmup` steps; the median of `--repeats` such runs.
Memory: the allocator's peak (`memory_stats()["peak_bytes_in_use"]` of device 0, where the
backend reports it: GPUs, TPUs; a process-wide peak, so give one `--dtypes` per run for each
dtype's own) and XLA's static plan of the compiled step (arguments + outputs + temporaries -
aliased), which CPUs report too.

Peer: torchvision `FCOS` R50-FPN (frozen BN, 3 trainable stages, as when trained from an
ImageNet backbone; `--peer_literal` for `fcos_resnet50_fpn(weights=None,
weights_backbone=None)`), SGD with momentum 0.9 and weight decay 1e-4, float32 and
`torch.autocast(bfloat16)`, same images per step, same device, boxes of the same synthetic
things. Skipped with a printed line when torch or torchvision is not installed.

  python benchmarks/train_speed.py                               # R50, 2 x 800 x 1344 per device
  python benchmarks/train_speed.py --size 256,384 --backbone resnet18 --steps 2  # CPU
  python benchmarks/train_speed.py --compile_only                # XLA's memory plan only
  python benchmarks/train_speed.py --compile_only --per_device_batch 16 --grad_accum_steps 8
                                   # the paper's batch of 16 on one device, 8 micro-batches of 2

`--grad_accum_steps K` (`config.grad_accum_steps`) splits each device's `--per_device_batch`
images into K micro-batches whose gradients are summed before the one update
(`ciae_jax.training.accumulate`). `--pad_multiple` (default 32, the smallest the network
takes; FCOS targets use ceil-sized levels) pads `--size` up. Without ml_collections / clu (the
GPU image) the step is bound from `ciae_jax.training.step.train_step`'s paper defaults instead
of the config, and a line says so.
Prints a table and a one-line JSON summary (`train_speed {...}`). Imports no TensorFlow.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ciae_jax import hparams  # noqa: E402
from ciae_jax import memory as memory_lib  # noqa: E402
from ciae_jax import parallel  # noqa: E402
from ciae_jax.models import ciae as ciae_model  # noqa: E402
from ciae_jax.training import optim  # noqa: E402
from ciae_jax.training import step as step_lib  # noqa: E402
from ciae_jax.training import train_state as train_state_lib  # noqa: E402
import common  # noqa: E402  pylint: disable=g-bad-import-order

TOTAL_STEPS = 90_000  # The paper's schedule (sets the memory momentum; no effect on speed).


def make_step(model: ciae_model.CIAE, params: Any, *, global_batch: int, loss_stride: int = 1,
              loss_kind: str = "ciae", loss_params: dict[str, Any] | None = None,
              grad_accum_steps: int = 1) -> tuple[Callable, Any, str]:
  """(per-device step, optimizer, where it came from) with the paper's hyper-parameters."""
  hp = hparams.HParams(batch_size=global_batch, total_steps=TOTAL_STEPS,
                       grad_accum_steps=grad_accum_steps,
                       loss=hparams.LossHParams(loss_stride=loss_stride, kind=loss_kind,
                                                params=loss_params or {}))
  optimizer, schedule = optim.create(hp.optimizer, params, batch_size=hp.batch_size)
  step = step_lib.make_train_step(hp, model, optimizer, schedule, num_stuff=common.NUM_STUFF)
  return step, optimizer, "step.make_train_step(HParams())"


def bench_ours(args: argparse.Namespace, dtype: str, size: tuple[int, int]) -> dict[str, Any]:
  """Images/s and memory of our parallel train step in one dtype."""
  devices = jax.local_device_count()
  global_batch = devices * args.per_device_batch
  model = common.build_model(args.backbone, dtype, conv_kernel_grad=args.conv_kernel_grad)
  params, model_state = ciae_model.split_variables(common.init_variables(model))
  step, optimizer, source = make_step(model, params, global_batch=global_batch,
                                      loss_stride=args.loss_stride, loss_kind=args.loss_kind,
                                      loss_params=args.loss_params,
                                      grad_accum_steps=args.grad_accum_steps)
  memory = memory_lib.init_memory(jax.random.PRNGKey(1), common.NUM_STUFF + 1,
                                  model.hp.embed_dim)  # [M, D]
  host_state = train_state_lib.create_train_state(
      params=params, optimizer=optimizer, memory=memory, rng=jax.random.PRNGKey(2),
      model_state=model_state)
  step_fn = parallel.parallelize(step, parallel=args.parallel, donate=True)
  state = parallel.replicate(host_state, parallel=args.parallel)
  host_batch = common.synthetic_batch(devices, args.per_device_batch, size)
  batch = parallel.shard_batch(host_batch, parallel=args.parallel)
  if args.parallel == "pmap":  # On the devices once (pmap would copy numpy at every call).
    mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), (parallel.AXIS_NAME,))
    batch = jax.device_put(host_batch, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(parallel.AXIS_NAME)))

  start = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  result = {"dtype": dtype, "step_source": source, "devices": devices,
            "global_batch": global_batch, "grad_accum_steps": args.grad_accum_steps,
            "compile_s": time.perf_counter() - start,
            "xla_memory_plan": common.compiled_memory(compiled)}
  if args.compile_only:
    return result
  step_fn = compiled  # The program compiled above (a plain call would compile it again).

  previous = state
  state, metrics = step_fn(state, batch)
  # Donated: the step wrote the new state into the old state's buffers (no second copy).
  donated = all(leaf.is_deleted() for leaf in jax.tree.leaves(previous))
  del previous
  for _ in range(args.warmup - 1):
    state, metrics = step_fn(state, batch)
  jax.block_until_ready(metrics)
  runs = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = step_fn(state, batch)
    jax.block_until_ready((state, metrics))
    runs.append(time.perf_counter() - start)
  loss = float(np.asarray(parallel.first_copy(metrics, parallel=args.parallel)["loss"]))
  images_per_s = [args.steps * global_batch / t for t in runs]
  result.update(images_per_s=statistics.median(images_per_s), images_per_s_runs=images_per_s,
                step_ms=1e3 * statistics.median(runs) / args.steps, last_loss=loss,
                state_donated=donated,
                peak_memory=common.peak_device_memory(),
                # The allocator's peak covers the whole process: after the first dtype it is the
                # peak of every dtype run so far (run one dtype per process for each peak).
                peak_is_cumulative=args.dtypes.split(",").index(dtype) > 0)
  return result


def synthetic_targets(torch: Any, batch: dict[str, np.ndarray], device: str) -> list[dict]:
  """torchvision detection targets from the synthetic things (labels 1..80)."""
  targets = []
  for index in range(batch["seg_valid"].shape[0]):
    keep = batch["seg_valid"][index] & batch["seg_is_thing"][index]
    labels = batch["seg_class"][index][keep] - common.NUM_STUFF + 1
    targets.append({"boxes": torch.as_tensor(batch["seg_box"][index][keep], device=device),
                    "labels": torch.as_tensor(labels.astype(np.int64), device=device)})
  return targets


def bench_peer(args: argparse.Namespace, dtypes: list[str], size: tuple[int, int]
               ) -> dict[str, Any] | None:
  """torchvision FCOS-R50 training images/s (and peak memory on CUDA) per dtype."""
  modules = common.import_torchvision()
  if modules is None:
    return None
  torch, torchvision = modules
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cudnn.benchmark = True
  results = {"device": device, "torch": torch.__version__,
             "torchvision": torchvision.__version__,
             "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
             "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
             "build": "literal" if args.peer_literal else "frozen_bn, 3 trainable stages"}
  host = common.synthetic_batch(1, args.per_device_batch, size)
  host = {k: v[0] for k, v in host.items()}  # [b, ...]
  images = [torch.rand(3, *size, generator=torch.Generator().manual_seed(i)).to(device)
            for i in range(args.per_device_batch)]
  targets = synthetic_targets(torch, host, device)
  sync = common.torch_sync(torch, device)
  for dtype in dtypes:
    model = common.build_torchvision_fcos(torchvision, size, literal=args.peer_literal,
                                          score_thresh=0.05).to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    sgd = torch.optim.SGD(trainable, lr=0.01, momentum=0.9, weight_decay=1e-4)

    def train_step(dtype=dtype, model=model, sgd=sgd):
      with torch.autocast(device_type=device, dtype=torch.bfloat16,
                          enabled=dtype == "bfloat16"):
        losses = model(images, targets)
      loss = sum(losses.values())
      sgd.zero_grad(set_to_none=True)
      loss.backward()
      sgd.step()
      return loss

    if device == "cuda":
      torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
      train_step()
    sync(None)
    runs = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      for _ in range(args.steps):
        loss = train_step()
      sync(loss)
      runs.append(time.perf_counter() - start)
    images_per_s = [args.steps * args.per_device_batch / t for t in runs]
    results[dtype] = {
        "images_per_s": statistics.median(images_per_s), "images_per_s_runs": images_per_s,
        "step_ms": 1e3 * statistics.median(runs) / args.steps, "last_loss": float(loss),
        "peak_memory_bytes": (int(torch.cuda.max_memory_allocated())
                              if device == "cuda" else None)}
    del model, sgd, train_step, trainable  # Free them before the next dtype's peak.
  return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=common.parse_size, default=(800, 1344))
  parser.add_argument("--backbone", default="resnet50")
  common.add_conv_kernel_grad_flag(parser)
  parser.add_argument("--per_device_batch", type=int, default=2)
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--steps", type=int, default=10, help="steps per timed run")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
  parser.add_argument("--warmup", type=int, default=2, help="warm-up steps (at least 1)")
  parser.add_argument("--parallel", default="shard_map", choices=parallel.PARALLEL_MODES)
  parser.add_argument("--pad_multiple", type=int, default=ciae_model.SIZE_DIVISOR)
  parser.add_argument("--loss_stride", type=int, default=1,
                      help="config.loss.loss_stride: CIAE loss on every n-th pixel (paper: 1)")
  parser.add_argument("--loss_kind", default="ciae",
                      help="config.loss.kind: a shipped per-pixel loss or module:function")
  parser.add_argument("--loss_params", type=json.loads, default={},
                      help="config.loss.params as JSON, e.g. '{\"temperature\": 0.05}'")
  parser.add_argument("--grad_accum_steps", type=int, default=1,
                      help="config.grad_accum_steps: micro-batches per device and update")
  parser.add_argument("--compile_only", action="store_true",
                      help="compile the step and print XLA's memory plan; run nothing")
  parser.add_argument("--skip_peer", action="store_true")
  parser.add_argument("--peer_literal", action="store_true")
  args = parser.parse_args(argv)
  dtypes = [d for d in args.dtypes.split(",") if d]
  if args.warmup < 1:
    parser.error("--warmup must be at least 1 (the first step checks donation)")
  size = common.round_up(args.size, args.pad_multiple)
  info = common.device_info()
  print(f"train speed: {args.backbone}, {args.per_device_batch} x {size[0]}x{size[1]} per "
        f"device in {args.grad_accum_steps} micro-batch(es), {args.parallel}, {args.repeats} "
        f"runs of {args.steps} steps after {args.warmup} warm-up steps; {info}")

  ours = {dtype: bench_ours(args, dtype, size) for dtype in dtypes}
  peer = None
  if args.skip_peer or args.compile_only:
    print("peer skipped: " + ("--skip_peer" if args.skip_peer else "--compile_only"))
  else:
    peer = bench_peer(args, dtypes, size)

  rows = []
  for dtype, r in ours.items():
    plan = r["xla_memory_plan"] or {}
    peak = (r.get("peak_memory") or {}).get("peak_bytes")
    theirs = peer[dtype]["images_per_s"] if peer else None
    rows.append([f"ours {args.backbone}", dtype, r["global_batch"],
                 f"{r['images_per_s']:.3f}" if "images_per_s" in r else "n/a",
                 f"{r['step_ms']:.1f}" if "step_ms" in r else "n/a",
                 common.gib(peak), common.gib(plan.get("total_bytes")),
                 f"{r['compile_s']:.1f}",
                 "n/a" if theirs is None else f"{r['images_per_s'] / theirs:.2f}"])
  if peer:
    for dtype in dtypes:
      p = peer[dtype]
      rows.append([f"torchvision FCOS-R50 ({peer['device']})", dtype, args.per_device_batch,
                   f"{p['images_per_s']:.3f}", f"{p['step_ms']:.1f}",
                   common.gib(p["peak_memory_bytes"]), "", "", ""])
  common.print_table(["system", "dtype", "images/step", "images/s (median)", "ms/step",
                      "peak memory (allocator)", "XLA memory plan", "compile s",
                      "images/s ours / peer"], rows)
  payload = {"args": {"size": list(size), "requested_size": list(args.size),
                      "backbone": args.backbone, "per_device_batch": args.per_device_batch,
                      "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
                      "parallel": args.parallel, "loss_stride": args.loss_stride,
                      "loss_kind": args.loss_kind, "loss_params": args.loss_params,
                      "grad_accum_steps": args.grad_accum_steps,
                      "conv_kernel_grad": args.conv_kernel_grad},
             "info": info, "ours": ours, "peer": peer,
             "ratio_images_per_s": {
                 d: common.ratio(ours[d].get("images_per_s"),
                                 peer[d]["images_per_s"] if peer else None) for d in dtypes}}
  common.print_json("train_speed", payload)
  return payload


if __name__ == "__main__":
  main()
