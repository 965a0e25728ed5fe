"""The user's benchmarks (benchmarks/*.py, figures in benchmarks/RESULTS.md): the speed scripts run
at a tiny size without TensorFlow, their synthetic batch follows docs/interfaces.md, the peer is
skipped with a line when torch is absent, inference compiles once per padded image size, and the
PQ tool and input pipeline benchmarks run on a few small images. (The profiling probes of
tools/profiling/ are only import-checked: tests/test_profiling_tools.py.)
"""
import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ciae_jax import hparams
from ciae_jax.evaluation import runner
from ciae_jax.models import ciae as ciae_model
from ciae_jax.training import step as step_lib
import xla_flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import common  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

# Both scripts in one fresh interpreter (TensorFlow must stay out of sys.modules), on 2 CPU
# devices so that the training benchmark runs the data-parallel path.
SMOKE = """
import sys
sys.path.insert(0, {bench!r})
import inference_speed, train_speed
inference_speed.main(["--size", "128,128", "--backbone", "resnet_tiny", "--dtypes", "float32",
                      "--repeats", "1", "--warmup", "1"])
train_speed.main(["--size", "128,128", "--backbone", "resnet_tiny", "--dtypes", "float32",
                  "--per_device_batch", "1", "--steps", "1", "--repeats", "1", "--warmup", "1"])
print("TENSORFLOW_IMPORTED", "tensorflow" in sys.modules)
"""


