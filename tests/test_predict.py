"""`python -m ciae_jax.predict` and `evaluation/predict_files.py`: COCO panoptic files of many
images, equal to the Predictor's results and to evaluate.py's, resumable, bad images named.

`configs/synthetic.py:small` at its initialisation (a checkpoint written by the conftest
fixture; detection thresholds 0 so that things get pixels too) on a generated dataset of three
128 x 128 val images, plus an image of another size and aspect (77 x 201).
"""
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from ciae_jax import hparams
from ciae_jax import panoptic_png
from ciae_jax.evaluation import image_inputs
from ciae_jax.evaluation import pq as pq_lib
from ciae_jax.evaluation import predict_files
from ciae_jax.evaluation import runner
from ciae_jax.inference import export_lib
from ciae_jax.inference import predictor as predictor_lib
import test_reliability_helpers as rh
import xla_flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/synthetic.py:small"
# An untrained detector scores ~0.01: let its detections take pixels (things in the files).
THRESHOLDS = {"instance_score_thresh": 0.0, "pre_nms_thresh": 0.0}


@pytest.fixture(scope="module")
def run(tmp_path_factory, load_config, plain_synthetic_root, write_initial_checkpoint):
  """A dataset, a checkpoint of the small model, an image-info JSON of the val split (its
  annotations removed) and a folder of images (the val images and one of another size)."""
  folder = tmp_path_factory.mktemp("predict")
  data = plain_synthetic_root(folder / "data", num_val=3)
  config = load_config("synthetic", "small")
  config.dataset.root = str(data)
  config.inference.update(**THRESHOLDS)
  hp = hparams.HParams.from_config(config)
  write_initial_checkpoint(folder / "workdir", hp, 5)
  gt = json.loads((data / "annotations" / "panoptic_val2017.json").read_text())
  info = folder / "image_info_val.json"
  info.write_text(json.dumps({"images": gt["images"], "categories": gt["categories"]}))
  photos = folder / "photos"
  photos.mkdir()
  for path in sorted((data / "val2017").glob("*.jpg")):
    shutil.copy(path, photos / path.name)
  odd = np.random.default_rng(3).integers(0, 256, (77, 201, 3), dtype=np.uint8)
  Image.fromarray(odd).save(photos / "wide.png")
  restored = predictor_lib.restore_for_inference(hp, str(folder / "workdir"))
  return {"folder": folder, "data": data, "hp": hp, "info": info, "photos": photos,
          "restored": restored, "gt": gt}


