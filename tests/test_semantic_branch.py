"""`model.stuff_from="semantic"`: paper V-F.1, Table III's first row (stuff from an FCN branch).

The option, the model's `semantic_logits`, the cross-entropy against a NumPy reference, CIAE on
thing pixels only, one train step, and the inference rule on the hand-made scene of
test_inference.py (stuff pixels from the semantic argmax, "thing" pixels to the instances).
"""
import functools

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ciae_jax import config_lib
from ciae_jax import hparams
from ciae_jax import ops
from ciae_jax import parallel
from ciae_jax.inference import panoptic
from ciae_jax.inference import predictor as predictor_lib
from ciae_jax.losses import ciae as ciae_losses
from ciae_jax.losses import semantic as semantic_losses
from ciae_jax.models import ciae
from ciae_jax.segments import Segments
from ciae_jax.training import metrics as metrics_lib
from ciae_jax.training import optim
from ciae_jax.training import step as step_lib
from ciae_jax.training import train_state as train_state_lib
import test_inference as scene
import test_train_helpers as helpers

TINY = dict(backbone="resnet_tiny", norm="gn", fpn_dim=16, head_convs=1, semantic_dim=16,
            embed_dim=8)


# ------------------------------------------------------------------------------------------------
# Hyper-parameters.


def test_stuff_from_is_validated_and_defaults_to_the_paper():
  assert hparams.ModelHParams().stuff_from == "embedding"
  assert hparams.LossHParams().semantic_weight == 1.0
  assert hparams.ModelHParams(stuff_from="semantic").stuff_from == "semantic"
  with pytest.raises(hparams.HParamsError, match=r"config.model.stuff_from"):
    hparams.ModelHParams(stuff_from="fcn")
  config = config_lib.base_config()
  config.model.stuff_from = "semantic"
  config.loss.semantic_weight = 0.5
  hp = hparams.HParams.from_config(config)
  assert (hp.model.stuff_from, hp.loss.semantic_weight) == ("semantic", 0.5)


# ------------------------------------------------------------------------------------------------
# Model.


@functools.cache
def _structure(stuff_from: str, num_stuff: int, hw: tuple[int, int] = (128, 128)):
  model = ciae.build_model(dict(TINY, stuff_from=stuff_from), 3, num_stuff)
  images = jnp.zeros((1, *hw, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 128, 128, 3)))
  return variables, jax.eval_shape(model.apply, variables, images)


def _flat(tree):
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def test_semantic_logits_only_with_the_option():
  default, out_default = _structure("embedding", 0)
  default_with_stuff, out_with_stuff = _structure("embedding", 4)
  semantic, out_semantic = _structure("semantic", 4, (64, 96))
  # The default model: the same variables and outputs whether or not N_st is passed, and no
  # semantic parameter or output.
  assert _flat(default) == _flat(default_with_stuff)
  assert jax.tree.map(lambda x: x.shape, out_default) == jax.tree.map(lambda x: x.shape,
                                                                      out_with_stuff)
  assert "semantic_logits" not in out_default
  assert not [k for k in _flat(default) if "semantic_pred" in k]
  # The option adds one 1x1 classifier on the 1/4-scale aggregate (semantic_dim 16 -> N_st + 1).
  added = {k: v for k, v in _flat(semantic).items() if k not in _flat(default)}
  assert added == {"params/embedding/semantic_pred/kernel": (1, 1, 16, 5),
                   "params/embedding/semantic_pred/bias": (5,)}
  assert all(_flat(semantic)[k] == v for k, v in _flat(default).items())
  assert out_semantic["semantic_logits"].shape == (1, 16, 24, 5)
  assert out_semantic["semantic_logits"].dtype == jnp.float32
  assert out_semantic["embedding"].shape == (1, 64, 96, 8)


def test_semantic_needs_the_stuff_count():
  with pytest.raises(ValueError, match=r"model.stuff_from"):
    ciae.build_model(dict(TINY, stuff_from="semantic"), 3)
  model = ciae.CIAE(hp=hparams.ModelHParams(**TINY, stuff_from="semantic"), num_thing_classes=3)
  with pytest.raises(ValueError, match=r"model.stuff_from"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 128, 128, 3)))


# ------------------------------------------------------------------------------------------------
# Loss.

NUM_STUFF = 2
# Rows: stuff 0, stuff 1, thing (class 3), crowd thing (class 2), an invalid row, padding.
SEG_CLASS = np.array([0, 1, 3, 2, 1, 0], np.int32)
SEG_IS_THING = np.array([False, False, True, True, False, False])
SEG_IS_CROWD = np.array([False, False, False, True, False, False])
SEG_VALID = np.array([True, True, True, True, False, False])


