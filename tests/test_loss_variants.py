"""The shipped per-pixel losses against independent NumPy formulas, finite on extreme inputs, and
their selection by config (`loss.kind`, `loss.params`, `module:function`)."""
import math
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ciae_jax import config_lib
from ciae_jax import hparams
from ciae_jax import hparams_mapping
from ciae_jax.losses import ciae as ciae_lib
from ciae_jax.losses import pixel_losses
from ciae_jax.losses import registry
from ciae_jax.segments import Segments
import loss_cases

KINDS = sorted(pixel_losses.REGISTRY)


def _reference(kind, s, own, counted, **params):
  """One pixel's loss in float64 from the variant's formula (its docstring's equation)."""
  q = len(s)
  margin, eps = params.get("margin", 0.15), params.get("eps", 1e-6)
  include_own = params.get("include_own", True)
  negatives = [k for k in range(q) if counted[k] and k != own]
  if kind in ("ciae", "hinge", "mean_negatives"):
    d = 1.0 - s
    terms = [d[own] - d[k] + margin for k in negatives]
    if include_own:
      terms.append(d[own] + margin)  # Eq. 6: d_neg = 0 for the own query
    hinge = [max(x, 0.0) for x in terms]
    if kind == "hinge":
      return sum(sorted(hinge, reverse=True)[:params.get("top_k", 5)])
    logs = [-math.log(1.0 - min(h / (2.0 + margin), 1.0 - eps)) for h in hinge]
    if kind == "ciae":
      return sum(sorted(logs, reverse=True)[:params.get("top_k", 5)])
    return sum(logs) / max(len(logs), 1)
  if kind == "infonce":
    t = params.get("temperature", 0.1)
    logits = [s[k] / t for k in range(q) if counted[k] or k == own]
    return math.log(sum(math.exp(v) for v in logits)) - s[own] / t
  a, b = params.get("scale_pos", 2.0), params.get("scale_neg", 50.0)
  lam = params.get("threshold", 0.5)
  return (math.log1p(math.exp(-a * (s[own] - lam))) / a
          + math.log1p(sum(math.exp(b * (s[k] - lam)) for k in negatives)) / b)


PARAMS = {"ciae": [{}, dict(top_k=2, include_own=False, margin=0.3)],
          "hinge": [{}, dict(top_k=1, margin=0.0)],
          "mean_negatives": [{}, dict(include_own=False)],
          "infonce": [{}, dict(temperature=0.5)],
          "multi_similarity": [{}, dict(scale_pos=1.0, scale_neg=10.0, threshold=0.0)]}


@pytest.mark.parametrize("kind", KINDS)
def test_variant_matches_its_formula(kind):
  rng = np.random.default_rng(1)
  chunk, num_queries = 24, 9
  similarity = rng.uniform(-1, 1, (chunk, num_queries)).astype(np.float32)
  similarity[:, 3] = 0.0  # a box-filtered query
  own = rng.integers(0, num_queries, chunk).astype(np.int32)
  counted = rng.random((chunk, num_queries)) < 0.7
  counted[np.arange(chunk), own] = True
  for params in PARAMS[kind]:
    got = np.asarray(registry.bind(kind, params)(similarity, own, counted))
    want = [_reference(kind, similarity[i].astype(np.float64), own[i], counted[i], **params)
            for i in range(chunk)]
    # <= 9 float32 terms of a few roundings each (exp / log of values <= 50 for the scaled
    # similarities): relative 1e-5 leaves a wide margin over 9 * 4 * 2^-24 = 2e-6.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=str(params))


def _extreme_inputs():
  """Similarities of exactly +-1 and 0, one counted query (the own), all counted."""
  num_queries = 6
  rows = []
  for s_own in (1.0, -1.0):
    for s_other in (1.0, -1.0, 0.0):
      for only_own in (False, True):
        s = np.full(num_queries, s_other, np.float32)
        s[2] = s_own
        counted = np.zeros(num_queries, bool) if only_own else np.ones(num_queries, bool)
        counted[2] = True
        rows.append((s, counted))
  similarity = np.stack([r[0] for r in rows])
  counted = np.stack([r[1] for r in rows])
  return similarity, np.full(len(rows), 2, np.int32), counted


