"""Small building blocks shared by the CIAE network modules.

Everything here is pure: no TensorFlow, no side effects at import.
"""
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ciae_jax import ops
from ciae_jax.fast_paths import conv as conv_lib
from ciae_jax.models import resize as resize_lib

Dtype = Any
Initializer = Callable[..., jax.Array]

# Collection that holds variables the optimizer must never touch: frozen-BN
# statistics and affine, and the convolutions of frozen backbone stages.
FROZEN = "frozen"

# torchvision's ResNet init: kaiming_normal_(mode="fan_out", nonlinearity="relu") (untruncated).
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# FCOS FPN init (c2_xavier_fill = kaiming_uniform_(a=1)): variance 1 / fan_in.
kaiming_uniform_a1 = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
# FCOS head init: normal(std=0.01).
normal_001 = nn.initializers.normal(stddev=0.01)


def canonical_dtype(dtype: str | Dtype) -> jnp.dtype:
  """Turns 'float32', 'bfloat16', jnp.float32 ... into a jnp.dtype, or raises ValueError."""
  try:
    result = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"model dtype {dtype!r} is not a dtype name") from e
  if result not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"model dtype must be float32, bfloat16 or float16, got {dtype!r}")
  return result


def num_groups(channels: int, max_groups: int = 32) -> int:
  """GroupNorm group count: 32, or the largest divisor of 32 that divides `channels`."""
  return math.gcd(channels, max_groups)


def torch_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """Symmetric padding k // 2, as PyTorch convs use; same output shape as 'SAME' for odd k."""
  pad = kernel_size // 2
  return ((pad, pad), (pad, pad))


class Conv2d(nn.Module):
  """A bias-free NHWC convolution whose kernel can live outside the 'params' collection.

  The kernel is stored HWIO in `collection` ('params' when trainable, FROZEN for a
  frozen backbone stage, so that neither gradients nor weight decay reach it).
  Padding is PyTorch's symmetric k // 2, so converted torchvision weights give the
  same numbers as in PyTorch. `kernel_grad`: how the kernel's gradient is computed
  (`ciae_jax.fast_paths.conv`).
  """
  features: int
  kernel_size: int
  strides: int = 1
  collection: str = "params"
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = kaiming_fan_out
  kernel_grad: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
    if self.collection == "params":
      kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
    else:
      kernel = self.variable(
          self.collection, "kernel",
          lambda: self.kernel_init(self.make_rng("params"), shape, jnp.float32)).value
    return conv_lib.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype),  # [B, H, W, Cin], [k, k, Cin, Cout]
        window_strides=(self.strides, self.strides),
        padding=torch_padding(self.kernel_size),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        kernel_grad=self.kernel_grad)  # [B, H/s, W/s, Cout]


class FrozenBatchNorm(nn.Module):
  """BatchNorm with fixed statistics and affine (Detectron2's FrozenBatchNorm2d).

  y = (x - mean) / sqrt(var + eps) * scale + bias, all four vectors in the FROZEN
  collection. The affine is folded in float32, then applied in the compute dtype.
  """
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    scale = self.variable(FROZEN, "scale", jnp.ones, (channels,), jnp.float32).value  # [C]
    bias = self.variable(FROZEN, "bias", jnp.zeros, (channels,), jnp.float32).value  # [C]
    mean = self.variable(FROZEN, "mean", jnp.zeros, (channels,), jnp.float32).value  # [C]
    var = self.variable(FROZEN, "var", jnp.ones, (channels,), jnp.float32).value  # [C]
    multiplier = scale * jax.lax.rsqrt(var + self.epsilon)  # [C]
    offset = bias - mean * multiplier  # [C]
    return x.astype(self.dtype) * multiplier.astype(self.dtype) + offset.astype(self.dtype)


class GroupNorm(nn.Module):
  """`flax.linen.GroupNorm` (the same parameters and values) with a written-out gradient
  (`ops.group_norm`) that keeps the input only."""
  num_groups: int
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)  # [C]
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)  # [C]
    return ops.group_norm(x, scale, bias, self.num_groups, self.epsilon, self.dtype)


def group_norm(channels: int, dtype: Dtype, name: str | None = None) -> GroupNorm:
  """GroupNorm with 32 groups (fewer when channels are few), eps 1e-5 as in PyTorch."""
  return GroupNorm(num_groups=num_groups(channels), epsilon=1e-5, dtype=dtype, name=name)


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear resize of [B, h, w, C] to [B, size[0], size[1], C].

  Half-pixel centres, no antialiasing: PyTorch's interpolate(align_corners=False). Two taps per
  output (`ciae_jax.models.resize`), not `jax.image.resize`'s dense interpolation matrices.
  """
  if (x.shape[1], x.shape[2]) == (int(size[0]), int(size[1])):
    return x
  return resize_lib.resize_bilinear(x, (int(size[0]), int(size[1])))  # [B, H, W, C]


def resize_nearest(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Nearest resize of [B, h, w, C] to [B, size[0], size[1], C] (exact 2x: each pixel twice)."""
  batch, height, width, channels = x.shape
  shape = (batch, int(size[0]), int(size[1]), channels)
  if shape == x.shape:
    return x
  factor_h, factor_w = shape[1] // height, shape[2] // width
  if (factor_h * height, factor_w * width) == shape[1:3]:
    # Whole factors: a broadcast, whose gradient is a sum over each block. jax.image.resize
    # gathers, and its gradient scatters into a zero buffer that XLA allocates early.
    blocks = jnp.broadcast_to(x[:, :, None, :, None, :],
                              (batch, height, factor_h, width, factor_w, channels))
    return blocks.reshape(shape)  # [B, H, W, C]
  return jax.image.resize(x, shape, method="nearest", antialias=False)  # [B, H, W, C]


def coord_channels(batch: int, height: int, width: int, dtype: Dtype) -> jax.Array:
  """CoordConv channels (x, y), each spanning [-1, 1] across the map: [B, H, W, 2]."""
  xs = np.linspace(-1.0, 1.0, width, dtype=np.float32)  # [W]
  ys = np.linspace(-1.0, 1.0, height, dtype=np.float32)  # [H]
  grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")  # [H, W] each
  coords = np.stack([grid_x, grid_y], axis=-1)  # [H, W, 2]
  return jnp.broadcast_to(jnp.asarray(coords, dtype), (batch, height, width, 2))


def l2_normalize(x: jax.Array, axis: int = -1, epsilon: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along `axis`, with a finite gradient at x = 0 (`ops.l2_normalize`)."""
  return ops.l2_normalize(x, axis=axis, eps=epsilon)
