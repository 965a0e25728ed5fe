"""The loss engine (`losses.engine.loss_sums`) against its dense reference, for every shipped
variant, and the paper's loss against the hand-differentiated kernel it replaced.

* `ciae_loss(..., sums_fn=engine.loss_sums)` (chunks, one custom VJP whose forward pass takes
  autodiff gradients chunk by chunk) against `sums_fn=engine.dense_loss_sums` (the whole
  `[P, Q]`, plain autodiff): values, and gradients with respect to `embedding` and
  `embedding_prenorm` of the combined sum (what training differentiates) and of L_CAE's sum
  (the other path of the VJP), with the box filter, padding queries, crowd and void pixels and a
  last partial chunk.
* The paper's loss against `tests/data/ciae_loss_golden.npz`, the values and gradients of the
  hand-written kernel on fixed inputs (`tests/data/make_ciae_loss_golden.py`).

Tolerances (the suite runs on AVX-512 and AVX2-only CPUs, so none is fitted to one machine):
both sides evaluate the same per-entry float32 expressions; what differs is the ORDER of the
additions that sum them (over chunks instead of all pixels at once; the kernel's own-query
gradient summed over K entries instead of a row of Q), and possibly the last bit of a D-term
dot product (a matmul tiled for another shape). Float32 rounds each addition to a relative
2^-24 = 6e-8 (u); the rounding errors of a sum of N terms behave like a random walk, so two
orders differ by about sqrt(N) * u relative to the sum of the terms' magnitudes (Higham,
"Accuracy and Stability of Numerical Algorithms", 2nd ed., sec. 4.2).
"""
import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ciae_jax import hparams
from ciae_jax import ops
from ciae_jax.losses import ciae as ciae_lib
from ciae_jax.losses import engine
from ciae_jax.losses import pixel_losses
from ciae_jax.segments import Segments
import loss_cases

NUM_STUFF = loss_cases.NUM_STUFF
# Loss sums: each pixel's loss is the same expression on both sides; the sum over <= 480
# pixels of one image (960 for two) runs in another order: sqrt(960) * u = 2e-6 relative, plus
# a few ulps per term where a similarity's last bit differs. 1e-5 leaves 5x.
LOSS_RTOL = 1e-5
# Gradients: an element is a sum of terms of both signs (the selected queries, the own one,
# the instance means' gradients over the pixels of one image, N <= 480): ~sqrt(N) * u = 1.3e-6
# of its magnitude, but the element may cancel to ~0, so the bound is relative to the
# gradient's largest magnitude (atol = GRAD_RTOL * max|grad|) plus GRAD_RTOL of the element.
GRAD_RTOL = 1e-5
GOLDEN = np.load(__file__.rsplit("/", 1)[0] + "/data/ciae_loss_golden.npz")


def _assert_grad_close(got, want, what):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.all(np.isfinite(got)), what
  np.testing.assert_allclose(got, want, rtol=GRAD_RTOL, atol=GRAD_RTOL * np.abs(want).max(),
                             err_msg=what)


def _run(hp, case, memory, sums_fn, **kwargs):
  """jit of the loss sums and the gradients of the combined and of L_CAE's sum."""
  segments = Segments(*(case[k] for k in loss_cases.SEGMENT_KEYS))

  def sums(embedding, prenorm):
    return ciae_lib.ciae_loss(embedding, prenorm, segments, memory, hp, num_stuff=NUM_STUFF,
                              sums_fn=sums_fn, **kwargs)

  def run(embedding, prenorm):
    grad = lambda key: jax.grad(lambda e, p: sums(e, p)[key], argnums=(0, 1))(embedding, prenorm)
    train = jax.grad(lambda p: sums(None, p)["loss_ciae_sum"])(prenorm)
    return sums(embedding, prenorm), grad("loss_ciae_sum"), grad("loss_cae_sum"), train

  return jax.device_get(jax.jit(run)(jnp.asarray(case["embedding"]),
                                     jnp.asarray(case["embedding_prenorm"])))


def _compare(got, want):
  (values, d_ciae, d_cae, d_train), (w_values, w_ciae, w_cae, w_train) = got, want
  assert values["num_pixels"] == w_values["num_pixels"] > 100
  for key in ("loss_cae_sum", "loss_iae_sum", "loss_ciae_sum"):
    assert np.isfinite(values[key]), key
    np.testing.assert_allclose(values[key], w_values[key], rtol=LOSS_RTOL, err_msg=key)
  for name, g, w in (("ciae", d_ciae, w_ciae), ("cae", d_cae, w_cae)):
    for arg, gg, ww in zip(("embedding", "embedding_prenorm"), g, w):
      _assert_grad_close(gg, ww, f"d loss_{name}_sum / d {arg}")
  _assert_grad_close(d_train, w_train, "d loss_ciae_sum / d prenorm, normalised in the engine")


