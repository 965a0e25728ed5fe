"""Gradient accumulation: one update from K micro-batches of a device's batch.

With `config.grad_accum_steps = K > 1` the train step (`training.step`) splits its per-device
batch `[b, ...]` into K micro-batches `[K, b / K, ...]` (micro-batch k holds images
`k * b / K .. (k + 1) * b / K - 1`, the batch itself and the data order are those of K = 1) and
runs the forward and backward pass on one micro-batch at a time (`lax.scan`), summing their
gradients, loss shares and memory class sums; the pmean, the optimizer update and the memory
update then run once. Only one micro-batch's activations are alive at a time: the memory of
the step is about that of a batch of b / K, for a global batch (and learning rate) of b.

The losses are sums over locations / pixels divided by counts of the whole global batch (FCOS
positives and centerness targets, CIAE valid pixels, labelled semantic cells). All of them
depend on the ground truth only, so `loss_counts` gives them before any forward pass, and each
micro-batch's loss is its exact share of the full-batch loss: with frozen BatchNorm or GroupNorm
(nothing in CIAE mixes images) the summed gradient is the full batch's, up to float32 summation
order.

`config.batch_size` stays the global batch of one update (what the learning-rate rule reads);
the step counter, the schedules and the memory momentum advance once per update.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ciae_jax import hparams
from ciae_jax import parallel
from ciae_jax.losses import ciae as ciae_losses
from ciae_jax.losses import semantic as semantic_losses
from ciae_jax.segments import Segments


def check_divisible(per_device_batch: int, grad_accum_steps: int) -> None:
  """HParamsError unless the images on one device split into `grad_accum_steps` micro-batches."""
  if grad_accum_steps < 1 or per_device_batch % grad_accum_steps:
    raise hparams.HParamsError(
        f"config.grad_accum_steps: {grad_accum_steps} must divide the {per_device_batch} images "
        "per device (config.batch_size / devices) into equal micro-batches")


def split(tree: Any, num_micro: int) -> Any:
  """Leaves `[b, ...]` -> `[num_micro, b / num_micro, ...]` (consecutive images together)."""
  return jax.tree.map(lambda x: x.reshape((num_micro, x.shape[0] // num_micro) + x.shape[1:]),
                      tree)


def loss_counts(segments: Segments, hp: hparams.HParams, *, num_stuff: int,
                semantic_stride: int) -> dict[str, jax.Array]:
  """This device's CIAE `num_pixels` (and `semantic_pixels` with the semantic branch), each a
  float32 scalar summed over the batch `[b, ...]`; the caller `psum`s them."""
  semantic_branch = hp.model.stuff_from == "semantic"
  counts = {"num_pixels": jax.vmap(lambda s: ciae_losses.num_loss_pixels(
      s, hp.loss, stuff_pixels=not semantic_branch))(segments)}  # [b]
  if semantic_branch:
    counts["semantic_pixels"] = jax.vmap(lambda s: semantic_losses.num_labelled_cells(
        s, num_stuff=num_stuff, stride=semantic_stride))(segments)  # [b]
  return {name: jnp.sum(count) for name, count in counts.items()}  # each []


def accumulate(fn: Callable[[Any, Any], Any], params: Any, micro_batches: Any) -> Any:
  """The sum over micro-batches of `fn(params, micro_batch)` (any tree of arrays).

  `micro_batches` has the micro-batch axis in front of every leaf (`split`). A `lax.scan`:
  the program holds one micro-batch's forward and backward pass, run K times.
  """
  first = jax.tree.map(lambda x: x[0], micro_batches)
  shapes = jax.eval_shape(fn, params, first)
  # Per-device zeros (under shard_map the carry must vary over devices as fn's outputs do).
  zeros = parallel.to_varying(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))

  def add(total, micro_batch):
    return jax.tree.map(jnp.add, total, fn(params, micro_batch)), None
  total, _ = jax.lax.scan(add, zeros, micro_batches)
  return total
