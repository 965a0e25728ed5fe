"""Shared pieces of the training tests: a tiny model, NumPy batches, a step builder.

Batches follow docs/interfaces.md ("One example"): per image two stuff bands, two thing
rectangles (sometimes a crowd one), a void corner; images carry the segments as colour offsets
so that a few steps can fit them. No test lives here.
"""
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ciae_jax import hparams
from ciae_jax import memory as memory_lib
from ciae_jax import ops
from ciae_jax.models import ciae as ciae_model
from ciae_jax.training import optim
from ciae_jax.training import parallel
from ciae_jax.training import step as step_lib
from ciae_jax.training import train_state as train_state_lib

NUM_STUFF = 2
NUM_THINGS = 2
IMAGE_HW = (128, 128)
MAX_SEGMENTS = 6
TOTAL_STEPS = 100
# The paper's 1e-4 moves the memory by ~1e-5 a step, too little to see a wrong reduction.
MEMORY_COEFF = 0.5
TINY_MODEL = dict(backbone="resnet_tiny", norm="gn", fpn_dim=16, head_convs=1, semantic_dim=16,
                  embed_dim=8)
OPTIMIZER = hparams.OptimizerHParams(lr=0.01, warmup_steps=2, warmup_factor=0.5,
                                     decay_steps=(50,), grad_clip_norm=100.0)
# The hyper-parameters the step reads: total_steps, fcos, loss, memory (paper defaults else).
STEP_HPARAMS = hparams.HParams(total_steps=TOTAL_STEPS, optimizer=OPTIMIZER,
                               memory=hparams.MemoryHParams(momentum_coeff=MEMORY_COEFF))


def make_batch(seed: int, lead: tuple[int, ...], hw: tuple[int, int] = IMAGE_HW
               ) -> dict[str, np.ndarray]:
  """Random panoptic examples stacked to `lead + per-example shape` (int32/bool/float32)."""
  rng = np.random.default_rng(seed)
  height, width = hw
  examples = []
  for _ in range(int(np.prod(lead))):
    segment_map = np.zeros((height, width), np.int32)
    seg_class = np.zeros(MAX_SEGMENTS, np.int32)
    seg_is_thing = np.zeros(MAX_SEGMENTS, bool)
    seg_is_crowd = np.zeros(MAX_SEGMENTS, bool)
    seg_box = np.zeros((MAX_SEGMENTS, 4), np.float32)
    seg_valid = np.zeros(MAX_SEGMENTS, bool)
    split = int(rng.integers(height // 4, 3 * height // 4))
    segment_map[:split], segment_map[split:] = 1, 2
    seg_class[:2] = (0, 1)
    seg_box[0], seg_box[1] = (0, 0, width, split), (0, split, width, height)
    seg_valid[:2] = True
    for row in (2, 3, 4):
      box_w, box_h = rng.integers(12, 64, size=2)
      x0, y0 = int(rng.integers(0, width - box_w)), int(rng.integers(0, height - box_h))
      segment_map[y0:y0 + box_h, x0:x0 + box_w] = row + 1
      seg_class[row] = NUM_STUFF + int(rng.integers(0, NUM_THINGS))
      seg_is_thing[row] = True
      seg_is_crowd[row] = row == 4 and rng.random() < 0.5
      seg_box[row] = (x0, y0, x0 + box_w, y0 + box_h)
      seg_valid[row] = True
    segment_map[:6, :6] = 0  # Void corner.
    # A later rectangle may cover an earlier one: boxes follow the visible pixels.
    for row in range(MAX_SEGMENTS):
      ys, xs = np.nonzero(segment_map == row + 1)
      if seg_valid[row] and ys.size == 0:
        seg_valid[row] = False
        seg_class[row] = 0
        seg_box[row] = 0
        seg_is_thing[row] = seg_is_crowd[row] = False
      elif seg_valid[row]:
        seg_box[row] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    image = rng.normal(0.0, 0.3, (height, width, 3)).astype(np.float32)
    image += 0.5 * np.eye(3, dtype=np.float32)[seg_class[segment_map - 1] % 3] * (
        segment_map > 0)[..., None]
    examples.append(dict(image=image, segment_map=segment_map, seg_class=seg_class,
                         seg_is_thing=seg_is_thing, seg_is_crowd=seg_is_crowd,
                         seg_box=seg_box, seg_valid=seg_valid,
                         image_id=np.int32(len(examples)),
                         orig_size=np.array(hw, np.int32), image_size=np.array(hw, np.int32)))
  return {k: np.stack([e[k] for e in examples]).reshape(lead + np.shape(examples[0][k]))
          for k in examples[0]}


def tiny_model() -> ciae_model.CIAE:
  """The smallest CIAE that has every part (GN backbone, FPN, head, embedding branch)."""
  return ciae_model.build_model(TINY_MODEL, NUM_THINGS)


def numpy_params(model: ciae_model.CIAE, seed: int = 0) -> Any:
  """He-normal kernels, unit scales, zero biases (prior bias on the class logits), from NumPy.

  Avoids compiling `model.init` (slow on CPU); the tests here check the training mechanics,
  which do not depend on the initial values.
  """
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, *IMAGE_HW, 3), jnp.float32))["params"]
  rng = np.random.default_rng(seed)

  def init(path, leaf):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if name.endswith("kernel"):
      fan_in = int(np.prod(leaf.shape[:-1]))
      return rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
    if name.endswith("cls_logits/bias"):
      return np.full(leaf.shape, -np.log(99.0), np.float32)  # sigmoid = 0.01
    if "scale" in name.split("/")[-1]:
      return np.ones(leaf.shape, np.float32)
    return np.zeros(leaf.shape, np.float32)
  return jax.tree_util.tree_map_with_path(init, shapes)


