"""NNX modules stacked by ``nnx.vmap`` (ensembles, layer stacks): one norm per member.

A module built by ``nnx.vmap(lambda key: nnx.Linear(...))(keys)`` holds its
params with a leading ensemble axis (``kernel`` of shape ``(E, in, out)``).
Wrapped with ``ensemble_axis=0``, each member gets its own ``g`` (weight norm)
or its own ``u``/``v``/``sigma`` (spectral norm), computed member by member at
wrap time (stacked along axis 0, as ``nnx.vmap`` slices them). Under an
``nnx.vmap``-ed call or step every member sees its own slices, so the layer
code runs unchanged; outside one, reading ``layer.kernel`` gives the stacked
normalized kernels (:func:`stacked_factors`).

The ensemble axis must be the leading one: ``nnx.vmap`` slices every variable
of the module on the same axis, and sigma has no axis but that one.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flaxnorm import _axes, _checks, _math, _operator, _options, _power


def _expected_rank(module: nnx.Module, name: str) -> int | None:
  """The rank of one member's param for NNX's own layers, or ``None`` if unknown."""
  if isinstance(module, nnx.Linear) and name == "kernel":
    return 2
  if isinstance(module, (nnx.Conv, nnx.ConvTranspose)) and name == "kernel":
    size = module.kernel_size
    return (1 if isinstance(size, int) else len(size)) + 2
  if isinstance(module, nnx.Embed) and name == "embedding":
    return 2
  if isinstance(module, nnx.LinearGeneral) and name == "kernel":
    return len(module.batch_axis) + len(module.in_features) + len(module.out_features)
  if isinstance(module, nnx.Einsum) and name == "kernel":
    return len(module.kernel_shape)
  return None


def check_stacking(
  module: nnx.Module, name: str, w: jax.Array, ensemble_axis: int | None, method: str, at: str
) -> None:
  """Raises if ``w`` is stacked and ``ensemble_axis`` is not given, or the other way round."""
  rank = _expected_rank(module, name)
  if rank is None:
    return
  if ensemble_axis is None and w.ndim == rank + 1:
    raise ValueError(
      f"{method}: {at} has shape {tuple(w.shape)}, one axis more than a "
      f"{type(module).__name__} {name} ({rank} dims): a module stacked by nnx.vmap (an "
      f"ensemble)? Without ensemble_axis the whole stack would get a single norm. Pass "
      f"ensemble_axis=0 (each member its own state; call it under nnx.vmap), or wrap each "
      f"member inside the vmapped constructor: nnx.vmap(lambda key: flaxnorm.nnx.{method}("
      f"nnx.{type(module).__name__}(..., rngs=nnx.Rngs(key))))(keys)."
    )
  if ensemble_axis is not None and w.ndim != rank + 1:
    raise ValueError(
      f"{method}: ensemble_axis={ensemble_axis} needs {at} stacked, with {rank + 1} dims "
      f"(ensemble, then one {type(module).__name__} {name}), got shape {tuple(w.shape)}."
    )


def member_axes(axis: Any, w: jax.Array, at: str, spectral: bool) -> tuple[int, ...]:
  """One member's kept axes (``w`` stacked on axis 0), checked."""
  if w.ndim < 2:
    raise ValueError(
      f"ensemble_axis=0 needs a stacked param with at least 2 dims at {at}, got "
      f"shape {tuple(w.shape)}."
    )
  if spectral:
    return _checks.check_spectral_weight(w[0], axis, at)
  return _checks.normalize_axes(axis, w.ndim - 1, at)


def weight_norm_g(w: jax.Array, options: _options.WeightNormOptions) -> jax.Array:
  """Each member's ``g`` (``w`` stacked on axis 0), stacked."""
  return jax.vmap(lambda m: _math.weight_norm_decompose(m, _axes.explicit(options.axis, ""))[0])(w)


def spectral_state_init(
  key: jax.Array, w: jax.Array, kept: tuple[int, ...], options: _options.SpectralNormOptions
) -> _power.SpectralState:
  """Each member's converged start state (``w`` stacked on axis 0), stacked."""
  keys = jax.random.split(key, w.shape[0])

  def init(k: jax.Array, m: jax.Array) -> _power.SpectralState:
    return _power.spectral_state_init(
      k, m, axis=kept, n_steps=options.n_init_iterations, eps=options.eps
    )

  return jax.vmap(init)(keys, w)


def member_rank(w: jax.Array, ensemble_axis: int | None) -> int:
  """One member's rank, recorded in the spec: a param with one axis more is the whole stack.

  Without ``ensemble_axis`` the param wrapped is one member's, also when the
  module is wrapped inside a vmapped constructor; outside ``nnx.vmap`` that
  ensemble's params then have one axis more, and read as any stacked ensemble's.
  """
  return w.ndim - (ensemble_axis is not None)


def is_stacked(spec: Any, w: jax.Array) -> bool:
  """Whether ``w`` is the whole stack (outside ``nnx.vmap``) rather than one member."""
  return spec.member_ndim is not None and w.ndim == spec.member_ndim + 1


def stacked_factors(spec: Any, w: jax.Array, *state: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(base, scale)`` of the stacked kernels, ``scale`` broadcasting against ``base``."""
  opts = spec.options
  if isinstance(opts, _options.WeightNormOptions):
    g, v = state
    return v, jax.vmap(lambda g, v: _math.weight_norm_scale(g, v, opts.eps))(g, v)
  u, v, sigma = state
  shape = (-1,) + (1,) * spec.member_ndim
  if opts.operator:  # the stored sigmas, as in evaluation
    return w, jnp.reshape(_operator.eval_scale(sigma, opts), shape)
  kept = _checks.normalize_axes(_axes.explicit(opts.axis, ""), spec.member_ndim)

  def scale(m: jax.Array, u: jax.Array, v: jax.Array) -> jax.Array:
    s, _ = _power.spectral_scale(
      m, u, v, axis=kept, n_steps=0, eps=opts.eps, mode=opts.mode, target=opts.target
    )
    return s

  return w, jnp.reshape(jax.vmap(scale)(w, u, v), shape)


def not_under_vmap_error(method: str, at: str) -> ValueError:
  return ValueError(
    f"{method}: {at} is an ensemble (stacked by nnx.vmap) called outside nnx.vmap; call each "
    f"member under it: nnx.vmap(lambda layer, x: layer(x), in_axes=(0, None))(layer, x), "
    f"or an nnx.vmap-ed training step."
  )
