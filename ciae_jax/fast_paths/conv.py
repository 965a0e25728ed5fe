"""2-D convolution whose kernel gradient is a sum of matmuls.

XLA:CPU computes a convolution's kernel gradient as one more convolution, with the batch and
spatial axes as the reduction; at the sizes of the FPN and the head (256 channels at stride 4
and 8) it runs at a quarter to a sixth of the forward convolution's rate, and it is most of a
training step's backward (benchmarks/RESULTS.md, "Where the time goes"). Written out, the
kernel gradient of y = conv(x, w), NHWC / HWIO, stride s, explicit padding, is

    dL/dw[a, b, i, o] = sum_{n, h, w} x_pad[n, a + s h, b + s w, i] * dy[n, h, w, o],

one [O, N*Ho*Wo] x [N*Ho*Wo, I] matmul per kernel tap (a, b): `_kernel_grad` computes that.
The input gradient stays XLA's own transposed convolution (fast on every backend, and bit for
bit what `jax.grad` gives without this module); the forward is `lax.conv_general_dilated`
itself. Only the summation order of the kernel gradient changes (tests/test_conv.py: within
1e-5 of its largest value).

Maps smaller than the kernel are the exception: XLA:CPU runs those convolutions (and their
input gradients) on Eigen at a twentieth of the rate, so on CPU they are one matmul over
explicit patches (`_conv_im2col`), forward and backward by autodiff; values equal lax's up to
float32 rounding.

`conv_general_dilated` has lax's signature, so `flax.linen.Conv(conv_general_dilated=...)`
takes it; cases outside NHWC / HWIO, unit dilation, one group, padding >= 0 go to lax as they
are.
"""
import functools
from typing import Any, Callable, Sequence

import jax
from jax import lax
import jax.numpy as jnp

from ciae_jax import hparams
from ciae_jax import platforms

_NHWC = ("NHWC", "HWIO", "NHWC")


# Below this I * O, a k x k (k > 1) kernel gradient keeps XLA's: at 64-128 channels the taps'
# loop costs more than it saves (the main job, configs/synthetic.py, ran 0.83x with it).
# 1 x 1 kernels always take the matmul (no loop, no window copy when unstrided).
MIN_CHANNEL_PRODUCT = 2**15


def _matmul_pays(kernel_shape: Sequence[int]) -> bool:
  kh, kw, channels_in, channels_out = kernel_shape
  return kh * kw == 1 or channels_in * channels_out >= MIN_CHANNEL_PRODUCT


def resolve_kernel_grad(kernel_grad: str, kernel_shape: Sequence[int] | None = None) -> str:
  """"matmul" or "xla" for one convolution on CPU: "auto" is "matmul" where it pays
  (`_matmul_pays` of `kernel_shape`, when given); "matmul" and "xla" stay.

  Only the CPU branch asks: on other platforms "auto" is lax's convolution (cuDNN's kernel
  gradients are fast, and the taps' windows would cost memory traffic for nothing).
  """
  if kernel_grad not in hparams.KERNEL_GRADS:
    raise ValueError(f"model.conv_kernel_grad must be one of {hparams.KERNEL_GRADS}, "
                     f"got {kernel_grad!r}")
  if kernel_grad == "auto" and kernel_shape is not None and not _matmul_pays(kernel_shape):
    return "xla"
  return "xla" if kernel_grad == "xla" else "matmul"


def _lax_conv(x: jax.Array, w: jax.Array, strides: tuple[int, int],
              padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


def _kernel_grad_padded_x(x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int],
                          strides: tuple[int, int],
                          padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """dL/dw [kh, kw, I, O] from x [N, H, W, I] and dy [N, Ho, Wo, O]: one matmul per tap over
  the (strided) windows of the padded x."""
  kh, kw, channels_in, channels_out = kernel_shape
  out_h, out_w = dy.shape[1:3]
  (sh, sw) = strides
  x_pad = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))  # [N, Hp, Wp, I]
  dy_t = dy.reshape(-1, channels_out).T  # [O, N*Ho*Wo]
  span_h, span_w = sh * (out_h - 1) + 1, sw * (out_w - 1) + 1
  batch = x.shape[0]

  def tap(_, index):
    # One tap at a time (a loop, not unrolled): XLA would otherwise keep all kh*kw windows,
    # each the size of x, alive at once.
    a, b = index // kw, index % kw
    window = lax.dynamic_slice(x_pad, (0, a, b, 0), (batch, span_h, span_w, channels_in))
    window = window[:, ::sh, ::sw]  # [N, Ho, Wo, I]
    return None, dy_t @ window.reshape(-1, channels_in)  # [O, I]

  if kh * kw == 1:
    grad = tap(None, 0)[1][None]  # [1, O, I]
  else:
    _, grad = lax.scan(tap, None, jnp.arange(kh * kw))  # [kh*kw, O, I]
  return grad.transpose(0, 2, 1).reshape(kh, kw, channels_in, channels_out)  # [kh, kw, I, O]


