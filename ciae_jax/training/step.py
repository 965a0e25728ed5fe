"""The per-device train step (written once; `parallel.parallelize` runs it under pmap or shard_map).

One step at iteration t (state.step = t - 1 updates done):
  1. FCOS targets of every image (vmapped), positives counted and `psum`-ed over devices;
  2. forward pass, FCOS losses normalised by the GLOBAL positive count / centerness sum, CIAE loss
     sums with the GLOBAL valid-pixel count, against the memory M_{t-1} of the state;
  3. gradients `pmean`-ed over devices, one optimizer update;
  4. per-class sums / pixel counts of the pre-norm embeddings, summed over the local batch and
     `psum`-ed, then the momentum update `M_t` (identical on every device);
  5. if the loss, the gradients or the new memory hold a NaN or infinity, the update is dropped:
     params, optimizer state and memory stay as they were (metric `finite` False); `step` and
     `rng` advance as after any step.

Normalisation: each device's losses are its share of the global-batch loss (sum over local
locations / global count). The objective differentiated on a device is that share times the
number of devices, so that the `pmean` of the gradients is the gradient of the global loss;
reported losses are the `psum` of the shares, i.e. the global-batch losses. With one device
this is the plain loss.
"""
import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ciae_jax import memory as memory_lib
from ciae_jax import targets as targets_lib
from ciae_jax.losses import ciae as ciae_losses
from ciae_jax.losses import fcos as fcos_lib
from ciae_jax.models import ciae as ciae_model
from ciae_jax.training import parallel
from ciae_jax.training.train_state import TrainState

AXIS_NAME = parallel.AXIS_NAME
# Keys of one example (docs/interfaces.md) that the step reads.
BATCH_KEYS = ("image", "segment_map", "seg_class", "seg_is_thing", "seg_is_crowd", "seg_box",
              "seg_valid")
SEGMENT_KEYS = ("segment_map", "seg_class", "seg_is_thing", "seg_is_crowd", "seg_box",
                "seg_valid")


def check_batch(batch: Mapping[str, Any], *, leading_axes: int = 1) -> None:
  """Raises ValueError naming the field if `batch` lacks a key or has inconsistent shapes.

  `leading_axes` batch axes precede each example's shape (2 on the host: devices, batch).
  """
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"batch is missing field(s) {missing}; has {sorted(batch)}")
  lead = batch["image"].shape[:leading_axes]
  height, width = batch["image"].shape[leading_axes:leading_axes + 2]
  num_segments = batch["seg_class"].shape[-1]
  expected = {"image": lead + (height, width, 3), "segment_map": lead + (height, width),
              "seg_class": lead + (num_segments,), "seg_is_thing": lead + (num_segments,),
              "seg_is_crowd": lead + (num_segments,), "seg_box": lead + (num_segments, 4),
              "seg_valid": lead + (num_segments,)}
  for key, shape in expected.items():
    if tuple(batch[key].shape) != shape:
      raise ValueError(f"batch field {key!r} has shape {tuple(batch[key].shape)}, expected "
                       f"{shape} (docs/interfaces.md)")


