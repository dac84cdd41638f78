"""Operator-mode spectral norm, the part every face shares (no Flax import).

Operator mode runs power iteration through the layer's own linear map on one
example (``linear(w)``: ``x -> A_w x``) and its transpose from ``jax.vjp``, so
sigma is the norm of what the layer computes (for a convolution its true
operator norm, not the norm of the reshaped kernel). The faces build the map
from the layer (``flaxnorm._linen_operator`` for Linen, ``flaxnorm._nnx_layer``
for NNX); this module checks it, starts, iterates and scales.

State: ``u`` has the shape of one output example and ``v`` of one input example
(batch size 1), fixed at init; ``sigma`` the scalar estimate. Evaluation uses
the stored sigma, so that a variables tree alone can remove the norm.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from flaxnorm import _math, _options

#: ``w -> (x -> A_w x)``: the layer's linear map on one example for a kernel ``w``.
Linear = Callable[[jax.Array], Callable[[jax.Array], jax.Array]]


def check_linear(f: Callable[[jax.Array], jax.Array], example: tuple[int, ...], at: str) -> None:
  """Raises unless ``f`` is linear in its input: ``f(2x) - f(0) = 2 (f(x) - f(0))``.

  Runs eagerly on concrete random values (also under ``jit``): the layer's
  linearity in its input does not depend on the kernel's value.
  """
  with jax.ensure_compile_time_eval():
    x = jax.random.normal(jax.random.key(0), example)
    zero = f(jnp.zeros_like(x))
    lhs, rhs = f(2 * x) - zero, 2 * (f(x) - zero)
    err = float(jnp.max(jnp.abs(lhs - rhs)))
    scale = max(float(jnp.max(jnp.abs(rhs))), 1e-30)
  if not err <= 1e-4 * scale:
    raise ValueError(
      f"spectral_norm(operator=True): {at}: the layer is not linear in its input "
      f"(f(2x) - f(0) differs from 2 (f(x) - f(0)) by {err:.3g}, relative {err / scale:.3g}); "
      "operator mode needs a linear layer (Dense, Conv, ...). Use operator=False (the "
      "kernel's matrix view) for this layer."
    )


def check_input_shape(
  v_shape: tuple[int, ...], example: tuple[int, ...], keys: tuple, at: str
) -> None:
  """Raises unless this call's per-example input shape is the one the state was made for."""
  came = tuple(example[1:])
  if tuple(v_shape[1:]) != came:
    raise ValueError(
      f"spectral_norm(operator=True): {at} was initialized for inputs of per-example shape "
      f"{tuple(v_shape[1:])} (its {keys[1]} has shape {tuple(v_shape)}), but this call's "
      f"inputs have per-example shape {came}. Operator mode's sigma is the norm at that input "
      "size: re-initialize the layer for the new size."
    )


def init_state(
  key: jax.Array,
  w: jax.Array,
  linear: Linear,
  example: tuple[int, ...],
  options: _options.SpectralNormOptions,
) -> _math.SpectralState:
  """Random normalized ``u`` (one output example) and ``v`` (one input ``example``), iterated."""
  ku, kv = jax.random.split(key)
  apply = linear(jax.lax.stop_gradient(w))
  out = jax.eval_shape(apply, jnp.zeros(example, jnp.float32))
  u = _math.l2_normalize(jax.random.normal(ku, out.shape, jnp.float32), eps=options.eps)
  v = _math.l2_normalize(jax.random.normal(kv, example, jnp.float32), eps=options.eps)
  u, v, sigma = _math.operator_power_iteration(
    apply, u, v, n_steps=options.n_init_iterations, eps=options.eps
  )
  return _math.SpectralState(u, v, sigma)


def iterate(
  w: jax.Array,
  state: _math.SpectralState,
  linear: Linear,
  options: _options.SpectralNormOptions,
) -> tuple[jax.Array, _math.SpectralState]:
  """A training step: the differentiable scale and the new state (the old one if not finite)."""
  apply = linear(jax.lax.stop_gradient(w))
  u, v, _ = _math.operator_power_iteration(
    apply, state.u, state.v, n_steps=options.n_power_iterations, eps=options.eps
  )
  sigma = jnp.vdot(u, linear(w)(v))  # differentiable in w
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
