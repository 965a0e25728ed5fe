"""`profile_first_step` writes a profiler trace of those steps into WORKDIR/profile."""
import jax
import pytest

from ciae_jax.training import loop
import test_train_resume as resume


@pytest.mark.slow
def test_profile_trace_of_the_requested_steps(tmp_path):
  hp = resume._config(tmp_path).replace(total_steps=3, eval_every_steps=0,  # pylint: disable=protected-access
                                        checkpoint_every_steps=3, profile_first_step=2,
                                        profile_num_steps=1)
  state = loop.train_and_evaluate(hp, str(tmp_path / "run"), input_fn=resume.FakeInput())
  assert int(jax.device_get(state.step)) == 3
  profile = tmp_path / "run" / loop.PROFILE_DIR
  assert list(profile.rglob("*.xplane.pb")), sorted(p.name for p in profile.rglob("*"))
  assert list(profile.rglob("perfetto_trace.json.gz"))
