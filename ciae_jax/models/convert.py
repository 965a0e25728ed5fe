"""torchvision ResNet ImageNet weights -> our backbone variables (params and frozen BN).

Inputs: a torchvision state dict as `.pth` (needs torch), `.npz` or `.safetensors`
(keys "conv1.weight", "layer1.0.bn1.running_mean", ...), or a `.npz` written by this
module's CLI (keys "layer1_0/bn1/mean", ... plus "__backbone__").

Mapping (one to one, strict): "<a>.<i>.<m>.<leaf>" -> "<a>_<i>/<m>/<leaf'>", with
`downsample.0` / `downsample.1` -> `downsample_0` / `downsample_1`, and leaves
weight -> kernel (conv, OIHW -> HWIO) or scale (BN), bias -> bias,
running_mean -> mean, running_var -> var. Ignored on purpose: "fc.weight",
"fc.bias" (the ImageNet classifier) and every "*.num_batches_tracked" (a counter).
Any other key without a place, any variable without a key, or a shape mismatch is
a ValueError listing them all.

CLI: python -m ciae_jax.models.convert IN.{pth,npz,safetensors} OUT.npz [--backbone resnet50]
"""
import argparse
import functools
import os
import sys
from typing import Any, Mapping, Sequence

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from ciae_jax.models import resnet

# Keys of a torchvision state dict that have no place in the backbone, on purpose.
IGNORED_KEYS = ("fc.weight", "fc.bias")
IGNORED_SUFFIXES = (".num_batches_tracked",)
# Marker key in our converted .npz, holding the backbone name.
BACKBONE_MARKER = "__backbone__"

_OURS_TO_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "mean": "running_mean",
                       "var": "running_var", "bias": "bias"}


def torch_key(path: str) -> str:
  """Our backbone path "layer1_0/downsample_1/mean" -> "layer1.0.downsample.1.running_mean"."""
  *modules, leaf = path.split("/")
  return ".".join([m.replace("_", ".") for m in modules] + [_OURS_TO_TORCH_LEAF[leaf]])


def _is_ignored(key: str) -> bool:
  return key in IGNORED_KEYS or key.endswith(IGNORED_SUFFIXES)


@functools.cache
def backbone_shapes(backbone: str) -> dict[str, tuple[int, ...]]:
  """Our backbone variables of `backbone` (frozen_bn): {"layer1_0/conv1/kernel": shape, ...}."""
  model = resnet.ResNet(backbone, norm="frozen_bn", freeze_at=0)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  shapes = {}
  for collection in variables.values():
    for path, leaf in traverse_util.flatten_dict(collection, sep="/").items():
      shapes[path] = tuple(leaf.shape)
  return shapes


def infer_backbone(state_dict: Mapping[str, Any]) -> str:
  """The RESNET_SPECS name whose torch keys and shapes are closest to `state_dict`'s.

  Closest = fewest keys on one side only plus shape mismatches, so that a state
  dict with one stray or missing key still picks its architecture and the strict
  conversion then names that key.
  """
  keys = {k for k in state_dict if not _is_ignored(k)}
  def distance(name: str) -> int:
    expected = {torch_key(p): _torch_shape(s) for p, s in backbone_shapes(name).items()}
    mismatched = sum(tuple(np.shape(state_dict[k])) != expected[k] for k in keys & set(expected))
    return len(keys ^ set(expected)) + mismatched
  best = min(resnet.RESNET_SPECS, key=distance)
  if distance(best) > len(backbone_shapes(best)) // 2:
    raise ValueError(f"state dict ({len(keys)} keys) is far from every known backbone "
                     f"{sorted(resnet.RESNET_SPECS)}")
  return best


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """Our HWIO kernel shape -> torch OIHW; vectors unchanged."""
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return shape


