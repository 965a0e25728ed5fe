"""Source 'tfds' (coco/2017_panoptic) with tfds.testing.mock_data.

The random default mock only checks the features the source reads; a mock
built from the real COCO sample (encoded exactly as the TFDS builder stores
it) must go through the same transforms as the COCO-file source and give the
same batches.
"""
import json
import tempfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from ciae_jax import hparams
from ciae_jax.data import canvas
from ciae_jax.data import categories as categories_lib
from ciae_jax.data import pipeline
from ciae_jax.data import schedule
from ciae_jax.data import tfds_source


@pytest.fixture(autouse=True)
def _tfds_temp_dirs_in_tmp_path(tmp_path, monkeypatch):
  # TFDS leaves an empty mkdtemp() folder per builder without local data.
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def _config(coco_sample_root, source):
  return hparams.DatasetHParams(
      source=source, root=str(coco_sample_root), tfds_data_dir="/tmp/ciae_jax_no_tfds_data",
      categories_file=str(coco_sample_root / "panoptic_coco_categories.json"),
      train_split="val2017", val_split="val2017", canvas_sizes=((256, 384),),
      train_min_size_range=(160, 224), max_size=384, eval_min_size=192, eval_max_size=320,
      shuffle_buffer=4)


def _sample_examples(root):
  """The sample as the TFDS builder would store it (coco.py generator)."""
  data = json.loads((root / "annotations" / "panoptic_val2017.json").read_text())
  label = {c["id"]: i for i, c in enumerate(data["categories"])}
  anns = {a["image_id"]: a for a in data["annotations"]}
  examples = []
  for im in sorted(data["images"], key=lambda im: im["id"]):
    ann = anns[im["id"]]
    segs = ann["segments_info"]
    h, w = im["height"], im["width"]
    examples.append({
        "image": (root / "val2017" / im["file_name"]).read_bytes(),
        "image/filename": im["file_name"],
        "image/id": np.int64(im["id"]),
        "panoptic_image": (root / "annotations" / "panoptic_val2017" /
                           ann["file_name"]).read_bytes(),
        "panoptic_image/filename": ann["file_name"],
        "panoptic_objects": {
            "id": np.array([s["id"] for s in segs], np.int64),
            "area": np.array([s["area"] for s in segs], np.int64),
            "bbox": np.array([[y / h, x / w, (y + bh) / h, (x + bw) / w]
                              for x, y, bw, bh in (s["bbox"] for s in segs)],
                             np.float32).reshape(-1, 4),
            "label": np.array([label[s["category_id"]] for s in segs],
                              np.int64),
            "is_crowd": np.array([bool(s["iscrowd"]) for s in segs], bool),
        },
    })
  return examples


def _as_dataset_fn(examples):
  scalar = lambda dtype: tf.TensorSpec([], dtype)
  vector = lambda dtype: tf.TensorSpec([None], dtype)
  signature = {
      "image": scalar(tf.string), "image/filename": scalar(tf.string),
      "image/id": scalar(tf.int64), "panoptic_image": scalar(tf.string),
      "panoptic_image/filename": scalar(tf.string),
      "panoptic_objects": {
          "id": vector(tf.int64), "area": vector(tf.int64),
          "bbox": tf.TensorSpec([None, 4], tf.float32),
          "label": vector(tf.int64), "is_crowd": vector(tf.bool)},
  }

  def as_dataset(self, split, decoders=None, read_config=None,
                 shuffle_files=False):
    del self, split, read_config, shuffle_files
    ds = tf.data.Dataset.from_generator(lambda: iter(examples),
                                        output_signature=signature)
    ds = ds.apply(tf.data.experimental.assert_cardinality(len(examples)))
    decoders = decoders or {}
    def decode(ex):  # What TFDS does for features without SkipDecoding.
      for key in ("image", "panoptic_image"):
        if not isinstance(decoders.get(key), tfds.decode.SkipDecoding):
          ex[key] = tf.io.decode_image(ex[key], channels=3,
                                       expand_animations=False)
      return ex
    return ds.map(decode)

  return as_dataset


def test_builder_features_the_source_reads(coco_sample_root):
  cfg = _config(coco_sample_root, "tfds")
  cats = categories_lib.load_categories(cfg.categories_file)
  with tfds.testing.mock_data(num_examples=2):
    source = tfds_source.TfdsSource(cfg, "val2017", cats, train=False)
    spec = source.base().element_spec
  assert source.split == "validation"
  assert spec["image"].dtype == tf.string  # Left encoded (SkipDecoding).
  assert spec["panoptic_image"].dtype == tf.string
  assert spec["image/id"].dtype == tf.int64
  assert spec["image/filename"].dtype == tf.string
  objects = spec["panoptic_objects"]
  assert {k: (v.dtype, v.shape.as_list()) for k, v in objects.items()} == {
      "id": (tf.int64, [None]), "area": (tf.int64, [None]),
      "bbox": (tf.float32, [None, 4]), "label": (tf.int64, [None]),
      "is_crowd": (tf.bool, [None])}
  # Labels index the categories file in file order (COCO: by id).
  raw = categories_lib.read_category_list(cfg.categories_file)
  table = source.label_to_class
  assert len(table) == 133
  for label in (0, 5, 80, 132):
    assert cats.coco_id(table[label]) == raw[label]["id"]


