"""Checkpoints: the whole TrainState round-trips bit-exactly, the last K are kept, a
checkpoint that does not fit the state is a clear error."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ciae_jax import checkpoint
from ciae_jax import hparams
from ciae_jax.training import optim
from ciae_jax.training import train_state as train_state_lib


def _state(seed: int, *, width: int = 3):
  rng = np.random.default_rng(seed)
  params = {"head": {"conv": {"kernel": rng.normal(size=(3, 3, 2, width)).astype(np.float32),
                              "bias": rng.normal(size=(width,)).astype(np.float32)}},
            "scale_p3": np.float32(1.5)}
  optimizer, _ = optim.create(
      hparams.OptimizerHParams(grad_clip_norm=1.0, frozen_patterns=("scale_p3",)), params,
      batch_size=16)
  state = train_state_lib.create_train_state(
      params=params, optimizer=optimizer, memory=rng.normal(size=(4, 8)).astype(np.float32),
      rng=jax.random.PRNGKey(seed),
      model_state={"frozen": {"bn": {"mean": rng.normal(size=(width,)).astype(np.float32)}}})
  # Non-trivial optimizer state: one update.
  grads = jax.tree.map(jnp.ones_like, state.params)
  _, opt_state = optimizer.update(grads, state.opt_state, state.params)
  return jax.device_get(state.replace(step=jnp.int32(7 * seed), opt_state=opt_state))


def _assert_equal(a, b):
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
  flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
  assert tree_a == tree_b
  for (path, x), (_, y) in zip(flat_a, flat_b):
    assert np.asarray(x).dtype == np.asarray(y).dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_round_trip_and_keep_last(tmp_path):
  manager = checkpoint.create_manager(str(tmp_path), checkpoint_every_steps=1,
                                      keep_checkpoints=2)
  assert checkpoint.restore_latest(manager, _state(1)) is None
  for seed in (1, 2, 3):
    checkpoint.save(manager, 7 * seed, _state(seed), force=True)
  manager.wait_until_finished()
  assert sorted(manager.all_steps()) == [14, 21]
  # A new manager (as after a restart) finds the latest one.
  fresh = checkpoint.create_manager(str(tmp_path), checkpoint_every_steps=1, keep_checkpoints=2)
  restored = checkpoint.restore_latest(fresh, _state(0))
  _assert_equal(restored, _state(3))
  assert isinstance(restored, train_state_lib.TrainState)


def test_mismatched_state_is_a_clear_error(tmp_path):
  manager = checkpoint.create_manager(str(tmp_path), checkpoint_every_steps=1,
                                      keep_checkpoints=1)
  checkpoint.save(manager, 1, _state(1), force=True)
  manager.wait_until_finished()
  with pytest.raises(ValueError, match="does not match"):
    checkpoint.restore_latest(manager, _state(1, width=5))


def test_bad_options_are_rejected(tmp_path):
  with pytest.raises(ValueError, match="checkpoint_every_steps"):
    checkpoint.create_manager(str(tmp_path), checkpoint_every_steps=0)
  with pytest.raises(ValueError, match="keep_checkpoints"):
    checkpoint.create_manager(str(tmp_path), keep_checkpoints=0)
