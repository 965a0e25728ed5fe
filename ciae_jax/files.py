"""Writing result files: one JSON writer for every file the library writes."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np


def to_builtin(value: Any) -> Any:
  """NumPy scalars and arrays (nested in dicts, lists and tuples) -> JSON-able builtins.

  Dict keys become strings where they are not (JSON keys are strings; pq_compute's per-class
  results have int keys).
  """
  if isinstance(value, Mapping):
    return {k if isinstance(k, str) else str(to_builtin(k)): to_builtin(v)
            for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_builtin(v) for v in value]
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  return value


def write_json(path: str | os.PathLike[str], payload: Any, *, indent: int | None = None,
               sort_keys: bool = False) -> None:
  """Writes `payload` as JSON, atomically: readers see the old file or the new one, never half.

  Creates the parent folder; NumPy values are converted (`to_builtin`).
  """
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(to_builtin(payload), f, indent=indent, sort_keys=sort_keys)
  os.replace(tmp, path)
