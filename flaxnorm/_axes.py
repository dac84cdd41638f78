"""Which axes of a layer's param are its output features: the transforms' kept axes.

Weight norm keeps one norm per output feature and spectral norm's matrix view
has the output features as rows, so both need the param's output-feature axes.
Unless ``axis`` is given, they come from the layer (``axis="auto"``):

=========================================  ======================================
layer (Linen / NNX)                        kept axes of its param
=========================================  ======================================
``Dense``/``Linear``, ``Conv``,            ``-1`` (``(*window, in, out)``)
``ConvLocal``, ``ConvTranspose``
``DenseGeneral``/``LinearGeneral``         the batch axes and the ``features``
                                           (``out_features``) axes
``Einsum``                                 the kernel axes whose letters appear
                                           in the output (read from the equation)
``Embed`` (``embedding``)                  ``0``: one row per embedding vector
``ConvTranspose(transpose_kernel=True)``   ``-2`` (``(*window, out, in)``)
anything else                              ``-1``
=========================================  ======================================

For these linear layers the matrix view (product of output axes) x (product
of the others) is the layer's own linear map, so spectral norm's sigma is the
layer's true norm. An Einsum letter that is in the input, the kernel and the
output (a batch-like axis) is counted as an output axis: sigma is then that of
the stacked slices, an upper bound of the layer's norm (never below it).

With ``recursive=True`` (Linen) or :func:`flaxnorm.nnx.wrap_modules`, ``axis``
may also be a mapping from submodule name or path to axis (:class:`AxisMap`),
and anywhere a callable ``(module, param_name) -> axis``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

import flax.linen as nn
from flax import nnx

from flaxnorm import _checks, _subclass
from flaxnorm._checks import Axis

#: ``axis`` default: the layer's output-feature axes (see the module docstring).
AUTO = "auto"
#: A per-layer axis rule: ``(module, param_name) -> axis``.
AxisFn = Callable[[Any, str], Axis]
#: What the transforms' ``axis`` argument accepts.
AxisOption = Axis | Literal["auto"] | Mapping[str, Axis] | AxisFn


@dataclasses.dataclass(frozen=True)
class AxisMap:
  """A hashable ``{submodule name or path: axis}``, with ``"auto"`` for the rest.

  A key with a ``/`` is a path below the wrapped module (``"attn/query"``); a
  key without one is a submodule name, matching that name at any depth
  (``"query"``). A path key wins over a name key.
  """

  items: tuple[tuple[str, Axis | Literal["auto"]], ...]

  @classmethod
  def of(cls, mapping: Mapping[Any, Any], at: str, allow_none: bool = True) -> AxisMap:
    items = []
    for key, value in mapping.items():
      if not isinstance(key, str) or not key:
        raise TypeError(
          f"{at}: the keys of an axis mapping must be submodule names or paths "
          f"('query', 'attn/out'), got {key!r}."
        )
      if value != AUTO:
        _checks.check_axis_arg(value, f"{at}: axis[{key!r}]", allow_none=allow_none)
        value = _checks.plain_axis(value)
      items.append((key.strip("/"), value))
    return cls(tuple(sorted(items, key=lambda kv: kv[0])))

  def lookup(self, path: tuple[str, ...]) -> tuple[str | None, Axis | Literal["auto"]]:
    """``(matching key, axis)`` for a submodule at ``path`` below the root (``AUTO`` if none)."""
    table = dict(self.items)
    joined = "/".join(path)
    if joined in table:
      return joined, table[joined]
    if path and path[-1] in table:
      return path[-1], table[path[-1]]
    return None, AUTO

  def names(self) -> list[str]:
    return [k for k, _ in self.items]


def canonical(axis: Any, at: str, allow_none: bool) -> Any:
  """Checks an ``axis`` argument's type; a list becomes a tuple, a mapping an :class:`AxisMap`."""
  if isinstance(axis, str):
    if axis != AUTO:
      where = f" at {at}" if at else ""
      raise TypeError(f"axis must be an int, a tuple of ints or 'auto'{where}, got {axis!r}.")
    return axis
  if isinstance(axis, Mapping):
    return AxisMap.of(axis, at, allow_none)
  if isinstance(axis, AxisMap) or callable(axis):
    return axis
  _checks.check_axis_arg(axis, at, allow_none=allow_none)
  return _checks.plain_axis(axis)