def _cli(args, timeout=600):
  """`python -m ciae_jax.predict ARGS` with one CPU device; (exit status, output)."""
  env = xla_flags.env_with_device_count(1, JAX_DISABLE_MOST_OPTIMIZATIONS="true",
                                        CIAE_JAX_CACHE="0")
  result = subprocess.run([sys.executable, "-m", "ciae_jax.predict", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)
  return result.returncode, result.stdout + result.stderr


def _checkpoint_flags(run):
  return [f"--config={CONFIG}", f"--config.dataset.root={run['data']}",
          *[f"--config.inference.{k}={v}" for k, v in THRESHOLDS.items()],
          f"--workdir={run['folder'] / 'workdir'}"]


def _read(out: pathlib.Path) -> dict:
  return json.loads((out / predict_files.PREDICTIONS_JSON).read_text())


def _assert_files_hold(out, predictions, image_ids):
  """The JSON and PNGs under `out` hold `predictions` (Prediction objects) for `image_ids`."""
  written = _read(out)
  assert [a["image_id"] for a in written["annotations"]] == list(image_ids)
  assert [i["id"] for i in written["images"]] == list(image_ids)
  for annotation, image, prediction in zip(written["annotations"], written["images"],
                                           predictions):
    assert (image["height"], image["width"]) == prediction.panoptic.shape
    assert annotation["file_name"] == os.path.splitext(image["file_name"])[0] + ".png"
    png = panoptic_png.read_panoptic_png(out / predict_files.PNG_FOLDER / annotation["file_name"])
    np.testing.assert_array_equal(png, prediction.panoptic)
    want = [{k: s[k] for k in predict_files.SEGMENT_FIELDS} for s in prediction.segments_info]
    assert annotation["segments_info"] == want and want
  assert not list(out.glob(predict_files.JOURNAL_PATTERN))  # Removed once the JSON is written.


def test_folder_glob_and_image_info_json_hold_the_predictors_segments(run, tmp_path):
  predictor = predictor_lib.Predictor.from_restored(run["hp"], run["restored"],
                                                    devices=jax.local_devices()[:2])
  photos = sorted(run["photos"].iterdir(), key=lambda p: p.name)
  expected = dict(zip([p.name for p in photos], predictor.predict_batch(photos)))
  assert any(s["isthing"] for p in expected.values() for s in p.segments_info)

  # A folder: ids 1..4 in sorted file-name order (the 77 x 201 PNG last).
  images = image_inputs.list_images(str(run["photos"]))
  assert [(i.image_id, i.info["file_name"]) for i in images] == [
      (1, "000002000000.jpg"), (2, "000002000001.jpg"), (3, "000002000002.jpg"),
      (4, "wide.png")]
  summary = predict_files.predict_files(predictor, images, str(tmp_path / "folder"))
  assert (summary.predicted, summary.skipped, summary.failed) == (4, 0, [])
  _assert_files_hold(tmp_path / "folder", [expected[p.name] for p in photos], [1, 2, 3, 4])

  # A glob: the JPEGs only, numbered among themselves.
  images = image_inputs.list_images(str(run["photos"] / "*.jpg"))
  predict_files.predict_files(predictor, images, str(tmp_path / "glob"))
  _assert_files_hold(tmp_path / "glob", [expected[p.name] for p in photos[:3]], [1, 2, 3])

  # An image-info JSON: its ids (2000000..), its entries, the model's categories.
  images = image_inputs.list_images(str(run["info"]), str(run["data"] / "val2017"))
  predict_files.predict_files(predictor, images, str(tmp_path / "json"))
  ids = [i["id"] for i in run["gt"]["images"]]
  _assert_files_hold(tmp_path / "json", [expected[i["file_name"]] for i in run["gt"]["images"]],
                     ids)
  written = _read(tmp_path / "json")
  assert written["images"] == run["gt"]["images"]
  assert sorted(written["categories"], key=lambda c: c["id"]) == sorted(
      ({k: c[k] for k in ("id", "name", "isthing", "color")} for c in run["gt"]["categories"]),
      key=lambda c: c["id"])


def test_the_command_on_an_image_info_json_gives_evaluates_pq(run, tmp_path):
  out = tmp_path / "out"
  code, output = _cli([*_checkpoint_flags(run), f"--input={run['info']}",
                       f"--image_dir={run['data'] / 'val2017'}", f"--output_dir={out}"])
  assert code == 0, output[-4000:]
  assert "3 images predicted, 0 already written, 0 failed" in output, output[-2000:]
  assert "images/s" in output and "s left" in output, output[-2000:]
  metrics = runner.evaluate(run["hp"], variables=run["restored"].variables,
                            memory=run["restored"].memory, output_dir=str(tmp_path / "eval"))
  gt_dir = run["data"] / "annotations"
  result = pq_lib.pq_compute_files(str(gt_dir / "panoptic_val2017.json"),
                                   str(gt_dir / "panoptic_val2017"),
                                   str(out / predict_files.PREDICTIONS_JSON),
                                   str(out / predict_files.PNG_FOLDER))
  # The same integer counts and float64 IoU sums (a handful of terms, maybe in another order:
  # ~1e-15): 1e-9 is far above float64 rounding and far below one miscounted segment.
  assert metrics["Things"]["n"] > 0 and metrics["Stuff"]["n"] > 0
  for group in ("All", "Things", "Stuff"):
    for key in ("pq", "sq", "rq", "n"):
      assert result[group][key] == pytest.approx(metrics[group][key], abs=1e-9), (group, key)
  # And the files themselves are evaluate.py's (1 device and 8 write the same bytes).
  evaluated = json.loads((tmp_path / "eval" / "panoptic_predictions.json").read_text())
  assert _read(out)["annotations"] == evaluated["annotations"]
  for annotation in evaluated["annotations"]:
    name = annotation["file_name"]
    assert ((out / predict_files.PNG_FOLDER / name).read_bytes()
            == (tmp_path / "eval" / "panoptic_predictions" / name).read_bytes()), name


def test_bad_images_are_named_the_rest_written_and_a_second_run_resumes(run, tmp_path):
  """Through `--export`: a truncated JPEG (its header reads, its pixels do not) and a text file
  named .png among the good images; exit status 1; then a resumed run predicts only the image
  whose PNG was removed."""
  export = tmp_path / "export"
  export_lib.write_export(run["hp"], run["restored"], str(export), platforms=("cpu",),
                          log=lambda line: None)
  photos = tmp_path / "photos"
  shutil.copytree(run["photos"], photos)
  (photos / "wide.png").unlink()
  good = sorted(photos.iterdir())
  data = good[0].read_bytes()
  (photos / "broken.jpg").write_bytes(data[:len(data) // 2])
  (photos / "notes.png").write_text("not an image\n")
  out = tmp_path / "out"
  args = [f"--export={export}", f"--input={photos}", f"--output_dir={out}", "--overlays"]
  code, output = _cli(args)
  assert code == 1, output[-4000:]
  assert "3 images predicted, 0 already written, 2 failed" in output, output[-2000:]
  for name in ("broken.jpg", "notes.png"):
    assert f"{photos / name}: corrupt or unreadable image" in output, (name, output[-2000:])
  failed = json.loads((out / predict_files.FAILED_JSON).read_text())
  assert [(f["image_id"], f["file"]) for f in failed] == [(4, str(photos / "broken.jpg")),
                                                          (5, str(photos / "notes.png"))]
  expected = export_lib.ExportedPredictor(str(export)).predict_batch(good)
  _assert_files_hold(out, expected, [1, 2, 3])
  assert sorted(p.name for p in (out / predict_files.OVERLAY_FOLDER).iterdir()) == [
      p.stem + ".jpg" for p in good]
  first = _read(out)

  pngs = sorted((out / predict_files.PNG_FOLDER).iterdir())
  mtimes = {p.name: p.stat().st_mtime_ns for p in pngs}
  pngs[1].unlink()
  code, output = _cli(args)
  assert code == 1, output[-4000:]
  assert "1 images predicted, 2 already written, 2 failed" in output, output[-2000:]
  assert _read(out) == first
  for png in (pngs[0], pngs[2]):  # Not written again.
    assert png.stat().st_mtime_ns == mtimes[png.name], png.name
  assert pngs[1].is_file()


def test_a_killed_run_resumes_from_its_journal(run, tmp_path, monkeypatch):
  """A run stopped after two images (its journal holds them, the last line cut short, no JSON
  yet) is finished by the next run, which predicts only the other two."""
  predictor = predictor_lib.Predictor.from_restored(run["hp"], run["restored"],
                                                    devices=jax.local_devices()[:1],
                                                    per_device_batch=1)
  images = image_inputs.list_images(str(run["photos"]))
  out = tmp_path / "out"
  predict_files.predict_files(predictor, images, str(out))
  complete = _read(out)
  (out / predict_files.PREDICTIONS_JSON).unlink()
  (out / predict_files.PNG_FOLDER / "000002000002.png").unlink()  # Never written: no line.
  journal = out / predict_files.JOURNAL_PATTERN.replace("*", "00000")
  lines = [json.dumps({"image": i, "annotation": a})
           for i, a in zip(complete["images"][:2], complete["annotations"][:2])]
  journal.write_text("\n".join(lines) + "\n" + lines[1][:40])  # The kill cut the third line.
  predicted = []
  run_rows = predictor.run

  def counting_run(canvas, rows, **kwargs):
    predicted.extend(row.orig_size for row in rows if row is not None)
    return run_rows(canvas, rows, **kwargs)

  monkeypatch.setattr(predictor, "run", counting_run)
  summary = predict_files.predict_files(predictor, images, str(out))
  assert (summary.predicted, summary.skipped) == (2, 2)
  assert sorted(predicted) == [(77, 201), (128, 128)]
  assert _read(out) == complete and not journal.exists()


def test_wrong_arguments_are_named_before_anything_runs(run, tmp_path):
  code, output = _cli([*_checkpoint_flags(run), f"--input={tmp_path / 'nothing'}",
                       f"--output_dir={tmp_path / 'out'}"])
  assert code != 0 and "no such folder, file or image-info JSON" in output, output[-2000:]
  code, output = _cli([*_checkpoint_flags(run), f"--input={run['info']}",
                       f"--output_dir={tmp_path / 'out'}"])
  assert code != 0 and "needs --image_dir" in output, output[-2000:]
  code, output = _cli([f"--export={tmp_path}", f"--input={run['photos']}",
                       f"--output_dir={tmp_path / 'out'}"])
  assert code != 0 and "no export.json" in output, output[-2000:]
  code, output = _cli([f"--export={tmp_path}", f"--config={CONFIG}", f"--input={run['photos']}",
                       f"--output_dir={tmp_path / 'out'}"])
  assert code != 0 and "--export takes no --config" in output, output[-2000:]
  assert "xla_bridge" not in output and not (tmp_path / "out").exists()


def test_an_image_of_another_size_than_its_entry_is_named(run, tmp_path):
  gt = run["gt"]
  wrong = [dict(gt["images"][0], height=gt["images"][0]["height"] + 1), *gt["images"][1:]]
  info = tmp_path / "info.json"
  info.write_text(json.dumps({"images": wrong}))
  sizes = image_inputs.read_sizes(image_inputs.list_images(str(info),
                                                           str(run["data"] / "val2017")))
  assert isinstance(sizes[0], ValueError) and "says 129 x 128" in str(sizes[0])
  assert sizes[1:] == [(128, 128)] * 2
  info.write_text(json.dumps({"images": [*gt["images"], gt["images"][0]]}))
  with pytest.raises(ValueError, match=r"images\[3\]: duplicate image id"):
    image_inputs.list_images(str(info), str(run["data"] / "val2017"))


def _doc_commands(section: str) -> list[list[str]]:
  """The commands of the first code block under `## <section>` in docs/predict.md."""
  text = (REPO_ROOT / "docs" / "predict.md").read_text()
  block = re.search(r"```\n(.*?)```", text[text.index(f"## {section}"):], re.S).group(1)
  return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_the_documented_commands_run_as_written(user_folder):
  env = xla_flags.env_with_device_count(
      1, JAX_DISABLE_MOST_OPTIMIZATIONS="true", CIAE_JAX_CACHE="0",
      PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
  outputs = []
  for words in _doc_commands("Predict a folder") + _doc_commands("An image-info JSON"):
    assert words[0] == "python", words
    result = subprocess.run([sys.executable, *words[1:]], cwd=user_folder, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, (words, (result.stdout + result.stderr)[-4000:])
    outputs.append(result.stdout)
  gt = json.loads((user_folder / "data" / "synthetic" / "annotations" /
                   "panoptic_val2017.json").read_text())
  folder = _read(user_folder / "predictions" / "val")
  info = _read(user_folder / "predictions" / "info")
  assert [a["image_id"] for a in folder["annotations"]] == [1, 2]
  assert [a["image_id"] for a in info["annotations"]] == [i["id"] for i in gt["images"]]
  # The same images, so the same segments, under the two numberings.
  assert [a["segments_info"] for a in folder["annotations"]] == [
      a["segments_info"] for a in info["annotations"]]
  assert len(list((user_folder / "predictions" / "val" / "overlays").glob("*.jpg"))) == 2
  assert re.search(r"All\s+\|", outputs[-1]), outputs[-1][-2000:]  # The PQ table.


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(run, tmp_path):
  """`--coordinator_address ... --num_processes=2`: each process (1 device, 1 image per call)
  predicts its rows of every batch in lockstep; the files equal those of one process with the
  same per-call arithmetic (an in-process run on 1 device, 1 image per call), byte for byte."""
  out = tmp_path / "two"
  args = [*_checkpoint_flags(run), "--config.inference.per_device_batch=1",
          f"--input={run['photos']}", f"--output_dir={out}"]
  port = rh.free_port()
  env = xla_flags.env_with_device_count(1, JAX_DISABLE_MOST_OPTIMIZATIONS="true",
                                        CIAE_JAX_CACHE="0")
  processes = [subprocess.Popen(
      [sys.executable, "-m", "ciae_jax.predict", *args, f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={index}"], cwd=REPO_ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for index in range(2)]
  for process in processes:
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-4000:]
    assert "4 images predicted, 0 already written, 0 failed" in output, output[-2000:]
  predictor = predictor_lib.Predictor.from_restored(run["hp"], run["restored"],
                                                    devices=jax.local_devices()[:1],
                                                    per_device_batch=1)
  one = tmp_path / "one"
  predict_files.predict_files(predictor, image_inputs.list_images(str(run["photos"])), str(one))
  assert (out / predict_files.PREDICTIONS_JSON).read_bytes() == (
      one / predict_files.PREDICTIONS_JSON).read_bytes()
  names = sorted(p.name for p in (one / predict_files.PNG_FOLDER).iterdir())
  assert names == sorted(p.name for p in (out / predict_files.PNG_FOLDER).iterdir())
  for name in names:
    assert ((out / predict_files.PNG_FOLDER / name).read_bytes()
            == (one / predict_files.PNG_FOLDER / name).read_bytes()), name
