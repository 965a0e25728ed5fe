"""Tests of the CIAE network (ciae_jax/models): shapes, structure, numerics of the tiny model."""
import functools
import math

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ciae_jax.models import ciae
from ciae_jax.models import embedding as embedding_lib
from ciae_jax.models import fpn as fpn_lib
from ciae_jax.models import head as head_lib
from ciae_jax.models import layers

STRIDES = (8, 16, 32, 64, 128)
LEVEL_KEYS = ("cls_logits", "centerness", "box_reg", "box_embed")
TINY = dict(backbone="resnet_tiny", fpn_dim=32, semantic_dim=16, head_convs=2)


def shapes_of(tree):
  return jax.tree.map(lambda x: tuple(x.shape), tree)


def flat_paths(tree) -> set[str]:
  return set(traverse_util.flatten_dict(tree, sep="/"))


# ---------------------------------------------------------------- ResNet-50, shapes only

@pytest.fixture(scope="module")
def r50():
  model = ciae.build_model(dict(backbone="resnet50", norm="frozen_bn"), 80)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 128, 128, 3)))
  return model, variables


@pytest.mark.parametrize("height, width", [(800, 1344), (1024, 1024)])
def test_r50_output_shapes(height, width, r50):
  model, variables = r50
  batch = 2
  out = jax.eval_shape(model.apply, variables, jnp.zeros((batch, height, width, 3)))
  expected_keys = set(LEVEL_KEYS) | {"embedding", "embedding_prenorm"}
  assert set(out) == expected_keys
  for level, stride in enumerate(STRIDES):
    hl, wl = math.ceil(height / stride), math.ceil(width / stride)
    assert out["cls_logits"][level].shape == (batch, hl, wl, 80)
    assert out["centerness"][level].shape == (batch, hl, wl)
    assert out["box_reg"][level].shape == (batch, hl, wl, 4)
    assert out["box_embed"][level].shape == (batch, hl, wl, 32)
  for key in ("embedding", "embedding_prenorm"):
    assert out[key].shape == (batch, height, width, 32)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out))


def test_r50_parameter_counts(r50):
  _, variables = r50
  counts = ciae.count_params(variables)
  print(f"CIAE-R50 (80 thing classes): trainable {counts['trainable']:,}, "
        f"total {counts['total']:,}")
  # torchvision resnet50 has 25,557,032 parameters, of which fc holds 2048 * 1000 + 1000;
  # our backbone also holds the BN running mean and variance (buffers in torchvision).
  backbone = {c: variables[c]["backbone"] for c in variables if "backbone" in variables[c]}
  stats = sum(int(v.size) for path, v in traverse_util.flatten_dict(backbone).items()
              if path[-1] in ("mean", "var"))
  assert ciae.count_params(backbone)["total"] - stats == 25_557_032 - (2048 * 1000 + 1000)
  # Proposal head: 2 towers x 4 x (conv3x3 256->256 + bias + GN scale/bias), then
  # cls (80), centerness (1), box (4), box embedding (32) conv3x3 with bias, 5 scales.
  tower = 2 * 4 * (9 * 256 * 256 + 256 + 2 * 256)
  predictors = sum(9 * 256 * c + c for c in (80, 1, 4, 32))
  assert ciae.count_params({"params": variables["params"]["head"]})["total"] == (
      tower + predictors + 5)
  # Frozen: every BN vector, plus the stem and layer1 kernels (freeze_at=2); nothing else.
  frozen = traverse_util.flatten_dict(variables["frozen"]["backbone"], sep="/")
  frozen_kernels = {p for p in frozen if p.endswith("kernel")}
  assert frozen_kernels == {"conv1/kernel"} | {
      f"layer1_{b}/{c}/kernel" for b in range(3) for c in ("conv1", "conv2", "conv3")} | {
          "layer1_0/downsample_0/kernel"}
  assert not any(p.endswith(("mean", "var")) for p in flat_paths(variables["params"]))
  assert counts["trainable"] + sum(int(v.size) for v in frozen.values()) == counts["total"]


# ---------------------------------------------------------------- the tiny model, compiled

@pytest.fixture(scope="module")
def tiny():
  """Tiny CIAE run once (init + forward in one compile) on a 2 x 128 x 128 batch."""
  model = ciae.build_model(TINY, 5)
  images = jax.random.normal(jax.random.key(1), (2, 128, 128, 3))
  init = jax.jit(lambda key, x: model.init_with_output(key, x, mutable=True))
  out, variables = init(jax.random.key(0), images)
  intermediates = variables.pop("intermediates")
  return model, images, out, variables, intermediates


