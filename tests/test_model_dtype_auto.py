"""model.dtype="auto": resolved for the platforms a model is built for, never the host's."""
import jax
import pytest

from ciae_jax import hparams
from ciae_jax import platforms
from ciae_jax.models import ciae as ciae_model

_TINY = dict(backbone="resnet_tiny", norm="gn", fpn_dim=16, head_convs=1, semantic_dim=16,
             embed_dim=8)


def test_resolve_dtype():
  for platform in ("gpu", "cuda", "rocm", "tpu"):
    assert platforms.resolve_dtype("auto", platform) == "bfloat16"
  assert platforms.resolve_dtype("auto", "cpu") == "float32"
  assert platforms.resolve_dtype("auto", ("cuda", "tpu")) == "bfloat16"
  for explicit in ("float32", "bfloat16", "float16"):
    assert platforms.resolve_dtype(explicit, "gpu") == explicit
    assert platforms.resolve_dtype(explicit, ("cpu", "cuda")) == explicit
  with pytest.raises(ValueError, match="model.dtype='auto' means"):
    platforms.resolve_dtype("auto", ("cpu", "cuda"))
  with pytest.raises(ValueError, match="unknown platform 'metal'"):
    platforms.resolve_dtype("auto", "metal")
  assert hparams.ModelHParams().dtype == "float32"  # "auto" is never the default.
  with pytest.raises(hparams.HParamsError, match="config.model.dtype"):
    hparams.ModelHParams(dtype="bf16")


def test_auto_follows_the_build_platforms_not_the_host():
  assert jax.default_backend() == "cpu"
  auto = hparams.ModelHParams(dtype="auto", **_TINY)
  assert ciae_model.build_model(auto, 2).hp.dtype == "float32"  # this host's devices
  assert ciae_model.build_model(auto, 2, platforms=("cuda",)).hp.dtype == "bfloat16"
  model = ciae_model.build_model(auto, 2, platforms="cuda")
  variables = jax.eval_shape(lambda rng: ciae_model.init_variables(model, rng),
                             jax.random.PRNGKey(0))
  # Params stay float32; the compute dtype shows in the traced program.
  assert {leaf.dtype.name for leaf in jax.tree.leaves(variables)} == {"float32"}
  with pytest.raises(ValueError, match="build_model"):
    ciae_model.CIAE(hp=auto, num_thing_classes=2).init(
        jax.random.PRNGKey(0), jax.numpy.zeros((1, 128, 128, 3)))
