"""The chunked CIAE loss (ciae.py on the kernel of triplet.py) against the dense reference.

The reference is `benchmarks/ciae_dense.py`: a frozen copy of the dense implementation the
kernel replaced (whole-image `[P, Q]` arrays, dense `[P, S]` box mask, `lax.top_k` differentiated
through its scatter); benchmarks/loss_speed.py times the two. Loss values and the gradients with
respect to `embedding` and `embedding_prenorm` must agree to float32 rounding, for every argument
of `ciae_loss`, chunk sizes that do and do not divide P, exact ties (duplicated queries, empty
instances whose query is the zero vector, a zero margin) and the train step's vmap.

Tolerances (the suite runs on AVX-512 and AVX2-only CPUs, so none is fitted to one machine):
both sides evaluate the same per-entry float32 expressions; what differs is the ORDER of the
additions that sum them (over chunks instead of all pixels at once, the K selected entries of
`d_pos` instead of a row of Q mostly-zero entries), and possibly the last bit of a D-term dot
product (a matmul tiled for another shape). Float32 rounds each addition to a relative
2^-24 = 6e-8 (u); the rounding errors of a sum of N terms behave like a random walk, so two
summation orders differ by about sqrt(N) * u relative to the sum of the terms' magnitudes
(Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., sec. 4.2). Each tolerance
below states its N.
"""
import functools
import pathlib
import sys
import types
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ciae_jax import hparams
from ciae_jax import ops
from ciae_jax.losses import ciae as ciae_module
from ciae_jax.losses import triplet
from ciae_jax.segments import Segments

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import ciae_dense  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def _chunked_ciae_loss(embedding, embedding_prenorm, *args, num_stuff, memory=None,
                       segment_map=None, seg_class=None, seg_is_thing=None, seg_is_crowd=None,
                       seg_box=None, seg_valid=None, **loss_fields):
  """The library's `ciae_loss` called as the dense reference is: the six segment arrays (then
  the memory) positionally or by keyword, the loss hyper-parameters as keywords."""
  if args:
    *arrays, memory = args
  else:
    arrays = (segment_map, seg_class, seg_is_thing, seg_is_crowd, seg_box, seg_valid)
  return ciae_module.ciae_loss(embedding, embedding_prenorm, Segments(*arrays), memory,
                               hparams.LossHParams(**loss_fields), num_stuff=num_stuff)


# The implementation under test, with the reference's calling convention.
ciae = types.SimpleNamespace(**{name: getattr(ciae_module, name) for name in dir(ciae_module)
                                if not name.startswith("_")})
ciae.ciae_loss = _chunked_ciae_loss


NUM_STUFF = 4
NUM_THINGS = 3
# The dense reference's own default of `include_own` is the one of its time (False): calls
# pass the library's explicitly.
DEFAULT_INCLUDE_OWN = hparams.LossHParams().include_own
DIM = 8
NUM_ROWS = 16
U = 2.0 ** -24  # float32 unit roundoff

# Loss sums: each pixel's top-K sum is added up in the same order on both sides (top_k's sorted
# output); what differs is the order of the sum over pixels, N <= 960 positive terms (2 images of
# 20 x 24) plus a few ulps per term if a similarity's last bit differs: sqrt(960) * u = 2e-6
# relative. 1e-5 (the bound asked for) leaves 5x.
LOSS_RTOL = 1e-5
# Gradients: an element is a sum of terms of both signs, <= K + 1 of them for `embedding` (the
# selected queries and the own one) or, for `embedding_prenorm`, the instance means' gradients,
# each summed over the pixels of one image (N <= 480, in chunk order on one side). For random
# signs the rounding error of such a sum is ~sqrt(N) * u = 1.3e-6 of its magnitude, but the
# element itself may cancel to ~0, so the elementwise bound is taken relative to the gradient's
# largest magnitude (atol = GRAD_RTOL * max|grad|) plus GRAD_RTOL of the element: 8x margin.
GRAD_RTOL = 1e-5


def _unit(x, axis=-1):
  return (x / np.linalg.norm(x, axis=axis, keepdims=True)).astype(np.float32)


