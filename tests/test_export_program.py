"""`python -m ciae_jax.export`, `export_lib.ExportedPredictor` and `examples/serve_exported.py`.

One export (the CLI, in a subprocess, for cpu and cuda) of a checkpoint of the small synthetic
model at its initialisation; then the deserialised programs must predict what the checkpoint's
`Predictor` predicts, in this process and in a Python that cannot import ciae_jax.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from ciae_jax import hparams
from ciae_jax import panoptic_png
from ciae_jax.data import dataset as dataset_lib
from ciae_jax.inference import export_lib
from ciae_jax.inference import predictor as predictor_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/synthetic.py:small"
# Subprocesses: one CPU device, the optimisations of this process (same arithmetic).
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
           JAX_DISABLE_MOST_OPTIMIZATIONS="true", CIAE_JAX_CACHE="0")


@pytest.fixture(scope="module")
def run(tmp_path_factory, load_config, plain_synthetic_root, write_initial_checkpoint):
  """A dataset, a workdir with a checkpoint (initial params, memory) and its export."""
  folder = tmp_path_factory.mktemp("export")
  data = plain_synthetic_root(folder / "data")
  config = load_config("synthetic", "small")
  config.dataset.root = str(data)
  hp = hparams.HParams.from_config(config)
  write_initial_checkpoint(folder / "workdir", hp, 7)
  out = folder / "exported"
  result = subprocess.run(
      [sys.executable, "-m", "ciae_jax.export", f"--config={CONFIG}",
       f"--config.dataset.root={data}", f"--workdir={folder / 'workdir'}", f"--output={out}",
       "--platforms=cpu,cuda"], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
      timeout=900, check=False)
  assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
  return {"folder": folder, "hp": hp, "out": out, "log": result.stdout + result.stderr,
          "images": sorted((data / "val2017").glob("*.jpg"))}


def _odd_image(folder):
  """An image of a size no training image had (128 x 128 in this dataset)."""
  path = folder / "odd.png"
  if not path.exists():
    rgb = np.random.default_rng(3).integers(0, 256, (77, 201, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
  return path


def test_the_export_describes_its_programs(run):
  manifest = json.loads((run["out"] / "export.json").read_text())
  assert manifest["format_version"] == 1 and manifest["checkpoint_step"] == 7
  assert manifest["canvases"] == [[128, 128]]
  assert "exported 1/1: canvas 128x128 (cpu,cuda)" in run["log"], run["log"][-2000:]
  [program] = manifest["programs"]
  assert program["platforms"] == ["cpu", "cuda"] and program["batch_size"] == 1
  inputs = {i["name"]: i for i in program["inputs"]}
  assert inputs["image"] == {"name": "image", "shape": [1, 128, 128, 3], "dtype": "float32"}
  assert {o["name"] for o in program["outputs"]} == set(predictor_lib.RESULT_KEYS)
  assert [c["id"] for c in manifest["categories"]] == list(
      dataset_lib.load_dataset_categories(run["hp"].dataset).coco_ids)
  assert manifest["normalize"]["std"] == [0.229, 0.224, 0.225]


def test_the_exported_predictor_predicts_what_the_checkpoint_predicts(run):
  images = run["images"] + [_odd_image(run["folder"])]
  expected = predictor_lib.Predictor.from_workdir(
      run["hp"], str(run["folder"] / "workdir"), devices=jax.local_devices()[:1],
      per_device_batch=1).predict_batch(images)
  exported = export_lib.ExportedPredictor(str(run["out"]))
  assert isinstance(exported, predictor_lib.BasePredictor) and exported.step == 7
  got = exported.predict_batch(images)
  assert got[-1].panoptic.shape == (77, 201)
  for want, have in zip(expected, got):
    np.testing.assert_array_equal(have.panoptic, want.panoptic)
    assert have.segments_info == want.segments_info and want.segments_info
    assert have.detections == want.detections


# Runs a script in a Python where `ciae_jax` cannot be imported, installed or not (`pip install
# -e .` puts it on every path): a meta-path finder refuses the package before any other finder.
NO_CIAE_JAX = """
import importlib.abc, runpy, sys
class Refuse(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name == "ciae_jax" or name.startswith("ciae_jax."):
      raise ModuleNotFoundError(f"No module named {name!r} (refused by the test)")
    return None
sys.meta_path.insert(0, Refuse())
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def test_the_serving_script_needs_no_ciae_jax(run, tmp_path):
  image = _odd_image(run["folder"])
  isolated = [sys.executable, "-I", "-c", NO_CIAE_JAX]  # -I: no PYTHONPATH or user site.
  probe = tmp_path / "probe.py"
  probe.write_text("import ciae_jax\n")
  check = subprocess.run([*isolated, str(probe)], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, check=False)
  assert check.returncode != 0 and "No module named 'ciae_jax'" in check.stderr
  script = tmp_path / "serve_exported.py"
  shutil.copy(REPO_ROOT / "examples" / "serve_exported.py", script)
  result = subprocess.run([*isolated, str(script), str(run["out"]), str(image), "out.png"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600,
                          check=False)
  assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
  expected = export_lib.ExportedPredictor(str(run["out"]))(str(image))
  id_map = panoptic_png.read_panoptic_png(tmp_path / "out.png")
  np.testing.assert_array_equal(id_map, expected.panoptic)
  segments = json.loads((tmp_path / "out.json").read_text())["segments_info"]
  assert segments == expected.segments_info


def test_bad_exports_are_named(run, tmp_path):
  with pytest.raises(FileNotFoundError, match="export.json"):
    export_lib.ExportedPredictor(str(tmp_path))
  copy = tmp_path / "copy"
  shutil.copytree(run["out"], copy)
  manifest = json.loads((copy / "export.json").read_text())
  manifest["format_version"] = 99
  (copy / "export.json").write_text(json.dumps(manifest))
  with pytest.raises(ValueError, match="format_version"):
    export_lib.read_manifest(str(copy))
  exported = export_lib.ExportedPredictor(str(run["out"]))
  with pytest.raises(ValueError, match="canvas"):
    exported.program((64, 64))
  code = subprocess.run([sys.executable, "-I", str(REPO_ROOT / "examples" / "serve_exported.py"),
                         str(tmp_path), "missing.jpg", "out.png"], env=ENV, capture_output=True,
                        text=True, check=False)
  assert code.returncode == 2 and "export.json" in code.stderr
