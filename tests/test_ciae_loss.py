"""The CIAE loss (ciae_jax/losses/ciae.py) against a naive per-pixel, per-query NumPy loop.

The reference follows the paper's equations (Eq. 3-12) and the readings of docs/method.md:
top-K negatives per pixel, instance means from pre-norm embeddings, the expanded-box filter on
instance queries, thing pixels x thing_weight in L_IAE, void and crowd pixels left out.
"""
import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ciae_jax import hparams
from ciae_jax import segments as segments_lib
from ciae_jax.losses import ciae as ciae_lib
from ciae_jax.losses import engine
from ciae_jax.losses import pixel_losses
from ciae_jax.losses import registry
from ciae_jax.segments import SEGMENT_KEYS
from ciae_jax.segments import Segments

NUM_STUFF = 3
NUM_THINGS = 3
DIM = 8
# Float32 loss sums vs the float64 loop on the same float32 inputs. Each term carries a few
# eps (eps = 2^-23 ~ 1.2e-7) from its 8-term dot products and its log1p; an instance mean,
# a float32 sum of <= 64 random vectors, carries ~log2(64) eps times their cancellation
# (~8x), ~6e-6; the sums of <= 16 * 16 * 20 non-negative terms add <= log2(N) eps. rtol
# 2e-5 (~170 eps) covers that in any summation order; measured <= 2e-7.
LOSS_RTOL = 2e-5


def _unit(v):
  v = np.asarray(v, np.float64)
  n = np.linalg.norm(v)
  return v / n if n > 0 else v


def _random_case(rng, size=16, num_rows=9):
  """Stuff bands, void, 5 occluding thing rectangles (one crowd), a padding row."""
  segment_map = np.zeros((size, size), np.int32)
  seg_class = np.zeros(num_rows, np.int32)
  seg_is_thing = np.zeros(num_rows, bool)
  seg_is_crowd = np.zeros(num_rows, bool)
  seg_valid = np.zeros(num_rows, bool)
  seg_box = np.zeros((num_rows, 4), np.float32)
  segment_map[:5] = 1
  segment_map[9:] = 2
  segment_map[5:9, :3] = 0  # void
  seg_class[:2] = [0, 2]
  seg_valid[:2] = True
  for k in range(2, 7):
    w, h = rng.integers(2, 8, 2)
    x0, y0 = rng.integers(0, size - w + 1), rng.integers(0, size - h + 1)
    segment_map[y0:y0 + h, x0:x0 + w] = k + 1
    seg_class[k] = NUM_STUFF + rng.integers(NUM_THINGS)
    seg_is_thing[k] = True
    seg_valid[k] = True
  seg_is_crowd[3] = True
  seg_class[7] = 1  # a stuff segment in the annotation but with no pixels: no effect
  seg_valid[7] = True
  for k in range(num_rows):
    rows, cols = np.nonzero(segment_map == k + 1)
    if rows.size:
      seg_box[k] = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
  # The padding row (8) keeps class 0 and an all-covering box: it must never count.
  seg_box[8] = [0, 0, size, size]
  prenorm = rng.normal(size=(size, size, DIM)).astype(np.float32)
  embedding = (prenorm / np.linalg.norm(prenorm, axis=-1, keepdims=True)).astype(np.float32)
  return dict(embedding=embedding, embedding_prenorm=prenorm, segment_map=segment_map,
              seg_class=seg_class, seg_is_thing=seg_is_thing, seg_is_crowd=seg_is_crowd,
              seg_box=seg_box, seg_valid=seg_valid)


def _random_memory(rng, merge_things):
  rows = NUM_STUFF + (1 if merge_things else NUM_THINGS)
  mem = rng.normal(size=(rows, DIM))
  return (mem / np.linalg.norm(mem, axis=1, keepdims=True)).astype(np.float32)


def _ref_pixel_loss(p, queries, sims_forced_zero, own, *, margin, top_k, include_own):
  """Eq. 5-9 for one pixel: `queries` a list of unit vectors (valid ones only)."""
  dist = []
  for q, forced in zip(queries, sims_forced_zero):
    sim = 0.0 if forced else float(np.dot(p, q))
    dist.append(1.0 - sim)
  d_pos = dist[own]
  losses = []
  for k, d in enumerate(dist):
    if k == own:
      if not include_own:
        continue
      d = 0.0  # Eq. 6
    hinge = max(d_pos - d + margin, 0.0)
    losses.append(-math.log(1.0 - hinge / (2.0 + margin)))
  return sum(sorted(losses, reverse=True)[:top_k])


