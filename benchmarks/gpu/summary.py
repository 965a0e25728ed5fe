"""The markdown summary of a GPU run: the stages' JSON files -> tables with the targets.

  python benchmarks/gpu/summary.py DIR [DIR ...]     # prints it (run.py also writes summary.md)

With several folders (the two calls of one run) a stage found in more than one is taken from
the last; `env` is listed once per folder. Targets are met or not met by the numbers in the
files; "n/a" says which number is missing.
"""
from __future__ import annotations

import json
import pathlib
import sys
from typing import Any, Sequence

GIB = 2**30
# The targets of the run (benchmarks/gpu/README.md).
INFER_MIN_FPS = {"float32": 60.0, "bfloat16": 100.0}
INFER_MIN_RATIO = 2.0
TRAIN_MIN_RATIO = 1.3
POOL_MAX_GIB = 11.0


def load(dirs: Sequence[str | pathlib.Path]) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
  """(stage name -> payload, [(folder, env payload)]) from the folders' `*.json`."""
  stages: dict[str, Any] = {}
  envs = []
  for folder in dirs:
    for path in sorted(pathlib.Path(folder).glob("*.json")):
      try:
        payload = json.loads(path.read_text())
      except json.JSONDecodeError as e:
        payload = {"status": "failed", "error": f"{path}: not JSON ({e})"}
      if path.stem == "env":
        envs.append((str(folder), payload))
      stages[path.stem] = payload
  return stages, envs


def _met(ok: bool | None, why: str = "") -> str:
  if ok is None:
    return f"n/a ({why})" if why else "n/a"
  return "met" if ok else "**not met**"


def _f(value: Any, fmt: str = ".1f") -> str:
  return "n/a" if value is None else format(value, fmt)


def _gib(num: Any) -> str:
  return "n/a" if num is None else f"{num / GIB:.2f} GiB"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
  return lines + [""]


def _ok(payload: Any) -> bool:
  return isinstance(payload, dict) and payload.get("status") == "ok"


