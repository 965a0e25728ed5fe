"""Bad data in a real run: an error naming the file and image id, or skipped and reported.

A synthetic dataset (8 training, 8 validation images) is generated once; each test copies it
and breaks one image of each split: a corrupt JPEG, a truncated PNG, a JSON segment missing
from its PNG, an unknown category, an image with zero segments, one with more than
`max_segments` segments.

- `skip_bad_examples=False`: the training loop and `runner.evaluate` (real input pipeline)
  stop with a ValueError naming the file and the image id; images without segments are left
  out of training (listed with the skipped images), images with too many segments truncated
  (a warning names them); evaluation keeps both.
- `skip_bad_examples=True`: the image is never yielded, `skipped_examples` holds it with the
  reason, an evaluation pass logs it as having no prediction when it ends, and the training
  loop lists it at the end (log and `skipped_examples.json`), even when training fails.
"""
import json
import logging
import re
import shutil

import jax
import numpy as np
from PIL import Image
import pytest

from ciae_jax import hparams
from ciae_jax import panoptic_png
from ciae_jax.data import pipeline
from ciae_jax.data import synthetic
from ciae_jax.evaluation import runner
from ciae_jax.models import ciae as ciae_model
from ciae_jax.training import loop
from ciae_jax.training import train_state as train_state_lib
import test_reliability_helpers as rh

NUM_IMAGES = 8
MAX_SEGMENTS = 12
SPLITS = {"train2017": 1_000_003, "val2017": 2_000_003}  # split -> the broken image's id.


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("clean") / "synthetic"
  synthetic.generate_synthetic_dataset(root, num_train=NUM_IMAGES, num_val=NUM_IMAGES,
                                       image_size=(128, 128), seed=0)
  return root


def _paths(root, split):
  image_id = SPLITS[split]
  return (root / split / f"{image_id:012d}.jpg",
          root / "annotations" / f"panoptic_{split}" / f"{image_id:012d}.png",
          root / "annotations" / f"panoptic_{split}.json")


def _edit_segments(root, split, edit):
  json_path = _paths(root, split)[2]
  data = json.loads(json_path.read_text())
  annotation = next(a for a in data["annotations"] if a["image_id"] == SPLITS[split])
  edit(annotation["segments_info"])
  json_path.write_text(json.dumps(data))


def _corrupt_jpeg(root, split):
  image = _paths(root, split)[0]
  image.write_bytes(b"\xff\xd8 not a JPEG" * 40)
  return image.name, "corrupt or unreadable image"


def _truncated_png(root, split):
  png = _paths(root, split)[1]
  png.write_bytes(png.read_bytes()[:200])
  return png.name, "corrupt or unreadable panoptic PNG"


def _json_segment_missing_from_png(root, split):
  _edit_segments(root, split, lambda segments: segments.append(
      {"id": 7_777_777, "category_id": 3, "iscrowd": 0, "bbox": [0, 0, 4, 4], "area": 16}))
  return _paths(root, split)[1].name, "7777777.* in the JSON but not in the PNG"


def _unknown_category(root, split):
  def edit(segments):
    segments[0]["category_id"] = 4242
  _edit_segments(root, split, edit)
  return _paths(root, split)[2].name, "unknown category id 4242"


def _zero_segments(root, split):
  png = _paths(root, split)[1]
  Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(png)
  _edit_segments(root, split, lambda segments: segments.clear())
  return _paths(root, split)[0].name, "no segments"