# The reference is called like the library: a field not given takes the library's default.
DEFAULT_INCLUDE_OWN = inspect.signature(pixel_losses.ciae).parameters["include_own"].default
# The paper's per-pixel loss parameters (`loss.params`); the other keywords are LossHParams'.
PAPER_PARAMS = ("margin", "top_k", "include_own")


def _reference(case, memory, *, margin=0.15, top_k=5, thing_weight=5.0, box_expand=1.5,
               use_box_filter=True, merge_things=True, loss_stride=1,
               include_own=DEFAULT_INCLUDE_OWN):
  emb = case["embedding"].astype(np.float64)
  prenorm = case["embedding_prenorm"].astype(np.float64)
  segment_map = case["segment_map"]
  seg_class, seg_box = case["seg_class"], case["seg_box"].astype(np.float64)
  size_y, size_x = segment_map.shape
  num_rows = len(seg_class)
  # Eq. 4: instance means from pre-norm embeddings, every pixel of the mask.
  sums = np.zeros((num_rows, DIM))
  for y in range(size_y):
    for x in range(size_x):
      if segment_map[y, x] > 0:
        sums[segment_map[y, x] - 1] += prenorm[y, x]
  means = [_unit(s) for s in sums]
  instances = [k for k in range(num_rows) if case["seg_valid"][k] and case["seg_is_thing"][k]
               and not case["seg_is_crowd"][k]]
  memory = memory.astype(np.float64)
  cae = iae = 0.0
  count = 0
  for y in range(0, size_y, loss_stride):
    for x in range(0, size_x, loss_stride):
      seg = segment_map[y, x] - 1
      if seg < 0 or not case["seg_valid"][seg] or case["seg_is_crowd"][seg]:
        continue
      count += 1
      p = emb[y, x]
      c = seg_class[seg]
      thing = case["seg_is_thing"][seg]
      kw = dict(margin=margin, top_k=top_k, include_own=include_own)
      # L_CAE: all memory rows.
      own_row = NUM_STUFF if (thing and merge_things) else c
      cae += _ref_pixel_loss(p, list(memory), [False] * len(memory), own_row, **kw)
      # L_IAE: stuff memories, then the valid instances, filtered by the expanded boxes.
      queries = list(memory[:NUM_STUFF])
      forced = [False] * NUM_STUFF
      own = c
      for k in instances:
        if k == seg:
          own = len(queries)
        x0, y0, x1, y1 = seg_box[k]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        hw, hh = box_expand * (x1 - x0) / 2, box_expand * (y1 - y0) / 2
        inside = cx - hw <= x + 0.5 <= cx + hw and cy - hh <= y + 0.5 <= cy + hh
        queries.append(means[k])
        forced.append(use_box_filter and not inside and k != seg)
      weight = thing_weight if thing else 1.0
      iae += weight * _ref_pixel_loss(p, queries, forced, own, **kw)
  return cae, iae, count


def _loss(embedding, embedding_prenorm, memory, *, num_stuff=NUM_STUFF, **fields):
  """`ciae_loss` of a case dict: the segment keys become `Segments`, the rest `LossHParams`."""
  segments = Segments(**{k: fields.pop(k) for k in SEGMENT_KEYS})
  return ciae_lib.ciae_loss(embedding, embedding_prenorm, segments, memory,
                            _hparams(**fields), num_stuff=num_stuff)


def _hparams(**fields):
  """LossHParams of the reference's keywords (the paper's loss parameters under `params`)."""
  params = {k: fields.pop(k) for k in PAPER_PARAMS if k in fields}
  return hparams.LossHParams(params=params, **fields)


def _run(case, memory, **kwargs):
  fn = functools.partial(_loss, **kwargs)
  return jax.tree.map(float, jax.jit(fn)(**case, memory=memory))


SETTINGS = [
    dict(),
    dict(include_own=False),
    dict(merge_things=False, loss_stride=2, top_k=3),
    dict(use_box_filter=False, top_k=20),
    dict(merge_things=False, top_k=2, include_own=True, box_expand=1.0),
    dict(loss_stride=2, top_k=20, include_own=True, thing_weight=2.0, margin=0.3),
    dict(cae_weight=0.0, alpha=0.5),  # Table IV's last rows: no L_CAE
]


