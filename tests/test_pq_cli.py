"""The PQ command line, and the malformed-prediction errors (as pq_compute's)."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
from panopticapi import evaluation as panopticapi_eval
from PIL import Image
import pytest

from ciae_jax.evaluation import pq

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def decode_png(path):
  rgb = np.array(Image.open(path), dtype=np.int64)
  return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def encode_rgb(id_map):
  id_map = np.asarray(id_map, np.int64)
  return np.stack([id_map % 256, id_map // 256 % 256, id_map // 65536],
                  -1).astype(np.uint8)


@pytest.fixture()
def prediction(coco_sample_root, tmp_path):
  """A prediction set (copy of gt with every other segment shifted/dropped)."""
  gt_json = str(coco_sample_root / "annotations" / "panoptic_val2017.json")
  gt_folder = str(coco_sample_root / "annotations" / "panoptic_val2017")
  with open(gt_json) as f:
    gt = json.load(f)
  pred_folder = tmp_path / "pred"
  pred_folder.mkdir()
  anns = []
  for ann in gt["annotations"]:
    id_map = np.roll(decode_png(os.path.join(gt_folder, ann["file_name"])),
                     (4, -9), (0, 1))
    dropped = [s["id"] for s in ann["segments_info"][::3]]
    id_map[np.isin(id_map, dropped)] = 0
    Image.fromarray(encode_rgb(id_map)).save(pred_folder / ann["file_name"])
    anns.append({"image_id": ann["image_id"], "file_name": ann["file_name"],
                 "segments_info": [
                     {"id": s["id"], "category_id": s["category_id"]}
                     for s in ann["segments_info"] if s["id"] not in dropped]})
  pred_json = tmp_path / "pred.json"
  pred_json.write_text(json.dumps({"annotations": anns,
                                   "categories": gt["categories"]}))
  return {"gt_json": gt_json, "gt_folder": gt_folder,
          "pred_json": str(pred_json), "pred_folder": str(pred_folder),
          "anns": anns, "categories": gt["categories"]}


def run_cli(*args):
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  return subprocess.run([sys.executable, "-m", "ciae_jax.evaluation.pq", *args],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=120)


def test_cli_writes_result_json(prediction, tmp_path, capsys):
  p = prediction
  out = tmp_path / "out" / "RESULT.json"
  proc = run_cli("--gt_json", p["gt_json"], "--gt_folder", p["gt_folder"],
                 "--pred_json", p["pred_json"], "--pred_folder",
                 p["pred_folder"], "--output", str(out), "--workers", "2")
  assert proc.returncode == 0, proc.stderr
  ref = panopticapi_eval.pq_compute(p["gt_json"], p["pred_json"],
                                    p["gt_folder"], p["pred_folder"])
  ref_printed = capsys.readouterr().out.splitlines()
  written = json.loads(out.read_text())
  assert set(written) == {"All", "Things", "Stuff", "per_class"}
  for group in ("All", "Things", "Stuff"):
    assert set(written[group]) == {"pq", "sq", "rq", "n"}
    assert written[group]["n"] == ref[group]["n"]
    for k in ("pq", "sq", "rq"):
      # The same integer counts and float64 IoU sums (<= 1e3 terms, maybe in another order:
      # ~1e-13) as pq_compute: 1e-9 is far above float64 rounding, far below any miscount.
      assert abs(written[group][k] - ref[group][k]) <= 1e-9
  # JSON object keys are strings: the per-class table keyed by category id.
  assert {int(k) for k in written["per_class"]} == set(ref["per_class"])
  for cat, values in ref["per_class"].items():
    for k in ("pq", "sq", "rq"):
      assert abs(written["per_class"][str(cat)][k] - values[k]) <= 1e-9  # As above.
  # The printed table is pq_compute's table.
  table = [line for line in proc.stdout.splitlines() if "|" in line]
  assert len(table) == 4
  for line in table:
    assert line in ref_printed


def test_cli_default_folders(prediction, tmp_path):
  """Without --*_folder, the folder is the JSON path minus '.json'."""
  p = prediction
  gt_copy = tmp_path / "gtset.json"
  shutil.copy(p["gt_json"], gt_copy)
  shutil.copytree(p["gt_folder"], tmp_path / "gtset")
  proc = run_cli("--gt_json", str(gt_copy), "--pred_json", p["pred_json"])
  assert proc.returncode == 0, proc.stderr
  assert "Things" in proc.stdout


def rewrite_prediction(p, edit):
  """Applies edit(anns) to the prediction JSON in place."""
  anns = json.loads(json.dumps(p["anns"]))
  edit(anns)
  with open(p["pred_json"], "w") as f:
    json.dump({"annotations": anns, "categories": p["categories"]}, f)


def both_raise(p, capsys):
  """Runs pq_compute and ours; returns (their error, our error)."""
  with pytest.raises(Exception) as theirs:
    panopticapi_eval.pq_compute(p["gt_json"], p["pred_json"], p["gt_folder"],
                                p["pred_folder"])
  capsys.readouterr()
  with pytest.raises(pq.PanopticFormatError) as ours:
    pq.pq_compute_files(p["gt_json"], p["gt_folder"], p["pred_json"],
                        p["pred_folder"], num_workers=1)
  return theirs.value, ours.value


def test_error_segment_in_json_missing_from_png(prediction, capsys):
  p = prediction
  image_id = p["anns"][1]["image_id"]
  rewrite_prediction(p, lambda anns: anns[1]["segments_info"].append(
      {"id": 123456, "category_id": 1}))
  theirs, ours = both_raise(p, capsys)
  assert isinstance(theirs, KeyError) and isinstance(ours, KeyError)
  assert isinstance(ours, ValueError)
  message = str(ours)
  assert f"ID {image_id}" in message and "123456" in message
  assert "presented in JSON and not presented in PNG" in message
  assert p["anns"][1]["file_name"] in message


def test_error_segment_in_png_missing_from_json(prediction, capsys):
  p = prediction
  image_id = p["anns"][0]["image_id"]
  missing = p["anns"][0]["segments_info"][0]["id"]
  rewrite_prediction(p, lambda anns: anns[0]["segments_info"].pop(0))
  theirs, ours = both_raise(p, capsys)
  assert isinstance(theirs, KeyError)
  message = str(ours)
  assert f"ID {image_id}" in message and str(missing) in message
  assert "presented in PNG and not presented in JSON" in message


def test_error_unknown_category(prediction, capsys):
  p = prediction
  image_id = p["anns"][0]["image_id"]

  def edit(anns):
    anns[0]["segments_info"][2]["category_id"] = 9999
  rewrite_prediction(p, edit)
  theirs, ours = both_raise(p, capsys)
  assert "unknown category_id" in str(theirs)
  message = str(ours)
  assert f"ID {image_id}" in message and "9999" in message
  assert "unknown category_id" in message


def test_error_missing_image_and_size(prediction, capsys):
  p = prediction
  image_id = p["anns"][1]["image_id"]
  rewrite_prediction(p, lambda anns: anns.pop(1))
  with pytest.raises(Exception, match=str(image_id)):
    panopticapi_eval.pq_compute(p["gt_json"], p["pred_json"], p["gt_folder"],
                                p["pred_folder"])
  with pytest.raises(pq.PanopticFormatError, match=str(image_id)):
    pq.pq_compute_files(p["gt_json"], p["gt_folder"], p["pred_json"],
                        p["pred_folder"], num_workers=1)
  # A prediction PNG of the wrong size names the image and both files.
  rewrite_prediction(p, lambda anns: None)
  name = p["anns"][0]["file_name"]
  Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(
      os.path.join(p["pred_folder"], name))
  with pytest.raises(pq.PanopticFormatError, match=name):
    pq.pq_compute_files(p["gt_json"], p["gt_folder"], p["pred_json"],
                        p["pred_folder"], num_workers=1)


def test_error_raised_from_worker_process(prediction):
  """An error inside a worker reaches the caller with its message."""
  p = prediction
  rewrite_prediction(p, lambda anns: anns[1]["segments_info"].append(
      {"id": 654321, "category_id": 1}))
  with pytest.raises(KeyError, match="654321"):
    pq.pq_compute_files(p["gt_json"], p["gt_folder"], p["pred_json"],
                        p["pred_folder"], num_workers=2)


def test_cli_error_exit(prediction):
  p = prediction
  rewrite_prediction(p, lambda anns: anns[0]["segments_info"].append(
      {"id": 42, "category_id": 1}))
  proc = run_cli("--gt_json", p["gt_json"], "--gt_folder", p["gt_folder"],
                 "--pred_json", p["pred_json"], "--pred_folder",
                 p["pred_folder"], "--workers", "1")
  assert proc.returncode != 0
  assert "42" in proc.stderr and "not presented in PNG" in proc.stderr