@pytest.mark.parametrize("max_segments", [100, 10])  # 10: truncation too.
def test_tfds_batches_equal_coco_file_batches(coco_sample_root, max_segments):
  examples = _sample_examples(coco_sample_root)
  tfds_cfg = _config(coco_sample_root, "tfds")
  coco_cfg = _config(coco_sample_root, "coco")
  tfds_cfg = tfds_cfg.replace(max_segments=max_segments)
  coco_cfg = coco_cfg.replace(max_segments=max_segments)
  with tfds.testing.mock_data(as_dataset_fn=_as_dataset_fn(examples)):
    tfds_eval = list(pipeline.build_input(tfds_cfg, "val2017", train=False,
                                          global_batch_size=8, seed=0))
  coco_eval = list(pipeline.build_input(coco_cfg, "val2017", train=False,
                                        global_batch_size=8, seed=0))
  assert len(tfds_eval) == len(coco_eval) == 1
  for key, value in coco_eval[0].items():
    np.testing.assert_array_equal(tfds_eval[0][key], value, err_msg=key)
  assert coco_eval[0]["example_valid"].sum() == 2
  assert coco_eval[0]["seg_valid"].sum() <= 2 * max_segments


def test_tfds_batches_are_on_the_union_canvas(coco_sample_root):
  """Sizes are known only after decoding: TFDS batches are not bucketed (a documented limit);
  they hold the coco source's examples, padded further to the union of the canvases."""
  examples = _sample_examples(coco_sample_root)
  canvases = ((256, 384), (384, 256))
  tfds_cfg = _config(coco_sample_root, "tfds").replace(canvas_sizes=canvases)
  coco_cfg = _config(coco_sample_root, "coco").replace(canvas_sizes=canvases)
  with tfds.testing.mock_data(as_dataset_fn=_as_dataset_fn(examples)):
    tfds_eval = list(pipeline.build_input(tfds_cfg, "val2017", train=False,
                                          global_batch_size=8, seed=0))
    tfds_train = next(pipeline.build_input(tfds_cfg, "val2017", train=True,
                                           global_batch_size=8, seed=0))
  coco_eval = list(pipeline.build_input(coco_cfg, "val2017", train=False,
                                        global_batch_size=8, seed=0))
  assert tfds_eval[0]["image"].shape[2:4] == tfds_train["image"].shape[2:4] == (384, 384)
  assert coco_eval[0]["image"].shape[2:4] == (256, 384)  # Both sample images: landscape.
  # The host decided the shorter side and the flip of each position; the size followed in the
  # graph by the same rule (`canvas.place`).
  shorts, _ = schedule.augmentation(0, 0, 8, tfds_cfg.train_min_size_range, tfds_cfg.flip)
  for orig, short, size in zip(tfds_train["orig_size"].reshape(-1, 2), shorts,
                               tfds_train["image_size"].reshape(-1, 2)):
    assert canvas.place(*orig, min_size=short, max_size=tfds_cfg.max_size,
                        options=((384, 384),)) == (0, tuple(size))
  for key, value in coco_eval[0].items():
    got = tfds_eval[0][key]
    if key in ("image", "segment_map"):
      assert not got[:, :, 256:].any(), key
      got = got[:, :, :256]
    np.testing.assert_array_equal(got, value, err_msg=key)


def test_tfds_training_is_deterministic_and_resumable(coco_sample_root):
  # 8 copies of the sample (ids 1..8): a shuffle order is then telling.
  examples = [dict(ex, **{"image/id": np.int64(i + 1)}) for i, ex in
              enumerate(_sample_examples(coco_sample_root) * 4)]
  cfg = _config(coco_sample_root, "tfds")

  def run(start_step, num):
    with tfds.testing.mock_data(as_dataset_fn=_as_dataset_fn(examples)):
      it = pipeline.build_input(cfg, "val2017", train=True,
                                global_batch_size=8, seed=3,
                                start_step=start_step)
      return [next(it) for _ in range(num)]

  full = run(0, 3)
  assert full[0]["image"].shape == (8, 1, 256, 384, 3)
  for batch in full:  # One epoch per batch: every example once, shuffled.
    assert sorted(batch["image_id"].ravel()) == list(range(1, 9))
  orders = [tuple(b["image_id"].ravel()) for b in full]
  assert len(set(orders)) == 3 and orders[0] != tuple(range(1, 9))
  resumed = run(2, 1)[0]
  for key, value in full[2].items():
    np.testing.assert_array_equal(resumed[key], value, err_msg=key)
  tf.random.set_seed(1234)  # A global TF seed must not change the stream.
  try:
    again = run(0, 1)[0]
  finally:
    tf.random.set_seed(None)
  for key, value in full[0].items():
    np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_label_names_must_match_categories_file(coco_sample_root):
  raw = categories_lib.read_category_list(
      coco_sample_root / "panoptic_coco_categories.json")
  cats = categories_lib.categories_from_list(raw)
  names = [c["name"] for c in raw]
  table = tfds_source.label_to_class_table(raw, cats, names)
  assert cats.coco_id(table[0]) == raw[0]["id"]
  with pytest.raises(ValueError, match="categories_file"):
    tfds_source.label_to_class_table(raw, cats, names[::-1])


def test_split_names():
  assert tfds_source.tfds_split_name("train2017") == "train"
  assert tfds_source.tfds_split_name("val2017") == "validation"
  assert tfds_source.tfds_split_name("validation[:10]") == "validation[:10]"
