"""`python -m ciae_jax.tune_inference`: a threshold grid on train images held out of training.

`configs/synthetic.py:small` at its initialisation (a checkpoint of params, model state and
memory, no training), on a synthetic train split of 7 images of 64 x 64, the last 3 held out
(`dataset.num_tuning_images=3`); `pre_nms_thresh=0` lets the untrained detector's scores
(~0.01) through, so that the score grid (0 and 0.5) changes which detections take pixels.
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from ciae_jax import hparams
from ciae_jax.data import coco
from ciae_jax.data import dataset as dataset_lib
from ciae_jax.data import pipeline
from ciae_jax.evaluation import runner
from ciae_jax.evaluation import tuning
from ciae_jax.training import workdir as workdir_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_TUNING = 7, 3
SCORES, NMS, STUFF_AREA = (0.0, 0.5), (0.3, 0.7), 64.0  # A 2 x 2 grid.
OVERRIDES = {"dataset.synthetic.num_train": NUM_TRAIN, "dataset.synthetic.num_val": 1,
             "dataset.synthetic.image_size": "(64, 64)", "dataset.train_min_size_range": "(64, 64)",
             "dataset.max_size": 64, "dataset.eval_min_size": 64, "dataset.eval_max_size": 64,
             "dataset.num_tuning_images": NUM_TUNING, "inference.pre_nms_thresh": 0.0,
             "inference.per_device_batch": 2}


def _config(load_config, root):
  config = load_config("synthetic", "small")
  config.dataset.root = str(root)
  for key, value in OVERRIDES.items():
    group, _, name = key.rpartition(".")
    node = config
    for part in group.split("."):
      node = node[part]
    node[name] = eval(value) if isinstance(value, str) else value  # pylint: disable=eval-used
  return config


@pytest.fixture(scope="module")
def run(tmp_path_factory, load_config, write_initial_checkpoint):
  """(hp, workdir, the CLI's JSON result, its stdout) after one tune_inference run."""
  folder = tmp_path_factory.mktemp("tune")
  hp = hparams.HParams.from_config(_config(load_config, folder / "synthetic"))
  workdir = folder / "workdir"
  state = write_initial_checkpoint(workdir, hp, 7)  # Generates the data first.
  words = [sys.executable, "-m", "ciae_jax.tune_inference", "--config=configs/synthetic.py:small",
           f"--workdir={workdir}", f"--config.dataset.root={folder / 'synthetic'}",
           *(f"--config.{k}={v}" for k, v in OVERRIDES.items()),
           f"--score_threshs={','.join(map(str, SCORES))}",
           f"--nms_threshs={','.join(map(str, NMS))}", f"--stuff_areas={STUFF_AREA}",
           "--nocompilation_cache"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_DISABLE_MOST_OPTIMIZATIONS="true",
             PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
  done = subprocess.run(words, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=600, check=False)
  assert done.returncode == 0, done.stdout + done.stderr
  result = json.loads((workdir / "tune_inference_7.json").read_text())
  return (hp, workdir, result, done.stdout, {"params": state["params"], **state["model_state"]},
          state["memory"])


def test_the_table_has_every_setting_and_the_best_is_its_argmax(run):
  _, _, result, stdout, _, _ = run
  settings = [(r["instance_score_thresh"], r["nms_thresh"], r["stuff_area"])
              for r in result["settings"]]
  assert sorted(settings) == sorted((s, n, STUFF_AREA) for s in SCORES for n in NMS)
  best = max(result["settings"], key=lambda r: r["All"]["pq"])
  assert result["best"] == best and result["step"] == 7
  for row in result["settings"]:
    assert set(row["All"]) == {"pq", "sq", "rq", "n"} and row["Things"] and row["Stuff"]
  # The score threshold matters here: at 0.5 no (untrained) detection takes pixels.
  assert len({r["Things"]["pq"] for r in result["settings"]}) > 1 or all(
      r["Things"]["pq"] == 0 for r in result["settings"])
  table = stdout.split("best (by All PQ)")[0]
  assert len([line for line in table.splitlines() if "|" in line]) == 1 + len(settings)
  assert "best (by All PQ): instance_score_thresh=" in stdout


def test_held_out_images_are_the_last_by_id_and_never_in_training(run):
  hp, _, result, _, _, _ = run
  root = dataset_lib.prepare_root(hp.dataset)
  all_ids = [r.image_id for r in coco.load_records(root, hp.dataset.train_split)]
  assert result["image_ids"] == sorted(all_ids)[-NUM_TUNING:]
  batches = pipeline.build_input(hp.dataset, hp.dataset.train_split, train=True,
                                 global_batch_size=8, seed=0)
  seen = set()
  for _ in range(3):  # Several epochs of the 4 training images (8 rows, one per device).
    batch = next(batches)
    seen.update(int(i) for i in batch["image_id"].reshape(-1))
  batches.close()
  assert seen == set(sorted(all_ids)[:-NUM_TUNING])
  assert not seen & set(result["image_ids"])


def test_pq_of_a_setting_equals_evaluate_on_the_same_images(run, tmp_path):
  """`runner.evaluate` (the fused predictor path) on a split holding just the held-out images."""
  hp, _, result, _, variables, memory = run
  root = pathlib.Path(dataset_lib.prepare_root(hp.dataset))
  data = json.loads((root / "annotations" / "panoptic_train2017.json").read_text())
  keep = set(result["image_ids"])
  data["images"] = [i for i in data["images"] if i["id"] in keep]
  data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
  eval_root = tmp_path / "held_out"
  (eval_root / "annotations").mkdir(parents=True)
  (eval_root / "annotations" / "panoptic_tune.json").write_text(json.dumps(data))
  os.symlink(root / "train2017", eval_root / "tune")
  os.symlink(root / "annotations" / "panoptic_train2017", eval_root / "annotations" /
             "panoptic_tune")
  row = next(r for r in result["settings"] if r["instance_score_thresh"] == 0.0
             and r["nms_thresh"] == 0.7)
  eval_hp = hp.replace(
      dataset=hp.dataset.replace(source="coco", root=str(eval_root), val_split="tune",
                                 train_split="tune", num_tuning_images=0),
      inference=hp.inference.replace(instance_score_thresh=0.0, nms_thresh=0.7,
                                     stuff_area=row["stuff_area"]))
  metrics = runner.evaluate(eval_hp, variables=variables, memory=memory,
                            devices=jax.local_devices()[:1])
  assert metrics["num_images"] == NUM_TUNING
  for group in ("All", "Things", "Stuff"):
    # The same images, thresholds and float32 programs (network, then post-processing, against
    # one fused program): no pixel changed in this run, so the counts and PQ are equal; 1e-9
    # only absorbs the JSON round trip of the floats.
    for key in ("pq", "sq", "rq"):
      assert metrics[group][key] == pytest.approx(row[group][key], abs=1e-9), (group, key)
    assert metrics[group]["n"] == row[group]["n"]


def test_bad_num_tuning_images_name_the_field(tmp_path, load_config):
  config = _config(load_config, tmp_path / "synthetic")
  config.dataset.num_tuning_images = 0
  hp = hparams.HParams.from_config(config)
  categories = dataset_lib.load_dataset_categories(hp.dataset)
  with pytest.raises(ValueError, match="dataset.num_tuning_images is 0"):
    tuning.tuning_records(hp.dataset, categories)
  hp = hp.replace(dataset=hp.dataset.replace(num_tuning_images=NUM_TRAIN))
  with pytest.raises(ValueError, match=r"dataset.num_tuning_images=7 must be smaller than the 7"):
    tuning.tuning_records(hp.dataset, categories)
  with pytest.raises(hparams.HParamsError, match="dataset.num_tuning_images"):
    hp.dataset.replace(num_tuning_images=-1)


def test_a_record_without_the_field_resumes_unless_the_field_is_set():
  """A workdir whose config.json predates `dataset.num_tuning_images` reads it as 0."""
  saved = workdir_lib.flat_config(hparams.HParams())
  del saved["dataset.num_tuning_images"]
  current = workdir_lib.flat_config(hparams.HParams())
  assert workdir_lib.config_differences(saved, current) == []
  held = hparams.HParams(dataset=hparams.DatasetHParams(num_tuning_images=32))
  assert workdir_lib.config_differences(saved, workdir_lib.flat_config(held)) == [
      "dataset.num_tuning_images: 0 -> 32"]


def test_a_corrupt_held_out_image_is_an_error_or_left_out(tmp_path, load_config,
                                                          initial_inference_state):
  config = _config(load_config, tmp_path / "synthetic")
  hp = hparams.HParams.from_config(config)
  categories = dataset_lib.load_dataset_categories(hp.dataset)
  bad = tuning.tuning_records(hp.dataset, categories)[1]
  pathlib.Path(bad.image_path).write_bytes(b"not a JPEG")
  state = initial_inference_state(hp)
  grid = tuning.Grid((0.0,), (0.5,), (64.0,))
  kwargs = {"variables": {"params": state["params"], **state["model_state"]},
            "memory": state["memory"], "grid": grid,
            "devices": jax.local_devices()[:1]}
  with pytest.raises(ValueError, match=rf"{bad.image_path}.*image id {bad.image_id}"):
    tuning.tune(hp, **kwargs)
  hp = hp.replace(dataset=hp.dataset.replace(skip_bad_examples=True))
  result = tuning.tune(hp, **kwargs)
  assert result["skipped_image_ids"] == [bad.image_id]
  assert len(result["image_ids"]) == NUM_TUNING - 1 and bad.image_id not in result["image_ids"]
  assert len(result["settings"]) == 1 and result["best"] == result["settings"][0]
