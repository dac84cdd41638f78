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

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxnorm import _checks, _math, _options, _power

#: ``w -> (x -> A_w x)``: the layer's linear map on one example for a kernel ``w``.
Linear = Callable[[jax.Array], Callable[[jax.Array], jax.Array]]


def operator_power_iteration(
  apply: Callable[[jax.Array], jax.Array],
  u: jax.Array,
  v: jax.Array,
  *,
  n_steps: int,
  eps: float = 1e-12,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Power iteration through a linear map given as a function: operator-mode spectral norm.

  Where :func:`power_iteration` takes a matrix, this takes the map itself, e.g.
  a convolution without bias on one example, and its transpose from
  ``jax.vjp``, so the estimate is the norm of what the layer computes (for a
  convolution, not the norm of its reshaped kernel). Each step is PyTorch's
  order: ``v = normalize(A^T u)``, then ``u = normalize(A v)``, in a
  ``jax.lax.fori_loop`` (compile time flat in ``n_steps``).

  Warning:
    ``apply`` must be *linear*, not affine: with a bias (Flax's ``nn.Conv``
    and ``nn.Dense`` have one by default) sigma is silently wrong, since
    ``jax.vjp`` transposes the linear part but ``apply(v)`` adds the bias to
    ``u`` and to ``sigma = <u, apply(v)>``. Pass ``x -> f(x) - f(0)``, or the
    layer built with ``use_bias=False``. Nothing checks it: an exact test
    would add work to the jitted loop.

  Args:
    apply: ``x -> A x``, linear (no bias, see the warning), for ``x`` of
      ``v``'s shape; called with float32 (at least) vectors, it may compute
      and return a narrower dtype (a bfloat16 layer). Close over
      stopped-gradient weights: the iteration carries no gradient.
    u: output-shaped estimate (any shape, e.g. ``(1, h, w, out)``).
    v: input-shaped estimate (e.g. ``(1, h, w, in)``).
    n_steps: iterations (>= 0).
    eps: norms at or below ``eps`` count as zero; a zero or non-finite
      product keeps the previous vector.

  Returns:
    ``(u, v, sigma)``: unit vectors of ``u``'s and ``v``'s shapes and
    ``sigma = <u, A v>`` of shape ``()``, none carrying a gradient. Where the
    map gives zero (or non-finite) products the previous vectors are kept as
    they are: a zero map returns the given ``u`` and ``v`` (a zero ``v`` is
    restarted first), not necessarily unit, and ``sigma = 0``. For a
    gradient of sigma in the weights, compute ``<u, A_w v>`` with the returned
    vectors.

  Examples:
    >>> import jax.numpy as jnp, flaxnorm
    >>> w = jnp.diag(jnp.array([3.0, 1.0]))
    >>> u, v, sigma = flaxnorm.operator_power_iteration(
    ...     lambda x: x @ w.T, jnp.ones(2), jnp.ones(2), n_steps=50)
    >>> round(float(sigma), 4)
    3.0

  References:
    Farnia, Zhang & Tse, "Generalizable Adversarial Training via Spectral
    Normalization", ICLR 2019; Gouk, Frank, Pfahringer & Cree, "Regularisation
    of Neural Networks by Enforcing Lipschitz Continuity", Machine Learning 110,
    2021.
  """
  eps = _checks.check_eps(eps, "operator_power_iteration", spectral=True)
  n_steps = _checks.check_count(n_steps, "n_steps", 0, "operator_power_iteration")
  u, v = jnp.asarray(u), jnp.asarray(v)
  for name, x in (("u", u), ("v", v)):  # vjp transposes: A^T, not A^H, for a complex map
    _checks.check_float_array(x, name, "operator_power_iteration", complex_ok=False)
  dtype = _math.compute_dtype(jnp.result_type(u, v))
  u = jax.lax.stop_gradient(jnp.asarray(u, dtype))
  v = jax.lax.stop_gradient(jnp.asarray(v, dtype))
  if not n_steps:  # unit vectors give sigma (a zero one, 0)
    u, v = (_power.start_vector(x, eps, restart=False) for x in (u, v))
  try:
    out, transpose = jax.vjp(apply, v)  # a layer computing in bfloat16 takes a bfloat16 ``u``
  except (TypeError, ValueError) as e:
    raise ValueError(
      f"operator_power_iteration: apply fails on v of shape {v.shape} ({v.dtype}); v must "
      f"be an input apply takes (one example of its input's shape): {e}"
    ) from e
  if not isinstance(out, jax.Array):
    raise TypeError(
      f"operator_power_iteration: apply must return one array (u's shape), got "
      f"{type(out).__name__}."
    )
  if out.shape != u.shape:
    raise ValueError(
      f"operator_power_iteration: u must have the shape of apply(v), {out.shape} for v of "
      f"shape {v.shape}, got {u.shape}."
    )

  u = _power.sharded_like(out, u)

  def step(_, carry):
    u, v, _ = carry
    # Where u and v are both zero (a zeroed state), v restarts: elementwise in
    # the step, as a start vector would be one more example-sized buffer.
    keep = _power.start_vector(v, eps, restart=True)
    v = _power.normalize_or_keep(transpose(u.astype(out.dtype))[0].astype(dtype), keep, eps)
    av = apply(v).astype(dtype)
    u = _power.normalize_or_keep(av, u, eps)
    return u, v, _real_dot(u, av)

  carry = (u, v, _real_dot(u, out.astype(dtype)))  # out = A v, from the vjp
  if n_steps:
    carry = jax.lax.fori_loop(0, n_steps, step, carry)
  return jax.lax.stop_gradient(carry)


def _real_dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """``<a, b>`` of real arrays, as a sum of products: sharded operands need no ``out_sharding``."""
  return jnp.sum(a * b)


def probe(shape: tuple[int, ...], seed: float = 0.0, dtype: Any = np.float32) -> np.ndarray:
  """A fixed array of ``shape`` with values of both signs and many magnitudes in [-1, 1]
  (``sin`` of a golden-ratio ramp): a stand-in for random values in the linearity
  checks that costs no compile (``jax.random`` compiles once per shape, about 1 s on CPU)."""
  ramp = np.arange(math.prod(shape), dtype=np.float64) * 1.6180339887 + seed
  return np.sin(ramp).reshape(shape).astype(dtype)


def stand_in(shape: tuple[int, ...], dtype: Any, seed: float = 2.0) -> np.ndarray:
  """Fixed values of ``shape`` and ``dtype`` for a param the linearity checks need
  concrete: :func:`probe` for floats, zeros for other dtypes."""
  if jnp.issubdtype(dtype, jnp.floating):
    return probe(shape, seed, dtype)
  return np.zeros(shape, dtype)


def check_linear(f: Callable[[jax.Array], jax.Array], example: tuple[int, ...], at: str) -> None:
  """Raises unless ``f`` is linear in its input: ``f(2x) - f(0) = 2 (f(x) - f(0))``.

  Computed now, on concrete values (:func:`probe`; also inside ``jit``): the
  layer's linearity in its input does not depend on the kernel's value.
  """

  def sides(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    zero = f(jnp.zeros_like(x))
    return f(2 * x) - zero, 2 * (f(x) - zero)

  lhs, rhs = _concrete(sides, probe(example))
  _check_close(lhs, rhs, at, "input")


def check_kernel_linear(
  linear: Linear, w_shape: tuple[int, ...], example: tuple[int, ...], at: str
) -> None:
  """Raises unless the layer's map is linear in its kernel: ``A_{2w} x = 2 A_w x``.

  :func:`iterate` computes sigma as ``<w, d sigma / d w>``, which is
  ``<u, A_w v>`` exactly when ``A_w`` is linear in ``w`` (every Flax linear
  layer). Computed now, on a fixed kernel and input (:func:`probe`); ``linear``
  must close over concrete values.
  """

  def sides(w: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return linear(2 * w)(x), 2 * linear(w)(x)

  lhs, rhs = _concrete(sides, probe(w_shape, seed=1.0), probe(example))
  _check_close(lhs, rhs, at, "kernel")


def _concrete(
  f: Callable[..., tuple[jax.Array, jax.Array]], *args: np.ndarray
) -> tuple[jax.Array, jax.Array]:
  """``f(*args)`` computed now, also inside a trace (``f`` must close over concrete values).

  One compiled call, outside any trace: op by op (``ensure_compile_time_eval``),
  a Flax layer's ``apply`` would also run its initializers for real (its shape
  check evaluates them) and compile each op.
  """
  return jax.jit(f).lower(*args).compile()(*args)


def _check_close(lhs: Any, rhs: Any, at: str, what: str) -> None:
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)  # concrete, as numpy
  err = float(np.max(np.abs(lhs - rhs)))
  scale = max(float(np.max(np.abs(rhs))), 1e-30)
  if not err <= 1e-4 * scale:
    doubled = (
      "f(2x) - f(0) differs from 2 (f(x) - f(0))"
      if what == "input"
      else "A_2w x differs from 2 A_w x"
    )
    raise ValueError(
      f"spectral_norm(operator=True): {at}: the layer is not linear in its {what} "
      f"({doubled} by {err:.3g}, relative {err / scale:.3g}); "
      "operator mode needs a layer linear in its input and its kernel (Dense, Conv, ...). "
      "Use operator=False (the kernel's matrix view) for this layer."
    )


def check_real_kernel(w: jax.Array, at: str) -> None:
  """Raises ``TypeError`` for a complex kernel: operator mode supports real layers only.

  Its transpose comes from ``jax.vjp`` (``A^T``, not ``A^H``) and its example
  inputs are real, so a complex layer's norm would come out wrong.
  """
  if jnp.issubdtype(w.dtype, jnp.complexfloating):
    raise TypeError(
      f"spectral_norm(operator=True): {at} is {w.dtype}; operator mode supports real kernels "
      "only. Use operator=False (the kernel's matrix view, which supports complex kernels)."
    )


def example_of(input_shape: tuple[int, ...], v_shape: tuple[int, ...]) -> tuple[int, ...]:
  """One example of a call's inputs, batch of 1: their trailing dims, as many as ``v`` has.

  The leading dims are batch axes, any number of them (none for an unbatched
  call, as under ``nnx.vmap``): a layer maps each example alike.
  """
  n = len(v_shape) - 1
  return (1, *input_shape[max(len(input_shape) - n, 0) :])


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
      + (
        f" (input_shape is one example without the batch axis: "
        f"input_shape={tuple(v_shape[2:])}, not {tuple(v_shape[1:])}.)"
        if len(v_shape) > 2 and tuple(v_shape[2:]) in (came, came[1:])
        else ""
      )
    )


def init_state(
  key: jax.Array,
  w: jax.Array,
  linear: Linear,
  example: tuple[int, ...],
  options: _options.SpectralNormOptions,
) -> _power.SpectralState:
  """Random normalized ``u`` (one output example) and ``v`` (one input ``example``), iterated."""
  ku, kv = jax.random.split(key)
  apply = linear(jax.lax.stop_gradient(w))
  dtype = _math.compute_dtype(w.dtype)  # float32 at least, as kernel mode's state
  out = jax.eval_shape(apply, jnp.zeros(example, dtype))
  u = _math.l2_normalize(_normal(ku, out.shape, dtype), eps=options.eps)
  v = _math.l2_normalize(_normal(kv, example, dtype), eps=options.eps)
  u, v, sigma = operator_power_iteration(
    apply, u, v, n_steps=options.n_init_iterations, eps=options.eps
  )
  return _power.SpectralState(u, v, sigma)


def _normal(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
  """``jax.random.normal(key, shape, dtype)``, the same values, drawn flat: XLA:CPU
  compiles a many-axis draw far more slowly (3.0 s for ``(2, 16, 16, 16)``, 0.4 s for
  its 8,192 values flat), and each PRNG draws a shape's values in its flat order."""
  return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def iterate(
  w: jax.Array,
  state: _power.SpectralState,
  linear: Linear,
  options: _options.SpectralNormOptions,
) -> tuple[jax.Array, _power.SpectralState]:
  """A training step: the differentiable scale and the new state.

  The state stays finite: ``u`` and ``v`` keep their old values where a
  product is not finite (``normalize_or_keep``), ``sigma`` where it is not.
  """
  apply = linear(jax.lax.stop_gradient(w))
  u, v, _ = operator_power_iteration(
    apply, state.u, state.v, n_steps=options.n_power_iterations, eps=options.eps
  )
  sigma = _sigma(w, u, v, linear)
  old = jnp.asarray(state.sigma, sigma.dtype)
  kept = jnp.where(jnp.isfinite(sigma), sigma, old).astype(jnp.result_type(state.sigma))
  new = _power.SpectralState(u, v, jax.lax.stop_gradient(kept))
  return _scale(sigma, options), new


