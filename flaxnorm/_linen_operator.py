"""Operator-mode spectral norm for Linen: power iteration through the layer's own map.

Kernel mode estimates the norm of the kernel's matrix view; for a convolution
that is not the norm of what the layer computes (it can be off by up to
``sqrt(kh * kw)``). Operator mode iterates through the layer itself: a plain
copy of the layer (same class and fields, computing in float32 at least) is
applied to one example, and its transpose comes from ``jax.vjp``. Any layer
linear in its input works without per-layer code: ``Dense``, ``DenseGeneral``,
``Conv`` with any strides, padding (``CIRCULAR`` too), dilation and groups,
``ConvTranspose``, ``ConvLocal``. The linear part is taken as a JVP at zero, so
the bias plays no part.

State: ``{name}_u`` has the shape of one output example and ``{name}_v`` of one
input example (batch size 1), fixed at init; ``{name}_sigma`` is the scalar
estimate. Sigma is exact for that input size: with zero padding it grows with
the size toward the circular value; with circular padding it is the same for
every size at least the kernel's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta

from flaxnorm import _math, _options, _subclass

#: The layer's call arguments, kept on the module during its ``__call__``.
INPUTS = "_flaxnorm_inputs"


def _plain_copy(module: nn.Module) -> nn.Module:
  """An unbound plain layer with ``module``'s fields, computing in float32 at least."""
  base = _subclass.base_of(type(module))
  fields = {
    f.name: getattr(module, f.name)
    for f in dataclasses.fields(module)  # pyright: ignore[reportArgumentType]
    if f.init and f.name not in ("parent", "name")
  }
  for key in ("dtype", "param_dtype"):
    if key in fields:
      own = fields[key] if fields[key] is not None else jnp.float32
      fields[key] = _math.wider(own, jnp.float32)
  return base(**fields, parent=None)


