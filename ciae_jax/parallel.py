"""Data parallelism: one per-device function, run under `jax.pmap` or `jax.shard_map` + `jax.jit`.

The per-device function `fn(state, batch) -> (state, metrics)` sees one device's batch
`[per_device_batch, ...]` and uses named-axis collectives over `AXIS_NAME`. Its state and metrics
must come out identical on every device (pmean/psum-ed).

Layouts on the host side of the switch:
- "pmap": state replicated with a leading local-device axis; batch `[local_devices, b, ...]`
  numpy; outputs carry the device axis.
- "shard_map": state a global array replicated over a 1-D mesh (`P()`); batch a global array
  `[devices, b, ...]` sharded on its leading axis (`P(AXIS_NAME)`); outputs are single copies.
"""
import functools
from typing import Any, Callable, Optional, Sequence

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from ciae_jax import platforms as platforms_lib

AXIS_NAME = "batch"
PARALLEL_MODES = ("pmap", "shard_map")


def _check_mode(parallel: str) -> None:
  if parallel not in PARALLEL_MODES:
    raise ValueError(f"config.parallel must be one of {PARALLEL_MODES}, got {parallel!r}")


def make_mesh(devices: Optional[list] = None) -> Mesh:
  """1-D mesh over all (global) devices with axis `AXIS_NAME`."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS_NAME,))


def _built_for_devices(fn: Callable, parallel: str, mesh: Optional[Mesh],
                       devices: Optional[list], platforms: Optional[Sequence[str]]) -> Callable:
  """`fn` traced for `platforms`, by default those of the devices it runs on."""
  if platforms is None:
    if parallel == "shard_map" and mesh is not None:
      devices = list(mesh.devices.flat)
    platforms = platforms_lib.platforms_of(devices)
  return platforms_lib.built_for(fn, platforms)


def parallelize(fn: Callable[[Any, Any], tuple[Any, Any]], *, parallel: str = "pmap",
                mesh: Optional[Mesh] = None, devices: Optional[list] = None,
                donate: bool = True, platforms: Optional[Sequence[str]] = None) -> Callable:
  """Wraps the per-device `fn(state, batch)` for data parallelism (see module docstring).

  `devices` (pmap) or `mesh` (shard_map) restrict the step to some devices (tests use one).
  `platforms` (default: those of the devices) choose the fast paths (`ciae_jax.platforms`);
  name others only to lower the program for them (`.trace(...).lower(lowering_platforms=...)`).
  """
  _check_mode(parallel)
  fn = _built_for_devices(fn, parallel, mesh, devices, platforms)
  donate_argnums = (0,) if donate else ()
  if parallel == "pmap":
    return jax.pmap(fn, axis_name=AXIS_NAME, devices=devices, donate_argnums=donate_argnums)
  mesh = make_mesh(devices) if mesh is None else mesh

  def per_block(state, batch):
    # The block of one device is [1, b, ...]: drop the device axis for `fn`.
    local = jax.tree.map(lambda x: x[0], batch)  # [b, ...]
    return fn(state, local)

  mapped = jax.shard_map(per_block, mesh=mesh, in_specs=(P(), P(AXIS_NAME)),
                         out_specs=(P(), P()))
  return jax.jit(mapped, donate_argnums=donate_argnums)


def parallelize_map(fn: Callable[[Any, Any], Any], *, parallel: str = "pmap",
                    mesh: Optional[Mesh] = None, devices: Optional[list] = None,
                    platforms: Optional[Sequence[str]] = None) -> Callable:
  """Wraps a per-device `fn(consts, batch) -> outputs` whose outputs are per example (prediction).

  `consts` (e.g. variables and memory) are replicated as `replicate` puts them; `batch` is
  `shard_batch`'s layout; every output has the device's rows `[b, ...]` in front. Host layout of
  the outputs: "pmap" `[local_devices, b, ...]`; "shard_map" a global array `[devices, b, ...]`
  sharded on its leading axis. `local_rows` fetches this process's rows in both modes.
  `platforms` as in `parallelize`.
  """
  _check_mode(parallel)
  fn = _built_for_devices(fn, parallel, mesh, devices, platforms)
  if parallel == "pmap":
    return jax.pmap(fn, axis_name=AXIS_NAME, devices=devices)
  mesh = make_mesh(devices) if mesh is None else mesh

  def per_block(consts, batch):
    local = jax.tree.map(lambda x: x[0], batch)  # [b, ...]
    return jax.tree.map(lambda y: y[None], fn(consts, local))  # [1, b, ...]

  # No collectives inside: the per-device code (e.g. loops whose carry starts replicated and
  # becomes per-device) need not track which values vary over the axis.
  return jax.jit(jax.shard_map(per_block, mesh=mesh, in_specs=(P(), P(AXIS_NAME)),
                               out_specs=P(AXIS_NAME), check_vma=False))


def local_rows(tree: Any, *, parallel: str = "pmap") -> Any:
  """This process's part of `parallelize_map`'s outputs as host NumPy `[local_devices, b, ...]`."""
  _check_mode(parallel)
  if parallel == "pmap":
    return jax.device_get(tree)

  def fetch(x):
    # Shards in the order of their rows of the global array (one shard per local device).
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])
  return jax.tree.map(fetch, tree)


def replicate(tree: Any, *, parallel: str = "pmap", mesh: Optional[Mesh] = None,
              devices: Optional[list] = None) -> Any:
  """Puts a host (or single-device) tree on every device in the layout `parallel` expects."""
  _check_mode(parallel)
  if parallel == "pmap":
    # The sharding pmap gives its outputs: a stacked copy per local device on a mesh whose axis
    # is named AXIS_NAME. Matching it exactly avoids a second compilation on the second step.
    devices = jax.local_devices() if devices is None else devices
    sharding = NamedSharding(Mesh(np.asarray(devices), (AXIS_NAME,)), P(AXIS_NAME))

    def stack(x):
      x = np.asarray(jax.device_get(x))
      return jax.device_put(np.broadcast_to(x[None], (len(devices),) + x.shape), sharding)
    return jax.tree.map(stack, tree)
  mesh = make_mesh(devices) if mesh is None else mesh
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.device_put(np.asarray(jax.device_get(x)), sharding), tree)


def unreplicate(tree: Any, *, parallel: str = "pmap") -> Any:
  """One copy of a replicated tree, fetched to host numpy."""
  _check_mode(parallel)
  if parallel == "pmap":
    # The shard that holds row 0 of the stacked copies, copied to host: no device program
    # (`x[0]` would compile a gather for every distinct leaf shape).
    return jax.tree.map(_first_row, tree)
  # A replicated global array may span hosts: read this process's first copy.
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def _first_row(x: Any) -> np.ndarray:
  """Row 0 of a per-device stacked array `[devices, ...]` (pmap's layout), as host numpy."""
  if not isinstance(x, jax.Array):
    return np.asarray(x)[0]
  for shard in x.addressable_shards:
    rows = shard.index[0] if shard.index else slice(None)
    if (rows.start or 0) == 0:
      data = np.asarray(shard.data)
      # A pmap sharding's shard drops the stacked axis; a NamedSharding's keeps it (size 1).
      return data if data.ndim == x.ndim - 1 else np.asarray(data[0])
  raise ValueError(f"no local shard holds row 0 of an array of shape {x.shape}")


def shard_batch(batch: Any, *, parallel: str = "pmap", mesh: Optional[Mesh] = None) -> Any:
  """Host batch `[local_devices, b, ...]` -> what the parallel step takes.

  Under "pmap" numpy goes in as is. Under "shard_map" each process's local rows become its
  devices' shards of a global array `[global_devices, b, ...]`.
  """
  _check_mode(parallel)
  if parallel == "pmap":
    return batch
  mesh = make_mesh() if mesh is None else mesh
  sharding = NamedSharding(mesh, P(AXIS_NAME))
  return jax.tree.map(functools.partial(jax.make_array_from_process_local_data, sharding), batch)


def to_varying(tree: Any) -> Any:
  """Marks replicated values as per-device before differentiating through them.

  Under `shard_map` (with `check_vma`), the gradient with respect to a replicated (`P()`) input
  comes out already summed over devices. Casting the parameters to "varying" first, with
  `jax.lax.pcast(x, AXIS_NAME, to="varying")`, gives each device its own local gradient, as
  under `pmap`, so the same `pmean` follows in both modes. Under `pmap` the cast changes
  nothing. The values must be replicated (invariant over `AXIS_NAME`): JAX rejects the cast of
  a value that varies already.

  Raises RuntimeError if this JAX has no `jax.lax.pcast` (added in JAX 0.7): without the cast,
  shard_map gradients would be summed over the devices, N times too large.
  """
  pcast = getattr(jax.lax, "pcast", None)
  if pcast is None:
    raise RuntimeError(
        f"jax {jax.__version__} has no jax.lax.pcast, which the data-parallel train step needs "
        "to take per-device gradients (install the JAX of requirements.txt)")
  return jax.tree.map(lambda x: pcast(x, AXIS_NAME, to="varying"), tree)


def first_copy(tree: Any, *, parallel: str = "pmap") -> Any:
  """Metrics (or any output) of the parallel step as one copy, still on device."""
  _check_mode(parallel)
  if parallel == "pmap":
    return jax.tree.map(lambda x: x[0], tree)
  return tree
