"""Argument checks shared by every face of flaxnorm (math, Linen, NNX, tree).

Each check raises a ``ValueError``/``TypeError`` whose message names the
argument, the place it was found (``where``: a layer path, a tree path or a
function name) and what was expected, so a user never has to read a Flax trace.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

Axis = int | Sequence[int] | None


def _at(where: str) -> str:
  return f" at {where}" if where else ""


def check_eps(eps: Any, where: str = "") -> float:
  """Returns ``eps`` as a float, or raises if it is not a positive number."""
  if isinstance(eps, bool) or not isinstance(eps, (int, float)):
    raise TypeError(f"eps must be a positive float{_at(where)}, got {eps!r}.")
  if not (eps > 0 and math.isfinite(eps)):
    raise ValueError(f"eps must be a positive finite float{_at(where)}, got {eps!r}.")
  return float(eps)


def check_count(value: Any, argname: str, minimum: int, where: str = "") -> int:
  """Returns ``value`` as an int, or raises if it is not an int >= ``minimum``."""
  if isinstance(value, bool) or not isinstance(value, int):
    raise TypeError(
      f"{argname} must be an int >= {minimum}{_at(where)}, got {value!r} ({type(value).__name__})."
    )
  if value < minimum:
    raise ValueError(f"{argname} must be >= {minimum}{_at(where)}, got {value}.")
  return value


def check_names(name: str | Sequence[str], argname: str = "name") -> tuple[str, ...]:
  """Returns ``name`` as a non-empty tuple of distinct strings."""
  names = (name,) if isinstance(name, str) else tuple(name)
  if not names or not all(isinstance(n, str) and n for n in names):
    raise TypeError(f"{argname} must be a non-empty str or a sequence of them, got {name!r}.")
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise ValueError(
      f"{argname} lists {dupes} more than once: the same param can be wrapped only once."
    )
  return names


def check_axis_arg(axis: Any, where: str = "", allow_none: bool = True) -> None:
  """Checks the *type* of an ``axis`` argument before any array is seen."""
  if axis is None and allow_none:
    return
  items = (axis,) if not isinstance(axis, (tuple, list)) else tuple(axis)
  if not items or any(isinstance(a, bool) or not isinstance(a, int) for a in items):
    expected = "an int, a tuple of ints" + (" or None" if allow_none else "")
    raise TypeError(f"axis must be {expected}{_at(where)}, got {axis!r}.")


def normalize_axes(axis: Axis, ndim: int, where: str = "") -> tuple[int, ...]:
  """Returns the kept axes as sorted non-negative ints (``None`` gives ``()``).

  Args:
    axis: an int, a sequence of ints or ``None``.
    ndim: rank of the array the axes refer to.
    where: where the array comes from, for error messages.

  Returns:
    The kept axes, each in ``[0, ndim)``, sorted and distinct.
  """
  check_axis_arg(axis, where)
  if axis is None:
    return ()
  items = (axis,) if isinstance(axis, int) else tuple(axis)
  for a in items:
    if not -ndim <= a < ndim:
      raise ValueError(
        f"axis {a} is out of range{_at(where)}: the param has {ndim} dims, "
        f"so axis must be in [{-ndim}, {ndim - 1}]."
      )
  axes = tuple(sorted({a % ndim for a in items}))
  if len(axes) != len(items):
    raise ValueError(f"axis {axis!r} names the same axis twice{_at(where)}.")
  return axes


def check_float_array(x: Any, argname: str, where: str = "") -> None:
  """Raises ``TypeError`` unless ``x`` is an array with a floating dtype."""
  dtype = getattr(x, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    found = dtype if dtype is not None else type(x).__name__
    raise TypeError(
      f"{argname}{_at(where)} must be a floating-point array (float16, bfloat16, "
      f"float32 or float64), got {found}."
    )


def check_spectral_weight(w: Any, axis: Axis, where: str = "") -> tuple[int, ...]:
  """Checks a kernel for spectral norm; returns its kept (row) axes."""
  check_float_array(w, "the param", where)
  if w.ndim < 2:
    raise ValueError(
      f"spectral norm needs a param with at least 2 dims{_at(where)}, got shape "
      f"{tuple(w.shape)}: a vector has no matrix view (biases are not normalized)."
    )
  if axis is None:
    raise ValueError(f"spectral norm needs a kept (output) axis{_at(where)}, got None.")
  return normalize_axes(axis, w.ndim, where)


#: What spectral norm does with sigma: divide by it, or only shrink (1-Lipschitz).
SPECTRAL_MODES = ("normalize", "clip")


def check_mode(mode: Any, where: str = "") -> str:
  """Returns ``mode`` if it is one of :data:`SPECTRAL_MODES`, else raises."""
  if mode not in SPECTRAL_MODES:
    raise ValueError(f"mode must be one of {SPECTRAL_MODES}{_at(where)}, got {mode!r}.")
  return mode