# (variant, its params, other LossHParams fields, chunk, case options): the box filter, padding
# queries, crowd and void pixels in every case; chunks that do not divide P = 480 (120 at stride
# 2) and one larger than P.
VARIANT_SETTINGS = [
    ("ciae", {}, {}, 37, dict(jitter=True)),
    ("ciae", dict(include_own=False, top_k=2), dict(merge_things=False), 7,
     dict(duplicate=True, empty_instance=True)),
    ("hinge", {}, {}, 37, dict(jitter=True, empty_instance=True)),
    ("hinge", dict(margin=0.3, top_k=30, include_own=False), dict(loss_stride=2), 60,
     dict(duplicate=True)),
    ("mean_negatives", {}, {}, 37, dict(jitter=True)),
    ("mean_negatives", dict(include_own=False), dict(merge_things=False, alpha=0.5), 4096,
     dict(empty_instance=True)),
    ("infonce", {}, {}, 37, dict(jitter=True, duplicate=True)),
    ("infonce", dict(temperature=0.05), dict(use_box_filter=False, loss_stride=2), 7,
     dict(empty_instance=True)),
    ("multi_similarity", {}, {}, 37, dict(jitter=True)),
    ("multi_similarity", dict(scale_neg=10.0, threshold=0.2), dict(stop_query_gradient=True), 60,
     dict(duplicate=True)),
]


@pytest.mark.parametrize("setting", range(len(VARIANT_SETTINGS)),
                         ids=[f"{s[0]}-{i}" for i, s in enumerate(VARIANT_SETTINGS)])
def test_engine_matches_dense_reference(setting):
  kind, params, fields, chunk, options = VARIANT_SETTINGS[setting]
  hp = hparams.LossHParams(kind=kind, params=params, chunk_size=chunk, **fields)
  rng = np.random.default_rng(100 + setting)
  case = loss_cases.case(rng, **options)
  memory = loss_cases.memory(rng, hp.merge_things, duplicate=setting % 2 == 0)
  got = _run(hp, case, memory, engine.loss_sums)
  want = _run(hp, case, memory, engine.dense_loss_sums)
  _compare(got, want)
  # With the embedding given, the pre-norm one has a gradient through the instance means only.
  d_prenorm = np.abs(got[1][1]).max()
  assert d_prenorm == 0 if hp.stop_query_gradient else d_prenorm > 0


@pytest.mark.parametrize("index", range(len(loss_cases.GOLDEN_SETTINGS)))
def test_paper_loss_equals_the_hand_written_kernel(index):
  """The default variant through the engine against the kernel's stored values and gradients."""
  fields, chunk, _ = loss_cases.GOLDEN_SETTINGS[index]
  fields = dict(fields)
  hp = hparams.LossHParams(params=fields.pop("params", {}), chunk_size=chunk, **fields)
  stored = lambda key: GOLDEN[f"{index}/{key}"]
  case = {key: stored(f"input/{key}") for key in ("embedding", "embedding_prenorm",
                                                   *loss_cases.SEGMENT_KEYS)}
  values, d_ciae, d_cae, d_train = _run(hp, case, stored("input/memory"), engine.loss_sums)
  for key in ("loss_cae_sum", "loss_iae_sum", "loss_ciae_sum", "num_pixels"):
    np.testing.assert_allclose(values[key], stored(key), rtol=LOSS_RTOL, err_msg=key)
  for name, grads in (("loss_ciae_sum", d_ciae), ("loss_cae_sum", d_cae)):
    for arg, got in zip(("embedding", "embedding_prenorm"), grads):
      _assert_grad_close(got, stored(f"d_{name}/{arg}"), f"d {name} / d {arg}")
  _assert_grad_close(d_train, stored("d_train/embedding_prenorm"), "train-step gradient")


def _engine_inputs(rng, num_pixels=203, num_queries=11, dim=8):
  pixels = loss_cases.unit(rng.normal(size=(num_pixels, dim)))
  queries = loss_cases.unit(rng.normal(size=(num_queries, dim)))
  own = rng.integers(0, num_queries, num_pixels).astype(np.int32)
  weight = np.where(rng.random(num_pixels) < 0.2, 0.0, rng.uniform(0.5, 5.0, num_pixels))
  valid = rng.random(num_queries) < 0.8
  return pixels, queries, own, weight.astype(np.float32), valid