def test_tiny_forward_shapes_finite_float32(tiny):
  _, _, out, _, _ = tiny
  for level, stride in enumerate(STRIDES):
    side = 128 // stride
    assert out["cls_logits"][level].shape == (2, side, side, 5)
    assert out["box_embed"][level].shape == (2, side, side, 32)
  assert out["embedding"].shape == (2, 128, 128, 32)
  for leaf in jax.tree.leaves(out):
    assert leaf.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(leaf)))
  assert all(np.all(np.asarray(b) >= 0) for b in out["box_reg"])


def test_embedding_is_unit_norm_prenorm_direction(tiny):
  _, _, out, _, _ = tiny
  emb = np.asarray(out["embedding"], np.float64)
  pre = np.asarray(out["embedding_prenorm"], np.float64)
  # A float32 L2 normalisation of 32 components: a norm of 32 squares and one division per
  # component put each unit vector within ~(32 / 2 + 2) * 2^-24 ~ 1e-6 of unit length and of
  # the direction of its pre-norm vector; atol 1e-5 (~80 eps).
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(emb, pre / np.linalg.norm(pre, axis=-1, keepdims=True), atol=1e-5)


def numpy_bilinear(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """PyTorch interpolate(mode='bilinear', align_corners=False) of [B, h, w, C], in NumPy."""
  def axis_weights(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, src - lo
  y0, y1, wy = axis_weights(x.shape[1], out_h)
  x0, x1, wx = axis_weights(x.shape[2], out_w)
  rows = x[:, y0] * (1 - wy)[None, :, None, None] + x[:, y1] * wy[None, :, None, None]
  return rows[:, :, x0] * (1 - wx)[None, None, :, None] + rows[:, :, x1] * wx[None, None, :, None]


def test_prenorm_is_bilinear_4x_of_the_quarter_map(tiny):
  _, _, out, _, intermediates = tiny
  quarter = np.asarray(intermediates["embedding"]["embedding_quarter"][0], np.float64)
  assert quarter.shape == (2, 32, 32, 32)
  # float32 bilinear interpolation (2 weights per axis, 4 products) vs float64 on the same
  # float32 map: a few eps of the values (|x| < ~5), i.e. < 1e-5 absolute or relative.
  np.testing.assert_allclose(np.asarray(out["embedding_prenorm"]),
                             numpy_bilinear(quarter, 128, 128), rtol=1e-5, atol=1e-5)


def test_bfloat16_matches_float32_loosely(tiny):
  model, images, out, variables, _ = tiny
  out_bf16 = jax.jit(model.clone(hp=model.hp.replace(dtype="bfloat16")).apply)(variables, images)
  assert shapes_of(out_bf16) == shapes_of(out)
  for leaf in jax.tree.leaves(out_bf16):
    assert leaf.dtype == jnp.float32
  # bfloat16 keeps 8 significant bits (each rounding <= 2^-9 = 0.2% relative): outputs below
  # 8 in magnitude are rounded to a grid of <= 2^-5 = 0.03, and the bfloat16 noise of the
  # ~25 layers below has an RMS of 0.1-0.5% of max|output| (measured; its max over a level
  # ~5x that). atol 0.05 (cls logits ~ -4.6, centerness, box_embed < 1) is 1.6 grid steps at
  # |x| < 8; box_reg, up to ~8 after the stride, gets 5% of its max (measured: max error
  # 1-2% of max). A model computing garbage or ignoring dtype differs by the outputs' scale.
  for key in ("cls_logits", "centerness", "box_embed"):
    for a, b in zip(out[key], out_bf16[key]):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=0.05)
  for a, b in zip(out["box_reg"], out_bf16["box_reg"]):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=0.05 * float(np.max(a)) + 1e-3)
  cosine = np.sum(np.asarray(out["embedding"]) * np.asarray(out_bf16["embedding"]), axis=-1)
  # 32-dim unit vectors with ~0.5% noise per component: 1 - cos ~ noise^2 / 2 (measured
  # min 0.9996); 0.98 is an angle of 11 degrees.
  assert cosine.min() > 0.98


