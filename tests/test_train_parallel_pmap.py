"""pmap over 8 devices vs one device with the same global batch (3 steps).

With every loss normalised by global counts and `pmean`-ed gradients, splitting a global batch
of 8 over 8 devices must give the state of one device that sees all 8 images, and the memory
must be identical on every device.
"""
import jax
import numpy as np
import pytest

import test_train_helpers as helpers

jax.config.update("jax_disable_most_optimizations", True)

NUM_STEPS = 3
NUM_DEVICES = 8


def test_pmap_matches_one_device():
  # One test function: pytest-xdist would run a module fixture once per worker.
  if jax.device_count() < NUM_DEVICES:
    pytest.fail(f"needs {NUM_DEVICES} devices (tests/conftest.py sets XLA_FLAGS)")
  runs = {"one": helpers.run_parallel("pmap", 1, NUM_DEVICES, NUM_STEPS),
          "pmap": helpers.run_parallel("pmap", NUM_DEVICES, 1, NUM_STEPS)}
  helpers.assert_matches_one_device(runs["pmap"], "pmap", runs["one"], NUM_STEPS)
  _check_memory_moved_and_identical_on_every_device(runs)
  _check_positives_counted_over_the_global_batch(runs)


def _check_memory_moved_and_identical_on_every_device(runs):
  initial, _ = helpers.initial_state(helpers.tiny_model())
  memory = np.asarray(runs["pmap"][0].memory)  # [devices, M, D]
  assert memory.shape[0] == NUM_DEVICES
  for device in range(1, NUM_DEVICES):
    np.testing.assert_array_equal(memory[device], memory[0])
  # It moved (so equality is not trivial) and its rows stay unit vectors.
  assert np.abs(memory[0] - initial.memory).max() > 1e-2
  np.testing.assert_allclose(np.linalg.norm(memory[0], axis=-1), 1.0, atol=1e-5)
  for name in ("params", "opt_state"):
    for leaf in jax.tree.leaves(getattr(runs["pmap"][0], name)):
      leaf = np.asarray(leaf)
      np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[:1], leaf.shape),
                                    err_msg=f"{name} differs between devices")


def _check_positives_counted_over_the_global_batch(runs):
  for step in range(NUM_STEPS):
    one = float(runs["one"][1][step]["num_positives"])
    assert one > 0
    assert float(runs["pmap"][1][step]["num_positives"]) == one
