"""The per-device train step (written once; `parallel.parallelize` runs it under pmap or shard_map).

One step at iteration t (state.step = t - 1 updates done):
  1. FCOS targets of every image (vmapped), positives counted and `psum`-ed over devices;
  2. forward pass, FCOS losses normalised by the GLOBAL positive count / centerness sum, CIAE loss
     sums with the GLOBAL valid-pixel count, against the memory M_{t-1} of the state; with
     `model.stuff_from="semantic"` (Table III, first row) CIAE covers thing pixels only and the
     semantic branch's cross-entropy, over the GLOBAL labelled-cell count, is added;
  3. gradients `pmean`-ed over devices, one optimizer update at the rate `schedule(state.step)`;
  4. per-class sums / pixel counts of the pre-norm embeddings, summed over the local batch and
     `psum`-ed, then the momentum update `M_t` (identical on every device);
  5. if the loss, the gradients or the new memory hold a NaN or infinity, the update is dropped:
     params, optimizer state and memory stay as they were (metric `finite` False); `step` and
     `rng` advance as after any step. `state.step` is the one clock: the learning-rate
     schedule, the memory momentum (Eq. 13) and the logged rate all read it, so a skipped step
     moves all of them on together (`training.optim`).

Gradient accumulation (`config.grad_accum_steps = K > 1`, `training.accumulate`): every count
of 1. and 2. is taken over the whole global batch first; then 2. and the class sums of 4. run on
K micro-batches `[b / K, ...]` of the device's batch one after the other, summed; 3., the
memory update and 5. run once. K = 1 is the single pass above.

Normalisation: each device's losses are its share of the global-batch loss (sum over local
locations / global count). The objective differentiated on a device is that share times the
number of devices, so that the `pmean` of the gradients is the gradient of the global loss;
reported losses are the `psum` of the shares, i.e. the global-batch losses. With one device
this is the plain loss.
"""
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from ciae_jax import hparams
from ciae_jax import memory as memory_lib
from ciae_jax import parallel
from ciae_jax import targets as targets_lib
from ciae_jax.losses import ciae as ciae_losses
from ciae_jax.losses import fcos as fcos_lib
from ciae_jax.losses import semantic as semantic_losses
from ciae_jax.models import ciae as ciae_model
from ciae_jax.segments import BATCH_KEYS
from ciae_jax.segments import Segments
from ciae_jax.training import accumulate
from ciae_jax.training import optim
from ciae_jax.training.train_state import TrainState

