"""Shared pieces of the training tests: a tiny model, NumPy batches, a step builder.

Batches follow docs/interfaces.md ("One example"): per image two stuff bands, two thing
rectangles (sometimes a crowd one), a void corner; images carry the segments as colour offsets
so that a few steps can fit them. No test lives here.
"""
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ciae_jax import hparams
from ciae_jax import memory as memory_lib
from ciae_jax import ops
from ciae_jax import parallel
from ciae_jax.models import ciae as ciae_model
from ciae_jax.training import optim
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
  return ciae_model.build_model(TINY_MODEL, NUM_THINGS, NUM_STUFF)


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


def initial_state(model: ciae_model.CIAE, *, lr: float = 0.01, seed: int = 0,
                  grad_accum_steps: int = 1):
  """(host TrainState at step 0, per-device step function) for the tiny model."""
  params = numpy_params(model, seed)
  optimizer, schedule = optim.create(OPTIMIZER.replace(lr=lr), params, batch_size=1)
  rows = memory_lib.num_memory(NUM_STUFF, NUM_THINGS, merge_things=True)
  memory = ops.l2_normalize(
      jnp.asarray(np.random.default_rng(seed + 1).normal(size=(rows, TINY_MODEL["embed_dim"])),
                  jnp.float32))  # [M, D]
  state = train_state_lib.create_train_state(params=params, optimizer=optimizer, memory=memory,
                                             rng=jax.random.PRNGKey(seed))
  step_fn = step_lib.make_train_step(STEP_HPARAMS.replace(grad_accum_steps=grad_accum_steps),
                                     model, optimizer, schedule, num_stuff=NUM_STUFF)
  return jax.device_get(state), step_fn


def step_runner(mode: str, num_devices: int, per_device: int, grad_accum_steps: int = 1):
  """One compiled step of the tiny model under `mode` on the first `num_devices` devices,
  each device's `per_device` images in `grad_accum_steps` micro-batches.

  Returns `run(host_state, t) -> (device state, host metrics)`: the state (a host TrainState
  after t - 1 steps) is replicated, then one step runs on `make_batch(t - 1, (num_devices *
  per_device,))` split over the devices, so runs that split the same global batch differently
  see the same images at step t.
  """
  _, step_fn = initial_state(tiny_model(), grad_accum_steps=grad_accum_steps)
  devices = jax.devices()[:num_devices]
  mesh = parallel.make_mesh(devices)
  run_step = parallel.parallelize(step_fn, parallel=mode, mesh=mesh, devices=devices)

  def run(host_state, step: int):
    global_batch = make_batch(step - 1, (num_devices * per_device,))
    batch = {k: v.reshape((num_devices, per_device) + v.shape[1:])
             for k, v in global_batch.items()}
    state = parallel.replicate(host_state, parallel=mode, mesh=mesh, devices=devices)
    state, metrics = run_step(state, parallel.shard_batch(batch, parallel=mode, mesh=mesh))
    return state, jax.device_get(parallel.first_copy(metrics, parallel=mode))
  return run


def reference_run(global_batch: int, num_steps: int) -> tuple[list, list]:
  """`num_steps` steps on one device that sees the whole global batch of every step.

  Returns (host states after 0, 1, ..., num_steps steps, host metrics of steps 1..num_steps).
  """
  state, _ = initial_state(tiny_model())
  run = step_runner("pmap", 1, global_batch)
  states, history = [state], []
  for step in range(1, num_steps + 1):
    state, metrics = run(states[-1], step)
    states.append(parallel.unreplicate(state, parallel="pmap"))
    history.append(metrics)
  return states, history


# Tolerances of one data-parallel step against the 1-device step, both from the same state
# and the same global batch, so that nothing compounds over steps (after 3 compounded steps,
# float32 noise had grown to 7e-3 of a leaf on an AVX2 CI machine). The two programs compute the
# same sums in other orders: per-image convolutions at another batch size (other blocking),
# and each gradient, a sum over 8 * 128 * 128 = 2^17 pixels, summed per device then averaged
# by `pmean` instead of summed at once. Reordering a float32 sum of N terms changes it by
# ~log2(N) * eps * sum|terms| with XLA's blocked reductions (eps = 2^-23 ~ 1.2e-7, log2(N) =
# 17: ~2e-6 of sum|terms|); a machine with other vector widths, thread counts or kernels
# only picks another such order. sum|terms| exceeds the leaf's largest gradient by the
# cancellation of its terms (GroupNorm scales and biases: ~10x), hence
# - UPDATE_RTOL, relative to the largest update of the leaf in this step: 1e-3 allows a
#   cancellation of ~500x. Measured worst case 2.4e-5 (1 device vs 2, 4 and 8 devices, pmap
#   and shard_map, AVX-512 and XLA_FLAGS=--xla_cpu_max_isa=AVX2), a margin of 40x;
# - UPDATE_FLOOR, relative to the largest update of all leaves in this step: leaves whose
#   true gradient is ~0 (conv biases that a GroupNorm cancels) get an update that is pure
#   summation noise, sized by their summed contributions (at most of the order of the step's
#   gradient scale), not by their own ~0 update. 1e-6 of the largest update covers summed
#   contributions up to ~half of it; measured: 5e-9 (a margin of 200x);
# - two float32 ulps of the value itself: a parameter ~1 moved by ~1e-4 rounds to 1.2e-7.
# A wrong reduction is off by factors: psum instead of pmean multiplies the gradient by 8
# (4.3 after the clipping at norm 100; the first parameter checked was off by 3.3e3x its
# bound); a local instead of the global CIAE pixel count scales that loss's gradient by ~8
# (off by 600x its bound).
UPDATE_RTOL = 1e-3
UPDATE_FLOOR = 1e-6
ULPS = 2 * float(np.finfo(np.float32).eps)


