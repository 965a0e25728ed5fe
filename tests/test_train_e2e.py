"""`python train.py` end to end in a subprocess: data, steps, events, checkpoints, evaluation.

The real entry point with the real input pipeline (the synthetic dataset is generated into
the test's temporary folder), the `configs/synthetic.py:small` config shrunk further by
`--config.x=...` overrides, on the 8 fake CPU devices of tests/conftest.py under
`parallel=shard_map` (the pmap path of the loop runs in tests/test_train_resume.py), with a
per-pixel loss from a module of the user's own (docs/losses.md "Write a loss variant", as written
there).
"""
import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import xla_flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TOTAL_STEPS = 6
# docs/losses.md, "Write a loss variant".
USER_LOSS = """
import jax.numpy as jnp

def soft_margin(similarity, own, counted, *, scale=4.0):
  is_own = own[:, None] == jnp.arange(similarity.shape[1])[None, :]  # [C, Q]
  s_own = jnp.sum(jnp.where(is_own, similarity, 0.0), axis=1)  # [C]
  gaps = jnp.where(counted & ~is_own, similarity - s_own[:, None], -2.0)  # [C, Q]
  return jnp.mean(jnp.logaddexp(0.0, scale * gaps), axis=1)  # [C]
"""


@pytest.mark.slow
def test_train_py_runs_end_to_end(tmp_path):
  workdir = tmp_path / "run"
  env = xla_flags.env_with_device_count(8)  # Keeps the user's other XLA flags.
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "true"  # Compile time dominates this short run.
  (tmp_path / "my_losses.py").write_text(textwrap.dedent(USER_LOSS))
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
  command = [
      sys.executable, "train.py", "--config", "configs/synthetic.py:small",
      "--workdir", str(workdir), f"--config.total_steps={TOTAL_STEPS}",
      "--config.log_every_steps=2", "--config.checkpoint_every_steps=3",
      "--config.batch_size=8", "--config.parallel=shard_map",
      f"--config.dataset.root={tmp_path / 'synthetic'}",
      "--config.dataset.synthetic.num_train=8", "--config.dataset.synthetic.num_val=2",
      "--config.model.fpn_dim=16", "--config.model.semantic_dim=16",
      "--config.model.embed_dim=8",
      "--config.loss.kind=my_losses:soft_margin", "--config.loss.params={'scale': 2.0}",
  ]
  result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-5000:]

  # What no output file holds: the run used shard_map over the 8 devices.
  assert "(shard_map, 8 devices, global batch 8)" in output, output[-3000:]

  events = list(workdir.glob("events.out.tfevents.*"))
  assert events, sorted(p.name for p in workdir.iterdir())
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  accumulator = event_accumulator.EventAccumulator(str(workdir))
  accumulator.Reload()
  tags = set(accumulator.Tags()["tensors"]) | set(accumulator.Tags()["scalars"])
  assert {"train/loss", "train/loss_ciae", "train/learning_rate"} <= tags, sorted(tags)
  assert "steps_per_sec" in tags, sorted(tags)  # clu's ReportProgress: the speed, per interval.
  # The metrics of every log step, as written (not as logged): finite positive losses.
  losses = _series(accumulator, "train/loss")
  assert [step for step, _ in losses] == [2, 4, 6], losses
  assert all(math.isfinite(loss) and loss > 0 for _, loss in losses), losses

  recorded = json.loads((workdir / "config.json").read_text())
  assert recorded["loss.kind"] == "my_losses:soft_margin"
  assert recorded["loss.params.scale"] == 2.0

  checkpoints = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                       if p.name.isdigit())
  assert checkpoints == [3, 6]
  assert (tmp_path / "synthetic" / "annotations" / "panoptic_train2017.json").is_file()

  # The evaluation at the end goes through the default hook (`loop.evaluate_in_memory`).
  assert "eval/All/pq" in tags and "eval/Things/pq" in tags, sorted(tags)
  assert [step for step, _ in _series(accumulator, "eval/All/pq")] == [TOTAL_STEPS]


def _series(accumulator, tag):
  """[(step, value)] of a scalar summary, written as a tensor (clu) or as a scalar."""
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  if tag in accumulator.Tags()["scalars"]:
    return [(e.step, float(e.value)) for e in accumulator.Scalars(tag)]
  return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
          for e in accumulator.Tensors(tag)]
