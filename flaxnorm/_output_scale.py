"""Applying a kernel's scale to a linear layer's output instead of the kernel.

Both transforms give the layer the kernel ``base * scale``: ``v * (g / ||v||)``
(weight norm, ``scale`` of shape ``(1, ..., 1, *out)``) or ``W * (1 / sigma)``
(spectral norm, a scalar). For a layer linear in its kernel whose bias is
added last, ``f(x; base * scale) + b = f(x; base) * scale + b``. Multiplying
the kernel costs kernel-sized passes forward and backward, which dominate a
train step when the batch is small next to the kernel; scaling the output
costs activation-sized work. The layer is handed the bare kernel and a zero
bias (``x + 0`` is dropped by XLA), and :meth:`OutputScale.finish` scales its
output and adds the bias. No Flax import: the Linen and NNX faces decide which
layers qualify.

Which side is cheaper depends on the call: a Dense over a small batch has an
output far smaller than its kernel, a convolution over a long sequence one far
larger (a 3x3x64x128 kernel against a 64x8x8x128 output). The choice is made
per call at trace time from the static shapes (:meth:`OutputScale.take_scale`);
both sides give the same numbers. The certified bound's traces take the kernel
side (:func:`kernel_side`): there the walk sees each layer's kernel as it is
used, ``W · s``, where on the output side an ensemble's stacked raw kernels and
its members' scales would be bounded apart.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from flaxnorm import _math


def wide_range(dtype) -> bool:
  """Whether a compute dtype has float32's exponent range (float32, bfloat16, float64).

  The layer computes ``f(x; v)`` in its own dtype before the scale is applied:
  ``||v|| / g`` (or ``sigma``) times the true output, which overflows float16
  (max 65504) long before the normalized result would. Narrow-range dtypes
  take the kernel path.
  """
  dtype = jnp.dtype(dtype)
  return not jnp.issubdtype(dtype, jnp.inexact) or jnp.finfo(dtype).maxexp >= 128


def _compute_dtypes(layer_dtype, param_dtype, inputs) -> list:
  """The dtypes a layer computes in: its ``dtype`` if set, else its params' and inputs'."""
  if layer_dtype is not None:
    return [layer_dtype]
  return [d for d in (param_dtype, getattr(inputs, "dtype", None)) if d is not None]


def _computes_wide(layer_dtype, param_dtype, inputs) -> bool:
  """Whether the layer computes in a wide-range dtype (see :func:`wide_range`)."""
  # Promotion of a narrow and a wide dtype (float16 with float32 or bfloat16)
  # is wide; of two narrow ones, narrow.
  dtypes = _compute_dtypes(layer_dtype, param_dtype, inputs)
  return any(wide_range(d) for d in dtypes) or not dtypes


# The kernel side is taken for outputs more than this many times the kernel:
# KERNEL_SIDE_RATIO for a kernel with no spatial axes (Dense, DenseGeneral),
# CONV_KERNEL_SIDE_RATIO for a convolution's. Measured layer by layer
# (benchmarks/bench_side.py, docs/benchmarks.md): an Adam step of a weight- or
# spectral-normed Dense is 3-4% slower on the kernel side at output/kernel = 1
# and 2, 2-3% faster at 4 and 10% at 16. A convolution's sides differ by a few
# percent at most from 0.89 up, and the kernel side is the cheaper one at 0.89
# inside the suite's discriminator (2-5% on its step in float32 and bfloat16):
# XLA:CPU copies a conv's kernel into its own layout on every call anyway, and
# the scale fuses into that copy, where a dot reads its kernel in place.
KERNEL_SIDE_RATIO = 3
CONV_KERNEL_SIDE_RATIO = 0.5


def _output_positions(layer, inputs) -> int | None:
  """The output's size over its feature axis, from the static shapes; None if unknown.

  Flax's Dense and convolutions (Linen and NNX) contract the inputs' last axis
  only. A convolution's output has ``ceil(d / stride)`` positions per spatial
  axis (``d * stride`` for a ConvTranspose): exact for SAME padding; other
  paddings change it little, and the count only picks the cheaper side. A
  DenseGeneral over several axes or into several feature axes gives None (the
  output side).

  Args:
    layer: the layer, with ``features`` (Linen) or ``out_features`` (NNX).
    inputs: the call's inputs, of shape ``(..., in_features)``.
  """
  shape = getattr(inputs, "shape", None)
  features = getattr(layer, "features", getattr(layer, "out_features", None))
  if (
    not shape
    or not isinstance(features, int)
    or getattr(layer, "axis", -1) not in (-1, len(shape) - 1)
  ):
    return None
  window = getattr(layer, "kernel_size", None)
  if window is None:
    return math.prod(shape[:-1])  # a Dense
  n_spatial = 1 if isinstance(window, int) else len(window)
  strides = getattr(layer, "strides", None) or 1
  strides = (strides,) * n_spatial if isinstance(strides, int) else tuple(strides)
  spatial = shape[-1 - n_spatial : -1]
  if len(spatial) != n_spatial or len(strides) != n_spatial:
    return None
  if hasattr(layer, "transpose_kernel"):  # ConvTranspose upsamples
    out = [d * s for d, s in zip(spatial, strides)]
  else:
    out = [-(-d // s) for d, s in zip(spatial, strides)]
  return math.prod(shape[: -1 - n_spatial]) * math.prod(out)


def _computes_32(layer, inputs) -> bool:
  """Whether the layer computes in float32 or wider."""
  dtypes = _compute_dtypes(layer.dtype, layer.param_dtype, inputs)
  return jnp.dtype(jnp.result_type(*dtypes) if dtypes else jnp.float32).itemsize >= 4


_KERNEL_SIDE: contextvars.ContextVar[bool] = contextvars.ContextVar("flaxnorm_kernel_side")


@contextlib.contextmanager
def kernel_side() -> Iterator[None]:
  """Every layer traced inside scales its kernel (:func:`for_call` gives None)."""
  token = _KERNEL_SIDE.set(True)
  try:
    yield
  finally:
    _KERNEL_SIDE.reset(token)


def for_call(layer, args: tuple, kwargs: dict, operator: bool = False) -> OutputScale | None:
  """The :class:`OutputScale` for one call of a linear layer, or None to scale the kernel.

  The face (Linen, NNX) has already checked that ``layer`` is one of Flax's
  linear layers running Flax's own ops; this adds what both faces share.

  Args:
    layer: the layer, with Flax's ``dtype`` and ``param_dtype`` fields (and
      ``transpose_kernel`` for a ConvTranspose).
    args: the call's positional arguments, the inputs first.
    kwargs: its keyword arguments (``inputs=`` if passed by name).
    operator: whether operator-mode spectral norm normalizes the layer. Its
      power iteration runs the layer on the raw kernel, so XLA lays that out
      for the convolution anyway, and a kernel-side scale would be a second
      kernel-sized copy (1.11 against 0.46 x the weights' bytes of extra peak
      memory on the suite's discriminator): the output side is kept wherever
      it can be, when the layer computes in float32 or wider (in bfloat16 the
      output side keeps each convolution's bfloat16 output for the backward,
      several times its kernel's bytes on the suite's discriminator).

  Returns:
    None for float16 compute (the unscaled output could overflow) or inside
    :func:`kernel_side`, else an empty :class:`OutputScale` that knows the
    call's output size.
  """
  inputs = args[0] if args else kwargs.get("inputs")
  if _KERNEL_SIDE.get(False) or not _computes_wide(layer.dtype, layer.param_dtype, inputs):
    return None
  # A transposed ConvTranspose kernel holds the output features on axis -2.
  features = getattr(layer, "features", getattr(layer, "out_features", 1))
  n_out = len(features) if isinstance(features, (tuple, list)) else 1  # DenseGeneral's
  return OutputScale(
    per_feature=not getattr(layer, "transpose_kernel", False),
    positions=None
    if operator and _computes_32(layer, inputs)
    else _output_positions(layer, inputs),
    n_out=n_out,
    conv=getattr(layer, "kernel_size", None) is not None,
    operator=operator,
  )


class OutputScale:
  """Collects one call's deferred kernel scale and bias, then applies them.

  Args:
    per_feature: whether the kernel's last ``n_out`` axes are the output's last
      axes (false for a ConvTranspose with ``transpose_kernel=True``), so that
      a per-output-feature scale can move to the output. A scalar always can.
    positions: the output's size over its feature axis (batch x spatial), or
      None if unknown: then the scale moves to the output whenever it can.
    n_out: how many trailing kernel axes are output features (``DenseGeneral``
      with ``features=(heads, dim)``: 2).
    conv: whether the layer is a convolution (its threshold is
      ``CONV_KERNEL_SIDE_RATIO``, a Dense's ``KERNEL_SIDE_RATIO``).
    operator: whether operator-mode spectral norm normalizes the layer; a
      kernel it scales keeps a narrow cotangent (:func:`flaxnorm._math.apply_scale`).
  """

  def __init__(
    self,
    per_feature: bool = True,
    positions: int | None = None,
    n_out: int = 1,
    conv: bool = False,
    operator: bool = False,
  ):
    self.per_feature = per_feature
    self.positions = positions
    self.n_out = n_out
    self.conv = conv
    self.operator = operator
    self.scale: jax.Array | None = None
    self.bias: jax.Array | None = None

  def take_scale(self, base: jax.Array, scale: jax.Array) -> bool:
    """Keeps ``scale`` for the output if it can move there and that is cheaper.

    Returns whether it did; if not, the caller scales the kernel.

    Args:
      base: the bare kernel the layer will get, output features on axis -1
        (-2 for a transposed ConvTranspose kernel).
      scale: the factor, of shape ``()`` or ``base``'s rank.
    """
    if self.positions is not None:
      out_features = base.shape[-1 if self.per_feature else -2]
      ratio = CONV_KERNEL_SIDE_RATIO if self.conv else KERNEL_SIDE_RATIO
      if self.positions * out_features > ratio * base.size:
        return False  # output-sized work would exceed kernel-sized work
    scalar = scale.size == 1 and scale.ndim in (0, base.ndim)
    n = min(self.n_out, base.ndim - 1)
    ones = (1,) * (base.ndim - n)
    trailing = self.per_feature and scale.ndim == base.ndim and scale.shape[:-n] == ones
    if scalar or trailing:
      self.scale = scale.reshape(()) if scalar else scale.reshape(scale.shape[-n:])
      return True
    return False

  def take_bias(self, bias: jax.Array) -> jax.Array:
    """Keeps the bias for :meth:`finish`; the layer gets zeros instead."""
    self.bias = bias
    return jnp.zeros_like(bias)

  def finish(self, y: jax.Array) -> jax.Array:
    """``y * scale + bias`` (bias over the trailing axes), computed in float32 at least.

    Args:
      y: the layer's output for the bare kernel and zero bias, output features last.

    Returns:
      An array of ``y``'s shape and dtype.
    """
    if self.scale is None and self.bias is None:
      return y
    if self.scale is not None:
      tail = y.shape[y.ndim - self.scale.ndim :]
      if any(s not in (1, t) for s, t in zip(self.scale.shape, tail)):
        raise AssertionError(f"flaxnorm: output {y.shape} does not fit scale {self.scale.shape}")
    dtype = y.dtype
    out = y if self.scale is None else _scaled(y, self.scale)
    if self.bias is not None:
      bias = self.bias.reshape((1,) * (y.ndim - self.bias.ndim) + self.bias.shape)
      out = out + bias.astype(out.dtype)
    return out.astype(dtype)


def scale_kernel(deferred: object, base: jax.Array, scale: jax.Array) -> jax.Array:
  """``base * scale`` for a kernel whose scale stays on the kernel side.

  ``deferred`` is the call's :class:`OutputScale`, if any (or another face
  object in its place, such as Linen's data-dependent init).
  """
  narrow = isinstance(deferred, OutputScale) and deferred.operator
  return _math.apply_scale(base, scale, narrow_cotangent=narrow)


def _scaled(y: jax.Array, scale: jax.Array) -> jax.Array:
  """``y * scale`` in the wider of the two dtypes.

  For a narrow ``y`` (bfloat16 with a float32 scale) the widened ``y`` is
  rebuilt in the backward pass (:func:`flaxnorm._math.widened_product`) rather
  than kept as the scale's residual, and the barrier keeps XLA from using
  ``y``'s own float32 source instead (XLA:CPU computes a bfloat16 dot or
  convolution in float32 and may drop the round trip): either way a float32
  output-sized buffer per layer would stay live until the backward pass
  (+2.4 against +0.4 x the weights' bytes on the suite's MLP at batch 1024).
  """
  wide = _math.wider(y.dtype, scale.dtype)
  if wide == y.dtype:
    return y * scale.astype(wide)
  return _math.widened_product(jax.lax.optimization_barrier(y), scale, wide, None)
