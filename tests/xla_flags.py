"""XLA_FLAGS for the test processes: the simulated CPU device count, every other flag kept.

The suite needs a number of fake CPU devices (8 in the pytest processes, 1 or 2 in some
subprocesses), set with `--xla_force_host_platform_device_count`. Flags that a user gives in
XLA_FLAGS (e.g. `--xla_cpu_max_isa=AVX2`, to generate code as for an AVX2-only CPU) are kept,
in the pytest processes and in every subprocess they start. No test lives here.
"""
import os
import re
from typing import Optional

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# The flag with or without a value; XLA also accepts a single leading dash.
_DEVICE_COUNT_RE = re.compile(r"(?:^|\s)--?xla_force_host_platform_device_count(?:=\S*)?(?=\s|$)")


def with_device_count(count: int, flags: Optional[str] = None) -> str:
  """`flags` (default: $XLA_FLAGS) with the device count flag replaced by `count` devices."""
  flags = os.environ.get("XLA_FLAGS", "") if flags is None else flags
  kept = _DEVICE_COUNT_RE.sub(" ", flags).strip()
  return f"{kept} {DEVICE_COUNT_FLAG}={int(count)}".strip()


# XLA:CPU's legacy elemental fusion emitters: they compile the suite's tiny train step in ~half
# the time of the default MLIR fusion emitters (7.5 s against 14 s, quick mode, 2 cores), and
# the suite compiles hundreds of programs. Users' programs keep XLA's default; the values are
# the same operations either way (tests compare within float32 tolerances, and bit-exact
# comparisons are between two programs of the same suite process or flags).
QUICK_COMPILE_FLAGS = ("--xla_cpu_use_fusion_emitters=false",)


def for_tests(count: int, flags: Optional[str] = None) -> str:
  """`with_device_count(count, flags)` plus `QUICK_COMPILE_FLAGS` whose flag the user did not
  set: the XLA_FLAGS of the pytest processes, inherited by their subprocesses."""
  flags = with_device_count(count, flags)
  given = {f.split("=")[0].lstrip("-") for f in flags.split()}
  extra = [f for f in QUICK_COMPILE_FLAGS if f.split("=")[0].lstrip("-") not in given]
  return " ".join([*extra, flags])


def env_with_device_count(count: int, **extra: str) -> dict[str, str]:
  """A copy of os.environ for a subprocess with `count` CPU devices (and `extra` variables)."""
  env = dict(os.environ, **extra)
  env["XLA_FLAGS"] = with_device_count(count, env.get("XLA_FLAGS", ""))
  return env
