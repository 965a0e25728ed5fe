"""Seconds from `python train.py` to its milestones: devices up, state ready, first step, exit.

Every start of a run pays for imports (JAX, TensorFlow for tf.data and the summary writer),
the input pipeline's graph, the step-0 state and the step's trace, even when the persistent
compilation cache holds every program. This runs `train.py` on the small synthetic config
(narrowed further: FPN width 16, D = 8, batch 2, one CPU device, XLA's quick mode, as the
reliability tests run it) with a compilation cache of its own: one run to fill it, then
`--repeats` timed runs, each on a fresh workdir; it prints the median of each milestone.

  python tools/profiling/startup_time.py --repeats 3
  python tools/profiling/startup_time.py --repo /path/to/another/checkout   # its train.py
"""
import argparse
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
# Milestone -> the first log line that marks it (None: the process exits).
MILESTONES = {"devices": r"JAX process \d+/", "state": r"Training from step",
              "first_step": r"step 1/", "exit": None}


def train_command(root: pathlib.Path, workdir: pathlib.Path, steps: int) -> list[str]:
  return [sys.executable, "train.py", "--config", "configs/synthetic.py:small",
          "--workdir", str(workdir), f"--config.total_steps={steps}", "--config.batch_size=2",
          "--config.log_every_steps=1", "--config.eval_every_steps=0",
          f"--config.checkpoint_every_steps={steps}", f"--config.dataset.root={root}",
          "--config.dataset.synthetic.num_train=8", "--config.dataset.synthetic.num_val=2",
          "--config.model.fpn_dim=16", "--config.model.semantic_dim=16",
          "--config.model.embed_dim=8"]


def time_once(repo: pathlib.Path, folder: pathlib.Path, steps: int) -> dict[str, float]:
  """Seconds from the start of one run to each milestone."""
  workdir = folder / "run"
  shutil.rmtree(workdir, ignore_errors=True)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="true",
             JAX_COMPILATION_CACHE_DIR=str(folder / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONUNBUFFERED="1",
             PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
  start = time.perf_counter()
  process = subprocess.Popen(train_command(folder / "data", workdir, steps), cwd=repo, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  seen, lines = {}, []
  for line in process.stdout:
    lines.append(line)
    for name, pattern in MILESTONES.items():
      if pattern and name not in seen and re.search(pattern, line):
        seen[name] = time.perf_counter() - start
  if process.wait() != 0:
    raise RuntimeError(f"train.py failed (status {process.returncode}):\n"
                       + "".join(lines[-30:]))
  seen["exit"] = time.perf_counter() - start
  missing = [name for name in MILESTONES if name not in seen]
  if missing:
    raise RuntimeError(f"train.py printed no line for {missing}:\n" + "".join(lines[-30:]))
  return seen


def main(argv: list[str] | None = None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=3, help="timed runs after the first")
  parser.add_argument("--steps", type=int, default=8, help="training steps of each run")
  parser.add_argument("--repo", type=pathlib.Path, default=REPO_ROOT,
                      help="the checkout whose train.py runs (default: this one)")
  args = parser.parse_args(argv)
  if args.repeats < 1 or args.steps < 1:
    parser.error("--repeats and --steps must be >= 1")
  with tempfile.TemporaryDirectory(prefix="ciae-startup-") as folder:
    folder = pathlib.Path(folder)
    time_once(args.repo, folder, args.steps)  # Generates the data and fills the cache.
    runs = []
    for index in range(args.repeats):
      runs.append(time_once(args.repo, folder, args.steps))
      print(f"run {index + 1}/{args.repeats}: "
            + ", ".join(f"{k} {v:.2f} s" for k, v in runs[-1].items()), flush=True)
  medians = {name: statistics.median(run[name] for run in runs) for name in MILESTONES}
  print(f"{args.repo}: medians of {args.repeats}: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in medians.items()))
  return medians


if __name__ == "__main__":
  main()