def _case(rng, height=20, width=24, *, duplicate=False, empty_instance=False, jitter=False,
          things=6):
  """Stuff bands, a void block, thing rectangles (one crowd), padding rows, optional ties.

  duplicate: two thing segments of the same shape with identical pre-norm embeddings, so their
    instance means (the IAE queries) are bit-identical (an exact tie for every pixel).
  empty_instance: a valid, non-crowd thing row without pixels: its mean is the zero vector,
    similarity exactly 0 for every pixel, tying with the box-filtered instances.
  jitter: boxes moved off their masks by up to 3 px (float), as after augmentation; some pixels
    then lie outside their own box (never filtered) and box edges fall between pixel centres.
  """
  segment_map = np.zeros((height, width), np.int32)
  seg_class = rng.integers(0, NUM_STUFF + NUM_THINGS, NUM_ROWS).astype(np.int32)
  seg_is_thing = rng.random(NUM_ROWS) < 0.5  # padding rows: garbage that must never count
  seg_is_crowd = np.zeros(NUM_ROWS, bool)
  seg_valid = np.zeros(NUM_ROWS, bool)
  seg_box = np.tile(np.array([0, 0, width, height], np.float32), (NUM_ROWS, 1))
  bands = np.linspace(0, height, 4).astype(int)
  for row in range(3):
    segment_map[bands[row]:bands[row + 1]] = row + 1
    seg_class[row] = rng.integers(NUM_STUFF)
    seg_is_thing[row] = False
    seg_valid[row] = True
  segment_map[height // 2:height // 2 + 3, :4] = 0  # void
  row = 3
  if duplicate:  # Two disjoint 4 x 5 rectangles, filled below with identical embeddings.
    for y0, x0 in ((1, 1), (height - 6, width - 7)):
      segment_map[y0:y0 + 4, x0:x0 + 5] = row + 1
      seg_class[row], seg_is_thing[row], seg_valid[row] = NUM_STUFF, True, True
      row += 1
  for _ in range(things):
    h, w = rng.integers(2, 9, 2)
    y0, x0 = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
    segment_map[y0:y0 + h, x0:x0 + w] = row + 1
    seg_class[row] = NUM_STUFF + rng.integers(NUM_THINGS)
    seg_is_thing[row], seg_valid[row] = True, True
    row += 1
  seg_is_crowd[row - 1] = True  # the last thing is crowd
  if duplicate:  # Keep the duplicated pair intact (later things may have painted over it).
    segment_map[1:5, 1:6] = 4
    segment_map[height - 6:height - 2, width - 7:width - 2] = 5
  seg_class[row], seg_is_thing[row], seg_valid[row] = NUM_STUFF + 1, True, True  # no pixels
  if not empty_instance:
    seg_valid[row] = False
  seg_class[row + 1], seg_valid[row + 1] = 1, True  # a stuff row without pixels
  for k in range(NUM_ROWS):
    ys, xs = np.nonzero(segment_map == k + 1)
    if ys.size:
      seg_box[k] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
  if jitter:
    seg_box += rng.uniform(-3, 3, seg_box.shape).astype(np.float32)
  prenorm = rng.normal(size=(height, width, DIM)).astype(np.float32)
  if duplicate:
    prenorm[height - 6:height - 2, width - 7:width - 2] = prenorm[1:5, 1:6]
  embedding = _unit(prenorm + 0.3 * rng.normal(size=prenorm.shape).astype(np.float32))
  return dict(embedding=embedding, embedding_prenorm=prenorm, segment_map=segment_map,
              seg_class=seg_class, seg_is_thing=seg_is_thing, seg_is_crowd=seg_is_crowd,
              seg_box=seg_box, seg_valid=seg_valid)


def _memory(rng, merge_things, duplicate=False):
  memory = _unit(rng.normal(size=(NUM_STUFF + (1 if merge_things else NUM_THINGS), DIM)))
  if duplicate:
    memory[2] = memory[1]  # An exact tie in L_CAE and between stuff queries of L_IAE.
  return memory


SEGMENT_KEYS = ("segment_map", "seg_class", "seg_is_thing", "seg_is_crowd", "seg_box",
                "seg_valid")


def _sums_and_grads(lib, cases, memory, chunk_size, **kwargs):
  """jit of (loss sums, d / d (emb, prenorm) of cae_sum, iae_sum, ciae_sum, and of
  cae_sum + 0.5 ciae_sum), vmapped.

  Training differentiates ciae_sum, whose gradient the kernel's forward pass computes; the
  others take its other path (the loop again, with the cotangents as weights)."""
  batch = {k: np.stack([c[k] for c in cases]) for k in cases[0]}

  def sums(embedding, prenorm):
    fn = functools.partial(lib.ciae_loss, num_stuff=NUM_STUFF, **kwargs)
    out = jax.vmap(fn, in_axes=(0,) * 8 + (None,))(
        embedding, prenorm, *(batch[k] for k in SEGMENT_KEYS), memory)
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), out)

  def run(embedding, prenorm):
    out = sums(embedding, prenorm)
    grad = lambda f: jax.grad(lambda e, p: f(sums(e, p)), argnums=(0, 1))(embedding, prenorm)
    return out, *(grad(lambda s, key=key: s[key])
                  for key in ("loss_cae_sum", "loss_iae_sum", "loss_ciae_sum")), grad(
                      lambda s: s["loss_cae_sum"] + 0.5 * s["loss_ciae_sum"])

  with mock.patch.object(triplet, "DEFAULT_CHUNK_SIZE", chunk_size):
    return jax.device_get(jax.jit(run)(batch["embedding"], batch["embedding_prenorm"]))


