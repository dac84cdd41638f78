"""Certified upper bounds on the spectral norm of Dense and Conv layers, by Gram iteration.

Power iteration's sigma is a *lower* bound of the true spectral norm; a Lipschitz
certificate needs an *upper* bound. The functions here return a float that is
guaranteed (in exact arithmetic, and with a rounding margin in floating point,
see below) to be >= the operator norm of what the layer computes, and that is
tight: within 1% of it for Gaussian kernels at :data:`DEFAULT_GRAM_STEPS`.

Gram iteration: with ``G_0 = W`` and ``G_{t+1} = G_t G_t^H``, the singular values
of ``G_t`` are those of ``W`` raised to the power ``2^t`` (``G_t`` is Hermitian
PSD for ``t >= 1``), so ``sigma_1(W) = sigma_1(G_t)^(1 / 2^t) <=
||G_t||_F^(1 / 2^t)``, and ``||G_t||_F^(1 / 2^t) = (sum_i sigma_i^(2^(t+1)))^(1 /
2^(t+1))`` falls to ``sigma_1`` superlinearly. Each step rescales ``G_t`` by a
power of two, ``G_t = 2^(-f_t) * (G_{t-1} G_{t-1}^H)``, an exact operation, and
keeps the integer exponent ``s_t`` of ``H_t = 2^(s_t) G_t`` (``H_t`` the unscaled
Gram matrix), with ``s_{t+1} = 2 s_t + f_t``; the bound is ``(2^(s_T) ||G_T||_F)^(1
/ 2^T)``, evaluated without overflow as ``2^a * 2^(b / 2^T) * ||G_T||_F^(1 / 2^T)``
where ``s_T = a 2^T + b``. The matrix is first transposed so that the Gram
matrices are ``p x p`` with ``p = min(m, n)``. At the last step the bound also
uses ``sigma_1(G) <= sqrt(||G||_1 ||G||_inf)`` (Schur's test; ``||G||_inf`` for
Hermitian ``G``) when it is below ``||G||_F``: the Frobenius norm is loosest,
``r^(1 / 2^(T+1))``, for ``r`` equal singular values, and there the row sums
are exact for orthogonal and identity-like layers (``G_1 = I``), common in
Lipschitz networks.

Convolutions: a convolution with circular padding over spatial size ``N`` (per
axis) is block-diagonalized by the DFT: its singular values are those of the
``(in, out)`` blocks ``K(w) = sum_x k[x] exp(-2 pi i <w, x> / N)`` over all
frequencies ``w`` (Sedghi et al. 2019), so its norm is ``max_w sigma_1(K(w))``.
Gram iteration runs batched over the blocks, each block rescaled by its own
power of two, and the bound is the max of the per-block bounds (tighter than the
paper's joint rescaling, which bounds the max by a sum over blocks). Blocks run
largest Frobenius norm first, and a block whose bound falls below a lower bound
of another block's sigma (``max(||G_t||_F / sqrt(p), ||G_t c|| / ||c||)`` with
``c`` a column of ``G_t``) stops early: this changes the cost, not the result's
validity, since every block keeps a valid bound of its own. A real kernel's
blocks at ``w`` and ``-w`` are complex conjugates with the same singular values,
so only half the frequencies of the last axis are computed. See
:func:`conv_norm_bound` for zero padding and strides.

Floating point: everything runs in numpy float64 (the certificate runs rarely,
outside training; nothing is jitted). The computed matrices differ from the exact
Gram matrices by rounding, and the bound carries a relative margin for it. A
computed product ``C C^H`` (inner size ``q``) is off by ``E`` with ``||E||_F <=
gamma_q ||C||_F^2`` (``gamma_q = q u / (1 - q u)``, ``u = 2^-53``, for any
summation order), and ``sigma_1(C C^H) >= ||C||_F^2 / p``, so each step changes
``sigma_1`` by a relative ``delta <= p gamma_q`` at most; through the ``1 / 2^t``
roots the steps together change the bound by ``1 / (1 - delta)`` at most. The
power-of-two rescalings are exact, and the final Frobenius (or row-sum) norm,
root and ``exp2`` add a few ``u`` (``(p + 2) u`` for the sums). The margin
used, ``4 (p q + p + q + 16) eps`` (``eps = 2u = 2^-52``: ``3.7e-12`` for 64 x
64, ``9.3e-10`` for 1024 x 1024), covers these with a factor >= 2, complex
products included (their bound is ``sqrt(2) gamma_(q+2)``). For convolutions the blocks are computed by an explicit
DFT (twiddles ``exp(-2 pi i M / P)`` from the exact integer phase ``M``, then one
matrix product over the ``K`` taps); its error ``||K_computed(w) - K(w)||_2 <=
(sqrt(2) K + 21) u ||A||_F`` with ``A = sum_x |k[x]|`` is added as an absolute
term ``2 (K + 16) eps ||A||_F``. Underflow of entries far below the largest one
is absorbed by the same margins. The analysis assumes IEEE float64, BLAS products
without Strassen-like algorithms (OpenBLAS, MKL), and ``exp``, ``exp2``, ``cos``,
``sin`` and ``pow`` within a few ulps (glibc).

References:
  Delattre, Barthelemy, Araujo, Allauzen. Efficient Bound of Lipschitz Constant
  for Convolutional Layers by Gram Iteration. ICML 2023.

  Sedghi, Gupta, Long. The Singular Values of Convolutional Layers. ICLR 2019.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from scipy.linalg import get_blas_funcs  # scipy: a dependency of jax

from flaxnorm import _checks
from flaxnorm._checks import Axis

DEFAULT_GRAM_STEPS = 6
"""Gram steps (squarings) that :func:`matrix_norm_bound` and :func:`conv_norm_bound` run.

