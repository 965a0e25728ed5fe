"""The prepared GPU run (benchmarks/gpu/) on the CPU at test sizes, with TensorFlow, clu,
ml_collections and pycocotools blocked from import in every process it starts: every stage
writes well-formed JSON, the correctness stage passes against the shipped references, and the
summary tables every stage.
"""
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

import xla_flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
GPU_DIR = REPO_ROOT / "benchmarks" / "gpu"
sys.path.insert(0, str(GPU_DIR))
import run as gpu_run  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import stages  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import summary  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

BLOCKED = ("tensorflow", "clu", "ml_collections", "pycocotools")
# On PYTHONPATH before site-packages, so every Python process of the run loads it first:
# `import tensorflow` (or a submodule) then raises ImportError, as where it is not installed.
SITECUSTOMIZE = f"""
import sys
for _name in {BLOCKED!r}:
  sys.modules[_name] = None
"""


def blocked_env(tmp_path: pathlib.Path, devices: int = 1) -> dict[str, str]:
  site = tmp_path / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
  return xla_flags.env_with_device_count(
      devices, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
      PYTHONPATH=f"{site}:{REPO_ROOT}",
      JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"))


def peer_installed() -> bool:
  """Whether torch and torchvision are installed (found by the import system, not imported)."""
  return all(importlib.util.find_spec(name) is not None for name in ("torch", "torchvision"))


# Every stage kind once: inference in float32, training in bfloat16 (each kind's other dtype
# is the same function with another `dtype` argument; tests/test_bf16.py checks the model in
# both). Eight processes, ~100 s of CPU.
STAGES = ("env", "inference_float32", "inference_peer", "train_peer", "correctness",
          "train_bfloat16", "pool_float32", "pool_bfloat16")


@pytest.mark.slow
def test_tiny_run_without_tensorflow_writes_every_stage(tmp_path):
  env = blocked_env(tmp_path)
  out = tmp_path / "out"
  assert {name.rsplit("_", 1)[0] for name in STAGES} == {
      name.rsplit("_", 1)[0] for name in gpu_run.PARTS["all"]}  # Every kind of stage.
  result = subprocess.run(
      [sys.executable, str(GPU_DIR / "run.py"), "--stages", ",".join(STAGES), "--tiny",
       "--out", str(out), "--budget_s", "0", "--cache_dir", str(tmp_path / "unused")],
      capture_output=True, text=True, env=env, timeout=900, check=False, cwd=REPO_ROOT)
  logs = {p.name: p.read_text()[-2000:] for p in (out / "logs").glob("*.log")}
  assert result.returncode == 0, (result.stdout[-3000:], logs)

  payloads = {}
  for name in STAGES:
    payload = json.loads((out / f"{name}.json").read_text())
    assert payload["stage"] == name and payload["tiny"] is True, name
    payloads[name] = payload
  for name in ("env", "inference_float32", "train_bfloat16", "correctness"):
    assert payloads[name]["status"] == "ok", (name, payloads[name])
  for name in ("pool_float32", "pool_bfloat16"):  # The pool caps GPU memory: none here.
    assert payloads[name]["status"] == "skipped" and "no GPU" in payloads[name]["reason"], name

  env_stage = payloads["env"]
  assert env_stage["platforms"] == ["cpu"]
  assert env_stage["blocked_importable"] == {name: False for name in BLOCKED}
  assert "TF32" in env_stage["precision_note"]
  assert set(env_stage["choices"]["cpu"].values()) <= {"fast", "plain"}
  inference = payloads["inference_float32"]
  assert inference["dtype"] == "float32" and inference["fps"] > 0
  for part in ("end_to_end", "network", "detection", "fusion"):
    assert inference[part]["median_ms"] > 0, part
  train = payloads["train_bfloat16"]
  assert train["dtype"] == "bfloat16" and train["images_per_s"] > 0 and train["last_loss"] > 0
  assert train["xla_memory_plan"]["total_bytes"] > 0
  check = payloads["correctness"]
  assert check["passed"], check
  assert check["losses_ok"] and check["panoptic_ok"]

  for name in ("inference_peer", "train_peer"):
    if peer_installed():
      assert payloads[name]["status"] == "ok", payloads[name]
    else:
      assert payloads[name] == {**payloads[name], "status": "skipped",
                              "reason": "torch is not installed"}

  summary = (out / "summary.md").read_text()
  for heading in ("## Inference", "## Training", "GiB pool", "## Correctness", "## Stages"):
    assert heading in summary
  assert "passed" in summary and summary.count("| ok |") == 4


def test_a_stage_past_its_limit_is_recorded_as_a_timeout(tmp_path):
  out = tmp_path / "out"
  (out / "logs").mkdir(parents=True)
  # Starting Python and importing JAX takes far more than 10 ms.
  payload = gpu_run.run_stage("env", out, limit_s=0.01, tiny=True,
                              env=gpu_run.stage_env(str(tmp_path / "cache")))
  assert payload["status"] == "timeout"
  assert json.loads((out / "env.json").read_text())["status"] == "timeout"


def test_stages_past_the_budget_are_not_started(tmp_path):
  out = tmp_path / "out"
  assert gpu_run.main(["--stages", "env,correctness", "--out", str(out), "--budget_s", "5"]) == 1
  for name in ("env", "correctness"):
    assert json.loads((out / f"{name}.json").read_text())["status"] == "not_run"
  assert "not_run" in (out / "summary.md").read_text()


@pytest.mark.parametrize("card_gib", [11, 16, 24, 79.6, 80, 139.8])
def test_pool_fraction_never_exceeds_11_gib(card_gib):
  card = int(card_gib * 2**30)
  fraction = stages.pool_fraction(card)
  pool = float(f"{fraction:.4f}") * card  # What the allocator reads from the variable's text.
  # Rounded down to 4 decimals: at most 1e-4 of the card (< 14 MiB of 140 GiB) under 11 GiB.
  assert 11 * 2**30 - 1e-4 * card <= pool <= 11 * 2**30


def _write(folder: pathlib.Path, name: str, payload: dict) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  (folder / f"{name}.json").write_text(json.dumps({"status": "ok", "stage": name, **payload}))


def test_summary_says_which_targets_are_met(tmp_path):
  part1, part2 = tmp_path / "part1", tmp_path / "part2"
  timing = {"median_ms": 10.0}
  for dtype, fps in (("float32", 70.0), ("bfloat16", 90.0)):
    _write(part1, f"inference_{dtype}", {
        "fps": fps, "end_to_end": {"median_ms": 1e3 / fps}, "network": timing,
        "detection": timing, "fusion": timing, "size": [800, 1344]})
  _write(part1, "inference_peer", {"float32": {"fps": 30.0}, "bfloat16": {"fps": 50.0}})
  _write(part1, "train_peer", {"frozen_bn": {"float32": {"images_per_s": 10.0},
                                             "bfloat16": {"images_per_s": 10.0}},
                               "literal": {"float32": {"images_per_s": 8.0},
                                           "bfloat16": {"images_per_s": 9.0}}})
  for dtype, rate in (("float32", 13.0), ("bfloat16", 12.0)):
    _write(part2, f"train_{dtype}", {
        "images_per_s": rate, "step_ms": 2e3 / rate, "compile_s": 60.0,
        "peak_memory": {"peak_bytes": 9 * 2**30}, "per_device_batch": 2, "size": [800, 1344]})
  _write(part2, "pool_float32", {"runs": True, "peak_bytes": 10 * 2**30, "within_target": True,
                                 "mem_fraction": 0.1381})
  _write(part2, "pool_bfloat16", {"runs": False, "error": "RESOURCE_EXHAUSTED: out of memory"})
  text = summary.render([part1, part2])
  lines = text.splitlines()
  assert ("| float32 | 70.0 | 14.29 | 10.00 | 10.00 | 10.00 | 30.0 | 2.33 | >= 60 fps: met | "
          ">= 2x peer: met |") in lines
  # 90 fps bfloat16: under 100 fps, and 1.8x the peer's 50 fps.
  assert ("| bfloat16 | 90.0 | 11.11 | 10.00 | 10.00 | 10.00 | 50.0 | 1.80 | >= 100 fps: "
          "**not met** | >= 2x peer: **not met** |") in lines
  assert "| float32 | 13.00 | 153.8 | 9.00 GiB | 60 | 10.00 | 8.00 | 1.30 | >= 1.3x: met |" in lines
  assert any(l.startswith("| bfloat16 | 12.00 |") and "1.20 | >= 1.3x: **not met**" in l
             for l in lines)
  assert "| float32 | 0.138 | yes | 10.00 GiB | <= 11 GiB: met |" in lines
  assert any(l.startswith("| bfloat16 | n/a | no: RESOURCE_EXHAUSTED") and "**not met**" in l
             for l in lines)
  assert "not passed: not run" in text  # No correctness stage in either folder.
