"""Spectral norm's array math: power iteration, its state, the scale by sigma. No Flax import.

Spectral norm views a kernel of any rank as a matrix ``(m, n)`` with the kept
axes (``axis``, PyTorch's ``dim``: the output features, ``-1`` for Flax
kernels) as rows: ``moveaxis(w, axis, 0).reshape(m, -1)``, PyTorch's view, so
``u`` has the output size ``m`` and ``v`` the size ``n`` of the rest.

Numerics: power iteration runs in (at least) float32 whatever the param
dtype; a zero weight gives a zero, finite result with finite gradients, and a
non-finite one leaves the state as it was.

Complex kernels: power iteration uses the conjugate transpose; ``u`` and ``v``
are complex, ``sigma = Re(u^H W v)`` is real.

Names: the functions here take ``n_steps``, the number of iterations *this
call* runs (``0`` is allowed: evaluation from the stored vectors). The faces'
``n_power_iterations`` (per training call, >= 1) and ``n_init_iterations`` (at
init) are two uses of it.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from flaxnorm import _checks
from flaxnorm._checks import Axis
from flaxnorm._math import apply_scale, compute_dtype, is_complex, l2_normalize, real_dtype, sumsq

Array = jax.Array

DEFAULT_N_INIT_ITERATIONS = 200
"""Power iterations run when the spectral state is created.