Measured bound / sigma_1 (numpy SVD) for Gaussian matrices, 300 draws of shapes
1..64 per side for each of the seeds 0-5 (``numpy.random.default_rng``): at most
1.0054 over 6 x 300 draws with 6 steps (worst (48, 46); per seed 1.0029 to
1.0054), 1.014 with 5, 1.0025 with 7; 1024 x 1024: 1.0036 and 1.0053 (two seeds)
with 6 steps, 1.0007 with 7. Orthogonal matrices and partial isometries are exact
(their Gram matrix is ``I``, bounded by its row sums); the worst case, ``r <
min(m, n)`` equal nonzero singular values with delocalized singular vectors, stays
near ``r^(1 / 2^(n_steps + 1))``: 1.022 for a rank-32 projector in 64 dims at 6
steps. Each step costs one ``p x p x q`` matrix product.
"""

_MAX_GRAM_STEPS = 40  # keeps the integer exponent 2^t * (e + log2 q + 2) below 2^53.
_EPS = float(np.finfo(np.float64).eps)
_CHUNK_BYTES = 32 * 2**20  # complex blocks (and DFT phases) handled per batch of frequencies.
_MAX_FREQ_BYTES = 2 * 2**30  # the per-frequency arrays of conv_norm_bound, all frequencies at once.
_PADDINGS = ("SAME", "SAME_LOWER", "VALID", "CIRCULAR", "CAUSAL")
_HERK_MIN = 16  # complex blocks at least this large use BLAS zherk, one call per block
(_ZHERK,) = get_blas_funcs(("herk",), dtype=np.complex128)


class UnsupportedError(ValueError):
  """What a layer runs but no bound here covers: an option, a size or a stored state.

  A ``ValueError`` for the public functions; ``lipschitz_bound`` reports it as the
  layer's reason (``certified=None``) instead of raising.
  """


def _rel_margin(p: int, q: int) -> float:
  """Relative rounding margin of Gram iteration on ``p x q`` blocks (module docstring)."""
  return 4.0 * (p * q + p + q + 16) * _EPS


def _rescale(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Scales each block by a power of two (exactly) so its largest entry is in [0.5, 1).

  Args:
    g: ``(B, p, q)`` float64 or complex128; the largest entry is the largest
      ``max(|re|, |im|)``.

  Returns:
    The scaled blocks (C-contiguous) and the exponents ``e`` (int64, ``(B,)``)
    with ``g = 2^e * scaled``; a zero block keeps ``e = 0``.
  """
  parts = np.ascontiguousarray(g).view(np.float64)  # complex: (re, im) interleaved
  _, e = np.frexp(np.maximum(parts.max(axis=(1, 2)), -parts.min(axis=(1, 2))))
  e = e.astype(np.int64)
  if e.min() >= -1000:  # 2^-e is a float: multiplying by it is exact (and faster than ldexp)
    scaled = parts * np.ldexp(1.0, -e)[:, None, None]
  else:
    scaled = np.ldexp(parts, -e[:, None, None])
  return scaled.view(g.dtype), e


def _frobenius(g: np.ndarray) -> np.ndarray:
  """``||G||_F`` of each block of a C-contiguous ``(B, p, q)`` array."""
  parts = g.view(np.float64)
  return np.sqrt(np.einsum("bij,bij->b", parts, parts))


def _root(s: np.ndarray, x: np.ndarray, t: int) -> np.ndarray:
  """``(2^s * x)^(1 / 2^t)`` for int64 ``s`` and ``x >= 0``, without overflow."""
  two_t = 2**t
  a, b = np.divmod(s, two_t)  # s = a 2^t + b, 0 <= b < 2^t: b / 2^t is exact.
  return np.ldexp(np.exp2(b / two_t) * x ** (1.0 / two_t), a)


_TINY = np.finfo(np.float64).tiny  # the least normal float64
_SUBNORMAL_STEP = np.finfo(np.float64).smallest_subnormal


def _up_from_subnormal(x: Any) -> Any:
  """``x`` plus 4 subnormal steps where it is subnormal: a bound scaled back there
  rounds to a spacing of 2^-1074, not relatively (a few roundings, each < 1 step)."""
  return np.where((x > 0) & (x < _TINY), x + 4 * _SUBNORMAL_STEP, x)


def _gram(g: np.ndarray) -> np.ndarray:
  """``G G^H`` for each ``p x q`` block of ``g``, conjugated for large complex blocks.

  Large complex blocks use BLAS ``zherk`` (half the flops of a product: one
  triangle, mirrored; measured 2x faster than ``matmul`` on 256 x 256 blocks),
  called as ``A^H A`` on the transposed view to avoid a copy; that gives
  ``conj(G G^H)``, which has the same singular values and is again Hermitian
  PSD, so the iteration and its bound are unchanged. Every entry is one
  length-``q`` dot product either way (the same rounding bound). Real blocks
  use ``matmul`` (numpy's BLAS was faster than scipy's ``dsyrk`` here).
  """
  b, p, _ = g.shape
  if p < _HERK_MIN or not np.iscomplexobj(g):
    return g @ np.conj(np.swapaxes(g, 1, 2))
  out = np.empty((b, p, p), dtype=g.dtype)
  for i in range(b):
    out[i] = _ZHERK(1.0, g[i].T, trans=2)  # upper triangle of conj(g g^H)
  lower = np.tril_indices(p, -1)
  out[:, lower[0], lower[1]] = np.conj(out[:, lower[1], lower[0]])
  return out


def _block_bounds(blocks: np.ndarray, n_steps: int, floor: float = 0.0) -> tuple[np.ndarray, float]:
  """Upper bounds on ``sigma_1`` of each block of ``blocks``, by Gram iteration.

  Args:
    blocks: ``(B, a, b)`` float64 or complex128 array.
    n_steps: Gram steps, ``>= 0`` (``0``: the Frobenius norm).
    floor: a value known to be <= the largest ``sigma_1`` of the caller's
      blocks (from earlier batches); blocks whose bound falls below it, or
      below a lower bound of another block's ``sigma_1``, stop iterating.

  Returns:
    ``(upper, floor)``: ``upper`` (``(B,)`` float64) holds a valid upper bound
    of each block's ``sigma_1`` including the rounding margin (fully iterated
    for the blocks that can hold the max); ``floor`` is the updated lower bound
    of the largest ``sigma_1``.
  """
  if blocks.shape[1] > blocks.shape[2]:
    blocks = np.conj(np.swapaxes(blocks, 1, 2))
  _, p, q = blocks.shape
  grow = 1.0 + _rel_margin(p, q)
  g, s = _rescale(blocks)
  idx = np.arange(blocks.shape[0])
  upper = np.empty(blocks.shape[0])
  for t in range(n_steps + 1):
    if t:
      g, f = _rescale(_gram(g))
      s = 2 * s + f
    fro = _frobenius(g)
    norm = fro
    if t == n_steps:  # Schur's test, last step only: |G| costs a square root per entry
      mag = np.abs(g)
      norm = np.minimum(fro, np.sqrt(mag.sum(axis=1).max(axis=1) * mag.sum(axis=2).max(axis=1)))
    up = _up_from_subnormal(_root(s, norm, t) * grow)
    upper[idx] = up if t == 0 else np.minimum(upper[idx], up)
    if t == n_steps:
      break
    low = fro / math.sqrt(p)  # sigma_1(G) >= ||G||_F / sqrt(rank)
    if t:  # and >= ||G c|| / ||c|| for any c: c = G e_j, j the largest diagonal entry
      col = np.argmax(np.real(np.diagonal(g, axis1=1, axis2=2)), axis=1)
      c = np.take_along_axis(g, col[:, None, None], 2)
      norm_c = np.linalg.norm(c, axis=(1, 2))
      ray = np.linalg.norm(g @ c, axis=(1, 2)) / np.where(norm_c > 0, norm_c, 1.0)
      low = np.maximum(low, ray)
    floor = max(floor, float(_root(s, low, t).max()) / grow)
    keep = up >= floor
    if not keep.any():
      break  # every block is bounded below another block's sigma_1 already
    g, s, idx = g[keep], s[keep], idx[keep]
  return upper, floor


