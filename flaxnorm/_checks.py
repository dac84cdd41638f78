"""Argument checks shared by every face of flaxnorm (math, Linen, NNX, tree).

Each check raises a ``ValueError``/``TypeError`` whose message names the
argument, the place it was found (``at``: a layer path, a tree path or a
function name) and what was expected, so a user never has to read a Flax trace.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Axis = int | Sequence[int] | None


def _at(at: str) -> str:
  return f" at {at}" if at else ""


def _real(x: Any) -> float | None:
  """``x`` as a float if it is a real number (numpy's or a concrete 0-d JAX array too), else None.

  ``bool`` is not a number here, nor is a traced value (options are static).
  """
  dtype = getattr(x, "dtype", None)
  if isinstance(x, bool) or (
    dtype is not None and not any(jnp.issubdtype(dtype, k) for k in (jnp.integer, jnp.floating))
  ):
    return None
  if isinstance(x, numbers.Real) or (dtype is not None and jnp.shape(x) == ()):
    with contextlib.suppress(TypeError, jax.errors.ConcretizationTypeError):
      return float(x)
  return None


#: Spectral norm's ``eps`` must stay below this: it is the norm under which
#: power iteration keeps its (unit) vectors and a kernel counts as zero, so a
#: larger one freezes the iteration and leaves ordinary kernels unnormalized.
SPECTRAL_EPS_MAX = 1e-2


def check_eps(eps: Any, at: str = "", *, spectral: bool = False) -> float:
  """Returns ``eps`` as a float, or raises if it is not a positive number.

  With ``spectral``, ``eps`` must also be below :data:`SPECTRAL_EPS_MAX`.
  """
  value = _real(eps)
  if value is None:
    raise TypeError(f"eps must be a positive float{_at(at)}, got {eps!r}.")
  eps = value
  if not (eps > 0 and math.isfinite(eps)):
    raise ValueError(f"eps must be a positive finite float{_at(at)}, got {eps!r}.")
  if spectral and not eps < SPECTRAL_EPS_MAX:
    raise ValueError(
      f"eps must be below {SPECTRAL_EPS_MAX}{_at(at)}, got {eps!r}: it is the norm under "
      "which power iteration keeps its unit vectors and a kernel counts as zero (left "
      "unnormalized), a numerical floor like the default 1e-12."
    )
  return float(eps)


#: The largest count a loop takes: ``lax.fori_loop`` counts in int32.
COUNT_MAX = 2**31 - 1


def check_count(value: Any, argname: str, minimum: int, at: str = "") -> int:
  """Returns ``value`` as an int, or raises if it is not an int >= ``minimum``.

  A numpy integer counts as an int (``np.int64(3)``); a bool does not.
  """
  if not is_int(value):
    raise TypeError(
      f"{argname} must be an int >= {minimum}{_at(at)}, got {value!r} ({type(value).__name__})."
    )
  if value < minimum:
    raise ValueError(f"{argname} must be >= {minimum}{_at(at)}, got {value}.")
  if value > COUNT_MAX:
    raise ValueError(f"{argname} must be <= {COUNT_MAX} (int32){_at(at)}, got {value}.")
  return int(value)


def is_int(value: Any) -> bool:
  """An int or a numpy integer, not a bool (``numpy.bool_`` is no integer either)."""
  return isinstance(value, int | np.integer) and not isinstance(value, bool)


def check_names(
  name: str | Sequence[str], argname: str = "name", selectors: bool = False
) -> tuple[str, ...]:
  """Returns ``name`` as a non-empty tuple of distinct strings.

  ``selectors`` says the caller also takes a regex or a predicate (for the message).
  """
  names = (name,) if isinstance(name, str) else tuple(name) if isinstance(name, Sequence) else ()
  if not names or not all(isinstance(n, str) and n for n in names):
    also = (
      ", a compiled regular expression or a predicate (path, leaf) -> bool" if selectors else ""
    )
    raise TypeError(f"{argname} must be a non-empty str, a sequence of them{also}, got {name!r}.")
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise ValueError(
      f"{argname} lists {dupes} more than once: the same param can be wrapped only once."
    )
  return names


def check_ensemble_axis(value: Any, at: str = "") -> int | None:
  """Returns ``ensemble_axis`` (``None`` or ``0``), or raises.

  Only the leading axis: ``nnx.vmap`` slices every variable of a stacked module
  on the same axis, and a member's sigma (shape ``()``) has no other.
  """
  if value is None:
    return None
  if not is_int(value):
    raise TypeError(f"ensemble_axis must be None or 0{_at(at)}, got {value!r}.")
  if value != 0:
    raise ValueError(
      f"ensemble_axis must be None or 0{_at(at)}, got {value}: stack the members on the "
      "leading axis (nnx.vmap(..., in_axes=0, out_axes=0)), which every variable shares."
    )
  return 0


def check_axis_arg(axis: Any, at: str = "", allow_none: bool = True) -> None:
  """Checks the *type* of an ``axis`` argument before any array is seen."""
  if axis is None and allow_none:
    return
  items = (axis,) if not isinstance(axis, (tuple, list)) else tuple(axis)
  if not items or not all(is_int(a) for a in items):
    expected = "an int, a non-empty tuple of ints" + (" or None" if allow_none else "")
    raise TypeError(f"axis must be {expected}{_at(at)}, got {axis!r}.")


def plain_axis(axis: Any) -> Any:
  """``axis`` with Python ints for numpy ones and a tuple for a list (else as it is)."""
  if isinstance(axis, (tuple, list)):
    return tuple(int(a) if is_int(a) else a for a in axis)
  return int(axis) if is_int(axis) else axis


def normalize_axes(axis: Axis, ndim: int, at: str = "") -> tuple[int, ...]:
  """Returns the kept axes as sorted non-negative ints (``None`` gives ``()``).

  Args:
    axis: an int, a sequence of ints or ``None``.
    ndim: rank of the array the axes refer to.
    at: where the array comes from, for error messages.

  Returns:
    The kept axes, each in ``[0, ndim)``, sorted and distinct.
  """
  check_axis_arg(axis, at)
  axis = plain_axis(axis)
  if axis is None:
    return ()
  items = (axis,) if isinstance(axis, int) else tuple(axis)
  if ndim == 0 and items:
    raise ValueError(f"the array{_at(at)} is a scalar (0 dims): it has no axis {items[0]}.")
  for a in items:
    if not -ndim <= a < ndim:
      raise ValueError(
        f"axis {a} is out of range{_at(at)}: the param has {ndim} dims, "
        f"so axis must be in [{-ndim}, {ndim - 1}]."
      )
  axes = tuple(sorted({a % ndim for a in items}))
  if len(axes) != len(items):
    raise ValueError(f"axis {axis!r} names the same axis twice{_at(at)}.")
  return axes


def check_float_array(x: Any, argname: str, at: str = "", *, complex_ok: bool = True) -> None:
  """Raises ``TypeError`` unless ``x`` is an array with a floating (or complex) dtype.

  Args:
    x: the value to check.
    argname: its name, for the message.
    at: where it was found, for the message.
    complex_ok: whether complex64/complex128 are accepted (weight norm and
      kernel-mode spectral norm support them; Lipschitz certificates,
      operator mode and PyTorch interop do not).
  """
  dtype = getattr(x, "dtype", None)
  kinds = (jnp.floating, jnp.complexfloating) if complex_ok else (jnp.floating,)
  if dtype is None or not any(jnp.issubdtype(dtype, k) for k in kinds):
    found = dtype if dtype is not None else type(x).__name__
    dtypes = (
      "float16, bfloat16, float32, float64, complex64 or complex128"
      if complex_ok
      else "float16, bfloat16, float32 or float64; complex is not supported here"
    )
    raise TypeError(f"{argname}{_at(at)} must be a floating-point array ({dtypes}), got {found}.")


def check_spectral_weight(w: Any, axis: Axis, at: str = "") -> tuple[int, ...]:
  """Checks a kernel for spectral norm; returns its kept (row) axes."""
  check_float_array(w, "the param", at)
  if w.ndim < 2:
    raise ValueError(
      f"spectral norm needs a param with at least 2 dims{_at(at)}, got shape "
      f"{tuple(w.shape)}: a vector has no matrix view (biases are not normalized)."
    )
  if axis is None:
    raise ValueError(f"spectral norm needs a kept (output) axis{_at(at)}, got None.")
  return normalize_axes(axis, w.ndim, at)


#: What spectral norm does with sigma: divide by it, or only shrink (1-Lipschitz).
SPECTRAL_MODES = ("normalize", "clip")


def check_mode(mode: Any, at: str = "") -> str:
  """Returns ``mode`` if it is one of :data:`SPECTRAL_MODES`, else raises."""
  if mode not in SPECTRAL_MODES:
    raise ValueError(f"mode must be one of {SPECTRAL_MODES}{_at(at)}, got {mode!r}.")
  return mode


def check_bool(value: Any, argname: str, at: str = "") -> bool:
  """Returns ``value`` if it is a Python bool (it changes the computation), else raises."""
  if isinstance(value, np.bool_):  # numpy's bool is a bool too
    return bool(value)
  if not isinstance(value, bool):
    raise TypeError(f"{argname} must be a bool{_at(at)}, got {type(value).__name__}.")
  return value


def check_collection(collection: Any, at: str = "") -> str:
  """Returns the spectral state's collection name, or raises."""
  if not isinstance(collection, str) or not collection:
    raise TypeError(f"collection must be a non-empty str{_at(at)}, got {collection!r}.")
  if collection == "params":
    raise ValueError(
      f"collection must not be 'params'{_at(at)} (optimizers would train the state)."
    )
  if collection == "intermediates":
    raise ValueError(
      f"collection must not be 'intermediates'{_at(at)}: Flax keeps it for sow and "
      "capture_intermediates, and drops it between calls."
    )
  return collection


def check_g_fits(
  g_shape: Sequence[int], v_shape: Sequence[int], kept: tuple[int, ...] | None, key: str, at: str
) -> None:
  """Raises unless a stored weight-norm ``g`` has the layout the layer's ``axis`` gives.

  Args:
    g_shape: the stored ``g``'s shape.
    v_shape: the direction ``v``'s (the kernel's) shape.
    kept: the kept axes, non-negative; ``None`` for ``axis=None`` (a scalar ``g``).
    key: ``g``'s name (``kernel_g``).
    at: the param's place (layer path or tree path), for the message.
  """
  expected = () if kept is None else tuple(n if i in kept else 1 for i, n in enumerate(v_shape))
  if tuple(g_shape) != expected:
    raise ValueError(
      f"stored {key} of {at} has shape {tuple(g_shape)}, expected {expected} for v of shape "
      f"{tuple(v_shape)} and the layer's axis (kept axes {kept}): a checkpoint saved with "
      "another axis or layer size?"
    )


def check_state_fits(
  w_shape: Sequence[int],
  kept: tuple[int, ...],
  state_shapes: Sequence[Sequence[int]],
  keys: Sequence[str],
  at: str,
  *,
  axis_given: Axis | None = None,
) -> None:
  """Raises unless a stored spectral state fits a kernel: ``u`` ``(m,)``, ``v`` ``(n,)``, ``sigma`` ``()``.

  Args:
    w_shape: the kernel's shape.
    kept: its kept (row) axes, non-negative.
    state_shapes: the shapes of the stored ``u``, ``v`` and ``sigma``.
    keys: their names (``kernel_u``, ``kernel_v``, ``kernel_sigma``).
    at: the param's place (layer path or tree path), for the message.
    axis_given: the ``axis`` the caller passed when it may be the wrong one
      (removal, the tree face): the message then points at it.
  """
  w_shape = tuple(w_shape)
  m = math.prod(w_shape[a] for a in kept)
  n = math.prod(w_shape) // m
  found = tuple(tuple(s) for s in state_shapes)
  if found == ((m,), (n,), ()):
    return
  detail = (
    f"expected {keys[0]} of shape ({m},) and {keys[1]} of shape ({n},) (and a scalar "
    f"{keys[2]}), got {found[0]} and {found[1]}" + (f" (and {found[2]})" if found[2] != () else "")
  )
  if axis_given is not None:
    raise ValueError(
      f"{at} of shape {w_shape} does not fit its state with axis={axis_given!r}: {detail}; "
      "pass the axis the layer was wrapped with."
    )
  raise ValueError(
    f"stored state of {at} does not fit the param of shape {w_shape}: {detail} "
    "(a checkpoint from a differently sized layer?)."
  )


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_target(target: Any, at: str = "") -> float:
  """Returns the spectral norm ``target`` as a float, or raises unless it is finite and > 0."""
  value = _real(target)
  if value is None:
    raise TypeError(f"target must be a positive float{_at(at)}, got {target!r}.")
  target = value
  if not (math.isfinite(target) and 0 < target <= _FLOAT32_MAX):
    raise ValueError(
      f"target must be a positive finite float{_at(at)} (the spectral norm to normalize "
      f"to), at most float32's largest {_FLOAT32_MAX:.4g}, got {target!r}."
    )
  return float(target)


def check_init_scale(init_scale: Any, at: str = "") -> float:
  """Returns weight norm's data-init ``init_scale`` as a float, or raises unless finite and > 0."""
  value = _real(init_scale)
  if value is None:
    raise TypeError(f"init_scale must be a positive float{_at(at)}, got {init_scale!r}.")
  init_scale = value
  if not (math.isfinite(init_scale) and init_scale > 0):
    raise ValueError(
      f"init_scale must be a positive finite float{_at(at)} (the std per output feature "
      f"after data_init), got {init_scale!r}."
    )
  return float(init_scale)


def check_key(key: Any, argname: str, at: str = "") -> jax.Array:
  """Returns ``key`` if it is a PRNG key (``jax.random.key``, or a raw uint32 ``(2,)``)."""
  dtype = getattr(key, "dtype", None)
  typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)
  raw = dtype == jnp.uint32 and jnp.shape(key) == (2,)
  if not (typed and jnp.ndim(key) == 0) and not raw:
    found = f"{dtype} of shape {jnp.shape(key)}" if dtype is not None else type(key).__name__
    raise TypeError(
      f"{argname}{_at(at)} must be one PRNG key (jax.random.key(0), or a raw "
      f"jax.random.PRNGKey(0)), got {found}."
    )
  return key


