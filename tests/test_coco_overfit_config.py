"""configs/coco_sample_overfit.py: it loads, locks, reads the COCO sample's path, fits it, runs.

The config is checked against the sample's own annotation file (read here with `json`): every
segment fits in `max_segments`, no ground-truth instance or stuff region is smaller than the
inference area filters, both images fit the padded canvas. Then two training steps of a shrunk
copy (tiny model, 128 x 128 canvas, same data and splits) run through the real loop, the final
in-memory evaluation runs, and `evaluate_checkpoint` writes the COCO-format files whose
PQ panopticapi's `pq_compute` must reproduce.
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
from unittest import mock

import jax
import ml_collections
import pytest

from ciae_jax.data import canvas

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_PATH = REPO_ROOT / "configs" / "coco_sample_overfit.py"
TOTAL_STEPS = 2


def _get_config(root: pathlib.Path | None = None, arg=None) -> ml_collections.ConfigDict:
  """The config as loaded with CIAE_COCO_SAMPLE=root (unset when root is None)."""
  spec = importlib.util.spec_from_file_location("coco_sample_overfit", CONFIG_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  env = {k: v for k, v in os.environ.items() if k != module.SAMPLE_ENV}
  if root is not None:
    env[module.SAMPLE_ENV] = str(root)
  with mock.patch.dict(os.environ, env, clear=True):
    return module.get_config(arg)


def _annotations(coco_sample_root):
  with open(coco_sample_root / "annotations" / "panoptic_val2017.json") as f:
    return json.load(f)


def test_config_loads_locks_and_points_at_the_sample(coco_sample_root):
  config = _get_config(coco_sample_root)
  config.lock()
  with pytest.raises(AttributeError):
    config.dataset.not_a_field = 1  # Locked: a typo in an override is an error.
  config.optimizer.lr = 0.5  # Existing fields stay overridable.
  dataset = config.dataset
  assert dataset.source == "coco"
  assert dataset.train_split == dataset.val_split == "val2017"
  assert os.path.samefile(dataset.root, coco_sample_root)
  assert not dataset.categories_file  # All 133 categories of the sample's JSON.
  with pytest.raises(ValueError, match="unknown config variant"):
    _get_config(coco_sample_root, "fast")


def test_without_the_sample_path_training_says_which_flag_to_pass():
  """No CIAE_COCO_SAMPLE and no override: a clear error before any file is read."""
  from ciae_jax import hparams  # pylint: disable=g-import-not-at-top
  from ciae_jax.data import dataset  # pylint: disable=g-import-not-at-top
  config = _get_config(None)
  assert config.dataset.root == ""
  cfg = hparams.HParams.from_config(config).dataset
  for check in (dataset.check_config, dataset.prepare_root):
    with pytest.raises(ValueError, match=r"dataset.root is required .*--config.dataset.root="):
      check(cfg)


def test_config_fits_the_sample_annotations(coco_sample_root):
  config = _get_config(coco_sample_root)
  data = _annotations(coco_sample_root)
  assert len(data["categories"]) == 133
  isthing = {c["id"]: c["isthing"] for c in data["categories"]}
  images = {i["id"]: i for i in data["images"]}
  assert len(data["annotations"]) == 2
  (height, width), = config.dataset.canvas_sizes
  assert height % 128 == 0 and width % 128 == 0
  for annotation in data["annotations"]:
    segments = annotation["segments_info"]
    # No segment is dropped to void by the max_segments truncation.
    assert len(segments) <= config.dataset.max_segments
    # The inference area filters (original pixels) keep every ground-truth segment.
    for segment in segments:
      if isthing[segment["category_id"]] and not segment["iscrowd"]:
        assert segment["area"] >= config.inference.instance_min_area, segment
      elif not isthing[segment["category_id"]]:
        assert segment["area"] >= config.inference.stuff_area, segment
    image = images[annotation["image_id"]]
    for min_size, max_size in ((config.dataset.train_min_size_range[1], config.dataset.max_size),
                               (config.dataset.eval_min_size, config.dataset.eval_max_size)):
      _, (new_h, new_w) = canvas.place(image["height"], image["width"], min_size=min_size,
                                       max_size=max_size, options=((height, width),))
      # Reduced resolution, but most of it: at least 0.8 x the original side.
      assert new_h >= 0.8 * image["height"] and new_w >= 0.8 * image["width"], (new_h, new_w)


def _tiny_config(root: pathlib.Path) -> ml_collections.ConfigDict:
  """The overfit config shrunk to seconds; data, splits and categories unchanged."""
  config = _get_config(root)
  config.lock()
  config.total_steps = TOTAL_STEPS
  config.batch_size = jax.device_count()  # tests/conftest.py: 8 fake CPU devices.
  config.log_every_steps = 1
  config.checkpoint_every_steps = TOTAL_STEPS
  config.eval_every_steps = TOTAL_STEPS
  config.dataset.canvas_sizes = ((128, 128),)
  config.dataset.train_min_size_range = (64, 64)
  config.dataset.max_size = 128
  config.dataset.eval_min_size = 64
  config.dataset.eval_max_size = 128
  config.model.fpn_dim = 16
  config.model.head_convs = 1
  config.model.semantic_dim = 16
  config.model.embed_dim = 8
  # An untrained net scores nothing above the real thresholds; keep some detections so that
  # the export has thing segments too.
  config.inference.pre_nms_thresh = 0.0
  config.inference.instance_score_thresh = 0.0
  config.inference.max_detections = 8
  return config


@pytest.mark.slow
def test_few_steps_train_evaluate_and_export(coco_sample_root, tmp_path, capsys):
  """Two steps through the real loop, its in-memory evaluation, then the exported files."""
  from ciae_jax import hparams  # pylint: disable=g-import-not-at-top
  from ciae_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
  from ciae_jax.training import loop  # pylint: disable=g-import-not-at-top

  config = hparams.HParams.from_config(_tiny_config(coco_sample_root))
  workdir = tmp_path / "run"
  state = loop.train_and_evaluate(config, str(workdir))
  assert int(state.step) == TOTAL_STEPS
  out = capsys.readouterr().out
  assert f"Panoptic quality at step {TOTAL_STEPS} (2 images)" in out, out[-2000:]

  metrics, output_dir = runner.evaluate_checkpoint(config, str(workdir))
  assert pathlib.Path(output_dir) == workdir / "eval" / str(TOTAL_STEPS)
  written = json.loads((workdir / "eval" / str(TOTAL_STEPS) / "metrics.json").read_text())
  assert written["num_images"] == 2
  for group in ("All", "Things", "Stuff"):
    assert {"pq", "sq", "rq", "n"} <= set(written[group]), written[group]
  predictions = json.loads((pathlib.Path(output_dir) / "panoptic_predictions.json").read_text())
  assert sorted(a["image_id"] for a in predictions["annotations"]) == [142238, 439180]

  # panopticapi on the exported files agrees with the in-memory PQ. pq_compute forks worker
  # processes: it runs in a fresh interpreter, away from the threads JAX and TF started here.
  script = ("import json, sys\n"
            "from panopticapi.evaluation import pq_compute\n"
            "r = pq_compute(*sys.argv[1:5])\n"
            "print(json.dumps({g: r[g] for g in ('All', 'Things', 'Stuff')}))\n")
  result = subprocess.run(
      [sys.executable, "-c", script,
       str(coco_sample_root / "annotations" / "panoptic_val2017.json"),
       os.path.join(output_dir, "panoptic_predictions.json"),
       str(coco_sample_root / "annotations" / "panoptic_val2017"),
       os.path.join(output_dir, "panoptic_predictions")],
      capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  reference = json.loads(result.stdout.strip().splitlines()[-1])
  assert reference["All"]["n"] >= 8  # The 8 categories of the two images, and any FP ones.
  # The same integer counts and float64 IoU sums (maybe in another order: ~1e-13) as
  # pq_compute: 1e-9 is far above float64 rounding and far below one miscounted segment.
  for group in ("All", "Things", "Stuff"):
    for key in ("pq", "sq", "rq", "n"):
      assert written[group][key] == pytest.approx(reference[group][key], abs=1e-9), (group, key)
      assert metrics[group][key] == pytest.approx(reference[group][key], abs=1e-9), (group, key)
