r"""One stage of the GPU run, in its own process: `python benchmarks/gpu/stages.py NAME --out DIR`.

`run.py` starts each stage (under its time limit) and each stage writes `DIR/NAME.json` when it
finishes. A stage imports JAX or torch only inside its function: the peer stages never start
JAX's backend, and the pool stage sets `XLA_PYTHON_CLIENT_MEM_FRACTION` before JAX starts.
Stages (sizes for `--tiny`, the CPU test, in brackets):

  env                 versions, GPU, `platforms.choices`, the float32 precision mode
  inference_float32   ours end to end at 1 x 800 x 1344 (128 x 128, resnet_tiny), float32
  inference_bfloat16  the same, bfloat16 activations
  inference_peer      torchvision fcos_resnet50_fpn(weights=None, weights_backbone=None)
  train_float32       our train step, 2 x 800 x 1344 per device (1 x 128 x 128), images/s, peak
  train_bfloat16      the same, bfloat16
  train_peer          torchvision FCOS-R50 training steps (frozen BN as ours, and the literal
                      fcos_resnet50_fpn build), float32 and bfloat16
  pool_float32        our train step in a pool of 11 GiB (fraction of the card's memory)
  pool_bfloat16       the same, bfloat16
  correctness         two train steps and the COCO-sample inference against references.npz

Imports no TensorFlow, clu, ml_collections or pycocotools.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/: common, inference_speed, train_speed.
sys.path.insert(0, str(HERE))

POOL_GIB = 11  # The memory target of the train step (a card with 11 GiB).
PRECISION_NOTE = (
    "XLA on NVIDIA GPUs computes float32 convolutions and matmuls in TF32 by default (10-bit "
    "mantissa inputs, float32 accumulation) unless the precision is 'highest' "
    "(jax_default_matmul_precision / jax.default_matmul_precision); the speed stages run at the "
    "default, the correctness stage at 'highest'")
PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin",
            "jax-cuda13-pjrt", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "torch",
            "torchvision")
BLOCKED = ("tensorflow", "clu", "ml_collections", "pycocotools")


def sizes(tiny: bool) -> dict[str, Any]:
  """Model and sizes of the speed stages: full size, or `--tiny` for the CPU test."""
  if tiny:
    return {"backbone": "resnet_tiny", "infer_size": (128, 128), "train_size": (128, 128),
            "per_device_batch": 1, "infer_repeats": 1, "infer_warmup": 1, "train_steps": 1,
            "train_repeats": 1, "train_warmup": 1}
  return {"backbone": "resnet50", "infer_size": (800, 1344), "train_size": (800, 1344),
          "per_device_batch": 2, "infer_repeats": 10, "infer_warmup": 3, "train_steps": 5,
          "train_repeats": 3, "train_warmup": 2}


def version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def nvidia_smi() -> list[dict[str, str]] | None:
  """name, memory.total (MiB) and driver of each GPU from nvidia-smi; None where absent."""
  fields = ("name", "memory.total", "driver_version")
  try:
    out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  return [dict(zip(fields, (v.strip() for v in line.split(","))))
          for line in out.splitlines() if line.strip()]


def _memory_stats(device: Any) -> dict[str, Any]:
  """The allocator's statistics ({} where the backend has none, e.g. the CPU)."""
  try:
    return device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    return {}


def stage_env(args: argparse.Namespace) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top

  from ciae_jax import platforms  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  lowering = platforms.platforms_of(devices)
  result: dict[str, Any] = {
      "python": sys.version.split()[0], "versions": {p: version(p) for p in PACKAGES},
      "backend": jax.default_backend(), "num_devices": len(devices),
      "devices": [{"platform": d.platform, "kind": getattr(d, "device_kind", ""),
                   "bytes_limit": _memory_stats(d).get("bytes_limit")}
                  for d in devices],
      "platform_version": str(getattr(devices[0].client, "platform_version", "")),
      "platforms": list(lowering),
      "choices": {p: platforms.choices(p) for p in lowering},
      "dtype_auto": platforms.resolve_dtype("auto", lowering),
      "matmul_precision": str(jax.config.jax_default_matmul_precision),
      "precision_note": PRECISION_NOTE, "nvidia_smi": nvidia_smi(),
      "blocked_importable": {m: importlib.util.find_spec(m) is not None for m in BLOCKED},
      "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE",
                                             "XLA_PYTHON_CLIENT_MEM_FRACTION", "JAX_PLATFORMS")}}
  result["cuda"] = cuda_versions()
  return result


