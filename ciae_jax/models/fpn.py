"""Feature pyramid P2..P7 (FCOS flavour: P6, P7 from P5)."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ciae_jax.fast_paths import conv as conv_lib
from ciae_jax.models import layers


class FPN(nn.Module):
  """FPN over C2..C5 plus P6, P7 by stride-2 3x3 convs on P5 (FCOS `use_P5`).

  Lateral 1x1 convs, top-down nearest upsampling *to the lateral's shape* (so maps
  with odd sizes, e.g. 25 x 42 at 800 x 1344, work), 3x3 output convs. P7 takes
  ReLU(P6). Stride-2 convs pad 1 on each side as in PyTorch, giving ceil(H / 2).
  Convs carry a bias and use FCOS's kaiming_uniform(a=1) init.

  Attributes:
    fpn_dim: channels of every P level (256 in the paper).
    dtype: compute dtype.
    kernel_grad: the convolutions' kernel gradients (`ciae_jax.fast_paths.conv`).
  """
  fpn_dim: int = 256
  dtype: Any = jnp.float32
  kernel_grad: str = "auto"

  def _conv(self, kernel_size: int, strides: int, name: str) -> nn.Conv:
    return nn.Conv(self.fpn_dim, (kernel_size, kernel_size), strides=(strides, strides),
                   padding=layers.torch_padding(kernel_size), dtype=self.dtype,
                   kernel_init=layers.kaiming_uniform_a1, bias_init=nn.initializers.zeros,
                   conv_general_dilated=conv_lib.for_flax(self.kernel_grad), name=name)

  @nn.compact
  def __call__(self, features: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """features: {"c2".."c5"} -> {"p2": [B, H/4, W/4, F], ..., "p7": [B, ceil(H/128), ..., F]}."""
    missing = [k for k in ("c2", "c3", "c4", "c5") if k not in features]
    if missing:
      raise ValueError(f"FPN input lacks backbone features {missing}")
    outputs = {}
    inner = None
    for level in (5, 4, 3, 2):
      lateral = self._conv(1, 1, f"lateral_p{level}")(features[f"c{level}"])  # [B, Hl, Wl, F]
      if inner is not None:
        lateral = lateral + layers.resize_nearest(inner, lateral.shape[1:3])  # [B, Hl, Wl, F]
      inner = lateral
      outputs[f"p{level}"] = self._conv(3, 1, f"output_p{level}")(inner)  # [B, Hl, Wl, F]
    p6 = self._conv(3, 2, "p6")(outputs["p5"])  # [B, ceil(H/64), ceil(W/64), F]
    p7 = self._conv(3, 2, "p7")(nn.relu(p6))  # [B, ceil(H/128), ceil(W/128), F]
    outputs["p6"], outputs["p7"] = p6, p7
    return {f"p{level}": outputs[f"p{level}"] for level in range(2, 8)}
