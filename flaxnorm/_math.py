"""Pure array math shared by both transforms, and weight norm's. No Flax import.

Every face of flaxnorm (Linen, NNX, pytree, PyTorch interop) calls these
functions and those of :mod:`flaxnorm._power` (spectral norm's power
iteration and state); no formula is written anywhere else.

Layout conventions:
  * ``axis`` is the *kept* axis (PyTorch's ``dim``): the output-feature axis,
    ``-1`` for Flax kernels (``Dense``: ``(in, out)``, ``Conv``:
    ``(*window, in // groups, out)``), ``0`` for PyTorch weights and for
    ``Embed``'s per-row norm. Weight norm takes its norm over every other axis.
    :func:`l2_normalize`'s ``axis`` is the axes reduced, as in
    ``jnp.linalg.norm``, since it normalizes vectors, not kernels; every other
    ``axis`` in ``flaxnorm`` is the axis kept.

Numerics: norms run in (at least) float32 whatever the param dtype, and a
zero weight gives a zero, finite result with finite gradients.

Complex kernels (``complex64``, ``complex128``): every norm is over ``|x|^2``
and weight norm's ``g`` is real (of the kernel's real dtype: float32 for
complex64). Scales are real throughout, so one formula serves both.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from flaxnorm import _checks
from flaxnorm._checks import Axis

Array = jax.Array


def compute_dtype(dtype) -> jnp.dtype:
  # Accumulate in float32 at least: float16 squares overflow past 256.
  # complex64 and complex128 (itemsize 8, 16) are kept.
  dtype = jnp.dtype(dtype)
  return dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


def real_dtype(dtype) -> jnp.dtype:
  """:func:`compute_dtype`'s real part: float32 for complex64, float64 for complex128."""
  return jnp.dtype(jnp.finfo(compute_dtype(dtype)).dtype)


def is_complex(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.complexfloating)


def wider(a, b) -> jnp.dtype:
  # Explicit, so that strict dtype promotion accepts mixed float widths.
  a, b = jnp.dtype(a), jnp.dtype(b)
  if is_complex(a) or is_complex(b):
    # A complex kernel times a real scale: complex, with the wider real part.
    return jnp.dtype(jnp.promote_types(a, b))
  return max(a, b, key=lambda d: d.itemsize)


def sumsq(x: Array, axes: tuple[int, ...] | None, keepdims: bool = False) -> Array:
  """``sum |x|^2`` over ``axes``, real; ``re^2 + im^2`` for complex (finite gradients at 0)."""
  sq = jnp.square(x.real) + jnp.square(x.imag) if is_complex(x.dtype) else jnp.square(x)
  return jnp.sum(sq, axis=axes, keepdims=keepdims)


def _inv_norm(x: Array, axes: tuple[int, ...] | None, eps: float) -> Array:
  """``1 / max(||x||, eps)`` over ``axes`` (keepdims), with finite gradients.

  ``x / max(||x||, eps)`` alone gives NaN gradients at ``x = 0``: the derivative
  of ``||x||`` there is 0/0 and the chain rule multiplies it by 0. Clamping the
  sum at ``eps^2`` *before* the ``rsqrt`` keeps it finite: the max passes no
  gradient below the clamp, and a NaN sum stays NaN. A tiny ``eps`` is raised
  to where that clamp's gradient is finite (:func:`_least_sumsq`). (One op, where two
  selects made XLA:CPU run three small fusions per norm.)
  """
  x = x.astype(compute_dtype(x.dtype))
  total = sumsq(x, axes, keepdims=True)
  return jax.lax.rsqrt(jnp.maximum(total, max(eps * eps, _least_sumsq(total.dtype))))


def _least_sumsq(dtype: Any) -> float:
  """The smallest clamp of a sum of squares whose ``rsqrt`` has a finite derivative.

  ``d rsqrt(s) / ds = -s^(-3/2) / 2`` overflows below ``max^(-2/3)`` (2e-26 in
  float32): the clamp's zero then multiplies an inf, and a zero weight gets NaN
  gradients. So ``eps`` acts as at least ``sqrt`` of this (2.9e-13 in float32,
  where the default 1e-12 is unchanged; 3.5e-103 in float64).
  """
  return 4.0 * float(jnp.finfo(dtype).max) ** (-2.0 / 3.0)