def fresh_scale(
  w: jax.Array, state: _power.SpectralState, linear: Linear, options: _options.SpectralNormOptions
) -> jax.Array:
  """The scale from a state this training step already stored, differentiable in ``w``.

  A scan's time loop over a layer whose step ran before the loop (Linen's
  ``nn.RNN``, NNX's): ``sigma = <u, A_w v>`` is the sigma :func:`iterate`
  computed, and its gradient flows into ``w`` as in the step itself.
  """
  return _scale(_sigma(w, state.u, state.v, linear), options)


def _sigma(w: jax.Array, u: jax.Array, v: jax.Array, linear: Linear) -> jax.Array:
  """``sigma = <u, A_w v> = <w, G>``, differentiable in ``w`` only (its gradient is ``G``).

  ``G = d<u, A_w v>/dw`` (``A_w`` is linear in ``w``): one kernel-gradient
  product on one example gives the value, with no forward pass of ``w``
  through the layer. The tangent is ``<u, A_dw v>``, linear in ``dw``, so
  reverse mode transposes it into ``ct * G`` computed in the backward pass from
  ``ct * u`` rather than keeping ``G`` from the forward (a kernel-sized float32
  buffer per layer, 2x a bfloat16 kernel's bytes, live across the whole step):
  one more single-example product instead. Forward mode works too.

  Args:
    w: the kernel.
    u: the left singular vector, of the layer's output shape for one example.
    v: the right singular vector, of its input shape for one example.
    linear: ``k -> (x -> A_k x)``.
  """
  u, v = jax.lax.stop_gradient((u, v))
  w_c = w.astype(_math.wider(w.dtype, jnp.float32))
  # The layer's other params (closed over by `linear`) become explicit inputs,
  # so that neither rule below closes over a tracer.
  apply_fn, consts = jax.closure_convert(lambda k, x: linear(k)(x), w_c, v)
  return _inner(apply_fn, w_c, u, v, *consts)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _inner(apply_fn: Callable, w: jax.Array, u: jax.Array, v: jax.Array, *consts) -> jax.Array:
  out, pull = jax.vjp(lambda k: apply_fn(k, v, *consts), w)
  return _real_dot(w, pull(_power.sharded_like(out, u.astype(out.dtype)))[0])


@_inner.defjvp
def _inner_jvp(apply_fn, primals, tangents):
  w, u, v, *consts = primals
  # u, v and the other params carry no gradient: <u, A_dw v>, linear in dw.
  av = apply_fn(tangents[0], v, *consts)
  sigma = _inner(apply_fn, w, u, v, *consts)
  return sigma, _real_dot(_power.sharded_like(av, u.astype(av.dtype)), av).astype(sigma.dtype)


def _scale(sigma: jax.Array, options: _options.SpectralNormOptions) -> jax.Array:
  return _power.sigma_scale(
    sigma, options.eps, mode=options.mode, target=options.target, at="spectral_norm"
  )


def eval_scale(sigma: jax.Array, options: _options.SpectralNormOptions) -> jax.Array:
  """Evaluation: the stored sigma (a variables tree alone can then remove the norm)."""
  return _scale(jnp.asarray(sigma), options)
