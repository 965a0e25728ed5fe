"""Tests of ciae_jax.models.convert: torchvision ResNet-50 state dict -> our backbone."""
import importlib.util
import os
import pathlib
import subprocess
import sys

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from ciae_jax.models import ciae
from ciae_jax.models import convert
from ciae_jax.models import layers

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def torchvision_resnet50_shapes() -> dict[str, tuple[int, ...]]:
  """Key names and shapes of torchvision.models.resnet50().state_dict(), written out by hand."""
  shapes = {"conv1.weight": (64, 3, 7, 7)}

  def bn(prefix, channels):
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{prefix}.{leaf}"] = (channels,)
    shapes[f"{prefix}.num_batches_tracked"] = ()

  bn("bn1", 64)
  inplanes = 64
  for layer, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
    for block in range(blocks):
      prefix = f"layer{layer}.{block}"
      shapes[f"{prefix}.conv1.weight"] = (planes, inplanes, 1, 1)
      bn(f"{prefix}.bn1", planes)
      shapes[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
      bn(f"{prefix}.bn2", planes)
      shapes[f"{prefix}.conv3.weight"] = (planes * 4, planes, 1, 1)
      bn(f"{prefix}.bn3", planes * 4)
      if block == 0:
        shapes[f"{prefix}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
        bn(f"{prefix}.downsample.1", planes * 4)
      inplanes = planes * 4
  shapes["fc.weight"] = (1000, 2048)
  shapes["fc.bias"] = (1000,)
  return shapes


def random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in torchvision_resnet50_shapes().items():
    if key.endswith("num_batches_tracked"):
      state[key] = np.array(100, np.int64)
    elif key.endswith("running_var"):
      state[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    else:
      state[key] = rng.standard_normal(shape, dtype=np.float32)
  return state


def expected_place(key: str, ndim: int) -> tuple[str, tuple[str, ...]]:
  """Independent mapping: torch key -> (collection, path under 'backbone'), CIAE-R50 frozen_bn."""
  parts = key.split(".")
  if parts[0].startswith("layer"):
    modules = [f"{parts[0]}_{parts[1]}"]
    rest = parts[2:]
    if rest[0] == "downsample":
      modules.append(f"downsample_{rest[1]}")
      rest = rest[2:]
    else:
      modules.append(rest[0])
      rest = rest[1:]
  else:
    modules, rest = [parts[0]], parts[1:]
  leaf = {"running_mean": "mean", "running_var": "var", "bias": "bias"}.get(
      rest[0], "kernel" if ndim == 4 else "scale")
  is_conv = leaf == "kernel"
  frozen_stage = modules[0] == "conv1" or modules[0].startswith("layer1_")
  collection = "frozen" if (not is_conv or frozen_stage) else "params"
  return collection, (*modules, leaf)


@pytest.fixture(scope="module")
def r50_variables():
  """CIAE-R50 variables as ShapeDtypeStructs (no compile, no memory)."""
  model = ciae.build_model(dict(backbone="resnet50", norm="frozen_bn"), 80)
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 128, 128, 3)))


@pytest.fixture(scope="module")
def state_dict():
  return random_state_dict()


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory, state_dict):
  folder = tmp_path_factory.mktemp("weights")
  npz_path, st_path = folder / "r50.npz", folder / "r50.safetensors"
  np.savez(npz_path, **state_dict)
  save_file(state_dict, str(st_path))
  return {"npz": npz_path, "safetensors": st_path}


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_round_trip_every_tensor_lands_in_its_place(fmt, weight_files, state_dict, r50_variables):
  loaded = convert.load_backbone_params(weight_files[fmt], r50_variables)
  placed = set()
  for key, value in state_dict.items():
    if key.startswith("fc.") or key.endswith("num_batches_tracked"):
      continue
    collection, path = expected_place(key, value.ndim)
    got = np.asarray(traverse_util.flatten_dict(loaded[collection]["backbone"])[path])
    want = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value  # OIHW -> HWIO
    np.testing.assert_array_equal(got, want, err_msg=key)
    placed.add((collection, path))
  # Every backbone variable of the model received a tensor: nothing left at its init.
  model_leaves = {(c, p) for c in r50_variables
                  for p in traverse_util.flatten_dict(r50_variables[c].get("backbone", {}))}
  assert placed == model_leaves
  # Non-backbone variables are passed through untouched.
  assert loaded["params"]["head"] is not None
  head_in = jax.tree.leaves(r50_variables["params"]["head"])
  head_out = jax.tree.leaves(loaded["params"]["head"])
  assert all(a is b for a, b in zip(head_in, head_out))


