"""PyTorch <-> Flax weight layouts: layer kinds, axis permutations, flips, matrix views.

Numpy only: this module knows shapes and axes, not key names (``_torch_keys``)
nor norms (``_torch_convert``). A ``Kind`` says where every PyTorch weight axis
sits in the Flax param; the spectral-norm helpers say which flaxnorm ``axis``
matches PyTorch's matrix view of the weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from flaxnorm import _checks
from flaxnorm._checks import Axis

KINDS = (
  "linear",
  "conv1d",
  "conv2d",
  "conv3d",
  "conv_transpose1d",
  "conv_transpose2d",
  "conv_transpose3d",
  "embedding",
)

# An unnamed layer's kind, from its PyTorch weight's rank (ConvTranspose must be named).
KIND_BY_RANK = {2: "linear", 3: "conv1d", 4: "conv2d", 5: "conv3d"}

View = tuple[int, ...]  # flaxnorm's kept axes (non-negative) for a spectral norm


class Kind(NamedTuple):
  """One layer kind's layouts.

  Attributes:
    name: the kind, one of :data:`KINDS`.
    ndim: the weight's rank.
    param: the Flax param name, ``"kernel"`` or ``"embedding"``.
    perm: Flax axis ``i`` holds PyTorch axis ``perm[i]``.
    flip: ConvTranspose: PyTorch's kernel is Flax's flipped spatially.
    sn_dim: PyTorch's default spectral-norm ``dim``.
    bias_dim: the PyTorch weight axis the bias runs along (``None``: no bias).
    torch_layout: PyTorch's weight layout, for messages, e.g. ``"(out, in)"``.
    flax_layout: the Flax param and its layout, for messages.
  """

  name: str
  ndim: int
  param: str
  perm: tuple[int, ...]
  flip: bool
  sn_dim: int
  bias_dim: int | None
  torch_layout: str
  flax_layout: str


def _conv(name: str, nd: int, transpose: bool) -> Kind:
  k = {1: "k", 2: "kh, kw", 3: "kd, kh, kw"}[nd]
  # PyTorch's output-channel axis: 0 of (out, in/groups, *k), 1 of ConvTranspose's (in, out, *k).
  out = 1 if transpose else 0
  return Kind(
    name=name,
    ndim=nd + 2,
    param="kernel",
    perm=(*range(2, nd + 2), 1 - out, out),  # Flax: (*k, in, out) either way
    flip=transpose,
    sn_dim=out,
    bias_dim=out,
    torch_layout=f"(in, out, {k})" if transpose else f"(out, in/groups, {k})",
    flax_layout=(
      f"nn.ConvTranspose kernel ({k}, in, out), spatially flipped"
      if transpose
      else f"nn.Conv kernel ({k}, in/groups, out)"
    ),
  )


LAYOUTS: dict[str, Kind] = {
  "linear": Kind(
    name="linear",
    ndim=2,
    param="kernel",
    perm=(1, 0),
    flip=False,
    sn_dim=0,
    bias_dim=0,
    torch_layout="(out, in)",
    flax_layout="nn.Dense kernel (in, out)",
  ),
  "conv1d": _conv("conv1d", 1, False),
  "conv2d": _conv("conv2d", 2, False),
  "conv3d": _conv("conv3d", 3, False),
  "conv_transpose1d": _conv("conv_transpose1d", 1, True),
  "conv_transpose2d": _conv("conv_transpose2d", 2, True),
  "conv_transpose3d": _conv("conv_transpose3d", 3, True),
  "embedding": Kind(
    name="embedding",
    ndim=2,
    param="embedding",
    perm=(0, 1),
    flip=False,
    sn_dim=0,
    bias_dim=None,
    torch_layout="(num_embeddings, features)",
    flax_layout="nn.Embed embedding (num_embeddings, features)",
  ),
}


def kind_of(kind: object, where: str) -> Kind:
  """The layouts of ``kind``; raises ``ValueError`` listing :data:`KINDS` if unknown."""
  if not isinstance(kind, str) or kind not in LAYOUTS:
    raise ValueError(f"{where}: unknown kind {kind!r}; expected one of {list(KINDS)}.")
  return LAYOUTS[kind]


def flax_from_torch(x: np.ndarray, k: Kind) -> np.ndarray:
  """PyTorch layout -> Flax layout (``k.torch_layout`` -> ``k.flax_layout``); scalars pass."""
  if x.ndim == 0:
    return x
  x = np.transpose(x, k.perm)
  if k.flip:
    x = np.flip(x, axis=tuple(range(k.ndim - 2)))
  return np.ascontiguousarray(x)


def torch_from_flax(x: np.ndarray, k: Kind) -> np.ndarray:
  """Flax layout -> PyTorch layout: the inverse of :func:`flax_from_torch`."""
  if x.ndim == 0:
    return x
  if k.flip:
    x = np.flip(x, axis=tuple(range(k.ndim - 2)))
  return np.ascontiguousarray(np.transpose(x, np.argsort(k.perm)))


def neg_axis(axes: tuple[int, ...], ndim: int) -> Axis:
  """Kept axes as flaxnorm ``axis``: negative, counted from the end like ``-1``."""
  neg = tuple(a - ndim for a in axes)
  return neg[0] if len(neg) == 1 else neg


def kept_axes(g_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> tuple[int, ...]:
  """Every axis a weight norm with magnitude ``g_shape`` may keep on a ``w_shape`` weight.

  Several fit only when ``g`` is all ones and ``w`` has size 1 on each of
  them (e.g. the one output channel of a ``(3, 1)`` conv): each norm is then
  over the whole tensor, so they compute the same.
  """
  return tuple(
    a
    for a in range(len(w_shape))
    if g_shape == tuple(s if i == a else 1 for i, s in enumerate(w_shape))
  )


def kept_axis(
  g_shape: tuple[int, ...], w_shape: tuple[int, ...], mismatch: Callable[[], ValueError]
) -> int | None:
  """The one axis a weight norm keeps, read from ``g``'s shape.

  Args:
    g_shape: the magnitude's shape: ``()``, or ``w_shape`` with size 1 on every
      axis but the kept one.
    w_shape: the direction's shape (same layout as ``g``).
    mismatch: builds the error raised when ``g_shape`` fits no single kept axis.

  Returns:
    The kept axis (non-negative, in the layout of the shapes; the first of
    :func:`kept_axes` when several fit), or ``None`` for a scalar ``g`` (a
    whole-tensor norm).
  """
  if g_shape == ():
    return None
  fits = kept_axes(g_shape, w_shape)
  if not fits:
    raise mismatch()
  return fits[0]


def settle_weight_norm_axis(
  k: Kind,
  shapes: tuple[tuple[int, ...], tuple[int, ...]],
  axis: Axis,
  torch_layout: bool,
  where: str,
) -> tuple[Axis, Axis] | None:
  """Which flaxnorm ``axis`` a weight norm whose ``g`` fits several axes is converted with.

  ``g`` fits several axes (:func:`kept_axes`) only when they all compute the
  same norm, so the choice only names the axis: ``axis`` when it is one of
  them, else PyTorch's default ``dim=0`` (the output channels of
  Linear/Conv, the input channels of ConvTranspose).

  Args:
    k: the layer kind.
    shapes: ``(g, w)`` shapes, in PyTorch layout if ``torch_layout`` else Flax's.
    axis: the flaxnorm ``axis`` asked for (``None``: not given).
    torch_layout: whether ``shapes`` are PyTorch's (loading) or Flax's (saving).
    where: the caller, for messages.

  Returns:
    ``None`` when ``g`` fits at most one axis (convert with ``axis`` as it
    is); else ``(None, chosen)``: convert without an axis (the result is the
    same for all), and report ``chosen``. An ``axis`` that fits none is left
    to the conversion's own check (``(axis, axis)``).

  Raises:
    ValueError: loading, with no ``axis`` and ``dim=0`` not among the axes.
  """
  fits = kept_axes(*shapes) if shapes[0] != () else ()
  if len(fits) < 2:
    return None
  flax_fits = tuple(k.perm.index(d) for d in fits) if torch_layout else fits
  if axis is not None:
    kept = _checks.normalize_axes(axis, k.ndim, where)
    return (None, neg_axis(kept, k.ndim)) if len(kept) == 1 and kept[0] in flax_fits else None
  default = k.perm.index(0)
  if default in flax_fits or not torch_layout:
    return None, neg_axis((default if default in flax_fits else flax_fits[0],), k.ndim)
  raise ValueError(
    f"{where}: weight norm 'g' {shapes[0]} fits PyTorch dims {list(fits)} of its {k.name} "
    f"weight {shapes[1]} {k.torch_layout} (each of size 1: the same norm), and none is "
    f"PyTorch's default dim=0: pass axis= one of {[neg_axis((a,), k.ndim) for a in flax_fits]} "
    "(the axis the Flax layer is wrapped with)."
  )


def shape_error(where: str, key: str, shape: tuple[int, ...], expected: str, k: Kind) -> ValueError:
  """A ``ValueError`` naming the key, its shape, what was expected and both layouts."""
  return ValueError(
    f"{where}: '{key}' has shape {shape}, which fits no {k.name} layout: expected "
    f"{expected} (PyTorch {k.name} weight {k.torch_layout} -> {k.flax_layout})."
  )


def spectral_dim_of(k: Kind, spectral_dim: object, where: str) -> int:
  """PyTorch's spectral-norm ``dim`` (``None``: its default for ``k``), checked, non-negative."""
  if spectral_dim is None:
    return k.sn_dim
  if isinstance(spectral_dim, bool) or not isinstance(spectral_dim, int):
    raise TypeError(f"{where}: spectral_dim must be an int or None, got {spectral_dim!r}.")
  if not -k.ndim <= spectral_dim < k.ndim:
    raise ValueError(
      f"{where}: spectral_dim={spectral_dim} is out of range for a {k.name} weight "
      f"{k.torch_layout} of {k.ndim} dims."
    )
  return spectral_dim % k.ndim


