"""Pure array math for weight norm and spectral norm. No Flax import.

Every face of flaxnorm (Linen, NNX, pytree, PyTorch interop) calls these
functions; no formula is written anywhere else.

Layout conventions:
  * ``axis`` is the *kept* axis (PyTorch's ``dim``): the output-feature axis,
    ``-1`` for Flax kernels (``Dense``: ``(in, out)``, ``Conv``:
    ``(*window, in // groups, out)``), ``0`` for PyTorch weights and for
    ``Embed``'s per-row norm. Weight norm takes its norm over every other axis.
  * Spectral norm views a kernel of any rank as a matrix ``(m, n)`` with the
    kept axes as rows: ``moveaxis(w, axis, 0).reshape(m, -1)``, PyTorch's view,
    so ``u`` has the output size ``m`` and ``v`` the size ``n`` of the rest.

Numerics: norms and power iteration run in (at least) float32 whatever the
param dtype, and a zero weight gives a zero, finite result with finite
gradients.

Complex kernels (``complex64``, ``complex128``): every norm is over ``|x|^2``,
weight norm's ``g`` is real (of the kernel's real dtype: float32 for
complex64), and power iteration uses the conjugate transpose: ``u`` and ``v``
are complex, ``sigma = Re(u^H W v)`` is real. Scales are real throughout, so
one formula serves both.

Names: the functions here take ``n_steps``, the number of iterations *this
call* runs (``0`` is allowed: evaluation from the stored vectors). The faces'
``n_power_iterations`` (per training call, >= 1) and ``n_init_iterations`` (at
init) are two uses of it. :func:`l2_normalize`'s ``axis`` is the axes reduced,
as in ``jnp.linalg.norm``, since it normalizes vectors, not kernels; every
other ``axis`` in ``flaxnorm`` is the axis kept.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from flaxnorm import _checks
from flaxnorm._checks import Axis

Array = jax.Array

DEFAULT_N_INIT_ITERATIONS = 200
"""Power iterations run when the spectral state is created.

For a 1024x1024 Gaussian kernel, PyTorch's 15 start-up iterations leave sigma
1.4-2.4% below its SVD value; 100 leave up to 0.25% and 200 up to 0.21% over six
seeds. They run once, inside a ``fori_loop``, so they add nothing to compile time.
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


def compute_dtype(dtype) -> jnp.dtype:
  # Accumulate in float32 at least: float16 squares overflow past 256.
  # complex64 and complex128 (itemsize 8, 16) are kept.
  dtype = jnp.dtype(dtype)
  return dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


def real_dtype(dtype) -> jnp.dtype:
  """:func:`compute_dtype`'s real part: float32 for complex64, float64 for complex128."""
  return jnp.dtype(jnp.finfo(compute_dtype(dtype)).dtype)


def _is_complex(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.complexfloating)


def wider(a, b) -> jnp.dtype:
  # Explicit, so that strict dtype promotion accepts mixed float widths.
  a, b = jnp.dtype(a), jnp.dtype(b)
  if _is_complex(a) or _is_complex(b):
    # A complex kernel times a real scale: complex, with the wider real part.
    return jnp.dtype(jnp.promote_types(a, b))
  return max(a, b, key=lambda d: d.itemsize)


def _sumsq(x: Array, axes: tuple[int, ...] | None, keepdims: bool = False) -> Array:
  """``sum |x|^2`` over ``axes``, real; ``re^2 + im^2`` for complex (finite gradients at 0)."""
  sq = jnp.square(x.real) + jnp.square(x.imag) if _is_complex(x.dtype) else jnp.square(x)
  return jnp.sum(sq, axis=axes, keepdims=keepdims)


def _vdot(u: Array, x: Array) -> Array:
  """``Re(u^H x)`` (``u^T x`` when real), vectors on the left (see :func:`_dot`)."""
  return jnp.real(_dot(jnp.conj(u), x))


