"""The correctness check of the GPU run: a small CIAE on the two COCO sample images, two train
steps and the panoptic inference, against values computed on the CPU (`references.npz`).

Everything here is deterministic and platform-independent in its inputs: the images are shipped
as uint8 already resized to the model input (normalised by `preprocess.normalize`, NumPy, on
the host: the same float32 bits on every machine), the ground truth as the segment arrays of
docs/interfaces.md, the weights drawn with the threefry generator (bit-identical on every
backend). What may differ between the CPU and a GPU is float arithmetic: convolution
algorithms, summation orders, TF32. The check runs with `jax.default_matmul_precision
("highest")`, float32 convolutions and matmuls at full float32 precision on every backend.

  python benchmarks/gpu/make_references.py      # on the CPU: writes benchmarks/gpu/references.npz

Imports no TensorFlow, clu, ml_collections or pycocotools.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ciae_jax import hparams
from ciae_jax import memory as memory_lib
from ciae_jax import parallel
from ciae_jax.inference import predictor as predictor_lib
from ciae_jax.inference import preprocess
from ciae_jax.models import ciae as ciae_model
from ciae_jax.training import optim
from ciae_jax.training import step as step_lib
from ciae_jax.training import train_state as train_state_lib

HERE = pathlib.Path(__file__).resolve().parent
REFERENCES = HERE / "references.npz"
NUM_STUFF = 53  # COCO panoptic: 53 stuff and 80 thing classes (the sample's categories).
NUM_THINGS = 80
CANVAS = (128, 224)  # Both sample images (landscape) at shorter side 128, longer side <= 224.
MIN_SIZE, MAX_SIZE = 128, 224
MAX_SEGMENTS = 40
STEPS = 2  # The second step's loss depends on the first step's gradients.
SEED = 0
# Losses (and the norms of each module's update) agree within this relative difference (float32
# at full precision: the CPU and GPU sum in different orders; 1e-3 leaves room for ~1e4 ulps of
# accumulated rounding).
LOSS_RTOL = 1e-3
# Pixels whose panoptic id may differ: the CPU reference counts the pixels that change when
# the input image, the stepped weights and the memory are each perturbed by PERTURBATION
# (relative Gaussian noise), three draws, the largest count. Float32 at full precision differs
# between backends by ~1e-6 relative (summation orders; two steps of different rounding in the
# weights), far less, so a GPU map that differs in more pixels than that is wrong.
PERTURBATION = 1e-4
PERTURBATION_DRAWS = 3


def hyper_params() -> hparams.HParams:
  """The paper's hyper-parameters at the sample's small size, a narrow model."""
  return hparams.HParams(
      batch_size=2, total_steps=100,
      # A constant rate from the first step (no warm-up) that moves the loss by several per
      # cent in one step: the second step's loss then checks the first step's gradients.
      optimizer=hparams.OptimizerHParams(lr=0.05, warmup_steps=0, decay_steps=(1000,)),
      model=hparams.ModelHParams(backbone="resnet_tiny", dtype="float32", fpn_dim=32,
                                 semantic_dim=16, head_convs=1),
      dataset=hparams.DatasetHParams(canvas_sizes=(CANVAS,), eval_min_size=MIN_SIZE,
                                     eval_max_size=MAX_SIZE, max_segments=MAX_SEGMENTS,
                                     flip=False),
      inference=hparams.InferenceHParams(pre_nms_top_n=200, max_detections=50,
                                         instance_min_area=16.0))


def build_inputs(sample_root: str | pathlib.Path) -> dict[str, np.ndarray]:
  """The shipped inputs from the COCO sample (CPU side, reads the JPEGs and PNGs once).

  Returns `image_u8 [2, H, W, 3]` (resized with `preprocess.bilinear_resize`, rounded, padded
  with zeros), `image_size [2, 2]`, `orig_size [2, 2]`, `image_id [2]` and the segment arrays
  `[2, ...]` of `preprocess.segments_at_input`.
  """
  from ciae_jax.data import categories as categories_lib  # pylint: disable=g-import-not-at-top
  from ciae_jax.data import coco  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(sample_root)
  categories = categories_lib.load_categories(
      root / "annotations" / "panoptic_val2017.json")
  if (categories.num_stuff, categories.num_things) != (NUM_STUFF, NUM_THINGS):
    raise ValueError(f"{root}: expected COCO's {NUM_STUFF} stuff and {NUM_THINGS} thing "
                     f"categories, got {categories.num_stuff} and {categories.num_things}")
  records = coco.load_records(root, "val2017", categories=categories)
  prep = preprocess.Preprocessor(hyper_params().dataset)
  rows = []
  for record in records:
    example = coco.decode_example(record, categories)
    canvas, (height, width) = prep.plan(example["image"].shape[:2])
    resized = preprocess.bilinear_resize(example["image"].astype(np.float32), (height, width))
    image = np.zeros((*canvas, 3), np.uint8)  # [H, W, 3]
    image[:height, :width] = np.clip(np.rint(resized), 0, 255).astype(np.uint8)
    prepared = preprocess.Prepared(image.astype(np.float32), (height, width),
                                   tuple(example["image"].shape[:2]), canvas)
    segments = preprocess.segments_at_input(example, prepared, max_segments=MAX_SEGMENTS)
    rows.append({"image_u8": image, "image_size": np.asarray((height, width), np.int32),
                 "orig_size": np.asarray(example["image"].shape[:2], np.int32),
                 "image_id": np.int32(record.image_id), **segments})
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def model_inputs(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The float32 batch `[2, ...]` from the shipped arrays (host NumPy: same bits everywhere)."""
  image_u8 = inputs["image_u8"]  # [B, H, W, 3]
  image = np.zeros(image_u8.shape, np.float32)  # [B, H, W, 3]
  for row, (height, width) in enumerate(inputs["image_size"]):  # Padding stays 0.
    image[row, :height, :width] = preprocess.normalize(image_u8[row, :height, :width])
  batch = {k: inputs[k] for k in ("segment_map", "seg_class", "seg_is_thing", "seg_is_crowd",
                                  "seg_box", "seg_valid", "image_size", "orig_size")}
  return {"image": image, **batch}


