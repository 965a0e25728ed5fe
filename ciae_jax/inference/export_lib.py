"""Serialised inference: the whole prediction as `jax.export` (StableHLO) programs, and back.

  write_export(hp, restored, "exported/")          # what `python -m ciae_jax.export` runs
  predictor = ExportedPredictor("exported/")      # the same predictions as the checkpoint

One program per canvas of the dataset (`data.canvas.canvases`), each lowered for every asked
platform in one artifact (`jax.export` picks the one it runs on). A program is the function the
`Predictor` compiles, `predictor.predict_fn` (network, FCOS decoding, NMS, panoptic assignment,
the area and score filters), restricted to `predictor.RESULT_KEYS`:

  program(weights: list of arrays, batch: {"image": [B, H, W, 3] float32,
          "image_size": [B, 2] int32, "orig_size": [B, 2] int32}) -> {key: [B, ...]}

Variables and memory are *inputs* (`weights`, the leaves of `(variables, memory)` in pytree
order, stored once in `weights.npz` as `w00000`, `w00001`, ...), not constants: one copy serves
every canvas and platform, and a program file stays small (kilobytes of StableHLO, not a copy
of a ResNet-50 per canvas). `export.json` describes everything a server needs without this
package (the resize rule, the normalisation, the categories, the programs' signatures);
`examples/serve_exported.py` is such a server. Imports no TensorFlow (the programs run where
only JAX is installed).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from ciae_jax import platforms as platforms_lib
from ciae_jax.data import canvas as canvas_lib
from ciae_jax.data import categories as categories_lib
from ciae_jax.inference import predictor as predictor_lib
from ciae_jax.inference import preprocess
from ciae_jax.models import ciae as ciae_model

FORMAT = "ciae-jax-export"
FORMAT_VERSION = 1
MANIFEST = "export.json"
WEIGHTS = "weights.npz"
PLATFORMS = ("cpu", "cuda")
# Inputs of a program besides the weights: name -> (trailing shape given the canvas, dtype).
BATCH_INPUTS = ("image", "image_size", "orig_size")


def program_file(canvas: Sequence[int]) -> str:
  """File name of the program of `canvas` (H, W)."""
  return f"canvas_{int(canvas[0])}x{int(canvas[1])}.jaxexport"


def batch_spec(canvas: Sequence[int], batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of a program's `batch` input."""
  height, width = int(canvas[0]), int(canvas[1])
  return {"image": jax.ShapeDtypeStruct((batch_size, height, width, 3), np.float32),
          "image_size": jax.ShapeDtypeStruct((batch_size, 2), np.int32),
          "orig_size": jax.ShapeDtypeStruct((batch_size, 2), np.int32)}


def _describe(name: str, aval: Any) -> dict[str, Any]:
  return {"name": name, "shape": [int(d) for d in aval.shape], "dtype": str(np.dtype(aval.dtype))}


def manifest(hp: Any, categories: Any, *, step: int, num_weights: int, programs: list[dict],
             platforms: Sequence[str], batch_size: int) -> dict[str, Any]:
  """The `export.json` content: what a server needs to reproduce `preprocess` and read out."""
  mean = [float(v) for v in preprocess.transforms.IMAGENET_MEAN]
  std = [float(v) for v in preprocess.transforms.IMAGENET_STD]
  return {
      "format": FORMAT, "format_version": FORMAT_VERSION, "jax_version": jax.__version__,
      "checkpoint_step": int(step), "platforms": list(platforms), "batch_size": int(batch_size),
      "categories": [{"id": int(i), "name": n, "isthing": int(t), "color": [int(v) for v in c]}
                     for i, n, t, c in zip(categories.coco_ids, categories.names,
                                           categories.isthing, categories.colors)],
      "num_stuff": int(categories.num_stuff),
      "canvases": [list(p["canvas"]) for p in programs],
      "resize": {
          "eval_min_size": float(hp.dataset.eval_min_size),
          "eval_max_size": float(hp.dataset.eval_max_size),
          "rule": "scale = min(eval_min_size / min(h, w), eval_max_size / max(h, w)); "
                  "side = max(floor(side * scale + 0.5), 1) (float64)",
          "canvas": "the smallest-area canvas holding the resized image (ties: the first); if "
                    "none, the one needing the least shrinking, the size shrunk to fit it",
          "interpolation": "bilinear, half-pixel centres, no antialias, float32 "
                           "(tf.image.resize), applied after the normalisation",
          "padding": "zeros at the bottom and right, up to the canvas"},
      "normalize": {
          "mean": mean, "std": std,
          "scale": [float(v) for v in preprocess._SCALE],  # pylint: disable=protected-access
          "offset": [float(v) for v in preprocess._OFFSET],  # pylint: disable=protected-access
          "formula": "float32(x) * scale - offset, scale = float32(1 / (255 * std)), "
                     "offset = float32(mean / std), on the uint8 RGB image at its source size"},
      "weights": {"file": WEIGHTS, "count": int(num_weights),
                  "order": "keys w00000.. in order: the program's first argument, a list"},
      "outputs_meaning": {
          "panoptic": "[B, H, W] int32 query index + 1 per canvas pixel, 0 void",
          "query_class": "[B, Q] contiguous class of each query (index into categories)",
          "query_score": "[B, Q] detection score (things), 1 (stuff)",
          "query_is_thing": "[B, Q] bool",
          "det_box": "[B, K, 4] x0, y0, x1, y1 in input pixels", "det_score": "[B, K]",
          "det_class": "[B, K] contiguous class", "det_valid": "[B, K] bool"},
      "postprocess": "crop panoptic to image_size, resize to the original size by nearest "
                     "neighbour (source = floor((2 i + 1) * in / (2 out))), number the queries "
                     "present 1..n in query order: segment ids; blank rows of a batch: zero "
                     "image, image_size = orig_size = canvas",
      "programs": programs,
  }


