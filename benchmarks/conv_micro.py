r"""Two convolution alternatives on XLA:CPU, timed apart: 1x1 convolutions as matmuls, and
Winograd F(2x2, 3x3) / F(4x4, 3x3) 3x3 convolutions written in jnp.

For every shape (N, H, W, I, O), in one process, interleaved, medians of `--repeats`:
  1x1:  `lax.conv_general_dilated` against `x.reshape(-1, I) @ w` (forward, and the input
        gradient by VJP), with the largest difference of the matmul's from lax's;
  3x3:  lax's forward against Winograd (input transform by strided slices, one batched matmul
        over the (m + 2)^2 transform points, output transform), with the largest difference
        relative to lax's largest value.
Neither is used by the library; benchmarks/RESULTS.md ("Two convolution alternatives probed")
says why.

  python benchmarks/conv_micro.py --repeats 7

Prints tables and a one-line JSON (`conv_micro {...}`). No TensorFlow, no torch.
"""
from __future__ import annotations

import argparse
import functools
import statistics

import jax  # noqa: E402
from jax import lax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402  pylint: disable=g-bad-import-order

_NHWC = ("NHWC", "HWIO", "NHWC")
ONE_BY_ONE = ((1, 128, 192, 256, 64), (1, 128, 192, 64, 256), (1, 128, 192, 256, 256),
              (2, 64, 96, 256, 256), (2, 128, 192, 256, 64))
THREE_BY_THREE = ((2, 32, 48, 256, 256), (2, 64, 96, 256, 256), (1, 128, 192, 256, 256),
                  (2, 64, 96, 128, 128))
TINY = ((1, 6, 10, 8, 16),)  # --tiny (the smoke test): odd tile counts, H and W not multiples

# Lavin & Gray's matrices: Y = A^T [(G g G^T) * (B^T d B)] A per tile.
_WINOGRAD = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32),
        np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float32),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float32),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                  [0, 1, -1, 8, -8, 1]], np.float32)),
}


def _combine(coefficients: np.ndarray, terms: list[jax.Array]) -> jax.Array:
  """sum_a c[a] * terms[a], skipping zero coefficients (the transforms are sparse)."""
  return sum(float(c) * term for c, term in zip(coefficients, terms) if c != 0)


def winograd_conv3x3(x: jax.Array, w: jax.Array, m: int) -> jax.Array:
  """3x3, stride 1, SAME convolution of x [N, H, W, I] with w [3, 3, I, O] by F(m x m, 3 x 3)."""
  bt, g, at = _WINOGRAD[m]
  t = m + 2
  n, h, wd, c = x.shape
  o = w.shape[-1]
  th, tw = -(-h // m), -(-wd // m)
  xp = jnp.pad(x, ((0, 0), (1, th * m + 1 - h), (1, tw * m + 1 - wd), (0, 0)))  # [N, Hp, Wp, I]
  rows = [xp[:, a:a + m * (th - 1) + 1:m] for a in range(t)]  # t x [N, th, Wp, I]
  v = []
  for p in range(t):
    row = _combine(bt[p], rows)  # [N, th, Wp, I]
    cols = [row[:, :, b:b + m * (tw - 1) + 1:m] for b in range(t)]  # t x [N, th, tw, I]
    v += [_combine(bt[q], cols) for q in range(t)]
  v = jnp.stack(v).reshape(t * t, n * th * tw, c)  # [t*t, tiles, I]
  u = jnp.einsum("pa,abio,qb->pqio", g, w, g).reshape(t * t, c, o)  # [t*t, I, O]
  prod = jnp.einsum("ptc,pco->pto", v, u).reshape(t, t, n, th, tw, o)  # [t, t, N, th, tw, O]
  z = [[_combine(at[i], [prod[p, q] for p in range(t)]) for q in range(t)] for i in range(m)]
  y = jnp.stack([jnp.stack([_combine(at[j], z[i]) for j in range(m)])
                 for i in range(m)])  # [m, m, N, th, tw, O]
  y = y.transpose(2, 3, 0, 4, 1, 5).reshape(n, th * m, tw * m, o)  # [N, th*m, tw*m, O]
  return y[:, :h, :wd]


def _lax_conv(x: jax.Array, w: jax.Array) -> jax.Array:
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_NHWC)


