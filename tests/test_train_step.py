"""The per-device train step on one device: learning, finite terms, and its wiring.

Reference for the wiring (written here from the paper's recipe, not taken from the step): the
step-1 losses are the FCOS losses normalised by the batch's positives plus the CIAE loss
against the initial memory M_0, and M_1 is the momentum update of M_0 with the class means of
the step-1 pre-norm embeddings (paper III-C: the loss at step t uses M_{t-1}).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ciae_jax import memory as memory_lib
from ciae_jax import parallel
from ciae_jax import targets as targets_lib
from ciae_jax.losses import ciae as ciae_losses
from ciae_jax.losses import fcos as fcos_lib
from ciae_jax.models import ciae as ciae_model
from ciae_jax.segments import Segments
from ciae_jax.training import step as step_lib
import test_train_helpers as helpers

NUM_STEPS = 5
BATCH = 4
LOSS_TERMS = ("loss", "loss_cls", "loss_reg", "loss_ctr", "loss_cae", "loss_iae", "loss_ciae")


@pytest.mark.slow
def test_train_step_on_one_device():
  # One test function: pytest-xdist would run a module fixture once per worker.
  run = _run()
  _check_loss_decreases_and_every_term_is_finite(run)
  _check_step_counter_rng_and_learning_rate(run)
  _check_memory_drift_metric(run)
  _check_first_step_losses_and_memory_update_match_reference(run)


def _run():
  """NUM_STEPS steps on one fixed batch; host copies of every state and the metrics."""
  model = helpers.tiny_model()
  host_state, step_fn = helpers.initial_state(model)
  devices = jax.devices()[:1]
  run_step = parallel.parallelize(step_fn, parallel="pmap", devices=devices)
  state = parallel.replicate(host_state, parallel="pmap", devices=devices)
  batch = helpers.make_batch(7, (1, BATCH))
  states, history = [host_state], []
  for _ in range(NUM_STEPS):
    state, metrics = run_step(state, batch)
    states.append(parallel.unreplicate(state, parallel="pmap"))
    history.append(jax.device_get(parallel.first_copy(metrics, parallel="pmap")))
  return model, {k: v[0] for k, v in batch.items()}, states, history


def _check_loss_decreases_and_every_term_is_finite(run):
  _, _, _, history = run
  for step, metrics in enumerate(history, start=1):
    for key in (*LOSS_TERMS, "grad_norm", "memory_drift", "num_positives"):
      assert np.isfinite(metrics[key]), f"{key} at step {step}: {metrics[key]}"
    # Sums of 4 (2) non-negative float32 terms, here and in the step in any order: <= 3
    # roundings of 2^-24 (2e-7); rtol 1e-5.
    np.testing.assert_allclose(
        metrics["loss"], metrics["loss_cls"] + metrics["loss_reg"] + metrics["loss_ctr"]
        + metrics["loss_ciae"], rtol=1e-5, err_msg=f"L = L_ctr + L_cls + L_reg + L_CIAE, {step}")
    np.testing.assert_allclose(metrics["loss_ciae"],
                               metrics["loss_cae"] + 2.0 * metrics["loss_iae"], rtol=1e-5)
  losses = [float(m["loss"]) for m in history]
  assert losses[-1] < 0.9 * losses[0], losses
  for key in LOSS_TERMS:
    assert history[-1][key] < history[0][key], (key, [float(m[key]) for m in history])


def _check_step_counter_rng_and_learning_rate(run):
  _, _, states, history = run
  for step, state in enumerate(states):
    assert int(state.step) == step
  assert len({tuple(np.asarray(s.rng)) for s in states}) == len(states)
  # Schedule of helpers.initial_state: 0.01, linear warm-up from x0.5 over 2 steps.
  expected = [0.01 * (0.5 + 0.5 * min(t / 2, 1.0)) for t in range(NUM_STEPS)]
  # A few float32 operations vs float64 (test_train_optim.py): < 5e-7, rtol 1e-6.
  np.testing.assert_allclose([m["learning_rate"] for m in history], expected, rtol=1e-6)


def _check_memory_drift_metric(run):
  _, _, states, history = run
  for step in range(1, NUM_STEPS + 1):
    drift = np.mean(np.abs(np.asarray(states[step].memory) - np.asarray(states[step - 1].memory)))
    # The float32 mean of 3 x 8 differences on device vs float64 here: <= ~26 roundings of
    # 2^-24 (1.6e-6) in any order; rtol 1e-5, atol 1e-9 for a near-zero drift.
    np.testing.assert_allclose(history[step - 1]["memory_drift"], drift, rtol=1e-5, atol=1e-9)
    assert drift > 0


def _check_first_step_losses_and_memory_update_match_reference(run):
  model, batch, states, history = run
  state0 = states[0]
  hp = helpers.STEP_HPARAMS

  @jax.jit
  def reference(params, memory, batch):
    outputs = model.apply({"params": params}, batch["image"])
    segments = Segments.from_batch(batch)
    targets = jax.vmap(functools.partial(targets_lib.fcos_targets, num_stuff=helpers.NUM_STUFF,
                                         hp=hp.fcos))(segments)
    num_pos = jnp.sum(targets["positive"])
    ctr_sum = jnp.sum(targets["centerness_target"] * targets["positive"])
    fcos = fcos_lib.fcos_losses(ciae_model.flatten_levels(outputs["cls_logits"]),
                                ciae_model.flatten_levels(outputs["box_reg"]),
                                ciae_model.flatten_levels(outputs["centerness"]),
                                targets, num_pos, ctr_sum, hp.fcos)
    image = [jax.tree.map(lambda x, i=i: x[i], segments) for i in range(BATCH)]
    per_image = [ciae_losses.ciae_loss(
        outputs["embedding"][i], outputs["embedding_prenorm"][i], image[i], memory, hp.loss,
        num_stuff=helpers.NUM_STUFF) for i in range(BATCH)]
    sums = jax.tree.map(lambda *x: sum(x), *per_image)
    ciae = ciae_losses.ciae_total(sums)
    class_sums, counts = 0.0, 0
    for i in range(BATCH):
      s, c = memory_lib.class_sums(outputs["embedding_prenorm"][i], image[i],
                                   num_stuff=helpers.NUM_STUFF, merge_things=True,
                                   num_memory=memory.shape[0])
      class_sums, counts = class_sums + s, counts + c
    new_memory = memory_lib.update_memory(memory, class_sums, counts, 0, helpers.TOTAL_STEPS,
                                          hp.memory)
    return {**fcos, **ciae, "num_positives": num_pos}, new_memory

  expected, expected_memory = jax.device_get(
      reference(state0.params, state0.memory, {k: jnp.asarray(v) for k, v in batch.items()}))
  # Two float32 programs (the step, this jit) computing the same sums of non-negative loss
  # terms over 4 * 128 * 128 pixels, possibly in other orders: ~log2(N) * eps ~ 2e-6 (see
  # LOSS_RTOL in test_train_helpers.py); rtol 1e-4. num_positives is an exact count. The
  # memory: unit rows from float32 sums of the same embeddings (atol 1e-6 near 0).
  for key, value in expected.items():
    np.testing.assert_allclose(history[0][key], value, rtol=1e-4, err_msg=key)
  np.testing.assert_allclose(states[1].memory, expected_memory, rtol=1e-4, atol=1e-6)


def test_bad_batches_are_named():
  batch = helpers.make_batch(0, (2, 1))
  step_lib.check_batch(batch, leading_axes=2)  # A good one passes.
  with pytest.raises(ValueError, match="seg_box"):
    step_lib.check_batch({k: v for k, v in batch.items() if k != "seg_box"}, leading_axes=2)
  with pytest.raises(ValueError, match="segment_map"):
    step_lib.check_batch(dict(batch, segment_map=batch["segment_map"][..., :64]),
                         leading_axes=2)
