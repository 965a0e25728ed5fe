"""`model.dtype="auto"`: bfloat16 on GPU / TPU, float32 on CPU, resolved in one place, logged once.

Only when asked for: the default stays float32.
"""
import jax
import pytest

from ciae_jax import hparams
from ciae_jax.models import ciae as ciae_model
from ciae_jax.models import layers


def test_resolution_per_platform():
  assert hparams.resolve_dtype("auto", "gpu") == "bfloat16"
  assert hparams.resolve_dtype("auto", "tpu") == "bfloat16"
  assert hparams.resolve_dtype("auto", "cpu") == "float32"
  for explicit in ("float32", "bfloat16", "float16"):
    assert hparams.resolve_dtype(explicit, "gpu") == explicit
    assert hparams.resolve_dtype(explicit, "cpu") == explicit
  assert hparams.ModelHParams().dtype == "float32"  # "auto" is never the default.
  assert hparams.ModelHParams(dtype="auto").resolved_dtype("gpu") == "bfloat16"
  with pytest.raises(hparams.HParamsError, match="config.model.dtype"):
    hparams.ModelHParams(dtype="bf16")


def test_auto_on_cpu_builds_a_float32_model_and_logs_once(monkeypatch):
  assert jax.default_backend() == "cpu"
  logged, asked = [], []
  monkeypatch.setattr(hparams, "_logged_auto_dtypes", set())
  monkeypatch.setattr("absl.logging.info", lambda msg, *args: logged.append(msg % args))
  canonical = layers.canonical_dtype
  monkeypatch.setattr(layers, "canonical_dtype", lambda d: asked.append(d) or canonical(d))
  model = ciae_model.build_model(
      hparams.ModelHParams(backbone="resnet_tiny", norm="gn", fpn_dim=16, head_convs=1,
                           semantic_dim=16, embed_dim=8, dtype="auto"), 2)
  for seed in (0, 1):  # Two traces, one log line.
    jax.eval_shape(lambda rng: ciae_model.init_variables(model, rng), jax.random.PRNGKey(seed))
  assert asked == ["float32", "float32"]
  assert [m for m in logged if "model.dtype='auto'" in m] == [
      "model.dtype='auto' on platform 'cpu': computing in float32"]