def cuda_versions() -> dict[str, Any] | str:
  """Every `*_get_version` of jaxlib's CUDA bindings (runtime, driver, cuDNN, cuBLAS, ... as the
  installed jaxlib names them; private API, so each is read where it answers)."""
  try:
    from jax._src.lib import cuda_versions as module  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except
    return f"not readable: {type(e).__name__}: {e}"
  if module is None:
    return "no CUDA bindings (CPU-only jaxlib)"
  versions: dict[str, Any] = {}
  for name in sorted(dir(module)):
    if name.endswith("_get_version") and callable(getattr(module, name)):
      try:
        versions[name.removesuffix("_get_version")] = getattr(module, name)()
      except Exception as e:  # pylint: disable=broad-except
        versions[name.removesuffix("_get_version")] = f"{type(e).__name__}: {e}"
  return versions


def _namespace(**kwargs: Any) -> argparse.Namespace:
  return argparse.Namespace(**kwargs)


def stage_inference(args: argparse.Namespace, dtype: str) -> dict[str, Any]:
  import common  # pylint: disable=g-import-not-at-top
  import inference_speed  # pylint: disable=g-import-not-at-top
  s = sizes(args.tiny)
  ns = _namespace(size=s["infer_size"], backbone=s["backbone"], batch=1,
                  repeats=s["infer_repeats"], warmup=s["infer_warmup"])
  padded = common.round_up(ns.size, common.PAD_MULTIPLE)
  start = time.perf_counter()
  result = inference_speed.bench_ours(ns, dtype, padded)
  result.update(size=list(ns.size), padded=list(padded), backbone=ns.backbone, batch=1,
                repeats=ns.repeats, warmup=ns.warmup, info=common.device_info(),
                stage_s=time.perf_counter() - start, peak_memory=common.peak_device_memory())
  return result


def _peer_modules() -> tuple[Any, Any] | str:
  """(torch, torchvision), or the reason the peer is skipped."""
  for name in ("torch", "torchvision"):
    if importlib.util.find_spec(name) is None:
      return f"{name} is not installed"
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  return torch, torchvision


def stage_inference_peer(args: argparse.Namespace) -> dict[str, Any]:
  modules = _peer_modules()
  if isinstance(modules, str):
    return {"status": "skipped", "reason": modules}
  import inference_speed  # pylint: disable=g-import-not-at-top
  s = sizes(args.tiny)
  ns = _namespace(size=s["infer_size"], batch=1, repeats=s["infer_repeats"],
                  warmup=s["infer_warmup"], peer_literal=True, peer_score_thresh=0.0)
  result = inference_speed.bench_peer(ns, ["float32", "bfloat16"])
  result.update(size=list(ns.size), repeats=ns.repeats, warmup=ns.warmup,
                call="fcos_resnet50_fpn(weights=None, weights_backbone=None, score_thresh=0)")
  return result


def _train_namespace(args: argparse.Namespace, dtype: str, **overrides: Any
                     ) -> argparse.Namespace:
  s = sizes(args.tiny)
  kwargs = dict(backbone=s["backbone"], per_device_batch=s["per_device_batch"],
                conv_kernel_grad="auto", loss_stride=1, loss_kind="ciae", loss_params={},
                parallel="shard_map", compile_only=False, dtypes=dtype,
                steps=s["train_steps"], repeats=s["train_repeats"], warmup=s["train_warmup"],
                size=s["train_size"], peer_literal=False, grad_accum_steps=1)
  kwargs.update(overrides)
  return _namespace(**kwargs)


def stage_train(args: argparse.Namespace, dtype: str, **overrides: Any) -> dict[str, Any]:
  import common  # pylint: disable=g-import-not-at-top
  import train_speed  # pylint: disable=g-import-not-at-top
  ns = _train_namespace(args, dtype, **overrides)
  start = time.perf_counter()
  result = train_speed.bench_ours(ns, dtype, ns.size)
  result.update(size=list(ns.size), backbone=ns.backbone, per_device_batch=ns.per_device_batch,
                steps=ns.steps, repeats=ns.repeats, warmup=ns.warmup,
                info=common.device_info(), stage_s=time.perf_counter() - start)
  return result


def stage_train_peer(args: argparse.Namespace) -> dict[str, Any]:
  modules = _peer_modules()
  if isinstance(modules, str):
    return {"status": "skipped", "reason": modules}
  import train_speed  # pylint: disable=g-import-not-at-top
  result = {}
  for build, literal in (("frozen_bn", False), ("literal", True)):
    ns = _train_namespace(args, "float32", peer_literal=literal)
    result[build] = train_speed.bench_peer(ns, ["float32", "bfloat16"], ns.size)
  result.update(size=list(ns.size), per_device_batch=ns.per_device_batch, steps=ns.steps,
                repeats=ns.repeats, warmup=ns.warmup)
  return result


