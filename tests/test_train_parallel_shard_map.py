"""shard_map + jit over a 1-D mesh of 8 devices vs one device with the same global batch.

The same per-device step as under pmap (`parallel.parallelize`): state replicated `P()`,
batch sharded on its device axis. After 3 steps it must match one device that sees all 8
images; the replicated outputs must be the same on every device.
"""
import jax
import numpy as np
import pytest

import test_train_helpers as helpers

jax.config.update("jax_disable_most_optimizations", True)

NUM_STEPS = 3
NUM_DEVICES = 8


def test_shard_map_matches_one_device():
  # One test function: pytest-xdist would run a module fixture once per worker.
  if jax.device_count() < NUM_DEVICES:
    pytest.fail(f"needs {NUM_DEVICES} devices (tests/conftest.py sets XLA_FLAGS)")
  runs = {"one": helpers.run_parallel("pmap", 1, NUM_DEVICES, NUM_STEPS),
          "shard_map": helpers.run_parallel("shard_map", NUM_DEVICES, 1, NUM_STEPS)}
  helpers.assert_matches_one_device(runs["shard_map"], "shard_map", runs["one"], NUM_STEPS)
  _check_replicated_outputs_identical_on_every_device(runs)


def _check_replicated_outputs_identical_on_every_device(runs):
  state = runs["shard_map"][0]
  for name in ("memory", "params", "opt_state"):
    for leaf in jax.tree.leaves(getattr(state, name)):
      shards = [np.asarray(s.data) for s in leaf.addressable_shards]
      assert len(shards) == NUM_DEVICES
      for shard in shards[1:]:
        np.testing.assert_array_equal(shard, shards[0], err_msg=f"{name} differs")