def run(inputs: dict[str, np.ndarray], *, noise_seeds: tuple[int, ...] = ()
        ) -> dict[str, Any]:
  """Two train steps, then inference with the stepped weights, on the first local device.

  Returns per step the loss metrics (`loss*` keys, floats), the norm of the two steps' update
  of each top-level module of `params` (`update_norms`), and the inference results
  (`panoptic [2, H, W]`, `query_valid [2, Q]`); with `noise_seeds`, also `noisy_panoptic`: the
  maps of the same inference with the images, weights and memory perturbed by `PERTURBATION`
  (relative Gaussian noise, one draw per seed; the references' sensitivity count).
  """
  hp = hyper_params()
  devices = jax.local_devices()[:1]
  mesh = parallel.make_mesh(devices)
  with jax.default_matmul_precision("highest"):
    model = ciae_model.build_model(hp.model, NUM_THINGS, NUM_STUFF)
    images = jnp.zeros((1, *ciae_model.INIT_IMAGE_HW, 3), jnp.float32)  # [1, 128, 128, 3]
    variables = jax.jit(model.init)(jax.random.PRNGKey(SEED), images)  # threefry: portable.
    params, model_state = ciae_model.split_variables(variables)
    optimizer, schedule = optim.create(hp.optimizer, params, batch_size=hp.batch_size)
    memory = memory_lib.init_memory(jax.random.PRNGKey(SEED + 1), NUM_STUFF + 1,
                                    model.hp.embed_dim)  # [M, D]
    state = train_state_lib.create_train_state(params=params, optimizer=optimizer,
                                               memory=memory, rng=jax.random.PRNGKey(SEED + 2),
                                               model_state=model_state)
    step = step_lib.make_train_step(hp, model, optimizer, schedule, num_stuff=NUM_STUFF)
    step_fn = parallel.parallelize(step, parallel="shard_map", mesh=mesh, donate=False)
    state = parallel.replicate(state, parallel="shard_map", mesh=mesh)
    host = model_inputs(inputs)
    batch = parallel.shard_batch({k: v[None] for k, v in host.items()},  # [1, 2, ...]
                                 parallel="shard_map", mesh=mesh)
    losses = []
    for _ in range(STEPS):
      state, metrics = step_fn(state, batch)
      metrics = jax.device_get(parallel.first_copy(metrics, parallel="shard_map"))
      losses.append({k: float(v) for k, v in metrics.items() if k.startswith("loss")})
    stepped = parallel.unreplicate(state, parallel="shard_map")
    # The update of each top-level module (its norm): the gradients, summed over the module.
    before = jax.device_get(params)
    update_norms = {name: float(np.sqrt(sum(
        np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
        for a, b in zip(jax.tree.leaves(stepped.params[name]), jax.tree.leaves(before[name])))))
                    for name in sorted(before)}
    variables = {"params": stepped.params, **(stepped.model_state or {})}
    predict = jax.jit(predictor_lib.predict_fn(model, hp, NUM_STUFF))

    def infer(image, variables, memory):
      results = predict(variables, memory, {"image": image, "image_size": host["image_size"],
                                            "orig_size": host["orig_size"]})
      return jax.device_get({k: results[k] for k in ("panoptic", "query_valid")})

    results = infer(host["image"], variables, stepped.memory)
    noisy = []
    for seed in noise_seeds:
      rng = np.random.default_rng(seed)
      perturb = lambda x, rng=rng: (np.asarray(x) * (1 + PERTURBATION * rng.standard_normal(
          np.shape(x)))).astype(np.asarray(x).dtype)
      noisy.append(infer(perturb(host["image"]), jax.tree.map(perturb, variables),
                         perturb(stepped.memory))["panoptic"])
  return {"losses": losses, "update_norms": update_norms,
          "panoptic": np.asarray(results["panoptic"], np.int32),
          "query_valid": np.asarray(results["query_valid"]), "noisy_panoptic": noisy}