def _loss_case(seed: int = 0, hw=(16, 24)):
  """Random segment ids per pixel (void, every row kind) and logits at stride 4."""
  rng = np.random.default_rng(seed)
  segment_map = rng.integers(0, 6, hw).astype(np.int32)  # 0 void, rows 0..4 (padding unused)
  boxes = np.zeros((6, 4), np.float32)
  for row in range(6):
    ys, xs = np.nonzero(segment_map == row + 1)
    if ys.size:
      boxes[row] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
  segments = Segments(segment_map, SEG_CLASS, SEG_IS_THING, SEG_IS_CROWD, boxes, SEG_VALID)
  logits = rng.normal(0.0, 2.0, (hw[0] // 4, hw[1] // 4, NUM_STUFF + 1)).astype(np.float32)
  return segments, logits


def _reference(segments, logits):
  """The cross-entropy written out: labels at pixel (4i + 2, 4j + 2), log-softmax by hand."""
  total, count = 0.0, 0
  gradient = np.zeros(logits.shape, np.float64)
  for i in range(logits.shape[0]):
    for j in range(logits.shape[1]):
      seg = int(segments.segment_map[4 * i + 2, 4 * j + 2])
      if seg == 0 or not SEG_VALID[seg - 1]:
        continue
      label = NUM_STUFF if SEG_IS_THING[seg - 1] else int(SEG_CLASS[seg - 1])
      x = logits[i, j].astype(np.float64)
      log_softmax = x - x.max() - np.log(np.sum(np.exp(x - x.max())))
      total -= log_softmax[label]
      count += 1
      gradient[i, j] = np.exp(log_softmax) - np.eye(NUM_STUFF + 1)[label]
  return total, count, gradient


def test_semantic_loss_matches_numpy_reference():
  segments, logits = _loss_case()
  sums = jax.jit(functools.partial(semantic_losses.semantic_loss_sums, num_stuff=NUM_STUFF))(
      logits, segments)
  expected, count, _ = _reference(segments, logits)
  assert 10 < count < 24  # Void and the invalid row left out some of the 4 x 6 cells.
  assert float(sums["semantic_pixels"]) == count
  # float32 log-softmax of 3 logits |x| < ~8, summed over <= 24 cells, vs float64: < 1e-5.
  np.testing.assert_allclose(sums["loss_semantic_sum"], expected, rtol=1e-5)
  total = semantic_losses.semantic_total(sums, 0.5)
  np.testing.assert_allclose(total["loss_semantic"], 0.5 * expected / count, rtol=1e-5)
  # The labels of cell (i, j) come from pixel (4i + 2, 4j + 2), not from the cell's corner.
  label, labelled = semantic_losses.semantic_labels(segments, num_stuff=NUM_STUFF, stride=4)
  corner = segments.segment_map[::4, ::4]
  centre = segments.segment_map[2::4, 2::4]
  assert (corner != centre).any()
  np.testing.assert_array_equal(labelled, (centre > 0) & SEG_VALID[np.maximum(centre - 1, 0)])
  # A crowd thing pixel is "thing".
  assert (np.asarray(label)[centre == 4] == NUM_STUFF).all() and (centre == 4).any()


def test_semantic_loss_gradient_is_finite_and_exact():
  segments, logits = _loss_case(1)
  grad = jax.jit(jax.grad(lambda x: semantic_losses.semantic_loss_sums(
      x, segments, num_stuff=NUM_STUFF)["loss_semantic_sum"]))(logits)
  _, _, expected = _reference(segments, logits)
  assert np.isfinite(grad).all()
  # softmax - one-hot per labelled cell, 0 elsewhere; float32 softmax: < 1e-6 absolute.
  np.testing.assert_allclose(grad, expected, atol=1e-6)


def test_semantic_loss_rejects_bad_shapes():
  segments, logits = _loss_case()
  with pytest.raises(ValueError, match="num_stuff"):
    semantic_losses.semantic_loss_sums(logits, segments, num_stuff=3)
  with pytest.raises(ValueError, match="whole stride"):
    semantic_losses.semantic_loss_sums(logits[:3], segments, num_stuff=NUM_STUFF)


def test_ciae_without_stuff_pixels_is_ciae_with_stuff_void():
  segments, _ = _loss_case(2)
  rng = np.random.default_rng(3)
  prenorm = rng.normal(size=(16, 24, 8)).astype(np.float32)  # [H, W, D]
  memory = np.asarray(ops.l2_normalize(rng.normal(size=(NUM_STUFF + 1, 8))), np.float32)
  hp = hparams.LossHParams()
  without = ciae_losses.ciae_loss(None, prenorm, segments, memory, hp, num_stuff=NUM_STUFF,
                                  stuff_pixels=False)
  stuff_void = segments.replace(segment_map=np.where(
      SEG_IS_THING[np.maximum(segments.segment_map - 1, 0)], segments.segment_map, 0))
  reference = ciae_losses.ciae_loss(None, prenorm, stuff_void, memory, hp, num_stuff=NUM_STUFF)
  thing_pixels = np.isin(segments.segment_map, [3])  # valid, non-crowd thing rows only
  assert float(without["num_pixels"]) == thing_pixels.sum() > 0
  # The same kernel over the same weighted pixels (instance means use thing pixels only):
  # float32 sums in one order, equal to a few ulps; rtol 1e-6.
  for key, value in reference.items():
    np.testing.assert_allclose(without[key], value, rtol=1e-6, err_msg=key)
  default = ciae_losses.ciae_loss(None, prenorm, segments, memory, hp, num_stuff=NUM_STUFF)
  assert float(default["num_pixels"]) > float(without["num_pixels"])


# ------------------------------------------------------------------------------------------------
# Train step.


@pytest.mark.slow
def test_train_step_with_the_semantic_branch():
  model_hp = hparams.ModelHParams(**helpers.TINY_MODEL, stuff_from="semantic")
  model = ciae.build_model(model_hp, helpers.NUM_THINGS, helpers.NUM_STUFF)
  hp = helpers.STEP_HPARAMS.replace(model=model_hp,
                                    loss=helpers.STEP_HPARAMS.loss.replace(semantic_weight=0.5))
  params = helpers.numpy_params(model)
  optimizer, schedule = optim.create(helpers.OPTIMIZER, params, batch_size=1)
  memory = ops.l2_normalize(jnp.asarray(np.random.default_rng(1).normal(
      size=(helpers.NUM_STUFF + 1, helpers.TINY_MODEL["embed_dim"])), jnp.float32))  # [M, D]
  state = train_state_lib.create_train_state(params=params, optimizer=optimizer, memory=memory,
                                             rng=jax.random.PRNGKey(0))
  step_fn = step_lib.make_train_step(hp, model, optimizer, schedule, num_stuff=helpers.NUM_STUFF)
  devices = jax.devices()[:1]
  batch = helpers.make_batch(7, (1, 2))
  _, metrics = parallel.parallelize(step_fn, parallel="pmap", devices=devices)(
      parallel.replicate(state, parallel="pmap", devices=devices), batch)
  metrics = jax.device_get(parallel.first_copy(metrics, parallel="pmap"))
  assert metrics["finite"] and np.isfinite(metrics["loss_semantic"])
  assert metrics["loss_semantic"] > 0
  # Sums of 5 non-negative float32 terms in any order: rtol 1e-5 (test_train_step.py).
  np.testing.assert_allclose(metrics["loss"], sum(metrics[k] for k in (
      "loss_cls", "loss_reg", "loss_ctr", "loss_ciae", "loss_semantic")), rtol=1e-5)
  metrics_lib.train_metrics_type("semantic").single_from_model_output(**metrics)

  # Reference: the branch's cross-entropy and the thing-only CIAE loss of the same forward pass.
  @jax.jit
  def reference(images):
    outputs = model.apply({"params": params}, images["image"])
    segments = Segments.from_batch(images)
    per_image = [jax.tree.map(lambda x, i=i: x[i], segments) for i in range(2)]
    semantic = [semantic_losses.semantic_loss_sums(
        outputs["semantic_logits"][i], per_image[i], num_stuff=helpers.NUM_STUFF)
                for i in range(2)]
    thing_sums = [ciae_losses.ciae_loss(
        None, outputs["embedding_prenorm"][i], per_image[i], memory, hp.loss,
        num_stuff=helpers.NUM_STUFF, stuff_pixels=False) for i in range(2)]
    loss_semantic = 0.5 * sum(s["loss_semantic_sum"] for s in semantic) / sum(
        s["semantic_pixels"] for s in semantic)
    thing_ciae = ciae_losses.ciae_total(jax.tree.map(lambda *x: sum(x), *thing_sums))
    return loss_semantic, thing_ciae

  loss_semantic, thing_ciae = reference({k: jnp.asarray(v[0]) for k, v in batch.items()})
  # Two float32 programs, sums over 2 x 32 x 32 cells (2 x 128 x 128 pixels) in other orders:
  # rtol 1e-4 (test_train_step.py).
  np.testing.assert_allclose(metrics["loss_semantic"], loss_semantic, rtol=1e-4)
  np.testing.assert_allclose(metrics["loss_ciae"], thing_ciae["loss_ciae"], rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Inference, on test_inference.py's scene (32 x 32, image_size 28 x 30, instances A and B).


def _panoptic(outputs, memory, image_size, *, num_stuff, strides, resize_scale=1.0,
              stuff_from="embedding", **fields):
  """`panoptic_inference` with the keyword fields of `InferenceHParams` (as test_inference.py)."""
  return panoptic.panoptic_inference(outputs, memory, image_size,
                                      hparams.InferenceHParams(**fields), num_stuff=num_stuff,
                                      merge_things=True, strides=strides,
                                      resize_scale=resize_scale, stuff_from=stuff_from)


def _scene_semantic_logits() -> np.ndarray:
  """Cells (8 x 8, stride 4): stuff 1, rows 0-1 stuff 0, two "thing" blocks around A and B."""
  label = np.full((8, 8), 1)
  label[0:2] = 0
  label[0:3, 0:4] = NUM_STUFF  # pixels rows 0..11, columns 0..15 (around A)
  label[4:7, 4:7] = NUM_STUFF  # pixels rows 16..27, columns 16..27 (around B)
  return (3.0 * np.eye(NUM_STUFF + 1)[label]).astype(np.float32)  # [8, 8, 3]


def _semantic_scene(**fields):
  outputs = dict(scene.scene_outputs(), semantic_logits=_scene_semantic_logits())
  return scene.run_jitted(_panoptic, outputs, scene.scene_memory(), scene.IMAGE_SIZE,
                          stuff_from="semantic", **{**scene.PANOPTIC_DEFAULTS, **fields})


def _outside_image(expected):
  expected[28:, :] = 0
  expected[:, 30:] = 0
  return expected


def test_inference_stuff_from_semantic_things_from_instances():
  result = _semantic_scene()
  # Stuff from the semantic argmax (the embedding says stuff 0 nearly everywhere). In the
  # "thing" blocks, only instances compete: A (query 2) wins where its similarity is highest
  # and where all instances are at 0 outside their boxes (A comes first); B inside its box.
  expected = np.full((32, 32), 2)
  expected[0:8] = 1
  expected[0:12, 0:16] = 3
  expected[16:28, 16:28] = 3
  expected[18:26, 18:28] = 4
  np.testing.assert_array_equal(result["panoptic"], _outside_image(expected))
  np.testing.assert_array_equal(result["query_valid"], [True, True, True, True] + [False] * 3)
  np.testing.assert_array_equal(result["query_class"][:4], [0, 1, 3, 4])


@pytest.mark.parametrize("fields, instances", [
    # Outside-box similarity -inf: a "thing" pixel outside every usable box has no instance.
    (dict(outside_box_similarity=-np.inf), True),
    # No usable detection (all scores < 0.99): every "thing" pixel.
    (dict(instance_score_thresh=0.99), False),
])
def test_inference_thing_pixels_without_instance_are_void(fields, instances):
  result = _semantic_scene(**fields)
  expected = np.full((32, 32), 2)
  expected[0:8] = 1
  expected[0:12, 0:16] = 0
  expected[16:28, 16:28] = 0
  if instances:
    expected[2:10, 2:10] = 3  # inside A's box (2, 2, 10, 10)
    expected[18:26, 18:28] = 4  # inside B's box
  np.testing.assert_array_equal(result["panoptic"], _outside_image(expected))
  # Void pixels count in no segment's area.
  assert result["query_area"].sum() == (expected > 0).sum()


def test_default_inference_unchanged_and_ignores_semantic_logits():
  outputs = scene.scene_outputs()
  plain = scene.run_jitted(_panoptic, outputs, scene.scene_memory(), scene.IMAGE_SIZE,
                           **scene.PANOPTIC_DEFAULTS)
  with_logits = scene.run_jitted(
      _panoptic, dict(outputs, semantic_logits=_scene_semantic_logits()),
      scene.scene_memory(), scene.IMAGE_SIZE, stuff_from="embedding", **scene.PANOPTIC_DEFAULTS)
  np.testing.assert_array_equal(plain["panoptic"], scene.scene_expected())
  for key, value in plain.items():
    np.testing.assert_array_equal(with_logits[key], value, err_msg=key)


def test_inference_semantic_errors():
  outputs = scene.scene_outputs()
  with pytest.raises(ValueError, match="semantic_logits"):
    _panoptic(outputs, scene.scene_memory(), scene.IMAGE_SIZE, stuff_from="semantic",
                   **scene.PANOPTIC_DEFAULTS)
  with pytest.raises(ValueError, match="semantic_logits"):
    _panoptic(dict(outputs, semantic_logits=np.zeros((8, 8, 4), np.float32)),
                   scene.scene_memory(), scene.IMAGE_SIZE, stuff_from="semantic",
                   **scene.PANOPTIC_DEFAULTS)
  hp = hparams.HParams(model=hparams.ModelHParams(stuff_from="semantic"),
                       inference=hparams.InferenceHParams(oracle=True))
  with pytest.raises(ValueError, match="oracle"):
    predictor_lib.predict_fn(None, hp, NUM_STUFF)
