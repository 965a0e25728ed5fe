"""Test configuration: 8 simulated CPU devices, quiet TensorFlow, paths to the shared data."""
import os
import pathlib

# Must be set before JAX initialises its backends: multi-device tests use 8 fake CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
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
