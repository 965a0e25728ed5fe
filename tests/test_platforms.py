"""`platforms.built_for`: a program built for one platform traces only that platform's branches.

Each fast path must be chosen alike whether the platforms are named where the program is built
(`built_for`: the switch picks while tracing) or not (`jax.lax.platform_dependent`: the lowering
picks), on the platforms of `FAST_PATHS`; the builders of the library (`parallel.parallelize`,
`parallelize_map`) name the platforms of their devices unless told others.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ciae_jax import ops
from ciae_jax import parallel
from ciae_jax import platforms

FAST, PLAIN = 1.0, 2.0


def _marked(name):
  """A function whose value says which branch of fast path `name` ran."""
  return lambda x: platforms.switch(name, x, fast=lambda v: v + FAST, plain=lambda v: v + PLAIN)


def _all_primitives(closed):
  """Primitive names of a jaxpr and of every jaxpr nested in it."""
  names, stack = set(), [closed.jaxpr]
  while stack:
    jaxpr = stack.pop()
    for eqn in jaxpr.eqns:
      names.add(eqn.primitive.name)
      for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
          inner = getattr(item, "jaxpr", item)
          if hasattr(inner, "eqns"):
            stack.append(inner)
  return names


@pytest.mark.parametrize("name", sorted(platforms.FAST_PATHS))
@pytest.mark.parametrize("platform", platforms.LOWERING_PLATFORMS)
def test_built_for_one_platform_chooses_as_the_table_says(name, platform):
  closed = jax.make_jaxpr(platforms.built_for(_marked(name), platform))(0.0)
  # Chosen while tracing: no platform index, no conditional, whatever the platform.
  assert not {"platform_index", "cond"} & _all_primitives(closed)
  value = jax.jit(platforms.built_for(_marked(name), platform))(0.0)  # Runs here.
  expected = FAST if platforms.choices(platform)[name] == "fast" else PLAIN
  assert float(value) == expected


@pytest.mark.parametrize("name", sorted(platforms.FAST_PATHS))
def test_on_this_cpu_built_for_and_platform_dependent_agree(name):
  chosen = jax.jit(platforms.built_for(_marked(name), platforms.platforms_of()))(0.0)
  lowered = jax.jit(_marked(name))(0.0)  # Undeclared: `platform_dependent`, picked at lowering.
  assert "platform_index" in _all_primitives(jax.make_jaxpr(_marked(name))(0.0))
  assert float(chosen) == float(lowered)


def test_several_platforms_keep_their_branches_and_lower_for_each():
  fn = platforms.built_for(_marked("segment_sums_matmul"), ("cpu", "cuda"))
  assert "platform_index" in _all_primitives(jax.make_jaxpr(fn)(0.0))
  assert float(jax.jit(fn)(0.0)) == PLAIN  # This CPU takes the plain branch of a GPU path.
  text = jax.jit(fn).trace(0.0).lower(lowering_platforms=("cuda",)).as_text()
  assert "2.000000e+00" not in text and "1.000000e+00" in text  # Only the cuda branch's constant.


def test_one_function_built_for_two_platforms_is_traced_for_each():
  # The same inner function under two wrappers: jit's trace cache is keyed on the wrapper.
  inner = _marked("loss_small_chunks")
  on_cpu = jax.jit(platforms.built_for(inner, "cpu"))
  on_gpu = jax.jit(platforms.built_for(inner, "gpu"))  # "gpu" names cuda.
  assert float(on_cpu(0.0)) == FAST
  assert float(on_gpu(0.0)) == PLAIN  # Built for cuda, run here: cuda's choice, right values.
  assert float(on_cpu(0.0)) == FAST


def test_bad_platform_names_fail_when_built():
  with pytest.raises(ValueError, match="unknown platform 'metal'"):
    platforms.built_for(lambda x: x, "metal")
  with pytest.raises(ValueError, match="at least one platform"):
    platforms.built_for(lambda x: x, ())


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_parallelize_builds_for_its_devices_unless_told(mode):
  def step(state, batch):  # A per-device function with a fast path (L2's written gradient).
    loss = lambda s: jnp.sum(ops.l2_normalize(batch * s + batch ** 2, axis=-1) * batch)
    grad = jax.lax.pmean(jax.grad(loss)(state), parallel.AXIS_NAME)
    return state - grad, grad

  devices = jax.devices()[:2]
  mesh = parallel.make_mesh(devices)
  batch = np.random.default_rng(0).normal(size=(2, 1, 3, 5, 4)).astype(np.float32)
  results, jaxpr_primitives = {}, {}
  for built in (None, ("cpu", "cuda")):
    run = parallel.parallelize(step, parallel=mode, mesh=mesh, devices=devices, donate=False,
                               platforms=built)
    state = parallel.replicate(jnp.float32(1.5), parallel=mode, mesh=mesh, devices=devices)
    sharded = parallel.shard_batch(batch, parallel=mode, mesh=mesh)
    jaxpr_primitives[built] = _all_primitives(jax.make_jaxpr(run)(state, sharded))
    results[built] = jax.device_get(run(state, sharded))
  assert "platform_index" not in jaxpr_primitives[None]
  assert "platform_index" in jaxpr_primitives[("cpu", "cuda")]
  # The same branch ran (the CPU fast path) in both programs. Equal to float32 rounding: one
  # program inlines the branch, the other calls it as a conditional, which XLA may fuse
  # differently; ~2^-20 relative covers a few roundings of sums of 60 terms.
  for got, want in zip(jax.tree.leaves(results[None]), jax.tree.leaves(results[("cpu", "cuda")])):
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