def render(dirs: Sequence[str | pathlib.Path]) -> str:
  """The summary of the folders as markdown."""
  stages, envs = load(dirs)
  lines = ["# GPU run summary", ""]
  for folder, env in envs:
    if not _ok(env):
      lines += [f"env ({folder}): {env.get('status')}: {env.get('error', '')}", ""]
      continue
    devices = ", ".join(f"{d['platform']}:{d['kind']}" for d in env["devices"])
    smi = env.get("nvidia_smi") or []
    memory = ", ".join(f"{g['name']} {g['memory.total']} MiB (driver {g['driver_version']})"
                       for g in smi) or "n/a"
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines += [f"Environment ({folder}): {devices}; GPU memory {memory}; {versions}; "
              f"CUDA {env.get('cuda')}; model.dtype auto = {env['dtype_auto']}; "
              f"jax_default_matmul_precision = {env['matmul_precision']}. "
              f"{env['precision_note']}.", ""]
    for platform, choices in env["choices"].items():
      fast = sorted(k for k, v in choices.items() if v == "fast")
      lines += [f"platforms.choices({platform!r}): fast = {', '.join(fast) or 'none'}", ""]

  peer = stages.get("inference_peer")
  rows = []
  for dtype in ("float32", "bfloat16"):
    ours = stages.get(f"inference_{dtype}")
    if not _ok(ours):
      rows.append([dtype] + ["n/a"] * 8 + [f"n/a ({(ours or {}).get('status', 'not run')})"])
      continue
    theirs = peer.get(dtype, {}).get("fps") if _ok(peer) else None
    ratio = ours["fps"] / theirs if theirs else None
    fps_ok = ours["fps"] >= INFER_MIN_FPS[dtype]
    why = "no peer: " + ((peer or {}).get("reason") or (peer or {}).get("status", "not run"))
    rows.append([dtype, f"{ours['fps']:.1f}", f"{ours['end_to_end']['median_ms']:.2f}",
                 f"{ours['network']['median_ms']:.2f}",
                 f"{ours['detection']['median_ms']:.2f}", f"{ours['fusion']['median_ms']:.2f}",
                 _f(theirs), _f(ratio, ".2f"),
                 f">= {INFER_MIN_FPS[dtype]:.0f} fps: {_met(fps_ok)}",
                 f">= {INFER_MIN_RATIO:.0f}x peer: "
                 f"{_met(None if ratio is None else ratio >= INFER_MIN_RATIO, why)}"])
  size = next((stages[k].get("size") for k in ("inference_float32", "inference_bfloat16")
               if _ok(stages.get(k))), None)
  lines += [f"## Inference, batch 1, {size and 'x'.join(map(str, size))}", ""]
  lines += _table(["dtype", "ours fps", "end to end ms", "network ms", "decode + NMS ms",
                   "fusion / assignment ms", "peer fps", "ours / peer", "target fps",
                   "target ratio"], rows)

  peer = stages.get("train_peer")
  rows = []
  for dtype in ("float32", "bfloat16"):
    ours = stages.get(f"train_{dtype}")
    if not _ok(ours):
      rows.append([dtype] + ["n/a"] * 7 + [f"n/a ({(ours or {}).get('status', 'not run')})"])
      continue
    frozen = peer["frozen_bn"][dtype]["images_per_s"] if _ok(peer) else None
    literal = peer["literal"][dtype]["images_per_s"] if _ok(peer) else None
    ratio = ours["images_per_s"] / frozen if frozen else None
    why = "no peer: " + ((peer or {}).get("reason") or (peer or {}).get("status", "not run"))
    rows.append([dtype, f"{ours['images_per_s']:.2f}", f"{ours['step_ms']:.1f}",
                 _gib((ours.get("peak_memory") or {}).get("peak_bytes")),
                 f"{ours['compile_s']:.0f}", _f(frozen, ".2f"), _f(literal, ".2f"),
                 _f(ratio, ".2f"),
                 f">= {TRAIN_MIN_RATIO}x: "
                 f"{_met(None if ratio is None else ratio >= TRAIN_MIN_RATIO, why)}"])
  train = next((stages[k] for k in ("train_float32", "train_bfloat16") if _ok(stages.get(k))),
               None)
  where = (f"{train['per_device_batch']} x {'x'.join(map(str, train['size']))} per device"
           if train else "")
  lines += [f"## Training, {where}", ""]
  lines += _table(["dtype", "ours images/s", "ms/step", "peak memory", "compile s",
                   "peer images/s (frozen BN)", "peer images/s (literal build)",
                   "ours / peer (frozen BN)", "target"], rows)

  rows = []
  for dtype in ("float32", "bfloat16"):
    pool = stages.get(f"pool_{dtype}")
    if not _ok(pool):
      rows.append([dtype, "n/a", "n/a", "n/a",
                   f"n/a ({(pool or {}).get('status', 'not run')})"])
      continue
    peak = pool.get("peak_bytes")
    ok = None if not pool.get("runs") else pool.get("within_target")
    if pool.get("runs") is False:
      ok = False
    rows.append([dtype, _f(pool.get("mem_fraction"), ".3f"),
                 "yes" if pool.get("runs") else f"no: {pool.get('error', '')[:120]}",
                 _gib(peak), f"<= {POOL_MAX_GIB:.0f} GiB: "
                 f"{_met(ok, pool.get('note', 'no peak'))}"])
  lines += [f"## Train step in an {POOL_MAX_GIB:.0f} GiB pool", ""]
  lines += _table(["dtype", "XLA_PYTHON_CLIENT_MEM_FRACTION", "runs", "peak", "target"], rows)

  check = stages.get("correctness")
  lines += ["## Correctness against the CPU references (precision 'highest')", ""]
  if _ok(check):
    worst = max((r.get("relative_difference") or 0.0
                 for r in check["losses"] + check.get("update_norms", [])), default=None)
    lines += _table(["losses and update norms (max relative difference)",
                     "panoptic pixels differing",
                     "result"],
                    [[f"{_f(worst, '.2e')} (tolerance {check['loss_rtol']:.0e}): "
                      f"{'ok' if check['losses_ok'] else 'NOT OK'}",
                      f"{check['panoptic_differing_pixels']} of {check['panoptic_pixels']} "
                      f"(allowed {check['panoptic_allowed_pixels']})",
                      "passed" if check["passed"] else "**FAILED**"]])
  else:
    lines += [f"not passed: {(check or {}).get('status', 'not run')} "
              f"{(check or {}).get('error', '')}", ""]

  lines += ["## Stages", ""]
  lines += _table(["stage", "status", "wall s", "note"],
                  [[name, p.get("status"), _f(p.get("wall_s")),
                    (p.get("reason") or p.get("error") or "")[:160].replace("\n", " ")]
                   for name, p in sorted(stages.items())])
  return "\n".join(lines)


if __name__ == "__main__":
  print(render(sys.argv[1:] or ["."]))
