"""pmap and shard_map over 8 devices vs one device with the same global batch, step by step.

With every loss normalised by global counts and `pmean`-ed gradients, splitting a global batch
of 8 over 8 devices must give the state of one device that sees all 8 images. Both data-parallel
paths run the same per-device step (`parallel.parallelize`: under shard_map the state is
replicated `P()` and the batch sharded on its device axis). Each of 3 steps starts from the
1-device state of the step before, so float32 noise does not compound (tolerances:
tests/test_train_helpers.py); the replicated outputs must be identical on every device.
"""
import jax
import numpy as np
import pytest

from ciae_jax import parallel
import test_train_helpers as helpers

NUM_STEPS = 3
NUM_DEVICES = 8


@pytest.mark.slow
def test_parallel_step_matches_one_device():
  # Both modes in one test: they share the 1-device reference run (xdist could otherwise run
  # them on two workers, each computing it).
  if jax.device_count() < NUM_DEVICES:
    pytest.fail(f"needs {NUM_DEVICES} devices (tests/conftest.py sets XLA_FLAGS)")
  states, history = helpers.reference_run(NUM_DEVICES, NUM_STEPS)
  for mode in ("pmap", "shard_map"):
    _check_mode_matches_one_device(mode, states, history)


def _check_mode_matches_one_device(mode, states, history):
  run = helpers.step_runner(mode, NUM_DEVICES, 1)
  for step in range(1, NUM_STEPS + 1):
    device_state, metrics = run(states[step - 1], step)
    state = parallel.unreplicate(device_state, parallel=mode)
    helpers.assert_step_matches_one_device(state, metrics, states[step - 1], states[step],
                                           history[step - 1], f"{mode} step {step}")
    _check_identical_on_every_device(device_state, mode, step)
    # It moved (so equality is not trivial; MEMORY_COEFF moves it by ~0.1 a step) and its rows
    # stay unit vectors: the norm of an L2-normalised float32 row of 8 is 1 within a few eps
    # (~1e-6); 1e-5 is ~80 eps.
    assert np.abs(np.asarray(state.memory) - states[step - 1].memory).max() > 1e-2, step
    np.testing.assert_allclose(np.linalg.norm(state.memory, axis=-1), 1.0, atol=1e-5)
    # Positives are counted over the global batch, not per device.
    assert float(history[step - 1]["num_positives"]) > 0
    assert float(metrics["num_positives"]) == float(history[step - 1]["num_positives"]), step


def _device_copies(leaf, mode):
  """The per-device copies of a replicated leaf."""
  if mode == "pmap":
    leaf = np.asarray(leaf)  # [devices, ...]
    return [leaf[i] for i in range(leaf.shape[0])]
  return [np.asarray(s.data) for s in leaf.addressable_shards]


def _check_identical_on_every_device(device_state, mode, step):
  for name in ("memory", "params", "opt_state"):
    for leaf in jax.tree.leaves(getattr(device_state, name)):
      copies = _device_copies(leaf, mode)
      assert len(copies) == NUM_DEVICES
      for copy in copies[1:]:
        np.testing.assert_array_equal(copy, copies[0],
                                      err_msg=f"{name} differs between devices at step {step}")
