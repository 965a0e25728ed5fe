"""`inference.predictor.Predictor`: images of any size, one program per canvas, COCO outputs."""
import jax
import numpy as np
from PIL import Image
import pytest

from ciae_jax import hparams
from ciae_jax.data import categories as categories_lib
from ciae_jax.inference import predictor as predictor_lib
from ciae_jax.models import ciae as ciae_model
from ciae_jax.training import train_state as train_state_lib

CATEGORIES = categories_lib.categories_from_list([
    {"id": 7, "name": "sky", "isthing": 0, "color": [10, 20, 200]},
    {"id": 9, "name": "grass", "isthing": 0, "color": [20, 200, 10]},
    {"id": 3, "name": "ball", "isthing": 1, "color": [200, 10, 10]},
    {"id": 5, "name": "box", "isthing": 1, "color": [200, 200, 10]}], source="test")


def _hp(**dataset):
  return hparams.HParams(
      model=hparams.ModelHParams(backbone="resnet_tiny", norm="gn", fpn_dim=16, head_convs=1,
                                 semantic_dim=16, embed_dim=8),
      dataset=hparams.DatasetHParams(train_min_size_range=(64, 64), max_size=128,
                                     eval_min_size=64, eval_max_size=128, **dataset),
      # An untrained detector scores ~0.01: let its detections take pixels.
      inference=hparams.InferenceHParams(pre_nms_thresh=0.0, instance_score_thresh=0.0,
                                         max_detections=6, pre_nms_top_n=30, stuff_area=0.0,
                                         instance_min_area=0.0, per_device_batch=2))


def _predictor(hp, **kwargs):
  model = ciae_model.build_model(hp.model, CATEGORIES.num_things, CATEGORIES.num_stuff)
  state, _, _ = train_state_lib.init_train_state(hp, model, num_stuff=2, num_things=2,
                                                 rng=jax.random.PRNGKey(0))
  return predictor_lib.Predictor(hp, model=model, variables={"params": state.params,
                                                             **state.model_state},
                                 memory=state.memory, categories=CATEGORIES, **kwargs)


@pytest.fixture(scope="module")
def predictor():
  return _predictor(_hp(), devices=jax.local_devices()[:2])


def _image(height, width, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_an_image_of_a_new_size_gives_a_map_at_its_size(predictor, tmp_path):
  image = _image(77, 201)  # No training image had this size (nor this aspect ratio).
  prediction = predictor(image)
  assert prediction.panoptic.shape == (77, 201) and prediction.panoptic.dtype == np.int32
  ids = set(np.unique(prediction.panoptic)) - {0}
  assert ids == {s["id"] for s in prediction.segments_info} and ids
  for segment in prediction.segments_info:
    assert set(segment) >= {"id", "category_id", "isthing", "area", "bbox", "score"}
    assert segment["area"] == int((prediction.panoptic == segment["id"]).sum())
    assert segment["isthing"] == (segment["category_id"] in (3, 5))
    if not segment["isthing"]:
      assert segment["score"] == 1.0
  assert any(s["isthing"] for s in prediction.segments_info)
  for detection in prediction.detections:
    x, y, w, h = detection["bbox"]
    assert 0 <= x <= x + w <= 201 + 1e-3 and 0 <= y <= y + h <= 77 + 1e-3
    assert detection["category_id"] in (3, 5) and 0 <= detection["score"] <= 1
  # A path gives the same as the array (PNG is lossless).
  Image.fromarray(image).save(tmp_path / "image.png")
  from_path = predictor(str(tmp_path / "image.png"))
  np.testing.assert_array_equal(from_path.panoptic, prediction.panoptic)
  assert from_path.segments_info == prediction.segments_info


def test_one_program_per_canvas_and_batches_equal_single_calls():
  # Two canvases: landscape images go to the first, portrait ones to the second.
  predictor = _predictor(_hp(canvas_sizes=((64, 128), (128, 64))),
                         devices=jax.local_devices()[:2])
  sizes = [(30, 60), (48, 100), (100, 40), (20, 50), (64, 64), (70, 20)]
  images = [_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
  batch = predictor.predict_batch(images, with_embedding=True)
  assert predictor.num_traces == 2
  for image, prediction in zip(images, batch):
    assert prediction.panoptic.shape == image.shape[:2]
    single = predictor(image)
    np.testing.assert_array_equal(single.panoptic, prediction.panoptic)
    assert single.segments_info == prediction.segments_info
    assert single.detections == prediction.detections
  assert predictor.num_traces == 2  # The single calls reused both programs.
  # Embeddings at the input resolution: (30, 60) -> (64, 128) in the first canvas.
  assert batch[0].embedding.shape == (64, 128, 8) and single.embedding is None


def test_shard_map_gives_the_same_prediction(predictor):
  image = _image(50, 90, seed=4)
  expected = predictor(image)
  sharded = _predictor(_hp().replace(parallel="shard_map"), devices=jax.local_devices()[:2])
  got = sharded(image)
  np.testing.assert_array_equal(got.panoptic, expected.panoptic)
  assert got.segments_info == expected.segments_info


def test_oracle_mode_needs_ground_truth():
  hp = _hp()
  hp = hp.replace(inference=hp.inference.replace(oracle=True))
  with pytest.raises(ValueError, match="ground truth"):
    _predictor(hp, devices=jax.local_devices()[:1])(_image(32, 32))


def test_a_program_cache_serves_a_second_predictor_without_tracing(predictor, tmp_path,
                                                                   monkeypatch):
  image = _image(40, 70, seed=5)
  expected = predictor(image)
  first = _predictor(_hp(), devices=jax.local_devices()[:2], program_cache=str(tmp_path))
  got = first(image)
  np.testing.assert_array_equal(got.panoptic, expected.panoptic)
  assert got.segments_info == expected.segments_info and list(tmp_path.iterdir())

  def no_tracing(*args, **kwargs):
    raise AssertionError("the model was traced again")

  # A new predictor (as in a new process) must take the stored program, not trace inference.
  monkeypatch.setattr(predictor_lib.panoptic, "panoptic_inference", no_tracing)
  second = _predictor(_hp(), devices=jax.local_devices()[:2], program_cache=str(tmp_path))
  again = second(image)
  np.testing.assert_array_equal(again.panoptic, expected.panoptic)
  assert again.segments_info == expected.segments_info