def test_cli_writes_a_file_the_loader_accepts(tmp_path, weight_files, r50_variables, capsys):
  out = tmp_path / "converted.npz"
  assert convert.main([str(weight_files["safetensors"]), str(out)]) == 0
  assert "resnet50" in capsys.readouterr().out
  from_cli = convert.load_backbone_params(out, r50_variables)
  direct = convert.load_backbone_params(weight_files["npz"], r50_variables)
  for a, b in zip(jax.tree.leaves(from_cli), jax.tree.leaves(direct)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_extra_key_is_an_error_naming_it(state_dict):
  bad = dict(state_dict)
  bad["layer2.1.conv4.weight"] = np.zeros((128, 128, 3, 3), np.float32)
  with pytest.raises(ValueError, match=r"layer2\.1\.conv4\.weight"):
    convert.convert_torchvision_state_dict(bad)


def test_missing_key_is_an_error_naming_it(tmp_path, state_dict, r50_variables):
  bad = {k: v for k, v in state_dict.items() if k != "layer3.4.bn2.running_var"}
  path = tmp_path / "missing.npz"
  np.savez(path, **bad)
  with pytest.raises(ValueError, match=r"missing.npz.*layer3\.4\.bn2\.running_var"):
    convert.load_backbone_params(path, r50_variables)


def test_wrong_shape_is_an_error_naming_it(state_dict):
  bad = dict(state_dict)
  bad["layer4.0.conv2.weight"] = np.zeros((512, 512, 1, 1), np.float32)
  with pytest.raises(ValueError, match=r"layer4\.0\.conv2\.weight: shape"):
    convert.convert_torchvision_state_dict(bad, "resnet50")


def test_fc_and_counters_are_ignored_not_required(state_dict):
  trimmed = {k: v for k, v in state_dict.items()
             if not (k.startswith("fc.") or k.endswith("num_batches_tracked"))}
  assert len(convert.convert_torchvision_state_dict(trimmed)) == len(trimmed)


def test_gn_model_is_refused(tmp_path, weight_files):
  gn_model = ciae.build_model(dict(backbone="resnet50", norm="gn"), 3)
  gn_vars = jax.eval_shape(gn_model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  with pytest.raises(ValueError, match="does not fit"):
    convert.load_backbone_params(weight_files["npz"], gn_vars)


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_pth_without_torch_is_a_clear_error(tmp_path):
  path = tmp_path / "r50.pth"
  path.write_bytes(b"not read")
  with pytest.raises(ImportError, match="torch"):
    convert.read_state_dict(path)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_pth_is_read_with_torch(tmp_path):
  # torch is never imported in the pytest process (tests/conftest.py): a subprocess writes a
  # .pth with torch.save and reads it back with read_state_dict.
  path = tmp_path / "tiny.pth"
  script = (
      "import sys, torch, numpy as np\n"
      "from ciae_jax.models import convert\n"
      "torch.save({'conv1.weight': torch.arange(6.0).reshape(1, 1, 2, 3),\n"
      "            'bn1.num_batches_tracked': torch.tensor(3)}, sys.argv[1])\n"
      "state = convert.read_state_dict(sys.argv[1])\n"
      "assert sorted(state) == ['bn1.num_batches_tracked', 'conv1.weight'], sorted(state)\n"
      "np.testing.assert_array_equal(state['conv1.weight'],\n"
      "                              np.arange(6.0, dtype=np.float32).reshape(1, 1, 2, 3))\n"
      "assert state['bn1.num_batches_tracked'] == 3\n"
      "print('PTH_OK')\n")
  result = subprocess.run([sys.executable, "-c", script, str(path)], cwd=REPO_ROOT,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0 and "PTH_OK" in result.stdout, result.stderr[-3000:]


def test_unknown_format_is_an_error(tmp_path):
  path = tmp_path / "weights.bin"
  path.write_bytes(b"")
  with pytest.raises(ValueError, match="weights.bin"):
    convert.read_state_dict(path)


def numpy_conv_frozen_bn(x, weight, stride, bn):
  """PyTorch Conv2d(bias=False, padding=k//2) + BatchNorm2d.eval(), in float64 NumPy.

  x: [B, H, W, Cin]; weight: [Cout, Cin, k, k] (OIHW); bn: torch-named vectors.
  """
  k = weight.shape[-1]
  pad = k // 2
  x = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out_h = (x.shape[1] - k) // stride + 1
  out_w = (x.shape[2] - k) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, weight.shape[0]))
  for ky in range(k):
    for kx in range(k):
      window = x[:, ky:ky + stride * out_h:stride, kx:kx + stride * out_w:stride, :]
      out += window @ weight[:, :, ky, kx].astype(np.float64).T
  mean, var = bn["running_mean"], bn["running_var"]
  return (out - mean) / np.sqrt(var.astype(np.float64) + 1e-5) * bn["weight"] + bn["bias"]


@pytest.mark.parametrize("conv_key, bn_prefix, stride, in_hw", [
    ("conv1.weight", "bn1", 2, 18),  # the frozen 7x7 stem
    ("layer2.0.conv2.weight", "layer2.0.bn2", 2, 10),  # a trainable 3x3 stride-2 conv (v1.5)
])
def test_converted_conv_and_frozen_bn_match_numpy(conv_key, bn_prefix, stride, in_hw,
                                                  state_dict, weight_files, r50_variables):
  loaded = convert.load_backbone_params(weight_files["npz"], r50_variables)
  weight = state_dict[conv_key]
  bn = {leaf: state_dict[f"{bn_prefix}.{leaf}"]
        for leaf in ("weight", "bias", "running_mean", "running_var")}
  conv_collection, conv_path = expected_place(conv_key, 4)
  _, bn_path = expected_place(f"{bn_prefix}.bias", 1)
  kernel = traverse_util.flatten_dict(loaded[conv_collection]["backbone"])[conv_path]
  bn_vars = loaded["frozen"]["backbone"]
  for name in bn_path[:-1]:
    bn_vars = bn_vars[name]
  x = np.random.default_rng(1).standard_normal((2, in_hw, in_hw, weight.shape[1]),
                                               dtype=np.float32)
  conv = layers.Conv2d(weight.shape[0], weight.shape[-1], stride, collection=conv_collection)
  y = conv.apply({conv_collection: {"kernel": kernel}}, x)
  y = layers.FrozenBatchNorm().apply({"frozen": bn_vars}, y)
  want = numpy_conv_frozen_bn(x, weight, stride, bn)
  assert y.shape == want.shape
  # float32 convolution of K = 147 / 1152 products of unit normals (|y| ~ 12-34, sum|terms|
  # up to ~700), times a BN scale of up to ~3, vs float64: a blocked float32 sum is within
  # ~log2(K) * eps * sum|terms| ~ 1e-3 of exact (random roundings: ~1e-4, measured);
  # atol 2e-3 and rtol 2e-4 cover that bound in any summation order.
  np.testing.assert_allclose(np.asarray(y), want, rtol=2e-4, atol=2e-3)
