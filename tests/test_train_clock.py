"""One clock: the learning rate, the memory momentum and the logs read `state.step`, which a
skipped (non-finite) step advances without changing params, optimizer state or memory.

Exact comparisons: a run that skips step 2 must continue, bit for bit, as a run whose state
after step 1 simply had its step counter set to 2 (same arrays, same program).
"""
import jax
import numpy as np
import pytest

from ciae_jax import parallel
from ciae_jax.training import optim
import test_train_helpers as helpers


@pytest.mark.slow
def test_a_skipped_step_advances_the_clock_and_nothing_else():
  model = helpers.tiny_model()
  host_state, step_fn = helpers.initial_state(model)
  devices = jax.devices()[:1]
  run = parallel.parallelize(step_fn, parallel="pmap", devices=devices, donate=False)
  replicate = lambda s: parallel.replicate(s, parallel="pmap", devices=devices)  # noqa: E731
  host = lambda s: parallel.unreplicate(s, parallel="pmap")  # noqa: E731
  good = [helpers.make_batch(seed, (1, 2)) for seed in (0, 2)]
  bad = dict(good[0], image=np.full_like(good[0]["image"], np.nan))

  state1, _ = run(replicate(host_state), good[0])
  state2, metrics2 = run(state1, bad)
  state3, metrics3 = run(state2, good[1])
  skipped, after = host(state2), host(state3)
  reference_in = host(state1).replace(step=np.int32(2))
  reference, reference_metrics = run(replicate(reference_in), good[1])
  reference = host(reference)

  assert not bool(np.asarray(metrics2["finite"])[0])
  for name in ("params", "opt_state", "memory"):
    for x, y in zip(jax.tree.leaves(getattr(skipped, name)),
                    jax.tree.leaves(getattr(host(state1), name))):
      np.testing.assert_array_equal(x, y, err_msg=f"skipped step changed {name}")
  assert int(skipped.step) == 2
  for name in ("params", "opt_state", "memory"):
    for x, y in zip(jax.tree.leaves(getattr(after, name)),
                    jax.tree.leaves(getattr(reference, name))):
      np.testing.assert_array_equal(x, y, err_msg=name)
  # The logged rate is the rate applied at step 3: schedule(2), the end of the 2-step warm-up.
  _, schedule = optim.create(helpers.OPTIMIZER, host_state.params, batch_size=1)
  np.testing.assert_array_equal(np.asarray(metrics3["learning_rate"])[0], schedule(2))
  np.testing.assert_array_equal(np.asarray(reference_metrics["learning_rate"])[0], schedule(2))
  # The rate applied at step 3 is schedule(2), not the schedule of the 2 updates done: the same
  # state and batch at step counter 1 (no skip) move the parameters by schedule(1) instead.
  # The direction of both updates is the same array (same gradients and momentum), so the
  # largest parameter move differs by schedule(2) / schedule(1) up to float32 rounding of
  # `p + lr * d` (relative 1e-4 is ~1000 ulp of the moves, a wrong clock is off by 33%).
  unskipped = host(run(state1, good[1])[0])
  moved_skip = _largest_move(after.params, skipped.params)
  moved_plain = _largest_move(unskipped.params, skipped.params)
  np.testing.assert_allclose(moved_skip / moved_plain, schedule(2) / schedule(1), rtol=1e-4)
  # The optimizer keeps no step count of its own: nothing in its state can drift from the clock.
  assert all(np.issubdtype(np.asarray(x).dtype, np.floating)
             for x in jax.tree.leaves(after.opt_state))


def _largest_move(new, old):
  """The parameter change of largest magnitude (signed), over all leaves."""
  deltas = np.concatenate([np.ravel(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                           for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old))])
  return deltas[np.argmax(np.abs(deltas))]