def _check_kernel(w: Any, argname: str, at: str) -> np.ndarray:
  _checks.check_float_array(w, argname, at, complex_ok=False)
  if isinstance(w, Tracer):
    raise TypeError(
      f"{argname} at {at} is traced (under jax.jit, grad or vmap): the bound is computed in "
      "numpy on concrete values; call it outside the transform."
    )
  out = np.asarray(w, dtype=np.float64)
  if not np.all(np.isfinite(out)):
    raise ValueError(f"{argname} at {at} must be finite, got NaN or inf entries.")
  return out


def check_steps(n_steps: Any, at: str, argname: str = "n_steps") -> int:
  """Returns a Gram step count as an int, or raises unless it is an int in ``[1, 40]``."""
  n_steps = _checks.check_count(n_steps, argname, 1, at)
  if n_steps > _MAX_GRAM_STEPS:
    raise ValueError(
      f"{argname} must be <= {_MAX_GRAM_STEPS} at {at}, got {n_steps} (the bound stops "
      "improving in float64 long before)."
    )
  return n_steps


def matrix_norm_bound(w: Any, *, axis: Axis = -1, n_steps: int = DEFAULT_GRAM_STEPS) -> float:
  """Certified upper bound on the spectral norm of a kernel's matrix view.

  The matrix is ``flaxnorm.as_matrix(w, axis)``: the kept ``axis`` (or axes) as
  rows, the rest flattened as columns, so a Dense kernel ``(in, out)`` gives
  ``(out, in)``. For a 2-D matrix ``axis`` does not change ``sigma_1``; it does
  for kernels of rank >= 3. For a Dense layer ``x -> x @ w``, this bounds its
  Lipschitz constant (l2 norm).

  Args:
    w: real float array with at least 2 dims (numpy or JAX; float16,
      bfloat16, float32 or float64), finite.
    axis: the kept (row) axis or axes, as in :func:`flaxnorm.as_matrix`.
    n_steps: Gram steps, 1 to 40; the bound ``||G_T||_F^(1 / 2^T)`` tightens
      superlinearly with them (:data:`DEFAULT_GRAM_STEPS`).

  Returns:
    A Python float ``>= sigma_1`` of the matrix view, exactly (including a
    floating-point margin of ``4 (m n + m + n + 16) * 2^-52`` relative), and
    within 1% of it for Gaussian matrices at the default steps. ``0.0`` for a
    zero matrix.

  Raises:
    TypeError: ``w`` is not a real float array, or ``n_steps`` not an int.
    ValueError: ``w`` has fewer than 2 dims or non-finite entries, ``axis`` is
      out of range or ``None``, or ``n_steps`` is not in ``[1, 40]``.

  Examples:
    >>> import numpy as np
    >>> from flaxnorm._certify import matrix_norm_bound
    >>> w = np.diag([3.0, 1.0])
    >>> bound = matrix_norm_bound(w)
    >>> bound >= 3.0, f"{bound:.9f}"
    (True, '3.000000000')
    >>> w = np.random.default_rng(0).normal(size=(64, 32))
    >>> bool(1.0 <= matrix_norm_bound(w) / np.linalg.svd(w, compute_uv=False)[0] < 1.01)
    True

  References:
    Delattre, Barthelemy, Araujo, Allauzen. Efficient Bound of Lipschitz
    Constant for Convolutional Layers by Gram Iteration. ICML 2023.
  """
  at = "matrix_norm_bound"
  w = _check_kernel(w, "w", at)
  if w.ndim < 2:
    raise ValueError(f"w at {at} must have at least 2 dims, got shape {w.shape}.")
  if axis is None:
    raise ValueError(f"axis at {at} must name the kept (row) axis or axes, got None.")
  kept = _checks.normalize_axes(axis, w.ndim, at)
  n_steps = check_steps(n_steps, at)
  if w.size == 0:
    return 0.0
  with np.errstate(over="ignore"):  # beyond float64: inf, as conv_norm_bound
    upper, _ = _block_bounds(matrix_of(w, kept)[None], n_steps)
  return float(upper[0])


def matrix_of(w: np.ndarray, kept: tuple[int, ...]) -> np.ndarray:
  """``flaxnorm.as_matrix``'s ``(m, n)`` view in numpy: the ``kept`` axes as rows."""
  w = np.moveaxis(w, kept, tuple(range(len(kept))))
  return w.reshape(math.prod(w.shape[: len(kept)]), -1)


def _per_axis(value: Any, d: int, argname: str, at: str) -> tuple[int, ...]:
  items = (value,) * d if _checks.is_int(value) else value
  if (
    not isinstance(items, Sequence)
    or len(items) != d
    or any(not _checks.is_int(v) or v < 1 for v in items)
  ):
    raise ValueError(
      f"{argname} at {at} must be a positive int or a sequence of {d} positive ints "
      f"(one per spatial axis), got {value!r}."
    )
  return tuple(int(v) for v in items)


def _explicit_pads(padding: Any, d: int, at: str) -> list[tuple[int, int]] | None:
  """Flax's int / sequence padding as ``(lo, hi)`` pairs, or ``None`` if not of that form."""
  if _checks.is_int(padding):
    pads = [(int(padding), int(padding))] * d
  elif isinstance(padding, Sequence) and not isinstance(padding, str) and len(padding) == d:
    pads = []
    for p in padding:
      if _checks.is_int(p):
        pads.append((int(p), int(p)))
      elif isinstance(p, Sequence) and len(p) == 2 and all(_checks.is_int(v) for v in p):
        pads.append((int(p[0]), int(p[1])))
      else:
        return None
  else:
    return None
  if any(v < 0 for pair in pads for v in pair):  # Flax crops there: not bounded here
    raise UnsupportedError(
      f"padding at {at} must have non-negative (low, high) pairs, got {padding!r} (negative "
      "padding, which crops the input, is not supported)."
    )
  return pads


