"""The one switch between the method's plain JAX path and the platform fast paths.

The method (models, losses, inference) is written in plain JAX and flax. Where a platform is
measurably faster, or lighter, with a different implementation of the same values, that
implementation lives in `ciae_jax.fast_paths` and is chosen here, by `switch`, from the
platforms the program is *built for*:

- A program's builder names them with `built_for(fn, platforms)`: `parallel.parallelize` and
  `parallelize_map` (the platforms of their devices), the evaluation's and the model's jits (the
  local devices'), `export_lib` (the export's platforms). Traced for one platform, `switch`
  calls that platform's branch and nothing else is traced, differentiated or compiled; for
  several, it keeps their branches only.
- Anywhere else (a user's own `jax.jit` of a model or loss), `switch` is
  `jax.lax.platform_dependent`: both branches are traced and the lowering keeps the branch of
  the platform it lowers for. Always right, but it traces every branch, and XLA's quick
  compilation mode (`jax_disable_most_optimizations`) compiles the kept branch as a conditional.

Nothing reads the tracing host's default backend inside `switch`, so a program exported for
`cuda` on a CPU host holds the GPU choices.

`FAST_PATHS` is the table: each entry names the platforms a fast path serves, where its
measurement is recorded, and what it changes. Every fast path has its plain path in the library
beside it and a test that the two agree (the tests named in `FAST_PATHS`).

The compute dtype `model.dtype="auto"` changes array types, which one program cannot switch per
platform: it is resolved once, when a model is built, from the platforms its programs are built
for (`resolve_dtype`).
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
from typing import Any, Callable, Iterable, Sequence

import jax

# Platforms as `jax.jit(...).lower(lowering_platforms=...)` and `jax.export` name them.
LOWERING_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
_DEVICE_TO_LOWERING = {"gpu": "cuda"}  # `Device.platform` says "gpu" for CUDA and ROCm.

# model.dtype="auto": bfloat16 where the hardware computes it natively; float32 on CPU, where
# XLA:CPU gains nothing from it (inference no faster, training slower: benchmarks/RESULTS.md,
# "Tried, not adopted").
_AUTO_DTYPES = {"cpu": "float32", "cuda": "bfloat16", "rocm": "bfloat16", "tpu": "bfloat16"}


@dataclasses.dataclass(frozen=True)
class FastPath:
  """A platform-specific implementation of a piece of the method (values equal to the plain
  path's up to float32 rounding, or exactly, as `test` checks)."""
  platforms: tuple[str, ...]  # Lowering platforms that take the fast path.
  where: str  # The module of the fast path.
  why: str  # What it buys, and where that was measured.
  test: str  # The test that the fast and plain paths agree.


_CPU = ("cpu",)
_ACCELERATORS = ("cuda", "rocm", "tpu")

FAST_PATHS: dict[str, FastPath] = {
    "conv_kernel_grad": FastPath(
        _CPU, "ciae_jax.fast_paths.conv",
        "kernel gradients as per-tap matmuls: 1.6-2x faster R50 steps on XLA:CPU",
        "tests/test_conv.py"),
    "norm_grads": FastPath(
        _CPU, "ciae_jax.fast_paths.norms",
        "written GroupNorm / L2-normalisation gradients: smaller memory plan on XLA:CPU",
        "tests/test_ops_memory.py"),
    "segment_sums_loop": FastPath(
        _CPU, "ciae_jax.fast_paths.segment_sums",
        "segment sums as a loop of in-place scatter-adds: no extra copy of the embedding on "
        "XLA:CPU", "tests/test_segment_sums.py"),
    "segment_sums_matmul": FastPath(
        _ACCELERATORS, "ciae_jax.fast_paths.segment_sums",
        "segment sums as one one-hot matmul: one pass, deterministic (scatter-adds of floats "
        "are not on GPUs)", "tests/test_segment_sums.py"),
    "nms_fixed_point": FastPath(
        _ACCELERATORS, "ciae_jax.fast_paths.nms",
        "greedy NMS from one IoU matrix and a short fixed-point loop instead of "
        "`max_detections` sequential steps", "tests/test_nms.py"),
    "assign_bands": FastPath(
        _CPU, "ciae_jax.fast_paths.assign",
        "pixel assignment in row bands that stay in cache: 2.7x faster at 512 x 768 on CPU",
        "tests/test_inference.py"),
    "argmax_reductions": FastPath(
        _CPU, "ciae_jax.fast_paths.assign",
        "the assignment's argmax as a max and a min reduction, which XLA:CPU vectorises",
        "tests/test_inference.py"),
    "loss_small_chunks": FastPath(
        _CPU, "ciae_jax.losses.engine",
        "CIAE loss in chunks of 1024 pixels (cache-sized) instead of 65536",
        "tests/test_loss_engine.py"),
    "top_k_call": FastPath(
        _CPU, "ciae_jax.ops",
        "keeps XLA:CPU's TopK call in the CIAE loss (a full sort otherwise, ~20x slower)",
        "tests/test_loss_engine.py"),
}


# The platforms of the program being traced, set by `built_for` (None: not declared).
_BUILDING_FOR: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "ciae_jax_building_for", default=None)


