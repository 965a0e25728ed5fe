"""Shared pieces of the speed benchmarks (no TensorFlow: they must run where only JAX is).

The model is CIAE with random weights (timings do not depend on the weights: every shape in
our inference is static), COCO's 53 stuff and 80 thing classes, and a synthetic training batch
in the layout of docs/interfaces.md. The peer is torchvision's FCOS-R50, imported only when
asked for and skipped with a printed line when torch or torchvision is absent.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

# JAX and the PyTorch peer share one GPU in a run: JAX grows its pool as needed instead of
# taking 75% of the memory up front (set the variable to "true" to restore that).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ciae_jax import hparams  # noqa: E402
from ciae_jax import memory as memory_lib  # noqa: E402
from ciae_jax import platforms  # noqa: E402
from ciae_jax.models import ciae as ciae_model  # noqa: E402

NUM_STUFF = 53  # COCO panoptic
NUM_THINGS = 80
# Images are padded to multiples of the network's size divisor, as torchvision pads.
PAD_MULTIPLE = ciae_model.SIZE_DIVISOR


def add_conv_kernel_grad_flag(parser: Any) -> None:
  """`--conv_kernel_grad`, passed to `build_model` (`model.conv_kernel_grad`)."""
  parser.add_argument("--conv_kernel_grad", default="auto", choices=hparams.KERNEL_GRADS,
                      help="model.conv_kernel_grad (auto: matmul on CPU for 1x1 and wide "
                           "kernels and for maps smaller than the kernel, XLA's elsewhere)")


def parse_size(text: str) -> tuple[int, int]:
  """'800,1344' or '800x1344' -> (800, 1344)."""
  parts = text.replace("x", ",").split(",")
  if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
    raise ValueError(f"--size must be 'H,W' (e.g. 800,1344), got {text!r}")
  height, width = (int(p) for p in parts)
  if height < 1 or width < 1:
    raise ValueError(f"--size must be positive, got {text!r}")
  return height, width


def round_up(size: Sequence[int], multiple: int) -> tuple[int, int]:
  """Each side rounded up to a multiple of `multiple`."""
  return tuple(int(math.ceil(s / multiple) * multiple) for s in size)


def build_model(backbone: str, dtype: str, num_things: int = NUM_THINGS,
                conv_kernel_grad: str = "auto") -> ciae_model.CIAE:
  """CIAE with the paper's settings but `backbone`, `dtype` (narrow for 'resnet_tiny') and
  `conv_kernel_grad` (`model.conv_kernel_grad`)."""
  kwargs = {"backbone": backbone, "dtype": dtype, "conv_kernel_grad": conv_kernel_grad}
  if backbone == "resnet_tiny":  # Test-sized: narrow everything.
    kwargs.update(fpn_dim=32, semantic_dim=16, head_convs=1)
  return ciae_model.build_model(kwargs, num_things, NUM_STUFF)


def init_variables(model: ciae_model.CIAE, seed: int = 0) -> Any:
  """Random model variables (frozen-BN statistics at their identity values)."""
  images = jnp.zeros((1, *ciae_model.INIT_IMAGE_HW, 3), jnp.float32)  # [1, 128, 128, 3]
  init = jax.jit(lambda rng: model.init(rng, images))
  # The "unsafe_rbg" generator compiles ~4x faster than threefry on CPU (37 s -> 9 s for the
  # tiny model); the weights only need the right shapes and scales here.
  return init(jax.random.key(seed, impl="unsafe_rbg"))


def random_memory(num_stuff: int = NUM_STUFF, dim: int = 32, seed: int = 1) -> jax.Array:
  """A unit-row memory `[num_stuff + 1, D]` (things merged), as in the train state."""
  return memory_lib.init_memory(jax.random.PRNGKey(seed), num_stuff + 1, dim)  # [M, D]


def normalised_images(batch: int, size: Sequence[int], seed: int = 2) -> np.ndarray:
  """`[B, H, W, 3]` float32 images with ImageNet-normalised statistics (roughly N(0, 1))."""
  rng = np.random.default_rng(seed)
  return rng.standard_normal((batch, *size, 3), dtype=np.float32)  # [B, H, W, 3]


def synthetic_example(rng: np.random.Generator, size: Sequence[int], *, num_stuff: int,
                      num_things: int, max_segments: int, things: int = 12,
                      stuff: int = 4) -> dict[str, np.ndarray]:
  """One training example in the layout of docs/interfaces.md (without ids and sizes).

  `stuff` horizontal bands cover the image, then `things` rectangles of 32-400 px sides are
  painted over them; each segment's box is the box of its visible pixels.
  """
  height, width = size
  segment_map = np.zeros((height, width), np.int32)  # [H, W]
  classes = []
  edges = np.linspace(0, height, stuff + 1).astype(int)
  for row, (top, bottom) in enumerate(zip(edges[:-1], edges[1:])):
    segment_map[top:bottom] = row + 1
    classes.append((int(rng.integers(num_stuff)), False))
  for _ in range(min(things, max_segments - stuff)):
    h, w = (int(v) for v in rng.integers(32, min(400, height, width) + 1, size=2))
    y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    segment_map[y:y + h, x:x + w] = len(classes) + 1
    classes.append((num_stuff + int(rng.integers(num_things)), True))
  example = {
      "segment_map": segment_map,
      "seg_class": np.zeros((max_segments,), np.int32),
      "seg_is_thing": np.zeros((max_segments,), bool),
      "seg_is_crowd": np.zeros((max_segments,), bool),
      "seg_box": np.zeros((max_segments, 4), np.float32),
      "seg_valid": np.zeros((max_segments,), bool),
  }
  for row, (cls, is_thing) in enumerate(classes):
    ys, xs = np.nonzero(segment_map == row + 1)
    if ys.size == 0:  # Painted over entirely: leave the row invalid.
      continue
    example["seg_class"][row] = cls
    example["seg_is_thing"][row] = is_thing
    example["seg_box"][row] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    example["seg_valid"][row] = True
  return example


def synthetic_batch(devices: int, per_device: int, size: Sequence[int], *,
                    num_stuff: int = NUM_STUFF, num_things: int = NUM_THINGS,
                    max_segments: int = 100, seed: int = 3) -> dict[str, np.ndarray]:
  """A host training batch `[devices, per_device, ...]` of synthetic examples."""
  rng = np.random.default_rng(seed)
  examples = [synthetic_example(rng, size, num_stuff=num_stuff, num_things=num_things,
                                max_segments=max_segments)
              for _ in range(devices * per_device)]
  batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  batch["image"] = normalised_images(devices * per_device, size, seed=seed)
  return {k: v.reshape(devices, per_device, *v.shape[1:]) for k, v in batch.items()}


def time_calls(fn: Callable[[], Any], *, repeats: int, warmup: int,
               sync: Callable[[Any], Any] = jax.block_until_ready) -> list[float]:
  """Wall seconds of `repeats` calls of `fn` (each synchronised), after `warmup` calls."""
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - start)
  return times


def interleaved(calls: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int,
                sync: Mapping[str, Callable[[Any], Any]] | None = None
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
  """Wall and process-CPU seconds per call of each function: `repeats` rounds after `warmup`.

  The functions take turns within each round, the order rotated from round to round, so that
  each is timed under the same load as the others (the machines are shared). `sync[name]`
  waits for a result (default `jax.block_until_ready`). CPU time (all threads) moves less with
  other jobs' load than wall time, but counts spinning worker threads too.
  """
  names = list(calls)
  times: dict[str, list[float]] = {n: [] for n in names}
  cpu_times: dict[str, list[float]] = {n: [] for n in names}
  for round_index in range(warmup + repeats):
    order = names[round_index % len(names):] + names[:round_index % len(names)]
    for name in order:
      wait = sync[name] if sync else jax.block_until_ready
      start, cpu_start = time.perf_counter(), time.process_time()
      wait(calls[name]())
      if round_index >= warmup:
        times[name].append(time.perf_counter() - start)
        cpu_times[name].append(time.process_time() - cpu_start)
  return times, cpu_times


def flops_of(compiled: Any) -> float | None:
  """XLA's FLOP estimate of a compiled program (None where not reported)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


