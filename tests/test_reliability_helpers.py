"""Shared pieces of the reliability tests: train.py in subprocesses, checkpoints read back.

The runs use `configs/synthetic.py:small` shrunk further (FPN/semantic width 16, D = 8, one
device, global batch 2, no evaluation) on a synthetic dataset generated in the test's
temporary folder. Subprocesses get one CPU device (no cross-thread collectives to wait on),
XLA's quick compilation mode, and a persistent compilation cache shared by the runs of one
test, so that only the first run pays for compiling. Checkpoints are read with orbax directly,
not through the code under test. No test lives here.
"""
import os
import pathlib
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

import xla_flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


# The runs of all reliability tests share one model, shapes and total_steps, so their
# programs compile once per session (the persistent cache of conftest.py's `cache_dir`).
TOTAL_STEPS = 8


def free_port() -> int:
  """A TCP port free on localhost now: the coordinator address of a multi-process run."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def subprocess_env(cache_dir: pathlib.Path, *, devices: int = 1) -> dict[str, str]:
  """Environment of a training subprocess: `devices` CPU devices, quick XLA, shared cache."""
  env = xla_flags.env_with_device_count(devices)  # Keeps the user's other XLA flags.
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "true"
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  env["CUDA_VISIBLE_DEVICES"] = ""
  env["PYTHONUNBUFFERED"] = "1"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests"),
                                       env.get("PYTHONPATH", "")])
  return env


def train_flags(dataset_root: pathlib.Path, workdir: pathlib.Path, *, batch_size: int = 2,
                total_steps: int = TOTAL_STEPS, extra: Sequence[str] = ()) -> list[str]:
  """train.py's flags: the tiny config, a dataset at dataset_root, one log line per step."""
  return [
      "--config", str(REPO_ROOT / "configs" / "synthetic.py:small"),
      "--workdir", str(workdir), f"--config.total_steps={total_steps}",
      f"--config.batch_size={batch_size}", "--config.log_every_steps=1",
      "--config.eval_every_steps=0", "--config.parallel=pmap",
      f"--config.dataset.root={dataset_root}",
      "--config.dataset.synthetic.num_train=8", "--config.dataset.synthetic.num_val=2",
      "--config.model.fpn_dim=16", "--config.model.semantic_dim=16",
      "--config.model.embed_dim=8", *extra]


def train_command(dataset_root: pathlib.Path, workdir: pathlib.Path, **kwargs) -> list[str]:
  """`python train.py` with `train_flags`."""
  return [sys.executable, "train.py", *train_flags(dataset_root, workdir, **kwargs)]


class Process:
  """A subprocess whose merged stdout/stderr is read line by line in a thread."""

  def __init__(self, command: Sequence[str], env: dict[str, str], cwd: pathlib.Path = REPO_ROOT):
    self.command = list(command)
    self.popen = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, bufsize=1)
    self.lines: list[str] = []
    self._queue: queue.Queue[Optional[str]] = queue.Queue()
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.popen.stdout:
      self.lines.append(line)
      self._queue.put(line)
    self._queue.put(None)

  def wait_for(self, pattern: str, timeout: float) -> re.Match:
    """The first match of `pattern` in a new output line; AssertionError on exit or timeout."""
    deadline = time.time() + timeout
    compiled = re.compile(pattern)
    while True:
      try:
        line = self._queue.get(timeout=max(deadline - time.time(), 0.01))
      except queue.Empty:
        line = ""
      if line is None:
        raise AssertionError(f"process exited ({self.popen.wait()}) before {pattern!r}:\n"
                             f"{self.output[-4000:]}")
      match = compiled.search(line) if line else None
      if match:
        return match
      if time.time() > deadline:
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.output[-4000:]}")

  def wait(self, timeout: float) -> int:
    """Exit status (killing the process if it runs past `timeout`)."""
    try:
      code = self.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.popen.kill()
      self.popen.wait()
      raise AssertionError(
          f"{self.command} ran past {timeout} s:\n{self.output[-4000:]}") from None
    self._reader.join(timeout=10)
    return code

  def send(self, signum: int) -> None:
    self.popen.send_signal(signum)

  @property
  def output(self) -> str:
    return "".join(self.lines)


def run(command: Sequence[str], env: dict[str, str], timeout: float = 300) -> tuple[int, str]:
  """(exit status, merged output) of a subprocess run to its end."""
  process = Process(command, env)
  code = process.wait(timeout)
  return code, process.output


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  """Steps of the complete checkpoints (orbax renames a finished one to its step number)."""
  directory = workdir / "checkpoints"
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def read_checkpoint(workdir: pathlib.Path, step: int) -> dict[str, Any]:
  """The saved state dict of one step, read with orbax directly (numpy leaves)."""
  path = workdir / "checkpoints" / str(step) / "default"
  return ocp.PyTreeCheckpointer().restore(str(path))


def assert_trees_equal(actual: Any, expected: Any, what: str) -> None:
  """Same structure, same dtypes, bit-identical values."""
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
  flat_e, tree_e = jax.tree_util.tree_flatten_with_path(expected)
  assert tree_a == tree_e, f"{what}: tree structures differ"
  for (path, a), (_, e) in zip(flat_a, flat_e):
    a, e = np.asarray(a), np.asarray(e)
    assert a.dtype == e.dtype, f"{what}{jax.tree_util.keystr(path)}: {a.dtype} vs {e.dtype}"
    np.testing.assert_array_equal(a, e, err_msg=f"{what}{jax.tree_util.keystr(path)}")


def trees_differ(a: Any, b: Any) -> bool:
  """Whether any leaf differs (for checks that a run actually moved)."""
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