def l2_normalize(x: Array, axis: Axis = None, eps: float = 1e-12) -> Array:
  """Divides ``x`` by its L2 norm over ``axis``: ``x / max(||x||, eps)``.

  Args:
    x: float or complex array of any shape.
    axis: the axes the norm runs over (int, tuple of ints, or ``None`` for the
      whole array). Note: unlike the weight-norm functions, these are the
      *reduced* axes, as in ``jnp.linalg.norm``.
    eps: lower bound on the norm; a zero ``x`` gives zero, with finite
      gradients.

  Returns:
    An array of ``x``'s shape and dtype with unit norm along ``axis``.

  Examples:
    >>> import jax.numpy as jnp, flaxnorm
    >>> flaxnorm.l2_normalize(jnp.array([3.0, 4.0]))
    Array([0.6, 0.8], dtype=float32)
    >>> flaxnorm.l2_normalize(jnp.zeros(2))  # zero stays zero
    Array([0., 0.], dtype=float32)
  """
  _checks.check_float_array(x, "x", "l2_normalize")
  eps = _checks.check_eps(eps, "l2_normalize")
  axes = None if axis is None else _checks.normalize_axes(axis, x.ndim, "l2_normalize")
  return apply_scale(x.astype(compute_dtype(x.dtype)), _inv_norm(x, axes, eps)).astype(x.dtype)


def _reduced_axes(kept: tuple[int, ...], ndim: int) -> tuple[int, ...]:
  return tuple(a for a in range(ndim) if a not in kept)


def weight_norm_decompose(w: Array, axis: Axis = -1) -> tuple[Array, Array]:
  """Splits a weight into magnitude ``g`` and direction ``v``: ``w = g * v / ||v||``.

  Args:
    w: float or complex weight of any rank, e.g. a Flax ``Dense`` kernel ``(in, out)``.
    axis: the kept axis or axes (PyTorch's ``dim``); the norm runs over every
      other axis. ``None`` takes the norm of the whole tensor.

  Returns:
    ``(g, v)``: ``g`` of ``w``'s rank with size 1 on the reduced axes (``(1, out)``
    for a Dense kernel), or shape ``()`` when ``axis`` is ``None``; ``v = w``.
    ``v`` has ``w``'s dtype; ``g`` is float32 at least, since the norm of a
    float16 weight easily exceeds float16's range (1000 entries of 3000 give
    94868 > 65504, where PyTorch's weight norm gives inf). For a complex ``w``,
    ``g`` is real, of ``w``'s real dtype (float32 for complex64).

  Examples:
    >>> import jax.numpy as jnp, flaxnorm
    >>> g, v = flaxnorm.weight_norm_decompose(jnp.array([[3.0, 0.0], [4.0, 2.0]]))
    >>> g  # one norm per output column of an (in, out) kernel
    Array([[5., 2.]], dtype=float32)

  References:
    Salimans & Kingma, "Weight Normalization: A Simple Reparameterization to
    Accelerate Training of Deep Neural Networks", NeurIPS 2016.
  """
  _checks.check_float_array(w, "w", "weight_norm_decompose")
  if w.ndim == 0:
    raise ValueError("weight_norm_decompose: w must have at least 1 dim, got a scalar.")
  kept = _checks.normalize_axes(axis, w.ndim, "weight_norm_decompose")
  w32 = w.astype(compute_dtype(w.dtype))
  if axis is None:
    squares = sumsq(w32, None)
  else:
    squares = sumsq(w32, _reduced_axes(kept, w.ndim), keepdims=True)
  # sqrt has an infinite slope at 0: a zero slice takes sqrt(1) on the side
  # the gradient sees, so g = 0 there with a zero, finite gradient.
  nonzero = squares > 0
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squares, 1.0)), 0.0), w


def weight_norm_compose(g: Array, v: Array, eps: float = 1e-12) -> Array:
  """Builds the weight ``w = g * v / ||v||`` from magnitude and direction.

  The norm runs over the axes where ``g`` has size 1 (all axes when ``g`` is a
  scalar), so the layout of :func:`weight_norm_decompose` needs no ``axis``.

  Args:
    g: magnitude, real, the rank of ``v`` with size 1 on the reduced axes (e.g.
      ``(1, out)``), or shape ``()`` for a whole-tensor norm.
    v: direction, any float or complex array (e.g. a Dense kernel ``(in, out)``).
    eps: lower bound on ``||v||``. A zero ``v`` gives ``w = 0`` and finite
      gradients (PyTorch gives NaN).

  Returns:
    ``w`` with ``v``'s shape and dtype.

  Examples:
    >>> import jax.numpy as jnp, flaxnorm
    >>> v = jnp.array([[3.0, 0.0], [4.0, 2.0]])
    >>> flaxnorm.weight_norm_compose(jnp.array([[10.0, 1.0]]), v)
    Array([[6., 0.],
           [8., 1.]], dtype=float32)

  References:
    Salimans & Kingma, "Weight Normalization: A Simple Reparameterization to
    Accelerate Training of Deep Neural Networks", NeurIPS 2016.
  """
  return apply_scale(v, weight_norm_scale(g, v, eps))