def summary(times: Sequence[float]) -> dict[str, float]:
  """Median / min / max in milliseconds."""
  return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
          "max_ms": 1e3 * max(times)}


def device_info() -> dict[str, Any]:
  """The JAX device, versions, CPU count, load and date, for the results."""
  device = jax.devices()[0]
  info = {"device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
          "num_devices": jax.device_count(), "jax": jax.__version__,
          "python": platform.python_version(), "cpus": os.cpu_count(),
          "matmul_precision": str(jax.config.jax_default_matmul_precision),
          "float32_mode": float32_mode(),
          "fast_paths": platforms.choices(platforms.platforms_of()[0]),
          "date": datetime.date.today().isoformat()}
  if hasattr(os, "getloadavg"):
    info["load_avg"] = round(os.getloadavg()[0], 1)
  return info


def float32_mode() -> str:
  """What float32 matmuls and convolutions compute in on this device (docs/architecture.md,
  "Platforms"): under JAX's default precision NVIDIA GPUs from Ampere on take TF32 (10-bit
  mantissas), CPUs full float32; the similarity dots of the loss and of inference ask for
  "highest" themselves."""
  precision = str(jax.config.jax_default_matmul_precision or "default")
  if jax.devices()[0].platform != "gpu" or precision in ("highest", "float32"):
    return f"float32 (jax_default_matmul_precision={precision})"
  return f"TF32 convolutions and matmuls (jax_default_matmul_precision={precision})"


