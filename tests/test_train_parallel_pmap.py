"""pmap over 8 devices vs one device with the same global batch, step by step (3 steps).

With every loss normalised by global counts and `pmean`-ed gradients, splitting a global batch
of 8 over 8 devices must give the state of one device that sees all 8 images, and the memory
must be identical on every device. Each pmap step starts from the 1-device state of the step
before, so float32 noise does not compound (tolerances: tests/test_train_helpers.py).
"""
import jax
import numpy as np
import pytest

from ciae_jax.training import parallel
import test_train_helpers as helpers

jax.config.update("jax_disable_most_optimizations", True)

NUM_STEPS = 3
NUM_DEVICES = 8


def test_pmap_matches_one_device():
  # One test function: pytest-xdist would run a module fixture once per worker.
  if jax.device_count() < NUM_DEVICES:
    pytest.fail(f"needs {NUM_DEVICES} devices (tests/conftest.py sets XLA_FLAGS)")
  states, history = helpers.reference_run(NUM_DEVICES, NUM_STEPS)
  run = helpers.step_runner("pmap", NUM_DEVICES, 1)
  for step in range(1, NUM_STEPS + 1):
    device_state, metrics = run(states[step - 1], step)
    state = parallel.unreplicate(device_state, parallel="pmap")
    helpers.assert_step_matches_one_device(state, metrics, states[step - 1], states[step],
                                           history[step - 1], f"pmap step {step}")
    _check_memory_moved_and_identical_on_every_device(device_state, states[step - 1], step)
    _check_positives_counted_over_the_global_batch(metrics, history[step - 1], step)


def _check_memory_moved_and_identical_on_every_device(device_state, previous, step):
  memory = np.asarray(device_state.memory)  # [devices, M, D]
  assert memory.shape[0] == NUM_DEVICES
  for device in range(1, NUM_DEVICES):
    np.testing.assert_array_equal(memory[device], memory[0])
  # It moved (so equality is not trivial; MEMORY_COEFF moves it by ~0.1 a step) and its rows
  # stay unit vectors: the norm of an L2-normalised float32 row of 8 is 1 within a few eps
  # (~1e-6); 1e-5 is ~80 eps.
  assert np.abs(memory[0] - previous.memory).max() > 1e-2, f"step {step}"
  np.testing.assert_allclose(np.linalg.norm(memory[0], axis=-1), 1.0, atol=1e-5)
  for name in ("params", "opt_state"):
    for leaf in jax.tree.leaves(getattr(device_state, name)):
      leaf = np.asarray(leaf)
      np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[:1], leaf.shape),
                                    err_msg=f"{name} differs between devices at step {step}")


def _check_positives_counted_over_the_global_batch(metrics, expected, step):
  one = float(expected["num_positives"])
  assert one > 0
  assert float(metrics["num_positives"]) == one, f"step {step}"