def weight_norm_scale(g: Array, v: Array, eps: float = 1e-12) -> Array:
  """The factor ``g / ||v||`` with ``w = v * (g / ||v||)`` (see :func:`weight_norm_compose`).

  A layer linear in its kernel can apply it to its output instead of the
  kernel (``(x @ v) * scale``), which saves kernel-sized passes.

  Args:
    g: magnitude, ``v``'s rank with size 1 on the reduced axes, or shape ``()``.
    v: direction.
    eps: lower bound on ``||v||``.

  Returns:
    The factor, real, of ``g``'s shape, float32 at least (float64 for complex128).
  """
  _checks.check_float_array(g, "g", "weight_norm_compose", complex_ok=False)
  _checks.check_float_array(v, "v", "weight_norm_compose")
  eps = _checks.check_eps(eps, "weight_norm_compose")
  if g.ndim == 0:
    axes = None
  elif g.ndim == v.ndim and all(a in (1, b) for a, b in zip(g.shape, v.shape)):
    axes = tuple(i for i, (a, b) in enumerate(zip(g.shape, v.shape)) if a == 1 and b != 1)
  else:
    raise ValueError(
      f"weight_norm_compose: g of shape {tuple(g.shape)} does not fit v of shape "
      f"{tuple(v.shape)}; expected a scalar or v's rank with size 1 on the "
      "reduced axes (what weight_norm_decompose returns)."
    )
  dtype = wider(real_dtype(g.dtype), real_dtype(v.dtype))
  # The scale is small ((1, out)): multiplying v by it makes no kernel-sized
  # g * v to keep for the backward pass.
  return g.astype(dtype) * _inv_norm(v, axes, eps).astype(dtype)


def apply_scale(w: Array, scale: Array, *, narrow_cotangent: bool = False) -> Array:
  """``w * scale`` computed in the wider of the two dtypes, returned in ``w``'s dtype.

  When ``w`` is narrower (bfloat16 with a float32 scale), the product is
  rematerialized in the backward pass (:func:`widened_product`), so that its
  residual is ``w`` itself, not a float32 copy of it.

  Args:
    w: the array to scale (a kernel).
    scale: a factor that broadcasts against ``w``.
    narrow_cotangent: for a narrower ``w``, round the product's cotangent to
      ``w``'s dtype before the backward pass uses it: one kernel-sized pass
      more, and a buffer half as large held until the scale's gradient is
      known. Operator-mode spectral norm takes it; its step holds more
      kernel-sized buffers at once.
  """
  dtype = wider(w.dtype, scale.dtype)
  if dtype == w.dtype:
    return w * scale.astype(dtype)
  return widened_product(w, scale, dtype, w.dtype, narrow_cotangent=narrow_cotangent)


def widened_product(
  x: Array, scale: Array, dtype: Any, out_dtype: Any, *, narrow_cotangent: bool = False
) -> Array:
  """``x * scale`` computed in ``dtype``, returned in ``out_dtype`` (None: ``dtype``).

  The residual of a product for the gradient of ``scale`` is the other
  factor; kept as it is computed here, that would be a ``dtype`` copy of a
  narrower ``x`` (a float32 copy of a bfloat16 kernel or output), live from
  the forward pass to the backward. Recomputed in the backward pass
  (``jax.checkpoint``), the residual is ``x``.

  By default only the widened product is checkpointed and the cast to
  ``out_dtype`` stays outside: cast inside, the cotangent enters the
  rematerialized backward in ``out_dtype`` behind its barrier, and XLA rounds
  the float32 gradient of a bfloat16 kernel to bfloat16 and back, one
  kernel-sized pass more (about 1% of the suite's bfloat16 discriminator
  step). ``narrow_cotangent=True`` casts inside, for that pass's smaller
  buffer (see :func:`apply_scale`).
  """
  if narrow_cotangent and out_dtype is not None:
    return _widened(x, scale, dtype, out_dtype)
  out = _widened(x, scale, dtype, None)
  return out if out_dtype is None else out.astype(out_dtype)


@functools.partial(jax.checkpoint, static_argnums=(2, 3))
def _widened(x: Array, scale: Array, dtype: Any, out_dtype: Any) -> Array:
  """``x * scale`` in ``dtype`` (then ``out_dtype``), rematerialized in the backward pass."""
  out = x.astype(dtype) * scale.astype(dtype)
  return out if out_dtype is None else out.astype(out_dtype)