class SpectralViews(NamedTuple):
  """The two flaxnorm views of PyTorch's spectral-norm matrix ``moveaxis(w, dim, 0).reshape(m, n)``.

  Attributes:
    dim: PyTorch's spectral-norm ``dim`` (non-negative).
    out: flaxnorm's kept axes for the same matrix ``(m, n)``: ``u`` is
      ``(m,)``, ``v`` is ``(n,)`` (the legacy hook's iteration order).
    transposed: the kept axes for its transpose ``(n, m)``: ``u`` is ``(n,)``,
      ``v`` is ``(m,)`` (the parametrization's order).
    m: rows of PyTorch's matrix, the size of ``dim``.
    n: its columns, every other axis.
    ndim: the weight's rank.
  """

  dim: int
  out: View
  transposed: View
  m: int
  n: int
  ndim: int

  def exact(self, style: str) -> View:
    """The view that continues PyTorch's power iteration of ``style`` exactly."""
    return self.transposed if style == "parametrizations" else self.out

  def other(self, view: View) -> View:
    """The view that is not ``view``."""
    return self.out if view == self.transposed else self.transposed

  def fitting(self, u_shape: tuple[int, ...] | None, v_shape: tuple[int, ...] | None) -> list[View]:
    """The views that flaxnorm vectors of these shapes (``None``: absent) belong to."""
    shapes = {self.out: ((self.m,), (self.n,)), self.transposed: ((self.n,), (self.m,))}
    return [view for view, uv in shapes.items() if (u_shape, v_shape) == uv]