class LayerMap:
  """The wrapped layer's linear map ``x -> A_w x`` on one example, for a kernel ``w``.

  Args:
    module: the normalized layer, inside its ``__call__``.
    name: the normalized param.
    at: the param's description, for errors.
  """

  def __init__(self, module: nn.Module, name: str, at: str):
    call = module.__dict__.get(INPUTS)
    if call is None:
      raise ValueError(
        f"spectral_norm(operator=True): {at} was asked for outside the layer's __call__; "
        "operator mode needs the layer's inputs."
      )
    args, kwargs = call
    inputs = args[0] if args else kwargs["inputs"]
    self.example = jnp.zeros((1, *jnp.shape(inputs)[1:]), jnp.float32)
    self.rest = (args[1:], {k: x for k, x in kwargs.items() if k != "inputs"})
    self.plain, self.name, self.module = _plain_copy(module), name, module

  def _params(self, w: jax.Array) -> dict[str, Any]:
    shapes = jax.eval_shape(self.plain.init, jax.random.key(0), self.example, *self.rest[0])
    others = {k for k in shapes.get("params", {}) if k != self.name}
    have = {k: meta.unbox(self.module.get_variable("params", k)) for k in others if self.module.has_variable("params", k)}  # fmt: skip
    if len(have) < len(others):  # at init, params the layer creates after the kernel
      made = self.plain.init(jax.random.key(0), self.example, *self.rest[0], **self.rest[1])
      have = {**meta.unbox(made["params"]), **have}
    return {**{k: have[k] for k in others}, self.name: w}

  def linear(self, w: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """``x -> A_w x`` (the JVP at zero: no bias), float32 at least."""
    params = self._params(w.astype(_math.wider(w.dtype, jnp.float32)))
    args, kwargs = self.rest

    def f(x):
      return self.plain.apply({"params": params}, x, *args, **kwargs)

    return lambda x: jax.jvp(f, (jnp.zeros_like(x),), (x,))[1]

  def output_example(self, w: jax.Array) -> jax.ShapeDtypeStruct:
    return jax.eval_shape(self.linear(w), self.example)

  def check_linear(self, w_shape: tuple[int, ...], at: str) -> None:
    """Raises unless the layer is linear in its input: ``f(2x) - f(0) = 2 (f(x) - f(0))``."""
    with jax.ensure_compile_time_eval():
      kx, kw = jax.random.split(jax.random.key(0))
      x = jax.random.normal(kx, self.example.shape)
      params = self._params(jax.random.normal(kw, w_shape))
      args, kwargs = self.rest

      def f(x: jax.Array) -> jax.Array:
        return jnp.asarray(self.plain.apply({"params": params}, x, *args, **kwargs))

      zero = f(jnp.zeros_like(x))
      lhs, rhs = f(2 * x) - zero, 2 * (f(x) - zero)
      err = float(jnp.max(jnp.abs(lhs - rhs)))
      scale = float(jnp.max(jnp.abs(rhs)))
    if not err <= 1e-4 * max(scale, 1e-30):
      raise ValueError(
        f"spectral_norm(operator=True): {at}: the layer is not linear in its input "
        f"(f(2x) - f(0) differs from 2 (f(x) - f(0)) by {err:.3g}, relative "
        f"{err / max(scale, 1e-30):.3g}); operator mode needs a linear layer (Dense, Conv, ...). "
        "Use operator=False (the kernel's matrix view) for this layer."
      )


def check_input_shape(v_shape: tuple[int, ...], layer_map: LayerMap, keys: tuple, at: str) -> None:
  came = tuple(layer_map.example.shape[1:])
  if tuple(v_shape[1:]) != came:
    raise ValueError(
      f"spectral_norm(operator=True): {at} was initialized for inputs of per-example shape "
      f"{tuple(v_shape[1:])} (its {keys[1]} has shape {tuple(v_shape)}), but this call's "
      f"inputs have per-example shape {came}. Operator mode's sigma is the norm at that input "
      "size: re-initialize the layer for the new size."
    )


def init_state(
  key: jax.Array, w: jax.Array, layer_map: LayerMap, options: _options.SpectralNormOptions
) -> _math.SpectralState:
  """Random normalized ``u`` (one output example) and ``v`` (one input example), iterated."""
  ku, kv = jax.random.split(key)
  out = layer_map.output_example(w)
  u = _math.l2_normalize(jax.random.normal(ku, out.shape, jnp.float32), eps=options.eps)
  v = _math.l2_normalize(jax.random.normal(kv, layer_map.example.shape), eps=options.eps)
  apply = layer_map.linear(jax.lax.stop_gradient(w))
  u, v, sigma = _math.operator_power_iteration(
    apply, u, v, n_steps=options.n_init_iterations, eps=options.eps
  )
  return _math.SpectralState(u, v, sigma)


def iterate(
  w: jax.Array,
  state: _math.SpectralState,
  layer_map: LayerMap,
  options: _options.SpectralNormOptions,
) -> tuple[jax.Array, _math.SpectralState]:
  """A training step: the differentiable scale and the new state (the old one if not finite)."""
  apply = layer_map.linear(jax.lax.stop_gradient(w))
  u, v, _ = _math.operator_power_iteration(
    apply, state.u, state.v, n_steps=options.n_power_iterations, eps=options.eps
  )
  sigma = jnp.vdot(u, layer_map.linear(w)(v))  # differentiable in w
  ok = jnp.isfinite(sigma)
  new = _math.SpectralState(
    jnp.where(ok, u, state.u),
    jnp.where(ok, v, state.v),
    jax.lax.stop_gradient(jnp.where(ok, sigma, jnp.asarray(state.sigma, sigma.dtype))),
  )
  return _scale(sigma, options), new


def _scale(sigma: jax.Array, options: _options.SpectralNormOptions) -> jax.Array:
  return _math.sigma_scale(
    sigma, options.eps, mode=options.mode, target=options.target, at="spectral_norm"
  )


def eval_scale(sigma: jax.Array, options: _options.SpectralNormOptions) -> jax.Array:
  """Evaluation: the stored sigma (a variables tree alone can then remove the norm)."""
  return _scale(jnp.asarray(sigma), options)
