"""shard_map + jit over a 1-D mesh of 8 devices vs one device with the same global batch.

The same per-device step as under pmap (`parallel.parallelize`): state replicated `P()`,
batch sharded on its device axis. Each of 3 steps, started from the 1-device state of the
step before, must match one device that sees all 8 images (tolerances:
tests/test_train_helpers.py); the replicated outputs must be the same on every device.
"""
import jax
import numpy as np
import pytest

from ciae_jax.training import parallel
import test_train_helpers as helpers

jax.config.update("jax_disable_most_optimizations", True)

NUM_STEPS = 3
NUM_DEVICES = 8


def test_shard_map_matches_one_device():
  # One test function: pytest-xdist would run a module fixture once per worker.
  if jax.device_count() < NUM_DEVICES:
    pytest.fail(f"needs {NUM_DEVICES} devices (tests/conftest.py sets XLA_FLAGS)")
  states, history = helpers.reference_run(NUM_DEVICES, NUM_STEPS)
  run = helpers.step_runner("shard_map", NUM_DEVICES, 1)
  for step in range(1, NUM_STEPS + 1):
    device_state, metrics = run(states[step - 1], step)
    state = parallel.unreplicate(device_state, parallel="shard_map")
    helpers.assert_step_matches_one_device(state, metrics, states[step - 1], states[step],
                                           history[step - 1], f"shard_map step {step}")
    _check_replicated_outputs_identical_on_every_device(device_state, step)


def _check_replicated_outputs_identical_on_every_device(state, step):
  for name in ("memory", "params", "opt_state"):
    for leaf in jax.tree.leaves(getattr(state, name)):
      shards = [np.asarray(s.data) for s in leaf.addressable_shards]
      assert len(shards) == NUM_DEVICES
      for shard in shards[1:]:
        np.testing.assert_array_equal(shard, shards[0], err_msg=f"{name} differs at step {step}")