def _too_many_segments(root, split):
  """Adds 4 x 4 disc segments until the image has MAX_SEGMENTS + 3."""
  png = _paths(root, split)[1]
  ids = panoptic_png.rgb_to_id_map(np.asarray(Image.open(png).convert("RGB")))  # [128, 128]

  def edit(segments):
    extra = MAX_SEGMENTS + 3 - len(segments)
    for k in range(extra):
      y, x = 4 * (k // 16), 4 * (k % 16)
      new_id = 9_000_000 + k
      ids[y:y + 4, x:x + 4] = new_id
      segments.append({"id": new_id, "category_id": 3, "iscrowd": 0, "bbox": [x, y, 4, 4],
                       "area": 16})
    for segment in segments:  # Areas and presence follow the new pixels.
      segment["area"] = int((ids == segment["id"]).sum())
    segments[:] = [s for s in segments if s["area"] > 0]
    assert len(segments) > MAX_SEGMENTS
  _edit_segments(root, split, edit)
  Image.fromarray(panoptic_png.id_map_to_rgb(ids)).save(png)
  return _paths(root, split)[0].name, f"more than dataset.max_segments={MAX_SEGMENTS}"


DEFECTS = {"corrupt_jpeg": _corrupt_jpeg, "truncated_png": _truncated_png,
           "json_segment_missing_from_png": _json_segment_missing_from_png,
           "unknown_category": _unknown_category}
KEPT_WITHOUT_SKIPPING = {"zero_segments": _zero_segments,
                         "too_many_segments": _too_many_segments}


def _broken(clean_root, tmp_path, defect):
  root = tmp_path / "data"
  shutil.copytree(clean_root, root)
  found = {split: defect(root, split) for split in SPLITS}
  return root, found


def _config(config, root, *, skip=False):
  """`config` (the `small_config` fixture: configs/synthetic.py:small) on `root`, shrunk."""
  config.dataset.source = "coco"
  config.dataset.root = str(root)
  config.dataset.max_segments = MAX_SEGMENTS
  config.dataset.skip_bad_examples = skip
  config.batch_size = NUM_IMAGES  # One batch holds every image.
  config.total_steps = rh.TOTAL_STEPS
  config.eval_every_steps = 0
  config.model.update(fpn_dim=16, semantic_dim=16, embed_dim=8)
  return hparams.HParams.from_config(config)


def _batches(config, split, *, train, num=None):
  iterator = pipeline.build_input(config.dataset, split, train=train,
                                  global_batch_size=config.batch_size, seed=config.seed)
  batches = []
  for batch in iterator:
    batches.append({k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()})
    if num is not None and len(batches) == num:
      break
  return batches, iterator


def _ids(batches):
  rows = np.concatenate([b["image_id"][b["example_valid"]] for b in batches])
  return rows.tolist()


def _evaluate(config):
  model = ciae_model.build_model(config.model, 5)
  state, _, _ = train_state_lib.init_train_state(config, model, num_stuff=4, num_things=5,
                                                 rng=jax.random.PRNGKey(0))
  return runner.evaluate(config, variables={"params": state.params, **state.model_state},
                         memory=state.memory)


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_bad_data_stops_training_and_evaluation_naming_file_and_image_id(
    clean_root, tmp_path, defect, small_config):
  root, found = _broken(clean_root, tmp_path, DEFECTS[defect])
  config = _config(small_config, root)
  with pytest.raises(ValueError) as info:
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  _assert_names(str(info.value), *found["train2017"], SPLITS["train2017"])
  assert not rh.checkpoint_steps(tmp_path / "run")
  with pytest.raises(ValueError) as info:
    _evaluate(config)
  _assert_names(str(info.value), *found["val2017"], SPLITS["val2017"])


def _assert_names(message, file_name, what, image_id):
  assert file_name in message, message
  assert f"image id {image_id}" in message, message
  assert re.search(what, message), message


@pytest.mark.parametrize("defect", sorted({**DEFECTS, **KEPT_WITHOUT_SKIPPING}))
def test_skip_bad_examples_leaves_out_and_reports_each(clean_root, tmp_path, caplog, defect,
                                                       small_config):
  root, found = _broken(clean_root, tmp_path, {**DEFECTS, **KEPT_WITHOUT_SKIPPING}[defect])
  config = _config(small_config, root, skip=True)
  caplog.set_level(logging.INFO)
  bad_train, bad_val = SPLITS["train2017"], SPLITS["val2017"]

  # Training: two epochs of the 7 good images, never the bad one; the order stays a function
  # of (seed, step): resuming at step 1 gives the second batch.
  batches, iterator = _batches(config, "train2017", train=True, num=2)
  ids = _ids(batches)
  assert bad_train not in ids and set(ids) == set(range(1_000_000, 1_000_008)) - {bad_train}
  resumed = pipeline.build_input(config.dataset, "train2017", train=True,
                                 global_batch_size=config.batch_size, seed=config.seed,
                                 start_step=1)
  np.testing.assert_array_equal(next(resumed)["image"].reshape(batches[1]["image"].shape),
                                batches[1]["image"])
  resumed.close()
  file_name, what = found["train2017"]
  [skipped] = iterator.skipped_examples
  iterator.close()
  assert skipped.image_id == bad_train and file_name in skipped.files + skipped.reason
  assert re.search(what, skipped.reason), skipped

  # Evaluation: every other image once; zero or too many segments are fine there.
  caplog.clear()
  batches, iterator = _batches(config, "val2017", train=False)
  ids = _ids(batches)
  if defect in KEPT_WITHOUT_SKIPPING:
    assert ids == list(range(2_000_000, 2_000_008)) and not iterator.skipped_examples
    return
  assert ids == [i for i in range(2_000_000, 2_000_008) if i != bad_val]
  file_name, what = found["val2017"]
  [skipped] = iterator.skipped_examples
  assert skipped.image_id == bad_val and re.search(what, skipped.reason)
  report = "\n".join(r.getMessage() for r in caplog.records)
  assert "val2017 (evaluation) ended: 1 images were left out (no prediction)" in report, report
  assert f"image id {bad_val} (" in report and file_name in report, report


def test_without_skipping_empty_images_are_listed_and_crowded_ones_named(
    clean_root, tmp_path, caplog, small_config):
  caplog.set_level(logging.INFO)
  root = tmp_path / "data"
  shutil.copytree(clean_root, root)
  _zero_segments(root, "train2017")
  _too_many_segments(root, "val2017")
  config = _config(small_config, root)
  batches, iterator = _batches(config, "train2017", train=True, num=2)
  assert SPLITS["train2017"] not in _ids(batches)
  [skipped] = iterator.skipped_examples
  iterator.close()
  assert (skipped.image_id, skipped.reason) == (SPLITS["train2017"], "no segments")

  caplog.clear()
  batches, iterator = _batches(config, "val2017", train=False)
  assert _ids(batches) == list(range(2_000_000, 2_000_008))  # Truncated, still evaluated.
  row = _ids(batches).index(SPLITS["val2017"])
  assert batches[0]["seg_valid"][row].sum() == MAX_SEGMENTS
  report = "\n".join(r.getMessage() for r in caplog.records)
  assert (f"1 images have more than max_segments={MAX_SEGMENTS} segments; the smallest are "
          f"dropped (void), e.g. image ids [{SPLITS['val2017']}]") in report, report


class _StopAfterBuilding(Exception):
  pass


def test_training_lists_skipped_images_at_the_end(clean_root, tmp_path, caplog, small_config):
  root, _ = _broken(clean_root, tmp_path, _corrupt_jpeg)
  config = _config(small_config, root, skip=True)
  caplog.set_level(logging.WARNING)

  def input_fn(dataset_cfg, split, **kwargs):
    batches = pipeline.build_input(dataset_cfg, split, **kwargs)

    class Failing:
      skipped_examples = batches.skipped_examples

      def __next__(self):
        raise _StopAfterBuilding()

      def close(self):
        batches.close()
    return Failing()

  workdir = tmp_path / "run"
  with pytest.raises(_StopAfterBuilding):
    loop.train_and_evaluate(config, str(workdir), input_fn=input_fn)
  report = json.loads((workdir / loop.SKIPPED_EXAMPLES_FILE).read_text())
  assert [r["image_id"] for r in report] == [SPLITS["train2017"]]
  assert "corrupt or unreadable image" in report[0]["reason"]
  assert f"{SPLITS['train2017']:012d}.jpg" in report[0]["files"]
  messages = [r.getMessage() for r in caplog.records]
  assert any(m.startswith("The training input left out 1 images") for m in messages)
  assert any(f"skipped image id {SPLITS['train2017']} (" in m for m in messages), messages


def test_tfds_source_cannot_skip(tmp_path, small_config):
  config = _config(small_config, tmp_path)
  config = config.replace(dataset=config.dataset.replace(source="tfds", skip_bad_examples=True))
  with pytest.raises(ValueError, match="skip_bad_examples=True needs source 'coco' or "
                     "'synthetic'"):
    pipeline.build_input(config.dataset, "train2017", train=True, global_batch_size=8, seed=0)