def _assert_grad_close(got, want, what):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, rtol=GRAD_RTOL, atol=GRAD_RTOL * scale, err_msg=what)


# (settings of ciae_loss, chunk size, case options): every argument, chunks that divide P
# (20 x 24 = 480 = 8 x 60; 120 at stride 2) and that do not (37, 7), one chunk (4096 > P).
SETTINGS = [
    (dict(), 37, dict()),
    (dict(include_own=False), 37, dict(jitter=True)),
    (dict(include_own=True), 60, dict(jitter=True)),
    (dict(use_box_filter=False), 37, dict(duplicate=True)),
    (dict(merge_things=False), 4096, dict(empty_instance=True)),
    (dict(merge_things=False, include_own=True, top_k=2), 7, dict(jitter=True, duplicate=True)),
    (dict(loss_stride=2), 37, dict(duplicate=True, empty_instance=True)),
    (dict(loss_stride=2, use_box_filter=False, include_own=True), 60, dict()),
    (dict(stop_query_gradient=True), 37, dict(jitter=True)),
    (dict(top_k=30, margin=0.3, thing_weight=2.0, alpha=0.5), 37, dict(duplicate=True)),
    (dict(top_k=1, box_expand=1.0), 64, dict(jitter=True, empty_instance=True)),
    (dict(margin=0.0, include_own=True), 37, dict(duplicate=True, empty_instance=True)),
    (dict(merge_things=False, loss_stride=2, top_k=30, stop_query_gradient=True), 7,
     dict(jitter=True)),
]


@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_matches_dense_reference(setting):
  kwargs, chunk_size, options = SETTINGS[setting]
  kwargs = {"include_own": DEFAULT_INCLUDE_OWN, **kwargs}
  rng = np.random.default_rng(100 + setting)
  cases = [_case(rng, **options), _case(rng, **options)]
  memory = _memory(rng, kwargs.get("merge_things", True), duplicate=setting % 2 == 0)
  got, got_cae, got_iae, got_ciae, got_mix = _sums_and_grads(ciae, cases, memory, chunk_size,
                                                              **kwargs)
  want, want_cae, want_iae, want_ciae, want_mix = _sums_and_grads(ciae_dense, cases, memory,
                                                                  chunk_size, **kwargs)
  assert got["num_pixels"] == want["num_pixels"] > 100
  for key in ("loss_cae_sum", "loss_iae_sum", "loss_ciae_sum"):
    np.testing.assert_allclose(got[key], want[key], rtol=LOSS_RTOL, err_msg=key)
  for name, g, w in (("cae", got_cae, want_cae), ("iae", got_iae, want_iae),
                     ("ciae", got_ciae, want_ciae), ("cae + 0.5 ciae", got_mix, want_mix)):
    for arg, gg, ww in zip(("embedding", "embedding_prenorm"), g, w):
      _assert_grad_close(gg, ww, f"d loss_{name}_sum / d {arg}")
  if kwargs.get("stop_query_gradient"):
    assert not np.any(got_iae[1]) and not np.any(want_iae[1])
  else:
    assert np.abs(got_iae[1]).max() > 0


def _kernel_inputs(rng, num_pixels=203, num_queries=11):
  """Pixels, queries with two duplicated pairs (exact ties), targets, weights, mask, validity."""
  pixels = _unit(rng.normal(size=(num_pixels, DIM)))
  queries = _unit(rng.normal(size=(num_queries, DIM)))
  queries[7], queries[6] = queries[3], queries[5]  # bit-identical similarities
  target = rng.integers(0, num_queries, num_pixels).astype(np.int32)
  target[:20] = 3  # own query duplicated: with margin 0, x = d_pos - d_neg is exactly 0 for 7
  weight = np.where(rng.random(num_pixels) < 0.2, 0.0, rng.uniform(0.5, 5.0, num_pixels))
  mask = rng.random((num_pixels, num_queries)) < 0.7
  valid = rng.random(num_queries) < 0.8
  valid[[3, 5, 6, 7]] = True
  return pixels, queries, target, weight.astype(np.float32), mask, valid


KERNEL_SETTINGS = [  # (top_k, include_own, margin, use mask, use validity, chunk)
    (5, False, 0.15, True, True, 7),
    (5, True, 0.15, False, True, 64),
    (1, False, 0.0, True, False, 1),
    (3, True, 0.0, True, True, 1000),
    (11, False, 0.15, False, False, 37),  # top_k == Q
    (20, True, 0.3, True, True, 203),  # fewer queries than K; one chunk of exactly P
]


