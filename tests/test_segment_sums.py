"""`ops.segment_sum` and its platform paths against `jax.ops.segment_sum`.

* The CPU loop (`fast_paths.segment_sums.segment_sum_loop`): the same scatter-adds in the same
  order, so bit-identical sums and gradients.
* The accelerator one-hot matmul (`segment_sum_matmul`): float32 sums in another order; a sum of
  n terms differs by at most ~n 2^-24 of the sum of magnitudes (Higham, sec. 4.2), n <= 1000
  here, hence 1e-4 of the largest |row sum of magnitudes|. Its gradient is a gather: exact.
* The program lowered for `cuda` holds the matmul and no scatter (deterministic on GPUs).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ciae_jax import ops
from ciae_jax.fast_paths import segment_sums


def _case(rows, num_segments=12, dim=5, seed=0):
  rng = np.random.default_rng(rows + seed)
  data = jnp.asarray(rng.normal(size=(rows, dim)).astype(np.float32) * 100)
  # -2, -1, S, S + 1: out of range, dropped.
  ids = jnp.asarray(rng.integers(-2, num_segments + 2, rows).astype(np.int32))
  cotangent = jnp.asarray(rng.normal(size=(num_segments, dim)).astype(np.float32))
  return data, ids, cotangent


def _run(fn, data, ids, cotangent):
  def go(data, ids, cotangent):
    sums, vjp = jax.vjp(lambda d: fn(d, ids), data)
    return sums, vjp(cotangent)[0]
  return jax.device_get(jax.jit(go)(data, ids, cotangent))


_REFERENCE = lambda d, i: jax.ops.segment_sum(d, i, num_segments=12)


@pytest.mark.parametrize("rows, chunk", [(1000, 64), (1000, 1000), (1000, 4096), (999, 100),
                                         (7, 3), (1, 16)])
def test_loop_is_bit_identical(rows, chunk):
  data, ids, cotangent = _case(rows)
  got = _run(lambda d, i: segment_sums.segment_sum_loop(d, i, 12, chunk), data, ids, cotangent)
  want = _run(_REFERENCE, data, ids, cotangent)
  np.testing.assert_array_equal(got[0], want[0])  # the same additions in the same order
  np.testing.assert_array_equal(got[1], want[1])  # a gather of the cotangent, 0 where dropped
  dropped = (np.asarray(ids) < 0) | (np.asarray(ids) >= 12)
  assert not np.any(got[1][dropped]) and np.all(got[1][~dropped] != 0)


@pytest.mark.parametrize("rows", [1000, 7, 1])
def test_matmul_equals_the_reference(rows):
  data, ids, cotangent = _case(rows)
  got = _run(lambda d, i: segment_sums.segment_sum_matmul(d, i, 12), data, ids, cotangent)
  want = _run(_REFERENCE, data, ids, cotangent)
  magnitude = np.asarray(jax.ops.segment_sum(jnp.abs(data), ids, num_segments=12)).max()
  np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-4 * max(magnitude, 1.0))
  np.testing.assert_array_equal(got[1], want[1])


def test_under_vmap_and_empty():
  rng = np.random.default_rng(0)
  data = jnp.asarray(rng.normal(size=(3, 500, 4)).astype(np.float32))
  ids = jnp.asarray(rng.integers(0, 9, (3, 500)).astype(np.int32))
  want = jax.vmap(lambda d, i: jax.ops.segment_sum(d, i, num_segments=9))(data, ids)
  for fn in (lambda d, i: segment_sums.segment_sum_loop(d, i, 9, 64),
             lambda d, i: ops.segment_sum(d, i, 9)):
    np.testing.assert_array_equal(np.asarray(jax.vmap(fn)(data, ids)), np.asarray(want))
  got = jax.vmap(lambda d, i: segment_sums.segment_sum_matmul(d, i, 9))(data, ids)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  for fn in (segment_sums.segment_sum_loop, segment_sums.segment_sum_matmul, ops.segment_sum):
    empty = fn(jnp.zeros((0, 4)), jnp.zeros((0,), jnp.int32), 3)
    np.testing.assert_array_equal(np.asarray(empty), np.zeros((3, 4)))


def test_the_program_for_cuda_is_one_matmul_and_the_cpu_one_a_loop():
  data, ids, _ = _case(1000)
  lowered = {p: jax.jit(lambda d, i: ops.segment_sum(d, i, 12)).trace(data, ids).lower(
      lowering_platforms=(p,)).as_text() for p in ("cpu", "cuda")}
  assert "stablehlo.dot_general" in lowered["cuda"]
  assert "precision = [HIGHEST, HIGHEST]" in lowered["cuda"]
  assert "scatter" not in lowered["cuda"] and "while" not in lowered["cuda"]
  assert "scatter" in lowered["cpu"] and "while" in lowered["cpu"]
