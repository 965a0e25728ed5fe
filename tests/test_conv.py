"""The matmul kernel gradient (ciae_jax.fast_paths.conv) against lax's and a float64 reference."""
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from ciae_jax import hparams
from ciae_jax.fast_paths import conv
from ciae_jax.models import ciae

NHWC = ("NHWC", "HWIO", "NHWC")


def _lax(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)


def _ours(x, w, strides, padding):
  return conv.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC,
                                   kernel_grad="matmul")


def _kernel_grad_float64(x, w_shape, dy, strides, padding):
  """Independent reference: the tap sum of the module docstring, in float64 NumPy."""
  x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
  kh, kw = w_shape[:2]
  x_pad = np.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  out_h, out_w = dy.shape[1:3]
  grad = np.zeros(w_shape, np.float64)
  for a in range(kh):
    for b in range(kw):
      window = x_pad[:, a:a + strides[0] * (out_h - 1) + 1:strides[0],
                     b:b + strides[1] * (out_w - 1) + 1:strides[1]]
      grad[a, b] = np.einsum("nhwi,nhwo->io", window, dy)
  return grad


CASES = [  # (x shape, kernel shape, strides, padding)
    ((2, 13, 17, 8), (3, 3, 8, 16), (1, 1), ((1, 1), (1, 1))),
    ((1, 16, 24, 32), (3, 3, 32, 32), (1, 1), "SAME"),
    ((2, 15, 9, 16), (1, 1, 16, 24), (1, 1), ((0, 0), (0, 0))),
    ((2, 16, 24, 8), (1, 1, 8, 16), (2, 2), ((0, 0), (0, 0))),  # ResNet projection shortcut
    ((2, 17, 25, 8), (3, 3, 8, 8), (2, 2), ((1, 1), (1, 1))),  # odd sides, stride 2
    ((1, 20, 18, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3))),  # the stem
    ((1, 12, 14, 4), (3, 3, 4, 6), (2, 1), ((0, 2), (1, 0))),  # asymmetric
    ((1, 12, 14, 4), (3, 2, 4, 6), (1, 1), "VALID"),
    ((1, 11, 10, 4), (3, 3, 4, 6), (2, 2), "SAME"),
    ((1, 12, 14, 4), (3, 3, 4, 6), (1, 1), ((0, 2), (2, 1))),  # stride 1, asymmetric: padded dy
    ((1, 9, 10, 4), (3, 3, 4, 6), (1, 1), ((3, 3), (0, 0))),  # pad > k - 1: padded x
]


@pytest.mark.parametrize("strides,padding,shifted", [
    ((1, 1), ((1, 1), (1, 1)), True), ((1, 1), ((0, 2), (2, 0)), True),
    ((1, 1), ((3, 0), (1, 1)), False), ((2, 2), ((1, 1), (1, 1)), False),
    ((1, 2), ((1, 1), (1, 1)), False)])
def test_kernel_grad_takes_windows_of_dy_for_stride_one(monkeypatch, strides, padding, shifted):
  calls = []
  original = conv._kernel_grad_shifted_dy
  monkeypatch.setattr(conv, "_kernel_grad_shifted_dy",
                      lambda *a, **k: calls.append(1) or original(*a, **k))
  x = jnp.ones((1, 8, 9, 2))
  dy_shape = jax.eval_shape(lambda: _lax(x, jnp.ones((3, 3, 2, 4)), strides, padding)).shape
  conv._kernel_grad(x, jnp.ones(dy_shape), (3, 3, 2, 4), strides, padding)
  assert bool(calls) == shifted


@pytest.mark.parametrize("x_shape,w_shape,strides,padding", CASES)
def test_values_and_gradients_match_lax(x_shape, w_shape, strides, padding):
  kx, kw_, kd = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, x_shape)
  w = jax.random.normal(kw_, w_shape) * 0.1
  y_ref, vjp_ref = jax.vjp(lambda x_, w_: _lax(x_, w_, strides, padding), x, w)
  y, vjp = jax.vjp(lambda x_, w_: _ours(x_, w_, strides, padding), x, w)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))  # the forward is lax's
  dy = jax.random.normal(kd, y.shape)
  dx_ref, dw_ref = jax.jit(vjp_ref)(dy)
  dx, dw = jax.jit(vjp)(dy)
  np.testing.assert_array_equal(np.asarray(dx), np.asarray(dx_ref))  # XLA's own input grad
  scale = float(jnp.abs(dw_ref).max())
  np.testing.assert_allclose(np.asarray(dw), np.asarray(dw_ref), rtol=0, atol=1e-5 * scale)
  pads = conv._explicit_padding(padding, x_shape, w_shape, strides)
  exact = _kernel_grad_float64(x, w_shape, dy, strides, pads)
  np.testing.assert_allclose(np.asarray(dw), exact, rtol=0, atol=1e-5 * scale)


