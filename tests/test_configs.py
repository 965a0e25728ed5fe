"""Configs: load, lock, `--config.x=...` overrides, paper defaults, every field consumed.

Every config becomes `hparams.HParams` (which rejects a field no group knows), the defaults
come from the dataclasses alone, and every field of every group is read by the library, so a
typo in a config or a field that nothing reads fails here rather than at the first step.
"""
import dataclasses
import pathlib
import re

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

from ciae_jax import config_lib
from ciae_jax import hparams
from ciae_jax import hparams_mapping
from ciae_jax.data import canvas as canvas_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ["coco_r50.py", "coco_r50.py:r101", "coco_r50.py:long", "coco_r50.py:r101,long",
           "synthetic.py", "synthetic.py:small"]
ABLATION_FIELDS = ["model.embed_dim", "loss.params.margin", "loss.kind", "loss.cae_weight",
                   "memory.momentum_coeff",
                   "memory.momentum_power", "loss.box_expand", "loss.params.top_k", "loss.alpha",
                   "loss.thing_weight", "loss.merge_things", "model.use_box_embedding",
                   "model.use_coordconv", "loss.loss_stride", "loss.use_box_filter",
                   "loss.params.include_own", "fcos.sizes", "fcos.positive_region",
                   "inference.category_from", "optimizer.lr", "optimizer.base_lr",
                   "optimizer.grad_clip_norm", "parallel", "total_steps", "batch_size",
                   "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                   "eval_every_steps", "seed", "init_backbone", "dataset.root"]


def _parse(*argv: str) -> ml_collections.ConfigDict:
  """What train.py's flags give for `argv` (a fresh FlagValues per call)."""
  flag_values = flags.FlagValues()
  argv = ["train.py", *argv]
  # sys_argv: the override flags are defined from the config file named on the command line.
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def _get(config, dotted):
  for part in dotted.split("."):
    config = config[part]
  return config


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_locked_with_every_ablation_field(name):
  config = _parse(f"--config={REPO_ROOT / 'configs' / name}")
  assert config.is_locked
  for field in ABLATION_FIELDS:
    _get(config, field)  # KeyError if missing.
  with pytest.raises(AttributeError):
    config.new_field = 1  # Locked: typos cannot add fields.
  assert config.parallel in ("pmap", "shard_map")
  for height, width in canvas_lib.canvases(hparams.HParams.from_config(config).dataset):
    assert height % 32 == 0 and width % 32 == 0
  hparams.HParams.from_config(config)  # Every field known, every value valid.


def test_overrides_from_the_command_line():
  config = _parse(f"--config={REPO_ROOT / 'configs' / 'coco_r50.py'}:long",
                  "--config.optimizer.lr=0.02", "--config.loss.params.margin=0.3",
                  "--config.dataset.root=/data/coco", "--config.parallel=shard_map",
                  "--config.optimizer.grad_clip_norm=5.0", "--config.fcos.sizes=(32,64,128,256)",
                  "--config.total_steps=7")
  assert config.optimizer.lr == 0.02 and config.loss.params.margin == 0.3
  assert config.dataset.root == "/data/coco" and config.parallel == "shard_map"
  assert config.optimizer.grad_clip_norm == 5.0 and config.total_steps == 7
  assert config.dataset.train_min_size_range == (640, 800)  # from the variant
  hp = hparams.HParams.from_config(config)
  assert hp.fcos.sizes == (32, 64, 128, 256) and hp.optimizer.lr == 0.02
  assert hp.loss.params == {"margin": 0.3}
  with pytest.raises(Exception, match="nonexistent"):
    _parse(f"--config={REPO_ROOT / 'configs' / 'synthetic.py'}", "--config.loss.nonexistent=1")


def test_unknown_variant_is_an_error():
  with pytest.raises(Exception, match="unknown config variant"):
    _parse(f"--config={REPO_ROOT / 'configs' / 'coco_r50.py'}:r152")


def test_coco_r50_paper_defaults():
  config = _parse(f"--config={REPO_ROOT / 'configs' / 'coco_r50.py'}")
  assert (config.total_steps, config.batch_size) == (90_000, 16)
  assert config.optimizer.base_lr == 0.01 and config.optimizer.lr is None
  assert tuple(config.optimizer.decay_steps) == (60_000, 80_000)
  assert (config.optimizer.momentum, config.optimizer.weight_decay) == (0.9, 1e-4)
  assert (config.model.backbone, config.model.norm) == ("resnet50", "frozen_bn")
  assert config.model.embed_dim == 32
  assert config.loss.kind == "ciae" and config.loss.alpha == 2.0
  assert config.loss.params.margin is None  # the paper's, the per-pixel loss's default
  assert hparams.HParams.from_config(config).loss.params == {}
  assert (config.loss.thing_weight, config.loss.box_expand) == (5.0, 1.5)
  assert config.loss.merge_things and config.loss.use_box_filter
  assert (config.memory.momentum_coeff, config.memory.momentum_power) == (1e-4, 3.0)
  assert config.dataset.train_min_size_range == (800, 800)
  assert (config.dataset.max_size, config.dataset.eval_min_size) == (1333, 800)
  long = _parse(f"--config={REPO_ROOT / 'configs' / 'coco_r50.py'}:r101,long")
  assert long.total_steps == 180_000 and long.model.backbone == "resnet101"
  assert tuple(long.optimizer.decay_steps) == (120_000, 160_000)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_becomes_typed_hparams(name):
  config = _parse(f"--config={REPO_ROOT / 'configs' / name}")
  hp = hparams.HParams.from_config(config)
  # Nothing lost on the way: the typed object gives back the same config.
  assert hparams_mapping.to_config_dict(hp).to_dict() == config.to_dict()


def test_base_config_is_the_dataclass_defaults():
  assert hparams.HParams.from_config(config_lib.base_config()) == hparams.HParams()


def test_unknown_field_and_bad_value_name_the_field():
  config = config_lib.base_config()
  config.loss.marign = 0.2  # A typo (the base config is not locked).
  with pytest.raises(hparams.HParamsError, match=r"config.loss has unknown field.*marign"):
    hparams.HParams.from_config(config)
  config = config_lib.base_config()
  config.loss.params.top_k = 0
  with pytest.raises(hparams.HParamsError, match=r"config.loss.params.*top_k"):
    hparams.HParams.from_config(config)


def _groups(hp_type=hparams.HParams, prefix=""):
  """(dotted name, field) of every leaf field of the typed hyper-parameters."""
  for field in dataclasses.fields(hp_type):
    if dataclasses.is_dataclass(field.type) or (isinstance(field.default, object)
                                                and dataclasses.is_dataclass(field.default)):
      yield from _groups(type(field.default), f"{prefix}{field.name}.")
    else:
      yield f"{prefix}{field.name}", field.name


def test_every_field_is_read_by_the_library():
  sources = "\n".join(path.read_text() for path in (REPO_ROOT / "ciae_jax").rglob("*.py")
                      if path.name != "hparams.py")
  unread = [dotted for dotted, name in _groups() if not re.search(rf"\.{name}\b", sources)]
  assert not unread, f"fields that no library code reads: {unread}"


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs").glob("*.py")))
def test_docstring_carries_the_launch_command(path):
  text = path.read_text()
  assert f"python train.py --config configs/{path.name}" in text