def _compare(fns: dict, operands: tuple, repeats: int) -> tuple[dict, dict]:
  """Median ms of each jitted `fns[k](*operands)` (interleaved), and its largest difference
  from the first one's output, relative to that output's largest value."""
  times, _ = common.interleaved({k: functools.partial(f, *operands) for k, f in fns.items()},
                                repeats=repeats, warmup=2)
  outputs = {k: jax.tree.leaves(f(*operands))[0] for k, f in fns.items()}
  reference = next(iter(outputs.values()))
  scale = float(jnp.max(jnp.abs(reference)))
  errors = {k: float(jnp.max(jnp.abs(y - reference))) / scale for k, y in outputs.items()}
  return {k: 1e3 * statistics.median(t) for k, t in times.items()}, errors


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--tiny", action="store_true", help="one tiny shape of each (smoke test)")
  args = parser.parse_args(argv)
  one_by_one, three_by_three = (TINY, TINY) if args.tiny else (ONE_BY_ONE, THREE_BY_THREE)
  results = {"info": common.device_info(), "one_by_one": [], "winograd": []}
  rows = []
  for n, h, wd, c, o in one_by_one:
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], (n, h, wd, c))
    w = jax.random.normal(keys[1], (1, 1, c, o)) / np.sqrt(c)
    dy = jax.random.normal(keys[2], (n, h, wd, o))
    dot = lambda x_, w_: (x_.reshape(-1, x_.shape[-1]) @ w_[0, 0]).reshape(
        x_.shape[:-1] + w_.shape[-1:])
    fns = {"conv": _lax_conv, "dot": dot}
    ms, errors = _compare({k: jax.jit(f) for k, f in fns.items()}, (x, w), args.repeats)
    dx_fns = {k + " dx": jax.jit(lambda x_, w_, dy_, f=f: jax.vjp(lambda z: f(z, w_), x_)[1](dy_))
              for k, f in fns.items()}
    dx_ms, dx_errors = _compare(dx_fns, (x, w, dy), args.repeats)
    ms, errors = {**ms, **dx_ms}, {**errors, **dx_errors}
    rows.append([f"{n}x{h}x{wd}x{c}->{o}"]
                + [f"{ms[k]:.2f} ({errors[k]:.1e})" for k in ("conv", "conv dx", "dot", "dot dx")])
    results["one_by_one"].append({"shape": [n, h, wd, c, o], **ms, "relative_error": errors})
  common.print_table(["1x1 shape", "conv ms", "conv dx ms", "dot ms (error)", "dot dx ms (error)"],
                     rows)
  rows = []
  for n, h, wd, c, o in three_by_three:
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    x = jax.random.normal(keys[0], (n, h, wd, c))
    w = jax.random.normal(keys[1], (3, 3, c, o)) / np.sqrt(9 * c)
    fns = {"lax": jax.jit(_lax_conv),
           "F(2,3)": jax.jit(lambda x_, w_: winograd_conv3x3(x_, w_, 2)),
           "F(4,3)": jax.jit(lambda x_, w_: winograd_conv3x3(x_, w_, 4))}
    ms, errors = _compare(fns, (x, w), args.repeats)
    rows.append([f"{n}x{h}x{wd}x{c}->{o}"] + [f"{ms[k]:.2f} ({errors[k]:.1e})" for k in fns])
    results["winograd"].append({"shape": [n, h, wd, c, o], "ms": ms, "relative_error": errors})
  common.print_table(["3x3 shape", "lax ms", "F(2,3) ms (error)", "F(4,3) ms (error)"], rows)
  common.print_json("conv_micro", results)
  return results


if __name__ == "__main__":
  main()
