"""Evaluation over 2 processes x 1 CPU device (localhost, jax.distributed) equals 1 process.

A 2-process `train.py` run (the tiny model of the reliability tests, 8 steps) evaluates at its
end; then `evaluate.py` on its checkpoint, once as 1 process with 1 device and once as 2
processes with 1 device each. The two `evaluate.py` runs must write byte-identical files
(metrics.json, the JSON files and every PNG, the PNGs written by the process that predicted
them), and the evaluation at the end of training (printed by both processes) must give every
number of that metrics.json.
"""
import ast
import json
import re
import sys

import pytest

from ciae_jax.data import synthetic
import test_reliability_helpers as rh

# An untrained detector scores ~0.01: keep its detections so that things are exported too.
EVAL_FLAGS = ["--config.inference.pre_nms_thresh=0.0",
              "--config.inference.instance_score_thresh=0.0",
              "--config.inference.per_device_batch=1", "--config.dataset.synthetic.num_val=3"]


def _flags(dataset, workdir):
  return rh.train_flags(dataset, workdir, extra=[
      f"--config.eval_every_steps={rh.TOTAL_STEPS}", *EVAL_FLAGS])


def _two_processes(command, cache_dir):
  port = rh.free_port()
  return [rh.Process(command + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                f"--process_id={index}"], rh.subprocess_env(cache_dir, devices=1))
          for index in range(2)]


def _wait_all(processes, timeout):
  for process in processes:
    assert process.wait(timeout) == 0, process.output[-4000:]


def _files(folder):
  return {p.relative_to(folder).as_posix(): p.read_bytes()
          for p in sorted(folder.rglob("*")) if p.is_file()}


def _flat(metrics, prefix="eval"):
  out = {}
  for key, value in metrics.items():
    if key == "per_class":
      continue
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}/{key}"))
    else:
      out[f"{prefix}/{key}"] = float(value)
  return out


@pytest.mark.slow
def test_two_processes_evaluate_as_one(tmp_path, cache_dir):
  dataset, workdir = tmp_path / "synthetic", tmp_path / "run"
  synthetic.generate_synthetic_dataset(dataset, num_train=8, num_val=3, image_size=(128, 128),
                                       seed=0)
  trainers = _two_processes([sys.executable, "train.py", *_flags(dataset, workdir)], cache_dir)
  _wait_all(trainers, 600)
  assert rh.checkpoint_steps(workdir)[-1] == rh.TOTAL_STEPS

  evaluate = [sys.executable, "evaluate.py", *_flags(dataset, workdir)]
  single_out, multi_out = tmp_path / "eval_single", tmp_path / "eval_multi"
  code, output = rh.run(evaluate + [f"--output_dir={single_out}"],
                        rh.subprocess_env(cache_dir, devices=1), timeout=600)
  assert code == 0, output[-4000:]
  evaluators = _two_processes(evaluate + [f"--output_dir={multi_out}"], cache_dir)
  _wait_all(evaluators, 600)

  single, multi = _files(single_out), _files(multi_out)
  assert sorted(single) == sorted(multi)
  assert sum(name.endswith(".png") for name in single) == 3
  for name in single:
    assert single[name] == multi[name], name
  metrics = json.loads(single["metrics.json"])
  assert metrics["num_images"] == 3 and metrics["Things"]["n"] > 0
  # Every process prints process 0's metrics.
  tables = [re.search(r"All\s+\|.*", e.output).group(0) for e in evaluators]
  assert tables[0] == tables[1] == re.search(r"All\s+\|.*", output).group(0)

  # The evaluation at the end of the 2-process training run: the same numbers on both.
  expected = _flat(metrics)
  for trainer in trainers:
    logged = re.search(rf"Evaluation at step {rh.TOTAL_STEPS}: (\{{.*\}})", trainer.output)
    assert logged, trainer.output[-3000:]
    assert ast.literal_eval(logged.group(1)) == expected
