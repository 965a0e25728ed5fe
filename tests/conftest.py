"""Test configuration: 8 simulated CPU devices, quiet TensorFlow, paths to the shared data."""
import os
import pathlib

import xla_flags

# Must be set before JAX initialises its backends: multi-device tests use 8 fake CPU devices.
# Only the device count flag is set (replaced if given); any other flag in the user's
# XLA_FLAGS is kept, here and in the subprocesses of the tests (tests/xla_flags.py), so that
# e.g. `XLA_FLAGS=--xla_cpu_max_isa=AVX2 bash scripts/test.sh` runs every process of the suite
# with the code XLA generates for an AVX2-only CPU.
# The user's flags as given to the first pytest process (xdist workers inherit it), for
# tests/test_suite_env.py.
os.environ.setdefault("CIAE_TESTS_USER_XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = xla_flags.with_device_count(8)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
COCO_SAMPLE = REPO_ROOT.parent / "shared" / "data" / "coco_panoptic_sample"


@pytest.fixture(scope="session")
def coco_sample_root() -> pathlib.Path:
  """The two real COCO val2017 images with their panoptic annotations."""
  if not COCO_SAMPLE.exists():
    raise FileNotFoundError(f"shared COCO sample not found at {COCO_SAMPLE}")
  return COCO_SAMPLE
