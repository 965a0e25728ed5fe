"""Training metrics: a clu `Collection` of averages, filled on device once per step."""
from typing import Any

from clu import metrics as clu_metrics
import flax
import jax.numpy as jnp


def finite_average(name: str) -> type[clu_metrics.Average]:
  """An `Average` of output `name` over the steps whose output `finite` is true.

  Skipped steps (non-finite loss or gradients) carry NaNs that would poison the average; they
  are counted by `NonfiniteSteps` instead.
  """

  class FiniteAverage(clu_metrics.Average):

    @classmethod
    def from_model_output(cls, **outputs: Any) -> clu_metrics.Average:
      finite = jnp.asarray(outputs["finite"], bool)  # []
      value = jnp.asarray(outputs[name], jnp.float32)  # []
      return cls(total=jnp.where(finite, value, 0.0), count=finite.astype(jnp.int32))

  return FiniteAverage


@flax.struct.dataclass
class NonfiniteSteps(clu_metrics.Metric):
  """Number of steps skipped because their loss, gradients or update were not finite."""
  total: jnp.ndarray

  @classmethod
  def empty(cls) -> "NonfiniteSteps":
    return cls(total=jnp.array(0, jnp.int32))

  @classmethod
  def from_model_output(cls, **outputs: Any) -> "NonfiniteSteps":
    return cls(total=jnp.logical_not(jnp.asarray(outputs["finite"], bool)).astype(jnp.int32))

  def merge(self, other: "NonfiniteSteps") -> "NonfiniteSteps":
    return type(self)(total=self.total + other.total)

  def compute(self) -> jnp.ndarray:
    return self.total


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  """Per-step scalars averaged over the steps between two writes.

  Every value is already reduced over devices by the step (global losses, global positive
  count), so the collection is built with `single_from_model_output` on every device and one
  copy is merged on the host. Averages leave out skipped steps (output `finite` false), which
  `nonfinite_steps` counts. `grad_norm` is the global norm of the averaged gradient before
  clipping; `learning_rate` the rate of this step's update; `memory_drift` the mean
  |M_t - M_{t-1}| over all memory entries.
  """
  loss: finite_average("loss")
  loss_cls: finite_average("loss_cls")
  loss_reg: finite_average("loss_reg")
  loss_ctr: finite_average("loss_ctr")
  loss_cae: finite_average("loss_cae")
  loss_iae: finite_average("loss_iae")
  loss_ciae: finite_average("loss_ciae")
  num_positives: finite_average("num_positives")
  grad_norm: finite_average("grad_norm")
  learning_rate: clu_metrics.Average.from_output("learning_rate")
  memory_drift: finite_average("memory_drift")
  nonfinite_steps: NonfiniteSteps


# `TrainMetrics` plus `loss_semantic`, the semantic branch's cross-entropy (paper Table III,
# first row: `model.stuff_from="semantic"`). Built from the fields, not by subclassing: a
# Collection builds itself from its class's own annotations only.
SemanticTrainMetrics = clu_metrics.Collection.create(
    **TrainMetrics.__annotations__, loss_semantic=finite_average("loss_semantic"))


def train_metrics_type(stuff_from: str) -> type[clu_metrics.Collection]:
  """The collection of a run whose `model.stuff_from` is `stuff_from`."""
  return SemanticTrainMetrics if stuff_from == "semantic" else TrainMetrics