@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_ciae_loss_matches_naive_loop(setting):
  kwargs = SETTINGS[setting]
  rng = np.random.default_rng(setting)
  case = _random_case(rng)
  memory = _random_memory(rng, kwargs.get("merge_things", True))
  got = _run(case, memory, **kwargs)
  cae, iae, count = _reference(case, memory, **{
      k: v for k, v in kwargs.items() if k not in ("cae_weight", "alpha")})
  weights = (kwargs.get("cae_weight", 1.0), kwargs.get("alpha", 2.0))
  assert count > 20
  # A pixel count: an integer, exact in float32.
  np.testing.assert_array_equal(got["num_pixels"], count)
  np.testing.assert_allclose(got["loss_cae_sum"], cae, rtol=LOSS_RTOL)
  np.testing.assert_allclose(got["loss_iae_sum"], iae, rtol=LOSS_RTOL)
  np.testing.assert_allclose(got["loss_ciae_sum"], weights[0] * cae + weights[1] * iae,
                             rtol=LOSS_RTOL)
  total = ciae_lib.ciae_total(got)
  # The same sums, each divided once by the exact count (one more rounding).
  np.testing.assert_allclose(total["loss_cae"], cae / count, rtol=LOSS_RTOL)
  np.testing.assert_allclose(total["loss_iae"], iae / count, rtol=LOSS_RTOL)
  np.testing.assert_allclose(total["loss_ciae"], (weights[0] * cae + weights[1] * iae) / count,
                             rtol=LOSS_RTOL)


def test_box_filter_changes_the_loss():
  rng = np.random.default_rng(10)
  case = _random_case(rng)
  memory = _random_memory(rng, True)
  filtered = _run(case, memory)["loss_iae_sum"]
  unfiltered = _run(case, memory, use_box_filter=False)["loss_iae_sum"]
  assert abs(filtered - unfiltered) > 1e-3 * unfiltered  # >> float32 noise (~1e-6): a change


def _perfect_case(merge_things):
  """Every pixel embedding equals its own query; all queries mutually orthogonal.

  Stuff classes 0, 2 have memories e0, e2; two thing instances A (class 3), B (class 4).
  merge_things=False: A, B pixels are e3, e4 = their class memories = their instance means.
  merge_things=True: A, B pixels are (e3 +- e4)/sqrt2, their instance means; the shared thing
  memory e3 is 0.29 away from both, which the margin (0.15) against the stuff memories (1 away)
  absorbs, so both sub-losses are exactly 0.
  """
  eye = np.eye(DIM, dtype=np.float32)
  size = 16
  segment_map = np.zeros((size, size), np.int32)
  segment_map[:6] = 1  # stuff class 0
  segment_map[10:] = 2  # stuff class 2
  segment_map[3:9, 2:7] = 3  # A
  segment_map[4:12, 6:12] = 4  # B, overlapping A's box
  segment_map[7:9, 12:15] = 5  # crowd: any embedding
  segment_map[6:10, 0:2] = 0  # void: any embedding
  seg_class = np.array([0, 2, 3, 4, 3, 0], np.int32)
  seg_is_thing = np.array([False, False, True, True, True, False])
  seg_is_crowd = np.array([False, False, False, False, True, False])
  seg_valid = np.array([True] * 5 + [False])
  seg_box = np.zeros((6, 4), np.float32)
  for k in range(5):
    rows, cols = np.nonzero(segment_map == k + 1)
    seg_box[k] = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
  if merge_things:
    memory = eye[:4]
    inst = [(eye[3] + eye[4]) / np.sqrt(2), (eye[3] - eye[4]) / np.sqrt(2)]
  else:
    memory = eye[:6]
    inst = [eye[3], eye[4]]
  rng = np.random.default_rng(0)
  embedding = rng.normal(size=(size, size, DIM)).astype(np.float32)
  embedding /= np.linalg.norm(embedding, axis=-1, keepdims=True)
  for k, vec in ((1, eye[0]), (2, eye[2]), (3, inst[0]), (4, inst[1])):
    embedding[segment_map == k] = vec
  # Pre-norm embeddings: any positive scale per pixel keeps the same means.
  prenorm = embedding * rng.uniform(0.5, 3.0, (size, size, 1)).astype(np.float32)
  case = dict(embedding=embedding, embedding_prenorm=prenorm, segment_map=segment_map,
              seg_class=seg_class, seg_is_thing=seg_is_thing, seg_is_crowd=seg_is_crowd,
              seg_box=seg_box, seg_valid=seg_valid)
  return case, memory.astype(np.float32)


