"""Training metrics: a clu `Collection` of averages, filled on device once per step."""
import flax
from clu import metrics as clu_metrics

LOSS_TERMS = ("loss", "loss_cls", "loss_reg", "loss_ctr", "loss_cae", "loss_iae", "loss_ciae")
OTHER_TERMS = ("num_positives", "grad_norm", "learning_rate", "memory_drift")


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  """Per-step scalars averaged over the steps between two writes.

  Every value is already reduced over devices by the step (global losses, global positive
  count), so the collection is built with `single_from_model_output` on every device and one
  copy is merged on the host. `grad_norm` is the global norm of the averaged gradient before
  clipping; `learning_rate` the rate of this step's update; `memory_drift` the mean
  |M_t - M_{t-1}| over all memory entries.
  """
  loss: clu_metrics.Average.from_output("loss")
  loss_cls: clu_metrics.Average.from_output("loss_cls")
  loss_reg: clu_metrics.Average.from_output("loss_reg")
  loss_ctr: clu_metrics.Average.from_output("loss_ctr")
  loss_cae: clu_metrics.Average.from_output("loss_cae")
  loss_iae: clu_metrics.Average.from_output("loss_iae")
  loss_ciae: clu_metrics.Average.from_output("loss_ciae")
  num_positives: clu_metrics.Average.from_output("num_positives")
  grad_norm: clu_metrics.Average.from_output("grad_norm")
  learning_rate: clu_metrics.Average.from_output("learning_rate")
  memory_drift: clu_metrics.Average.from_output("memory_drift")