def _lowering_names(platforms: Sequence[str] | str) -> tuple[str, ...]:
  names = (platforms,) if isinstance(platforms, str) else tuple(platforms)
  if not names:
    raise ValueError("a program is built for at least one platform; got none")
  return tuple(dict.fromkeys(lowering_platform(p) for p in names))


def built_for(fn: Callable[..., Any], platforms: Sequence[str] | str) -> Callable[..., Any]:
  """`fn` whose body is traced with `switch` choosing for `platforms` (lowering names, or
  "gpu"): the function to hand to `jax.jit`, `jax.pmap`, `shard_map` or `jax.export` for
  programs built for those platforms.

  The platforms belong to this wrapper, a new function object, so jit's trace cache (keyed on
  the function) never serves a trace for other platforms. Lowering the result for a platform it
  was not built for runs that program's choices there (correct values, not that platform's
  fast paths).
  """
  names = _lowering_names(platforms)  # Checked now, not at the first trace.

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    token = _BUILDING_FOR.set(names)
    try:
      return fn(*args, **kwargs)
    finally:
      _BUILDING_FOR.reset(token)
  return traced


def switch(name: str, *args: Any, fast: Callable[..., Any], plain: Callable[..., Any]) -> Any:
  """`fast(*args)` when lowering for a platform of `FAST_PATHS[name]`, else `plain(*args)`.

  Both must return the same shapes and dtypes; `args` are pytrees of arrays. Only the branch
  of the lowering platform is compiled, residuals included (see the module docstring for what
  is traced).
  """
  return select(*args, plain=plain, **{name: fast})


def select(*args: Any, plain: Callable[..., Any], **fast: Callable[..., Any]) -> Any:
  """`switch` with several fast paths (`{name in FAST_PATHS: function}`) for disjoint
  platforms, e.g. one for CPU and one for accelerators; `plain` everywhere else."""
  branches: dict[str, Callable[..., Any]] = {}
  for name, fn in fast.items():
    for platform in FAST_PATHS[name].platforms:
      if platform in branches:
        raise ValueError(f"platform {platform!r} has two fast paths: {sorted(fast)}")
      branches[platform] = fn
  target = _BUILDING_FOR.get()
  if target is None:
    return jax.lax.platform_dependent(*args, **branches, default=plain)
  if len(target) == 1:
    return branches.get(target[0], plain)(*args)
  return jax.lax.platform_dependent(
      *args, **{p: fn for p, fn in branches.items() if p in target}, default=plain)


def lowering_platform(platform: str) -> str:
  """"cpu", "cuda", "rocm" or "tpu" for a device platform ("gpu" counts as "cuda") or a lowering
  platform name; ValueError names an unknown one."""
  name = _DEVICE_TO_LOWERING.get(platform.lower(), platform.lower())
  if name not in LOWERING_PLATFORMS:
    raise ValueError(f"unknown platform {platform!r}; expected one of {LOWERING_PLATFORMS} "
                     "(or 'gpu')")
  return name


def platforms_of(devices: Iterable[Any] | None = None) -> tuple[str, ...]:
  """The lowering platforms of `devices` (default: `jax.devices()`), without repeats."""
  devices = jax.devices() if devices is None else devices
  return tuple(dict.fromkeys(_device_lowering_platform(d) for d in devices))


def _device_lowering_platform(device: Any) -> str:
  if device.platform == "gpu":
    version = str(getattr(device.client, "platform_version", "")).lower()
    return "rocm" if "rocm" in version else "cuda"
  return lowering_platform(device.platform)


def choices(platform: str) -> dict[str, str]:
  """`{fast path name: "fast" | "plain"}` as programs lowered for `platform` take them."""
  platform = lowering_platform(platform)
  return {name: "fast" if platform in path.platforms else "plain"
          for name, path in FAST_PATHS.items()}


def resolve_dtype(dtype: str, platforms: Sequence[str] | str | None = None) -> str:
  """`model.dtype` for programs built for `platforms` (default: those of `jax.devices()`).

  "auto" becomes bfloat16 on GPU and TPU and float32 on CPU; other values stay. ValueError when
  "auto" means different dtypes on the given platforms (an export for both CPU and GPU): name
  the dtype then.
  """
  if dtype != "auto":
    return dtype
  if platforms is None:
    platforms = platforms_of()
  resolved = {_AUTO_DTYPES[p] for p in _lowering_names(platforms)}
  if len(resolved) != 1:
    raise ValueError(f"config.model.dtype='auto' means {sorted(resolved)} on platforms "
                     f"{tuple(platforms)}: set model.dtype to one of them, or build for one "
                     "platform")
  return resolved.pop()