@pytest.mark.parametrize("merge_things", [True, False])
def test_perfect_embeddings_give_zero_and_swaps_do_not(merge_things):
  case, memory = _perfect_case(merge_things)
  # Without the own term (Eq. 6's k = c_i, d_neg = 0), a perfect embedding costs nothing.
  got = _run(case, memory, merge_things=merge_things, include_own=False)
  assert got["loss_cae_sum"] == 0.0 and got["loss_iae_sum"] == 0.0
  assert got["num_pixels"] == np.isin(case["segment_map"], [1, 2, 3, 4]).sum()

  # include_own adds exactly the own term -log(1 - margin / (2 + margin)) per pixel (and x5
  # for thing pixels in L_IAE) when the embeddings are perfect and the queries orthogonal.
  if not merge_things:
    own = _run(case, memory, merge_things=merge_things, include_own=True)
    l_own = -math.log(1.0 - 0.15 / 2.15)
    seg = case["segment_map"]
    num_thing_px = np.isin(seg, [3, 4]).sum()
    # Sums of N <= 256 equal float32 terms: even summed one by one they drift by at most
    # ~N/2 roundings of 2^-24 (7.7e-6) plus the one rounding of the term's log.
    np.testing.assert_allclose(own["loss_cae_sum"], l_own * own["num_pixels"], rtol=1e-5)
    np.testing.assert_allclose(own["loss_iae_sum"],
                               l_own * (own["num_pixels"] + 4 * num_thing_px), rtol=1e-5)

  # Half of A's pixels take B's embedding: A's mean moves, L_IAE is far from zero.
  swapped = dict(case)
  emb = case["embedding"].copy()
  pre = case["embedding_prenorm"].copy()
  a_pixels = np.argwhere(case["segment_map"] == 3)
  b_vec = emb[case["segment_map"] == 4][0]
  for y, x in a_pixels[: len(a_pixels) // 2]:
    emb[y, x] = b_vec
    pre[y, x] = b_vec
  swapped.update(embedding=emb, embedding_prenorm=pre)
  got_swapped = _run(swapped, memory, merge_things=merge_things)
  # Each swapped pixel inside B's expanded box costs 5 x -log(1 - 0.44 / 2.15) = 1.14.
  assert got_swapped["loss_iae_sum"] / (len(a_pixels) // 2) > 0.3
  np.testing.assert_allclose(got_swapped["loss_iae_sum"],
                             _reference(swapped, memory, merge_things=merge_things)[1],
                             rtol=LOSS_RTOL)

  if not merge_things:
    # A and B (different classes) swap their embeddings entirely: L_CAE is far from zero (L_IAE
    # cannot see a full swap: the instance means swap with the pixels).
    full = dict(case)
    emb = case["embedding"].copy()
    a_mask, b_mask = case["segment_map"] == 3, case["segment_map"] == 4
    emb[a_mask], emb[b_mask] = emb[b_mask][0], emb[a_mask][0]
    full.update(embedding=emb, embedding_prenorm=emb)
    got_full = _run(full, memory, merge_things=False)
    assert got_full["loss_cae_sum"] / got_full["num_pixels"] > 0.1


def _loss_of_prenorm(prenorm, case, memory, **kwargs):
  embedding = prenorm / jnp.linalg.norm(prenorm, axis=-1, keepdims=True)  # [H, W, D]
  fields = {k: case[k] for k in SEGMENT_KEYS}
  sums = _loss(embedding, prenorm, memory, **fields, **kwargs)
  return ciae_lib.ciae_total(sums)["loss_ciae"]


def test_gradient_is_finite():
  rng = np.random.default_rng(3)
  case = _random_case(rng)
  memory = _random_memory(rng, True)
  grad = jax.jit(jax.grad(functools.partial(_loss_of_prenorm, case=case, memory=memory)))(
      case["embedding_prenorm"])
  assert np.isfinite(grad).all() and np.abs(grad).max() > 0
  perfect, perfect_memory = _perfect_case(False)
  grad = jax.jit(jax.grad(functools.partial(_loss_of_prenorm, case=perfect, memory=perfect_memory,
                                            merge_things=False, include_own=True)))(
      perfect["embedding_prenorm"])
  assert np.isfinite(grad).all()


def test_vmap_over_batch_sums_per_image():
  rng = np.random.default_rng(4)
  cases = [_random_case(rng) for _ in range(2)]
  memory = _random_memory(rng, True)
  batch = jax.tree.map(lambda *a: np.stack(a), *cases)
  fn = functools.partial(_loss, memory=memory)
  got = jax.jit(jax.vmap(fn))(**batch)
  for i, case in enumerate(cases):
    cae, iae, count = _reference(case, memory)
    np.testing.assert_allclose(got["loss_cae_sum"][i], cae, rtol=LOSS_RTOL)
    np.testing.assert_allclose(got["loss_iae_sum"][i], iae, rtol=LOSS_RTOL)
    assert got["num_pixels"][i] == count


def test_engine_padding_queries_and_top_k():
  rng = np.random.default_rng(5)
  pixels = rng.normal(size=(6, DIM))
  pixels /= np.linalg.norm(pixels, axis=1, keepdims=True)
  queries = rng.normal(size=(4, DIM))
  queries /= np.linalg.norm(queries, axis=1, keepdims=True)
  target = np.array([0, 1, 2, 0, 1, 2])
  query_valid = np.array([True, True, True, False])
  weight = np.array([1.0, 2.0, 0.0, 1.0, 1.0, 3.0])
  for top_k in (1, 5):
    loss = registry.bind("ciae", dict(margin=0.15, top_k=top_k, include_own=False))
    term = engine.Term(pixels, target, weight, query_valid=query_valid)._replace(queries=queries)
    got_sum = engine.loss_sums(pixels, (term,), (1.0,), loss, chunk_size=4)[0]
    want = 0.0
    for i in range(6):
      want += weight[i] * _ref_pixel_loss(pixels[i], list(queries[:3]), [False] * 3, target[i],
                                          margin=0.15, top_k=top_k, include_own=False)
    # 6 pixels x <= 3 terms of a few eps each (8-term dot products, log1p), no means.
    np.testing.assert_allclose(got_sum, want, rtol=1e-5)


def test_instance_and_class_means_match_loop():
  rng = np.random.default_rng(6)
  case = _random_case(rng)
  seg, pre = case["segment_map"], case["embedding_prenorm"].astype(np.float64)
  means = np.asarray(segments_lib.instance_means(pre, seg, 9))
  classes = np.asarray(ciae_lib.class_means(pre, seg, case["seg_class"], 6))
  # Unit vectors of float32 sums of N <= 256 standard-normal rows: |sum| ~ sqrt(N) while
  # sum|terms| ~ 0.8 N, so the bound log2(N) * eps * sum|terms| / |sum| of a blocked sum is
  # ~1.2e-5 at N = 256; random roundings give ~100x less (measured 1e-7): atol 1e-5.
  for k in range(9):
    np.testing.assert_allclose(means[k], _unit(pre[seg == k + 1].sum(0)), atol=1e-5)
  for c in range(6):
    rows = [k + 1 for k in range(9) if case["seg_class"][k] == c]
    np.testing.assert_allclose(classes[c], _unit(pre[np.isin(seg, rows)].sum(0)), atol=1e-5)


def test_own_instance_is_never_filtered():
  # A box that does not cover its own mask (boxes and masks disagreeing after augmentation):
  # the pixel keeps its true similarity to its own instance, as the reference says.
  rng = np.random.default_rng(11)
  case = _random_case(rng)
  rows, cols = np.nonzero(case["segment_map"] == 3)
  assert rows.size > 1
  case["seg_box"][2] = [cols.min(), rows.min(), cols.min() + 1, rows.min() + 1]
  memory = _random_memory(rng, True)
  got = _run(case, memory, box_expand=1.0)
  np.testing.assert_allclose(got["loss_iae_sum"], _reference(case, memory, box_expand=1.0)[1],
                             rtol=LOSS_RTOL)


def test_bad_arguments_raise():
  rng = np.random.default_rng(12)
  case = _random_case(rng)
  with pytest.raises(ValueError, match="memory has 6 rows"):
    _loss(**case, memory=_random_memory(rng, False))
  with pytest.raises(ValueError, match="segment_map"):
    _loss(**dict(case, segment_map=case["segment_map"][:8]), memory=_random_memory(rng, True))
