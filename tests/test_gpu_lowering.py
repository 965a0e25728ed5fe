"""The programs a GPU runs, lowered for `cuda` on this CPU host (no GPU needed).

The R50 train step at 2 x 800 x 1344 per device and the end-to-end inference at 800 x 1344
(FCOS decoding, NMS, assignment, filters): no host callbacks or CPU-only custom calls, and few
sequential loop iterations. On a GPU every loop iteration costs ~10 kernel launches (~5-10 us
each) plus a host-side loop check, so hundreds of them take milliseconds: a large part of the
10 ms an image has at 100 fps. Budgets (static trip counts, `tests/lowered_loops.py`):
  * train step <= 40: the CIAE loss engine's chunks (17 at 65536 pixels per chunk for one
    800 x 1344 image, `losses.ciae.ACCELERATOR_CHUNK_SIZE`) and nothing per segment or per
    convolution tap (one-hot segment sums, cuDNN kernel gradients);
  * inference <= 20, NMS included: the NMS fixed point (`fast_paths.nms`) is the one
    data-dependent loop; it runs as many iterations as the longest chain of suppressions,
    `NMS_FIXED_POINT_ITERATIONS` at most on the detections measured in tests/test_nms.py.
The inference lowered for CPU is checked to keep its fast paths (loops), so that the counts
above come from the platform switch and not from a change of the method.
"""
import functools

import jax
import jax.numpy as jnp
import lowered_loops
import numpy as np
import pytest

from ciae_jax import hparams
from ciae_jax import parallel
from ciae_jax.inference import predictor as predictor_lib
from ciae_jax.models import ciae as ciae_model
from ciae_jax.training import optim
from ciae_jax.training import step as step_lib
from ciae_jax.training import train_state as train_state_lib

TRAIN_BUDGET = 40
INFERENCE_BUDGET = 20
# The NMS fixed point took at most 6 iterations on 5000 clustered candidates (tests/test_nms.py,
# K = 100); counted with a margin.
NMS_FIXED_POINT_ITERATIONS = 8
NUM_STUFF, NUM_THINGS = 53, 80  # COCO panoptic
# Custom calls a program for a GPU may not hold: host callbacks and CPU libraries.
FORBIDDEN = ("callback", "lapack", "ducc", "cpu")


def _specs(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree)


@functools.cache
def _model(platform):
  model = ciae_model.build_model(hparams.ModelHParams(), NUM_THINGS, NUM_STUFF,
                                 platforms=platform)
  variables = jax.eval_shape(
      lambda r: model.init(r, jnp.zeros((1, *ciae_model.INIT_IMAGE_HW, 3))), jax.random.PRNGKey(0))
  return model, variables


@functools.cache
def _train_step_text(platform):
  model, variables = _model(platform)
  params, model_state = ciae_model.split_variables(variables)
  hp = hparams.HParams(batch_size=2)
  optimizer, schedule = optim.create(hp.optimizer, params, batch_size=hp.batch_size)
  step = step_lib.make_train_step(hp, model, optimizer, schedule, num_stuff=NUM_STUFF)
  state = jax.eval_shape(lambda p, s: train_state_lib.create_train_state(
      params=p, optimizer=optimizer, memory=jnp.zeros((NUM_STUFF + 1, 32)),
      rng=jax.random.PRNGKey(1), model_state=s), params, model_state)
  height, width, segments = 800, 1344, hp.dataset.max_segments
  batch = {"image": np.zeros((1, 2, height, width, 3), np.float32),
           "segment_map": np.zeros((1, 2, height, width), np.int32),
           "seg_class": np.zeros((1, 2, segments), np.int32),
           "seg_is_thing": np.zeros((1, 2, segments), bool),
           "seg_is_crowd": np.zeros((1, 2, segments), bool),
           "seg_box": np.zeros((1, 2, segments, 4), np.float32),
           "seg_valid": np.zeros((1, 2, segments), bool)}
  # Built for `platform`, not for this host's CPU devices (the default).
  run = parallel.parallelize(step, parallel="shard_map", donate=False,
                             mesh=parallel.make_mesh(jax.devices()[:1]), platforms=(platform,))
  return run.trace(state, _specs(batch)).lower(lowering_platforms=(platform,)).as_text()


@functools.cache
def _inference_text(platform):
  model, variables = _model(platform)
  per_device = predictor_lib.predict_fn(model, hparams.HParams(), NUM_STUFF)
  memory = jax.ShapeDtypeStruct((NUM_STUFF + 1, 32), jnp.float32)
  batch = {"image": jax.ShapeDtypeStruct((1, 800, 1344, 3), jnp.float32),
           "image_size": jax.ShapeDtypeStruct((1, 2), jnp.int32),
           "orig_size": jax.ShapeDtypeStruct((1, 2), jnp.int32)}
  return jax.jit(per_device).trace(variables, memory, batch).lower(
      lowering_platforms=(platform,)).as_text()


