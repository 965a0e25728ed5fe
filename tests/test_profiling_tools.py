"""The profiling probes of tools/profiling/: a cheap check that each one imports (with the
user's benchmarks it builds on) and parses its flags, without TensorFlow. The probes time the
network piece by piece; running them is a few minutes of CPU per probe, which the suite leaves to
whoever profiles (their commands are in each docstring and in tools/profiling/README.md).
"""
import os
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOLS = REPO_ROOT / "tools" / "profiling"
PROBES = ("e2e_fusion", "network_parts", "op_profile", "profile_step", "resize_micro",
          "startup_time", "trace_time", "xla_flag_sweep")

# Each probe's `main(["--help"])` in one fresh interpreter: argparse prints the usage and exits
# with status 0. `tools/profiling` first on sys.path, as when a probe is run by path.
IMPORT_CHECK = """
import importlib, sys
sys.path.insert(0, {tools!r})
for name in {probes!r}:
  module = importlib.import_module(name)
  try:
    module.main(["--help"])
  except SystemExit as e:
    assert e.code == 0, (name, e.code)
  else:
    raise AssertionError(name + ": --help did not exit")
  print("PARSED", name)
print("TENSORFLOW_IMPORTED", "tensorflow" in sys.modules)
"""


def test_probes_import_and_parse_their_flags_without_tensorflow():
  assert sorted(p.stem for p in TOOLS.glob("*.py")) == sorted(PROBES)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
  result = subprocess.run(
      [sys.executable, "-c", IMPORT_CHECK.format(tools=str(TOOLS), probes=PROBES)],
      capture_output=True, text=True, env=env, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert [l for l in lines if l.startswith("PARSED ")] == [f"PARSED {p}" for p in PROBES]
  assert "TENSORFLOW_IMPORTED False" in lines


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
  sys.path.insert(0, str(TOOLS))
  import op_profile  # pylint: disable=g-import-not-at-top
  table = op_profile.instruction_table(HLO_WITH_TUPLES)
  assert table["custom-call.1"]["kind"] == "custom-call TopK"
  assert table["custom-call.1"]["op_name"] == "jit(f)/top_k"
  assert table["get-tuple-element"]["shape"] == "f32[8,2]{1,0}"
  assert table["tuple"]["kind"] == "tuple"
