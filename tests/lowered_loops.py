"""Sequential loop iterations and custom calls of a lowered (StableHLO) program, from its text.

`loop_counts(text)` walks the module from `main`: a `stablehlo.while` whose condition compares
its counter with a constant (`fori_loop`, `scan`: counter from 0, step 1) runs that many
iterations, each of which also runs the loops of its body and of the functions it calls; a
`while` of any other condition is data-dependent and counted apart (with the number of times
its enclosing loops run it). `case` branches are all counted (an upper bound; programs lowered
for one platform keep only that platform's branch of `lax.platform_dependent`).
"""
from __future__ import annotations

import dataclasses
import functools
import re

import jax

_FUNC = re.compile(r"^\s*func\.func (?:public |private )?@([\w.$-]+)\(")
_CALL = re.compile(r"(?:func\.)?call @([\w.$-]+)\(")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BOUND = re.compile(r"stablehlo\.compare\s+LT,\s*%[\w.]+,\s*(%[\w.]+)")


@dataclasses.dataclass(frozen=True)
class Loops:
  static: int  # iterations of loops with a constant trip count
  dynamic: int  # runs of data-dependent while loops (each counted once per run)

  def __add__(self, other: Loops) -> Loops:
    return Loops(self.static + other.static, self.dynamic + other.dynamic)

  def times(self, n: int) -> Loops:
    return Loops(self.static * n, self.dynamic * n)


def _balance(line: str) -> int:
  line = _STRING.sub('""', line)
  return line.count("{") - line.count("}")


def _functions(text: str) -> dict[str, list[str]]:
  lines, functions, i = text.splitlines(), {}, 0
  while i < len(lines):
    match = _FUNC.match(lines[i])
    if not match:
      i += 1
      continue
    depth, j = _balance(lines[i]), i + 1
    while depth > 0 and j < len(lines):
      depth += _balance(lines[j])
      j += 1
    functions[match.group(1)] = lines[i + 1:j]
    i = j
  return functions


def _trip_count(cond: list[str]) -> int | None:
  constants = dict(re.findall(r"(%[\w.]+) = stablehlo\.constant dense<(-?\d+)> : tensor<i\d+>",
                              "\n".join(cond)))
  for line in cond:
    match = _BOUND.search(line)
    if match and match.group(1) in constants:
      return int(constants[match.group(1)])
  return None


def loop_counts(text: str) -> Loops:
  """The loops run by one call of the module's `main` (see the module docstring)."""
  functions = _functions(text)

  @functools.cache
  def of_function(name: str) -> Loops:
    return of_lines(tuple(functions.get(name, ())))

  def of_lines(lines: tuple[str, ...]) -> Loops:
    total, i = Loops(0, 0), 0
    while i < len(lines):
      line = lines[i]
      if "stablehlo.while" in line:
        depth, j = _balance(line), i + 1
        started = depth > 0
        while j < len(lines) and (not started or depth > 0):
          depth += _balance(lines[j])
          started = started or depth > 0
          j += 1
        region = lines[i + 1:j]
        split = next(k for k, text in enumerate(region) if "} do {" in text)
        trip = _trip_count(list(region[:split]))
        inner = of_lines(region[split + 1:])
        if trip is None:
          total += Loops(0, 1) + inner
        else:
          total += Loops(trip, 0) + inner.times(trip)
        i = j
        continue
      for callee in _CALL.findall(line):
        total += of_function(callee)
      i += 1
    return total

  return of_function("main")


def custom_call_targets(text: str) -> set[str]:
  """The targets of the module's `stablehlo.custom_call`s."""
  return set(re.findall(r"custom_call @([\w.$-]+)", text))


_TENSOR = re.compile(r"tensor<([\dx]*)x?(f16|bf16|f32|f64|i\d+)>")


def _elements(shape: str) -> int:
  size = 1
  for dim in filter(None, shape.split("x")):
    size *= int(dim)
  return size


def colliding_float_scatters(text: str) -> list[str]:
  """The float `stablehlo.scatter`s with more update elements than output elements: several
  updates must then land on one element, and GPUs add those in a scheduling-dependent order
  (non-deterministic sums). Each as its type signature."""
  lines, found = text.splitlines(), []
  for i, line in enumerate(lines):
    if '"stablehlo.scatter"' not in line:
      continue
    end = next(lines[j] for j in range(i, len(lines)) if lines[j].lstrip().startswith("}) :"))
    operands, result = end.split("->")
    types = _TENSOR.findall(operands)
    out_shape, dtype = _TENSOR.findall(result)[0]
    if dtype.startswith("i"):
      continue  # integer sums are exact in any order
    if _elements(types[-1][0]) > _elements(out_shape):
      found.append(end.strip())
  return found


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