@pytest.mark.parametrize("setting", range(len(KERNEL_SETTINGS)))
def test_triplet_kernel_matches_dense_with_ties(setting):
  top_k, include_own, margin, use_mask, use_valid, chunk = KERNEL_SETTINGS[setting]
  pixels, queries, target, weight, mask, valid = _kernel_inputs(np.random.default_rng(setting))
  mask = mask if use_mask else None
  valid = valid if use_valid else None
  kwargs = dict(margin=margin, top_k=top_k, include_own=include_own, query_valid=valid)

  def loss(lib, extra, p, q, w):
    return lib.embedding_triplet_loss(p, q, target, mask, w, **kwargs, **extra)[0]

  value_grad = lambda lib, extra: jax.jit(jax.value_and_grad(
      functools.partial(loss, lib, extra), argnums=(0, 1, 2)))(pixels, queries, weight)
  got, got_grads = value_grad(ciae, dict(chunk_size=chunk))
  want, want_grads = value_grad(ciae_dense, {})
  # A sum over <= 203 pixels in another order: sqrt(203) * u = 1e-6 (see LOSS_RTOL).
  np.testing.assert_allclose(got, want, rtol=LOSS_RTOL)
  for name, g, w in zip(("pixel_emb", "queries", "pixel_weight"), got_grads, want_grads):
    _assert_grad_close(g, w, f"d loss / d {name}")
  # The tie-broken gradients are really there: the duplicated queries 3/7 and 5/6 get different
  # gradients (top_k takes the lower index first), which a symmetric tie rule would not give.
  dq = np.asarray(got_grads[1])
  assert not np.allclose(dq[3], dq[7]) and not np.allclose(dq[5], dq[6])
  count = ciae.embedding_triplet_loss(pixels, queries, target, mask, weight, **kwargs)[1]
  assert float(count) == np.sum(weight > 0)


def test_box_filter_equals_the_dense_box_mask():
  """`BoxFilter` (evaluated per chunk) = the dense mask `expanded_box_mask | own & exempt`."""
  rng = np.random.default_rng(7)
  height, width, num_queries = 13, 17, 9  # P = 221, not a multiple of the chunk below
  pixels, queries, target, weight, _, valid = _kernel_inputs(rng, height * width, num_queries)
  boxes = np.sort(rng.uniform(-2, 19, (num_queries, 2, 2)), axis=1).reshape(num_queries, 4)
  boxes = boxes[:, [0, 2, 1, 3]].astype(np.float32)  # x0, y0, x1, y1
  centre_x, centre_y = ciae.pixel_centres(height, width)
  x_lo, x_hi, y_lo, y_hi = ciae.expanded_box_bounds(boxes, 1.5)
  unfiltered = np.arange(num_queries) < 3  # like the stuff queries: never filtered
  inf = np.float32(np.inf)
  bounds = np.stack([np.where(unfiltered, -inf, x_lo), np.where(unfiltered, inf, x_hi),
                     np.where(unfiltered, -inf, y_lo), np.where(unfiltered, inf, y_hi)], 1)
  exempt = rng.random(height * width) < 0.5
  box = triplet.BoxFilter(centre_x, centre_y, bounds, exempt)
  own = target[:, None] == np.arange(num_queries)
  mask = (np.asarray(ciae.expanded_box_mask(centre_x, centre_y, boxes, 1.5)) | unfiltered
          | (own & exempt[:, None]))
  got = jax.jit(jax.value_and_grad(lambda p, q: triplet.triplet_loss_sum(
      p, q, target, weight, box_filter=box, query_valid=valid, chunk_size=16), argnums=(0, 1)))
  want = jax.jit(jax.value_and_grad(lambda p, q: ciae_dense.embedding_triplet_loss(
      p, q, target, mask, weight, query_valid=valid)[0], argnums=(0, 1)))
  (got_loss, got_grads), (want_loss, want_grads) = got(pixels, queries), want(pixels, queries)
  np.testing.assert_allclose(got_loss, want_loss, rtol=LOSS_RTOL)  # 221 pixels, as above
  for g, w in zip(got_grads, want_grads):
    _assert_grad_close(g, w, "box filter gradients")


