"""The suite's own environment (tests/conftest.py): XLA_FLAGS kept but the device count, no
torch in the pytest processes."""
import importlib.util
import os

import jax
import pytest

import xla_flags


def test_device_count_flag_is_replaced_and_other_flags_kept():
  flag = xla_flags.DEVICE_COUNT_FLAG
  assert xla_flags.with_device_count(2, "") == f"{flag}=2"
  assert xla_flags.with_device_count(2, f"{flag}=8") == f"{flag}=2"
  assert xla_flags.with_device_count(1, f"--xla_cpu_max_isa=AVX2 {flag}=8 --xla_dump_to=/d"
                                     ).split() == ["--xla_cpu_max_isa=AVX2", "--xla_dump_to=/d",
                                                   f"{flag}=1"]
  # A longer flag that starts with the same name is another flag.
  assert xla_flags.with_device_count(3, f"{flag}_x=1").split() == [f"{flag}_x=1", f"{flag}=3"]
  env = xla_flags.env_with_device_count(4, EXTRA="1")
  assert env["EXTRA"] == "1" and env["XLA_FLAGS"].endswith(f"{flag}=4")


def test_this_process_has_8_devices_and_the_users_flags():
  assert jax.device_count() == 8
  flags = os.environ["XLA_FLAGS"]
  assert flags.split().count(f"{xla_flags.DEVICE_COUNT_FLAG}=8") == 1, flags
  assert flags == xla_flags.for_tests(8, os.environ["CIAE_TESTS_USER_XLA_FLAGS"])
  user = os.environ["CIAE_TESTS_USER_XLA_FLAGS"].split()
  assert all(flag in flags.split() for flag in user if "device_count" not in flag)


def test_quick_compile_flags_give_way_to_the_users():
  flag = xla_flags.DEVICE_COUNT_FLAG
  assert xla_flags.for_tests(2, "").split() == [*xla_flags.QUICK_COMPILE_FLAGS, f"{flag}=2"]
  users = "--xla_cpu_use_fusion_emitters=true"
  assert xla_flags.for_tests(2, users).split() == [users, f"{flag}=2"]


@pytest.mark.parametrize("name", ["torch", "torchvision"])
def test_torch_is_never_imported_here(name):
  with pytest.raises(ImportError):
    __import__(name)
  # find_spec still says whether it is installed (ModuleSpec or None), without importing it.
  importlib.util.find_spec(name)