def peak_device_memory() -> dict[str, int] | None:
  """Peak and limit bytes of device 0 from its allocator (None where not reported, e.g. CPU)."""
  stats = jax.devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return {"peak_bytes": int(stats["peak_bytes_in_use"]),
          "limit_bytes": int(stats.get("bytes_limit", 0))}


def compiled_memory(compiled: Any) -> dict[str, int] | None:
  """XLA's static memory plan of a compiled program: arguments, outputs, temporaries, total."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None
  if analysis is None:
    return None
  args = int(analysis.argument_size_in_bytes)
  out = int(analysis.output_size_in_bytes)
  temp = int(analysis.temp_size_in_bytes)
  alias = int(getattr(analysis, "alias_size_in_bytes", 0))
  return {"argument_bytes": args, "output_bytes": out, "temp_bytes": temp,
          "alias_bytes": alias, "total_bytes": args + out + temp - alias}


def gib(num_bytes: float | None) -> str:
  """Bytes as 'x.xx GiB' ('n/a' for None)."""
  return "n/a" if num_bytes is None else f"{num_bytes / 2**30:.2f} GiB"


def import_torchvision() -> tuple[Any, Any] | None:
  """(torch, torchvision), or None after printing why the peer is skipped."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("peer skipped: torch is not installed (torchvision FCOS needs torch and torchvision)")
    return None
  try:
    import torchvision  # pylint: disable=g-import-not-at-top
  except ImportError:
    print(f"peer skipped: torchvision is not installed (torch {torch.__version__} is)")
    return None
  return torch, torchvision


def build_torchvision_fcos(torchvision: Any, size: Sequence[int], *, literal: bool,
                           score_thresh: float) -> Any:
  """torchvision FCOS-R50-FPN with random weights, fed `size` images without resizing.

  `literal`: `fcos_resnet50_fpn(weights=None, weights_backbone=None)` as called, which gives a
  trainable BatchNorm backbone. Otherwise the network that call builds when a backbone checkpoint
  is given (how FCOS is trained: FrozenBatchNorm2d, 3 trainable stages) - the same setting as
  ours (frozen BN, stem and layer1 frozen) - still randomly initialised (nothing is downloaded).
  min_size / max_size are set to `size` so that the transform keeps the image at its size.
  """
  height, width = size
  kwargs = dict(min_size=min(height, width), max_size=max(height, width),
                score_thresh=score_thresh)
  detection = torchvision.models.detection
  if literal:
    return detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, **kwargs)
  from torchvision.models.detection import backbone_utils  # pylint: disable=g-import-not-at-top
  from torchvision.ops import feature_pyramid_network  # pylint: disable=g-import-not-at-top
  from torchvision.ops import misc as misc_ops  # pylint: disable=g-import-not-at-top
  backbone = torchvision.models.resnet50(weights=None, norm_layer=misc_ops.FrozenBatchNorm2d)
  backbone = backbone_utils._resnet_fpn_extractor(  # pylint: disable=protected-access
      backbone, 3, returned_layers=[2, 3, 4],
      extra_blocks=feature_pyramid_network.LastLevelP6P7(256, 256))
  return detection.FCOS(backbone, num_classes=91, **kwargs)


def torch_flops(calls: Mapping[str, Callable[[], Any]]) -> dict[str, float]:
  """FLOPs of one call of each torch function, from torch's `FlopCounterMode`."""
  from torch.utils import flop_counter  # pylint: disable=g-import-not-at-top
  flops = {}
  for name, call in calls.items():
    counter = flop_counter.FlopCounterMode(display=False)
    with counter:
      call()
    flops[name] = float(counter.get_total_flops())
  return flops


def torch_sync(torch: Any, device: str) -> Callable[[Any], Any]:
  """A `sync(result)` for time_calls that waits for the device's queued work."""
  def sync(result):
    if device.startswith("cuda"):
      torch.cuda.synchronize()
    return result
  return sync


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
  """A markdown table on stdout."""
  print("| " + " | ".join(header) + " |")
  print("|" + "|".join("---" for _ in header) + "|")
  for row in rows:
    print("| " + " | ".join(str(v) for v in row) + " |")


def print_json(name: str, payload: Mapping[str, Any]) -> None:
  """The one-line JSON summary that closes every benchmark's output."""
  print(f"{name} " + json.dumps(payload, sort_keys=True, default=float))


def ratio(ours: float | None, theirs: float | None) -> float | None:
  """ours / theirs, or None when either is missing."""
  if ours is None or theirs is None or theirs == 0:
    return None
  return ours / theirs
