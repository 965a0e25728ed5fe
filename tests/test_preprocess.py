"""The TF-free host preprocessing (`inference.preprocess`) against the tf.data evaluation input.

The predictor, the demo and evaluation prepare images with NumPy; the training and the former
evaluation input prepare them with TensorFlow. Both must give the model the same input: the
bilinear resize equals `tf.image.resize`, and on a synthetic dataset whose images need a resize
(100 x 120 -> 107 x 128) the prepared image, its size and oracle mode's ground truth at the
input resolution equal the evaluation batches of `pipeline.build_input`.
"""
import numpy as np
import pytest
import tensorflow as tf

from ciae_jax import hparams
from ciae_jax.data import coco
from ciae_jax.data import dataset as dataset_lib
from ciae_jax.data import pipeline
from ciae_jax.data import synthetic
from ciae_jax.inference import preprocess
from ciae_jax.segments import SEGMENT_KEYS

# float32 both ways, one operation after the other; TF's kernel could contract a multiply-add
# (one rounding instead of two), so up to a few ulps of values below 3 are allowed.
RESIZE_ATOL = 1e-6


@pytest.mark.parametrize("sizes", [((100, 120), (107, 128)), ((480, 640), (800, 1067)),
                                   ((37, 53), (11, 90)), ((5, 7), (64, 3)),
                                   ((128, 128), (128, 128))])
def test_bilinear_resize_equals_tf_image_resize(sizes):
  (h0, w0), size = sizes
  rng = np.random.default_rng(h0 * w0)
  image = preprocess.normalize(rng.integers(0, 256, (h0, w0, 3), dtype=np.uint8))
  expected = tf.image.resize(image, size, method="bilinear").numpy()
  got = preprocess.bilinear_resize(image, size)
  assert got.dtype == np.float32 and got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=0, atol=RESIZE_ATOL)


def test_normalize_equals_the_tf_transform():
  from ciae_jax.data import transforms  # pylint: disable=g-import-not-at-top
  image = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
  np.testing.assert_array_equal(preprocess.normalize(image),
                                transforms.normalize_image(tf.constant(image)).numpy())


@pytest.fixture(scope="module")
def resized_dataset(tmp_path_factory):
  """Synthetic images of 100 x 120 that the 128 rule resizes to 107 x 128."""
  root = tmp_path_factory.mktemp("preprocess") / "synthetic"
  synthetic.generate_synthetic_dataset(root, num_train=2, num_val=4, image_size=(100, 120),
                                       seed=3)
  return hparams.DatasetHParams(
      source="coco", root=str(root), train_min_size_range=(128, 128), max_size=128,
      eval_min_size=128, eval_max_size=128, max_segments=6)  # Some images get truncated.


def test_prepared_images_and_oracle_segments_equal_the_tf_evaluation_input(resized_dataset):
  dataset = resized_dataset
  categories = dataset_lib.load_dataset_categories(dataset)
  records = coco.load_records(dataset.root, dataset.val_split, categories=categories)
  batches = pipeline.build_input(dataset, dataset.val_split, train=False,
                                 global_batch_size=8, seed=0)
  batch = {k: v.reshape(-1, *v.shape[2:]) for k, v in next(iter(batches)).items()}
  batches.close()
  preprocessor = preprocess.Preprocessor(dataset)
  truncated = 0
  for row, record in enumerate(records):
    assert batch["image_id"][row] == record.image_id
    example = coco.decode_example(record, categories)
    prepared = preprocessor(example["image"])
    assert prepared.canvas == batch["image"].shape[1:3] == (128, 128)
    assert prepared.image_size == tuple(batch["image_size"][row]) == (107, 128)
    assert prepared.orig_size == tuple(batch["orig_size"][row]) == (100, 120)
    np.testing.assert_allclose(prepared.image, batch["image"][row], rtol=0, atol=RESIZE_ATOL)
    segments = preprocess.segments_at_input(example, prepared, max_segments=6)
    for key in SEGMENT_KEYS:  # Nearest resize and integer boxes: exact.
      np.testing.assert_array_equal(segments[key], batch[key][row], err_msg=key)
    truncated += len(record.segments) > 6
  assert truncated, "no image exercised the truncation to max_segments"


def test_preprocessor_picks_the_canvas_and_shrinks_what_no_canvas_holds():
  dataset = hparams.DatasetHParams(eval_min_size=64, eval_max_size=128,
                                   canvas_sizes=((64, 128), (128, 64)))
  preprocessor = preprocess.Preprocessor(dataset)
  image = np.zeros((30, 60, 3), np.uint8)
  assert preprocessor.plan((30, 60)) == ((64, 128), (64, 128))
  assert preprocessor.plan((60, 30)) == ((128, 64), (128, 64))
  assert preprocessor.plan((50, 50)) == ((64, 128), (64, 64))
  prepared = preprocessor(image)
  assert prepared.image.shape == (64, 128, 3) and prepared.orig_size == (30, 60)
  with pytest.raises(ValueError, match="RGB uint8"):
    preprocess.load_rgb(np.zeros((4, 4, 3), np.float32))
  with pytest.raises(FileNotFoundError, match="nothing.jpg"):
    preprocess.load_rgb("nothing.jpg")