def check_shape(shape: Any, argname: str, at: str = "") -> tuple[int, ...] | None:
  """Returns ``shape`` as a tuple of positive ints (``None`` stays ``None``), or raises."""
  if shape is None:
    return None
  items = tuple(shape) if isinstance(shape, (tuple, list)) else None
  if items is None or any(isinstance(d, bool) or not isinstance(d, int) for d in items):
    raise TypeError(f"{argname} must be a tuple of positive ints{_at(at)}, got {shape!r}.")
  if not items or any(d < 1 for d in items):  # the right type, a wrong value
    raise ValueError(f"{argname} must be a tuple of positive ints{_at(at)}, got {shape!r}.")
  return items


class Call(NamedTuple):
  """A model's example call (a pytree): positional and keyword arguments."""

  args: tuple[Any, ...]
  kwargs: dict[str, Any]


def check_kwargs(kwargs: Any, at: str) -> dict[str, Any]:
  """A model's keyword arguments: ``None`` (none) or a mapping by ``str``, as a dict."""
  if kwargs is None:
    return {}
  if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
    got = type(kwargs).__name__
    if isinstance(kwargs, Mapping):
      got = f"a {got} with keys [{', '.join(map(repr, kwargs))}]"
    raise TypeError(
      f"{at}: kwargs must be a mapping of keyword arguments by name (str), e.g. "
      f"{{'train': False}}, got {got}."
    )
  return dict(kwargs)