def _two_terms(rng):
  """Two terms over the same 203 pixels: a masked one, and one with a box filter and validity."""
  pixels, queries, target, weight, mask, valid = _kernel_inputs(rng)
  _, queries_2, target_2, weight_2, _, valid_2 = _kernel_inputs(rng, num_queries=9)
  centre_x, centre_y = rng.uniform(0, 10, (2, pixels.shape[0])).astype(np.float32)
  lo = rng.uniform(-1, 6, (9, 2)).astype(np.float32)
  bounds = np.stack([lo[:, 0], lo[:, 0] + 5, lo[:, 1], lo[:, 1] + 5], axis=1)
  box = triplet.BoxFilter(centre_x, centre_y, bounds, rng.random(pixels.shape[0]) < 0.5)
  return pixels, ((queries, target, weight, mask, None, valid),
                  (queries_2, target_2, weight_2, None, box, valid_2))


@pytest.mark.parametrize("chunk", [16, 203])
def test_both_terms_in_one_loop_equal_two_kernels(chunk):
  """`triplet_loss_sums` of two terms (one loop, one pixel-gradient buffer) against the code it
  replaced: one `triplet_loss_sum` per term, `L_1 + alpha L_2` summed outside.

  Every output (each term's sum, the combined sum, and a mix of them that takes the loop's
  second pass for the pixel gradient) with its gradients with respect to the pixels, both terms'
  queries and weights. Same per-chunk expressions; the pixel gradient adds the two terms'
  [C, D] products before the scaling by the cotangent instead of after: a few roundings of u
  per entry (GRAD_RTOL).
  """
  pixels, (args_1, args_2) = _two_terms(np.random.default_rng(21))
  alpha, kwargs = 2.0, dict(margin=0.15, top_k=5, include_own=False, chunk_size=chunk)

  def one_loop(p, q1, w1, q2, w2):
    terms = (triplet.Term(q1, args_1[1], w1, *args_1[3:]),
             triplet.Term(q2, args_2[1], w2, *args_2[3:]))
    return triplet.triplet_loss_sums(p, terms, (1.0, alpha), **kwargs)

  def two_kernels(p, q1, w1, q2, w2):
    single = lambda q, w, a: triplet.triplet_loss_sum(
        p, q, a[1], w, query_mask=a[3], box_filter=a[4], query_valid=a[5], **kwargs)
    loss_1, loss_2 = single(q1, w1, args_1), single(q2, w2, args_2)
    return loss_1, loss_2, loss_1 + alpha * loss_2

  inputs = (pixels, args_1[0], args_1[2], args_2[0], args_2[2])
  outputs = {"term 1": lambda o: o[0], "term 2": lambda o: o[1], "combined": lambda o: o[2],
             "mix": lambda o: 3.0 * o[0] - o[1] + 0.25 * o[2]}
  unused = {"term 1": ("queries 2", "weight 2"), "term 2": ("queries 1", "weight 1")}
  for name, pick in outputs.items():
    run = lambda fn, pick=pick: jax.device_get(jax.jit(jax.value_and_grad(
        lambda *a: pick(fn(*a)), argnums=tuple(range(5))))(*inputs))
    (got, got_grads), (want, want_grads) = run(one_loop), run(two_kernels)
    np.testing.assert_allclose(got, want, rtol=LOSS_RTOL, err_msg=name)
    for arg, g, w in zip(("pixels", "queries 1", "weight 1", "queries 2", "weight 2"),
                         got_grads, want_grads):
      if arg in unused.get(name, ()):
        assert not np.any(g) and not np.any(w), (name, arg)
      else:
        assert np.abs(w).max() > 0, (name, arg)
        _assert_grad_close(g, w, f"d {name} / d {arg}")


def test_terms_with_nothing_to_sum_give_zero():
  """A term without queries (or no pixels at all) sums to 0, with zero gradients; the other
  terms and the combined sum are what the kernel gives for them alone."""
  pixels, (args_1, _) = _two_terms(np.random.default_rng(8))
  empty = triplet.Term(np.zeros((0, DIM), np.float32), args_1[1], args_1[2])
  full = triplet.Term(*args_1)

  def sums(p, q):
    terms = (triplet.Term(q, *args_1[1:]), empty)
    return triplet.triplet_loss_sums(p, terms, (1.0, 2.0), chunk_size=16)

  (loss_1, loss_2, total), vjp = jax.vjp(sums, pixels, args_1[0])
  alone = triplet.triplet_loss_sums(pixels, (full,), (1.0,), chunk_size=16)
  assert float(loss_2) == 0.0 and float(loss_1) > 0
  np.testing.assert_array_equal(np.asarray([loss_1, total]), np.asarray([alone[0], alone[1]]))
  d_pixels, d_queries = vjp((0.0, 1.0, 0.0))  # the empty term's own sum
  assert not np.any(np.asarray(d_pixels)) and not np.any(np.asarray(d_queries))
  nothing = triplet.triplet_loss_sums(pixels[:0], (triplet.Term(args_1[0], args_1[1][:0],
                                                                args_1[2][:0]),), (3.0,))
  assert [float(x) for x in nothing] == [0.0, 0.0]


