"""Gradient accumulation (`config.grad_accum_steps`, ciae_jax/training/accumulate.py).

One update from K = 2 micro-batches per device must equal one update of the whole batch on one
device: every loss is normalised by counts of the whole global batch, taken before the
micro-batches run, and nothing in the tiny GroupNorm model mixes images. K = 1 must stay the
single pass (no accumulation loop); the memory plan of 16 images in 8 micro-batches must stay
near that of 2 images; bad values are HParamsErrors naming the field.
"""
import functools
import shutil

import jax
import numpy as np
import pytest

from ciae_jax import hparams
from ciae_jax import parallel
from ciae_jax.losses import ciae as ciae_losses
from ciae_jax.losses import semantic as semantic_losses
from ciae_jax.models import ciae as ciae_model
from ciae_jax.segments import Segments
from ciae_jax.training import accumulate
from ciae_jax.training import loop
from ciae_jax.training import workdir as workdir_lib
import test_train_helpers as helpers
import test_train_resume

NUM_DEVICES = 2
PER_DEVICE = 2
ACCUM = 2


@functools.lru_cache(maxsize=1)
def _full_batch_update():
  """(state before, state after, metrics) of one step on one device over all 4 images."""
  state, _ = helpers.initial_state(helpers.tiny_model())
  device_state, metrics = helpers.step_runner("pmap", 1, NUM_DEVICES * PER_DEVICE)(state, 1)
  return state, parallel.unreplicate(device_state, parallel="pmap"), metrics


@pytest.mark.slow  # Three compilations of the tiny step: ~60-90 s of CPU.
def test_accumulated_update_matches_full_batch():
  # Both modes in one test: they share the full-batch reference (xdist could otherwise run them
  # on two workers, each computing it).
  if jax.device_count() < NUM_DEVICES:
    pytest.fail(f"needs {NUM_DEVICES} devices (tests/conftest.py sets XLA_FLAGS)")
  for mode in ("pmap", "shard_map"):
    _check_accumulated_update(mode, *_full_batch_update())


def _check_accumulated_update(mode, previous, expected, expected_metrics):
  # 2 devices x 2 images, each device's 2 images in 2 micro-batches of 1: the same 4 images.
  run = helpers.step_runner(mode, NUM_DEVICES, PER_DEVICE, grad_accum_steps=ACCUM)
  device_state, metrics = run(previous, 1)
  state = parallel.unreplicate(device_state, parallel=mode)
  # Tolerances of tests/test_train_helpers.py (UPDATE_RTOL and the ones after it): both
  # programs compute the same sums in other orders. Here each gradient, a sum over
  # 4 * 128 * 128 = 2^16 pixels, is summed per micro-batch, then over the 2 micro-batches in
  # the scan, then averaged over the devices by `pmean`, instead of at once: the same
  # log2(N) * eps * sum|terms| reordering bound as across devices (N = 2^16 here, smaller than
  # the 2^17 of those tests). A micro-batch normalised by its own counts instead of the global
  # ones is off by factors (~2 here), far above them.
  helpers.assert_step_matches_one_device(state, metrics, previous, expected, expected_metrics,
                                         f"{mode}, {ACCUM} micro-batches")
  # It moved (MEMORY_COEFF moves the memory by ~0.1 a step), so equality is not trivial.
  assert np.abs(np.asarray(state.memory) - previous.memory).max() > 1e-2


def _while_ops(grad_accum_steps: int, per_device: int) -> int:
  """`stablehlo.while` ops of the lowered (not compiled) tiny step on one device."""
  state, step_fn = helpers.initial_state(helpers.tiny_model(),
                                         grad_accum_steps=grad_accum_steps)
  devices = jax.devices()[:1]
  lowered = parallel.parallelize(step_fn, parallel="pmap", devices=devices).lower(
      parallel.replicate(state, parallel="pmap", devices=devices),
      helpers.make_batch(0, (1, per_device)))
  return lowered.as_text().count("stablehlo.while")