def _inv_norm(x: Array, axes: tuple[int, ...] | None, eps: float) -> Array:
  """``1 / max(||x||, eps)`` over ``axes`` (keepdims), with finite gradients.

  ``x / max(||x||, eps)`` alone gives NaN gradients at ``x = 0``: the derivative
  of ``||x||`` there is 0/0 and the chain rule multiplies it by 0. Clamping the
  sum at ``eps^2`` *before* the ``rsqrt`` keeps it finite: the max passes no
  gradient below the clamp, and a NaN sum stays NaN. (One op, where two
  selects made XLA:CPU run three small fusions per norm.)
  """
  x = x.astype(compute_dtype(x.dtype))
  sumsq = _sumsq(x, axes, keepdims=True)
  return jax.lax.rsqrt(jnp.maximum(sumsq, eps * eps))


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
  kept = _checks.normalize_axes(axis, w.ndim, "weight_norm_decompose")
  w32 = w.astype(compute_dtype(w.dtype))
  if axis is None:
    g = jnp.sqrt(_sumsq(w32, None))
  else:
    g = jnp.sqrt(_sumsq(w32, _reduced_axes(kept, w.ndim), keepdims=True))
  return g, w


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


def apply_scale(w: Array, scale: Array) -> Array:
  """``w * scale`` computed in the wider of the two dtypes, returned in ``w``'s dtype.

  When ``w`` is narrower (bfloat16 with a float32 scale), the product is
  rematerialized in the backward pass (:func:`widened_product`), so that its
  residual is ``w`` itself, not a float32 copy of it.
  """
  dtype = wider(w.dtype, scale.dtype)
  if dtype == w.dtype:
    return w * scale.astype(dtype)
  return widened_product(w, scale, dtype, w.dtype)


@functools.partial(jax.checkpoint, static_argnums=(2, 3))
def widened_product(x: Array, scale: Array, dtype: Any, out_dtype: Any) -> Array:
  """``x * scale`` computed in ``dtype``, returned in ``out_dtype`` (None: ``dtype``).

  The residual of a product for the gradient of ``scale`` is the other
  factor; kept as it is computed here, that would be a ``dtype`` copy of a
  narrower ``x`` (a float32 copy of a bfloat16 kernel or output), live from
  the forward pass to the backward. Recomputed in the backward pass
  (``jax.checkpoint``), the residual is ``x``.
  """
  out = x.astype(dtype) * scale.astype(dtype)
  return out if out_dtype is None else out.astype(out_dtype)


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
  return w.reshape(m, -1)


def normalize_or_keep(x: Array, previous: Array, eps: float) -> Array:
  """``x / ||x||``, or ``previous`` where ``||x||`` is at most ``eps`` or not finite.

  A zero product (zero weight) keeps the previous vector: normalizing it would
  give 0 and the iteration could never leave 0 once the weight grows. A NaN or
  inf product (a non-finite weight) keeps it too, so the state stays finite.
  No gradient flows here (the iteration is outside the graph), so the rsqrt
  may be inf; the test reads it, not the sum, so that the sum has one use and
  XLA fuses the end of the reduction into the rsqrt.
  """
  inv = jax.lax.rsqrt(_sumsq(x, None))
  ok = (inv > 0) & (inv < 1.0 / eps)  # eps < ||x|| < inf; False for NaN
  return jnp.where(ok, apply_scale(x, inv), previous)


# Explicit sharding (jax.make_mesh's default axis type) exists in newer JAX only.
_EXPLICIT = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)


def _is_explicit(x: Array) -> bool:
  return _EXPLICIT is not None and _EXPLICIT in getattr(
    jax.typeof(x).sharding.mesh, "axis_types", ()
  )