def _kernel_grad_shifted_dy(x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int],
                            padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """The same for stride 1, with the windows taken from a padded dy instead of a padded x:

      dL/dw[a, b] = sum_{n, i, j} x[n, i, j] dy_pad[n, i + kh - 1 - a, j + kw - 1 - b],

  dy_pad = dy padded by (k - 1 - pad) on each side (needs pad <= k - 1). dy is a backward
  value, so the padded copy exists only while this layer's backward runs; XLA fuses a padded
  copy of x (a forward value) into the forward pass and keeps it alive until then (0.64 GiB of
  such copies were live at the peak of the R50 step at 2 x 800 x 1344; most were replaced by
  the unpadded inputs, which the backward needs too: the plan fell by 0.04 GiB)."""
  kh, kw, channels_in, channels_out = kernel_shape
  (top, bottom), (left, right) = padding
  batch, height, width = x.shape[:3]
  dy_pad = jnp.pad(dy, ((0, 0), (kh - 1 - top, kh - 1 - bottom),
                        (kw - 1 - left, kw - 1 - right), (0, 0)))  # [N, H + kh - 1, W + kw - 1, O]
  x_flat = x.reshape(-1, channels_in)  # [N*H*W, I]
  if kh * kw == 1:  # No padding, no window: transpose the smaller operand (timed, RESULTS).
    if channels_out <= channels_in:
      grad = (dy.reshape(-1, channels_out).T @ x_flat)[None]  # [1, O, I]
      return grad.transpose(0, 2, 1).reshape(kernel_shape)  # [1, 1, I, O]
    return (x_flat.T @ dy.reshape(-1, channels_out)).reshape(kernel_shape)  # [1, 1, I, O]

  def tap(_, index):
    a, b = index // kw, index % kw
    window = lax.dynamic_slice(dy_pad, (0, kh - 1 - a, kw - 1 - b, 0),
                               (batch, height, width, channels_out))  # [N, H, W, O]
    # The window (a backward value) is transposed, not x: XLA would transpose x in the forward
    # pass and keep the copy alive until here.
    return None, window.reshape(-1, channels_out).T @ x_flat  # [O, I]

  _, grad = lax.scan(tap, None, jnp.arange(kh * kw))  # [kh*kw, O, I]
  grad = grad.transpose(0, 2, 1)  # [kh*kw, I, O]
  return grad.reshape(kh, kw, channels_in, channels_out)  # [kh, kw, I, O]


def _kernel_grad(x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int],
                 strides: tuple[int, int],
                 padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """dL/dw [kh, kw, I, O] from x [N, H, W, I] and dy [N, Ho, Wo, O]: one matmul per tap."""
  kh, kw = kernel_shape[:2]
  (top, bottom), (left, right) = padding
  if strides == (1, 1) and max(top, bottom) <= kh - 1 and max(left, right) <= kw - 1:
    return _kernel_grad_shifted_dy(x, dy, kernel_shape, padding)
  return _kernel_grad_padded_x(x, dy, kernel_shape, strides, padding)


def _conv_im2col(x: jax.Array, w: jax.Array, strides: tuple[int, int],
                 padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """The convolution as one matmul of the explicit patches [N*Ho*Wo, kh*kw*I] with the kernel
  [kh*kw*I, O], differentiated by JAX: for maps smaller than the kernel (FCOS's P7 of a
  256-pixel side is 2 x 3), where XLA:CPU falls back to Eigen convolutions 20x slower."""
  kh, kw, channels_in, channels_out = w.shape
  (sh, sw) = strides
  x_pad = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))  # [N, Hp, Wp, I]
  out_h = (x_pad.shape[1] - kh) // sh + 1
  out_w = (x_pad.shape[2] - kw) // sw + 1
  patches = jnp.concatenate(
      [x_pad[:, a:a + sh * (out_h - 1) + 1:sh, b:b + sw * (out_w - 1) + 1:sw]
       for a in range(kh) for b in range(kw)], axis=-1)  # [N, Ho, Wo, kh*kw*I]
  y = patches.reshape(-1, kh * kw * channels_in) @ w.reshape(-1, channels_out)  # [N*Ho*Wo, O]
  return y.reshape(x.shape[0], out_h, out_w, channels_out)  # [N, Ho, Wo, O]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_matmul_grad(x: jax.Array, w: jax.Array, strides: tuple[int, int],
                      padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  return _lax_conv(x, w, strides, padding)  # [N, Ho, Wo, O]


