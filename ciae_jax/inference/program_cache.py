"""Traced programs kept between processes, so that a second demo neither compiles nor traces.

JAX's persistent compilation cache (`launch.py`) saves the XLA compile, but every process still
traces the Python model and lowers it (about 3 s of the synthetic demo's 12 s second run, more
than the compile it saves on some machines). `cached_call(fn, args, folder, key)` stores the
traced program as a `jax.export` artifact (StableHLO) the first time and calls the stored one
afterwards: no Python tracing of the model, and the lowered module is the same, so the
compilation cache still hits.

The key holds what the program depends on: the JAX version, the source of every module of this
package (an edited model is a new program), the caller's key (the hyper-parameters) and the
argument shapes and dtypes. Writes are atomic (temporary file + rename); a file that does not
deserialise is traced again and replaced.
"""
from __future__ import annotations

import functools
import hashlib
import os
import pathlib
from typing import Any, Callable

from absl import logging
import jax

from ciae_jax import platforms

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
  """sha256 of this package's Python sources (names and contents)."""
  digest = hashlib.sha256()
  for path in sorted(_PACKAGE_DIR.rglob("*.py")):
    digest.update(str(path.relative_to(_PACKAGE_DIR)).encode())
    digest.update(path.read_bytes())
  return digest.hexdigest()


def program_key(key: str, args: Any) -> str:
  """File stem of the program of `args`' shapes for the caller's `key`."""
  leaves, treedef = jax.tree.flatten(args)
  digest = hashlib.sha256("\n".join([
      jax.__version__, jax.default_backend(), source_digest(), key, str(treedef),
      *(f"{tuple(x.shape)} {x.dtype}" for x in leaves)]).encode())
  return digest.hexdigest()[:32]


def load_or_export(fn: Callable[..., Any], specs: tuple[Any, ...], folder: str,
                   key: str) -> Any:
  """The stored `jax.export` of `jax.jit(fn)` at `specs` (ShapeDtypeStructs), exported and
  stored first if new."""
  path = os.path.join(folder, f"program-{program_key(key, specs)}.jaxexport")
  if os.path.isfile(path):
    try:
      with open(path, "rb") as f:
        return jax.export.deserialize(bytearray(f.read()))
    except Exception as error:  # pylint: disable=broad-except  (a stale or torn file: retrace)
      logging.warning("program cache: %s unreadable (%s); tracing again", path, error)
  # Exported for the default backend, as `jax.export` does by default.
  jitted = jax.jit(platforms.built_for(fn, platforms.platforms_of(jax.local_devices()[:1])))
  exported = jax.export.export(jitted)(*specs)
  try:
    os.makedirs(folder, exist_ok=True)
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "wb") as f:
      f.write(exported.serialize())
    os.replace(temporary, path)
  except OSError as error:  # A read-only cache only costs the next run its tracing.
    logging.warning("program cache: could not write %s (%s)", path, error)
  return exported


def _specs(args: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)


def cached_call(fn: Callable[..., Any], args: tuple[Any, ...], folder: str, key: str) -> Any:
  """`fn(*args)` through the stored program (`load_or_export`).

  Works inside an outer trace (pmap, jit): `args` may be tracers; only their shapes count.
  """
  return load_or_export(fn, _specs(args), folder, key).call(*args)


def cached_eval_shape(fn: Callable[..., Any], args: tuple[Any, ...], folder: str,
                      key: str) -> Any:
  """`jax.eval_shape(fn, *args)` read from the stored program's output types (no tracing)."""
  exported = load_or_export(fn, _specs(args), folder, key)
  return exported.out_tree.unflatten(
      [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in exported.out_avals])
