"""Test configuration: 8 simulated CPU devices, quiet TensorFlow, no torch in the pytest
processes, the COCO sample (the one place that knows where it lies)."""
import importlib.abc
import importlib.machinery
import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile

import xla_flags

# Must be set before JAX initialises its backends: multi-device tests use 8 fake CPU devices.
# Only the device count flag is set (replaced if given), and the quick-compile flags of
# tests/xla_flags.py unless the user set them; any other flag in the user's XLA_FLAGS is kept,
# here and in the subprocesses of the tests (tests/xla_flags.py), so that e.g.
# `XLA_FLAGS=--xla_cpu_max_isa=AVX2 bash scripts/test.sh` runs every process of the suite with
# the code XLA generates for an AVX2-only CPU.
# The user's flags as given to the first pytest process (xdist workers inherit it), for
# tests/test_suite_env.py.
os.environ.setdefault("CIAE_TESTS_USER_XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = xla_flags.for_tests(8)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402
import pytest  # noqa: E402

# Quick compilation for every test in this process (compile time dominates the tiny programs the
# tests run). Under xdist each worker imports every test module at collection, so this was already
# in force for the whole suite when ~20 modules set it at their top; here it is set once, before
# any test module is imported. Process-local: the subprocesses tests start set their own
# (JAX_DISABLE_MOST_OPTIMIZATIONS in their environment), or run optimised where they measure.
jax.config.update("jax_disable_most_optimizations", True)

# A persistent compilation cache shared by the pytest processes of one run (the xdist workers
# inherit the folder from the controller's environment): tests in different files build the
# same tiny programs (the train step, the inference), and each compiles once. The process that
# made the folder removes it at the end (pytest_unconfigure). Subprocesses do not inherit it:
# those that share programs get conftest's `cache_dir`, and the ones that test the product's
# own cache keep theirs.
_SUITE_CACHE_ENV = "CIAE_TESTS_JAX_CACHE"
_OWNS_SUITE_CACHE = _SUITE_CACHE_ENV not in os.environ
if _OWNS_SUITE_CACHE:
  os.environ[_SUITE_CACHE_ENV] = tempfile.mkdtemp(prefix="ciae-tests-jax-cache-")
jax.config.update("jax_compilation_cache_dir", os.environ[_SUITE_CACHE_ENV])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def pytest_unconfigure(config):  # pylint: disable=unused-argument
  if _OWNS_SUITE_CACHE:
    shutil.rmtree(os.environ.pop(_SUITE_CACHE_ENV), ignore_errors=True)


class _NoTorchHere(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Makes `import torch` / `import torchvision` fail in the pytest processes (ImportError).

  Importing torch (torch._dynamo -> triton) in an xdist worker that already holds JAX crashed
  the worker. Tests that need the benchmark peer run it in a subprocess (which does not load
  this file); tests that only need to know whether it is installed ask
  `importlib.util.find_spec`, which still answers truly: the spec of an installed torch is
  returned, only executing it fails.
  """
  BLOCKED = ("torch", "torchvision")

  def find_spec(self, fullname, path=None, target=None):
    if fullname.split(".")[0] not in self.BLOCKED:
      return None
    for finder in sys.meta_path:
      find = getattr(finder, "find_spec", None)
      real = None if finder is self or find is None else find(fullname, path, target)
      if real is not None:
        return importlib.machinery.ModuleSpec(fullname, self, origin=real.origin)
    return None  # Not installed: the usual ModuleNotFoundError.

  def create_module(self, spec):
    raise ImportError(f"tests/conftest.py: {spec.name} is not imported in the pytest process "
                      "(it crashed xdist workers holding JAX); run it in a subprocess",
                      name=spec.name)

  def exec_module(self, module):  # Never reached: create_module raises.
    raise ImportError(module.__name__)


sys.meta_path.insert(0, _NoTorchHere())

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The COCO sample: $CIAE_COCO_SAMPLE (also what configs/coco_sample_overfit.py and
# benchmarks/input_pipeline.py default to), else the data folder beside the repository.
COCO_SAMPLE_ENV = "CIAE_COCO_SAMPLE"
COCO_SAMPLE_DEFAULT = REPO_ROOT.parent / "shared" / "data" / "coco_panoptic_sample"


@pytest.fixture(scope="session")
def coco_sample_root() -> pathlib.Path:
  """The two real COCO val2017 images with their panoptic annotations; skips where absent."""
  root = pathlib.Path(os.environ.get(COCO_SAMPLE_ENV) or COCO_SAMPLE_DEFAULT)
  if not (root / "annotations" / "panoptic_val2017.json").is_file():
    pytest.skip(f"COCO sample not found at {root} (no annotations/panoptic_val2017.json): "
                f"set {COCO_SAMPLE_ENV} to the folder of the two-image COCO panoptic sample")
  return root


@pytest.fixture(scope="session")
def load_config():
  """`load_config(name, variant=None)`: a fresh `configs/<name>.py` ConfigDict, read by path.

  The one way tests read the repository's configs (configs/ is not an installed package, so
  `from configs import ...` would depend on the working directory).
  """
  def load(name: str, variant: str | None = None):
    spec = importlib.util.spec_from_file_location(f"configs_{name}",
                                                  REPO_ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)
  return load


@pytest.fixture
def small_config(load_config):
  """A fresh `configs/synthetic.py:small` (the one-minute CPU config) for a test to shrink."""
  return load_config("synthetic", "small")


@pytest.fixture(scope="session")
def initial_inference_state():
  """`initial_inference_state(hp)`: `{"params", "model_state", "memory"}` of the model at init.

  What the predictor, the demo, the export and the tuning tool read from a training workdir (a
  training checkpoint holds the optimizer state besides), for `hp`'s model and dataset. The
  variables are initialised under jit: much faster than the train state's eager initialisation.
  """
  def make(hp) -> dict:
    from ciae_jax import memory as memory_lib  # pylint: disable=g-import-not-at-top
    from ciae_jax.data import dataset as dataset_lib  # pylint: disable=g-import-not-at-top
    from ciae_jax.models import ciae as ciae_model  # pylint: disable=g-import-not-at-top
    categories = dataset_lib.load_dataset_categories(hp.dataset)
    model = ciae_model.build_model(hp.model, categories.num_things, categories.num_stuff)
    params, model_state = ciae_model.split_variables(jax.jit(
        lambda rng: ciae_model.init_variables(model, rng))(jax.random.PRNGKey(0)))
    rows = memory_lib.num_memory(categories.num_stuff, categories.num_things,
                                 hp.loss.merge_things)
    memory = memory_lib.init_memory(jax.random.PRNGKey(1), rows, hp.model.embed_dim)
    return {"params": params, "model_state": model_state, "memory": memory}
  return make


@pytest.fixture(scope="session")
def write_initial_checkpoint(initial_inference_state):
  """`write_initial_checkpoint(workdir, hp, step)`: `initial_inference_state(hp)` saved as the
  checkpoint of `step` in `workdir`; returns the state it wrote."""
  def write(workdir: pathlib.Path, hp, step: int) -> dict:
    from ciae_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
    state = initial_inference_state(hp)
    manager = checkpoint_lib.create_manager(str(workdir), checkpoint_every_steps=1,
                                            keep_checkpoints=1)
    checkpoint_lib.save(manager, step, state, force=True)
    manager.wait_until_finished()
    manager.close()
    return state
  return write


@pytest.fixture(scope="session")
def plain_synthetic_root():
  """`plain_synthetic_root(folder, num_train, num_val, image_size)`: generated COCO-layout data.

  Without its manifest the folder is a plain COCO-layout dataset: read, never regenerated.
  """
  def make(folder: pathlib.Path, num_train: int = 2, num_val: int = 2,
           image_size: tuple[int, int] = (128, 128)) -> pathlib.Path:
    from ciae_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    synthetic.generate_synthetic_dataset(folder, num_train=num_train, num_val=num_val,
                                         image_size=image_size, seed=0)
    (folder / synthetic.MANIFEST).unlink()
    return folder
  return make


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> pathlib.Path:
  """A JAX compilation cache shared by the subprocesses (and xdist workers) of one session.

  The training subprocesses of the reliability tests run the same programs: they compile once.
  """
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # .../pytest-N/popen-gwK -> .../pytest-N, shared by the workers.
  return base / "reliability_jax_cache"


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory, load_config, plain_synthetic_root, write_initial_checkpoint):
  """A folder laid out like the repository after the main job (`python train.py`):
  `configs/` (a link), `runs/synthetic` (a checkpoint of the main job's model at its
  initialisation) and `data/synthetic` (generated data), where documented commands run as
  written."""
  from ciae_jax import hparams  # pylint: disable=g-import-not-at-top
  folder = tmp_path_factory.mktemp("user")
  os.symlink(REPO_ROOT / "configs", folder / "configs")
  config = load_config("synthetic")
  config.dataset.root = str(plain_synthetic_root(folder / "data" / "synthetic"))
  hp = hparams.HParams.from_config(config)
  write_initial_checkpoint(folder / "runs" / "synthetic", hp, hp.total_steps)
  return folder