def card_bytes() -> int | None:
  """The GPU's total memory (nvidia-smi, else torch in a child process); None without one."""
  smi = nvidia_smi()
  if smi:
    return int(float(smi[0]["memory.total"]) * 2**20)
  if importlib.util.find_spec("torch") is None:
    return None
  code = ("import torch; print(torch.cuda.get_device_properties(0).total_memory "
          "if torch.cuda.is_available() else '')")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, check=False).stdout.strip()
  return int(out) if out.isdigit() else None


def pool_fraction(card: int, pool_bytes: int = POOL_GIB * 2**30) -> float:
  """`XLA_PYTHON_CLIENT_MEM_FRACTION` for a pool of `pool_bytes` on a card of `card` bytes,
  rounded down to 4 decimals (the variable's text) so that the pool is never larger."""
  if card <= 0:
    raise ValueError(f"card memory must be positive, got {card} bytes")
  return min(1.0, math.floor(pool_bytes / card * 1e4) / 1e4)


def stage_pool(args: argparse.Namespace, dtype: str) -> dict[str, Any]:
  total = card_bytes()
  if total is None:  # The CPU test: nothing to cap.
    return {"status": "skipped", "dtype": dtype,
            "reason": "no GPU (nvidia-smi and torch.cuda found none): the pool caps GPU memory"}
  fraction = pool_fraction(total)
  # Before JAX starts: the allocator reads them once. The whole pool up front, as on a card of
  # that size (the limit holds either way).
  os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{fraction:.4f}"
  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "true"
  result: dict[str, Any] = {"pool_gib": POOL_GIB, "card_bytes": total, "dtype": dtype,
                            "mem_fraction": fraction}
  s = sizes(args.tiny)
  try:
    train = stage_train(args, dtype, steps=2, repeats=1, warmup=1)
  except Exception as e:  # pylint: disable=broad-except  (RESOURCE_EXHAUSTED: out of memory)
    result.update(runs=False, error=f"{type(e).__name__}: {str(e)[:2000]}")
    return result
  memory = train.get("peak_memory") or {}
  peak = memory.get("peak_bytes")
  result.update(runs=True, peak_bytes=peak, bytes_limit=memory.get("limit_bytes"),
                xla_memory_plan=train["xla_memory_plan"], images_per_s=train["images_per_s"],
                compile_s=train["compile_s"], per_device_batch=s["per_device_batch"],
                size=train["size"],
                within_target=None if peak is None else peak <= POOL_GIB * 2**30)
  return result


def stage_correctness(args: argparse.Namespace) -> dict[str, Any]:
  import correctness  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  inputs, reference = correctness.load_references(args.references or correctness.REFERENCES)
  start = time.perf_counter()
  result = correctness.run(inputs)
  check = correctness.compare(result, reference)
  check.update(backend=jax.default_backend(), stage_s=time.perf_counter() - start,
               matmul_precision="highest", reference_backend=reference["meta"]["backend"],
               reference_jax=reference["meta"]["jax"],
               reference_perturbation_flips=reference["meta"]["perturbation_flips"])
  return check


STAGES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "env": stage_env,
    "inference_float32": lambda a: stage_inference(a, "float32"),
    "inference_bfloat16": lambda a: stage_inference(a, "bfloat16"),
    "inference_peer": stage_inference_peer,
    "train_float32": lambda a: stage_train(a, "float32"),
    "train_bfloat16": lambda a: stage_train(a, "bfloat16"),
    "train_peer": stage_train_peer,
    "pool_float32": lambda a: stage_pool(a, "float32"),
    "pool_bfloat16": lambda a: stage_pool(a, "bfloat16"),
    "correctness": stage_correctness,
}


def write_json(path: pathlib.Path, payload: dict[str, Any]) -> None:
  """Writes atomically (a partial file never stands for a finished stage)."""
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(payload, indent=1, sort_keys=True, default=float) + "\n")
  os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("stage", choices=sorted(STAGES))
  parser.add_argument("--out", required=True, help="folder of the stage's NAME.json")
  parser.add_argument("--tiny", action="store_true", help="CPU test sizes (resnet_tiny)")
  parser.add_argument("--references", default=None, help="correctness references (.npz)")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  start = time.time()
  try:
    payload = STAGES[args.stage](args)
    payload.setdefault("status", "ok")
  except Exception as e:  # pylint: disable=broad-except  (recorded; the next stage runs)
    traceback.print_exc()
    payload = {"status": "failed", "error": f"{type(e).__name__}: {str(e)[:4000]}"}
  payload.update(stage=args.stage, tiny=args.tiny, wall_s=time.time() - start)
  write_json(out / f"{args.stage}.json", payload)
  print(f"{args.stage}: {payload['status']} in {payload['wall_s']:.1f} s")
  return 0 if payload["status"] in ("ok", "skipped") else 1


if __name__ == "__main__":
  sys.exit(main())
