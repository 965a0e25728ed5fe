"""The loops of a lowered program (StableHLO text), for tests of what a platform's program runs.

`fori_loop`, `scan` and `lax.map` with static bounds lower to a `stablehlo.while` whose `cond`
region is a scalar int32 constant (the trip count) and one `compare LT` of a loop counter with
it; a `while_loop` with a data-dependent condition (a fixed point) has no such trip count.
"""
import re

import jax

_WHILE = re.compile(r"stablehlo\.while\(")
_STATIC_COND = re.compile(
    r"cond \{\s*(%\S+) = stablehlo\.constant dense<(\d+)> : tensor<i32>\s*"
    r"%\S+ = stablehlo\.compare\s+LT, %iterArg\S*, \1, SIGNED : \(tensor<i32>, tensor<i32>\)")


def num_loops(text: str) -> int:
  """How many `stablehlo.while` loops the program holds (nested ones included)."""
  return len(_WHILE.findall(text))


def static_trip_counts(text: str) -> list[int]:
  """The trip counts of the program's loops with a static one, in the order of the text."""
  return [int(count) for _, count in _STATIC_COND.findall(text)]


def lowered_text(fn, *args, platform: str) -> str:
  """StableHLO of `jax.jit(fn)` for `platform` ("cpu", "cuda", ...; no device needed)."""
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