def _fft_sizes(
  input_shape: tuple[int, ...],
  window: tuple[int, ...],
  strides: tuple[int, ...],
  padding: Any,
  at: str,
) -> tuple[int, ...]:
  """The circular size ``N`` per axis whose circular-conv norm bounds the layer's norm.

  ``window`` is the dilated window ``(k - 1) d + 1``. See :func:`conv_norm_bound`.
  """
  d = len(input_shape)
  if isinstance(padding, str):
    mode = padding.upper()
    if mode not in _PADDINGS:
      raise UnsupportedError(
        f"padding at {at} must be one of {_PADDINGS}, an int or a sequence of {d} ints or "
        f"(low, high) pairs, got {padding!r}"
        + (" (REFLECT padding is not supported)." if mode == "REFLECT" else ".")
      )
    if mode == "CIRCULAR":
      return input_shape
    if mode == "CAUSAL":
      if d != 1:
        raise ValueError(f"padding='CAUSAL' at {at} needs a 1-D conv, got {d} spatial dims.")
      pads = [(window[0] - 1, 0)]
    elif mode == "VALID":
      pads = [(0, 0)] * d
    else:  # lax's SAME: output size ceil(n / s), the odd pixel high (SAME) or low.
      pads = []
      for n, k, s in zip(input_shape, window, strides):
        total = max((-(-n // s) - 1) * s + k - n, 0)
        small, big = total // 2, total - total // 2
        pads.append((small, big) if mode == "SAME" else (big, small))
  else:
    found = _explicit_pads(padding, d, at)
    if found is None:
      raise ValueError(
        f"padding at {at} must be one of {_PADDINGS}, an int or a sequence of {d} ints or "
        f"(low, high) pairs, got {padding!r}."
      )
    pads = found
  sizes = []
  for i, (n, k, (lo, hi)) in enumerate(zip(input_shape, window, pads)):
    n_out = n + lo + hi - k + 1  # stride-1 outputs
    if n_out < 1:
      raise UnsupportedError(
        f"input_shape at {at} is smaller than the window along spatial axis {i}: size {n} "
        f"padded by ({lo}, {hi}) < dilated window {k} (padding={padding!r}): the layer's "
        "output is empty."
      )
    sizes.append(max(n + lo, n + hi, n_out))
  return tuple(sizes)


def _dft_blocks(
  kmat: np.ndarray,
  taps: np.ndarray,
  freqs: np.ndarray,
  sizes: tuple[int, ...],
) -> np.ndarray:
  """``K(w) = sum_x k[x] exp(-2 pi i sum_j w_j x_j / N_j)`` for each row ``w`` of ``freqs``.

  Args:
    kmat: ``(K, c)`` float64, the kernel with its ``K`` taps flattened.
    taps: ``(K, d)`` int64, each tap's (dilated) position.
    freqs: ``(F, d)`` int64 frequencies.
    sizes: the ``N_j``.

  Returns:
    ``(F, c)`` complex128.
  """
  period = math.prod(sizes)
  phase = np.zeros((freqs.shape[0], taps.shape[0]), dtype=np.int64)
  for j, n in enumerate(sizes):
    phase += (np.outer(freqs[:, j], taps[:, j]) % n) * (period // n)
  angle = (-2.0 * np.pi) * ((phase % period) / period)
  return (np.cos(angle) @ kmat) + 1j * (np.sin(angle) @ kmat)  # both exact: 1j * x, re + i im


def _check_conv_input(kernel: np.ndarray, input_shape: Any, at: str) -> tuple[int, ...]:
  """The spatial input shape as ints, checked against the kernel's ``(*window, in, out)``."""
  d = kernel.ndim - 2
  if not 1 <= d <= 3:
    raise ValueError(
      f"kernel at {at} must have layout (*window, in // groups, out) with 1 to 3 spatial "
      f"dims, got shape {kernel.shape}."
    )
  if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
    raise TypeError(
      f"input_shape at {at} must be a sequence of ints (spatial dims, e.g. (16, 16)), "
      f"got {input_shape!r}."
    )
  if len(input_shape) != d or any(not _checks.is_int(n) or n < 1 for n in input_shape):
    raise ValueError(
      f"input_shape at {at} must be {d} positive ints, one per spatial dim of the kernel of "
      f"shape {kernel.shape} (without batch and channels), got {tuple(input_shape)!r}."
    )
  return tuple(int(n) for n in input_shape)


def _check_fft_size(
  input_shape: tuple[int, ...], sizes: tuple[int, ...], words: int, at: str
) -> None:
  """Raises unless the ``words`` 8-byte values kept per DFT frequency fit :data:`_MAX_FREQ_BYTES`."""
  n_freq = math.prod(sizes[:-1]) * (sizes[-1] // 2 + 1)
  if n_freq * words * 8 > _MAX_FREQ_BYTES:
    raise UnsupportedError(
      f"input_shape at {at} is too large: {input_shape} gives a circular size {sizes} with "
      f"{n_freq} DFT frequencies, whose per-frequency bookkeeping needs "
      f"{n_freq * words * 8 / 2**30:.4g} GiB; the limit is {_MAX_FREQ_BYTES // 2**30} GiB "
      f"of working memory ({_MAX_FREQ_BYTES // (words * 8)} frequencies here: inputs up to "
      f"about {_side(sizes, words)}), besides the blocks' Gram iteration itself."
    )


def _side(sizes: tuple[int, ...], words: int) -> str:
  """The largest cube input (``n x n ...``) within the frequency limit, for the message."""
  n = int((2 * _MAX_FREQ_BYTES / (words * 8)) ** (1 / len(sizes)))
  return " x ".join([str(n)] * len(sizes))


def conv_norm_bound(
  kernel: Any,
  input_shape: Sequence[int],
  *,
  strides: int | Sequence[int] = 1,
  padding: str | int | Sequence[int | tuple[int, int]] = "SAME",
  feature_group_count: int = 1,
  kernel_dilation: int | Sequence[int] = 1,
  n_steps: int = DEFAULT_GRAM_STEPS,
) -> float:
  """Certified upper bound on the operator norm of ``flax.linen.Conv`` with this kernel.

  The bound is on the l2 operator norm (Lipschitz constant) of the map from
  one input ``(*input_shape, in)`` to its output, for ``nn.Conv(out,
  kernel.shape[:-2], strides=..., padding=..., feature_group_count=...,
  kernel_dilation=...)`` without bias (a bias does not change the Lipschitz
  constant); a batch is handled example by example with the same norm.

  How: the norm of a circular convolution over spatial size ``N`` is the max of
  ``sigma_1`` over its DFT blocks (Sedghi et al. 2019), bounded by Gram
  iteration (module docstring). The layer is a restriction of a circular
  convolution, per spatial axis of input size ``n``, dilated window ``k``,
  padding ``(lo, hi)``:

  * ``CIRCULAR``: Flax's wrap-padded conv is the circular conv on ``N = n`` with
    its outputs shifted; with strides, a selection of its outputs.
  * Zero padding (``SAME``, ``SAME_LOWER``, ``VALID``, ``CAUSAL``, explicit
    pairs): put the input at positions ``0..n-1`` of a zero-filled circular
    buffer of size ``N = max(n + lo, n + hi, n + lo + hi - k + 1)``. Output
    ``q`` reads input index ``j = q - lo + x``, ``j`` in ``[-lo, n + hi - 1]``;
    those outside ``[0, n)`` are padding zeros, and modulo ``N`` they still
    land on zeros of the buffer (``N - lo >= n`` and ``n + hi <= N``), while
    the ``n + lo + hi - k + 1`` stride-1 outputs are distinct rows of the
    circular conv. So the layer is ``S C_N P`` with ``P`` an isometric
    embedding and ``S`` a row selection, and ``||layer|| <= ||C_N||``. ``SAME``
    at stride 1 gives ``N = n + k // 2``, ``VALID`` ``N = n`` (the paper's
    ``n + k - 1`` would be valid too, not smaller).
  * Strides ``s``: the layer is then a row selection of the *strided* circular
    conv on ``N`` (``N`` rounded up to a multiple of ``s`` for zero padding),
    which reads the input's ``s`` phases ``x[s a + r]``: it is the stride-1
    circular conv on ``N / s`` of an input with the phases as channels, each
    tap moved to its phase (:func:`_polyphase`), and that conv's DFT blocks
    give its norm exactly. Circular padding with ``s`` not dividing ``n`` keeps
    stride 1 on that axis, whose norm bounds any selection of its outputs.
  * Feature groups make the layer block-diagonal over groups (group ``i``:
    inputs ``[i cin_g, (i + 1) cin_g)``, outputs ``[i cout_g, (i + 1)
    cout_g)``), so its norm is the max over groups; the blocks of every group
    and frequency are bounded together.
  * Kernel dilation places tap ``x`` at ``x * dilation`` (a kernel with zeros
    between the taps, of window ``(k - 1) d + 1``).

  Tightness, measured (bound / norm of the layer's dense Jacobian; 400
  Gaussian kernels, windows 1 to 3, 1-D and 2-D, spatial 3 to 16, channels 1
  to 8, default steps): circular stride 1: 1.0 to 1.00005 (the same operator:
  Gram's slack only); windows > 1 at stride 1: SAME 1.0001 to 1.32 (median
  1.022), VALID 1.001 to 2.2 (median 1.03; worst when the output is a pixel or
  two). Stride 2 (400 more draws, float64 Jacobians): circular with even ``n``
  1.0 to 1.00001 (the same operator), with odd ``n`` 1.0 to 1.43 (median
  1.08: stride 1's bound on that axis), SAME and VALID 1.0 to 1.29 (median
  1.0); 1.03 to 2.05 (median 1.24 to 1.37) before the phases were read. 1x1
  kernels are tight as for Dense. The zero-padding gap shrinks as the input
  grows: for 3x3 2->2 kernels, SAME 1.05-1.22 on 4x4, 1.005-1.02 on 16x16,
  1.002-1.007 on 24x24 (stride 2: 1.007-1.02 on 16x16, 1.002-1.009 on 24x24).

  Args:
    kernel: real float array in Flax's layout ``(*window, in // groups, out)``,
      1 to 3 spatial dims, finite.
    input_shape: the spatial shape of one input, without batch and channels,
      e.g. ``(16, 16)``; one positive int per window dim.
    strides: an int or one int per spatial dim, >= 1.
    padding: ``"SAME"``, ``"SAME_LOWER"``, ``"VALID"``, ``"CIRCULAR"``,
      ``"CAUSAL"`` (1-D), an int, or a sequence of ints or ``(low, high)``
      pairs (non-negative), as in ``flax.linen.Conv``; numpy ints count as
      ints, bools do not.
    feature_group_count: an int >= 1 that divides ``out``.
    kernel_dilation: an int or one int per spatial dim, >= 1.
    n_steps: Gram steps, 1 to 40.

  Returns:
    A Python float ``>=`` the layer's operator norm (including floating-point
    margins, module docstring).

  Raises:
    TypeError: ``kernel`` is not a real float array, or ``n_steps`` or
      ``feature_group_count`` not an int, or ``input_shape`` not a sequence.
    ValueError: ``input_shape`` does not have ``kernel.ndim - 2`` positive
      entries, or is so large that the per-frequency arrays (``d + 2 groups +
      4`` floats each, over about ``prod(N) / 2`` frequencies) need more than
      2 GiB, the (padded) input is smaller than the dilated window (e.g.
      ``VALID``), an unknown ``padding`` (bools are not ints here), bad ``strides`` or
      ``kernel_dilation``, ``feature_group_count`` does not divide ``out``, or
      ``n_steps`` not in ``[1, 40]``.

  Examples:
    >>> import numpy as np
    >>> from flaxnorm._certify import conv_norm_bound
    >>> identity = np.zeros((3, 3, 4, 4))
    >>> identity[1, 1] = np.eye(4)  # a 3x3 conv that copies its input
    >>> f"{conv_norm_bound(identity, (8, 8)):.9f}"
    '1.000000000'
    >>> diff = np.array([1.0, -1.0]).reshape(2, 1, 1)  # x[i] - x[i + 1]: norm 2 (circular, even n)
    >>> f"{conv_norm_bound(diff, (8,), padding='CIRCULAR'):.9f}"
    '2.000000000'
    >>> kernel = np.random.default_rng(0).normal(size=(3, 3, 4, 8))
    >>> # SAME on 8 x 8 is a restriction of the circular conv on 9 x 9 (see above):
    >>> conv_norm_bound(kernel, (8, 8)) == conv_norm_bound(kernel, (9, 9), padding="CIRCULAR")
    True

  References:
    Delattre, Barthelemy, Araujo, Allauzen. Efficient Bound of Lipschitz
    Constant for Convolutional Layers by Gram Iteration. ICML 2023.

    Sedghi, Gupta, Long. The Singular Values of Convolutional Layers. ICLR 2019.
  """
  at = "conv_norm_bound"
  kernel = _check_kernel(kernel, "kernel", at)
  d = kernel.ndim - 2
  input_shape = _check_conv_input(kernel, input_shape, at)
  strides = _per_axis(strides, d, "strides", at)
  dilation = _per_axis(kernel_dilation, d, "kernel_dilation", at)
  groups = _checks.check_count(feature_group_count, "feature_group_count", 1, at)
  cout = kernel.shape[-1]
  if cout % groups:
    raise ValueError(
      f"feature_group_count={groups} at {at} must divide the kernel's out features {cout}."
    )
  n_steps = check_steps(n_steps, at)
  window = kernel.shape[:d]
  dilated = tuple((k - 1) * r + 1 for k, r in zip(window, dilation))
  sizes = _fft_sizes(input_shape, dilated, strides, padding, at)
  if kernel.size == 0:
    return 0.0
  if any(s > 1 for s in strides):
    circular = isinstance(padding, str) and padding.upper() == "CIRCULAR"
    kernel, sizes = _polyphase(kernel, dilation, strides, sizes, circular)
    dilation = (1,) * d
  _check_fft_size(input_shape, sizes, d + 2 * groups + 4, at)
  # Scaled by a power of two (exact) to a largest entry in [0.5, 1), the DFT's sums of K
  # taps cannot overflow; the bound scales back exactly, to inf when the norm is beyond
  # float64 (1e308 entries made inf blocks, then inf - inf = NaN).
  _, e = np.frexp(np.abs(kernel).max())
  scaled = _circular_bound(np.ldexp(kernel, -e), dilation, sizes, groups, n_steps)
  with np.errstate(over="ignore"):
    return float(_up_from_subnormal(np.ldexp(scaled, e)))


def dilated_conv_norm_bound(
  kernel: np.ndarray,
  input_shape: Sequence[int],
  output_shape: Sequence[int],
  *,
  strides: Sequence[int],
  padding: Sequence[tuple[int, int]],
  input_dilation: Sequence[int],
  kernel_dilation: Sequence[int],
  feature_group_count: int,
  n_steps: int = DEFAULT_GRAM_STEPS,
) -> float:
  """Certified upper bound on the norm of ``lax.conv_general_dilated`` with this kernel.

  :func:`conv_norm_bound` after two rewrites, per spatial axis: negative
  padding crops the input (a row selection of it, so the bound of the conv
  on the cropped size holds); an input dilation ``d`` (a transposed
  convolution) at stride 1 makes output ``d a + φ`` a stride-1 convolution in
  ``a`` of the undilated input (:func:`_input_phases`), the ``d`` phases ``φ``
  side by side as output channels: the same operator, whose norm
  :func:`conv_norm_bound` then bounds tightly. At a stride above 1 the
  dilated input is bounded instead (zeros between its elements embed it
  isometrically: ``√s`` looser for a kernel that repeats each input ``s`` times).

  Args:
    kernel: ``(*window, in // groups, out)``, real, finite.
    input_shape: the spatial sizes of one input.
    output_shape: the spatial sizes of one output.
    strides: per spatial axis (``window_strides``).
    padding: ``(low, high)`` per spatial axis, negative to crop.
    input_dilation: per axis (``lhs_dilation``).
    kernel_dilation: per axis (``rhs_dilation``).
    feature_group_count: as in ``lax.conv_general_dilated``.
    n_steps: Gram steps, 1 to 40.

  Returns:
    A float ``>=`` the operator's norm on one example.

  Raises:
    TypeError, ValueError: what :func:`conv_norm_bound` raises for these.

  Examples:
    >>> import numpy as np
    >>> from flaxnorm._certify import dilated_conv_norm_bound
    >>> ones = np.ones((4, 1, 1))  # a transposed conv copying each input 4 times: norm 2
    >>> bound = dilated_conv_norm_bound(
    ...   ones, (16,), (64,), strides=(1,), padding=((3, 3),), input_dilation=(4,),
    ...   kernel_dilation=(1,), feature_group_count=1,
    ... )
    >>> f"{bound:.6f}"
    '2.000000'
  """
  sizes, pads, strides_, dilation = [], [], list(strides), list(kernel_dilation)
  for i, (n, q, d, (lo, hi)) in enumerate(zip(input_shape, output_shape, input_dilation, padding)):
    if d > 1 and strides[i] == 1:
      kernel, pad = _input_phases(kernel, i, d, dilation[i], lo, n, q, feature_group_count)
      sizes.append(n)
      pads.append(pad)
      dilation[i] = 1
    else:  # zeros between the elements embed the input; negative padding crops it
      sizes.append((n - 1) * d + 1 + min(lo, 0) + min(hi, 0))
      pads.append((max(lo, 0), max(hi, 0)))
  if kernel.size == 0 or min(sizes, default=1) < 1:  # no tap reads an input, or all cropped
    return 0.0
  return conv_norm_bound(
    kernel,
    sizes,
    strides=strides_,
    padding=pads,
    feature_group_count=feature_group_count,
    kernel_dilation=dilation,
    n_steps=n_steps,
  )


def _input_phases(
  kernel: np.ndarray, axis: int, d: int, r: int, lo: int, n: int, q: int, groups: int
) -> tuple[np.ndarray, tuple[int, int]]:
  """Axis ``axis`` of a convolution with input dilation ``d`` (stride 1) rewritten.

  Output ``d a + φ`` reads dilated position ``d a + φ + x r - lo`` at tap ``x``:
  an input element exactly when ``d`` divides ``φ + x r - lo``, then element ``a
  + o`` with ``o = (φ + x r - lo) / d``. So phase ``φ`` is a stride-1 convolution
  in ``a`` whose tap ``x`` sits at offset ``o``; the phases become output
  channels (``g·d·cout_g + φ·cout_g + c``, group ``g`` kept contiguous), and
  the padding ``(-min(o, 0), ...)`` gives at least the ``⌈q / d⌉`` outputs
  every phase needs (more outputs are more rows: the bound still holds).

  Returns:
    ``(kernel', (low, high))``: ``kernel'`` with a window of the offsets' span
    on ``axis`` (an empty one where no tap reads an input) and ``d`` times the
    output channels.
  """
  taps = [
    (phi, x, (phi + x * r - lo) // d)
    for phi in range(d)
    for x in range(kernel.shape[axis])
    if (phi + x * r - lo) % d == 0
  ]
  first = min([0, *(o for *_, o in taps)])
  width = max([first - 1, *(o for *_, o in taps)]) - first + 1
  src = np.moveaxis(kernel.reshape(*kernel.shape[:-1], groups, -1), axis, 0)
  out = np.zeros((width, *src.shape[1:-1], d, src.shape[-1]), kernel.dtype)
  for phi, x, o in taps:
    out[o - first, ..., phi, :] = src[x]
  out = np.moveaxis(out, 0, axis)
  high = max(0, -(-q // d) + width - 1 - n + first)
  return out.reshape(*out.shape[:-3], -1), (-first, high)


def _polyphase(
  kernel: np.ndarray,
  dilation: tuple[int, ...],
  strides: tuple[int, ...],
  sizes: tuple[int, ...],
  circular: bool,
) -> tuple[np.ndarray, tuple[int, ...]]:
  """A stride-1 undilated kernel, and its circular sizes, for a strided conv: the same norm.

  Along an axis of stride ``s`` whose circular size ``N`` is a multiple of
  ``s`` (zero padding: ``N`` rounded up to one, the same restriction
  argument), the strided circular conv reads ``s`` phases of its input
  (positions ``s a + r``): it is the stride-1 circular conv on ``N / s`` of an
  input with the phases as channels, its tap at (dilated) position ``p`` moved
  to ``p // s`` and phase ``p % s``. An axis whose ``N`` cannot be rounded
  (circular padding with ``s`` not dividing ``n``) keeps stride 1: its strided
  outputs are a row selection, bounded by the stride-1 conv's norm.

  Args:
    kernel: ``(*window, cin, cout)``.
    dilation: per axis.
    strides: per axis.
    sizes: the circular sizes ``N`` (:func:`_fft_sizes`).
    circular: whether ``N`` is the input size itself (``CIRCULAR`` padding).

  Returns:
    ``(kernel', sizes')``: ``kernel'`` of shape ``(*window', phases * cin, cout)``
    with ``phases`` the product of the strides used, input channel ``r * cin +
    c`` for phase ``r``; ``sizes'`` the ``N / s``.
  """
  d = kernel.ndim - 2
  used = tuple(s if s > 1 and not (circular and n % s) else 1 for n, s in zip(sizes, strides))
  positions = [np.arange(k) * r for k, r in zip(kernel.shape[:d], dilation)]
  window = tuple(int(p[-1]) // s + 1 for p, s in zip(positions, used))
  cin, cout = kernel.shape[-2:]
  out = np.zeros((*window, math.prod(used), cin, cout), kernel.dtype)
  for tap in np.ndindex(*kernel.shape[:d]):
    at = [int(positions[j][i]) for j, i in enumerate(tap)]
    phase = np.ravel_multi_index([p % s for p, s in zip(at, used)], used)
    out[(*[p // s for p, s in zip(at, used)], phase)] = kernel[tap]
  return out.reshape(*window, -1, cout), tuple(-(-n // s) for n, s in zip(sizes, used))


def _circular_bound(
  kernel: np.ndarray,
  dilation: tuple[int, ...],
  sizes: tuple[int, ...],
  groups: int,
  n_steps: int,
) -> float:
  """:func:`conv_norm_bound` for a kernel whose DFT sums are finite: the circular conv's."""
  d = kernel.ndim - 2
  window, (cin_g, cout) = kernel.shape[:d], kernel.shape[-2:]
  kmat = kernel.reshape(-1, cin_g * cout)
  taps = np.indices(window).reshape(d, -1).T * np.asarray(dilation)
  half = (*sizes[:-1], sizes[-1] // 2 + 1)  # w and -w: conjugate blocks
  freqs = np.indices(half).reshape(d, -1).T
  cout_g = cout // groups

  def blocks(rows: np.ndarray) -> np.ndarray:
    out = _dft_blocks(kmat, taps, freqs[rows], sizes)
    out = out.reshape(len(rows), cin_g, groups, cout_g).transpose(0, 2, 1, 3)
    return out.reshape(len(rows) * groups, cin_g, cout_g)

  chunk = max(1, _CHUNK_BYTES // (16 * (cin_g * cout + 2 * kmat.shape[0])))
  n_freq = freqs.shape[0]
  # Pass 1: Frobenius bounds of every block; pass 2: Gram steps, largest first.
  upper = np.concatenate(
    [
      _block_bounds(blocks(np.arange(i, min(i + chunk, n_freq))), 0)[0]
      for i in range(0, n_freq, chunk)
    ]
  ).reshape(n_freq, groups)
  order = np.argsort(-upper.max(axis=1), kind="stable")
  floor = 0.0
  for i in range(0, n_freq, chunk):
    rows = order[i : i + chunk]
    rows = rows[upper[rows].max(axis=1) >= floor]
    if rows.size == 0:
      break  # sorted: every later block is bounded below the floor already
    found, floor = _block_bounds(blocks(rows), n_steps, floor)
    upper[rows] = np.minimum(upper[rows], found.reshape(len(rows), groups))
  taps_abs = np.abs(kernel).reshape(-1, cin_g * cout).sum(axis=0)
  dft_error = 2.0 * (kmat.shape[0] + 16) * _EPS * float(np.sqrt(np.sum(taps_abs**2)))
  return float(upper.max()) + dft_error


# ---------------------------------------------------------------- a layer's scale in evaluation
#
# A spectrally normalized layer multiplies its kernel by ``scale = target / sigma`` (or
# ``target / max(sigma, target)`` with "clip"), and a certificate needs the largest scale the
# layer can use, rounding included: the computed sigma of a float64 layer recomputed in float32
# was off by 4e-5 (cancellation in ``u^T W v``), where the certificate allowed 1e-6. So the
# functions below bound the layer's own computation in its own dtype (unit roundoff ``r``),
# with a margin from the classic dot-product bound (Higham, "Accuracy and Stability of
# Numerical Algorithms", 2002, Sec. 3.1): a sum of ``k`` products computed in any order, with
# or without FMA, is off by at most ``gamma_k sum |terms|``, ``gamma_k = k r / (1 - k r)``.
# Underflow (gradual or flushed to zero, inputs or results) adds at most the smallest normal
# ``tiny`` per product. The dtype's products are assumed to run at its full precision (CPU;
# on GPU/TPU with ``jax_default_matmul_precision="highest"``, not TF32 or bfloat16 passes).


def _roundoff(dtype: Any) -> tuple[float, float, float]:
  """Unit roundoff, smallest normal and largest finite value of a float dtype."""
  info = jnp.finfo(dtype)
  return float(info.eps) / 2, float(info.tiny), float(info.max)


def _gamma(k: int, unit: float) -> float:
  """``gamma_k``: the relative error bound of a sum of ``k`` products (comment above)."""
  if 2 * k * unit >= 1:
    raise UnsupportedError(f"a sum of {k} products in this dtype has no useful error bound")
  return k * unit / (1 - k * unit)


def _stored_unit(x: np.ndarray, dtype: Any, eps: float, name: str) -> tuple[float, float]:
  """How evaluation normalizes a stored power-iteration vector, as ``(norm, alpha)``.

  ``_power.start_vector(x, eps, restart=False)`` computes in ``dtype``
  ``x * rsqrt(sum x^2)`` when that rsqrt is in ``(0, 1 / eps)``, else keeps ``x``.
  Either way entry ``i`` comes out as ``x_i / norm * (1 + theta_i)`` with
  ``|theta_i| <= alpha``: ``norm = ||x||`` when normalized (``alpha`` from the sum
  of squares' ``gamma_k``, underflow, the rsqrt's error, at most 16 ulps, and the
  product), ``(1, 0)`` when kept (exactly ``x``).

  Args:
    x: the vector as the layer casts it to ``dtype``, held in float64 (exact).
    dtype: the layer's compute dtype.
    eps: the layer's ``eps``.
    name: ``"u"`` or ``"v"``, for the message.

  Raises:
    UnsupportedError: rounding could take either branch.
  """
  unit, tiny, big = _roundoff(dtype)
  s = float(np.sum(np.square(x)))
  slack = _gamma(x.size, unit) * s + 2 * x.size * tiny + 4 * x.size * _EPS * s
  s_lo, s_hi = (s - slack, s + slack) if math.isfinite(s) else (math.inf, math.inf)
  rsqrt_err = 16 * unit
  inv_lo = (1 - rsqrt_err) / math.sqrt(s_hi) if s_hi > 0 else math.inf
  inv_hi = (1 + rsqrt_err) / math.sqrt(s_lo) if s_lo > 0 else math.inf
  limit = ((1 - 2 * unit) / eps, (1 + 2 * unit) / eps)  # 1 / eps rounded to dtype
  if s_hi * (1 + unit) < big and inv_hi < min(limit[0], big) and slack < s / 2:
    alpha = (1 + rsqrt_err) * (1 + unit) / math.sqrt(1 - slack / s) - 1
    return math.sqrt(s), alpha
  if s_lo * (1 - unit) > big or inv_lo > limit[1]:  # sum x^2 overflows, or ||x|| <= eps
    return 1.0, 0.0
  raise UnsupportedError(
    f"the stored {name} has norm {math.sqrt(s):.6g}, at the edge of eps={eps!r} or of the "
    f"{np.dtype(dtype).name} range: whether the layer normalizes it depends on rounding"
  )


def eval_sigma_range(
  mat: np.ndarray, u: Any, v: Any, eps: float, dtype: Any
) -> tuple[float, float]:
  """Bounds ``[lo, hi]`` on the sigma a kernel-mode layer computes in evaluation.

  The layer (``_power.power_iteration`` with ``n_steps=0``) computes in ``dtype``
  ``sigma = (u'^T W) v'`` with ``u'``, ``v'`` the stored vectors normalized as in
  :func:`_stored_unit`. With ``S = sum u_i W_ij v_j`` and ``A = sum |u_i W_ij
  v_j|`` (computed here in float64), the exact ``u'^T W v'`` is within
  ``((1 + a_u)(1 + a_v) - 1) A / (n_u n_v)`` of ``S / (n_u n_v)``, and the
  layer's rounding adds ``gamma_(m+n)`` times its own ``sum |terms|``; float64's
  own rounding here is covered by ``8 (m + n + 16) eps_64`` more.

  Args:
    mat: the kernel's ``(m, n)`` matrix view in float64 (exactly the layer's values).
    u, v: the stored vectors, shapes ``(m,)`` and ``(n,)``.
    eps: the layer's ``eps``.
    dtype: the layer's compute dtype (``flaxnorm._math.compute_dtype`` of the kernel's).

  Raises:
    UnsupportedError: a vector of another size or not finite in ``dtype``, a branch
      that depends on rounding, or a product that may overflow ``dtype``.
  """
  unit, tiny, big = _roundoff(dtype)
  m, n = mat.shape
  x = [np.asarray(a).astype(dtype).astype(np.float64).reshape(-1) for a in (u, v)]
  if x[0].size != m or x[1].size != n or not all(np.isfinite(a).all() for a in x):
    raise UnsupportedError(
      f"the stored vectors have {x[0].size} and {x[1].size} entries, for a ({m}, {n}) kernel "
      f"view, or are not finite in {np.dtype(dtype).name}: the layer's sigma has no bound"
    )
  (n_u, a_u), (n_v, a_v) = (_stored_unit(a, dtype, eps, k) for a, k in zip(x, "uv"))
  mag = [np.abs(a) for a in x]
  w_abs = np.abs(mat)
  grow = (1 + a_u) * (1 + a_v) * (1 + _gamma(m + n, unit))
  total = float(mag[0] @ w_abs @ mag[1]) / (n_u * n_v)
  peak = max(np.max(mag[0] @ w_abs, initial=0) / n_u, np.max(w_abs @ mag[1], initial=0) / n_v)
  big_u, big_v = (float(a.max(initial=0)) / k * 2 + tiny for a, k in zip(mag, (n_u, n_v)))
  floor = 2 * tiny * (m * n + m + n) * (1 + float(w_abs.max(initial=0))) * (1 + big_u) * (1 + big_v)
  if not 4 * grow * max(total, peak) + floor < big:  # also catches NaN
    raise UnsupportedError(
      f"the layer's sigma may overflow {np.dtype(dtype).name}: its bound is not certified"
    )
  center = float(x[0] @ mat @ x[1]) / (n_u * n_v)
  half = (grow - 1 + 8 * (m + n + 16) * _EPS) * total * (1 + 2.0**-40) + floor
  return center - half, center + half


def scale_bound(lo: float, hi: float, dtype: Any, *, eps: float, mode: str, target: float) -> float:
  """The largest ``|scale|`` ``_power.sigma_scale`` computes in ``dtype``, ``lo <= sigma <= hi``.

  ``"normalize"``: ``1`` where ``|sigma| <= eps``, else ``target / sigma``;
  ``"clip"``: ``target / max(sigma, target)``. ``target`` and ``eps`` are rounded
  to ``dtype`` (or flushed, within ``tiny``), and the division rounds once: a
  relative ``(1 + 4 r)^2`` covers those and this function's float64 arithmetic.
  ``inf`` where the scale has no finite bound.

  Raises:
    UnsupportedError: ``lo`` or ``hi`` is not finite (the layer's output is NaN).
  """
  if not (math.isfinite(lo) and math.isfinite(hi)):
    raise UnsupportedError(f"the layer's sigma is not finite ({lo}, {hi})")
  unit, tiny, _ = _roundoff(dtype)
  up = (1 + 4 * unit) ** 2 * target
  if mode == "clip":  # largest at the smallest sigma
    low = max(lo, target * (1 - 2 * unit) - tiny)
    return up / low if low > 0 else math.inf
  near = 0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi))  # the smallest |sigma|
  small = (eps * (1 - 2 * unit) - tiny, eps * (1 + 2 * unit) + tiny)  # eps in dtype
  out = 1.0 if near <= small[1] else 0.0  # |sigma| <= eps: the kernel as it is
  if max(abs(lo), abs(hi)) > small[0]:  # else target / sigma, largest at the smallest |sigma|
    low = max(near, small[0])
    out = max(out, up / low if low > 0 else math.inf)
  return out