@pytest.mark.slow  # ~70 s of CPU, most of it compiling the tiny train step once.
def test_scripts_run_at_a_tiny_size_without_tensorflow():
  env = xla_flags.env_with_device_count(2, JAX_DISABLE_MOST_OPTIMIZATIONS="1",
                                        JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
  result = subprocess.run(
      [sys.executable, "-c", SMOKE.format(bench=str(REPO_ROOT / "benchmarks"))],
      capture_output=True, text=True, env=env, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert "TENSORFLOW_IMPORTED False" in lines

  inference = json.loads(next(l for l in lines if l.startswith("inference_speed "))
                         .split(" ", 1)[1])
  ours = inference["ours"]["float32"]
  for part in ("end_to_end", "network", "postprocess", "detection", "fusion"):
    assert ours[part]["median_ms"] > 0, part
  # float64 arithmetic on the same numbers (JSON keeps float64 exactly): a few ulps, 1e-16.
  np.testing.assert_allclose(ours["fps"], 1e3 / ours["end_to_end"]["median_ms"], rtol=1e-9)
  assert ours["compiles"] == 1
  assert inference["args"]["padded"] == [128, 128]

  train = json.loads(next(l for l in lines if l.startswith("train_speed ")).split(" ", 1)[1])
  ours = train["ours"]["float32"]
  assert ours["devices"] == 2 and ours["global_batch"] == 2
  assert "make_train_step" in ours["step_source"]
  assert np.isfinite(ours["last_loss"]) and ours["last_loss"] > 0
  np.testing.assert_allclose(ours["images_per_s"], 2 * 1e3 / ours["step_ms"], rtol=1e-9)  # Same.
  assert ours["xla_memory_plan"]["total_bytes"] > 0
  assert ours["state_donated"]

  # Without torch (this CI machine) each script says why the peer is missing; with torch and
  # torchvision installed the subprocess ran the peer. Whether they are installed is read from
  # the import system without importing them: torch must never be imported in a pytest worker
  # that holds JAX (importing torch._dynamo / triton there crashed an xdist worker).
  if peer_installed():
    assert not any(l.startswith("peer skipped: ") for l in lines), result.stdout
    assert inference["peer"]["float32"]["fps"] > 0
    assert train["peer"]["float32"]["images_per_s"] > 0
  else:
    assert sum(l.startswith("peer skipped: ") for l in lines) == 2, result.stdout
    assert inference["peer"] is None and train["peer"] is None


def peer_installed() -> bool:
  """Whether torch and torchvision are installed (found by the import system, not imported)."""
  return all(importlib.util.find_spec(name) is not None for name in ("torch", "torchvision"))


@pytest.mark.parametrize("missing,message", [
    ("torch", "peer skipped: torch is not installed"),
    ("torchvision", "peer skipped: torchvision is not installed"),
])
def test_missing_peer_is_a_printed_line(monkeypatch, capsys, missing, message):
  if missing == "torchvision":
    monkeypatch.setitem(sys.modules, "torch", type(sys)("torch"))
    sys.modules["torch"].__version__ = "0.test"
  monkeypatch.setitem(sys.modules, missing, None)  # `import missing` raises ImportError.
  assert common.import_torchvision() is None
  assert message in capsys.readouterr().out


def test_synthetic_batch_follows_the_contract():
  size = (96, 160)
  batch = common.synthetic_batch(2, 3, size, max_segments=20, seed=5)
  step_lib.check_batch(batch, leading_axes=2)
  assert batch["image"].dtype == np.float32 and batch["segment_map"].dtype == np.int32
  for d in range(2):
    for b in range(3):
      segment_map = batch["segment_map"][d, b]
      for row in range(20):
        ys, xs = np.nonzero(segment_map == row + 1)
        if not batch["seg_valid"][d, b, row]:
          assert ys.size == 0 and batch["seg_class"][d, b, row] == 0
          continue
        box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        np.testing.assert_array_equal(batch["seg_box"][d, b, row], box)
        is_thing = batch["seg_class"][d, b, row] >= common.NUM_STUFF
        assert is_thing == batch["seg_is_thing"][d, b, row]
        assert batch["seg_class"][d, b, row] < common.NUM_STUFF + common.NUM_THINGS
      assert segment_map.min() >= 1  # The stuff bands cover the image: no void.


def test_sizes():
  assert common.parse_size("800,1344") == (800, 1344) == common.parse_size("800x1344")
  with pytest.raises(ValueError, match="--size"):
    common.parse_size("800")
  assert common.round_up((800, 1344), 128) == (896, 1408)
  assert common.round_up((800, 1344), 32) == (800, 1344)


def test_inference_compiles_once_per_padded_size():
  """Evaluation's predict function and the benchmark's: images of one padded size, any valid
  region, share one compiled program; another padded size compiles a second one."""
  import inference_speed  # pylint: disable=g-import-not-at-top
  model = ciae_model.build_model(dict(backbone="resnet_tiny", norm="gn", fpn_dim=16,
                                      head_convs=1, semantic_dim=16, embed_dim=8), 2)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                jnp.zeros((1, 128, 128, 3))))
  variables = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), variables)
  memory = jnp.ones((3, 8), jnp.float32) / np.sqrt(8)  # [num_stuff + 1, D]
  hp = hparams.HParams(inference=hparams.InferenceHParams(max_detections=5, pre_nms_top_n=20))
  predict = runner.make_predict_fn(model, hp, num_stuff=2)
  end_to_end = inference_speed.make_end_to_end(model, num_stuff=2)

  def batch(padded, valid, orig):
    return {"image": jnp.zeros((1, *padded, 3), jnp.float32),
            "image_size": jnp.asarray([valid], jnp.int32),
            "orig_size": jnp.asarray([orig], jnp.int32)}

  for valid, orig in (((128, 100), (256, 200)), ((90, 128), (180, 256)), ((64, 64), (64, 64))):
    b = batch((128, 128), valid, orig)
    jax.block_until_ready(predict(variables, memory, b))
    jax.block_until_ready(end_to_end(variables, memory, b["image"], b["image_size"]))
  assert predict._cache_size() == 1  # pylint: disable=protected-access
  assert end_to_end._cache_size() == 1  # pylint: disable=protected-access
  b = batch((128, 256), (128, 256), (128, 256))
  jax.block_until_ready(predict(variables, memory, b))
  assert predict._cache_size() == 2  # pylint: disable=protected-access


def _run_benchmark(args, timeout=300):
  """Runs `python benchmarks/...` from the repository root; returns its stdout."""
  env = xla_flags.env_with_device_count(1, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
  result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  return result.stdout


def test_pq_speed_runs_on_a_few_small_images():
  """The three evaluators agree on 4 images of 64 x 64 (the script checks it) and are timed."""
  out = _run_benchmark(["benchmarks/pq_speed.py", "--images", "4", "--size", "64", "--repeats",
                        "1", "--workers", "1"])
  for evaluator in ("panopticapi", "hotcoco", "ours", "ours_pillow"):
    assert any(l.startswith(evaluator + " ") for l in out.splitlines()), (evaluator, out)


@pytest.mark.slow  # ~10 s of CPU: TensorFlow's import and one decoded batch of 2 COCO images.
def test_input_pipeline_runs_on_the_coco_sample(coco_sample_root):
  out = _run_benchmark(["benchmarks/input_pipeline.py", "--root", str(coco_sample_root),
                        "--threads", "1", "--repeats", "1", "--batch", "2", "--batches", "1",
                        "--warmup", "1", "--num_images", "4"])
  row = next(l for l in out.splitlines() if l.split("|")[0].strip() == "1")  # threads = 1
  assert float(row.split("|")[1]) > 0, out  # images/s
