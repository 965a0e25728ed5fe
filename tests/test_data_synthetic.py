"""Synthetic dataset: valid COCO panoptic, deterministic, idempotent, learnable."""
import json
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from ciae_jax import hparams
from ciae_jax.data import categories as categories_lib
from ciae_jax.data import coco
from ciae_jax.data import dataset
from ciae_jax.data import pipeline
from ciae_jax.data import synthetic

PARAMS = dict(num_train=24, num_val=6, image_size=(64, 80), seed=0)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  out = tmp_path_factory.mktemp("synthetic") / "data"
  synthetic.generate_synthetic_dataset(out, **PARAMS)
  return out


def test_ground_truth_against_itself_gives_pq_100(root, tmp_path):
  # pq_compute forks worker processes: run it in a fresh interpreter, away
  # from the threads JAX and TF started in this one.
  script = (
      "import json, sys\n"
      "from panopticapi.evaluation import pq_compute\n"
      "r = pq_compute(sys.argv[1], sys.argv[1], sys.argv[2], sys.argv[2])\n"
      "print(json.dumps({g: r[g]['pq'] for g in ('All', 'Things', 'Stuff')}))\n")
  for split in synthetic.SPLITS:
    gt = coco.ground_truth(root, split)
    result = subprocess.run([sys.executable, "-c", script, gt.gt_json,
                             gt.gt_folder], capture_output=True, text=True,
                            cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    pq = json.loads(result.stdout.strip().splitlines()[-1])
    # Every segment matched with IoU 1: PQ 1 up to float64 rounding (approx: 1e-6).
    assert pq == pytest.approx({"All": 1.0, "Things": 1.0, "Stuff": 1.0}), split


def test_layout_json_and_pixels_agree(root):
  cats = categories_lib.load_categories(
      root / "annotations" / "panoptic_train2017.json")
  data = json.loads((root / "annotations" /
                     "panoptic_train2017.json").read_text())
  assert {"images", "annotations", "categories"} <= set(data)
  records = coco.load_records(root, "train2017")
  assert len(records) == PARAMS["num_train"]
  assert len(coco.load_records(root, "val2017")) == PARAMS["num_val"]
  for record in records:
    assert record.image_path.endswith(".jpg")
    assert (record.height, record.width) == PARAMS["image_size"]
    ex = coco.decode_example(record, cats)  # Validates PNG <-> JSON.
    for row, seg in enumerate(record.segments):
      ys, xs = np.nonzero(ex["segment_map"] == row + 1)
      assert ys.size == seg.area
      x, y, w, h = seg.bbox
      assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (
          x, y, x + w, y + h)
    stuff_classes = [s.category_id for s in record.segments
                     if not cats.isthing[cats.contiguous_index(s.category_id)]]
    assert len(stuff_classes) == len(set(stuff_classes))  # One per class.


def test_content_is_varied_and_non_contiguous(root):
  data = json.loads((root / "annotations" /
                     "panoptic_train2017.json").read_text())
  cats = data["categories"]
  thing_ids = sorted(c["id"] for c in cats if c["isthing"])
  stuff_ids = sorted(c["id"] for c in cats if not c["isthing"])
  assert len(thing_ids) >= 4 and len(stuff_ids) >= 3
  assert thing_ids != list(range(thing_ids[0], thing_ids[0] + len(thing_ids)))
  assert all("color" in c for c in cats)
  segments = [s for a in data["annotations"] for s in a["segments_info"]]
  assert any(s["iscrowd"] for s in segments)
  things = [s for s in segments if s["category_id"] in thing_ids]
  sides = [max(s["bbox"][2:]) for s in things]
  assert min(sides) <= 16 and max(sides) >= 40  # Several FCOS levels.
  assert {s["category_id"] for s in things} == set(thing_ids)
  void = 0
  for ann in data["annotations"]:
    png = np.asarray(Image.open(root / "annotations" / "panoptic_train2017" /
                                ann["file_name"]))
    void += int((png.sum(-1) == 0).sum())
  assert void > 0


def test_classes_differ_in_local_appearance(root):
  """Learnability: the mean colour of each class is far from the others."""
  cats = categories_lib.load_categories(
      root / "annotations" / "panoptic_train2017.json")
  sums = np.zeros((cats.num_classes, 3))
  counts = np.zeros(cats.num_classes)
  for record in coco.load_records(root, "train2017"):
    ex = coco.decode_example(record, cats)
    for row, c in enumerate(ex["seg_class"]):
      pixels = ex["image"][ex["segment_map"] == row + 1].astype(np.float64)
      sums[c] += pixels.sum(0)
      counts[c] += len(pixels)
  means = sums / counts[:, None]
  dist = np.linalg.norm(means[:, None] - means[None], axis=-1)
  assert dist[~np.eye(cats.num_classes, dtype=bool)].min() > 40


def test_deterministic_and_idempotent(root, tmp_path):
  other = tmp_path / "again"
  synthetic.generate_synthetic_dataset(other, **PARAMS)
  for path in sorted(root.rglob("*")):
    if path.is_file():
      assert path.read_bytes() == (other / path.relative_to(root)).read_bytes()
  manifest = other / synthetic.MANIFEST
  stamp = manifest.stat().st_mtime_ns
  some_png = next((other / "annotations" / "panoptic_val2017").iterdir())
  png_stamp = some_png.stat().st_mtime_ns
  synthetic.generate_synthetic_dataset(other, **PARAMS)  # Nothing rewritten.
  assert manifest.stat().st_mtime_ns == stamp
  assert some_png.stat().st_mtime_ns == png_stamp
  with pytest.raises(ValueError, match="other parameters"):
    synthetic.generate_synthetic_dataset(other, **dict(PARAMS, seed=1))
  third = tmp_path / "seed1"
  synthetic.generate_synthetic_dataset(third, **dict(PARAMS, seed=1))
  assert ((third / "annotations" / "panoptic_val2017.json").read_bytes() !=
          (root / "annotations" / "panoptic_val2017.json").read_bytes())


def test_command_line(tmp_path, capsys):
  synthetic.main(["--root", str(tmp_path / "cli"), "--num_train", "2",
                  "--num_val", "1", "--height", "48", "--width", "48"])
  assert "synthetic panoptic dataset at" in capsys.readouterr().out
  assert len(coco.load_records(tmp_path / "cli", "val2017")) == 1


def test_synthetic_source_through_the_pipeline(tmp_path):
  cfg = hparams.DatasetHParams(
      source="synthetic", root=str(tmp_path / "syn"),
      synthetic=hparams.SyntheticHParams(num_train=8, num_val=3, image_size=(96, 96)),
      canvas_sizes=((128, 128),), train_min_size_range=(96, 128), max_size=128, eval_min_size=128,
      eval_max_size=128, max_segments=16)
  batch = next(pipeline.build_input(cfg, cfg.train_split, train=True,
                                    global_batch_size=8, seed=0))
  assert batch["image"].shape == (8, 1, 128, 128, 3)
  assert batch["seg_valid"].any(-1).all()
  evals = list(pipeline.build_input(cfg, cfg.val_split, train=False,
                                    global_batch_size=8, seed=0))
  valid = evals[0]["example_valid"].ravel()
  assert valid.sum() == 3
  assert (evals[0]["image_size"].reshape(-1, 2)[valid] == 128).all()
  gt = dataset.eval_ground_truth(cfg)
  assert gt.gt_json.endswith("panoptic_val2017.json")
  assert gt.categories.num_things == len(synthetic.THINGS)


def test_synthetic_source_reads_an_existing_coco_root_as_it_is(coco_sample_root, tmp_path):
  """`--config.dataset.root=PATH` on the synthetic config: real data is read, never replaced."""
  import shutil  # pylint: disable=g-import-not-at-top
  real = tmp_path / "real"
  shutil.copytree(coco_sample_root, real)
  before = sorted(p.relative_to(real) for p in real.rglob("*"))
  cfg = hparams.DatasetHParams(source="synthetic", root=str(real))
  assert dataset.prepare_root(cfg) == str(real)
  assert sorted(p.relative_to(real) for p in real.rglob("*")) == before
  assert not [p for p in tmp_path.iterdir() if "partial" in p.name]  # No staging written.
  categories = dataset.load_dataset_categories(cfg)
  assert categories.num_stuff + categories.num_things == 133
  with pytest.raises(ValueError, match="not synthetic; not generating into it"):
    synthetic.generate_synthetic_dataset(real, num_train=1, num_val=1, image_size=(32, 32),
                                         seed=0)
  assert sorted(p.relative_to(real) for p in real.rglob("*")) == before
  assert not [p for p in tmp_path.iterdir() if "partial" in p.name]  # No staging written.