def resolve(
  option: Any, module: Any, name: str, at: str, call_kwargs: Mapping | None = None
) -> Axis:
  """The explicit axis that ``option`` (``"auto"``, a callable or an axis) means for one param.

  Args:
    option: the options' ``axis`` (an :class:`AxisMap` is resolved per
      submodule before this, by the face).
    module: the layer holding the param (Linen or NNX).
    name: the param's name.
    at: the param's place, for error messages.
    call_kwargs: Linen: the layer's call keyword arguments (an ``Einsum``
      equation may be passed there).

  Returns:
    An int, a tuple of ints or ``None``, still to be checked against the
    param's rank.
  """
  if isinstance(option, AxisMap):
    raise ValueError(
      f"{at}: an axis mapping names submodules; it needs recursive=True (Linen) or "
      "flaxnorm.nnx.wrap_modules (NNX)."
    )
  if option == AUTO:
    return layer_axis(module, name, at, call_kwargs)
  if callable(option):
    value: Any = option(module, name)
    try:
      _checks.check_axis_arg(value)
    except TypeError:
      raise TypeError(
        f"{at}: the axis callable {option!r} returned {value!r}; it must return an int, a "
        "tuple of ints or None."
      ) from None
    return tuple(value) if isinstance(value, list) else value
  return explicit(option, at)


def explicit(axis: Any, at: str) -> Axis:
  """``axis`` if it is an int, a tuple of ints or None; else a ``TypeError`` (no layer to ask)."""
  if isinstance(axis, (str, AxisMap)) or callable(axis):
    raise TypeError(
      f"{at}: axis must be an int, a tuple of ints or None here, got {axis!r}: there is no "
      "layer to read the output axes from ('auto', mappings and callables need a layer)."
    )
  return axis


def layer_axis(module: Any, name: str, at: str, call_kwargs: Mapping | None = None) -> Axis:
  """The output-feature axes of ``module``'s param ``name`` (see the module docstring)."""
  cls = _subclass.base_of(type(module))
  if issubclass(cls, nn.DenseGeneral):
    return _general_axes(len(tuple(module.batch_dims or ())), _count(module.features))
  if issubclass(cls, nnx.LinearGeneral):
    return _general_axes(len(module.batch_axis), len(module.out_features))
  if issubclass(cls, (nn.Einsum, nnx.Einsum)):
    equation = (call_kwargs or {}).get("einsum_str") or module.einsum_str
    return einsum_axes(equation, at)
  if issubclass(cls, (nn.Embed, nnx.Embed)) and name == "embedding":
    return 0
  if issubclass(cls, (nn.ConvTranspose, nnx.ConvTranspose)) and name == "kernel":
    return -2 if getattr(module, "transpose_kernel", False) else -1  # (*k, out, in) if True
  return -1


def _count(features: Any) -> int:
  return len(features) if isinstance(features, (tuple, list)) else 1


def _general_axes(n_batch: int, n_out: int) -> Axis:
  axes = (*range(n_batch), *range(-n_out, 0))
  return axes[0] if len(axes) == 1 else axes


def einsum_axes(equation: Any, at: str) -> tuple[int, ...]:
  """The kernel axes (second operand) of ``"lhs,rhs->out"`` whose letters are in ``out``.

  Examples:
    >>> einsum_axes("btd,dhk->bthk", "")
    (1, 2)
  """
  text = equation.replace(" ", "") if isinstance(equation, str) else ""
  lhs, _, out = text.partition("->")
  operands = lhs.split(",")
  if len(operands) != 2 or not out or "." in operands[1]:
    raise ValueError(
      f"{at}: cannot read the kernel's output axes from the Einsum equation {equation!r} "
      "(expected 'lhs,rhs->out' without '...'); pass axis= explicitly."
    )
  kept = tuple(i for i, c in enumerate(operands[1]) if c in out)
  if not kept:
    raise ValueError(
      f"{at}: the Einsum equation {equation!r} contracts every kernel axis, so the kernel "
      "has no output-feature axis; pass axis= explicitly (None for one norm, weight norm)."
    )
  return kept