AXIS_NAME = parallel.AXIS_NAME


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


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *,
               model: ciae_model.CIAE,
               optimizer: optax.GradientTransformation,
               learning_rate_fn: Callable[[jax.Array], jax.Array],
               hp: hparams.HParams,
               num_stuff: int) -> tuple[TrainState, dict[str, jax.Array]]:
  """One data-parallel SGD step on one device's batch `[b, ...]` (see module docstring).

  Must run inside `parallelize` (collectives over axis "batch"). `hp` gives the FCOS, loss
  and memory hyper-parameters and `total_steps`; `num_stuff` comes from the dataset. Returns
  the new state and a dict of global scalar metrics (identical on every device).
  """
  num_devices = jax.lax.axis_size(AXIS_NAME)
  num_micro = hp.grad_accum_steps
  accumulate.check_divisible(batch["image"].shape[0], num_micro)
  images = batch["image"]  # [b, H, W, 3]
  segments = Segments.from_batch(batch)  # [b, ...] each

  targets = jax.vmap(lambda s: targets_lib.fcos_targets(
      s, num_stuff=num_stuff, hp=hp.fcos, strides=model.strides))(segments)  # [b, N, ...] each
  normalizers = jax.lax.psum(fcos_lib.fcos_normalizers(targets), AXIS_NAME)  # global scalars

  # The state's key advances once per step (nothing in the model is random today).
  new_rng, _ = jax.random.split(state.rng)
  # Table III, first row: a semantic branch segments stuff, CIAE only things.
  semantic_branch = hp.model.stuff_from == "semantic"

  def ciae_per_image(prenorm, image_segments):
    # No normalised embedding: the loss normalises the pre-norm one chunk by chunk.
    return ciae_losses.ciae_loss(None, prenorm, image_segments, state.memory, hp.loss,
                                 num_stuff=num_stuff, stuff_pixels=not semantic_branch)

  def global_count(local, name, totals):
    # A normaliser over the global batch: given when accumulating, else summed over devices.
    return totals[name] if name in totals else jax.lax.psum(local, AXIS_NAME)

  def loss_fn(params, images, segments, targets, totals):
    variables = {"params": params, **state.model_state}
    outputs = model.apply(variables, images)
    fcos = fcos_lib.fcos_losses(
        ciae_model.flatten_levels(outputs["cls_logits"]),  # [b, N, C_th]
        ciae_model.flatten_levels(outputs["box_reg"]),  # [b, N, 4]
        ciae_model.flatten_levels(outputs["centerness"]),  # [b, N]
        targets, totals["num_positives"], totals["centerness_target_sum"], hp.fcos)
    sums = jax.vmap(ciae_per_image)(outputs["embedding_prenorm"], segments)  # each [b]
    sums = jax.tree.map(lambda x: jnp.sum(x, axis=0), sums)  # each []
    sums["num_pixels"] = global_count(sums["num_pixels"], "num_pixels", totals)  # valid pixels
    ciae = ciae_losses.ciae_total(sums)
    shares = {**fcos, **ciae}
    if semantic_branch:
      semantic = jax.vmap(functools.partial(semantic_losses.semantic_loss_sums,
                                            num_stuff=num_stuff))(
          outputs["semantic_logits"], segments)  # each [b]
      semantic = jax.tree.map(lambda x: jnp.sum(x, axis=0), semantic)  # each []
      # Global labelled cells, as num_pixels above.
      semantic["semantic_pixels"] = global_count(semantic["semantic_pixels"], "semantic_pixels",
                                                 totals)
      shares.update(semantic_losses.semantic_total(semantic, hp.loss.semantic_weight))
    share = shares["loss_cls"] + shares["loss_reg"] + shares["loss_ctr"] + shares["loss_ciae"]
    if semantic_branch:
      share = share + shares["loss_semantic"]
    # The memory's class sums come from this forward pass's pre-norm embeddings (no gradient).
    # Computed here, so that the full-resolution embedding is not kept to the end of the step.
    class_sums = jax.vmap(lambda e, s: memory_lib.class_sums(
        e, s, num_stuff=num_stuff, merge_things=hp.loss.merge_things,
        num_memory=state.memory.shape[0]))(
            jax.lax.stop_gradient(outputs["embedding_prenorm"]), segments)  # [b, M, D], [b, M]
    return share * num_devices, (shares, class_sums)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_micro == 1:
    (_, (shares, (emb_sums, counts))), grads = grad_fn(
        parallel.to_varying(state.params), images, segments, targets, normalizers)
  else:
    grads, (shares, (emb_sums, counts)) = _accumulated_grads(
        grad_fn, parallel.to_varying(state.params), images, segments, targets, normalizers,
        hp=hp, num_stuff=num_stuff, semantic_stride=model.semantic_stride)
  grads = jax.lax.pmean(grads, AXIS_NAME)
  losses = jax.lax.psum(shares, AXIS_NAME)  # global-batch losses
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  # One clock: the rate of this step is a function of `state.step` (see `training.optim`).
  learning_rate = learning_rate_fn(state.step)  # []
  params = optim.apply_updates(state.params, updates, learning_rate)

  # Memory: M_t from the class means of this step's embeddings (the loss above used M_{t-1}).
  emb_sums = jax.lax.psum(jnp.sum(emb_sums, axis=0), AXIS_NAME)  # [M, D]
  counts = jax.lax.psum(jnp.sum(counts, axis=0), AXIS_NAME)  # [M]
  memory = memory_lib.update_memory(state.memory, emb_sums, counts, state.step,
                                    hp.total_steps, hp.memory)  # [M, D]

  # A non-finite loss, gradient or memory update leaves params, optimizer state and memory as
  # they were. Each input of `finite` is identical on every device (psum / pmean-ed), so all
  # take the same branch. Scalars only: a per-leaf check of every tree made the step's XLA
  # compilation ~3x slower; the global gradient norm is non-finite iff a gradient is (or its
  # squares overflow, an exploding gradient anyway). `step` and `rng` still advance: the batch
  # is consumed, and a resumed run stays aligned with the data (position = step * batch).
  loss = losses["loss_cls"] + losses["loss_reg"] + losses["loss_ctr"] + losses["loss_ciae"]
  if semantic_branch:
    loss = loss + losses["loss_semantic"]
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(jnp.isfinite(memory))
  params, opt_state, memory = keep_if_finite(
      finite, (params, opt_state, memory), (state.params, state.opt_state, state.memory))
  metrics = {
      **losses,
      "loss": loss,
      "num_positives": normalizers["num_positives"],
      "grad_norm": grad_norm,
      "learning_rate": learning_rate,
      "memory_drift": jnp.mean(jnp.abs(memory - state.memory)),
      "finite": finite,
  }
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            memory=memory, rng=new_rng)
  return new_state, metrics


def _accumulated_grads(grad_fn, params, images, segments, targets, normalizers, *, hp,
                       num_stuff, semantic_stride):
  """(gradients, aux) of `grad_fn` summed over `hp.grad_accum_steps` micro-batches.

  Every count that normalises a loss is taken over the whole global batch first, so that each
  micro-batch's loss is its share of the full-batch loss (`training.accumulate`).
  """
  totals = dict(normalizers, **jax.lax.psum(accumulate.loss_counts(
      segments, hp, num_stuff=num_stuff, semantic_stride=semantic_stride), AXIS_NAME))

  def micro_step(params, micro):
    (_, aux), grads = grad_fn(params, *micro, totals)
    return grads, aux
  return accumulate.accumulate(micro_step, params, accumulate.split(
      (images, segments, targets), hp.grad_accum_steps))


def make_train_step(hp: hparams.HParams, model: ciae_model.CIAE,
                    optimizer: optax.GradientTransformation,
                    schedule: Callable[[jax.Array], jax.Array], *,
                    num_stuff: int) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """The per-device step `(state, batch) -> (state, metrics)` of a run (not yet parallel)."""
  return functools.partial(train_step, model=model, optimizer=optimizer,
                           learning_rate_fn=schedule, hp=hp, num_stuff=num_stuff)