@pytest.mark.parametrize("scales", [(1.0, 2.0), (0.0, 2.0), (1.5, 0.0)])
def test_query_gradients_of_each_term_with_any_scale(scales):
  """Each term's query gradient and pixel gradient against the dense reference, also where a
  term's scale is 0 (Table IV's L_CAE weight 0): its own sum still has its query gradient."""
  rng = np.random.default_rng(7)
  pixels, q1, own1, w1, valid = _engine_inputs(rng)
  _, q2, own2, w2, _ = _engine_inputs(rng, num_queries=5)
  loss = hparams_bind("hinge")

  def sums(fn, p, a, b):
    terms = (engine.Term(a, own1, w1, query_valid=valid), engine.Term(b, own2, w2))
    return fn(p, terms, scales, loss, chunk_size=16)

  for output in range(3):  # each term's own sum, then the total
    grad = lambda fn, output=output: jax.jit(jax.grad(
        lambda p, a, b: sums(fn, p, a, b)[output], argnums=(0, 1, 2)))(pixels, q1, q2)
    for g, w, name in zip(grad(engine.loss_sums), grad(engine.dense_loss_sums),
                          ("pixels", "queries 1", "queries 2")):
      _assert_grad_close(g, w, f"output {output}: d / d {name}")
    if output < 2:
      assert np.abs(grad(engine.loss_sums)[1 + output]).max() > 0


def hparams_bind(kind, **params):
  from ciae_jax.losses import registry  # pylint: disable=g-import-not-at-top
  return registry.bind(kind, params)


def test_total_gradient_takes_one_loop():
  """The gradient of the combined sum (what the train step differentiates) is the forward
  pass's: the loop is traced once; a sub-loss's own gradient traces it a second time."""
  rng = np.random.default_rng(4)
  case = loss_cases.case(rng, jitter=True)
  memory = loss_cases.memory(rng, True)
  hp = hparams.LossHParams(chunk_size=37)
  segments = Segments(*(case[k] for k in loss_cases.SEGMENT_KEYS))

  def loops(key):
    def loss(embedding, prenorm):
      sums = ciae_lib.ciae_loss(embedding, prenorm, segments, memory, hp, num_stuff=NUM_STUFF)
      return ciae_lib.ciae_total(sums)[key]
    with mock.patch.object(engine, "_chunk_loop", wraps=engine._chunk_loop) as loop:
      jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(case["embedding"], case["embedding_prenorm"])
    return loop.call_count

  assert loops("loss_ciae") == 1
  assert loops("loss_cae") == 2


def test_forward_only_matches_dense():
  rng = np.random.default_rng(3)
  case = loss_cases.case(rng, jitter=True, duplicate=True)
  memory = loss_cases.memory(rng, True)
  segments = Segments(*(case[k] for k in loss_cases.SEGMENT_KEYS))
  hp = hparams.LossHParams(chunk_size=37)
  run = lambda fn: jax.device_get(jax.jit(functools.partial(
      ciae_lib.ciae_loss, segments=segments, memory=memory, hp=hp, num_stuff=NUM_STUFF,
      sums_fn=fn))(case["embedding"], case["embedding_prenorm"]))
  got, want = run(engine.loss_sums), run(engine.dense_loss_sums)
  for key in ("loss_cae_sum", "loss_iae_sum", "loss_ciae_sum"):
    np.testing.assert_allclose(got[key], want[key], rtol=LOSS_RTOL, err_msg=key)


def test_empty_terms():
  """No pixel or no query: a 0 that depends on the inputs (gradient 0), the others unchanged."""
  rng = np.random.default_rng(8)
  pixels, queries, own, weight, _ = _engine_inputs(rng)
  loss = hparams_bind("ciae")
  empty = engine.Term(np.zeros((0, 8), np.float32), own, weight)
  full = engine.Term(queries, own, weight)
  both = engine.loss_sums(pixels, (full, empty), (1.0, 2.0), loss, chunk_size=16)
  alone = engine.loss_sums(pixels, (full,), (1.0,), loss, chunk_size=16)
  assert float(both[1]) == 0.0 and float(both[0]) == float(alone[0]) == float(both[2])
  nothing = engine.loss_sums(pixels[:0], (engine.Term(queries, own[:0], weight[:0]),), (1.0,),
                             loss, chunk_size=16)
  assert float(nothing[0]) == 0.0
  grad = jax.grad(lambda p: engine.loss_sums(p, (full, empty), (1.0, 2.0), loss,
                                             chunk_size=16)[2])(pixels)
  assert np.all(np.isfinite(grad))