def assert_update_close(actual: Any, expected: Any, previous: Any, what: str, *,
                        rtol: float = UPDATE_RTOL, floor: float = UPDATE_FLOOR) -> None:
  """One step's result `actual` equals `expected`, both computed from `previous`.

  Integer leaves (counts) must be equal. Float leaves, elementwise: `|actual - expected| <=
  rtol * max|expected - previous| (this leaf's update) + floor * (the largest update of all
  leaves) + 2 ulps of expected` (see UPDATE_RTOL).
  """
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
  flat_e, tree_e = jax.tree_util.tree_flatten_with_path(expected)
  flat_p, tree_p = jax.tree_util.tree_flatten_with_path(previous)
  assert tree_a == tree_e == tree_p, f"{what}: tree structures differ"
  leaves = []
  for (path, a), (_, e), (_, p) in zip(flat_a, flat_e, flat_p):
    a, e, p = np.asarray(a), np.asarray(e), np.asarray(p)
    name = f"{what}{jax.tree_util.keystr(path)}"
    if not np.issubdtype(e.dtype, np.floating):
      np.testing.assert_array_equal(a, e, err_msg=name)
      continue
    a, e, p = (x.astype(np.float64) for x in (a, e, p))
    leaves.append((name, a, e, float(np.abs(e - p).max(initial=0.0))))
  global_scale = max((scale for *_, scale in leaves), default=0.0)
  for name, a, e, scale in leaves:
    error = np.abs(a - e)
    bound = rtol * scale + floor * global_scale + ULPS * np.abs(e)
    if error.size == 0 or np.all(error <= bound):
      continue
    worst = tuple(int(i) for i in np.unravel_index(np.argmax(error - bound), error.shape))
    raise AssertionError(
        f"{name}{list(worst)}: {a[worst]!r} vs {e[worst]!r} differ by {error[worst]:.3g} > "
        f"{bound[worst]:.3g} = {rtol:g} * {scale:.3g} (largest update of the leaf) + {floor:g} * "
        f"{global_scale:.3g} (largest update of {what}) + 2 ulps; {int(np.sum(error > bound))} "
        f"of {error.size} elements over")


# Metrics of one step against the 1-device step (same state, same global batch):
# - losses are global sums of non-negative terms (focal, IoU, BCE, triplet) over up to 2^17
#   locations / pixels divided by exact integer counts: no cancellation, so another order of
#   the sums and the ulp-level differences of the forward pass change them by ~log2(N) * eps
#   (~2e-6); measured <= 5e-7 over the splits above. LOSS_RTOL = 1e-4 keeps a margin of 50x
#   over the estimate; a wrong normaliser is off by >= 1e-2;
# - grad_norm: the norm of gradients that agree to UPDATE_RTOL of their scale (measured 6e-6);
# - memory_drift: the mean |M_t - M_{t-1}| of memories that agree to UPDATE_RTOL of that
#   step's move (measured 1.4e-7);
# - learning_rate: the same few float32 operations on the same step in both programs (8 eps);
# - num_positives (an integer count < 2^24, exact in float32) and finite: equal.
LOSS_RTOL = 1e-4
METRIC_RTOL = {"grad_norm": UPDATE_RTOL, "memory_drift": UPDATE_RTOL,
               "learning_rate": 8 * float(np.finfo(np.float32).eps)}
EXACT_METRICS = ("num_positives", "finite")


def assert_step_matches_one_device(state: Any, metrics: dict, previous: Any, expected: Any,
                                   expected_metrics: dict, what: str) -> None:
  """Host state / metrics of one parallel step equal those of the 1-device step.

  `previous` is the state both steps started from, `expected` the 1-device result.
  """
  assert int(state.step) == int(expected.step) == int(previous.step) + 1, what
  np.testing.assert_array_equal(state.rng, expected.rng, err_msg=f"{what}: rng")
  jax.tree.map(functools.partial(np.testing.assert_array_equal, err_msg=f"{what}: model_state"),
               state.model_state, expected.model_state)
  for name in ("params", "opt_state", "memory"):
    assert_update_close(getattr(state, name), getattr(expected, name), getattr(previous, name),
                        f"{what}: {name}")
  assert metrics.keys() == expected_metrics.keys(), what
  for key, want in expected_metrics.items():
    if key in EXACT_METRICS:
      np.testing.assert_array_equal(metrics[key], want, err_msg=f"{what}: metric {key}")
    else:
      np.testing.assert_allclose(metrics[key], want, rtol=METRIC_RTOL.get(key, LOSS_RTOL),
                                 atol=0, err_msg=f"{what}: metric {key}")