@pytest.mark.parametrize("kind", KINDS)
def test_variant_is_finite_on_extreme_inputs(kind):
  similarity, own, counted = _extreme_inputs()
  for params in PARAMS[kind]:
    loss = registry.bind(kind, params)
    value, grad = jax.value_and_grad(lambda s, loss=loss: jnp.sum(loss(s, own, counted)))(
        jnp.asarray(similarity))
    assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad)), (params, value, grad)
    assert np.all(np.asarray(loss(similarity, own, counted)) >= -1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_no_valid_pixel_gives_zero_and_finite_gradients(kind):
  """An image of void only (and one of crowd only): sums and pixel count 0, gradients finite."""
  rng = np.random.default_rng(2)
  case = loss_cases.case(rng)
  memory = loss_cases.memory(rng, True)
  for fill in ("void", "crowd"):
    arrays = {k: case[k].copy() for k in loss_cases.SEGMENT_KEYS}
    if fill == "void":
      arrays["segment_map"][:] = 0
    else:
      arrays["seg_is_crowd"][:] = True
    segments = Segments(*(arrays[k] for k in loss_cases.SEGMENT_KEYS))
    hp = hparams.LossHParams(kind=kind, chunk_size=64)

    def total(prenorm, segments=segments, hp=hp):
      sums = ciae_lib.ciae_loss(None, prenorm, segments, memory, hp,
                                num_stuff=loss_cases.NUM_STUFF)
      return ciae_lib.ciae_total(sums)["loss_ciae"], sums

    (value, sums), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(
        jnp.asarray(case["embedding_prenorm"]))
    assert float(value) == 0.0 and float(sums["num_pixels"]) == 0.0, fill
    assert np.all(np.isfinite(grad)) and not np.any(grad), fill


# --- selection by config ----------------------------------------------------------------------


USER_MODULE = """
import jax.numpy as jnp

def soft_margin(similarity, own, counted, *, scale=4.0):
  is_own = own[:, None] == jnp.arange(similarity.shape[1])[None, :]
  s_own = jnp.sum(jnp.where(is_own, similarity, 0.0), axis=1)
  gaps = jnp.where(counted & ~is_own, similarity - s_own[:, None], -2.0)
  return jnp.mean(jnp.logaddexp(0.0, scale * gaps), axis=1)

def needs_a_value(similarity, own, counted, *, sharpness):
  return jnp.sum(similarity, axis=1) * sharpness

def wrong_shape(similarity, own, counted):
  return similarity

not_a_function = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
  """A module of the user's own, outside the package, on the Python path."""
  (tmp_path / "my_losses.py").write_text(textwrap.dedent(USER_MODULE))
  monkeypatch.syspath_prepend(str(tmp_path))
  yield "my_losses"
  sys.modules.pop("my_losses", None)


def test_user_function_is_selected_and_its_params_set(user_module):
  hp = hparams.LossHParams(kind=f"{user_module}:soft_margin", params={"scale": 2.0})
  loss = registry.bind(hp.kind, hp.params)
  similarity, own, counted = _extreme_inputs()
  got = np.asarray(loss(similarity, own, counted))
  is_own = own[:, None] == np.arange(similarity.shape[1])[None, :]
  s_own = similarity[is_own]
  gaps = np.where(counted & ~is_own, similarity - s_own[:, None], -2.0)
  np.testing.assert_allclose(got, np.mean(np.logaddexp(0.0, 2.0 * gaps), axis=1), rtol=1e-6)


@pytest.mark.parametrize("kind, params, message", [
    ("triplett", {}, r"config.loss.kind='triplett': not a registered loss"),
    ("no_such_module_xyz:f", {}, r"cannot import module 'no_such_module_xyz'"),
    ("{user}:missing", {}, r"has no 'missing'"),
    ("{user}:not_a_function", {}, r"is not a function"),
    ("{user}:soft_margin", {"scal": 2.0}, r"config.loss.params.scal: not a parameter of "
     r"loss.kind='my_losses:soft_margin' \(its parameters: \['scale'\]\)"),
    ("{user}:needs_a_value", {}, r"config.loss.params.sharpness: .* needs it"),
    ("{user}:wrong_shape", {}, r"returned .* shape \[4\]"),
    ("infonce", {"margin": 0.2}, r"config.loss.params.margin: not a parameter of "
     r"loss.kind='infonce'"),
    ("ciae", {"top_k": 0}, r"config.loss.params .*top_k"),
    ("infonce", {"temperature": 0.0}, r"temperature > 0"),
])
def test_bad_selection_is_an_error_naming_the_field(user_module, kind, params, message):
  with pytest.raises(hparams.HParamsError, match=message):
    hparams.LossHParams(kind=kind.format(user=user_module), params=params)


def test_params_from_the_config():
  """`loss.params` holds a typed placeholder for every shipped parameter; unset ones (None)
  keep the function's default and are not recorded."""
  config = config_lib.base_config()
  assert set(config.loss.params) == set(registry.shipped_parameter_types())
  config.loss.kind = "multi_similarity"
  config.loss.params.scale_neg = 20.0
  hp = hparams.HParams.from_config(config)
  assert hp.loss.params == {"scale_neg": 20.0}
  assert hparams_mapping.to_config_dict(hp).loss.params.scale_neg == 20.0
  with pytest.raises(TypeError, match="immutable"):
    hp.loss.params["scale_neg"] = 1.0  # type: ignore[index]
  assert hash(hp) == hash(hparams.HParams.from_config(config))
  config.loss.params.top_k = 3  # a parameter of other variants, not of this one
  with pytest.raises(hparams.HParamsError, match=r"config.loss.params.top_k"):
    hparams.HParams.from_config(config)


def test_default_is_the_paper_loss():
  hp = hparams.LossHParams()
  assert hp.kind == "ciae" and hp.params == {} and (hp.cae_weight, hp.alpha) == (1.0, 2.0)
  assert registry.bind(hp.kind, hp.params).fn is pixel_losses.ciae
