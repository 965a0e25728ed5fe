"""ResNet backbones (torchvision structure, ResNet v1.5) returning C2..C5.

Module and variable names mirror torchvision's state-dict keys ("layer2_0/conv2"
for "layer2.0.conv2", "downsample_0"/"downsample_1" for "downsample.0"/".1",
"bn*" for the norm layer whatever its kind), so that `convert.py` maps ImageNet
weights one to one. Strides: C2 4, C3 8, C4 16, C5 32 (ceil for odd sizes).

Norms:
- "frozen_bn": FrozenBatchNorm, statistics and affine in the FROZEN collection
  (never trained). The stem and the first `freeze_at - 1` stages are frozen as in
  FCOS / Detectron2 (`freeze_at=2`: stem and layer1): their kernels also live in
  FROZEN and their outputs pass through stop_gradient.
- "gn": GroupNorm (32 groups or fewer), trainable; for from-scratch runs, where
  freezing random layers makes no sense, so `freeze_at` must be 0.
"""
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ciae_jax.models import layers

NORMS = ("frozen_bn", "gn")


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
  """Depth and widths of one ResNet variant."""
  block: str  # "basic" or "bottleneck"
  stage_sizes: tuple[int, int, int, int]  # blocks in layer1..layer4
  widths: tuple[int, int, int, int]  # inner width ("planes") of layer1..layer4
  stem_width: int

  @property
  def expansion(self) -> int:
    return 4 if self.block == "bottleneck" else 1

  @property
  def out_channels(self) -> tuple[int, int, int, int]:
    """Channels of C2..C5."""
    return tuple(w * self.expansion for w in self.widths)


RESNET_SPECS = {
    "resnet18": ResNetSpec("basic", (2, 2, 2, 2), (64, 128, 256, 512), 64),
    "resnet34": ResNetSpec("basic", (3, 4, 6, 3), (64, 128, 256, 512), 64),
    "resnet50": ResNetSpec("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), 64),
    "resnet101": ResNetSpec("bottleneck", (3, 4, 23, 3), (64, 128, 256, 512), 64),
    # For tests and CPU training: one basic block per stage, narrow.
    "resnet_tiny": ResNetSpec("basic", (1, 1, 1, 1), (16, 32, 64, 128), 16),
}


def resnet_spec(name: str) -> ResNetSpec:
  """The ResNetSpec of a backbone name, or a ValueError listing the known names."""
  if name not in RESNET_SPECS:
    raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(RESNET_SPECS)}")
  return RESNET_SPECS[name]


def _norm_layer(norm: str, channels: int, dtype: Any, name: str) -> nn.Module:
  if norm == "frozen_bn":
    return layers.FrozenBatchNorm(dtype=dtype, name=name)
  return layers.group_norm(channels, dtype, name=name)


class BasicBlock(nn.Module):
  """torchvision BasicBlock: 3x3 (stride) - 3x3, identity or 1x1 projection."""
  planes: int
  strides: int
  norm: str
  collection: str = "params"
  dtype: Any = jnp.float32
  kernel_grad: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(layers.Conv2d, collection=self.collection, dtype=self.dtype,
                             kernel_grad=self.kernel_grad)
    out = conv(self.planes, 3, self.strides, name="conv1")(x)  # [B, H/s, W/s, planes]
    out = nn.relu(_norm_layer(self.norm, self.planes, self.dtype, "bn1")(out))
    out = conv(self.planes, 3, 1, name="conv2")(out)  # [B, H/s, W/s, planes]
    out = _norm_layer(self.norm, self.planes, self.dtype, "bn2")(out)
    identity = x
    if self.strides != 1 or x.shape[-1] != self.planes:
      identity = conv(self.planes, 1, self.strides, name="downsample_0")(x)  # [B, H/s, W/s, planes]
      identity = _norm_layer(self.norm, self.planes, self.dtype, "downsample_1")(identity)
    return nn.relu(out + identity.astype(out.dtype))


