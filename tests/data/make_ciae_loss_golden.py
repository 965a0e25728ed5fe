"""Writes ciae_loss_golden.npz: the CIAE loss of the hand-differentiated kernel that the
autodiff engine (`ciae_jax.losses.engine`) replaced, on fixed inputs, for
tests/test_loss_engine.py ("the paper's loss through the engine equals the kernel's").

Run against a checkout of that kernel (commit 2e838ba), from this repository's root:
  git worktree add /tmp/kernel 2e838ba
  PYTHONPATH=/tmp/kernel python tests/data/make_ciae_loss_golden.py
"""
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from ciae_jax import hparams  # noqa: E402  pylint: disable=g-import-not-at-top
from ciae_jax.losses import ciae  # noqa: E402  pylint: disable=g-import-not-at-top
from ciae_jax.losses import triplet  # noqa: E402  pylint: disable=g-import-not-at-top
from ciae_jax.segments import Segments  # noqa: E402  pylint: disable=g-import-not-at-top
import loss_cases  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def golden(index, fields, chunk, options):
  """The stored arrays of one setting of `loss_cases.GOLDEN_SETTINGS`."""
  rng = np.random.default_rng(700 + index)
  case = loss_cases.case(rng, **options)
  memory = loss_cases.memory(rng, fields.get("merge_things", True))
  fields = dict(fields)
  hp = hparams.LossHParams(**fields.pop("params", {}), **fields)  # the kernel's fields
  triplet.DEFAULT_CHUNK_SIZE = chunk
  segments = Segments(*(case[k] for k in loss_cases.SEGMENT_KEYS))

  def sums(embedding, prenorm):
    return ciae.ciae_loss(embedding, prenorm, segments, memory, hp,
                          num_stuff=loss_cases.NUM_STUFF)

  def run(embedding, prenorm):
    grads = {key: jax.grad(lambda e, p, key=key: sums(e, p)[key], argnums=(0, 1))(
        embedding, prenorm) for key in ("loss_ciae_sum", "loss_cae_sum")}
    train = jax.grad(lambda p: sums(None, p)["loss_ciae_sum"])(prenorm)
    return sums(embedding, prenorm), grads, train

  values, grads, train = jax.device_get(jax.jit(run)(
      jnp.asarray(case["embedding"]), jnp.asarray(case["embedding_prenorm"])))
  out = {f"{index}/{key}": np.asarray(value) for key, value in values.items()}
  for key, (d_emb, d_pre) in grads.items():
    out[f"{index}/d_{key}/embedding"] = d_emb
    out[f"{index}/d_{key}/embedding_prenorm"] = d_pre
  out[f"{index}/d_train/embedding_prenorm"] = train
  for key, value in case.items():
    out[f"{index}/input/{key}"] = value
  out[f"{index}/input/memory"] = memory
  return out


def main():
  out = {}
  for index, (fields, chunk, options) in enumerate(loss_cases.GOLDEN_SETTINGS):
    out.update(golden(index, fields, chunk, options))
  path = pathlib.Path(__file__).with_name("ciae_loss_golden.npz")
  np.savez_compressed(path, **out)
  print(f"wrote {path} ({path.stat().st_size} bytes, {len(out)} arrays)")


if __name__ == "__main__":
  main()