def load_references(path: str | pathlib.Path = REFERENCES) -> tuple[dict[str, np.ndarray],
                                                                       dict[str, Any]]:
  """(inputs, reference values) from `references.npz`; ValueError naming the file if bad."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"{path}: references not found; make them on the CPU with "
                     "`python benchmarks/gpu/make_references.py`")
  with np.load(path) as data:
    arrays = {k: data[k] for k in data.files}
  try:
    meta = json.loads(str(arrays.pop("meta_json")))
  except KeyError as e:
    raise ValueError(f"{path}: no 'meta_json' entry (written by make_references.py)") from e
  reference = {"losses": meta["losses"], "update_norms": meta["update_norms"],
               "panoptic": arrays.pop("panoptic"),
               "allowed_pixels": int(meta["allowed_pixels"]), "meta": meta}
  return arrays, reference


def compare(result: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
  """The check of one run against the references: losses, then panoptic maps."""
  loss_rows, losses_ok = [], True
  for step, (ours, ref) in enumerate(zip(result["losses"], reference["losses"])):
    for key in sorted(ref):
      if key not in ours:
        loss_rows.append({"step": step + 1, "loss": key, "error": "missing"})
        losses_ok = False
        continue
      rel = abs(ours[key] - ref[key]) / max(abs(ref[key]), 1e-12)
      ok = rel <= LOSS_RTOL or abs(ours[key] - ref[key]) <= 1e-7  # 1e-7: exact zeros.
      losses_ok &= ok
      loss_rows.append({"step": step + 1, "loss": key, "ours": ours[key], "reference": ref[key],
                        "relative_difference": rel, "ok": bool(ok)})
  update_rows = []
  for name, ref in sorted(reference["update_norms"].items()):
    ours = result["update_norms"].get(name)
    rel = None if ours is None else abs(ours - ref) / max(abs(ref), 1e-12)
    ok = rel is not None and rel <= LOSS_RTOL
    losses_ok &= ok
    update_rows.append({"module": name, "ours": ours, "reference": ref,
                        "relative_difference": rel, "ok": bool(ok)})
  differing = int(np.sum(result["panoptic"] != reference["panoptic"]))
  allowed = reference["allowed_pixels"]
  pixels_ok = result["panoptic"].shape == reference["panoptic"].shape and differing <= allowed
  return {"losses": loss_rows, "update_norms": update_rows, "losses_ok": bool(losses_ok),
          "loss_rtol": LOSS_RTOL,
          "panoptic_pixels": int(reference["panoptic"].size),
          "panoptic_differing_pixels": differing, "panoptic_allowed_pixels": allowed,
          "panoptic_allowed_why": (
              f"pixels that change on the CPU when the input, weights and memory are perturbed "
              f"by {PERTURBATION} (relative, largest of {PERTURBATION_DRAWS} draws): argmax "
              "near-ties; float32 "
              "at full precision differs between backends by far less"),
          "panoptic_ok": bool(pixels_ok),
          "segments": int(np.sum(result["query_valid"])),
          "passed": bool(losses_ok and pixels_ok)}
