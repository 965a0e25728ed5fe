"""Preemption: a SIGTERM asks the training loop to save a checkpoint and stop at a step boundary.

Cluster schedulers send SIGTERM some time before they kill a job. `PreemptionWatcher` turns it
into a question the loop asks after every step, `should_stop(step)`, answered identically on
every host, so that all of them save the same step and leave together:

- one process: a Python SIGTERM handler sets a flag (installed on entry, the previous handler
  put back on exit; only possible in the main thread);
- several processes (after `jax.distributed.initialize`): JAX's preemption sync manager, which
  listens for SIGTERM itself, tells every host the same step (`reached_preemption_sync_point`);
  if that service is disabled, the hosts' flags are combined with an all-gather every step.
"""
import signal
import threading
import types
from typing import Any, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np


def _jax_preemption_service() -> bool:
  """True when `jax.distributed` runs with its preemption sync manager (JAX's default)."""
  return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class PreemptionWatcher:
  """Context manager: `should_stop(step)` is True once a SIGTERM arrived (on any host)."""

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self._signals = signals
    self._previous: dict[int, Any] = {}
    self._received: Optional[int] = None
    self._use_jax = False

  def __enter__(self) -> "PreemptionWatcher":
    if jax.process_count() > 1 and _jax_preemption_service():
      # JAX's notifier owns SIGTERM; a Python handler would replace it.
      self._use_jax = True
      return self
    if threading.current_thread() is not threading.main_thread():
      logging.warning("Training runs outside the main thread: SIGTERM is not intercepted "
                      "(no checkpoint on preemption).")
      return self
    for signum in self._signals:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info: Any) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame: Optional[types.FrameType]) -> None:
    del frame
    if self._received is None:
      logging.warning("Received %s: saving a checkpoint after the current step, then "
                      "stopping.", signal.Signals(signum).name)
    self._received = signum

  @property
  def received(self) -> bool:
    """Whether this process received a stop signal (its own handler only)."""
    return self._received is not None

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after `step`; the same answer on every host.

    Must be called once per step on every host, with the same steps, when there are several.
    """
    if self._use_jax:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    if jax.process_count() > 1:
      flags = multihost_utils.process_allgather(np.int32(self.received))  # [processes]
      return bool(np.any(flags))
    return self.received
