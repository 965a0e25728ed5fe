"""Panoptic prediction for images of any size: `Predictor`, used by the demo and by evaluation.

  predictor = Predictor.from_workdir(config, "runs/synthetic")
  prediction = predictor("photo.jpg")         # or an RGB uint8 array [H, W, 3]
  prediction.panoptic                         # [H, W] int32 at the image's size, 0 = void
  prediction.segments_info                    # COCO panoptic: id, category_id, isthing, area,
                                              # bbox, score
  prediction.detections                       # COCO detections: category_id, bbox, score

Images go through `preprocess.Preprocessor` (the resize rule, then the padding to the smallest
canvas that holds the image), so programs compile once per canvas, whatever the image sizes.
Prediction is data-parallel over the devices (`hp.parallel`: pmap or shard_map, the switch of
`training.parallel`), `hp.inference.per_device_batch` images per device and call; a call with
fewer images is padded with blank rows. Imports no TensorFlow.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ciae_jax import checkpoint as checkpoint_lib
from ciae_jax import hparams
from ciae_jax import memory as memory_lib
from ciae_jax import parallel
from ciae_jax.data import dataset as dataset_lib
from ciae_jax.evaluation import coco_format
from ciae_jax.inference import panoptic
from ciae_jax.inference import preprocess
from ciae_jax.inference import program_cache as program_cache_lib
from ciae_jax.models import ciae as ciae_model
from ciae_jax.segments import SEGMENT_KEYS
from ciae_jax.segments import Segments

# What `Prediction` is built from; evaluation fetches the same keys.
RESULT_KEYS = ("panoptic", "query_class", "query_score", "query_is_thing", "det_box",
               "det_score", "det_class", "det_valid")
ImageLike = str | os.PathLike | np.ndarray


def predict_fn(model: ciae_model.CIAE, hp: hparams.HParams,
               num_stuff: int) -> Callable[..., dict[str, jax.Array]]:
  """The per-device `(variables, memory, batch) -> per-image inference results [B, ...]`.

  `batch` holds `image [B, H, W, 3]`, `image_size [B, 2]`, `orig_size [B, 2]` and, in oracle
  mode (`hp.inference.oracle`, paper Table V), the ground-truth segment arrays. The results are
  `panoptic.panoptic_inference`'s (or `oracle_inference`'s) plus `embedding [B, H, W, D]`.
  """
  infer = hp.inference
  stuff_from = hp.model.stuff_from
  if infer.oracle and stuff_from == "semantic":
    raise ValueError("inference.oracle=True (Table V) assigns stuff from the memory; it does "
                     "not support model.stuff_from='semantic'")
  keys = ("cls_logits", "centerness", "box_reg", "embedding", "embedding_prenorm") + (
      ("semantic_logits",) if stuff_from == "semantic" else ())

  def predict(variables, memory, batch):
    outputs = model.apply(variables, batch["image"])
    outputs = {k: outputs[k] for k in keys}
    scale = batch["image_size"][:, 0] / batch["orig_size"][:, 0]  # [B]
    if infer.oracle:
      results = jax.vmap(lambda o, s, size, r: panoptic.oracle_inference(
          o, memory, s, infer, image_size=size, num_stuff=num_stuff, resize_scale=r))(
              outputs, Segments.from_batch(batch), batch["image_size"], scale)
    else:
      results = jax.vmap(lambda o, size, r: panoptic.panoptic_inference(
          o, memory, size, infer, num_stuff=num_stuff, merge_things=hp.loss.merge_things,
          strides=model.strides, resize_scale=r, stuff_from=stuff_from))(
              outputs, batch["image_size"], scale)
    return {**results, "embedding": outputs["embedding"]}

  return predict


@dataclasses.dataclass(frozen=True)
class Restored:
  """What inference needs from a checkpoint."""
  model: Any
  variables: Any
  memory: Any
  categories: Any
  step: int


def inference_template(hp: hparams.HParams, model: ciae_model.CIAE, *, num_stuff: int,
                       num_things: int, program_cache: str | None = None) -> dict[str, Any]:
  """Shapes of what inference reads from a checkpoint: params, model state, memory.

  From `jax.eval_shape`: nothing is computed, and no optimizer state is built. With a
  `program_cache` folder, from the stored init program's output types (no tracing at all).
  """
  def init(rng):
    return ciae_model.init_variables(model, rng)

  rng = jax.random.PRNGKey(0)
  if program_cache:
    variables = program_cache_lib.cached_eval_shape(
        init, (rng,), program_cache, f"init {hp.model!r} {num_things}")
  else:
    variables = jax.eval_shape(init, rng)
  params, model_state = ciae_model.split_variables(variables)
  rows = memory_lib.num_memory(num_stuff, num_things, hp.loss.merge_things)
  memory = jax.ShapeDtypeStruct((rows, hp.model.embed_dim), jnp.float32)
  return {"params": params, "model_state": model_state, "memory": memory}


def restore_for_inference(hp: hparams.HParams, workdir: str, checkpoint_step: int | None = None,
                          program_cache: str | None = None) -> Restored:
  """The model, its variables and memory from `workdir/checkpoints` (latest or a given step).

  Reads the params, the model state and the memory only (`checkpoint.restore_fields`).

  Raises:
    FileNotFoundError: no checkpoint (or not that step) in the workdir.
    ValueError: the checkpoint does not fit the model of `hp`.
  """
  categories = dataset_lib.load_dataset_categories(hp.dataset)
  model = ciae_model.build_model(hp.model, categories.num_things, categories.num_stuff)
  template = inference_template(hp, model, num_stuff=categories.num_stuff,
                                num_things=categories.num_things, program_cache=program_cache)
  manager = checkpoint_lib.create_manager(workdir, create=False)
  step = manager.latest_step() if checkpoint_step is None else checkpoint_step
  fields = checkpoint_lib.restore_fields(manager, template, step)
  if fields is None:
    available = list(manager.all_steps())
    raise FileNotFoundError(
        f"no checkpoint{'' if checkpoint_step is None else f' at step {checkpoint_step}'} in "
        f"{workdir}/checkpoints (available steps: {available})")
  variables = {"params": fields["params"], **fields["model_state"]}
  return Restored(model, variables, fields["memory"], categories, int(step))


@dataclasses.dataclass(frozen=True)
class Prediction:
  """The panoptic result of one image, at the image's own size.

  Attributes:
    panoptic: `[H, W]` int32 segment ids, 0 = void.
    segments_info: COCO panoptic segments (`id`, `category_id`, `isthing`, `area`, `bbox`
      [x, y, w, h] inclusive pixels, `score`; 1 for stuff), in query order.
    detections: COCO detection results (`category_id`, `bbox` [x, y, w, h] in image pixels,
      `score`), the detector's boxes after NMS, scores not thresholded.
    embedding: `[h, w, D]` unit pixel embeddings of the resized image (input resolution), when
      asked for; else None.
  """
  panoptic: np.ndarray
  segments_info: list[dict[str, Any]]
  detections: list[dict[str, Any]]
  embedding: np.ndarray | None = None


class BasePredictor:
  """What every predictor shares: preprocessing, batching per canvas, post-processing.

  Subclasses give `rows_per_call` and `run` (one compiled call on up to `rows_per_call` images
  of one canvas): `Predictor` (a restored checkpoint) and `export_lib.ExportedPredictor`
  (deserialised programs).
  """

  def __init__(self, *, preprocessor: preprocess.Preprocessor, categories: Any,
               per_device_batch: int, step: int | None, oracle: bool = False):
    self.preprocessor, self.categories, self.step = preprocessor, categories, step
    self.per_device_batch, self.oracle = per_device_batch, oracle

  @property
  def rows_per_call(self) -> int:
    """Images one call of `run` takes."""
    raise NotImplementedError

  def run(self, canvas: Sequence[int], prepared: Sequence[preprocess.Prepared | None], *,
          segments: Sequence[Mapping[str, np.ndarray] | None] | None = None,
          with_embedding: bool = False) -> list[dict[str, np.ndarray] | None]:
    """One compiled call on up to `rows_per_call` images of `canvas`; None rows are blank."""
    raise NotImplementedError

  def __call__(self, image: ImageLike, *, with_embedding: bool = False) -> Prediction:
    """The prediction of one image: a path, or an RGB uint8 array `[H, W, 3]`."""
    return self.predict_batch([image], with_embedding=with_embedding)[0]

  def predict_batch(self, images: Sequence[ImageLike], *,
                    with_embedding: bool = False) -> list[Prediction]:
    """Predictions of many images (any sizes), in their order; batched per canvas."""
    if self.oracle:
      raise ValueError("inference.oracle=True needs the ground truth of each image: it runs in "
                       "evaluation (evaluate.py), not on plain images")
    prepared = [self.preprocessor(preprocess.load_rgb(image)) for image in images]
    out: list[Prediction | None] = [None] * len(prepared)
    for canvas in dict.fromkeys(p.canvas for p in prepared):
      index = [i for i, p in enumerate(prepared) if p.canvas == canvas]
      for start in range(0, len(index), self.rows_per_call):
        chunk = index[start:start + self.rows_per_call]
        raws = self.run(canvas, [prepared[i] for i in chunk], with_embedding=with_embedding)
        for i, raw in zip(chunk, raws):
          out[i] = self.to_prediction(raw, prepared[i])
    return out

  def _image_batch(self, canvas: Sequence[int], prepared: Sequence[preprocess.Prepared | None]
                   ) -> tuple[tuple[int, int], dict[str, np.ndarray]]:
    """`(canvas, batch)`: the images and sizes of one call of `run`, `rows_per_call` rows."""
    canvas = tuple(int(v) for v in canvas)
    rows = self.rows_per_call
    if len(prepared) > rows or any(p is not None and p.canvas != canvas for p in prepared):
      raise ValueError(f"run takes at most {rows} images of canvas {canvas}")
    batch = {"image": np.zeros((rows, *canvas, 3), np.float32),  # [L, H, W, 3]
             # Blank rows claim the whole canvas: finite scales, no empty regions.
             "image_size": np.tile(np.asarray(canvas, np.int32), (rows, 1)),  # [L, 2]
             "orig_size": np.tile(np.asarray(canvas, np.int32), (rows, 1))}  # [L, 2]
    for row, item in enumerate(prepared):
      if item is not None:
        batch["image"][row] = item.image
        batch["image_size"][row], batch["orig_size"][row] = item.image_size, item.orig_size
    return canvas, batch

  def to_prediction(self, raw: Mapping[str, np.ndarray],
                    prepared: preprocess.Prepared) -> Prediction:
    """`run`'s result of one image at the image's own size."""
    coco_ids = self.categories.coco_ids
    id_map, segments = coco_format.to_coco_panoptic(raw, prepared.image_size, prepared.orig_size,
                                                    coco_ids, with_scores=True)
    detections = coco_format.detections_to_coco(raw, 0, image_scale(prepared), coco_ids)
    for detection in detections:
      del detection["image_id"]
    embedding = None
    if "embedding" in raw:
      height, width = prepared.image_size
      embedding = np.asarray(raw["embedding"][:height, :width])  # [h, w, D]
    return Prediction(id_map, segments, detections, embedding)


class Predictor(BasePredictor):
  """A restored CIAE that predicts panoptic segmentations of images (see the module docstring).

  Args:
    hp: the run's hyper-parameters (model, dataset sizes, inference, `parallel`).
    model: the `CIAE` module; variables: its variables (`params` and the other collections);
    memory: `[M, D]` memory embeddings; categories: the dataset's `CategoryInfo`.
    devices: local devices to run on (default all; with several processes, all of theirs).
    per_device_batch: images per device and call (default `hp.inference.per_device_batch`).
    step: the checkpoint step, for the record.
    program_cache: a folder where traced programs are kept between processes
      (`program_cache.cached_call`; the demo's), or None: traced every time.
  """

  def __init__(self, hp: hparams.HParams, *, model: ciae_model.CIAE, variables: Any,
               memory: Any, categories: Any, devices: Sequence[Any] | None = None,
               per_device_batch: int | None = None, step: int | None = None,
               program_cache: str | None = None):
    super().__init__(preprocessor=preprocess.Preprocessor(hp.dataset), categories=categories,
                     per_device_batch=per_device_batch or hp.inference.per_device_batch,
                     step=step, oracle=hp.inference.oracle)
    self.hp, self.model = hp, model
    self._local_devices = list(devices) if devices else jax.local_devices()
    self._mesh = None
    if hp.parallel == "shard_map":
      self._mesh = parallel.make_mesh(list(devices) if devices else None)
    self._consts = parallel.replicate((variables, memory), parallel=hp.parallel,
                                      mesh=self._mesh, devices=self._local_devices)
    self.num_traces = 0  # One per compiled program (one per canvas).
    per_device = predict_fn(model, hp, categories.num_stuff)

    def counted(consts, batch):
      self.num_traces += 1
      if program_cache:
        return program_cache_lib.cached_call(lambda c, b: per_device(*c, b), (consts, batch),
                                             program_cache, repr(hp))
      return per_device(*consts, batch)

    self._fn = parallel.parallelize_map(counted, parallel=hp.parallel, mesh=self._mesh,
                                        devices=list(devices) if devices else None)

  @classmethod
  def from_restored(cls, hp: hparams.HParams, restored: Restored, **kwargs: Any) -> Predictor:
    """A predictor of `restore_for_inference`'s result."""
    return cls(hp, model=restored.model, variables=restored.variables, memory=restored.memory,
               categories=restored.categories, step=restored.step, **kwargs)

  @classmethod
  def from_workdir(cls, config: Any, workdir: str, step: int | None = None,
                   **kwargs: Any) -> Predictor:
    """Restores `workdir`'s latest checkpoint (or `step`): params, model state, memory only.

    Args:
      config: an ml_collections config (`configs/*.py`) or `hparams.HParams`.
      workdir: the training workdir (its `checkpoints/`).
      step: checkpoint step; None: the latest.
      **kwargs: `devices`, `per_device_batch`, `program_cache` (see the class).
    """
    hp = config if isinstance(config, hparams.HParams) else hparams.HParams.from_config(config)
    restored = restore_for_inference(hp, workdir, step, kwargs.get("program_cache"))
    return cls.from_restored(hp, restored, **kwargs)

  @property
  def rows_per_call(self) -> int:
    """Images one compiled call takes on this process (local devices x per-device batch)."""
    return len(self._local_devices) * self.per_device_batch

  def run(self, canvas: Sequence[int], prepared: Sequence[preprocess.Prepared | None], *,
          segments: Sequence[Mapping[str, np.ndarray] | None] | None = None,
          with_embedding: bool = False) -> list[dict[str, np.ndarray] | None]:
    """One compiled call on up to `rows_per_call` images of one canvas; None rows are blank.

    With several processes every process must make the same calls (same canvases, same
    order): the program spans all their devices. `segments` (oracle mode) holds the
    `preprocess.segments_at_input` arrays of each row.

    Returns:
      Per row, the host results (`RESULT_KEYS`, `embedding` if asked) or None for blank rows.
    """
    canvas, batch = self._image_batch(canvas, prepared)
    rows = self.rows_per_call
    if self.hp.inference.oracle:
      batch.update(_blank_segments(rows, canvas, self.hp.dataset.max_segments))
    for row, item in enumerate(prepared):
      if item is None:
        continue
      if self.hp.inference.oracle:
        if segments is None or segments[row] is None:
          raise ValueError("oracle mode: every image needs its ground-truth segments")
        for key in SEGMENT_KEYS:
          batch[key][row] = segments[row][key]
    devices = len(self._local_devices)
    batch = {k: v.reshape(devices, self.per_device_batch, *v.shape[1:]) for k, v in batch.items()}
    outputs = self._fn(self._consts, parallel.shard_batch(batch, parallel=self.hp.parallel,
                                                          mesh=self._mesh))
    keys = RESULT_KEYS + (("embedding",) if with_embedding else ())
    host = parallel.local_rows({k: outputs[k] for k in keys}, parallel=self.hp.parallel)
    host = {k: v.reshape(rows, *v.shape[2:]) for k, v in host.items()}  # [L, ...]
    return [None if item is None else {k: v[row] for k, v in host.items()}
            for row, item in enumerate(prepared)]


def image_scale(prepared: preprocess.Prepared) -> tuple[float, float]:
  """(scale_y, scale_x): input pixels per original pixel."""
  return (prepared.image_size[0] / prepared.orig_size[0],
          prepared.image_size[1] / prepared.orig_size[1])


def _blank_segments(rows: int, canvas: tuple[int, int], max_segments: int
                    ) -> dict[str, np.ndarray]:
  return {"segment_map": np.zeros((rows, *canvas), np.int32),
          "seg_class": np.zeros((rows, max_segments), np.int32),
          "seg_is_thing": np.zeros((rows, max_segments), bool),
          "seg_is_crowd": np.zeros((rows, max_segments), bool),
          "seg_box": np.zeros((rows, max_segments, 4), np.float32),
          "seg_valid": np.zeros((rows, max_segments), bool)}
