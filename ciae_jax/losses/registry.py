"""Selection of the per-pixel loss by config: `loss.kind` and `loss.params`.

`loss.kind` is a name of `pixel_losses.REGISTRY` ("ciae", the paper's, by default) or
`module:function`, a function in the user's own module on the Python path (no edit of the
package). `loss.params` sets the function's keyword parameters; those left out keep the
function's defaults. `bind` checks the choice once, when the config is read
(`hparams.LossHParams`): an unknown kind, a parameter the function does not take, one it needs
and nobody gave, or a function that does not map `[C, Q]`, `[C]`, `[C, Q]` to `[C]` floats is an
error naming the config field.
"""
import dataclasses
import functools
import importlib
import inspect
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ciae_jax.losses import pixel_losses


class LossSelectionError(ValueError):
  """`loss.kind` or `loss.params` names something that cannot be used (the message says which)."""


@dataclasses.dataclass(frozen=True)
class PixelLoss:
  """A per-pixel loss with its parameters bound: `loss(similarity, own, counted) -> [C]`."""
  kind: str
  fn: Callable[..., jax.Array]
  params: tuple[tuple[str, Any], ...]

  def __call__(self, similarity: jax.Array, own: jax.Array, counted: jax.Array) -> jax.Array:
    return self.fn(similarity, own, counted, **dict(self.params))


def resolve(kind: str) -> Callable[..., jax.Array]:
  """The function of `loss.kind`: a registered name or `module:function`."""
  if kind in pixel_losses.REGISTRY:
    return pixel_losses.REGISTRY[kind]
  if ":" not in kind:
    raise LossSelectionError(
        f"config.loss.kind={kind!r}: not a registered loss {sorted(pixel_losses.REGISTRY)} "
        "nor 'module:function' (a function in a module on the Python path)")
  module_name, _, attribute = kind.partition(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise LossSelectionError(f"config.loss.kind={kind!r}: cannot import module "
                             f"{module_name!r} ({e}); is its folder on PYTHONPATH?") from e
  fn = module
  for part in attribute.split("."):
    fn = getattr(fn, part, None)
    if fn is None:
      raise LossSelectionError(f"config.loss.kind={kind!r}: module {module_name!r} has no "
                               f"{attribute!r}")
  if not callable(fn):
    raise LossSelectionError(f"config.loss.kind={kind!r}: {attribute!r} is not a function")
  return fn


def parameters(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
  """The keyword parameters of a per-pixel loss (everything after its three arrays)."""
  params = list(inspect.signature(fn).parameters.values())
  positional = [p for p in params
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:3]
  if len(positional) < 3:
    raise LossSelectionError(f"config.loss.kind: {fn.__qualname__} must take (similarity, own, "
                             "counted) first")
  return {p.name: p for p in params if p not in positional and p.kind not in
          (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def bind(kind: str, params: Mapping[str, Any]) -> PixelLoss:
  """The per-pixel loss of `kind` with `params` bound, checked (see the module docstring)."""
  return _bind(kind, tuple(sorted(params.items())))


@functools.lru_cache(maxsize=64)
def _bind(kind: str, params: tuple[tuple[str, Any], ...]) -> PixelLoss:
  fn = resolve(kind)
  accepted = parameters(fn)
  unknown = [name for name, _ in params if name not in accepted]
  if unknown:
    raise LossSelectionError(
        f"config.loss.params.{unknown[0]}: not a parameter of loss.kind={kind!r} (its "
        f"parameters: {sorted(accepted) or 'none'})")
  given = dict(params)
  missing = [name for name, p in accepted.items()
             if p.default is inspect.Parameter.empty and name not in given]
  if missing:
    raise LossSelectionError(f"config.loss.params.{missing[0]}: loss.kind={kind!r} needs it "
                             "(it has no default)")
  loss = PixelLoss(kind, fn, params)
  _check_shapes(loss)
  return loss


def _check_shapes(loss: PixelLoss) -> None:
  """Traces the function on a small chunk (no computation): `[C]` floating output."""
  chunk, num_queries = 4, 3
  similarity = jax.ShapeDtypeStruct((chunk, num_queries), jnp.float32)
  own = jax.ShapeDtypeStruct((chunk,), jnp.int32)
  counted = jax.ShapeDtypeStruct((chunk, num_queries), jnp.bool_)
  try:
    out = jax.eval_shape(loss, similarity, own, counted)
  except Exception as e:  # pylint: disable=broad-except
    raise LossSelectionError(f"config.loss.params {dict(loss.params)} of loss.kind="
                             f"{loss.kind!r}: {type(e).__name__}: {e}") from e
  if (not isinstance(out, jax.ShapeDtypeStruct) or out.shape != (chunk,)
      or not np.issubdtype(out.dtype, np.floating)):
    raise LossSelectionError(
        f"config.loss.kind={loss.kind!r}: returned {out} for similarity [{chunk}, "
        f"{num_queries}]; a per-pixel loss returns one float per pixel, shape [{chunk}]")


def resolved_params(kind: str, params: Mapping[str, Any]) -> dict[str, Any]:
  """Every keyword parameter of `kind`'s function: `params`, else the function's default."""
  loss = bind(kind, params)
  defaults = {name: p.default for name, p in parameters(loss.fn).items()
              if p.default is not inspect.Parameter.empty}
  return {**defaults, **dict(loss.params)}


def shipped_parameter_types() -> dict[str, type]:
  """Each keyword parameter of the shipped variants and its type (the config's placeholders)."""
  types: dict[str, type] = {}
  for kind, fn in pixel_losses.REGISTRY.items():
    for name, p in parameters(fn).items():
      tp = type(p.default)
      if types.setdefault(name, tp) is not tp:
        raise TypeError(f"parameter {name!r} of loss {kind!r} is a {tp.__name__}, elsewhere a "
                        f"{types[name].__name__}")
  return types