class Bottleneck(nn.Module):
  """torchvision Bottleneck (v1.5: the stride sits on the 3x3 conv), expansion 4."""
  planes: int
  strides: int
  norm: str
  collection: str = "params"
  dtype: Any = jnp.float32
  kernel_grad: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(layers.Conv2d, collection=self.collection, dtype=self.dtype,
                             kernel_grad=self.kernel_grad)
    out_channels = self.planes * 4
    out = conv(self.planes, 1, 1, name="conv1")(x)  # [B, H, W, planes]
    out = nn.relu(_norm_layer(self.norm, self.planes, self.dtype, "bn1")(out))
    out = conv(self.planes, 3, self.strides, name="conv2")(out)  # [B, H/s, W/s, planes]
    out = nn.relu(_norm_layer(self.norm, self.planes, self.dtype, "bn2")(out))
    out = conv(out_channels, 1, 1, name="conv3")(out)  # [B, H/s, W/s, 4 planes]
    out = _norm_layer(self.norm, out_channels, self.dtype, "bn3")(out)
    identity = x
    if self.strides != 1 or x.shape[-1] != out_channels:
      # [B, H/s, W/s, 4 planes]
      identity = conv(out_channels, 1, self.strides, name="downsample_0")(x)
      identity = _norm_layer(self.norm, out_channels, self.dtype, "downsample_1")(identity)
    return nn.relu(out + identity.astype(out.dtype))


class ResNet(nn.Module):
  """ResNet backbone: images [B, H, W, 3] -> {"c2": [B, H/4, W/4, C2], ..., "c5": [B, H/32, ...]}.

  Attributes:
    arch: a key of RESNET_SPECS ("resnet18", "resnet34", "resnet50", "resnet101", "resnet_tiny").
    norm: "frozen_bn" or "gn".
    freeze_at: 0 trains everything; k >= 1 freezes the stem and layer1..layer(k-1) (FCOS: 2).
    dtype: compute dtype; parameters stay float32.
    kernel_grad: the convolutions' kernel gradients (`ciae_jax.fast_paths.conv`).
  """
  arch: str = "resnet50"
  norm: str = "frozen_bn"
  freeze_at: int = 2
  dtype: Any = jnp.float32
  kernel_grad: str = "auto"

  def _check(self) -> None:
    resnet_spec(self.arch)
    if self.norm not in NORMS:
      raise ValueError(f"unknown backbone norm {self.norm!r}; expected one of {NORMS}")
    if not 0 <= self.freeze_at <= 5:
      raise ValueError(f"freeze_at must be in 0..5, got {self.freeze_at}")
    if self.norm == "gn" and self.freeze_at > 0:
      raise ValueError("freeze_at > 0 needs norm='frozen_bn' (a GN backbone trains from scratch)")

  def _collection(self, stage: int) -> str:
    """Stage 0 is the stem, stage k the torchvision layer k."""
    return layers.FROZEN if stage < self.freeze_at else "params"

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    self._check()
    spec = resnet_spec(self.arch)
    block_cls = Bottleneck if spec.block == "bottleneck" else BasicBlock
    x = layers.Conv2d(spec.stem_width, 7, 2, collection=self._collection(0), dtype=self.dtype,
                      kernel_grad=self.kernel_grad, name="conv1")(images)  # [B, H/2, W/2, stem]
    x = nn.relu(_norm_layer(self.norm, spec.stem_width, self.dtype, "bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # [B, H/4, W/4, stem]
    if self.freeze_at >= 1:
      x = jax.lax.stop_gradient(x)
    features = {}
    for stage, (num_blocks, width) in enumerate(zip(spec.stage_sizes, spec.widths), start=1):
      for index in range(num_blocks):
        strides = 2 if stage > 1 and index == 0 else 1
        x = block_cls(width, strides, self.norm, collection=self._collection(stage),
                      dtype=self.dtype, kernel_grad=self.kernel_grad,
                      name=f"layer{stage}_{index}")(x)  # [B, Hs, Ws, Cs]
      if stage < self.freeze_at:
        x = jax.lax.stop_gradient(x)
      features[f"c{stage + 1}"] = x
    return features