def test_one_micro_batch_is_the_single_pass():
  # K = 1 runs the step without the accumulation loop; K = 2 adds exactly one (the scan). The
  # CIAE loss engine's own loops are in both.
  single = _while_ops(1, PER_DEVICE)
  assert single > 0
  assert _while_ops(ACCUM, PER_DEVICE) == single + 1


@pytest.mark.slow  # Two compilations of the tiny step: ~60-90 s of CPU.
def test_memory_plan_of_16_images_in_8_micro_batches_is_near_that_of_2():
  plans = {}
  for per_device, accum in ((2, 1), (16, 8)):
    state, step_fn = helpers.initial_state(helpers.tiny_model(), grad_accum_steps=accum)
    devices = jax.devices()[:1]
    batch = helpers.make_batch(0, (1, per_device))
    compiled = parallel.parallelize(step_fn, parallel="pmap", devices=devices).lower(
        parallel.replicate(state, parallel="pmap", devices=devices), batch).compile()
    analysis = compiled.memory_analysis()
    plans[per_device] = (int(analysis.argument_size_in_bytes), int(analysis.temp_size_in_bytes))
  image_bytes = sum(v[0, 0].nbytes for v in batch.values())  # Every field of one example.
  param_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state.params))
  (args_2, temp_2), (args_16, temp_16) = plans[2], plans[16]
  # Arguments: the state and the batch; the 14 more images are at most 14 examples' fields.
  assert args_16 - args_2 <= 14 * image_bytes, plans
  # Temporaries: one micro-batch of 2 images is alive at a time, as in the step of 2 images;
  # what is added is the gradient accumulator (one float32 copy of the parameters) and what
  # is computed for all 16 images up front (FCOS targets and counts, the micro-batch slices:
  # less than one copy of the 16 examples' inputs). Without accumulation the activations of
  # 16 images are ~8x those of 2 (the R50 benchmark's 16 x 128 x 128 step: 186 MB against
  # 25 MB), far above this bound (~1.5 MB + 4.2 MB here over 12 MB).
  assert temp_16 - temp_2 <= param_bytes + 16 * image_bytes, (plans, param_bytes, image_bytes)


