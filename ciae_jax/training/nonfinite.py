"""Skipped steps: a step whose loss, gradients or memory update is not finite changes nothing.

`step.train_step` keeps the state of such a step (and says so in its `finite` output); the loop
counts them here and stops the run after `max_consecutive_nonfinite` in a row.
"""
from typing import Any

from absl import logging
import jax


class NonfiniteCounter:
  """Counts skipped steps in a row from the step's `finite` flag, read one step late.

  Reading the flag of step t right after dispatching step t + 1 lets the device run ahead (no
  host sync per step); the error comes at most one step late, and the state stays finite
  anyway (a skipped step changes nothing).
  """

  def __init__(self, max_in_a_row: int):
    self.max_in_a_row = max_in_a_row
    self.in_a_row = 0
    self.total = 0
    self._pending = None  # (step, device bool) not yet read.

  def push(self, step: int, finite: Any) -> None:
    """Records step `step`'s flag and reads the previous one."""
    self.flush()
    self._pending = (step, finite)

  def flush(self) -> None:
    """Reads the pending flag; FloatingPointError after `max_in_a_row` skipped steps."""
    if self._pending is None:
      return
    step, finite = self._pending
    self._pending = None
    if bool(jax.device_get(finite)):
      self.in_a_row = 0
      return
    self.in_a_row += 1
    self.total += 1
    logging.warning("step %d skipped: non-finite loss, gradients or memory update (%d in a "
                    "row, %d in this run); the state is that of step %d", step,
                    self.in_a_row, self.total, step - self.in_a_row)
    if self.in_a_row >= self.max_in_a_row:
      raise FloatingPointError(
          f"{self.in_a_row} consecutive steps ({step - self.in_a_row + 1}..{step}) had a "
          "non-finite loss, gradients or memory update and were skipped "
          f"(config.max_consecutive_nonfinite={self.max_in_a_row}). The parameters are those "
          f"of step {step - self.in_a_row}. Lower the learning rate, set "
          "config.optimizer.grad_clip_norm, or check the input data of these steps.")