def _program(model: Any, hp: Any, num_stuff: int, treedef: Any) -> Callable[..., Any]:
  per_device = predictor_lib.predict_fn(model, hp, num_stuff)

  def program(weights, batch):
    variables, memory = jax.tree.unflatten(treedef, weights)
    results = per_device(variables, memory, batch)
    return {k: results[k] for k in predictor_lib.RESULT_KEYS}

  return program


def write_export(hp: Any, restored: Any, output: str, *, platforms: Sequence[str] = PLATFORMS,
                 batch_size: int = 1, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Exports `restored` (`predictor.restore_for_inference`) into `output`; returns the manifest.

  Logs one line per program (canvas, seconds, time left), since a COCO model takes minutes.
  """
  if hp.inference.oracle:
    raise ValueError("inference.oracle=True needs ground truth: it cannot be exported")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1; got {batch_size}")
  leaves, treedef = jax.tree.flatten((restored.variables, restored.memory))
  leaves = [np.asarray(jax.device_get(leaf)) for leaf in leaves]
  odd = sorted({str(leaf.dtype) for leaf in leaves if leaf.dtype.kind not in "fiub"})
  if odd:  # .npz keeps NumPy's own dtypes only (bfloat16 would come back as raw bytes).
    raise ValueError(f"weights of dtype {odd} cannot be stored in {WEIGHTS}")
  weight_specs = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves]
  # The model of the export's platforms (model.dtype="auto" is theirs, not this host's).
  model = ciae_model.build_model(hp.model, restored.categories.num_things,
                                 restored.categories.num_stuff, platforms=tuple(platforms))
  jitted = jax.jit(platforms_lib.built_for(
      _program(model, hp, restored.categories.num_stuff, treedef), platforms))
  os.makedirs(output, exist_ok=True)
  np.savez(os.path.join(output, WEIGHTS), **{f"w{i:05d}": leaf for i, leaf in enumerate(leaves)})
  canvases = canvas_lib.canvases(hp.dataset)
  programs, start = [], time.monotonic()
  for index, canvas in enumerate(canvases):
    spec = batch_spec(canvas, batch_size)
    exported = jax.export.export(jitted, platforms=tuple(platforms))(weight_specs, spec)
    name = program_file(canvas)
    with open(os.path.join(output, name), "wb") as f:
      f.write(exported.serialize())
    out_avals = exported.out_tree.unflatten(exported.out_avals)  # {key: aval}
    programs.append({
        "file": name, "canvas": [int(canvas[0]), int(canvas[1])], "batch_size": batch_size,
        "platforms": list(exported.platforms),
        "inputs": [{"name": "weights", "count": len(leaves), "file": WEIGHTS}] +
                  [_describe(k, spec[k]) for k in sorted(spec)],
        "outputs": [_describe(k, out_avals[k]) for k in out_avals]})
    elapsed = time.monotonic() - start
    left = elapsed / (index + 1) * (len(canvases) - index - 1)
    log(f"exported {index + 1}/{len(canvases)}: canvas {canvas[0]}x{canvas[1]} "
        f"({','.join(exported.platforms)}) -> {name}, {elapsed:.1f} s so far, ~{left:.0f} s left")
  content = manifest(hp, restored.categories, step=restored.step, num_weights=len(leaves),
                     programs=programs, platforms=platforms, batch_size=batch_size)
  with open(os.path.join(output, MANIFEST), "w") as f:
    json.dump(content, f, indent=1)
  return content


def read_manifest(directory: str) -> dict[str, Any]:
  """`directory/export.json`, checked: ValueError / FileNotFoundError naming file and field."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file (export first: python -m ciae_jax.export "
                            "--config ... --workdir ... --output DIR)")
  with open(path) as f:
    try:
      content = json.load(f)
    except json.JSONDecodeError as error:
      raise ValueError(f"{path}: not JSON ({error})") from error
  if content.get("format") != FORMAT:
    raise ValueError(f"{path}: field 'format' is {content.get('format')!r}, not {FORMAT!r}")
  if content.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: field 'format_version' is {content.get('format_version')!r}; "
                     f"this code reads version {FORMAT_VERSION}")
  for field in ("categories", "resize", "programs", "weights", "batch_size"):
    if field not in content:
      raise ValueError(f"{path}: field {field!r} missing")
  for program in content["programs"]:
    if not os.path.isfile(os.path.join(directory, program["file"])):
      raise FileNotFoundError(f"{path}: program {program['file']} (canvas {program['canvas']}) "
                              f"not found in {directory}")
  return content


