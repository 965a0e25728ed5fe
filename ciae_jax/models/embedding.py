"""CIAE embedding branch (paper IV-A.2, Fig. 3): P = L2norm(up4x(P' + P''))."""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ciae_jax.fast_paths import conv as conv_lib
from ciae_jax.models import layers

SEMANTIC_LEVELS = (2, 3, 4, 5)  # P2..P5, strides 4..32
# Stride of the aggregate, P' + P'' and the semantic logits: that of P2.
AGGREGATE_STRIDE = 4


class EmbeddingBranch(nn.Module):
  """Panoptic-FPN semantic aggregation of P2..P5 plus the fused box embeddings.

  Per level k: max(1, k - 2) times [conv3x3(semantic_dim) + GN + ReLU, then 2x
  bilinear up to the next finer level's shape unless already at 1/4]. On the P5
  path every conv is a CoordConv (x, y channels in [-1, 1] concatenated to its
  input). The four 1/4-scale maps are summed and a 1x1 conv gives P'. The box
  embeddings of P3..P7 are resized (bilinear) to 1/4 scale, summed, and a 1x1 conv
  gives P''. P' + P'' (float32) is resized bilinearly to the input size [H, W] and
  L2-normalised in float32. P' + P'' at 1/4 scale is sown as
  intermediates/embedding_quarter.

  With `num_semantic_classes > 0` (paper Table III, first row: stuff from a semantic branch) a
  1x1 conv on the same 1/4-scale aggregate, in parallel with the one giving P', predicts
  semantic logits [B, H/4, W/4, num_semantic_classes] (float32), returned third: Panoptic
  FPN's semantic head shares this aggregation, so the branch differs from the embedding's
  only in its classifier.

  Attributes:
    semantic_dim: width of the semantic aggregation convs (128).
    embed_dim: D, the embedding size (32; Table X).
    use_box_embedding: fuse P'' (Table VI); when off P = f(P').
    use_coordconv: CoordConv on the P5 path.
    dtype: compute dtype of the convs.
    kernel_grad: the convolutions' kernel gradients (`ciae_jax.fast_paths.conv`).
    num_semantic_classes: channels of the semantic logits (N_st + 1); 0: no semantic output.
  """
  semantic_dim: int = 128
  embed_dim: int = 32
  use_box_embedding: bool = True
  use_coordconv: bool = True
  dtype: Any = jnp.float32
  kernel_grad: str = "auto"
  num_semantic_classes: int = 0

  def _semantic_path(self, features: dict[str, jax.Array], level: int) -> jax.Array:
    x = features[f"p{level}"]  # [B, Hl, Wl, F]
    current = level
    for stage in range(max(1, level - 2)):
      if self.use_coordconv and level == 5:
        coords = layers.coord_channels(x.shape[0], x.shape[1], x.shape[2], x.dtype)  # [B, h, w, 2]
        x = jnp.concatenate([x, coords], axis=-1)  # [B, h, w, C + 2]
      x = nn.Conv(self.semantic_dim, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype,
                  kernel_init=layers.kaiming_fan_out,
                  conv_general_dilated=conv_lib.for_flax(self.kernel_grad),
                  name=f"p{level}_conv{stage}")(x)
      x = layers.group_norm(self.semantic_dim, self.dtype, name=f"p{level}_gn{stage}")(x)
      x = nn.relu(x)  # [B, h, w, semantic_dim]
      if current > 2:
        current -= 1
        x = layers.resize_bilinear(x, features[f"p{current}"].shape[1:3])  # [B, 2h, 2w, S]
    return x  # [B, H/4, W/4, semantic_dim]

  def _predictor(self, name: str, features: int | None = None,
                 kernel_init: Any = layers.kaiming_fan_out) -> nn.Conv:
    return nn.Conv(features or self.embed_dim, (1, 1), dtype=self.dtype,
                   kernel_init=kernel_init, bias_init=nn.initializers.zeros,
                   conv_general_dilated=conv_lib.for_flax(self.kernel_grad), name=name)

  @nn.compact
  def __call__(self, features: dict[str, jax.Array], box_embeds: Sequence[jax.Array] | None,
               image_size: Sequence[int]) -> tuple[jax.Array, ...]:
    """features {"p2".."p5"}, box embeddings of P3..P7 -> (prenorm, embedding), [B, H, W, D],
    then the semantic logits [B, H/4, W/4, num_semantic_classes] if `num_semantic_classes`."""
    quarter_size = features["p2"].shape[1:3]
    semantic = sum(self._semantic_path(features, level) for level in SEMANTIC_LEVELS)
    p_prime = self._predictor("embed_pred")(semantic).astype(jnp.float32)  # [B, H/4, W/4, D]
    fused = p_prime
    if self.use_box_embedding:
      if not box_embeds:
        raise ValueError("use_box_embedding=True but the proposal head gave no box embeddings")
      upsampled = [layers.resize_bilinear(e.astype(jnp.float32), quarter_size) for e in box_embeds]
      box_sum = sum(upsampled)  # [B, H/4, W/4, E]
      p_second = self._predictor("box_embed_pred")(box_sum).astype(jnp.float32)  # [B, H/4, W/4, D]
      fused = p_prime + p_second  # [B, H/4, W/4, D]
    self.sow("intermediates", "embedding_quarter", fused)
    prenorm = layers.resize_bilinear(fused, image_size)  # [B, H, W, D]
    if not self.num_semantic_classes:
      return prenorm, layers.l2_normalize(prenorm)  # [B, H, W, D] x 2
    # normal(0.01) as the FCOS classifier: the logits start near 0, the cross-entropy near
    # log(N_st + 1) (the embedding's init gave logits of std ~8 and a first loss of ~14).
    semantic_logits = self._predictor("semantic_pred", self.num_semantic_classes,
                                      layers.normal_001)(
        semantic).astype(jnp.float32)  # [B, H/4, W/4, N_st + 1]
    return prenorm, layers.l2_normalize(prenorm), semantic_logits