TINY_CASES = [  # maps smaller than the kernel: the patches' matmul
    ((2, 2, 3, 16), (3, 3, 16, 8), (1, 1), "SAME"),  # P7 of a 256 x 384 input
    ((1, 1, 1, 8), (3, 3, 8, 4), (1, 1), ((1, 1), (1, 1))),
    ((2, 2, 5, 8), (3, 3, 8, 8), (2, 2), ((1, 1), (1, 1))),  # P6 -> P7, stride 2
    ((1, 5, 2, 4), (3, 3, 4, 6), (1, 1), ((0, 2), (2, 1))),
]


@pytest.mark.parametrize("x_shape,w_shape,strides,padding", TINY_CASES)
def test_tiny_maps_match_lax(monkeypatch, x_shape, w_shape, strides, padding):
  calls = []
  original = conv._conv_im2col
  monkeypatch.setattr(conv, "_conv_im2col", lambda *a: calls.append(1) or original(*a))
  kx, kw_, kd = jax.random.split(jax.random.PRNGKey(6), 3)
  x = jax.random.normal(kx, x_shape)
  w = jax.random.normal(kw_, w_shape) * 0.1
  y_ref, vjp_ref = jax.vjp(lambda x_, w_: _lax(x_, w_, strides, padding), x, w)
  y, vjp = jax.vjp(lambda x_, w_: _ours(x_, w_, strides, padding), x, w)
  assert calls, "the patches' matmul should take maps smaller than the kernel"
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=0,
                             atol=1e-5 * float(jnp.abs(y_ref).max()))
  dy = jax.random.normal(kd, y.shape)
  for ours, ref in zip(jax.jit(vjp)(dy), jax.jit(vjp_ref)(dy)):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=0,
                               atol=1e-5 * float(jnp.abs(ref).max()))
  pads = conv._explicit_padding(padding, x_shape, w_shape, strides)
  np.testing.assert_allclose(np.asarray(jax.jit(vjp)(dy)[1]),
                             _kernel_grad_float64(x, w_shape, dy, strides, pads), rtol=0,
                             atol=1e-5 * float(jnp.abs(vjp_ref(dy)[1]).max()))


def test_tiny_maps_keep_lax_with_xla_kernel_grad():
  x = jax.random.normal(jax.random.PRNGKey(7), (2, 2, 3, 8))
  w = jax.random.normal(jax.random.PRNGKey(8), (3, 3, 8, 8))
  ours = conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC,
                                   kernel_grad="xla")
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(_lax(x, w, (1, 1), "SAME")))


def test_unsupported_forms_are_lax_unchanged():
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 10, 12, 8))
  w = jax.random.normal(jax.random.PRNGKey(2), (3, 3, 4, 8))
  kwargs = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC,
                feature_group_count=2, rhs_dilation=(2, 2))
  grad = lambda f: jax.grad(lambda w_: jnp.sum(jnp.sin(f(x, w_, **kwargs))))(w)
  ours = grad(lambda *a, **k: conv.conv_general_dilated(*a, **k, kernel_grad="matmul"))
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(grad(lax.conv_general_dilated)))
  nchw = jnp.transpose(x, (0, 3, 1, 2))
  w_oihw = jnp.transpose(w, (3, 2, 0, 1))[:, :4].repeat(2, axis=1)
  y = conv.conv_general_dilated(nchw, w_oihw, (1, 1), "SAME", kernel_grad="matmul")
  np.testing.assert_array_equal(np.asarray(y),
                                np.asarray(lax.conv_general_dilated(nchw, w_oihw, (1, 1), "SAME")))