def test_counts_known_before_the_forward_pass_are_the_losses():
  # The normalisers taken up front equal those the losses count themselves (else each
  # micro-batch's loss would not be its share of the full-batch loss).
  batch = helpers.make_batch(3, (2,))
  for stuff_pixels in (True, False):
    for loss_hp in (hparams.LossHParams(), hparams.LossHParams(loss_stride=2)):
      for image in range(1):
        segments = Segments.from_batch({k: v[image] for k, v in batch.items()})
        prenorm = np.random.default_rng(image).normal(
            size=helpers.IMAGE_HW + (4,)).astype(np.float32)  # [H, W, D]
        memory = np.eye(helpers.NUM_STUFF + 1, 4, dtype=np.float32)  # [M, D]
        sums = ciae_losses.ciae_loss(None, prenorm, segments, memory, loss_hp,
                                     num_stuff=helpers.NUM_STUFF, stuff_pixels=stuff_pixels)
        count = ciae_losses.num_loss_pixels(segments, loss_hp, stuff_pixels=stuff_pixels)
        assert float(count) == float(sums["num_pixels"]) > 0
        logits = np.zeros((32, 32, helpers.NUM_STUFF + 1), np.float32)  # stride 4
        cells = semantic_losses.semantic_loss_sums(logits, segments, num_stuff=helpers.NUM_STUFF)
        assert float(semantic_losses.num_labelled_cells(
            segments, num_stuff=helpers.NUM_STUFF, stride=4)) == float(
                cells["semantic_pixels"]) > 0
  # The stride the counts are taken at is the semantic logits' (traced, not compiled).
  model = ciae_model.build_model(dict(helpers.TINY_MODEL, stuff_from="semantic"),
                                 helpers.NUM_THINGS, helpers.NUM_STUFF)
  images = jax.ShapeDtypeStruct((1,) + helpers.IMAGE_HW + (3,), np.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  logits = jax.eval_shape(model.apply, variables, images)["semantic_logits"]
  assert helpers.IMAGE_HW[0] // logits.shape[1] == model.semantic_stride == 4


def test_bad_values_name_the_field():
  with pytest.raises(hparams.HParamsError, match="config.grad_accum_steps"):
    hparams.HParams(batch_size=16, grad_accum_steps=3)
  with pytest.raises(hparams.HParamsError, match="config.grad_accum_steps"):
    hparams.HParams(grad_accum_steps=0)
  hparams.HParams(batch_size=16, grad_accum_steps=8)  # 8 micro-batches of 2.
  # Per device: 16 images over the 8 test devices are 2 each, which 4 does not divide.
  assert jax.device_count() == 8
  with pytest.raises(hparams.HParamsError,
                     match=r"config.grad_accum_steps: 4 must divide the 2 images per device"):
    loop._check_devices(hparams.HParams(batch_size=16, grad_accum_steps=4))  # pylint: disable=protected-access
  loop._check_devices(hparams.HParams(batch_size=16, grad_accum_steps=2))  # pylint: disable=protected-access
  with pytest.raises(hparams.HParamsError, match="config.grad_accum_steps"):
    accumulate.check_divisible(6, 4)


def test_split_keeps_consecutive_images_together():
  tree = {"a": np.arange(12).reshape(6, 2), "b": np.arange(6)}
  split = accumulate.split(tree, 3)
  np.testing.assert_array_equal(split["b"], [[0, 1], [2, 3], [4, 5]])
  np.testing.assert_array_equal(split["a"][1], tree["a"][2:4])


def test_a_record_without_the_field_still_resumes():
  current = workdir_lib.flat_config(hparams.HParams(grad_accum_steps=8))
  saved = {k: v for k, v in current.items() if k != "grad_accum_steps"}  # Older config.json.
  assert "grad_accum_steps" in current
  assert workdir_lib.config_differences(saved, current) == []
  # Another split of the same update (e.g. on fewer devices) may resume too; a change of the
  # update itself may not.
  assert workdir_lib.config_differences(
      dict(saved, grad_accum_steps=1), current) == []
  assert workdir_lib.config_differences(dict(saved, batch_size=8), current)


@pytest.mark.slow  # Two short runs of the loop on the tiny model: ~1 min of CPU.
def test_resume_with_micro_batches_is_bit_exact(tmp_path):
  # The loop with 2 micro-batches per device: a run resumed from its step-1 checkpoint ends with
  # exactly the state of the uninterrupted 2-step run (checkpoints fall between updates), and
  # the input restarts at update 1 (the batches of K = 1: one global batch per update). Two
  # updates suffice: the checkpoint holds everything the next update reads, and an update of
  # 16 images in micro-batches takes ~8 s in XLA's quick mode on 8 fake devices.
  config = test_train_resume._config(tmp_path).replace(  # pylint: disable=protected-access
      batch_size=2 * jax.local_device_count(), grad_accum_steps=2, total_steps=2,
      checkpoint_every_steps=1, log_every_steps=1, eval_every_steps=0)
  input_a, input_b = test_train_resume.FakeInput(), test_train_resume.FakeInput()
  final_a = loop.train_and_evaluate(config, str(tmp_path / "a"), input_fn=input_a,
                                    evaluate_fn=test_train_resume.FakeEvaluate())
  shutil.copytree(tmp_path / "a" / "checkpoints" / "1", tmp_path / "b" / "checkpoints" / "1")
  final_b = loop.train_and_evaluate(config, str(tmp_path / "b"), input_fn=input_b,
                                    evaluate_fn=test_train_resume.FakeEvaluate())
  runs = dict(final_a=final_a, final_b=final_b, input_a=input_a, input_b=input_b)
  test_train_resume._check_resume_is_bit_exact(runs, total_steps=2)  # pylint: disable=protected-access
  test_train_resume._check_input_continues_where_the_run_stopped(runs, resumed_at=1)  # pylint: disable=protected-access
