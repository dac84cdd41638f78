"""Weight norm's data-dependent init (Salimans & Kingma, 2016, §3.3), shared by Linen and NNX.

A weight-normed linear layer computes ``y = g * t + b`` with ``t = f(x; v / ||v||)``
its pre-activation for the unit-norm direction and no bias. On an init batch,
with ``mu`` and ``s`` the per-feature mean and std of ``t`` over every
non-feature axis, ``g = init_scale / s`` and ``b = -mu * init_scale / s`` make
``y`` have mean 0 and std ``init_scale`` per feature on that batch. The faces
run the layer with the unit-norm kernel and a zero bias to get ``t``; this
module turns ``t`` into ``g``, ``b`` and ``y``. No Flax import.

A feature that is constant on the batch (std 0, or at most ``CONSTANT_STD``
times ``|mu|``, which also covers float32 rounding of a constant) cannot be
scaled to std ``init_scale``: it gets ``s = 1`` (``g = init_scale``,
``b = -mu * init_scale``), an output of 0 on the batch, and finite values
elsewhere, instead of an infinite or huge ``g``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.core import Tracer

#: A feature whose std is at most this times ``max(1, |mean|)`` counts as constant.
CONSTANT_STD = 1e-6


def feature_axes(
  kept: tuple[int, ...],
  kernel_ndim: int,
  features: Mapping[int, int],
  at: str,
  nnx: bool = False,
) -> tuple[int, ...]:
  """The output axes (negative) that ``g``'s kept kernel axes become.

  Args:
    kept: weight norm's kept kernel axes, non-negative and sorted (``()`` for
      ``axis=None``: one ``g`` for the whole kernel).
    kernel_ndim: the kernel's rank.
    features: the layer's output-feature axes, kernel axis (non-negative) ->
      output axis (negative), e.g. ``{1: -1}`` for a ``Dense`` kernel ``(in, out)``.
    at: the layer, for the error message.
    nnx: the message speaks NNX's ``flaxnorm.nnx.data_init``, else Linen's
      ``data_init=True``.

  Returns:
    The output axes holding ``g``'s features, in ``kept``'s order.

  Raises:
    ValueError: a kept axis is not an output-feature axis of the layer.
  """
  missing = [k for k in kept if k not in features]
  if missing:
    raise ValueError(
      f"{_fn(nnx)} needs g's kept axes to be output-feature axes of the "
      f"layer, at {at}: kernel axes {missing} (of {kernel_ndim}) are not; the output "
      f"features are on kernel axes {sorted(features)}. Wrap it with axis= one of those (e.g. "
      f"axis={sorted(features)[-1] - kernel_ndim})"
      + (", or leave it out of data_init." if nnx else " or data_init=False.")
    )
  return tuple(features[k] for k in kept)


def normalize(
  t: jax.Array,
  axes: tuple[int, ...],
  init_scale: float,
  g_shape: tuple[int, ...],
  bias_shape: tuple[int, ...] | None,
  at: str = "",
  nnx: bool = False,
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
  """``g``, ``b`` and the output ``y = g * t + b`` of the data-dependent init.

  Args:
    t: the pre-activation ``f(x; v / ||v||)`` without bias, of shape
      ``(..., *features)``.
    axes: ``t``'s feature axes (negative, ``g``'s kept axes); the statistics
      run over all the others.
    init_scale: the output's std per feature (> 0).
    g_shape: the shape of ``g`` (the kernel's rank, 1 on its reduced axes).
    bias_shape: the shape of the bias (``t``'s trailing axes), or ``None`` for
      a layer without one: then ``y = g * t`` keeps a mean of ``mu * g``.
    at: the layer, for the error message.
    nnx: as for :func:`feature_axes`.

  Returns:
    ``(g, b, y)``: ``g`` of ``g_shape`` and ``b`` of ``bias_shape`` (or None)
    in float32, ``y`` of ``t``'s shape and dtype.

  Raises:
    ValueError: the batch gives fewer than 2 values per feature (no std), or
      (outside ``jax.jit``) a value that is not finite.
  """
  reduced = tuple(i for i in range(t.ndim) if i - t.ndim not in axes)
  count = math.prod(t.shape[i] for i in reduced)
  if count < 2:
    raise ValueError(
      f"{_fn(nnx)} takes each output feature's std over the init batch, "
      f"at {at}: the batch gives {count} value(s) per feature (output shape {t.shape}); "
      "initialize with a batch of at least 2 examples (more give better statistics)."
    )
  if not isinstance(t, Tracer) and not bool(jnp.all(jnp.isfinite(t))):
    raise ValueError(
      f"{_fn(nnx)} takes each output feature's mean and std over the init batch, at {at}: "
      f"the layer's output on it is not finite ({int(jnp.sum(~jnp.isfinite(t)))} of {t.size} "
      "values are NaN or inf), so g and the bias would be. Check the init batch (and the "
      "layers before this one)."
    )
  t32 = t.astype(jnp.promote_types(t.dtype, jnp.float32))
  mu = jnp.mean(t32, axis=reduced, keepdims=True)
  s = jnp.sqrt(jnp.mean(jnp.square(t32 - mu), axis=reduced, keepdims=True))
  # Relative to |mu| only: small data, or a small init_scale upstream, is not constant.
  s = jnp.where((s > CONSTANT_STD * jnp.abs(mu)) & (s > 0), s, 1.0)
  g = init_scale / s  # t's shape with 1 on the reduced axes: features in g's order
  y = t32 * g
  b = None
  if bias_shape is not None:
    shift = -mu * g
    y = y + shift
    # Every feature axis lies in the bias's (trailing) axes, so the leading
    # axes of shift are all 1.
    b = jnp.broadcast_to(shift.reshape(shift.shape[t.ndim - len(bias_shape) :]), bias_shape)
  return g.reshape(g_shape), b, y.astype(t.dtype)


def _fn(nnx: bool) -> str:
  return "flaxnorm.nnx.data_init" if nnx else "weight_norm: data_init=True"