def test_bfloat16_kernel_gradient_keeps_dtype():
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 8), jnp.bfloat16)
  w = (jax.random.normal(jax.random.PRNGKey(4), (3, 3, 8, 8)) * 0.1).astype(jnp.bfloat16)
  loss = lambda f: lambda w_: jnp.sum(f(x, w_, (1, 1), "SAME").astype(jnp.float32) ** 2)
  ours, ref = jax.grad(loss(_ours))(w), jax.grad(loss(_lax))(w)
  assert ours.dtype == jnp.bfloat16
  scale = float(jnp.abs(ref.astype(jnp.float32)).max())
  np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32),
                             rtol=0, atol=2e-2 * scale)


def test_resolve_kernel_grad():
  assert conv.resolve_kernel_grad("auto") == "matmul"
  assert conv.resolve_kernel_grad("xla") == "xla"
  assert conv.resolve_kernel_grad("matmul") == "matmul"
  assert conv.resolve_kernel_grad("auto", (3, 3, 256, 256)) == "matmul"
  assert conv.resolve_kernel_grad("auto", (1, 1, 16, 8)) == "matmul"
  assert conv.resolve_kernel_grad("auto", (3, 3, 64, 64)) == "xla"
  assert conv.resolve_kernel_grad("matmul", (3, 3, 64, 64)) == "matmul"
  with pytest.raises(ValueError, match="conv_kernel_grad"):
    conv.resolve_kernel_grad("fast")
  with pytest.raises(ValueError, match="model.conv_kernel_grad"):
    hparams.ModelHParams(conv_kernel_grad="fast")


def test_auto_takes_the_matmul_on_cpu_and_lax_elsewhere():
  """The platform of the lowering decides: the CPU program holds the taps' loop in its
  backward pass, the CUDA program only convolutions."""
  x = jnp.ones((2, 16, 16, 256), jnp.float32)
  w = jnp.ones((3, 3, 256, 256), jnp.float32)
  grad = jax.jit(jax.grad(lambda w: jnp.sum(conv.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))))
  text = {p: grad.trace(w).lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "cuda")}
  assert "stablehlo.while" in text["cpu"] and "stablehlo.dot_general" in text["cpu"]
  assert "stablehlo.while" not in text["cuda"] and "dot_general" not in text["cuda"]
  assert "stablehlo.convolution" in text["cuda"]  # the kernel gradient, by lax


NETWORK_IMAGES = (2, 64, 96, 3)  # P6 1 x 2 and P7 1 x 1: maps smaller than the 3 x 3 kernels
# One conv3x3 + GN + ReLU per head tower (4 in the paper): each tower layer is the same code on
# the same five maps, so one of them exercises what four do, at a fraction of the compile time
# of the network's backward pass (the tower runs once per FPN level).
NETWORK_HEAD_CONVS = 1


class _Network:
  """One norm's network: variables and lax's outputs and gradients, computed once per module.

  The variables do not depend on `conv_kernel_grad` (it picks how a kernel gradient is computed,
  not what the model holds), so both kernel-gradient paths start from the same ones.
  """

  def __init__(self, norm: str):
    self.norm = norm
    self.images = jax.random.normal(jax.random.PRNGKey(5), NETWORK_IMAGES)
    # The "unsafe_rbg" generator compiles the initialisation ~4x faster than threefry on CPU
    # (benchmarks/common.py); the test needs random weights of the right shapes and scales.
    self.params, self.rest = ciae.split_variables(
        ciae.init_variables(self._model("xla"), jax.random.key(0, impl="unsafe_rbg")))
    self.reference = None  # (loss, outputs, grads) of conv_kernel_grad="xla".

  def _model(self, kernel_grad):
    return ciae.build_model(hparams.ModelHParams(
        backbone="resnet_tiny", norm=self.norm, fpn_dim=32, semantic_dim=16, embed_dim=8,
        head_convs=NETWORK_HEAD_CONVS, conv_kernel_grad=kernel_grad), 3)

  def outputs_and_grads(self, kernel_grad):
    model = self._model(kernel_grad)

    def loss(p):
      outputs = model.apply({"params": p, **self.rest}, self.images)
      return sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree_util.tree_leaves(outputs)), outputs
    # Forward and backward as two programs: the forward program is the same operations in both
    # kernel-gradient modes, so its values (the residuals too) are bit for bit equal whatever
    # XLA fuses; the backward differs only in how kernel gradients are computed. (In one
    # value_and_grad program the forward's fusion follows its backward consumers, and float32
    # rounding of the forward then differs between the modes.)
    (value, outputs), backward = jax.vjp(jax.jit(loss), self.params)
    cotangent = (jnp.ones_like(value), jax.tree_util.tree_map(jnp.zeros_like, outputs))
    (grads,) = jax.jit(backward)(cotangent)
    return value, outputs, grads


