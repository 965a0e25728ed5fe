"""Initial state from a config: ImageNet backbone file, seeds, memory; frozen parts stay put.

The backbone file is a torchvision-layout state dict (`conv1.weight` OIHW, `bn1.running_mean`,
...) written here with NumPy for the tiny ResNet, so the expected values are known exactly.
"""
import jax
import numpy as np
import pytest

from ciae_jax import config_lib
from ciae_jax import hparams
from ciae_jax import parallel
from ciae_jax.models import ciae as ciae_model
from ciae_jax.models import convert
from ciae_jax.training import step as step_lib
from ciae_jax.training import train_state as train_state_lib
import test_train_helpers as helpers


@pytest.mark.slow
def test_initial_state_and_frozen_parts(tmp_path):
  # One test function: pytest-xdist would run a module fixture once per worker.
  setup = _setup(tmp_path)
  _check_backbone_comes_from_the_file(setup)
  _check_memory_and_seed(setup)
  _check_a_step_moves_trained_parameters_and_not_frozen_ones(setup)


def _setup(tmp_path):
  rng = np.random.default_rng(0)
  torch_state = {}
  for path, shape in convert.backbone_shapes("resnet_tiny").items():
    torch_shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape
    value = rng.normal(size=torch_shape).astype(np.float32)
    if path.endswith("/var"):
      value = np.abs(value) + 0.5
    torch_state[convert.torch_key(path)] = value
  torch_state["fc.weight"] = np.zeros((10, 128), np.float32)  # Ignored by the converter.
  weights = tmp_path / "resnet_tiny_torchvision.npz"
  np.savez(weights, **torch_state)

  config = config_lib.base_config()
  config.seed = 5
  config.batch_size = jax.local_device_count()
  config.model.update(helpers.TINY_MODEL)
  config.model.norm = "frozen_bn"  # freeze_at 2: stem and layer1 frozen.
  config.init_backbone = str(weights)
  hp = hparams.HParams.from_config(config)
  model = ciae_model.build_model(hp.model, helpers.NUM_THINGS, helpers.NUM_STUFF)
  state, optimizer, schedule = train_state_lib.init_train_state(
      hp, model, num_stuff=helpers.NUM_STUFF, num_things=helpers.NUM_THINGS,
      rng=jax.random.PRNGKey(hp.seed))
  return hp, model, state, optimizer, schedule, torch_state


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = np.asarray(value)
  return out


def _check_backbone_comes_from_the_file(setup):
  _, _, state, _, _, torch_state = setup
  ours = {**_flatten(state.params["backbone"]),
          **_flatten(state.model_state["frozen"]["backbone"])}
  assert len(ours) == len(torch_state) - 1  # All but fc.weight.
  for path, value in ours.items():
    expected = torch_state[convert.torch_key(path)]
    if expected.ndim == 4:
      expected = expected.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    np.testing.assert_array_equal(value, expected, err_msg=path)
  # The frozen stem lives outside the trained parameters.
  assert "conv1" not in state.params["backbone"]
  assert "conv1" in state.model_state["frozen"]["backbone"]


def _check_memory_and_seed(setup):
  config, model, state, _, _, _ = setup
  assert state.memory.shape == (helpers.NUM_STUFF + 1, helpers.TINY_MODEL["embed_dim"])
  # Unit rows of 8 float32 components: within ~(8 / 2 + 2) * 2^-24 ~ 4e-7 of unit length.
  np.testing.assert_allclose(np.linalg.norm(state.memory, axis=-1), 1.0, rtol=1e-6)
  assert int(state.step) == 0
  again, _, _ = train_state_lib.init_train_state(config, model, num_stuff=helpers.NUM_STUFF,
                                                 num_things=helpers.NUM_THINGS,
                                                 rng=jax.random.PRNGKey(config.seed))
  other, _, _ = train_state_lib.init_train_state(config, model, num_stuff=helpers.NUM_STUFF,
                                                 num_things=helpers.NUM_THINGS,
                                                 rng=jax.random.PRNGKey(config.seed + 1))
  np.testing.assert_array_equal(again.memory, state.memory)
  np.testing.assert_array_equal(again.params["head"]["cls_logits"]["kernel"],
                                state.params["head"]["cls_logits"]["kernel"])
  assert not np.array_equal(other.memory, state.memory)


def _check_a_step_moves_trained_parameters_and_not_frozen_ones(setup):
  config, model, state, optimizer, schedule, _ = setup
  step_fn = step_lib.make_train_step(config, model, optimizer, schedule,
                                     num_stuff=helpers.NUM_STUFF)
  devices = jax.devices()[:1]
  run_step = parallel.parallelize(step_fn, parallel="pmap", devices=devices)
  new_state, _ = run_step(parallel.replicate(state, parallel="pmap", devices=devices),
                          helpers.make_batch(0, (1, 2)))
  new_state = parallel.unreplicate(new_state, parallel="pmap")
  for path, value in _flatten(new_state.model_state).items():
    np.testing.assert_array_equal(value, _flatten(state.model_state)[path], err_msg=path)
  before, after = _flatten(state.params), _flatten(new_state.params)
  assert not np.array_equal(after["backbone/layer2_0/conv1/kernel"],
                            before["backbone/layer2_0/conv1/kernel"])
  assert not np.array_equal(after["head/cls_logits/kernel"], before["head/cls_logits/kernel"])
