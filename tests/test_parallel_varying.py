"""`parallel.to_varying`: per-device gradients of replicated parameters under pmap and shard_map."""
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from ciae_jax import parallel


def _local_grads(mode):
  """Each device's gradient of sum(w * x_device) w.r.t. the replicated w: x_device itself."""
  devices = jax.devices()[:2]
  x = jnp.arange(8.0).reshape(2, 4)  # [devices, 4]
  w = jnp.ones(4)

  def per_device(w, x):
    return jax.grad(lambda w: jnp.sum(w * x))(parallel.to_varying(w))

  if mode == "pmap":
    return np.asarray(jax.pmap(per_device, axis_name=parallel.AXIS_NAME, devices=devices)(
        jnp.stack([w, w]), x))
  mesh = parallel.make_mesh(devices)
  run = jax.jit(jax.shard_map(lambda w, x: per_device(w, x[0])[None], mesh=mesh,
                              in_specs=(P(), P(parallel.AXIS_NAME)),
                              out_specs=P(parallel.AXIS_NAME)))
  return np.asarray(run(w, x))


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_gradients_stay_per_device(mode):
  # Without the cast, shard_map would return the sum over devices (x[0] + x[1]) on each.
  np.testing.assert_array_equal(_local_grads(mode), np.arange(8.0).reshape(2, 4))


def test_a_jax_without_pcast_is_a_clear_error(monkeypatch):
  monkeypatch.delattr(jax.lax, "pcast")
  with pytest.raises(RuntimeError, match="jax.lax.pcast"):
    parallel.to_varying({"w": jnp.ones(3)})
