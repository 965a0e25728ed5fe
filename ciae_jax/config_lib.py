"""The ml_collections config of a run, built from the typed defaults of `ciae_jax.hparams`.

`configs/*.py` start from `base_config()` and change what their setting needs; `--config.x=...`
overrides any field from the command line (fields whose default is None are typed placeholders,
so `--config.optimizer.lr=0.02` is accepted). The entry points turn the result into
`hparams.HParams` once (`HParams.from_config`), which rejects unknown fields and bad values.
"""
import ml_collections

from ciae_jax import hparams
from ciae_jax import hparams_mapping


def base_config() -> ml_collections.ConfigDict:
  """The paper's defaults (COCO panoptic, ResNet-50; `configs/coco_r50.py` uses it as is)."""
  return hparams_mapping.to_config_dict(hparams.HParams())


def parse_variants(arg: str | None, known: tuple[str, ...]) -> set[str]:
  """`"r101,long"` -> {"r101", "long"}; ValueError naming an unknown variant."""
  variants = {v.strip() for v in (arg or "").split(",") if v.strip()}
  unknown = sorted(variants - set(known))
  if unknown:
    raise ValueError(f"unknown config variant(s) {unknown}; known: {list(known)}")
  return variants