def test_training_gradient_runs_the_loop_once():
  """The gradient of `loss_ciae` (what the train step differentiates) is the forward pass's: the
  kernel's loop is traced once; a sub-loss's own gradient traces it a second time."""
  rng = np.random.default_rng(4)
  case = _case(rng, jitter=True)
  memory = _memory(rng, True)
  hp = hparams.LossHParams(include_own=DEFAULT_INCLUDE_OWN)

  def loops(key):
    def loss(embedding, prenorm):
      sums = ciae_module.ciae_loss(embedding, prenorm, Segments(
          *(case[k] for k in SEGMENT_KEYS)), memory, hp, num_stuff=NUM_STUFF)
      return ciae_module.ciae_total(sums, hp)[key]
    with mock.patch.object(triplet, "_chunk_loop", wraps=triplet._chunk_loop) as loop:
      jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(case["embedding"], case["embedding_prenorm"])
    return loop.call_count

  assert loops("loss_ciae") == 1
  assert loops("loss_cae") == 2


@pytest.mark.parametrize("setting", [0, 4, 6, 8, 10])
def test_normalising_in_the_kernel_matches_normalising_first(setting):
  """`ciae_loss(None, prenorm)` (the kernel normalises each chunk; what training calls)
  against `ciae_loss(l2_normalize(prenorm), prenorm)`: values, and gradients with respect to
  the pre-norm embedding through the norm. Per pixel the same float32 expressions (the norm and
  its written-out gradient); the sums run over the same chunks: LOSS_RTOL, GRAD_RTOL."""
  kwargs, chunk_size, options = SETTINGS[setting]
  hp = hparams.LossHParams(**{"include_own": DEFAULT_INCLUDE_OWN, **kwargs})
  rng = np.random.default_rng(300 + setting)
  case = _case(rng, **options)
  memory = _memory(rng, hp.merge_things)
  segments = Segments(*(case[k] for k in SEGMENT_KEYS))
  scale = jnp.asarray(rng.uniform(0.5, 3.0, case["embedding_prenorm"].shape[:2] + (1,)),
                      jnp.float32)  # pre-norm embeddings of varying norms
  prenorm = case["embedding_prenorm"] * scale

  def sums(prenorm, in_kernel):
    embedding = None if in_kernel else ops.l2_normalize(prenorm)
    return ciae_module.ciae_loss(embedding, prenorm, segments, memory, hp, num_stuff=NUM_STUFF)

  def run(in_kernel):
    grad = lambda key: jax.grad(lambda p: sums(p, in_kernel)[key])(prenorm)
    return sums(prenorm, in_kernel), grad("loss_ciae_sum"), grad("loss_cae_sum")

  with mock.patch.object(triplet, "DEFAULT_CHUNK_SIZE", chunk_size):
    (got, *got_grads), (want, *want_grads) = (jax.device_get(jax.jit(
        functools.partial(run, flag))()) for flag in (True, False))
  assert got["num_pixels"] == want["num_pixels"] > 100
  for key in ("loss_cae_sum", "loss_iae_sum", "loss_ciae_sum"):
    np.testing.assert_allclose(got[key], want[key], rtol=LOSS_RTOL, err_msg=key)
  for name, g, w in zip(("ciae", "cae"), got_grads, want_grads):
    assert np.abs(w).max() > 0
    _assert_grad_close(g, w, f"d loss_{name}_sum / d prenorm")


def test_forward_only_matches_dense():
  """Without differentiation the kernel takes its primal path (no gradients computed)."""
  rng = np.random.default_rng(3)
  case = _case(rng, jitter=True, duplicate=True)
  memory = _memory(rng, True)
  run = lambda lib: jax.device_get(jax.jit(functools.partial(
      lib.ciae_loss, num_stuff=NUM_STUFF, memory=memory,
      include_own=DEFAULT_INCLUDE_OWN))(**case))
  got, want = run(ciae), run(ciae_dense)
  assert got["num_pixels"] == want["num_pixels"]
  for key in ("loss_cae_sum", "loss_iae_sum", "loss_ciae_sum"):
    np.testing.assert_allclose(got[key], want[key], rtol=LOSS_RTOL, err_msg=key)