def keep_if_finite(finite: jax.Array, new: Any, old: Any) -> Any:
  """`new` where `finite`, else `old` (leaf by leaf; same structures)."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def _fcos_targets(batch: Mapping[str, jax.Array], *, num_stuff: int, strides: Sequence[int],
                  sizes: Sequence[float], positive_region: str) -> dict[str, jax.Array]:
  """FCOS targets of the local batch, `[b, N, ...]`."""
  per_image = functools.partial(targets_lib.fcos_targets, num_stuff=num_stuff,
                                strides=tuple(strides), sizes=tuple(sizes),
                                positive_region=positive_region)
  return jax.vmap(per_image)(*(batch[k] for k in SEGMENT_KEYS))


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *,
               model: nn.Module,
               optimizer: optax.GradientTransformation,
               learning_rate_fn: Callable[[jax.Array], jax.Array],
               num_stuff: int,
               total_steps: int,
               strides: Sequence[int] = targets_lib.DEFAULT_STRIDES,
               sizes: Sequence[float] = targets_lib.DEFAULT_SIZES,
               positive_region: str = "mask",
               focal_alpha: float = 0.25,
               focal_gamma: float = 2.0,
               iou_kind: str = "iou",
               centerness_weighted_reg: bool = True,
               margin: float = 0.15,
               top_k: int = 5,
               alpha: float = 2.0,
               thing_weight: float = 5.0,
               box_expand: float = 1.5,
               use_box_filter: bool = True,
               merge_things: bool = True,
               loss_stride: int = 1,
               include_own: bool = False,
               stop_query_gradient: bool = False,
               momentum_coeff: float = 1e-4,
               momentum_power: float = 3.0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One data-parallel SGD step on one device's batch `[b, ...]` (see module docstring).

  Must run inside `parallelize` (collectives over axis "batch"). Returns the new state and a
  dict of global scalar metrics (identical on every device).
  """
  num_devices = jax.lax.axis_size(AXIS_NAME)
  images = batch["image"]  # [b, H, W, 3]
  segments = {k: batch[k] for k in SEGMENT_KEYS}

  targets = _fcos_targets(batch, num_stuff=num_stuff, strides=strides, sizes=sizes,
                          positive_region=positive_region)  # each [b, N, ...]
  normalizers = jax.lax.psum(fcos_lib.fcos_normalizers(targets), AXIS_NAME)  # global scalars

  new_rng, step_rng = jax.random.split(state.rng)
  # Per-device dropout key (the paper's model has none; kept for models that do).
  dropout_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(AXIS_NAME))
  ciae_per_image = functools.partial(
      ciae_losses.ciae_loss, num_stuff=num_stuff, margin=margin, top_k=top_k, alpha=alpha,
      thing_weight=thing_weight, box_expand=box_expand, use_box_filter=use_box_filter,
      merge_things=merge_things, loss_stride=loss_stride, include_own=include_own,
      stop_query_gradient=stop_query_gradient)

  def loss_fn(params):
    variables = {"params": params, **state.model_state}
    outputs = model.apply(variables, images, train=True, rngs={"dropout": dropout_rng})
    fcos = fcos_lib.fcos_losses(
        ciae_model.flatten_levels(outputs["cls_logits"]),  # [b, N, C_th]
        ciae_model.flatten_levels(outputs["box_reg"]),  # [b, N, 4]
        ciae_model.flatten_levels(outputs["centerness"]),  # [b, N]
        targets, normalizers["num_positives"], normalizers["centerness_target_sum"],
        focal_alpha=focal_alpha, focal_gamma=focal_gamma, iou_kind=iou_kind,
        centerness_weighted_reg=centerness_weighted_reg)
    sums = jax.vmap(ciae_per_image, in_axes=(0, 0, 0, 0, 0, 0, 0, 0, None))(
        outputs["embedding"], outputs["embedding_prenorm"], *segments.values(),
        state.memory)  # each [b]
    sums = jax.tree.map(lambda x: jnp.sum(x, axis=0), sums)  # each []
    sums["num_pixels"] = jax.lax.psum(sums["num_pixels"], AXIS_NAME)  # global valid pixels
    ciae = ciae_losses.ciae_total(sums, alpha=alpha)
    shares = {**fcos, **ciae}
    share = shares["loss_cls"] + shares["loss_reg"] + shares["loss_ctr"] + shares["loss_ciae"]
    prenorm = jax.lax.stop_gradient(outputs["embedding_prenorm"])  # [b, H, W, D]
    return share * num_devices, (shares, prenorm)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (_, (shares, prenorm)), grads = grad_fn(parallel.to_varying(state.params))
  grads = jax.lax.pmean(grads, AXIS_NAME)
  losses = jax.lax.psum(shares, AXIS_NAME)  # global-batch losses
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  # Memory: M_t from the class means of this step's embeddings (the loss above used M_{t-1}).
  rows = state.memory.shape[0]
  class_sums = functools.partial(memory_lib.class_sums, num_stuff=num_stuff,
                                 merge_things=merge_things, num_memory=rows)
  emb_sums, counts = jax.vmap(class_sums)(
      prenorm, batch["segment_map"], batch["seg_class"], batch["seg_valid"],
      batch["seg_is_crowd"])  # [b, M, D], [b, M]
  emb_sums = jax.lax.psum(jnp.sum(emb_sums, axis=0), AXIS_NAME)  # [M, D]
  counts = jax.lax.psum(jnp.sum(counts, axis=0), AXIS_NAME)  # [M]
  memory = memory_lib.update_memory(state.memory, emb_sums, counts, state.step, total_steps,
                                    coeff=momentum_coeff, power=momentum_power)  # [M, D]

  # A non-finite loss, gradient or memory update leaves params, optimizer state and memory as
  # they were. Each input of `finite` is identical on every device (psum / pmean-ed), so all
  # take the same branch. Scalars only: a per-leaf check of every tree made the step's XLA
  # compilation ~3x slower; the global gradient norm is non-finite iff a gradient is (or its
  # squares overflow, an exploding gradient anyway). `step` and `rng` still advance: the batch
  # is consumed, and a resumed run stays aligned with the data (position = step * batch).
  loss = losses["loss_cls"] + losses["loss_reg"] + losses["loss_ctr"] + losses["loss_ciae"]
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(jnp.isfinite(memory))
  params, opt_state, memory = keep_if_finite(
      finite, (params, opt_state, memory), (state.params, state.opt_state, state.memory))
  metrics = {
      **losses,
      "loss": loss,
      "num_positives": normalizers["num_positives"],
      "grad_norm": grad_norm,
      "learning_rate": learning_rate_fn(state.step),
      "memory_drift": jnp.mean(jnp.abs(memory - state.memory)),
      "finite": finite,
  }
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            memory=memory, rng=new_rng)
  return new_state, metrics
