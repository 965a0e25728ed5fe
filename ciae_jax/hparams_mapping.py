"""Typed hyper-parameters <-> mappings: the dataclasses of `ciae_jax.hparams` built from an
ml_collections config (or any nested mapping) and written back as a ConfigDict.

`from_mapping` rejects unknown fields (a typo must not pass silently) and makes sequences tuples;
`to_config_dict` gives typed placeholders for fields whose default is None, and for every
parameter of the shipped per-pixel losses under `loss.params`, so that `--config.a.b=value`
can set them from the command line.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping


class HParamsError(ValueError):
  """A config field is unknown or has a value the code cannot use (names the field)."""


class FrozenParams(dict):
  """An immutable, hashable dict: `loss.params` (a variant's keyword parameters)."""

  def __hash__(self):  # type: ignore[override]
    return hash(tuple(sorted(self.items())))

  def _immutable(self, *args, **kwargs):
    raise TypeError("FrozenParams is immutable; use LossHParams.replace(params=...)")

  __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _immutable


def _field_types(cls: type) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
  return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def from_mapping(cls: type, mapping: Mapping[str, Any], prefix: str) -> Any:
  """`cls(**mapping)` with nested groups built recursively and sequences made tuples."""
  items = dict(mapping.items())
  types_ = _field_types(cls)
  unknown = sorted(set(items) - set(types_))
  if unknown:
    where = f"config.{prefix[:-1]}" if prefix else "config"
    raise HParamsError(f"{where} has unknown field(s) {unknown}; known: {sorted(types_)}")
  kwargs = {}
  for name, value in items.items():
    tp = types_[name]
    if _is_dataclass_type(tp):
      kwargs[name] = from_mapping(tp, value, f"{prefix}{name}.")
    elif _origin(tp) is tuple and value is not None:
      kwargs[name] = as_tuple(value)
    else:
      kwargs[name] = value
  return cls(**kwargs)


def as_tuple(value: Any) -> Any:
  """Sequences (lists from a command line or JSON, nested too) as tuples."""
  if isinstance(value, (list, tuple)):
    return tuple(as_tuple(v) for v in value)
  return value


def _origin(tp: Any) -> Any:
  return typing.get_origin(tp)


def _optional_type(tp: Any) -> type | None:
  """`int` for `int | None` (placeholders need the type), else None."""
  if _origin(tp) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1:
      return args[0]
  return None


def to_config_dict(hparams: Any) -> Any:
  """An ml_collections ConfigDict of a dataclass instance (fields typed; None as placeholders)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  result = ml_collections.ConfigDict()
  types_ = _field_types(type(hparams))
  for field in dataclasses.fields(hparams):
    value = getattr(hparams, field.name)
    if dataclasses.is_dataclass(value):
      result[field.name] = to_config_dict(value)
    elif isinstance(value, FrozenParams):
      result[field.name] = _params_config_dict(value)
    elif value is None:
      result[field.name] = config_dict.placeholder(_optional_type(types_[field.name]))
    else:
      result[field.name] = value
  return result


def _params_config_dict(params: Mapping[str, Any]) -> Any:
  """`loss.params` as a ConfigDict: the set values, and a typed placeholder (None: the variant's
  default) for every other parameter of the shipped variants, so that
  `--config.loss.params.NAME=VALUE` sets any of them from the command line."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top

  from ciae_jax.losses import registry  # pylint: disable=g-import-not-at-top
  result = ml_collections.ConfigDict()
  for name, tp in sorted(registry.shipped_parameter_types().items()):
    result[name] = config_dict.placeholder(tp)
  for name, value in params.items():
    result[name] = value
  return result