def _largest_intermediate(fn, *args):
  """Elements of the largest array in the jaxpr of `fn` (sub-jaxprs included)."""
  def walk(jaxpr):
    sizes = [int(np.prod(v.aval.shape)) for eqn in jaxpr.eqns for v in eqn.outvars
             if hasattr(v.aval, "shape")]
    for eqn in jaxpr.eqns:
      for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else ():
        sizes.append(walk(sub))
      for param in eqn.params.values():
        for sub in (param if isinstance(param, (tuple, list)) else (param,)):
          inner = getattr(sub, "jaxpr", None)
          if inner is not None and hasattr(inner, "eqns"):
            sizes.append(walk(inner))
          elif hasattr(sub, "eqns"):
            sizes.append(walk(sub))
    return max(sizes, default=0)
  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def test_no_pixel_by_query_arrays():
  """Neither the forward nor the backward pass holds a [P, Q] (or [P, S]) array.

  20 stuff classes, 30 segment rows: Q = 21 (L_CAE) and 50 (L_IAE), S = 30, D = 8. Every array
  of the chunked loss's value_and_grad is below 16 P elements (e.g. [P, D] = 8 P), while the
  dense reference holds [P, Q] and [P, S] ones.
  """
  num_stuff, num_rows, height, width = 20, 30, 30, 40  # P = 1200, chunk 256
  rng = np.random.default_rng(5)
  segment_map = rng.integers(0, num_rows + 1, (height, width)).astype(np.int32)
  seg = dict(segment_map=segment_map, seg_class=rng.integers(0, num_stuff + 3, num_rows),
             seg_is_thing=rng.random(num_rows) < 0.5, seg_is_crowd=np.zeros(num_rows, bool),
             seg_box=np.tile(np.float32([0, 0, width, height]), (num_rows, 1)),
             seg_valid=np.ones(num_rows, bool))
  memory = _unit(rng.normal(size=(num_stuff + 1, DIM)))
  prenorm = rng.normal(size=(height, width, DIM)).astype(np.float32)
  embedding = _unit(prenorm)

  def largest(lib):
    loss = lambda e, p: lib.ciae_loss(e, p, **seg, memory=memory,
                                      num_stuff=num_stuff)["loss_ciae_sum"]
    with mock.patch.object(triplet, "DEFAULT_CHUNK_SIZE", 256):
      return _largest_intermediate(jax.value_and_grad(loss, argnums=(0, 1)), embedding, prenorm)

  num_pixels = height * width
  assert largest(ciae) < 16 * num_pixels
  assert largest(ciae_dense) >= 50 * num_pixels  # the test can see a [P, Q] array


@pytest.mark.parametrize("top_k", [2, 4, 6])
def test_exactly_zero_hinge_ties(top_k):
  """Subgradient ties: margin 0 and a duplicate (column 3) of the own query (column 4) make
  x = d_pos - d_neg exactly 0 for column 3 (the hinge's kink, where JAX's max passes half the
  gradient); every other entry's hinge is 0 too.

  All per-query losses are then zeros, which top_k orders by their bits, then by index. The
  dense reference selects on the losses: the uncounted own query is +0.0, a counted zero-hinge
  entry -log1p(-0.0), +0.0 or -0.0 depending on the log1p code XLA emits (top_k puts -0.0 below
  +0.0; +0.0 with XLA's AVX-512 and AVX2 code). The kernel selects on Eq. 8's ratios, which are
  +0.0 there. Which zeros are selected decides whether the kink's half gradient counts, so the
  two must select the same entries: never for top_k 2 (columns 0, 1 or 4, 0 come first), always
  for 6 (all), top_k 4 depends on that sign.
  """
  rng = np.random.default_rng(11)
  queries = _unit(rng.normal(size=(6, DIM)))
  queries[3] = queries[4]
  pixels = np.repeat(queries[4:5], 40, axis=0) + 1e-3 * rng.normal(size=(40, DIM))
  pixels = _unit(pixels.astype(np.float32))
  target = np.full(40, 4, np.int32)
  weight = rng.uniform(0.5, 2.0, 40).astype(np.float32)
  loss = lambda lib, extra, p, q: lib.embedding_triplet_loss(
      p, q, target, None, weight, margin=0.0, top_k=top_k, include_own=False, **extra)[0]
  value_grad = lambda lib, extra: jax.jit(jax.value_and_grad(
      functools.partial(loss, lib, extra), argnums=(0, 1)))(pixels, queries)
  (got, got_grads), (want, want_grads) = value_grad(ciae, dict(chunk_size=16)), value_grad(
      ciae_dense, {})
  assert got == want == 0.0
  for g, w in zip(got_grads, want_grads):
    _assert_grad_close(g, w, "kink gradients")
  if top_k != 4:
    assert (np.abs(got_grads[1][3]).max() > 0) == (top_k == 6)


