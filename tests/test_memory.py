"""Memory embeddings (ciae_jax/memory.py) against Eq. 13-14 worked by hand and NumPy loops."""
import jax
import numpy as np
import pytest

from ciae_jax import hparams
from ciae_jax import memory as memory_lib
from ciae_jax.segments import Segments

PAPER = hparams.MemoryHParams()  # Eq. 13: coefficient 1e-4, power 3.


NUM_STUFF = 3
NUM_THINGS = 4


def _random_image(rng, height=12, width=10, dim=6, num_rows=7):
  segment_map = rng.integers(0, num_rows + 1, (height, width)).astype(np.int32)
  seg_class = rng.integers(0, NUM_STUFF + NUM_THINGS, num_rows).astype(np.int32)
  seg_class[0] = NUM_STUFF + 1  # make sure both a stuff and a thing class are present
  seg_class[1] = 1
  seg_valid = np.ones(num_rows, bool)
  seg_valid[-1] = False  # padding row (its pixels must be ignored even if painted)
  seg_is_crowd = np.zeros(num_rows, bool)
  seg_is_crowd[2] = True
  prenorm = rng.normal(size=(height, width, dim)).astype(np.float32)
  return prenorm, segment_map, seg_class, seg_valid, seg_is_crowd


@pytest.mark.parametrize("merge_things", [True, False])
def test_class_sums_match_loop(merge_things):
  rng = np.random.default_rng(0)
  prenorm, segment_map, seg_class, seg_valid, seg_is_crowd = _random_image(rng)
  num_mem = NUM_STUFF + 1 if merge_things else NUM_STUFF + NUM_THINGS
  assert memory_lib.num_memory(NUM_STUFF, NUM_THINGS, merge_things) == num_mem
  segments = Segments(segment_map=segment_map, seg_class=seg_class,
                      seg_is_thing=seg_class >= NUM_STUFF, seg_is_crowd=seg_is_crowd,
                      seg_box=np.zeros(seg_class.shape + (4,), np.float32), seg_valid=seg_valid)
  sums, counts = memory_lib.class_sums(prenorm, segments, num_stuff=NUM_STUFF,
                                       merge_things=merge_things, num_memory=num_mem)
  want_sums = np.zeros((num_mem, prenorm.shape[-1]))
  want_counts = np.zeros(num_mem, np.int64)
  for y in range(segment_map.shape[0]):
    for x in range(segment_map.shape[1]):
      k = segment_map[y, x] - 1
      if k < 0 or not seg_valid[k] or seg_is_crowd[k]:
        continue
      c = seg_class[k]
      row = c if (c < NUM_STUFF or not merge_things) else NUM_STUFF
      want_sums[row] += prenorm[y, x]
      want_counts[row] += 1
  # float32 sums of N <= 120 standard-normal values per class (|sum| ~ 10, sum|terms| ~ 100)
  # vs float64: a blocked / pairwise order is within log2(N) * eps * sum|terms| ~ 8e-5, a
  # random walk of roundings ~1e-6 (measured); rtol 1e-5 + atol 1e-5 allow ~1e-4.
  np.testing.assert_allclose(sums, want_sums, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(counts, want_counts)
  assert want_counts.sum() < (segment_map > 0).sum()  # void, crowd and padding were dropped


def test_memory_index():
  classes = np.array([0, 2, 3, 6, 4])
  np.testing.assert_array_equal(memory_lib.memory_index(classes, 3, True), [0, 2, 3, 3, 3])
  np.testing.assert_array_equal(memory_lib.memory_index(classes, 3, False), [0, 2, 3, 6, 4])


def test_init_memory_unit_rows():
  mem = memory_lib.init_memory(jax.random.key(0), 5, 32)
  assert mem.shape == (5, 32) and mem.dtype == np.float32
  # float32 normalisation of 32 components: unit length within ~18 * 2^-24 ~ 1e-6.
  np.testing.assert_allclose(np.linalg.norm(mem, axis=1), 1.0, rtol=1e-5)
  # Distinct rows: random unit vectors in 32-d have |cos| ~ 0.2; 0.9 catches duplicates.
  assert np.abs(np.asarray(mem) @ np.asarray(mem).T - np.eye(5)).max() < 0.9
  np.testing.assert_array_equal(mem, memory_lib.init_memory(jax.random.key(0), 5, 32))


def test_momentum_eq13():
  total = 1000
  for step in (0, 250, 999, 1000, 1500):
    frac = min(step / total, 1.0)
    want = 1.0 - 1e-4 * (1.0 - frac) ** 3
    # 1 - 1e-4 * x in float32: the final rounding near 1 is half an ulp (3e-8); the errors of
    # x (a few eps) are scaled by 1e-4. rtol 1e-7 is ~2 ulps.
    np.testing.assert_allclose(memory_lib.momentum(step, total, PAPER), want, rtol=1e-7)
  # 1 - 0.5 * 0.5: exact in float32.
  np.testing.assert_allclose(memory_lib.momentum(500, total, hparams.MemoryHParams(0.5, 1.0)),
                             0.75)


def test_update_memory_eq14_and_absent_rows_untouched():
  rng = np.random.default_rng(1)
  mem = rng.normal(size=(5, 4)).astype(np.float32)
  mem /= np.linalg.norm(mem, axis=1, keepdims=True)
  sums = rng.normal(size=(5, 4)).astype(np.float32) * 30
  counts = np.array([3, 0, 10, 0, 1], np.int32)
  step, total = 300, 1000
  coeff, power = 0.2, 3.0  # a large coefficient so the update is visible
  got = np.asarray(memory_lib.update_memory(mem, sums, counts, step, total,
                                            hparams.MemoryHParams(coeff, power)))
  lam = 1 - coeff * (1 - step / total) ** power
  for row in range(5):
    if counts[row] == 0:
      # Bit-identical, not just close.
      assert got[row].tobytes() == mem[row].tobytes()
      continue
    batch_mean = sums[row] / np.linalg.norm(sums[row])
    mixed = lam * mem[row].astype(np.float64) + (1 - lam) * batch_mean
    # Two float32 normalisations of 4 components and a mix: ~10 roundings of unit-scale
    # values (< 1e-6); rtol 1e-5, atol 1e-6 for components near 0.
    np.testing.assert_allclose(got[row], mixed / np.linalg.norm(mixed), rtol=1e-5, atol=1e-6)
    # 1 - lam = 0.07 of a difference of unit vectors: the move is ~1e-1, far above 1e-3.
    assert np.abs(got[row] - mem[row]).max() > 1e-3
  # Default coefficients barely move the memory at step 0 (lam = 1 - 1e-4): by at most
  # 1e-4 * |M_c - M| <= 2e-4 before the renormalisation, but by more than float32 rounding.
  tiny = np.asarray(memory_lib.update_memory(mem, sums, counts, 0, total, PAPER))
  assert 0 < np.abs(tiny - mem).max() < 1e-3


def test_update_memory_shape_errors():
  mem = np.zeros((3, 4), np.float32)
  with pytest.raises(ValueError, match="counts"):
    memory_lib.update_memory(mem, mem, np.zeros(2), 0, 10, PAPER)
  with pytest.raises(ValueError, match="total_steps"):
    memory_lib.momentum(0, 0, PAPER)