def _largest_intermediate(fn, *args, platform="cpu"):
  """Elements of the largest array in the jaxpr of `fn` (sub-jaxprs included), as lowered for
  `platform`: of a `lax.platform_dependent` choice only that platform's branch counts."""
  def walk(jaxpr):
    sizes = [int(np.prod(v.aval.shape)) for eqn in jaxpr.eqns for v in eqn.outvars
             if hasattr(v.aval, "shape")]
    for eqn in jaxpr.eqns:
      by_platform = eqn.params.get("branches_platforms")
      if by_platform:
        index = next(i for i, p in enumerate(by_platform) if p is None or platform in p)
        sizes.append(walk(eqn.params["branches"][index].jaxpr))
        continue
      for param in eqn.params.values():
        for sub in (param if isinstance(param, (tuple, list)) else (param,)):
          inner = getattr(sub, "jaxpr", None)
          if inner is not None and hasattr(inner, "eqns"):
            sizes.append(walk(inner))
          elif hasattr(sub, "eqns"):
            sizes.append(walk(sub))
    return max(sizes, default=0)
  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("kind", sorted(pixel_losses.REGISTRY))
def test_no_pixel_by_query_arrays(kind):
  """Neither the forward nor the backward pass of the engine holds a [P, Q] (or [P, S]) array.

  20 stuff classes, 30 segment rows: Q = 21 (L_CAE) and 50 (L_IAE), D = 8, P = 1200 in chunks
  of 256. Every array of the engine's value_and_grad is below 16 P elements (e.g. [P, D] = 8 P),
  while the dense reference holds [P, Q] ones.
  """
  num_stuff, num_rows, height, width = 20, 30, 30, 40
  rng = np.random.default_rng(5)
  segments = Segments(
      rng.integers(0, num_rows + 1, (height, width)).astype(np.int32),
      rng.integers(0, num_stuff + 3, num_rows), rng.random(num_rows) < 0.5,
      np.zeros(num_rows, bool), np.tile(np.float32([0, 0, width, height]), (num_rows, 1)),
      np.ones(num_rows, bool))
  memory = loss_cases.unit(rng.normal(size=(num_stuff + 1, loss_cases.DIM)))
  prenorm = rng.normal(size=(height, width, loss_cases.DIM)).astype(np.float32)
  hp = hparams.LossHParams(kind=kind, chunk_size=256)

  def largest(sums_fn):
    loss = lambda p: ciae_lib.ciae_loss(None, p, segments, memory, hp, num_stuff=num_stuff,
                                        sums_fn=sums_fn)["loss_ciae_sum"]
    return _largest_intermediate(jax.value_and_grad(loss), prenorm)

  num_pixels = height * width
  # (On accelerators the instance means' segment sums are a one-hot matmul, [P, S] if XLA
  # builds its operand: not the engine's.)
  assert largest(engine.loss_sums) < 16 * num_pixels
  assert largest(engine.dense_loss_sums) >= 50 * num_pixels  # the test can see a [P, Q] array


def test_normalising_in_the_engine_matches_normalising_first():
  rng = np.random.default_rng(300)
  case = loss_cases.case(rng, jitter=True)
  memory = loss_cases.memory(rng, True)
  segments = Segments(*(case[k] for k in loss_cases.SEGMENT_KEYS))
  hp = hparams.LossHParams(chunk_size=37)
  scale = rng.uniform(0.5, 3.0, case["embedding_prenorm"].shape[:2] + (1,)).astype(np.float32)
  prenorm = jnp.asarray(case["embedding_prenorm"] * scale)

  def run(in_engine):
    def total(p):
      embedding = None if in_engine else ops.l2_normalize(p)
      return ciae_lib.ciae_loss(embedding, p, segments, memory, hp,
                                num_stuff=NUM_STUFF)["loss_ciae_sum"]
    return jax.device_get(jax.jit(jax.value_and_grad(total))(prenorm))

  (got, got_grad), (want, want_grad) = run(True), run(False)
  np.testing.assert_allclose(got, want, rtol=LOSS_RTOL)
  _assert_grad_close(got_grad, want_grad, "d loss_ciae_sum / d prenorm")


SMOKE = """
import sys
sys.path.insert(0, {bench!r})
import loss_speed
payload = loss_speed.main(["--sizes", "32x48", "--repeats", "1", "--warmup", "0",
                           "--kinds", "ciae,infonce", "--impls", "engine,dense",
                           "--memory_size", "64x64", "--things", "2,3"])
print("TENSORFLOW_IMPORTED", "tensorflow" in sys.modules)
"""


@pytest.mark.slow  # ~40 s of CPU: eight small programs compiled.
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
  rows = {(r["kind"], r["impl"]): r for r in payload["results"]}
  assert set(rows) == {(k, i) for k in ("ciae", "infonce") for i in ("engine", "dense")}
  for kind in ("ciae", "infonce"):
    # 2 x 32 x 48 pixels summed in another order: sqrt(3072) * u = 3e-6 (see LOSS_RTOL).
    np.testing.assert_allclose(rows[(kind, "dense")]["loss"], rows[(kind, "engine")]["loss"],
                               rtol=LOSS_RTOL)
  plans = payload["memory_plans"]
  assert plans["ciae engine"]["temp_bytes"] < plans["ciae dense"]["temp_bytes"]