def _ratio_ties(count: int) -> np.ndarray:
  """`count` pairs of adjacent float32 ratios (r, next r) whose losses -log1p(-r) round to one
  float32 (Eq. 8 maps both to the same value), as computed by XLA here."""
  r = np.arange(0x3ED00000, 0x3EFFFFFF, 37, dtype=np.uint32).view(np.float32)  # [0.41, 0.5)
  r_next = np.nextafter(r, np.float32(1))
  loss = jax.jit(lambda a: -jnp.log1p(-a))
  tied = np.asarray(loss(r) == loss(r_next))
  assert tied.sum() >= count, "no ties of Eq. 8 in the scanned range"
  return np.stack([r[tied][:count], r_next[tied][:count]], axis=1)  # [count, 2]


@pytest.mark.parametrize("include_own", [False, True])
def test_top_k_of_the_ratio_selects_the_top_k_losses(include_own):
  """The kernel selects on the ratio of Eq. 8 and takes the logarithm of the K selected entries
  (`triplet_chunk.selected_values`); the code it replaced took the top-K of the logarithms over
  all `[C, Q]`. The selected losses must be those, bit for bit and in the same order, with ties
  among zeros (hinge 0, uncounted, invalid queries) and pairs of distinct ratios whose losses
  round to one float32 at the K-th place; the indices may differ only between tied losses."""
  from ciae_jax.losses import triplet_chunk  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  rows, num_queries, top_k = 64, 23, 5
  cfg = triplet_chunk.Config(margin=0.15, top_k=top_k, include_own=include_own, eps=1e-6,
                             chunk_size=rows, normalize_pixels=False)
  bound = 2.0 + cfg.margin
  x = rng.uniform(-1.0, 2.4, size=(rows, num_queries)).astype(np.float32)  # some capped
  x[rows // 2:, 10:] = rng.uniform(-1.0, 0.0, size=(rows - rows // 2, num_queries - 10))
  ties = _ratio_ties(rows)
  # Four larger losses, then a tied pair of ratios at places 5 and 6 of every row.
  x[:, :4] = np.float32(0.6 * bound)
  x[:, 4:6] = (ties * np.float32(bound)).astype(np.float32)
  x[:, 6:] = np.minimum(x[:, 6:], np.float32(0.3 * bound))
  target = rng.integers(0, num_queries, size=rows).astype(np.int32)
  valid = rng.uniform(size=num_queries) > 0.15
  counted = (np.ones((rows, num_queries), bool) if include_own
             else target[:, None] != np.arange(num_queries)[None, :]) & valid[None, :]

  @jax.jit
  def both(x, counted):
    ratio = jnp.minimum(jnp.maximum(x, 0.0) / bound, 1.0 - cfg.eps)
    values = jnp.where(counted, -jnp.log1p(-ratio), 0.0)  # the replaced code's [C, Q] losses
    old_top, old_index = jax.lax.top_k(values, top_k)
    _, index = jax.lax.top_k(jnp.where(counted, ratio, 0.0), top_k)
    return (values, old_top, old_index, triplet_chunk.selected_values(cfg, x, counted, index),
            index)

  values, old_top, old_index, new_top, new_index = map(np.asarray, both(x, counted))
  np.testing.assert_array_equal(new_top.view(np.uint32), old_top.view(np.uint32))
  differs = old_index != new_index
  assert differs.any(), "the test should include losses that tie while their ratios do not"
  row_of = np.nonzero(differs)[0]
  # Where the indices differ, the losses at both indices are one float32.
  np.testing.assert_array_equal(values[row_of, old_index[differs]],
                                values[row_of, new_index[differs]])


SMOKE = """
import sys
sys.path.insert(0, {bench!r})
import loss_speed
payload = loss_speed.main(["--sizes", "32x48", "--repeats", "1", "--warmup", "0",
                           "--memory_size", "64x64", "--things", "2,3"])
print("TENSORFLOW_IMPORTED", "tensorflow" in sys.modules)
"""


@pytest.mark.slow  # ~30 s of CPU: two small programs compiled twice each.
def test_loss_benchmark_runs_without_tensorflow():
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(root),
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run([sys.executable, "-c", SMOKE.format(bench=str(root / "benchmarks"))],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert "TENSORFLOW_IMPORTED False" in lines
  payload = json.loads(next(l for l in lines if l.startswith("loss_speed ")).split(" ", 1)[1])
  dense, chunked = payload["results"]
  assert (dense["impl"], chunked["impl"]) == ("dense", "chunked")
  # 2 x 32 x 48 pixels summed in another order: sqrt(3072) * u = 3e-6 (see LOSS_RTOL).
  np.testing.assert_allclose(chunked["loss"], dense["loss"], rtol=LOSS_RTOL)
  plans = payload["memory_plans"]
  assert plans["chunked"]["temp_bytes"] < plans["dense"]["temp_bytes"]