def _dot(a: Array, b: Array, like: Array | None = None) -> Array:
  """``a @ b``; under explicit sharding, sharded like ``like`` (replicated if None).

  With explicitly sharded kernels, a product over a sharded axis has no
  inferable output sharding, and ``jnp.where`` needs its branches sharded
  alike: each new vector keeps the sharding of the one it replaces.
  """
  if not (_is_explicit(a) or _is_explicit(b)):
    return a @ b
  spec = jax.sharding.PartitionSpec() if like is None else jax.typeof(like).sharding.spec
  return jnp.matmul(a, b, out_sharding=spec)


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
    return w.reshape(-1, math.prod(w.shape[w.ndim - len(kept) :])).T
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
      for ``w v``).
    n_steps: number of iterations (>= 0).
    eps: norms at or below ``eps`` count as zero.

  Returns:
    ``(u, v, sigma)``: unit vectors of shapes ``(m,)`` and ``(n,)`` (float32 at
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
  eps = _checks.check_eps(eps, "power_iteration")
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
    v_start = jnp.zeros((n,), w.dtype)
  elif v.shape != (n,):
    raise ValueError(
      f"power_iteration: v must have shape ({n},) for w of shape {w.shape}, got {v.shape}."
    )
  else:
    v_start = v

  _check_vectors_fit(w, u, v)
  dtype = compute_dtype(w.dtype)
  w32 = w.astype(dtype)
  w_fixed = jax.lax.stop_gradient(w32)

  def step(_, carry):
    u, v, _ = carry
    # Vectors on the left: XLA:CPU runs `W.T @ x` (W from as_matrix's
    # moveaxis) through a slow strided loop, 15-30x slower than `x @ W`.
    # W^H u = conj(conj(u) @ W): two vector conjugations, no conjugated W.
    v = normalize_or_keep(jnp.conj(_dot(jnp.conj(u), w_fixed, v)), v, eps)  # W^H u
    wv = _dot(v, w_fixed.T, u)  # W v
    u = normalize_or_keep(wv, u, eps)
    return u, v, _vdot(u, wv)  # sigma = Re(u^H W v), from the product just made

  u_out = jax.lax.stop_gradient(u.astype(dtype))
  v_out = jax.lax.stop_gradient(v_start.astype(dtype))
  if n_steps:
    carry = (u_out, v_out, jnp.zeros((), real_dtype(dtype)))
    u_out, v_out, value = jax.lax.fori_loop(0, n_steps, step, carry)
    # The value comes from the loop (no extra pass over W); the gradient is
    # d sigma / dW = u v^T with u, v held fixed (conj(u) v^T in JAX's complex convention).
    sigma = _bilinear(w32, u_out, v_out, value)
  else:
    sigma = _u_w_v(u_out, w32, v_out)
  return u_out, v_out, sigma


def _check_vectors_fit(w: Array, u: Array, v: Array | None) -> None:
  # A complex vector cast to a real w's dtype would lose its imaginary part.
  for name, x in (("u", u), ("v", v)):
    if x is not None and _is_complex(x.dtype) and not _is_complex(w.dtype):
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
    complex dtype for a complex kernel, ``sigma`` real.

  Examples:
    >>> import jax, jax.numpy as jnp, flaxnorm
    >>> state = flaxnorm.spectral_state_init(jax.random.key(0), jnp.ones((4, 3)))
    >>> round(float(state.sigma), 4)  # the SVD value: sqrt(4 * 3)
    3.4641

  References:
    Miyato, Kataoka, Koyama & Yoshida, "Spectral Normalization for Generative
    Adversarial Networks", ICLR 2018.
  """
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
    n_steps: power iterations to run first; ``0`` (evaluation) uses the
      stored vectors as they are, ``sigma = u^T W v``.
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
  new_u, new_v, new_sigma = power_iteration(matrix_view(w, axis), u, v=v, n_steps=n_steps, eps=eps)
  # A non-finite weight must not poison the state: u and v keep their old
  # values (normalize_or_keep), sigma too; the NaN still reaches the output.
  old_sigma = new_sigma if sigma is None else jnp.asarray(sigma, new_sigma.dtype)
  state = SpectralState(
    new_u, new_v, jax.lax.stop_gradient(jnp.where(jnp.isfinite(new_sigma), new_sigma, old_sigma))
  )
  scale = sigma_scale(new_sigma, eps, mode=mode, target=target, at="spectral_normalize")
  return scale, state