class ExportedPredictor(predictor_lib.BasePredictor):
  """A predictor whose compiled call is a deserialised program of `directory`.

  Same preprocessing (`preprocess.Preprocessor` with the manifest's rule and canvases) and the
  same post-processing (`BasePredictor.to_prediction`, `predict_batch`) as a `Predictor` of the
  checkpoint: no checkpoint, config or model code needed. One device, `batch_size` images per
  call.
  """

  def __init__(self, directory: str):
    manifest = read_manifest(directory)
    resize = manifest["resize"]
    canvases = tuple(tuple(int(v) for v in p["canvas"]) for p in manifest["programs"])
    super().__init__(
        preprocessor=preprocess.Preprocessor.from_rule(
            resize["eval_min_size"], resize["eval_max_size"], canvases),
        categories=categories_lib.categories_from_list(
            manifest["categories"], source=os.path.join(directory, MANIFEST)),
        per_device_batch=int(manifest["batch_size"]), step=manifest.get("checkpoint_step"))
    self.directory, self.manifest = directory, manifest
    weights_file = os.path.join(directory, self.manifest["weights"]["file"])
    if not os.path.isfile(weights_file):
      raise FileNotFoundError(f"{directory}/{MANIFEST}: weights file {weights_file} not found")
    with np.load(weights_file) as weights:
      self._weights = [jax.device_put(weights[k]) for k in sorted(weights.files)]
    if len(self._weights) != self.manifest["weights"]["count"]:
      raise ValueError(f"{weights_file}: {len(self._weights)} arrays, {MANIFEST} field "
                       f"'weights.count' says {self.manifest['weights']['count']}")
    self._programs: dict[tuple[int, int], Any] = {}
    self._files = {c: p["file"] for c, p in zip(canvases, self.manifest["programs"])}

  @property
  def rows_per_call(self) -> int:
    """Images one call takes: the exported batch size."""
    return self.per_device_batch

  def predict_batch(self, images: Sequence[Any], *, with_embedding: bool = False) -> list[Any]:
    """`Predictor.predict_batch`: any sizes, batched per canvas, in order; no embeddings."""
    if with_embedding:
      raise ValueError("exported programs give no embeddings (RESULT_KEYS only); use "
                       "Predictor.from_workdir for the demo's embedding picture")
    return super().predict_batch(images)

  def program(self, canvas: Sequence[int]) -> Any:
    """The deserialised program of `canvas` (read once)."""
    canvas = tuple(int(v) for v in canvas)
    if canvas not in self._files:
      raise ValueError(f"{self.directory}/{MANIFEST}: no program for canvas {canvas} "
                       f"(canvases {sorted(self._files)})")
    if canvas not in self._programs:
      with open(os.path.join(self.directory, self._files[canvas]), "rb") as f:
        self._programs[canvas] = jax.export.deserialize(bytearray(f.read()))
    return self._programs[canvas]

  def run(self, canvas: Sequence[int], prepared: Sequence[Any], *, segments: Any = None,
          with_embedding: bool = False) -> list[dict[str, np.ndarray] | None]:
    """`Predictor.run` on the exported program: up to `rows_per_call` images, None blank."""
    del segments, with_embedding
    canvas, batch = self._image_batch(canvas, prepared)
    outputs = jax.device_get(self.program(canvas).call(self._weights, batch))
    return [None if item is None else {k: np.asarray(v[row]) for k, v in outputs.items()}
            for row, item in enumerate(prepared)]