def _conv_fwd(x, w, strides, padding):
  return _lax_conv(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, residuals, dy):
  x, w = residuals
  _, input_vjp = jax.vjp(lambda x_: _lax_conv(x_, w, strides, padding), x)
  (dx,) = input_vjp(dy)  # XLA's transposed convolution; its unused forward is dead code.
  dw = _kernel_grad(x, dy, w.shape, strides, padding).astype(w.dtype)
  return dx, dw


_conv_matmul_grad.defvjp(_conv_fwd, _conv_bwd)


def _explicit_padding(padding: Any, x_shape: Sequence[int], w_shape: Sequence[int],
                      strides: tuple[int, int]):
  """lax's padding argument as ((top, bottom), (left, right)), or None if it is not 2-D."""
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(x_shape[1:3], w_shape[:2], strides, padding))
  padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  return padding if len(padding) == 2 else None


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None, *,
                         kernel_grad: str = "auto") -> jax.Array:
  """`lax.conv_general_dilated` whose kernel gradient may be `_kernel_grad` (`kernel_grad`).

  The same forward values as lax; kernel_grad "matmul" takes the matmul kernel gradient for
  every NHWC / HWIO form it covers, "auto" resolves by platform and kernel shape
  (`resolve_kernel_grad`), "xla" is lax unchanged. On CPU ("auto" or "matmul"), an input map
  smaller than the kernel is convolved as one matmul over its patches (`_conv_im2col`; values
  equal to lax's up to float32 rounding).
  """
  plain = functools.partial(
      lax.conv_general_dilated, window_strides=window_strides, padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)
  if kernel_grad not in hparams.KERNEL_GRADS:
    raise ValueError(f"model.conv_kernel_grad must be one of {hparams.KERNEL_GRADS}, "
                     f"got {kernel_grad!r}")
  if kernel_grad == "xla":
    return plain(lhs, rhs)
  fast = functools.partial(_fast_conv, plain, window_strides, padding, lhs_dilation,
                           rhs_dilation, dimension_numbers, feature_group_count,
                           batch_group_count, precision, preferred_element_type, kernel_grad)
  if kernel_grad == "matmul":
    return fast(lhs, rhs)
  return platforms.switch("conv_kernel_grad", lhs, rhs, fast=fast, plain=plain)


def _fast_conv(plain, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
               feature_group_count, batch_group_count, precision, preferred_element_type,
               kernel_grad, lhs, rhs):
  """The CPU convolution: lax's forward with `_kernel_grad`, or `_conv_im2col` for maps smaller
  than the kernel; `plain` where neither applies or pays."""
  if lhs.ndim != 4:
    return plain(lhs, rhs)
  # Maps smaller than the kernel take the patches' matmul whatever the kernel's size.
  tiny = lhs.shape[1] < rhs.shape[0] or lhs.shape[2] < rhs.shape[1]
  if not tiny and resolve_kernel_grad(kernel_grad, kernel_shape=rhs.shape) == "xla":
    return plain(lhs, rhs)
  wanted = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  given = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  unit = lambda d: d is None or all(int(v) == 1 for v in d)
  strides = tuple(int(s) for s in window_strides)
  pads = _explicit_padding(padding, lhs.shape, rhs.shape, strides)
  if (given != wanted or not unit(lhs_dilation) or not unit(rhs_dilation)
      or feature_group_count != 1 or batch_group_count != 1 or precision is not None
      or preferred_element_type is not None or pads is None
      or min(p for pair in pads for p in pair) < 0):
    return plain(lhs, rhs)
  if tiny:
    return _conv_im2col(lhs, rhs, strides, pads)
  return _conv_matmul_grad(lhs, rhs, strides, pads)


def for_flax(kernel_grad: str) -> Callable[..., jax.Array]:
  """The `conv_general_dilated` argument of `flax.linen.Conv` for `kernel_grad`."""
  return functools.partial(conv_general_dilated, kernel_grad=kernel_grad)
