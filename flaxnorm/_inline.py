"""``jax.nn`` functions found in a traced program by their equations.

``jax.nn.gelu`` and ``jax.nn.softmax`` have no ``jit`` of their own: a model's
program holds their primitives one by one, and no rule of :mod:`flaxnorm._propagate`
bounds them (GELU's ``x·Φ(x)`` is a product of two values of the input, softmax
divides by a sum of it); ``jax.nn.log_softmax``'s ``jit`` holds the same kind of
program, which the walk enters. Here a run of equations is taken for one of them
when it is, equation for equation, the program JAX gives for that function on the
same operand (inside its ``jit``, for a jitted one): the same primitives, parameters
and literals, each reading what the function's own program reads there. Then its
bound is the function's:

- GELU, either form (``approximate=True``, Flax's default, or ``False``): an
  elementwise function of largest slope 1.13 (the ``erf`` form's ``Φ(x) + x·φ(x)``
  peaks at 1.128904 at ``x = √2``; the ``tanh`` form at 1.128993 with its float32
  constants, 1.129032 with the ones bfloat16 rounds it to).
- softmax along one axis: 1/2 (its Jacobian ``diag(p) − p pᵀ`` is a covariance,
  ``xᵀJx = Var_p(x) ≤ (max x − min x)² / 4 ≤ ‖x‖² / 2``); each slice along the
  axis is its own function, so the whole value's bound is 1/2 of its input's.
- log_softmax along an axis of size ``n``: ``√n`` (its Jacobian ``I − 1 pᵀ`` is an
  oblique projection, whose norm is that of ``1 pᵀ`` (Szyld, 2006): ``√n ‖p‖ ≤
  √n``, approached as ``p`` nears a one-hot vector); per slice, as for softmax.

References:
  Szyld, "The many proofs of an identity on the norm of oblique projections",
  Numerical Algorithms 42, 2006.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core


class Inline(NamedTuple):
  """A function found: ``x`` its operand (a variable of the program), ``slope`` its
  bound, ``elementwise`` whether it maps each element alone."""

  x: Any
  slope: float
  elementwise: bool


class _Function(NamedTuple):
  make: Callable[[int], Callable[[jax.Array], jax.Array]]  # by axis (ignored if elementwise)
  slope: Callable[[int], float]  # by the axis's size
  elementwise: bool


def _root_up(n: int) -> float:
  """``√n``, rounded up."""
  return float(np.nextafter(math.sqrt(n), np.inf))


_GELU_SLOPE = 1.13
_FUNCTIONS = {
  "gelu": _Function(
    lambda _: functools.partial(jax.nn.gelu, approximate=True), lambda _: _GELU_SLOPE, True
  ),
  "gelu_erf": _Function(
    lambda _: functools.partial(jax.nn.gelu, approximate=False), lambda _: _GELU_SLOPE, True
  ),
  "softmax": _Function(
    lambda axis: functools.partial(jax.nn.softmax, axis=axis), lambda _: 0.5, False
  ),
  "log_softmax": _Function(
    lambda axis: functools.partial(jax.nn.log_softmax, axis=axis), _root_up, False
  ),
}


@functools.lru_cache(maxsize=512)
def _program(name: str, shape: tuple[int, ...], dtype: Any, weak: bool, axis: int) -> Any:
  """``jax.nn``'s program for ``name`` on such an operand (inside its ``jit``, if it has
  one), or None when it has constants."""
  arg = jax.ShapeDtypeStruct(shape, dtype, weak_type=weak)
  closed = jax.make_jaxpr(_FUNCTIONS[name].make(axis))(arg)
  (first, *rest) = closed.jaxpr.eqns or [None]
  if first is not None and not rest and first.primitive.name == "jit" and not closed.consts:
    closed = first.params["jaxpr"]
  return None if closed.consts or len(closed.jaxpr.outvars) != 1 else closed.jaxpr


@functools.cache
def _canonical(name: str, dtype: Any) -> Any:
  """``name``'s program on a ``(2, 3)`` operand of ``dtype`` (along axis 1): its
  primitives, and where its first equation reads the operand, are those of every
  operand of that dtype."""
  return _program(name, (2, 3), dtype, False, 1)


def _same_literal(t: Any, m: Any) -> bool:
  return (
    isinstance(m, jex_core.Literal)
    and t.aval == m.aval
    and np.array_equal(np.asarray(t.val), np.asarray(m.val))
  )


def _same_params(t: Any, m: Any) -> bool:
  try:
    return bool(t.params == m.params)
  except Exception:  # params that do not compare (arrays): not the function's
    return False


def _output(program: Any, eqns: Sequence[Any], x: Any) -> Any:
  """The variable ``eqns`` (as many as ``program``'s) give for ``program``'s output
  when they are its equations on operand ``x``, else None."""
  names: dict[Any, Any] = {program.invars[0]: x}
  for t, m in zip(program.eqns, eqns, strict=True):
    if (
      t.primitive != m.primitive
      or len(t.invars) != len(m.invars)
      or len(t.outvars) != len(m.outvars)
      or not _same_params(t, m)
    ):
      return None
    for tv, mv in zip(t.invars, m.invars, strict=True):
      same = _same_literal(tv, mv) if isinstance(tv, jex_core.Literal) else names.get(tv) is mv
      if not same:
        return None
    for tv, mv in zip(t.outvars, m.outvars, strict=True):
      if tv.aval != mv.aval:
        return None
      names[tv] = mv
  return names.get(program.outvars[0])


def _operand(program: Any, eqn: Any) -> Any:
  """``eqn``'s operand where ``program``'s first equation reads its input, or None."""
  first = program.eqns[0]
  for tv, mv in zip(first.invars, eqn.invars, strict=True):
    if tv is program.invars[0]:
      return None if isinstance(mv, jex_core.Literal) else mv
  return None


def found(jaxpr: jex_core.Jaxpr) -> dict[Any, Inline]:
  """Each inlined function's output variable in ``jaxpr``, with what it is."""
  names = [e.primitive.name for e in jaxpr.eqns]
  dtypes = {getattr(v.aval, "dtype", None) for e in jaxpr.eqns for v in e.outvars}
  floats = sorted((d for d in dtypes if d is not None and jnp.issubdtype(d, jnp.floating)), key=str)
  out: dict[Any, Inline] = {}
  for name in _FUNCTIONS:
    for dtype in floats:
      canonical = _canonical(name, dtype)
      prims = [e.primitive.name for e in canonical.eqns] if canonical is not None else []
      for i in range(len(names) - len(prims) + 1 if prims else 0):
        if names[i : i + len(prims)] == prims:
          x = _operand(canonical, jaxpr.eqns[i])
          out.update(_found_at(name, x, jaxpr.eqns[i : i + len(prims)]))
  return out


def _found_at(name: str, x: Any, eqns: Sequence[Any]) -> dict[Any, Inline]:
  """``{output: Inline}`` when ``eqns`` are ``name``'s program on ``x``, else ``{}``."""
  if x is None or not jnp.issubdtype(x.aval.dtype, jnp.floating):
    return {}
  fn = _FUNCTIONS[name]
  shape, dtype = tuple(x.aval.shape), x.aval.dtype
  weak = bool(getattr(x.aval, "weak_type", False))
  for axis in [0] if fn.elementwise else range(len(shape)):
    program = _program(name, shape, dtype, weak, axis)
    y = None if program is None or len(program.eqns) != len(eqns) else _output(program, eqns, x)
    if y is not None:
      return {y: Inline(x, fn.slope(shape[axis] if shape else 1), fn.elementwise)}
  return {}
