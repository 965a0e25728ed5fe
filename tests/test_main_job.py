"""The main job's whole path, as CI runs it: train.py (a few steps), evaluate.py, the demo.

`configs/synthetic.py` itself (not a test config) with only the step count, the dataset size
and the root overridden; the evaluation at the end of training must log its pictures to
TensorBoard; then `evaluate.py` on its checkpoint must write the four outputs, reproduce the
PQ printed at the end of training, and agree with panopticapi's `pq_compute` run on the
exported files; the demo must write its picture.
"""
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

import xla_flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4
pytestmark = pytest.mark.slow  # Every test reads the module's training run (~30 s of CPU).


def _run(args, env_extra=None, timeout=600):
  env = xla_flags.env_with_device_count(1, JAX_DISABLE_MOST_OPTIMIZATIONS="true",
                                        **(env_extra or {}))
  result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-5000:]
  return output


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A few steps of the main job on a small generated dataset; (workdir, overrides, log)."""
  tmp = tmp_path_factory.mktemp("main_job")
  overrides = [
      f"--config.dataset.root={tmp / 'synthetic'}",
      "--config.dataset.synthetic.num_train=8", "--config.dataset.synthetic.num_val=3",
      "--config.batch_size=2", "--config.inference.per_device_batch=2",
      # An untrained detector scores ~0.01: let its detections compete so that the exported
      # predictions have thing segments too.
      "--config.inference.instance_score_thresh=0.0", "--config.inference.pre_nms_thresh=0.0",
  ]
  workdir = tmp / "run"
  log = _run(["train.py", "--config", "configs/synthetic.py", "--workdir", str(workdir),
              f"--config.total_steps={STEPS}", "--config.log_every_steps=2",
              f"--config.eval_every_steps={STEPS}", *overrides])
  return workdir, overrides, log


def test_training_prints_the_pq_table(trained):
  _, _, log = trained
  assert re.search(r"All\s+\|\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+\s+9", log), log[-3000:]
  assert re.search(r"Things\s+\|", log) and re.search(r"Stuff\s+\|", log)


def test_evaluate_py_writes_outputs_that_pq_compute_reads_alike(trained, tmp_path):
  from panopticapi.evaluation import pq_compute  # pylint: disable=g-import-not-at-top
  workdir, overrides, log = trained
  _run(["evaluate.py", "--config", "configs/synthetic.py", "--workdir", str(workdir),
        *overrides])  # Exit status 0 checked in _run.
  out_dir = workdir / "eval" / str(STEPS)  # The default output folder; its files, not the log.
  for name in ("panoptic_predictions.json", "panoptic_predictions", "detections.json",
               "metrics.json"):
    assert (out_dir / name).exists(), name
  metrics = json.loads((out_dir / "metrics.json").read_text())
  predictions = json.loads((out_dir / "panoptic_predictions.json").read_text())
  assert len(predictions["annotations"]) == metrics["num_images"] == 3  # every image
  assert set(metrics["box_ap"]) >= {"AP", "AP50", "AP75"}

  # evaluate.py reproduces the PQ printed at the end of training (same checkpoint): the same
  # parameters, images and inference program on this machine give the same panoptic maps,
  # and PQ is float64 arithmetic on the same counts, logged with repr (17 digits): equal up
  # to float64 rounding (1e-16), hence abs 1e-12.
  logged = float(re.search(r"eval/All/pq': ([0-9.e-]+)", log).group(1))
  assert metrics["All"]["pq"] == pytest.approx(logged, abs=1e-12)

  root = workdir.parent / "synthetic" / "annotations"
  reference = pq_compute(str(root / "panoptic_val2017.json"),
                         str(out_dir / "panoptic_predictions.json"),
                         str(root / "panoptic_val2017"), str(out_dir / "panoptic_predictions"))
  # The same integer counts and float64 IoU sums (<= 1e3 terms, maybe in another order:
  # ~1e-13) as pq_compute on the exported files: 1e-9 is far above float64 rounding and far
  # below one miscounted segment.
  for group in ("All", "Things", "Stuff"):
    for key in ("pq", "sq", "rq", "n"):
      assert metrics[group][key] == pytest.approx(reference[group][key], abs=1e-9), (group, key)
  for category, values in reference["per_class"].items():
    for key in ("pq", "sq", "rq"):
      assert metrics["per_class"][str(category)][key] == pytest.approx(values[key], abs=1e-9)


def test_training_logs_evaluation_pictures(trained):
  """The evaluation at the end of training writes its pictures next to the PQ scalars."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  workdir, _, _ = trained
  images, scalars = {}, set()
  for path in workdir.glob("events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == "images":
          # Image summaries hold [width, height, PNG...] as strings.
          width, height, png = tf.make_ndarray(value.tensor)[:3]
          images[value.tag] = (event.step, int(height), int(width), png)
        else:
          scalars.add(value.tag)
  assert "eval/All/pq" in scalars, sorted(scalars)
  assert sorted(images) == [f"eval/image_{2_000_000 + i}" for i in range(3)], sorted(images)
  for step, height, width, png in images.values():
    assert step == STEPS and height >= 512 and width >= 3 * 512  # input | panoptic | PCA
    assert png.startswith(b"\x89PNG")


def test_demo_writes_its_picture(trained, tmp_path):
  workdir, overrides, _ = trained
  image = sorted((workdir.parent / "synthetic" / "val2017").glob("*.jpg"))[0]
  out = tmp_path / "demo.png"
  output = _run(["-m", "ciae_jax.demo", "--config", "configs/synthetic.py", "--workdir",
                 str(workdir), "--image", str(image), "--output", str(out), *overrides])
  assert out.is_file(), output[-4000:]  # The picture itself, not the log line naming it.
  original = np.asarray(Image.open(image))  # [128, 128, 3]
  picture = np.asarray(Image.open(out))
  # Three pictures of 512 x 512 (the 128-pixel image scaled 4 times) under a title row.
  assert picture.shape[1] == 3 * 512 + 2 * 8 and 512 < picture.shape[0] < 600, picture.shape
  assert picture.std() > 0
  assert original.shape == (128, 128, 3)
