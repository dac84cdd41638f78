"""Weight norm's data-dependent init in Linen (the rule is in ``flaxnorm._data_init``).

During ``model.init``, a layer wrapped with ``data_init=True`` runs with the
unit-norm kernel ``v / ||v||`` and a zero bias: a :class:`DataInit` takes the
place of the call's ``OutputScale`` (``linen._param`` hands it the kernel's
scale and the bias). The layer's output ``t`` then sets ``g`` and the bias
with ``put_variable``, and the layer returns ``g * t + b``, so the next layer
of the same ``init`` sees the normalized output.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from flax.core import meta

from flaxnorm import _data_init, _math, _subclass

#: The layers whose data-dependent init is supported (with Flax's own ops).
LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.ConvTranspose)


class DataInit:
  """One layer call's data-dependent init, standing in for its ``OutputScale``.

  Args:
    init_scale: the std per output feature to reach.
    n_features: how many of the kernel's axes are output features.
    offset: how many kernel axes follow them (1 for a transposed
      ``ConvTranspose`` kernel ``(*window, out, in)``, else 0).
  """

  def __init__(self, init_scale: float, n_features: int, offset: int):
    self.init_scale, self.n_features, self.offset = init_scale, n_features, offset
    self.bias: jax.Array | None = None
    self.g: tuple[str, tuple[int, ...], tuple[int, ...]] | None = None  # key, out axes, shape
    self.at = ""  # the param and layer, for error messages

  def features(self, ndim: int) -> dict[int, int]:
    """Kernel axis -> output axis (negative) of each output feature axis."""
    first = ndim - self.offset - self.n_features
    return {first + i: i - self.n_features for i in range(self.n_features)}

  def take_scale(self, base: jax.Array, scale: jax.Array) -> bool:
    del base, scale
    return False  # the layer gets the unit-norm kernel itself

  def take_bias(self, bias: jax.Array) -> jax.Array:
    self.bias = bias
    return jax.numpy.zeros_like(bias)


def for_call(module: nn.Module, init_scale: float | None, scales_output: bool) -> DataInit | None:
  """The :class:`DataInit` of this call of ``module``, or None if it initializes nothing.

  Args:
    module: the (normalized) layer being called.
    init_scale: its ``data_init`` weight norm's ``init_scale``, None if none.
    scales_output: whether it is one of Flax's linear layers running Flax's
      own ops (``y = f(x; kernel) + b``, linear in the kernel).
  """
  base = _subclass.base_of(type(module))
  if init_scale is None or not module.is_initializing() or base not in LAYERS:
    return None
  if not scales_output:  # custom ops or batch_dims: start() raises if the kernel is asked for
    return None
  features = getattr(module, "features", 1)
  n_features = len(features) if base is nn.DenseGeneral and not isinstance(features, int) else 1
  offset = 1 if getattr(module, "transpose_kernel", False) else 0
  return DataInit(init_scale, n_features, offset)


def start(
  init: object,
  at: str,
  g_key: str,
  kept: tuple[int, ...],
  v: jax.Array,
  g_shape: tuple[int, ...],
  eps: float,
) -> jax.Array:
  """Records where ``g`` goes; returns the kernel's scale ``1 / ||v||``, or raises.

  Args:
    init: what the layer's call stashed for ``_param`` (a :class:`DataInit`
      if the layer is supported).
    at: the param and layer, for error messages.
    g_key: the name of ``g``.
    kept: ``g``'s kept kernel axes.
    v: the direction.
    g_shape: the shape of ``g``.
    eps: weight norm's lower bound on ``||v||``.
  """
  if not isinstance(init, DataInit):
    supported = ", ".join(f"nn.{c.__name__}" for c in LAYERS)
    raise ValueError(
      f"weight_norm: data_init=True supports {supported} running Flax's own ops "
      f"(default dot_general/conv, no batch_dims, only 'kernel' wrapped), not {at}. "
      f"Wrap this layer with data_init=False."
    )
  axes = _data_init.feature_axes(kept, v.ndim, init.features(v.ndim), at)
  init.g, init.at = (g_key, axes, g_shape), at
  return _math.weight_norm_scale(jax.numpy.ones(g_shape, v.dtype), v, eps)


def _put_param(module: nn.Module, key: str, value: jax.Array) -> None:
  """Overwrites a param created in this init, keeping its box (e.g. ``nn.Partitioned``)."""
  raw = module.get_variable("params", key)
  value = value.astype(meta.unbox(raw).dtype)
  module.put_variable(
    "params", key, raw.replace_boxed(value) if isinstance(raw, meta.AxisMetadata) else value
  )


def finish(module: nn.Module, init: DataInit, t: jax.Array) -> jax.Array:
  """Sets ``g`` (and the bias) from the unit-norm layer's output ``t``; returns ``g * t + b``."""
  if init.g is None:  # the layer never asked for its kernel: just add the bias back
    if init.bias is None:
      return t
    bias = init.bias.reshape((1,) * (t.ndim - init.bias.ndim) + init.bias.shape)
    return (t + bias.astype(t.dtype)).astype(t.dtype)
  g_key, axes, g_shape = init.g
  bias_shape = None if init.bias is None else tuple(init.bias.shape)
  g, b, y = _data_init.normalize(t, axes, init.init_scale, g_shape, bias_shape, init.at)
  _put_param(module, g_key, g)
  if b is not None:
    _put_param(module, "bias", b)
  return y