def spectral_views(k: Kind, dim: int, flax_shape: tuple[int, ...]) -> SpectralViews:
  """The two views of a ``k`` weight of Flax shape ``flax_shape`` for PyTorch's ``dim``.

  Args:
    k: the layer kind.
    dim: PyTorch's spectral-norm ``dim`` (non-negative, from :func:`spectral_dim_of`).
    flax_shape: the weight's shape in Flax layout (``k.flax_layout``).

  Returns:
    The :class:`SpectralViews`: e.g. for ``linear`` (Flax ``(in, out)``) and
    ``dim=0``, ``out=(1,)`` and ``transposed=(0,)`` with ``m = out``, ``n = in``.
  """
  a = k.perm.index(dim)
  m = flax_shape[a]
  n = math.prod(flax_shape) // m
  return SpectralViews(dim, (a,), tuple(i for i in range(k.ndim) if i != a), m, n, k.ndim)


def pick_view(
  views: SpectralViews,
  u_shape: tuple[int, ...] | None,
  v_shape: tuple[int, ...] | None,
  ambiguous: Callable[[], str],
) -> View | None:
  """The view that flaxnorm vectors ``u``/``v`` of these shapes were made for.

  The one spectral-view matcher of both directions: ``to_torch`` reads a Flax
  layer's view from its state, ``load_torch_state_dict`` the target's.

  Args:
    views: the two candidate views.
    u_shape: ``u``'s shape, or ``None`` when absent.
    v_shape: ``v``'s shape, or ``None`` when absent.
    ambiguous: builds the message raised when both views fit (``m == n``).

  Returns:
    The one fitting view, or ``None`` when neither fits.

  Raises:
    ValueError: both views fit, so the shapes cannot tell.
  """
  fits = views.fitting(u_shape, v_shape)
  if len(fits) > 1:
    raise ValueError(ambiguous())
  return fits[0] if fits else None


def _per_dim(x: Any, name: str, low: int, n: int | None) -> tuple[int, ...]:
  """``x`` (an int, or one per spatial dim) as ``n`` ints ``>= low``, or raises."""
  xs = (x,) * (n or 1) if _checks.is_int(x) else x
  if (
    isinstance(x, (str, bytes))
    or not isinstance(xs, Sequence)
    or not xs
    or not all(_checks.is_int(i) for i in xs)
  ):
    raise TypeError(
      f"conv_transpose_padding: {name} must be an int or a tuple of ints (one per "
      f"spatial dim), got {x!r}."
    )
  xs = tuple(int(i) for i in xs)
  if n is not None and len(xs) != n:
    raise ValueError(
      f"conv_transpose_padding: {name}={x!r} must be an int or one per spatial dim ({n})."
    )
  if any(i < low for i in xs):
    raise ValueError(f"conv_transpose_padding: {name}={x!r} must be >= {low}.")
  return xs


def conv_transpose_padding(
  kernel_size: int | tuple[int, ...],
  padding: int | tuple[int, ...],
  dilation: int | tuple[int, ...],
  output_padding: int | tuple[int, ...],
) -> tuple[tuple[int, int], ...]:
  """``((lo, hi), ...)``: ``lo = dilation * (k - 1) - padding``, ``hi = lo + output_padding``."""
  ks = _per_dim(kernel_size, "kernel_size", 1, None)
  ps = _per_dim(padding, "padding", 0, len(ks))
  ds = _per_dim(dilation, "dilation", 1, len(ks))
  ops = _per_dim(output_padding, "output_padding", 0, len(ks))
  return tuple((d * (k - 1) - p, d * (k - 1) - p + op) for k, p, d, op in zip(ks, ps, ds, ops))
