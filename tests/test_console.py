"""The console of the entry points (`ciae_jax/console.py`): our lines, not the libraries' INFO."""
import logging
import pathlib
import re
import subprocess
import sys

from absl import logging as absl_logging
import pytest

from ciae_jax import console
import xla_flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# absl's Python line prefix: `I1202 02:06:26.571347 140319228156800 loop.py:277] ...`. (TF's C++
# lines at its import, `I0000 ... port.cc:153] oneDNN ...`, print before any Python logging
# can stop them; console.py does not try.)
ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ (\w+\.py):\d+\]", re.M)


def _record(pathname, level=logging.INFO):
  return logging.LogRecord("absl", level, pathname, 1, "message", None, None)


def test_the_filter_keeps_our_info_and_everyone_s_warnings():
  ours = str(REPO_ROOT / "ciae_jax" / "training" / "loop.py")
  theirs = "/usr/lib/python3/site-packages/orbax/checkpoint/checkpoint_manager.py"
  keep = console.OwnInfoOnly().filter
  assert keep(_record(ours)) and keep(_record(str(REPO_ROOT / "train.py")))
  assert not keep(_record(theirs)) and keep(_record(theirs, logging.WARNING))
  # configure() changes process-wide logging: put it back for the other tests of this worker.
  handler_filters = list(absl_logging.get_absl_handler().filters)
  levels = {name: logging.getLogger(name).level for name in console.QUIET_LOGGERS}
  verbosity = absl_logging.get_verbosity()
  try:
    console.configure(0)
    assert any(isinstance(f, console.OwnInfoOnly) for f in absl_logging.get_absl_handler().filters)
    assert logging.getLogger("orbax").level == logging.WARNING
    console.configure(1)  # --verbosity=1: everything again.
    assert not any(isinstance(f, console.OwnInfoOnly)
                   for f in absl_logging.get_absl_handler().filters)
  finally:
    absl_logging.get_absl_handler().filters[:] = handler_filters
    absl_logging.get_absl_logger().removeFilter(console._FILTER)  # pylint: disable=protected-access
    for name, level in levels.items():
      logging.getLogger(name).setLevel(level)
    absl_logging.set_verbosity(verbosity)


@pytest.mark.slow
def test_a_training_run_prints_no_library_info(tmp_path):
  env = xla_flags.env_with_device_count(1, JAX_DISABLE_MOST_OPTIMIZATIONS="true",
                                        CIAE_JAX_CACHE="0")
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # As a user's shell: console.py sets it.
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "train.py", "--config", "configs/synthetic.py:small", "--workdir",
       str(workdir), f"--config.dataset.root={tmp_path / 'data'}",
       "--config.dataset.synthetic.num_train=4", "--config.dataset.synthetic.num_val=2",
       "--config.batch_size=2", "--config.total_steps=2", "--config.log_every_steps=1",
       "--config.checkpoint_every_steps=1", "--config.eval_every_steps=0"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-4000:]
  # The run's outputs: both checkpoints and the TensorBoard metrics.
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
      "1", "2"]
  assert list(workdir.glob("events.out.tfevents.*"))
  # Two checkpoint writes, yet none of orbax's INFO records (its options dump among them).
  assert "CheckpointManagerOptions" not in output, output[-4000:]
  ours = {p.name for p in (REPO_ROOT / "ciae_jax").rglob("*.py")} | {"train.py"}
  info_from = {name for level, name in ABSL_LINE.findall(output) if level == "I"}
  assert info_from and info_from <= ours, info_from - ours
  assert "loop.py" in info_from  # Our progress lines (one per logging interval) stay.
