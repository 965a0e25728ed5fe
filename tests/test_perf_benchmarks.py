"""The profiling benchmarks run at a tiny size with plain JAX: no TensorFlow, no torch needed."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

SMOKE = """
import sys
sys.path.insert(0, {bench!r})
import conv_micro, e2e_fusion, network_parts, op_profile, profile_step, resize_micro, xla_flag_sweep
tiny = ["--backbone", "resnet_tiny", "--repeats", "1", "--warmup", "1"]
network_parts.main(["--size", "128,128", "--parts", "backbone,fpn,head,embedding,network"] + tiny)
xla_flag_sweep.main(["--size", "128,128", "--settings", "default,eigen"] + tiny)
e2e_fusion.main(["--size", "128,128"] + tiny)
profile_step.main(["--size", "64,64", "--per_device_batch", "1",
                   "--pieces", "targets,forward,ciae_loss_grad,optimizer,step"] + tiny)
op_profile.main(["--program", "network", "--size", "128,128", "--backbone", "resnet_tiny",
                 "--calls", "1", "--top", "3"])
resize_micro.main(["--size", "128,128", "--batch", "1", "--repeats", "1"])
conv_micro.main(["--tiny", "--repeats", "1"])
print("TENSORFLOW_IMPORTED", "tensorflow" in sys.modules)
"""


def _run_script(script):
  """Runs a smoke script in a fresh CPU-only Python; returns its stdout lines."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=str(REPO_ROOT))
  result = subprocess.run(
      [sys.executable, "-c", script.format(bench=str(REPO_ROOT / "benchmarks"))],
      capture_output=True, text=True, env=env, timeout=1200, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout.splitlines()


def _payload(lines, name):
  return json.loads(next(l for l in lines if l.startswith(name + " ")).split(" ", 1)[1])


@pytest.mark.slow  # A few minutes of CPU: it compiles the tiny train step and a dozen programs.
def test_profiling_scripts_run_at_a_tiny_size_without_tensorflow():
  lines = _run_script(SMOKE)
  assert "TENSORFLOW_IMPORTED False" in lines

  parts = _payload(lines, "network_parts")["results"]
  for piece in ("backbone", "fpn", "head", "embedding", "network"):
    assert parts[piece]["median_ms"] > 0 and parts[piece]["gflop"] > 0, piece
  sweep = _payload(lines, "xla_flag_sweep")["summary"]
  assert sweep["default"]["hlo"]["network"]["library_fusions"]  # YNNPACK by default
  assert not sweep["eigen"]["same_hlo"] and sweep["eigen"]["max_rel_diff"] < 1e-4
  e2e = _payload(lines, "e2e_fusion")
  assert e2e["max_abs_diff"] == {"barrier": 0.0, "split": 0.0}
  step = _payload(lines, "profile_step")
  assert set(step["results"]) == {"targets", "forward", "ciae_loss_grad", "optimizer", "step"}
  assert step["results"]["step"]["gflop"] > step["results"]["forward"]["gflop"]
  profile = _payload(lines, "op_profile")
  assert profile["thunk_ms"] > 0 and profile["by_kind"]
  resize = _payload(lines, "resize_micro")["results"]
  assert all(r["max_value_diff"] < 1e-5 for r in resize.values())
  conv = _payload(lines, "conv_micro")
  assert all(r["dot"] > 0 and r["conv dx"] > 0 for r in conv["one_by_one"])
  assert all(max(r["relative_error"].values()) < 1e-5 for r in conv["one_by_one"])
  for row in conv["winograd"]:  # Winograd against lax: float32 rounding, F(4,3) the larger
    assert row["relative_error"]["lax"] == 0.0
    assert row["relative_error"]["F(2,3)"] < 1e-5 and row["relative_error"]["F(4,3)"] < 1e-4


PEER_SMOKE = """
import sys
sys.path.insert(0, {bench!r})
import network_parts, profile_step
tiny = ["--backbone", "resnet_tiny", "--repeats", "1", "--warmup", "1", "--peer"]
network_parts.main(["--size", "64,64", "--parts", "backbone"] + tiny)
profile_step.main(["--size", "64,64", "--per_device_batch", "1", "--pieces", "targets"] + tiny)
"""


@pytest.mark.slow  # torchvision's FCOS-R50 built and run at 64 x 64: about a minute of CPU.
def test_peer_pieces_run_where_torch_is_installed():
  """The `--peer` paths (torchvision FCOS pieces beside ours), in a subprocess: never in pytest."""
  if any(importlib.util.find_spec(name) is None for name in ("torch", "torchvision")):
    pytest.skip("torch / torchvision not installed (requirements-bench.txt): no peer to run")
  lines = _run_script(PEER_SMOKE)
  parts = _payload(lines, "network_parts")["results"]
  assert {"peer_backbone", "peer_fpn", "peer_head", "peer_model"} <= set(parts)
  assert parts["peer_backbone"]["gflop"] > 0
  step = _payload(lines, "profile_step")["results"]
  assert {"peer_forward", "peer_step"} <= set(step)


HLO_WITH_TUPLES = """HloModule m

ENTRY %main (p: f32[8,6]) -> (f32[8,2], s32[8,2]) {
  %p = f32[8,6]{1,0} parameter(0)
  %custom-call.1 = (f32[8,2]{1,0}, s32[8,2]{1,0}) custom-call(%p), """ \
    """custom_call_target="TopK", metadata={op_name="jit(f)/top_k"}
  %get-tuple-element = f32[8,2]{1,0} get-tuple-element(%custom-call.1), index=0
  ROOT %tuple = (f32[8,2]{1,0}, s32[8,2]{1,0}) tuple(%get-tuple-element, %get-tuple-element.1)
}
"""


def test_op_profile_reads_instructions_with_tuple_shapes():
  """TopK's custom call (the CIAE loss's top-K), multi-output fusions and while loops have tuple
  shapes; the table must hold them, or their time is missing from the profile."""
  sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
  import op_profile  # pylint: disable=g-import-not-at-top
  table = op_profile.instruction_table(HLO_WITH_TUPLES)
  assert table["custom-call.1"]["kind"] == "custom-call TopK"
  assert table["custom-call.1"]["op_name"] == "jit(f)/top_k"
  assert table["get-tuple-element"]["shape"] == "f32[8,2]{1,0}"
  assert table["tuple"]["kind"] == "tuple"
