"""What the entry points print: our progress lines, warnings and errors; no library chatter.

  console.configure()   # in main(), after the flags are parsed, before TF / orbax start

By default (absl's `--verbosity` at its default, below 1) the console shows this package's own
absl `logging.info` lines (one per logging interval, evaluation progress, results), every
warning and error, and `print` output; INFO records of other libraries are dropped. orbax and
TensorFlow log through the same `absl` logger as we do (one orbax checkpoint write is ~20 INFO
lines, `CheckpointManagerOptions` dumps), so records are told apart by the file that logged
them, not by logger name. JAX's and TensorFlow's Python loggers are set to WARNING and
`TF_CPP_MIN_LOG_LEVEL` to 2 (TF's C++ INFO and WARNING off) unless already set. `--verbosity=1`
(or `-v 1`) shows everything, as without this module.
"""
from __future__ import annotations

import logging
import os

from absl import flags
from absl import logging as absl_logging

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(_PACKAGE_DIR)
# Python loggers of the libraries whose INFO lines are not ours to show.
QUIET_LOGGERS = ("jax", "orbax", "tensorflow", "absl.testing", "etils", "flax")


def is_ours(pathname: str) -> bool:
  """Whether a log record comes from this package or an entry point beside it (train.py)."""
  path = os.path.abspath(pathname or "")
  return path.startswith(_PACKAGE_DIR + os.sep) or os.path.dirname(path) == _REPO_ROOT


class OwnInfoOnly(logging.Filter):
  """Keeps warnings and errors of everyone, INFO and below only from this package."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or is_ours(record.pathname)


_FILTER = OwnInfoOnly()


def verbosity() -> int:
  """absl's `--verbosity` once the flags are parsed, else 0."""
  values = flags.FLAGS
  return int(values.verbosity) if values.is_parsed() and "verbosity" in values else 0


def configure(level: int | None = None) -> None:
  """Quiet third-party INFO below `level` 1 (default: `--verbosity`); see the module docstring.

  Idempotent. Our INFO lines stay visible: absl's threshold is set to INFO, and the filter on
  the `absl` logger drops only other files' INFO records.
  """
  level = verbosity() if level is None else level
  absl_logger = absl_logging.get_absl_logger()
  absl_logger.removeFilter(_FILTER)
  absl_logging.get_absl_handler().removeFilter(_FILTER)
  if level >= 1:
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  absl_logging.set_verbosity(absl_logging.INFO)
  absl_logger.addFilter(_FILTER)
  absl_logging.get_absl_handler().addFilter(_FILTER)
  for name in QUIET_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)
