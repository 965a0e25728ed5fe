"""`parallel.unreplicate`: one copy of a pmap-stacked tree on the host, read without a device
program."""
import logging

import jax
import numpy as np

from ciae_jax import parallel


def _per_device_tree(devices, width=3):
  """A pmap output whose copies differ by device (row r holds r): the wrong row is visible."""
  tree = {"w": np.arange(2.0 * width, dtype=np.float32).reshape(2, width), "step": np.int32(5),
          "flag": np.bool_(True)}
  stacked = parallel.replicate(tree, parallel="pmap", devices=devices)
  add_index = jax.pmap(
      lambda t: {k: (v + jax.lax.axis_index(parallel.AXIS_NAME).astype(v.dtype)
                     if v.dtype != np.bool_ else v) for k, v in t.items()},
      axis_name=parallel.AXIS_NAME, devices=devices)
  return add_index(stacked)


def test_unreplicate_is_row_zero_in_any_device_order():
  for devices in (jax.local_devices(), jax.local_devices()[::-1][:3]):
    out = _per_device_tree(devices)
    expected = jax.device_get(jax.tree.map(lambda x: x[0], out))
    got = parallel.unreplicate(out, parallel="pmap")
    for name, value in expected.items():
      assert isinstance(got[name], np.ndarray), name
      assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
      np.testing.assert_array_equal(got[name], value, err_msg=name)
  host = {"a": np.arange(4).reshape(2, 2)}  # Host arrays (the 1-device fallbacks): row 0 too.
  np.testing.assert_array_equal(parallel.unreplicate(host, parallel="pmap")["a"], [0, 1])


def test_unreplicate_compiles_nothing(caplog):
  out = _per_device_tree(jax.local_devices(), width=7)  # Shapes no other test indexes.
  with caplog.at_level(logging.WARNING), jax.log_compiles():
    parallel.unreplicate(out, parallel="pmap")
  assert not [r for r in caplog.records if "Compiling" in r.getMessage()]
  # The check can fail: indexing a copy out compiles a program.
  with caplog.at_level(logging.WARNING), jax.log_compiles():
    jax.device_get(out["w"][0])
  assert [r for r in caplog.records if "Compiling" in r.getMessage()]
