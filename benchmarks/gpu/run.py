r"""The prepared GPU run: stages in their own processes, each under a time limit, in two parts
that each fit one device call of at most 8 minutes.

  PYTHONPATH=. python benchmarks/gpu/run.py --part part1 --out OUT   # ~5-7 min on an H100
  PYTHONPATH=. python benchmarks/gpu/run.py --part part2 --out OUT   # ~5-7 min
  PYTHONPATH=. python benchmarks/gpu/run.py --summarize OUT1 OUT2    # one summary of both
  bash benchmarks/gpu/run.sh part1 OUT                               # the same as the first

Parts (`stages.py` describes each stage):
  part1: env, inference_float32, inference_bfloat16, inference_peer, train_peer
  part2: env, correctness, train_float32, pool_float32, train_bfloat16, pool_bfloat16
  all:   every stage once (the CPU test, with --tiny)

Each stage writes `OUT/NAME.json` when it finishes and its output to `OUT/logs/NAME.log`; a
stage that runs past its limit is killed and `OUT/NAME.json` says "timeout" (the stages before
it keep their files). The part's limit (`--budget_s`, default 465 s) caps every stage's limit
by the time left; a stage with under 20 s left is not started ("not_run"). At the end
`OUT/summary.md` (also printed) tables every stage of OUT with the targets met or not.

Nothing is installed or downloaded: JAX, flax, optax, torch and torchvision as the machine has
them, `PYTHONPATH=.`; no TensorFlow, clu, ml_collections or pycocotools is imported. Programs
are cached in `--cache_dir` (JAX's persistent compilation cache), so the 11 GiB pool stages
reuse the train stages' compiled steps. `--tiny` runs the same stages at test sizes on the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import summary  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

PARTS = {
    "part1": ("env", "inference_float32", "inference_bfloat16", "inference_peer", "train_peer"),
    "part2": ("env", "correctness", "train_float32", "pool_float32", "train_bfloat16",
              "pool_bfloat16"),
}
PARTS["all"] = tuple(dict.fromkeys(PARTS["part1"] + PARTS["part2"]))
# Each stage's limit in seconds at full size (R50 compiles take 1-2 minutes each on an H100);
# --tiny multiplies them by TINY_FACTOR (a shared CPU compiles slowly).
LIMITS_S = {"env": 90, "inference_float32": 200, "inference_bfloat16": 180,
            "inference_peer": 120, "train_peer": 150, "correctness": 150, "train_float32": 210,
            "train_bfloat16": 210, "pool_float32": 120, "pool_bfloat16": 120}
TINY_FACTOR = 3
MIN_START_S = 20  # A stage is not started with less time left.


def run_stage(name: str, out: pathlib.Path, *, limit_s: float, tiny: bool,
              env: dict[str, str]) -> dict:
  """Runs one stage in its own process group; returns its JSON (written by it or for it)."""
  log_path = out / "logs" / f"{name}.log"
  command = [sys.executable, str(HERE / "stages.py"), name, "--out", str(out)]
  if tiny:
    command.append("--tiny")
  start = time.time()
  with open(log_path, "w") as log:
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                               cwd=REPO_ROOT, start_new_session=True)
    try:
      code = process.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
      os.killpg(process.pid, signal.SIGKILL)  # The stage and any child it started.
      process.wait()
      code = None
  path = out / f"{name}.json"
  if code is None or not path.is_file():
    tail = log_path.read_text(errors="replace")[-3000:]
    payload = {"status": "timeout" if code is None else "failed", "stage": name,
               "tiny": tiny, "limit_s": limit_s, "wall_s": time.time() - start,
               "error": (f"killed after {limit_s:.0f} s" if code is None
                         else f"exit status {code} without a JSON file") + f"; log: {tail}"}
    path.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    return payload
  return json.loads(path.read_text())


def stage_env(cache_dir: str) -> dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
  # JAX and the PyTorch peer never share a process; JAX grows its pool as needed.
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  env.setdefault("JAX_COMPILATION_CACHE_DIR", cache_dir)
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  return env


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--part", choices=sorted(PARTS), default="all")
  parser.add_argument("--stages", default="", help="comma-separated stages instead of --part")
  parser.add_argument("--out", help="output folder (created)")
  parser.add_argument("--tiny", action="store_true", help="test sizes (CPU)")
  parser.add_argument("--budget_s", type=float, default=465.0,
                      help="the part's time limit in seconds (0: none)")
  parser.add_argument("--cache_dir", default="/tmp/ciae_gpu_run_jax_cache",
                      help="JAX's persistent compilation cache")
  parser.add_argument("--summarize", nargs="+", metavar="DIR",
                      help="only print the summary of these output folders")
  args = parser.parse_args(argv)
  if args.summarize:
    print(summary.render(args.summarize))
    return 0
  if not args.out:
    parser.error("--out is required")
  names = [s for s in args.stages.split(",") if s] or list(PARTS[args.part])
  unknown = [s for s in names if s not in LIMITS_S]
  if unknown:
    parser.error(f"unknown stages {unknown}; known: {sorted(LIMITS_S)}")
  out = pathlib.Path(args.out)
  (out / "logs").mkdir(parents=True, exist_ok=True)
  env = stage_env(args.cache_dir)
  start = time.time()
  failed = 0
  for name in names:
    limit = LIMITS_S[name] * (TINY_FACTOR if args.tiny else 1)
    if args.budget_s:
      left = args.budget_s - (time.time() - start)
      if left < MIN_START_S:
        (out / f"{name}.json").write_text(json.dumps(
            {"status": "not_run", "stage": name, "tiny": args.tiny,
             "reason": f"{left:.0f} s left of the part's {args.budget_s:.0f} s"}) + "\n")
        print(f"{name}: not run ({left:.0f} s left)", flush=True)
        failed += 1
        continue
      limit = min(limit, left - 5)
    payload = run_stage(name, out, limit_s=limit, tiny=args.tiny, env=env)
    print(f"{name}: {payload.get('status')} in {payload.get('wall_s', 0):.0f} s "
          f"(limit {limit:.0f} s)", flush=True)
    failed += payload.get("status") not in ("ok", "skipped")
  text = summary.render([out])
  (out / "summary.md").write_text(text + "\n")
  print(text)
  print(f"total {time.time() - start:.0f} s; outputs in {out}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