def test_prior_bias_and_level_scales(tiny):
  _, _, _, variables, _ = tiny
  head = variables["params"]["head"]
  # -log(99) rounded once to float32 (half an ulp, 6e-8 relative); rtol 1e-6 = 8 eps. The
  # zero init is exact.
  np.testing.assert_allclose(np.asarray(head["cls_logits"]["bias"]), -math.log(99.0), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(head["centerness"]["bias"]), 0.0)
  for name in ("p3", "p4", "p5", "p6", "p7"):
    scale = head[f"scale_{name}"]
    assert scale.shape == () and float(scale) == 1.0
  kernel = np.asarray(head["cls_tower_conv0"]["kernel"])
  # normal(0.01) init: the sample std of 3 * 3 * 32 * 32 draws has a relative standard error
  # of 1 / sqrt(2 * 9216) = 0.7%; 0.002 is 20%.
  assert abs(kernel.std() - 0.01) < 0.002


def test_box_reg_is_relu_of_scaled_logit_times_stride():
  """Per-level scale and stride: doubling scale_p4 doubles P4's boxes only."""
  head = head_lib.ProposalHead(num_classes=3, head_dim=8, head_convs=1, box_embed_dim=4)
  levels = [jax.random.normal(jax.random.key(i), (1, 16 // 2**i + 1, 9, 8)) for i in range(5)]
  base, variables = jax.jit(head.init_with_output)(jax.random.key(0), levels)
  apply = jax.jit(head.apply)
  params = dict(variables["params"], scale_p4=jnp.float32(2.0))
  doubled = apply({"params": params}, levels)
  for level in range(5):
    factor = 2.0 if level == 1 else 1.0
    # x2 is exact in float32, so the boxes are exactly doubled when both programs round the
    # convs alike; 8 eps allow another fusion of them (init vs apply compile separately).
    np.testing.assert_allclose(np.asarray(doubled["box_reg"][level]),
                               factor * np.asarray(base["box_reg"][level]), rtol=1e-6, atol=1e-7)
  # Raw regression = box_reg / stride must be a ReLU output: >= 0 with zeros present.
  raw = np.concatenate([np.asarray(b).ravel() / s for b, s in zip(base["box_reg"], STRIDES)])
  assert raw.min() == 0.0 and raw.max() > 0.0


def test_flatten_levels_order():
  levels = [np.random.default_rng(i).standard_normal((2, h, w, 3))
            for i, (h, w) in enumerate([(4, 6), (2, 3), (1, 2)])]
  flat = np.asarray(ciae.flatten_levels([jnp.asarray(x) for x in levels]))
  expected = [x[b, y, xx] for b in range(2) for x in levels
              for y in range(x.shape[1]) for xx in range(x.shape[2])]
  # A pure reordering of the float64 inputs, which jnp.asarray rounded to float32 (half an
  # ulp, 6e-8 relative): rtol 1e-6.
  np.testing.assert_allclose(flat, np.stack(expected).reshape(2, -1, 3), rtol=1e-6)


def identity_conv_params(tree):
  """Every conv kernel -> identity on its centre tap (needs Cin == Cout), every bias -> 0."""
  def make(path, leaf):
    if path[-1].key == "kernel":
      k = np.zeros(leaf.shape, np.float32)
      k[leaf.shape[0] // 2, leaf.shape[1] // 2] = np.eye(leaf.shape[2], leaf.shape[3])
      return jnp.asarray(k)
    return jnp.zeros_like(leaf)
  return jax.tree_util.tree_map_with_path(make, tree)


def test_fpn_top_down_is_nearest_and_p6_p7_come_from_p5():
  """Identity convs turn the FPN into its wiring: P_l = C_l + up(P_{l+1}) (nearest)."""
  channels = 4
  rng = np.random.default_rng(0)
  sizes = {"c2": (24, 40), "c3": (12, 20), "c4": (6, 10), "c5": (3, 5)}  # 96 x 160 input
  feats = {k: rng.standard_normal((1, h, w, channels), dtype=np.float32)
           for k, (h, w) in sizes.items()}
  fpn = fpn_lib.FPN(fpn_dim=channels)
  params = identity_conv_params(jax.eval_shape(fpn.init, jax.random.key(0), feats)["params"])
  out = jax.jit(fpn.apply)({"params": params}, feats)
  up2 = lambda x: x.repeat(2, axis=1).repeat(2, axis=2)
  expected = {"p5": feats["c5"]}
  for level in (4, 3, 2):
    expected[f"p{level}"] = feats[f"c{level}"] + up2(expected[f"p{level + 1}"])
  expected["p6"] = expected["p5"][:, ::2, ::2]  # 3x3 stride 2 pad 1, centre tap: even pixels
  expected["p7"] = np.maximum(expected["p6"], 0)[:, ::2, ::2]
  assert out["p6"].shape == (1, 2, 3, channels) and out["p7"].shape == (1, 1, 2, channels)
  # Identity taps (products by 0 and 1, sums with exact zeros) and the same float32 additions
  # as here: exact for a direct or GEMM convolution (measured: equal); 1e-5 (~50 eps of the
  # values, |x| < ~4) leaves room for a transform-based one (Winograd), which rounds even
  # identity kernels.
  for key, value in expected.items():
    np.testing.assert_allclose(np.asarray(out[key]), value, rtol=1e-5, atol=1e-5, err_msg=key)


def test_box_embeddings_are_bilinearly_upsampled_and_summed():
  """With P' silenced and an identity P'' conv, the 1/4 map is sum_l bilinear(box_embed_l)."""
  dim = 3
  rng = np.random.default_rng(1)
  feats = {f"p{l}": jnp.asarray(rng.standard_normal((1, 64 // 2**l, 96 // 2**l, 4)), jnp.float32)
           for l in (2, 3, 4, 5)}
  boxes = [rng.standard_normal((1, math.ceil(64 / s), math.ceil(96 / s), dim)).astype(np.float32)
           for s in STRIDES]
  branch = embedding_lib.EmbeddingBranch(semantic_dim=4, embed_dim=dim)
  variables = jax.eval_shape(lambda key: branch.init(key, feats, boxes, (64, 96)),
                             jax.random.key(0))
  params = dict(variables["params"])
  params["embed_pred"] = jax.tree.map(jnp.zeros_like, params["embed_pred"])
  params["box_embed_pred"] = identity_conv_params(params["box_embed_pred"])
  params = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jnp.zeros_like(x), params)
  apply = jax.jit(lambda p, f, b: branch.apply({"params": p}, f, b, (64, 96),
                                               mutable=["intermediates"]))
  (prenorm, _), state = apply(params, feats, boxes)
  quarter = np.asarray(state["intermediates"]["embedding_quarter"][0])
  expected = sum(numpy_bilinear(b.astype(np.float64), 16, 24) for b in boxes)
  # float32 bilinear resizes (4 products each) of 5 standard-normal maps, summed, vs float64:
  # ~10 roundings of values |x| < ~10, i.e. < 1e-5 absolute or relative (measured 8e-7).
  np.testing.assert_allclose(quarter, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(prenorm), numpy_bilinear(expected, 64, 96),
                             rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- switches (structure only)

@functools.cache
def _tiny_structure(overrides: tuple[tuple[str, object], ...]):
  model = ciae.build_model(dict(TINY, **dict(overrides)), 5)
  images = jnp.zeros((1, 128, 128, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  return variables, jax.eval_shape(model.apply, variables, images)


def tiny_structure(**overrides):
  """(variables, outputs) of the tiny model as ShapeDtypeStructs, cached."""
  return _tiny_structure(tuple(sorted(overrides.items())))


def test_no_box_embedding_switch_removes_its_params_and_output():
  on, out_on = tiny_structure()
  off, out_off = tiny_structure(use_box_embedding=False)
  assert "box_embed" in on["params"]["head"] and "box_embed_pred" in on["params"]["embedding"]
  assert "box_embed" not in off["params"]["head"]
  assert "box_embed_pred" not in off["params"]["embedding"]
  assert "box_embed" in out_on and "box_embed" not in out_off
  assert out_off["embedding"].shape == (1, 128, 128, 32)
  removed = flat_paths(on["params"]) - flat_paths(off["params"])
  assert removed == {"head/box_embed/kernel", "head/box_embed/bias",
                     "embedding/box_embed_pred/kernel", "embedding/box_embed_pred/bias"}


def test_coordconv_adds_two_input_channels_on_the_p5_path_only():
  on, _ = tiny_structure(use_coordconv=True)
  off, _ = tiny_structure(use_coordconv=False)
  fpn_dim, semantic_dim = TINY["fpn_dim"], TINY["semantic_dim"]
  for stage, in_channels in enumerate([fpn_dim, semantic_dim, semantic_dim]):
    assert on["params"]["embedding"][f"p5_conv{stage}"]["kernel"].shape == (
        3, 3, in_channels + 2, semantic_dim)
    assert off["params"]["embedding"][f"p5_conv{stage}"]["kernel"].shape == (
        3, 3, in_channels, semantic_dim)
  for level in (2, 3, 4):
    assert on["params"]["embedding"][f"p{level}_conv0"]["kernel"].shape[2] == fpn_dim
  # Panoptic-FPN depth: P2 one conv, P3 one, P4 two, P5 three.
  convs = {p.split("/")[1] for p in flat_paths(on["params"]) if p.startswith("embedding/p")}
  assert convs == {"p2_conv0", "p3_conv0", "p4_conv0", "p4_conv1", "p5_conv0", "p5_conv1",
                   "p5_conv2"} | {c.replace("conv", "gn") for c in convs if "conv" in c}


def test_embed_dims_and_head_depth():
  variables, out = tiny_structure(embed_dim=16, box_embed_dim=8, head_convs=3)
  assert out["embedding"].shape == (1, 128, 128, 16)
  assert out["box_embed"][0].shape == (1, 16, 16, 8)
  assert variables["params"]["embedding"]["box_embed_pred"]["kernel"].shape == (1, 1, 8, 16)
  towers = {k for k in variables["params"]["head"]
            if k.startswith(("cls_tower_conv", "reg_tower_conv"))}
  assert towers == {f"{t}_tower_conv{i}" for t in ("cls", "reg") for i in range(3)}
  _, out_default = tiny_structure(embed_dim=16)
  assert out_default["box_embed"][0].shape[-1] == 16  # box_embed_dim defaults to embed_dim


def test_gn_backbone_is_fully_trainable_and_has_no_frozen_collection():
  variables, _ = tiny_structure(norm="gn")
  assert set(variables) == {"params"}
  stem_norm = variables["params"]["backbone"]["bn1"]
  assert set(stem_norm) == {"scale", "bias"} and stem_norm["scale"].shape == (16,)
  frozen_bn, _ = tiny_structure(norm="frozen_bn", freeze_at=0)
  assert "conv1" in frozen_bn["params"]["backbone"]  # nothing frozen but BN
  frozen_leaves = {p.split("/")[-1] for p in flat_paths(frozen_bn["frozen"]["backbone"])}
  assert frozen_leaves == {"scale", "bias", "mean", "var"}


def test_shapes_on_a_multiple_of_32_that_is_not_of_128():
  """96 x 160: odd maps from P5 down (3 x 5, 2 x 3, 1 x 2) must still line up."""
  model = ciae.build_model(dict(TINY, norm="gn"), 5)
  images = jnp.zeros((1, 96, 160, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  out = jax.eval_shape(model.apply, variables, images)
  for level, stride in enumerate(STRIDES):
    hl, wl = math.ceil(96 / stride), math.ceil(160 / stride)
    assert out["cls_logits"][level].shape == (1, hl, wl, 5)
    assert out["box_reg"][level].shape == (1, hl, wl, 4)
  assert out["embedding"].shape == (1, 96, 160, 32)


def test_frozen_stages_live_outside_params():
  """With freeze_at=2 (the frozen_bn default) the stem and layer1 sit outside 'params'."""
  variables, _ = tiny_structure()
  assert "layer1_0" not in variables["params"]["backbone"]
  assert "conv1" not in variables["params"]["backbone"]
  assert "layer2_0" in variables["params"]["backbone"]


# ---------------------------------------------------------------- helpers and errors

def test_coord_channels_match_linspace_formula():
  coords = np.asarray(layers.coord_channels(2, 3, 5, jnp.float32))
  assert coords.shape == (2, 3, 5, 2)
  for y in range(3):
    for x in range(5):
      # The grid points -1 + k / 2 are dyadic: exact in float32 from any formula of exact
      # steps, so atol 1e-7 (below one ulp at 1) asks for exact values.
      np.testing.assert_allclose(coords[1, y, x], [-1 + 2 * x / 4, -1 + 2 * y / 2], atol=1e-7)


@pytest.mark.parametrize("channels, groups", [(256, 32), (128, 32), (48, 16), (16, 16), (8, 8)])
def test_group_count(channels, groups):
  assert layers.num_groups(channels) == groups


def test_l2_normalize_has_finite_gradient_at_zero():
  grad = jax.grad(lambda x: jnp.sum(layers.l2_normalize(x)))(jnp.zeros((2, 4)))
  assert np.all(np.isfinite(np.asarray(grad)))


def _l2_normalize_autodiff(x, axis=-1, eps=1e-12):
  """The expression before the written-out gradient, differentiated by JAX."""
  sq_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq_norm, eps * eps))


@pytest.mark.parametrize("axis", [-1, 1])
def test_l2_normalize_values_and_gradient_match_autodiff(axis):
  kx, kd = jax.random.split(jax.random.PRNGKey(3))
  x = jax.random.normal(kx, (3, 5, 7, 6)) * jnp.array([1e-3, 1.0, 30.0])[:, None, None, None]
  x = x.at[0, 0].set(0.0).at[1, 2, 3].set(1e-14)  # zero and clamped vectors
  dy = jax.random.normal(kd, x.shape)
  y, vjp = jax.vjp(lambda v: layers.l2_normalize(v, axis=axis), x)
  y_ref, vjp_ref = jax.vjp(lambda v: _l2_normalize_autodiff(v, axis=axis), x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
  (dx,), (dx_ref,) = vjp(dy), vjp_ref(dy)
  np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), rtol=1e-5,
                             atol=1e-6 * float(jnp.abs(dx_ref).max()))
  # Float64 reference of d/dx <dy, x / |x|> = (dy - y <dy, y>) / |x| (unclamped vectors).
  x64, dy64 = np.asarray(x, np.float64), np.asarray(dy, np.float64)
  norm = np.linalg.norm(x64, axis=axis, keepdims=True)
  y64 = x64 / norm
  dx64 = (dy64 - y64 * np.sum(dy64 * y64, axis=axis, keepdims=True)) / norm
  unclamped = np.broadcast_to(norm > 1e-12, x.shape)
  np.testing.assert_allclose(np.asarray(dx)[unclamped], dx64[unclamped], rtol=1e-4,
                             atol=1e-6 * np.abs(dx64[unclamped]).max())
  clamped = ~unclamped
  np.testing.assert_array_equal(np.asarray(dx)[clamped], np.asarray(dy)[clamped] * 1e12)


def test_build_model_reads_config_model():
  cfg = ml_collections.ConfigDict(dict(backbone="resnet_tiny", norm="gn", fpn_dim=64,
                                       embed_dim=16, use_coordconv=False, dtype="bfloat16"))
  model = ciae.build_model(cfg, num_thing_classes=7)
  hp = model.hp
  assert (model.num_thing_classes, hp.backbone, hp.norm, hp.fpn_dim, hp.embed_dim,
          hp.use_coordconv, hp.dtype) == (7, "resnet_tiny", "gn", 64, 16, False, "bfloat16")
  assert hp.head_convs == 4 and hp.semantic_dim == 128  # paper defaults
  with pytest.raises(ValueError, match="fpn_dims"):
    ciae.build_model(ml_collections.ConfigDict(dict(fpn_dims=64)), num_thing_classes=7)
  with pytest.raises(ValueError, match="resnet51"):
    ciae.build_model(ml_collections.ConfigDict(dict(backbone="resnet51")), num_thing_classes=7)


@pytest.mark.parametrize("overrides, shape, match", [
    ({}, (1, 100, 128, 3), "multiples of 32"),
    ({}, (1, 128, 128, 1), r"\[B, H, W, 3\]"),
    ({"norm": "bn"}, (1, 64, 64, 3), "norm"),
    ({"dtype": "int8"}, (1, 64, 64, 3), "dtype"),
    ({"norm": "gn", "freeze_at": 2}, (1, 64, 64, 3), "freeze_at"),
])
def test_bad_input_is_a_clear_error(overrides, shape, match):
  with pytest.raises(ValueError, match=match):
    model = ciae.build_model(dict(TINY, **overrides), 3)
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))


@pytest.mark.parametrize("in_hw, out_hw", [((3, 5), (6, 10)), ((4, 4), (4, 8)), ((2, 3), (6, 3)),
                                           ((3, 5), (5, 9)), ((3, 4), (6, 7))])
def test_resize_nearest_matches_jax_image_resize(in_hw, out_hw):
  kx, kd = jax.random.split(jax.random.PRNGKey(4))
  x = jax.random.normal(kx, (2, *in_hw, 3))
  reference = lambda v: jax.image.resize(v, (2, *out_hw, 3), method="nearest", antialias=False)
  y, vjp = jax.vjp(lambda v: layers.resize_nearest(v, out_hw), x)
  y_ref, vjp_ref = jax.vjp(reference, x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))  # copies of the input
  dy = jax.random.normal(kd, y.shape)
  # Sums of the same few cotangents, maybe in another order.
  np.testing.assert_allclose(np.asarray(vjp(dy)[0]), np.asarray(vjp_ref(dy)[0]), rtol=1e-6,
                             atol=1e-6)