def convert_torchvision_state_dict(state_dict: Mapping[str, Any], backbone: str | None = None,
                                   *, source: str = "state dict") -> dict[str, np.ndarray]:
  """torchvision ResNet state dict (numpy values) -> {our backbone path: float32 array}.

  Strict: every non-ignored key must map to a variable of `backbone` (inferred when
  None) and every variable must be present, with matching shapes; otherwise a
  ValueError names `source` and lists the offending keys.
  """
  if backbone is None:
    try:
      backbone = infer_backbone(state_dict)
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from None
  resnet.resnet_spec(backbone)  # A clear error for an unknown name.
  shapes = backbone_shapes(backbone)
  by_torch_key = {torch_key(path): path for path in shapes}
  keys = {k for k in state_dict if not _is_ignored(k)}
  extra = sorted(keys - set(by_torch_key))
  missing = sorted(set(by_torch_key) - keys)
  problems = []
  if extra:
    problems.append(f"keys with no place in {backbone}: {extra}")
  if missing:
    problems.append(f"keys of {backbone} missing: {missing}")
  converted = {}
  for key in sorted(keys & set(by_torch_key)):
    path = by_torch_key[key]
    value = np.asarray(state_dict[key], dtype=np.float32)
    expected = _torch_shape(shapes[path])
    if value.shape != expected:
      problems.append(f"{key}: shape {value.shape}, expected {expected}")
      continue
    converted[path] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value  # OIHW -> HWIO
  if problems:
    raise ValueError(f"{source}: cannot convert to {backbone}: " + "; ".join(problems))
  return converted


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a .pth (torch required), .npz or .safetensors file into {key: numpy array}."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"weights file not found: {path}")
  if path.endswith((".pth", ".pt")):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"{path}: reading .pth needs torch, which is not installed; convert it "
                        "where torch is (python -m ciae_jax.models.convert IN.pth OUT.npz) or "
                        "save the state dict as .npz / .safetensors") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "numpy")}
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return dict(load_file(path))
  raise ValueError(f"{path}: unknown weights format; expected .pth, .npz or .safetensors")


def read_backbone(path: str | os.PathLike, backbone: str | None = None) -> dict[str, np.ndarray]:
  """Backbone arrays by our path, from a torchvision state dict or our converted .npz."""
  state = read_state_dict(path)
  if BACKBONE_MARKER not in state:
    return convert_torchvision_state_dict(state, backbone, source=os.fspath(path))
  stored = str(state.pop(BACKBONE_MARKER))
  if backbone is not None and backbone != stored:
    raise ValueError(f"{path}: holds {stored}, but {backbone} was asked for")
  return state


def load_backbone_params(path: str | os.PathLike, variables: Mapping[str, Any], *,
                         module: str = "backbone") -> dict[str, Any]:
  """`variables` with every leaf under `module` (in every collection) read from `path`.

  Works on real arrays or on jax.eval_shape's ShapeDtypeStructs; the leaves keep
  their dtype. Every backbone variable must be found in the file and every array in
  the file must be used (ValueError listing the rest); the input is not modified.
  """
  path = os.fspath(path)
  arrays = read_backbone(path)
  targets = {}  # our path -> (collection, leaf)
  for collection, tree in variables.items():
    if module in tree:
      for name, leaf in traverse_util.flatten_dict(dict(tree[module]), sep="/").items():
        targets[name] = (collection, leaf)
  if not targets:
    raise ValueError(f"variables have no '{module}' module in any collection "
                     f"(collections: {list(variables)})")
  missing = sorted(set(targets) - set(arrays))
  unused = sorted(set(arrays) - set(targets))
  wrong = [f"{name}: file {arrays[name].shape}, model {tuple(targets[name][1].shape)}"
           for name in sorted(set(targets) & set(arrays))
           if arrays[name].shape != tuple(targets[name][1].shape)]
  if missing or unused or wrong:
    raise ValueError(
        f"{path}: does not fit the model's '{module}': "
        f"missing {[f'{m} ({torch_key(m)})' for m in missing]}, unused {unused}, "
        f"shape mismatches {wrong} (norm must be 'frozen_bn' and the depth must match)")
  new_variables = {c: traverse_util.flatten_dict(dict(t)) for c, t in variables.items()}
  for name, (collection, leaf) in targets.items():
    key = (module, *name.split("/"))
    new_variables[collection][key] = jnp.asarray(arrays[name], dtype=leaf.dtype)
  return {c: traverse_util.unflatten_dict(t) for c, t in new_variables.items()}


def main(argv: Sequence[str] | None = None) -> int:
  """CLI: convert a torchvision ResNet state dict to our backbone .npz."""
  parser = argparse.ArgumentParser(
      prog="python -m ciae_jax.models.convert", description=main.__doc__)
  parser.add_argument("input", help="torchvision state dict: .pth, .npz or .safetensors")
  parser.add_argument("output", help="output .npz (our backbone paths)")
  parser.add_argument("--backbone", default=None, choices=sorted(resnet.RESNET_SPECS),
                      help="expected architecture (default: inferred from the keys)")
  args = parser.parse_args(argv)
  if not args.output.endswith(".npz"):
    parser.error(f"output must end with .npz, got {args.output}")
  state = read_state_dict(args.input)
  arrays = convert_torchvision_state_dict(state, args.backbone, source=args.input)
  backbone = args.backbone or infer_backbone(state)
  np.savez(args.output, **arrays, **{BACKBONE_MARKER: np.array(backbone)})
  print(f"{args.input}: {backbone}, {len(arrays)} arrays, "
        f"{sum(a.size for a in arrays.values())} values -> {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
