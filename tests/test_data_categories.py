"""Categories: contiguous order, the way back to COCO ids, clear errors."""
import json

import numpy as np
import pytest

from ciae_jax import hparams
from ciae_jax.data import categories as categories_lib


def _raw_categories(coco_sample_root):
  with open(coco_sample_root / "annotations" / "panoptic_val2017.json") as f:
    return json.load(f)["categories"]


def test_contiguous_order_from_panoptic_json(coco_sample_root):
  raw = _raw_categories(coco_sample_root)
  cats = categories_lib.load_categories(
      coco_sample_root / "annotations" / "panoptic_val2017.json")
  # Independent reference: stuff ids ascending, then thing ids ascending.
  stuff = sorted(c["id"] for c in raw if not c["isthing"])
  things = sorted(c["id"] for c in raw if c["isthing"])
  assert cats.coco_ids == tuple(stuff + things)
  assert (cats.num_stuff, cats.num_things, cats.num_classes) == (53, 80, 133)
  by_id = {c["id"]: c for c in raw}
  for c, coco_id in enumerate(cats.coco_ids):
    assert cats.names[c] == by_id[coco_id]["name"]
    assert cats.isthing[c] == bool(by_id[coco_id]["isthing"])
    assert cats.colors[c] == tuple(by_id[coco_id]["color"])
    assert cats.contiguous_index(coco_id) == c
    assert cats.coco_id(c) == coco_id
  # Thing class j of the detector is contiguous class num_stuff + j.
  assert cats.coco_ids[cats.num_stuff] == things[0]
  assert cats.thing_class(cats.contiguous_index(things[5])) == 5
  assert cats.coco_id(cats.num_stuff + 5) == things[5]


def test_bare_list_file_equals_panoptic_json(coco_sample_root, tmp_path):
  path = tmp_path / "cats.json"
  path.write_text(json.dumps(_raw_categories(coco_sample_root)[::-1]))
  from_list = categories_lib.load_categories(path)
  from_json = categories_lib.load_categories(
      coco_sample_root / "panoptic_coco_categories.json")
  assert from_list == from_json


def test_vectorised_maps(coco_sample_root):
  cats = categories_lib.load_categories(
      coco_sample_root / "panoptic_coco_categories.json")
  ids = np.array([[1, 200], [92, 44]])
  contiguous = cats.contiguous_indices(ids)
  assert contiguous.shape == (2, 2) and contiguous.dtype == np.int32
  np.testing.assert_array_equal(cats.coco_ids_of(contiguous), ids)


def test_unknown_id_is_a_key_error_naming_it(coco_sample_root):
  cats = categories_lib.load_categories(
      coco_sample_root / "panoptic_coco_categories.json")
  with pytest.raises(KeyError, match="12345"):
    cats.contiguous_index(12345)
  with pytest.raises(IndexError):
    cats.coco_id(133)


def test_json_without_categories_names_the_file(tmp_path):
  path = tmp_path / "panoptic_x.json"
  path.write_text(json.dumps({"images": [], "annotations": []}))
  with pytest.raises(ValueError, match="panoptic_x.json.*categories"):
    categories_lib.load_categories(path)


def test_bad_category_entries(tmp_path):
  path = tmp_path / "cats.json"
  path.write_text(json.dumps([{"id": 1, "isthing": 1}, {"id": 1, "isthing": 0}]))
  with pytest.raises(ValueError, match="duplicate category id 1"):
    categories_lib.load_categories(path)
  path.write_text(json.dumps([{"id": 1}]))
  with pytest.raises(ValueError, match="isthing"):
    categories_lib.load_categories(path)


def test_dataset_without_thing_categories_is_an_error_naming_the_file(coco_sample_root, tmp_path):
  """A stuff-only dataset: a clear error before any model is built (CIAE needs things)."""
  from ciae_jax.data import dataset  # pylint: disable=g-import-not-at-top
  data = json.loads((coco_sample_root / "annotations" / "panoptic_val2017.json").read_text())
  for category in data["categories"]:
    category["isthing"] = 0
  path = tmp_path / "stuff_only.json"
  path.write_text(json.dumps(data))
  cfg = hparams.DatasetHParams(source="coco", root=str(coco_sample_root),
                               categories_file=str(path))
  with pytest.raises(ValueError, match=f"{path}: no thing category \\(isthing=1\\) among its "
                     "133 categories"):
    dataset.load_dataset_categories(cfg)
  cfg = cfg.replace(categories_file="")  # The sample itself has things: read from its JSON.
  assert dataset.load_dataset_categories(cfg).num_things == 80