def initial_state(model: ciae_model.CIAE, *, lr: float = 0.01, seed: int = 0):
  """(host TrainState at step 0, per-device step function) for the tiny model."""
  params = numpy_params(model, seed)
  optimizer, schedule = optim.create(OPTIMIZER.replace(lr=lr), params, batch_size=1)
  rows = memory_lib.num_memory(NUM_STUFF, NUM_THINGS, merge_things=True)
  memory = ops.l2_normalize(
      jnp.asarray(np.random.default_rng(seed + 1).normal(size=(rows, TINY_MODEL["embed_dim"])),
                  jnp.float32))  # [M, D]
  state = train_state_lib.create_train_state(params=params, optimizer=optimizer, memory=memory,
                                             rng=jax.random.PRNGKey(seed))
  step_fn = step_lib.make_train_step(STEP_HPARAMS, model, optimizer, schedule,
                                     num_stuff=NUM_STUFF)
  return jax.device_get(state), step_fn


def run_parallel(mode: str, num_devices: int, per_device: int, num_steps: int):
  """`num_steps` steps of the tiny model under `mode` on the first `num_devices` devices.

  Step t uses `make_batch(t, (num_devices, per_device))`, so runs that split the same global
  batch differently see the same images. Returns (final device state, list of host metrics).
  """
  model = tiny_model()
  host_state, step_fn = initial_state(model)
  devices = jax.devices()[:num_devices]
  mesh = parallel.make_mesh(devices)
  run_step = parallel.parallelize(step_fn, parallel=mode, mesh=mesh, devices=devices)
  state = parallel.replicate(host_state, parallel=mode, mesh=mesh, devices=devices)
  history = []
  for step in range(num_steps):
    global_batch = make_batch(step, (num_devices * per_device,))
    batch = {k: v.reshape((num_devices, per_device) + v.shape[1:])
             for k, v in global_batch.items()}
    state, metrics = run_step(state, parallel.shard_batch(batch, parallel=mode, mesh=mesh))
    history.append(jax.device_get(parallel.first_copy(metrics, parallel=mode)))
  return state, history


def assert_trees_close(actual: Any, expected: Any, what: str, *, tol: float) -> None:
  """Leaf-wise |actual - expected| <= tol * max(max|expected|, 1e-4).

  Float32 reordering noise scales with each leaf's magnitude; the floor covers leaves whose
  gradient is pure noise (biases right before a GroupNorm have a zero true gradient).
  """
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
  flat_e, tree_e = jax.tree_util.tree_flatten_with_path(expected)
  assert tree_a == tree_e, f"{what}: tree structures differ"
  for (path, a), (_, e) in zip(flat_a, flat_e):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    scale = max(float(np.abs(e).max()), 1e-4)
    np.testing.assert_allclose(a, e, rtol=0, atol=tol * scale,
                               err_msg=f"{what}{jax.tree_util.keystr(path)}")


# Step 1 agrees to ~2e-5 of each leaf's scale (float32 summation order); top-K selections in
# the CIAE loss let that grow to ~1e-3 by step 3. A wrong reduction (psum instead of pmean,
# local instead of global normalisers) is off by factors.
PARALLEL_TOL = 5e-3


def assert_matches_one_device(run: tuple[Any, list], mode: str, reference_run: tuple[Any, list],
                              num_steps: int) -> None:
  """State and per-step metrics of a `run_parallel` run equal those of the 1-device run."""
  reference = parallel.unreplicate(reference_run[0], parallel="pmap")
  state = parallel.unreplicate(run[0], parallel=mode)
  assert int(state.step) == int(reference.step) == num_steps
  np.testing.assert_array_equal(state.rng, reference.rng)
  for name in ("params", "opt_state", "memory"):
    assert_trees_close(getattr(state, name), getattr(reference, name), name, tol=PARALLEL_TOL)
  for step, (got, want) in enumerate(zip(run[1], reference_run[1]), start=1):
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=PARALLEL_TOL, atol=1e-6,
                                 err_msg=f"{mode}: metric {key} at step {step}")
