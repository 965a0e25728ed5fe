"""Moving evaluation results between the processes of a multi-host job.

Each host evaluates its shard of the images; its per-image results (PQ counts, COCO annotations,
detections) are JSON objects. `all_gather` sends every host's object to every host and
`broadcast` sends process 0's (the metrics) to the others. Both go through
`jax.experimental.multihost_utils` (public API, the same collectives as training, over the
interconnect on TPU / GPU and over gloo on CPU), as uint8 arrays of the JSON bytes, in chunks
of at most `CHUNK_BYTES` so that a large payload never needs one large device buffer. The
distributed key-value store would avoid the devices, but JAX reaches it only through private
modules. JSON keeps floats exact (Python writes the shortest repr that reads back bit for bit),
so gathered sums equal the single-process ones. With one process nothing is sent.
"""
from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np

CHUNK_BYTES = 64 << 20


def _encode(obj: Any) -> np.ndarray:
  return np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)  # [n]


def _decode(data: np.ndarray) -> Any:
  return json.loads(np.asarray(data, np.uint8).tobytes().decode("utf-8"))


def _allgather(array: np.ndarray) -> np.ndarray:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(array))  # [P, ...]


def all_gather(obj: Any) -> list[Any]:
  """Every process's JSON-able `obj`, in process order (all processes must call this)."""
  if jax.process_count() == 1:
    return [obj]
  data = _encode(obj)
  # int32 lengths: JAX arrays are 32-bit unless x64 is on.
  lengths = _allgather(np.asarray([data.size], np.int32)).reshape(-1)  # [P]
  longest = int(lengths.max())
  parts = []
  for start in range(0, max(longest, 1), CHUNK_BYTES):
    chunk = np.zeros(min(CHUNK_BYTES, longest - start) or 1, np.uint8)  # [c]
    piece = data[start:start + chunk.size]
    chunk[:piece.size] = piece
    parts.append(_allgather(chunk))  # [P, c]
  gathered = np.concatenate(parts, axis=1)  # [P, >= longest]
  return [_decode(row[:length]) for row, length in zip(gathered, lengths)]


def broadcast(obj: Any) -> Any:
  """Process 0's JSON-able `obj` on every process (all processes must call this)."""
  if jax.process_count() == 1:
    return obj
  return all_gather(obj if jax.process_index() == 0 else None)[0]