@pytest.fixture(scope="module", params=["gn", "frozen_bn"])
def network(request):
  """A `_Network` whose reference was computed with neither matmul path traced."""
  net = _Network(request.param)
  traced = []
  with pytest.MonkeyPatch.context() as patch:
    kernel_grad_fn, im2col_fn = conv._kernel_grad, conv._conv_im2col
    patch.setattr(conv, "_kernel_grad", lambda *a: traced.append(1) or kernel_grad_fn(*a))
    patch.setattr(conv, "_conv_im2col", lambda *a: traced.append(2) or im2col_fn(*a))
    net.reference = net.outputs_and_grads("xla")
  assert not traced  # "xla" is lax's convolution and gradient everywhere.
  return net


def _assert_grads_close(grads, grads_ref, tolerance, floor=0.0):
  """Each leaf within `tolerance` of its largest value, plus `floor` of the largest gradient of
  all (for leaves that are 0 in exact arithmetic, e.g. biases before a GroupNorm: noise)."""
  pairs = zip(jax.tree_util.tree_leaves_with_path(grads_ref), jax.tree_util.tree_leaves(grads))
  overall = max(float(jnp.abs(leaf).max()) for leaf in jax.tree_util.tree_leaves(grads_ref))
  checked = 0
  for (path, ref), ours in pairs:
    scale = float(jnp.abs(ref).max())
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=0,
                               atol=tolerance * scale + floor * overall + 1e-30,
                               err_msg=jax.tree_util.keystr(path))
    checked += "kernel" in jax.tree_util.keystr(path)
  return checked


@pytest.mark.slow
def test_network_gradients_match_xla(network, monkeypatch):
  """The whole CIAE network: same outputs, parameter gradients within 1e-5 of their scale.

  The maps smaller than the kernel go to lax here (their patches' matmul changes the forward's
  rounding, which GroupNorm over 1 x 1 maps amplifies; see the test after this one)."""
  traced = []
  kernel_grad_fn = conv._kernel_grad
  monkeypatch.setattr(conv, "_kernel_grad", lambda *a: traced.append(1) or kernel_grad_fn(*a))
  monkeypatch.setattr(conv, "_conv_im2col", lambda x, w, s, p: traced.append(2) or _lax(x, w, s, p))
  loss_ref, _, grads_ref = network.reference  # "xla" traced neither (the fixture checks)
  loss, _, grads = network.outputs_and_grads("matmul")
  assert float(loss) == float(loss_ref)
  # Leaves that are 0 in exact arithmetic (biases before a GroupNorm) hold rounding noise of
  # ~1e-7 of the largest gradient, which each backward program rounds its own way: the floor.
  checked = _assert_grads_close(grads, grads_ref, 1e-5, floor=1e-6)
  assert checked >= 20  # the backbone's, FPN's, head's and embedding branch's kernels
  assert len(traced) >= checked and 2 in traced  # every trainable kernel took a matmul path


@pytest.mark.slow
def test_network_with_tiny_map_matmuls_close_to_xla(network):
  """With the patches' matmul on P6 / P7: outputs and gradients within 1e-3 of their scale.

  Each such convolution is within 1e-5 of lax (`test_tiny_maps_match_lax`); GroupNorm over a
  1 x 1 map divides by the standard deviation of 8 values, which amplifies that rounding."""
  _, outputs_ref, grads_ref = network.reference
  _, outputs, grads = network.outputs_and_grads("matmul")
  for ours, ref in zip(jax.tree_util.tree_leaves(outputs), jax.tree_util.tree_leaves(outputs_ref)):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=0,
                               atol=1e-3 * float(jnp.abs(ref).max()) + 1e-30)
  assert _assert_grads_close(grads, grads_ref, 1e-3, floor=1e-5) >= 20