def _check_custom_calls(text):
  bad = sorted(t for t in lowered_loops.custom_call_targets(text)
               if any(word in t.lower() for word in FORBIDDEN))
  assert not bad, f"custom calls a GPU program may not hold: {bad}"


@pytest.mark.slow
def test_train_step_for_cuda():
  text = _train_step_text("cuda")
  _check_custom_calls(text)
  loops = lowered_loops.loop_counts(text)
  assert loops.dynamic == 0, loops
  assert loops.static <= TRAIN_BUDGET, loops
  # Segment sums are one-hot matmuls: no float scatter adds colliding updates (whose order, and
  # so whose rounding, would vary from run to run on a GPU).
  assert not lowered_loops.colliding_float_scatters(text)


@pytest.mark.slow
def test_inference_for_cuda():
  text = _inference_text("cuda")
  _check_custom_calls(text)
  loops = lowered_loops.loop_counts(text)
  assert loops.dynamic <= 1, loops  # the NMS fixed point
  total = loops.static + loops.dynamic * NMS_FIXED_POINT_ITERATIONS
  assert total <= INFERENCE_BUDGET, loops
  cpu = lowered_loops.loop_counts(_inference_text("cpu"))
  assert cpu.static > 10 * INFERENCE_BUDGET, cpu  # the greedy loop and the row bands


def test_loop_counter_on_known_programs():
  def nested(x):
    inner = lambda i, y: jax.lax.fori_loop(0, 3, lambda j, z: z + 1.0, y)
    x = jax.lax.fori_loop(0, 5, inner, x)
    x, _ = jax.lax.scan(lambda c, _: (c * 2.0, None), x, None, length=7)
    return jax.lax.while_loop(lambda c: c < 1e6, lambda c: c * 3.0, x)

  text = jax.jit(nested).trace(1.0).lower(lowering_platforms=("cuda",)).as_text()
  assert lowered_loops.loop_counts(text) == lowered_loops.Loops(static=5 + 5 * 3 + 7, dynamic=1)
  # (A host callback cannot be lowered for cuda on a CPU host: the checker on its text.)
  with pytest.raises(AssertionError, match="callback"):
    _check_custom_calls('%0 = stablehlo.custom_call @xla_python_gpu_callback(%arg0)')
  ids = jnp.zeros(100, jnp.int32)
  sums = lambda fn: jax.jit(fn).trace(jnp.ones((100, 4))).lower(
      lowering_platforms=("cuda",)).as_text()
  assert len(lowered_loops.colliding_float_scatters(sums(
      lambda x: jax.ops.segment_sum(x, ids, num_segments=3)))) == 1
  assert not lowered_loops.colliding_float_scatters(sums(lambda x: x.at[ids].set(0.0)))


def test_an_export_for_cuda_made_on_this_host_holds_the_gpu_choices(tmp_path, load_config):
  """`export_lib.write_export` for `cuda` on this CPU host: model.dtype="auto" is bfloat16 (the
  GPU's, not this host's float32), and the program's loops are the GPU's (no greedy NMS loop,
  no row bands)."""
  from ciae_jax.data import categories as categories_lib  # pylint: disable=g-import-not-at-top
  from ciae_jax.inference import export_lib  # pylint: disable=g-import-not-at-top
  config = load_config("synthetic", "small")
  config.model.dtype = "auto"
  config.dataset.canvas_sizes = ((256, 384),)
  hp = hparams.HParams.from_config(config)
  entries = [{"id": i + 1, "isthing": int(i >= 2), "name": f"c{i}"} for i in range(5)]
  categories = categories_lib.categories_from_list(entries)
  model = ciae_model.build_model(hp.model, categories.num_things, categories.num_stuff)
  assert model.hp.dtype == "float32"  # this host's choice
  variables = ciae_model.init_variables(model, jax.random.PRNGKey(0))
  memory = jnp.ones((categories.num_stuff + 1, hp.model.embed_dim)) / hp.model.embed_dim ** 0.5
  restored = predictor_lib.Restored(model, variables, memory, categories, 0)
  manifest = export_lib.write_export(hp, restored, str(tmp_path), platforms=("cuda",),
                                     log=lambda _: None)
  (program,) = manifest["programs"]
  exported = jax.export.deserialize(bytearray((tmp_path / program["file"]).read_bytes()))
  assert exported.platforms == ("cuda",)
  text = exported.mlir_module()
  assert "bf16" in text  # the GPU's compute dtype
  loops = lowered_loops.loop_counts(text)
  assert loops.dynamic <= 1 and loops.static + loops.dynamic * NMS_FIXED_POINT_ITERATIONS <= (
      INFERENCE_BUDGET), loops
  assert loops.static < hp.inference.max_detections  # no greedy NMS loop