For a 1024x1024 Gaussian kernel, PyTorch's 15 start-up iterations leave sigma
1.4-3.1% below its SVD value; 100 leave up to 0.8% and 200 up to 0.21% (three
sets of six seeds: the worst case depends on the draw). They run once, inside a
``fori_loop``, so they add nothing to compile time.
"""


class SpectralState(NamedTuple):
  """Power-iteration state of one spectrally normalized kernel.

  Examples:
    >>> import jax, jax.numpy as jnp, flaxnorm
    >>> state = flaxnorm.spectral_state_init(jax.random.key(0), jnp.ones((4, 3)))
    >>> jax.tree.map(jnp.shape, state)
    SpectralState(u=(3,), v=(4,), sigma=())
  """

  u: Array  # shape=(m,), dtype=float32 (the kernel's complex dtype if complex): left vector.
  v: Array  # shape=(n,), dtype=float32 (the kernel's complex dtype if complex): right vector.
  sigma: Array  # shape=(), dtype=float32 (real also for complex kernels): sigma = Re(u^H W v).


def _vdot(u: Array, x: Array) -> Array:
  """``Re(u^H x)`` (``u^T x`` when real), vectors on the left (see :func:`_dot`)."""
  return jnp.real(_dot(jnp.conj(u), x))


def as_matrix(w: Array, axis: Axis = -1) -> Array:
  """PyTorch's matrix view of a kernel: kept axes as rows, the rest as columns.

  Args:
    w: array with at least 2 dims.
    axis: the kept (output) axis or axes.

  Returns:
    ``moveaxis(w, axis, 0).reshape(m, n)`` where ``m`` is the size of the kept
    axes and ``n`` the product of the others.

  Examples:
    >>> import jax.numpy as jnp, flaxnorm
    >>> flaxnorm.as_matrix(jnp.zeros((3, 3, 2, 8))).shape  # a Conv kernel (kh, kw, in, out)
    (8, 18)
  """
  kept = _checks.check_spectral_weight(w, axis, "as_matrix")
  w = jnp.moveaxis(w, kept, tuple(range(len(kept))))
  m = math.prod(w.shape[: len(kept)])
  return _merge(w, (m, -1), len(kept), 0)


def _merge(w: Array, shape: tuple[int, int], n_kept: int, at: int) -> Array:
  """``w.reshape(shape)``, its kept axes (``n_kept`` of them, leading or trailing) at ``at``.

  On a mesh whose axes are explicit (shardings in the types), a reshape that
  merges a sharded axis needs its output's sharding: the kept axis keeps its
  mesh axis (when it is one axis), the merged one is gathered.
  """
  if not is_explicit(w):
    return w.reshape(shape)
  sharding = jax.typeof(w).sharding
  spec = tuple(sharding.spec) + (None,) * w.ndim
  kept = range(n_kept) if at == 0 else range(w.ndim - n_kept, w.ndim)
  if all(spec[i] is None for i in range(w.ndim) if i not in kept):
    return w.reshape(shape)
  out = [None, None]
  out[at] = spec[kept[0]] if n_kept == 1 else None
  # A sharding with its mesh, not a bare spec: outside `jax.set_mesh` too.
  named = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*out))
  return jnp.reshape(w, shape, out_sharding=named)


def normalize_or_keep(x: Array, previous: Array, eps: float) -> Array:
  """``x / ||x||``, or ``previous`` where ``||x||`` is at most ``eps`` or not finite.

  A zero product (zero weight) keeps the previous vector: normalizing it would
  give 0 and the iteration could never leave 0 once the weight grows. A NaN or
  inf product (a non-finite weight) keeps it too, so the state stays finite.
  No gradient flows here (the iteration is outside the graph), so the rsqrt
  may be inf; the test reads it, not the sum, so that the sum has one use and
  XLA fuses the end of the reduction into the rsqrt.
  """
  inv = jax.lax.rsqrt(sumsq(x, None))
  ok = (inv > 0) & (inv < 1.0 / eps)  # eps < ||x|| < inf; False for NaN
  return jnp.where(ok, apply_scale(x, inv), previous)


def restart_vector(shape: tuple[int, ...], dtype: jnp.dtype) -> Array:
  """A fixed, generic unit vector of ``shape`` (no zero entries, no structure).

  Where a stored vector is zero (a zeroed or hand-made state), power iteration
  restarts from it: from a zero vector it could never leave zero, and the
  kernel would stay unnormalized. Computed elementwise from the index (a
  sine hash), so XLA fuses it where it is used: no constant, no random ops, no
  buffer (operator mode's vectors are example-sized).
  """
  i = jax.lax.broadcasted_iota(jnp.float32, shape, 0) if shape else jnp.zeros(())
  for axis in range(1, len(shape)):
    i = i * shape[axis] + jax.lax.broadcasted_iota(jnp.float32, shape, axis)
  x = jnp.sin(i * 12.9898 + 78.233) * 43758.5453
  x = x - jnp.floor(x) - 0.5
  return (x * jax.lax.rsqrt(jnp.sum(x * x))).astype(dtype)


def start_vector(x: Array, eps: float, restart: bool) -> Array:
  """Where power iteration starts from ``x``.

  With ``restart`` (iterating): ``x`` as it is (the steps normalize it, and a
  zero or non-finite weight keeps it bit for bit), or the restart vector where
  ``||x|| <= eps`` or is not finite. Without
  (evaluation, sigma read from the vectors): ``x / ||x||``, or ``x`` where
  ``||x|| <= eps``, so stored vectors that are not unit give the right sigma.
  The restart vector is elementwise, so XLA fuses the ``where`` into its use.
  """
  if restart:
    inv = jax.lax.rsqrt(sumsq(x, None))
    ok = (inv > 0) & (inv < 1.0 / eps)

    return jnp.where(ok, x, sharded_like(x, restart_vector(x.shape, x.dtype)))
  return normalize_or_keep(x, x, eps)


# Explicit sharding (jax.make_mesh's default axis type) exists in newer JAX only.
_EXPLICIT = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)


def is_explicit(x: Array) -> bool:
  return _EXPLICIT is not None and _EXPLICIT in getattr(
    jax.typeof(x).sharding.mesh, "axis_types", ()
  )


def sharded_like(like: Array, x: Array) -> Array:
  """``x`` resharded as ``like`` where the mesh's axes are explicit (types carry shardings).

  A ``jnp.where`` between them, or ``x`` as the cotangent of ``like``, needs
  them sharded alike. The sharding keeps its mesh (not a bare spec), so this
  works outside ``jax.set_mesh`` too.
  """
  want = jax.typeof(like).sharding
  if not is_explicit(like) or jax.typeof(x).sharding.spec == want.spec:
    return x
  return jax.sharding.reshard(x, want)


def _dot(a: Array, b: Array, like: Array | None = None) -> Array:
  """``a @ b``; under explicit sharding, sharded like ``like`` (replicated if None).

  With explicitly sharded kernels, a product over a sharded axis has no
  inferable output sharding, and ``jnp.where`` needs its branches sharded
  alike: each new vector keeps the sharding of the one it replaces.
  """
  if not (is_explicit(a) or is_explicit(b)):
    return a @ b
  spec = jax.sharding.PartitionSpec() if like is None else jax.typeof(like).sharding.spec
  # A sharding with its mesh, not a bare spec: outside `jax.set_mesh` too.
  mesh = jax.typeof(a if is_explicit(a) else b).sharding.mesh
  return jnp.matmul(a, b, out_sharding=jax.sharding.NamedSharding(mesh, spec))


def _u_w_v(u: Array, w: Array, v: Array) -> Array:
  """``Re(u^H w v)`` computed as ``(u^H w) v``: vectors on the left (see ``power_iteration``)."""
  return jnp.real(_dot(_dot(jnp.conj(u), w, v), v))


@jax.custom_jvp
def _bilinear(w: Array, u: Array, v: Array, value: Array) -> Array:
  """``Re(u^H w v)`` (``u^T w v`` when real), whose value the caller has already computed."""
  del w, u, v
  return value


@_bilinear.defjvp
def _bilinear_jvp(primals, tangents):
  _, u, v, value = primals
  dw = tangents[0]
  # u and v carry no gradient (power iteration is outside the graph).
  return value, _u_w_v(u, dw, v)


def matrix_view(w: Array, axis: Axis = -1, at: str = "spectral_normalize") -> Array:
  """:func:`as_matrix`'s ``(m, n)`` view, with no copy where one can be avoided.

  When the kept axes are the last ones (every Flax layer's default), it is
  ``w.reshape(n, m).T``: a transpose XLA folds into the products (and the
  gradient ``u v^T`` comes out in the kernel's own layout), where ``moveaxis``
  is a kernel-sized transposing copy on every call.
  """
  kept = _checks.check_spectral_weight(w, axis, at)
  if kept == tuple(range(w.ndim - len(kept), w.ndim)):
    return _merge(w, (-1, math.prod(w.shape[w.ndim - len(kept) :])), len(kept), 1).T
  return as_matrix(w, axis)


def power_iteration(
  w: Array,
  u: Array,
  *,
  v: Array | None = None,
  n_steps: int = 1,
  eps: float = 1e-12,
) -> tuple[Array, Array, Array]:
  """Estimates the top singular vectors and value of a matrix by power iteration.

  Each step follows ``torch.nn.utils.spectral_norm``: ``v = normalize(w^H u)``,
  then ``u = normalize(w v)`` (``w^H`` the conjugate transpose, ``w^T`` when
  real). The steps run in a ``jax.lax.fori_loop``, so compile time does not
  grow with ``n_steps``.

  Args:
    w: matrix of shape ``(m, n)``, float or complex.
    u: left vector estimate, shape ``(m,)``.
    v: right vector estimate, shape ``(n,)``; needed when ``n_steps == 0``, and
      kept if ``w^H u`` is zero or not finite (a zero or NaN weight; ``u`` likewise
      for ``w v``). ``u`` and ``v`` need not be unit vectors: ``u`` is normalized
      first, and so is ``v`` when ``n_steps == 0`` (iterating, the first step
      replaces it). A zero ``u`` restarts from a fixed vector when
      ``n_steps > 0``; with ``n_steps == 0`` a zero ``u`` or ``v`` gives
      ``sigma = 0``. A zero ``w`` returns the
      vectors it was given as they are (the restart vector for a zero ``u``,
      or for ``v=None``).
    n_steps: number of iterations (>= 0).
    eps: norms at or below ``eps`` count as zero.

  Returns:
    ``(u, v, sigma)``: unit vectors of shapes ``(m,)`` and ``(n,)`` (the given
    ones, unchanged, where ``w`` is zero or not finite; float32 at
    least; complex for a complex ``w``) carrying no gradient, and the real
    ``sigma = Re(u^H w v)`` (shape ``()``), which is differentiable with respect
    to ``w`` (Miyato et al., 2018).

  Examples:
    >>> import jax.numpy as jnp, flaxnorm
    >>> w = jnp.diag(jnp.array([3.0, 1.0]))
    >>> u, v, sigma = flaxnorm.power_iteration(w, jnp.array([1.0, 1.0]), n_steps=50)
    >>> round(float(sigma), 4)
    3.0

  References:
    Miyato, Kataoka, Koyama & Yoshida, "Spectral Normalization for Generative
    Adversarial Networks", ICLR 2018.
  """
  _checks.check_float_array(w, "w", "power_iteration")
  for argname, x in (("u", u), ("v", v)):
    if x is not None:
      _checks.check_float_array(x, argname, "power_iteration")
  eps = _checks.check_eps(eps, "power_iteration", spectral=True)
  n_steps = _checks.check_count(n_steps, "n_steps", 0, "power_iteration")
  if w.ndim != 2:
    raise ValueError(f"power_iteration: w must be a matrix (m, n), got shape {w.shape}.")
  m, n = w.shape
  if u.shape != (m,):
    raise ValueError(
      f"power_iteration: u must have shape ({m},) for w of shape {w.shape}, got {u.shape}."
    )
  if v is None:
    if n_steps == 0:
      raise ValueError("power_iteration: n_steps=0 needs v.")
  elif v.shape != (n,):
    raise ValueError(
      f"power_iteration: v must have shape ({n},) for w of shape {w.shape}, got {v.shape}."
    )
  _check_vectors_fit(w, u, v)
  return _estimate(w, u, v, n_steps=n_steps, eps=eps)


@functools.partial(jax.jit, static_argnames=("n_steps", "eps"))
def _estimate(
  w: Array, u: Array, v: Array | None, *, n_steps: int, eps: float
) -> tuple[Array, Array, Array]:
  """:func:`power_iteration` on checked arguments. Jitted, so that eager calls
  (an ``init`` or ``apply`` outside ``jit``) compile once per shape instead of
  once per operation, and the loop once instead of once per call."""
  dtype = compute_dtype(w.dtype)
  w32 = w.astype(dtype)
  # Iterating, a zero u restarts (the first step makes v from it); in
  # evaluation both are normalized (stored ones may be scaled), and a zero one
  # gives sigma 0 (an unnormalized kernel).
  u_out = jax.lax.stop_gradient(start_vector(u.astype(dtype), eps, restart=n_steps > 0))
  # Iterating, v is only what a zero W^H u keeps: taken as it is (no reduction on the
  # training path; a missing one is the restart vector, replaced by the first step
  # unless W^H u = 0).
  v_start = restart_vector(w.shape[1:], w.dtype) if v is None else v
  v_out = jax.lax.stop_gradient(v_start.astype(dtype))
  if n_steps:
    w_fixed = jax.lax.stop_gradient(w32)
    u_out, v_out, value = _iterate(w_fixed, u_out, v_out, n_steps=n_steps, eps=eps)
    # The value comes from the loop (no extra pass over W); the gradient is
    # d sigma / dW = u v^T with u, v held fixed (conj(u) v^T in JAX's complex convention).
    sigma = _bilinear(w32, u_out, v_out, value)
  else:
    v_out = start_vector(v_out, eps, restart=False)
    sigma = _u_w_v(u_out, w32, v_out)
  return u_out, v_out, sigma


def _iterate(
  w: Array, u: Array, v: Array, *, n_steps: int, eps: float
) -> tuple[Array, Array, Array]:
  """``n_steps`` power-iteration steps on ``w`` (m, n) from ``u`` (m,), ``v`` (n,).

  Returns the new ``u``, ``v`` and the last step's ``Re(u^H W v)``.
  """

  def step(_, carry):
    u, v, _ = carry
    # Vectors on the left: XLA:CPU runs `W.T @ x` (W from as_matrix's
    # moveaxis) through a slow strided loop, 15-30x slower than `x @ W`.
    # W^H u = conj(conj(u) @ W): two vector conjugations, no conjugated W.
    v = normalize_or_keep(jnp.conj(_dot(jnp.conj(u), w, v)), v, eps)  # W^H u
    wv = _dot(v, w.T, u)  # W v
    u = normalize_or_keep(wv, u, eps)
    return u, v, _vdot(u, wv)  # sigma = Re(u^H W v), from the product just made

  return jax.lax.fori_loop(0, n_steps, step, (u, v, jnp.zeros((), real_dtype(w.dtype))))


def _check_vectors_fit(w: Array, u: Array, v: Array | None) -> None:
  # A complex vector cast to a real w's dtype would lose its imaginary part.
  for name, x in (("u", u), ("v", v)):
    if x is not None and is_complex(x.dtype) and not is_complex(w.dtype):
      raise TypeError(
        f"power_iteration: {name} is {x.dtype} but w is {w.dtype}: complex vectors need a "
        "complex w (a state made for a complex kernel?)."
      )


def spectral_state_init(
  key: Array,
  w: Array,
  *,
  axis: Axis = -1,
  n_steps: int = DEFAULT_N_INIT_ITERATIONS,
  eps: float = 1e-12,
) -> SpectralState:
  """Creates the power-iteration state of a kernel, as PyTorch does, but converged.

  ``u`` and ``v`` start as normalized standard normal vectors (PyTorch's
  start; complex normal for a complex kernel), then ``n_steps`` iterations run
  so that ``sigma`` is accurate from the first training step.

  Args:
    key: a PRNG key.
    w: kernel of any rank >= 2.
    axis: the kept (output) axis or axes, the rows of the matrix view.
    n_steps: iterations to run (>= 0).
    eps: see :func:`power_iteration`.

  Returns:
    A :class:`SpectralState` with ``u`` of shape ``(m,)``, ``v`` of ``(n,)`` and
    ``sigma`` of ``()``, all float32 at least; ``u`` and ``v`` of the kernel's
    complex dtype for a complex kernel, ``sigma`` real. A non-finite ``w``
    keeps ``u`` and ``v`` at their normalized random start and gives a NaN
    ``sigma``: loud where evaluation divides by it (operator mode), and
    replaced by the first finite one in training.

  Examples:
    >>> import jax, jax.numpy as jnp, flaxnorm
    >>> state = flaxnorm.spectral_state_init(jax.random.key(0), jnp.ones((4, 3)))
    >>> round(float(state.sigma), 4)  # the SVD value: sqrt(4 * 3)
    3.4641

  References:
    Miyato, Kataoka, Koyama & Yoshida, "Spectral Normalization for Generative
    Adversarial Networks", ICLR 2018.
  """
  key = _checks.check_key(key, "key", "spectral_state_init")
  mat = matrix_view(w, axis, "spectral_state_init")
  m, n = mat.shape
  dtype = compute_dtype(w.dtype)
  ku, kv = jax.random.split(key)
  u = l2_normalize(jax.random.normal(ku, (m,), dtype), eps=eps)
  v = l2_normalize(jax.random.normal(kv, (n,), dtype), eps=eps)
  u, v, sigma = power_iteration(mat, u, v=v, n_steps=n_steps, eps=eps)
  return SpectralState(u, v, jax.lax.stop_gradient(sigma))


def scale_by_sigma(
  w: Array, sigma: Array, eps: float = 1e-12, *, mode: str = "normalize", target: float = 1.0
) -> Array:
  """Returns ``w * target / sigma`` (``"normalize"``) or ``w * min(1, target / sigma)`` (``"clip"``).

  ``"normalize"`` gives the kernel spectral norm ``target`` (1 by default,
  Miyato et al., 2018); ``"clip"`` only shrinks kernels whose spectral norm
  exceeds ``target``, as in Lipschitz-constrained networks (Gouk et al., 2021).
  In ``"normalize"`` a ``|sigma| <= eps`` leaves ``w`` unchanged: a (near-)zero
  matrix already has a tiny spectral norm, and dividing it by a tiny sigma would
  blow it up, by zero give NaN.

  Args:
    w: kernel of any shape.
    sigma: scalar estimate of ``w``'s spectral norm.
    eps: threshold below which no division happens.
    mode: ``"normalize"`` or ``"clip"``.
    target: the spectral norm to normalize (or clip) to, > 0.

  Returns:
    An array of ``w``'s shape and dtype.

  Examples:
    >>> import jax.numpy as jnp, flaxnorm
    >>> flaxnorm.scale_by_sigma(jnp.full((2,), 2.0), jnp.array(4.0))
    Array([0.5, 0.5], dtype=float32)
    >>> flaxnorm.scale_by_sigma(jnp.full((2,), 2.0), jnp.array(0.5), mode="clip")  # below 1: kept
    Array([2., 2.], dtype=float32)

  References:
    Gouk, Frank, Pfahringer & Cree, "Regularisation of Neural Networks by
    Enforcing Lipschitz Continuity", Machine Learning 110, 2021 (``"clip"``).
  """
  _checks.check_float_array(w, "w", "scale_by_sigma")
  if isinstance(sigma, float | int) and not isinstance(sigma, bool):
    sigma = jnp.asarray(sigma, jnp.float32)  # a Python number
  _checks.check_float_array(sigma, "sigma", "scale_by_sigma", complex_ok=False)
  if jnp.ndim(sigma) != 0:
    raise ValueError(
      f"scale_by_sigma: sigma must be a scalar (the kernel's spectral norm), got shape "
      f"{jnp.shape(sigma)}; use jax.vmap for stacked kernels."
    )
  eps = _checks.check_eps(eps, "scale_by_sigma", spectral=True)
  return apply_scale(w, sigma_scale(sigma, eps, mode=mode, target=target))


def sigma_scale(
  sigma: Array,
  eps: float = 1e-12,
  *,
  mode: str = "normalize",
  target: float = 1.0,
  at: str = "scale_by_sigma",
) -> Array:
  """The scalar factor :func:`scale_by_sigma` multiplies the kernel by (``at``: the caller)."""
  _checks.check_mode(mode, at)
  target = _checks.check_target(target, at)
  sigma = jnp.asarray(sigma)
  if mode == "clip":
    # min(1, target / sigma); at sigma = target the gradient is that of the
    # side jnp.maximum picks. NaN propagates.
    return target / jnp.maximum(sigma, target)
  # |sigma|: a stale state can give sigma < 0, which PyTorch divides by too.
  # A NaN sigma is not small: the kernel becomes NaN, loudly.
  small = jnp.abs(sigma) <= eps
  return jnp.where(small, 1.0, target / jnp.where(small, 1.0, sigma))


def spectral_normalize(
  w: Array,
  u: Array,
  v: Array,
  *,
  sigma: Array | None = None,
  axis: Axis = -1,
  n_steps: int = 1,
  eps: float = 1e-12,
  mode: str = "normalize",
  target: float = 1.0,
) -> tuple[Array, SpectralState]:
  """Divides a kernel by its spectral norm, estimated by power iteration.

  The matrix view is PyTorch's: the kept ``axis`` as rows, the rest as columns.

  Args:
    w: kernel of any rank >= 2, e.g. a Flax ``Conv`` kernel ``(kh, kw, in, out)``.
    u: stored left vector, shape ``(m,)``, ``m`` the size of the kept axes.
    v: stored right vector, shape ``(n,)``, ``n`` the product of the others.
    sigma: stored sigma, shape ``()``, returned as is if the new one is not
      finite; without it the NaN sigma is returned.
    axis: the kept (output) axis or axes: rows of the matrix view.
    n_steps: power iterations to run first; ``0`` (evaluation) runs none:
      ``sigma = u^T W v`` from the stored vectors, normalized first (PyTorch's
      are unit vectors already, so this changes its ``sigma`` by rounding only).
    eps: see :func:`power_iteration` and :func:`scale_by_sigma`.
    mode: ``"normalize"`` (``w * target / sigma``) or ``"clip"``
      (``w * min(1, target / sigma)``).
    target: the spectral norm to normalize (or clip) to, > 0.

  Returns:
    ``(w * target / sigma, SpectralState(u, v, sigma))`` (``w * min(1, target /
    sigma)`` in ``"clip"`` mode): the normalized kernel, with
    ``w``'s shape and dtype and differentiable in ``w`` (through ``sigma`` too),
    and the new state. A non-finite ``w`` gives a NaN kernel and returns the
    stored state unchanged.

  Examples:
    >>> import jax, jax.numpy as jnp, flaxnorm
    >>> w = jnp.array([[6.0, 0.0], [0.0, 2.0]])
    >>> state = flaxnorm.spectral_state_init(jax.random.key(0), w)
    >>> w_sn, state = flaxnorm.spectral_normalize(w, state.u, state.v)
    >>> jnp.round(w_sn, 4)
    Array([[1.    , 0.    ],
           [0.    , 0.3333]], dtype=float32)

  References:
    Miyato, Kataoka, Koyama & Yoshida, "Spectral Normalization for Generative
    Adversarial Networks", ICLR 2018.
  """
  scale, state = spectral_scale(
    w, u, v, sigma=sigma, axis=axis, n_steps=n_steps, eps=eps, mode=mode, target=target
  )
  return apply_scale(w, scale), state


def spectral_scale(
  w: Array,
  u: Array,
  v: Array,
  *,
  sigma: Array | None = None,
  axis: Axis = -1,
  n_steps: int = 1,
  eps: float = 1e-12,
  mode: str = "normalize",
  target: float = 1.0,
) -> tuple[Array, SpectralState]:
  """:func:`spectral_normalize`'s scalar factor (``1 / sigma``) and new state.

  A layer linear in its kernel can apply the factor to its output instead of
  the kernel. Arguments as in :func:`spectral_normalize`.

  Returns:
    ``(scale, state)``: ``scale`` of shape ``()``, differentiable in ``w``.
  """
  _checks.check_mode(mode, "spectral_normalize")
  _checks.check_target(target, "spectral_normalize")
  if sigma is not None and jnp.shape(sigma) != ():
    raise ValueError(
      f"spectral_normalize: sigma must be a scalar (the stored estimate), got shape "
      f"{jnp.shape(sigma)}; use jax.vmap for stacked kernels."
    )
  new_u, new_v, new_sigma = power_iteration(matrix_view(w, axis), u, v=v, n_steps=n_steps, eps=eps)
  # A non-finite weight must not poison the state: u and v keep their old
  # values (normalize_or_keep), sigma too; the NaN still reaches the output.
  old_sigma = new_sigma if sigma is None else jnp.asarray(sigma, new_sigma.dtype)
  state = SpectralState(
    new_u, new_v, jax.lax.stop_gradient(jnp.where(jnp.isfinite(new_sigma), new_sigma, old_sigma))
  )
  scale = sigma_scale(new_sigma, eps, mode=mode, target=target, at="spectral_normalize")
  return scale, state
