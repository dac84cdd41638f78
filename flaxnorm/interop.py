"""PyTorch checkpoint interop: weight-normed and spectral-normed layers, both ways.

PyTorch has written normalized weights under two key styles, and both are read
and written here (keys relative to the layer)::

  plain                      weight, bias
  weight norm, legacy        weight_g, weight_v                     (torch.nn.utils.weight_norm)
  weight norm, new           parametrizations.weight.original0 (g), .original1 (v)
                                                  (torch.nn.utils.parametrizations.weight_norm)
  spectral norm, legacy      weight_orig, weight_u, weight_v        (torch.nn.utils.spectral_norm)
  spectral norm, new         parametrizations.weight.original, parametrizations.weight.0._u,
                             parametrizations.weight.0._v
                                                  (torch.nn.utils.parametrizations.spectral_norm)

Layouts (``kind`` -> PyTorch weight -> Flax param)::

  linear            (out, in)                  nn.Dense kernel (in, out)
  conv1d/2d/3d      (out, in/groups, *k)       nn.Conv kernel (*k, in/groups, out)
  conv_transpose    (in, out, *k)              nn.ConvTranspose kernel (*k, in, out), spatially
  1d/2d/3d                                     flipped (Flax's default transpose_kernel=False;
                                               padding from conv_transpose_padding; groups=1:
                                               nn.ConvTranspose has no feature groups)
  embedding         (num, features)            nn.Embed embedding (num, features)

Which flaxnorm wrapping and ``axis`` reproduce the PyTorch layer is part of the
checkpoint, so :func:`from_torch` returns it (:class:`TorchLayer`), and
:func:`load_torch_state_dict` checks it against the Flax model's variables:

* Weight norm keeps PyTorch's ``dim``, read from ``g``'s shape: ``dim=0`` is the
  output axis for Linear/Conv (Flax ``axis=-1``) but the **input**-channel axis
  for ConvTranspose (Flax ``axis=-2``); ``dim=None`` is ``axis=None``.
* Spectral norm: PyTorch's two implementations run the power iteration in
  opposite orders. The legacy hook computes ``v = normalize(W^T u)`` then
  ``u = normalize(W v)``, as flaxnorm does, so it maps to the output axis (Flax
  ``axis=-1``). The parametrization computes ``u = normalize(W v)`` first; that
  is flaxnorm's iteration on the transposed matrix view, i.e. every axis but the
  output one (``axis=-2`` for Dense, ``(-3, -2)`` for a 1-D conv), with
  flaxnorm's ``u``/``v`` holding PyTorch's ``_v``/``_u``. With these axes a
  converted model continues the power iteration exactly where PyTorch left it.
  The other axis also loads (pass ``axis=``): evaluation is identical, but
  training steps then iterate in flaxnorm's order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from flaxnorm import _checks, _math
from flaxnorm import linen as _linen
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
STYLES = ("parametrizations", "legacy")

_P = "parametrizations.weight."


class _Kind(NamedTuple):
  name: str
  ndim: int
  param: str  # the Flax param name
  perm: tuple[int, ...]  # Flax axis i holds PyTorch axis perm[i]
  flip: bool  # ConvTranspose: PyTorch's kernel is Flax's flipped spatially
  sn_dim: int  # PyTorch's default spectral-norm dim
  bias_dim: int | None  # the PyTorch weight axis the bias runs along
  torch_layout: str
  flax_layout: str


def _conv(name: str, nd: int, transpose: bool) -> _Kind:
  k = {1: "k", 2: "kh, kw", 3: "kd, kh, kw"}[nd]
  spatial = tuple(range(2, nd + 2))
  if transpose:
    return _Kind(
      name=name,
      ndim=nd + 2,
      param="kernel",
      perm=(*spatial, 0, 1),
      flip=True,
      sn_dim=1,
      bias_dim=1,
      torch_layout=f"(in, out, {k})",
      flax_layout=f"nn.ConvTranspose kernel ({k}, in, out), spatially flipped",
    )
  return _Kind(
    name=name,
    ndim=nd + 2,
    param="kernel",
    perm=(*spatial, 1, 0),
    flip=False,
    sn_dim=0,
    bias_dim=0,
    torch_layout=f"(out, in/groups, {k})",
    flax_layout=f"nn.Conv kernel ({k}, in/groups, out)",
  )


_KINDS = {
  "linear": _Kind(
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
  "embedding": _Kind(
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

# Role -> key, per (method, style). Roles: w (weight), g/v (weight norm),
# u/sv (spectral-norm vectors).
_KEYSETS: dict[tuple[str | None, str], dict[str, str]] = {
  (None, "plain"): {"w": "weight"},
  ("weight_norm", "legacy"): {"g": "weight_g", "v": "weight_v"},
  ("weight_norm", "parametrizations"): {"g": _P + "original0", "v": _P + "original1"},
  ("spectral_norm", "legacy"): {"w": "weight_orig", "u": "weight_u", "sv": "weight_v"},
  ("spectral_norm", "parametrizations"): {
    "w": _P + "original",
    "u": _P + "0._u",
    "sv": _P + "0._v",
  },
}
_LEGACY = ("weight_g", "weight_v", "weight_orig", "weight_u")
_WEIGHT_KEYS = tuple(sorted({k for ks in _KEYSETS.values() for k in ks.values()}, key=len))[::-1]
_LAYER_KEYS = (*_WEIGHT_KEYS, "bias")


class TorchLayer(NamedTuple):
  """One converted PyTorch layer and the flaxnorm wrapping that reproduces it.

  Attributes:
    variables: ``{"params": ..., "spectral": ...}`` for the Flax layer (jnp
      arrays; ``"spectral"`` only for spectral norm): ``{name}`` or
      ``{name}_g``/``{name}_v``, ``bias``, and ``{name}_u``/``{name}_v``/
      ``{name}_sigma``.
    kind: the layer kind, one of :data:`KINDS`.
    method: ``"weight_norm"``, ``"spectral_norm"`` or ``None`` (plain weight).
    axis: the ``axis`` to give flaxnorm's transform (``None`` for a plain
      weight, or for a whole-tensor weight norm, PyTorch's ``dim=None``).
    name: the Flax param, ``"kernel"`` or ``"embedding"``.
    style: the key style read, ``"legacy"``, ``"parametrizations"`` or
      ``"plain"``; pass it to :func:`to_torch` to write the same keys back.
    path: the Flax path (``"a/b"``) when loaded by :func:`load_torch_state_dict`.
  """

  variables: dict[str, Any]
  kind: str
  method: str | None
  axis: Axis
  name: str
  style: str
  path: str = ""

  def wrap(self, target: Any, **kwargs: Any) -> Any:
    """Applies the matching flaxnorm Linen transform to ``target``.

    Args:
      target: a Linen Module class or instance, e.g. ``nn.ConvTranspose(4, (3,))``.
      **kwargs: more arguments for the transform (e.g. ``eps``).

    Returns:
      ``flaxnorm.weight_norm(target, name=self.name, axis=self.axis, **kwargs)``
      or the spectral-norm equivalent; ``target`` itself for a plain weight.
    """
    if self.method is None:
      return target
    fn = _linen.weight_norm if self.method == "weight_norm" else _linen.spectral_norm
    return fn(target, name=self.name, axis=self.axis, **kwargs)


# --------------------------------------------------------------------------- #
# Arrays and layouts.
# --------------------------------------------------------------------------- #


def _kind(kind: Any, where: str) -> _Kind:
  if not isinstance(kind, str) or kind not in _KINDS:
    raise ValueError(f"{where}: unknown kind {kind!r}; expected one of {list(KINDS)}.")
  return _KINDS[kind]


def _to_numpy(x: Any, key: str, where: str) -> np.ndarray:
  """A numpy copy of a torch tensor, numpy or JAX array (no torch import).

  A copy: torch optimizers update tensors in place, and the result must not
  change with them.
  """
  if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch.Tensor
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
      return x.float().numpy().astype(jnp.bfloat16)
    return x.numpy().copy()
  if isinstance(x, (np.ndarray, jax.Array, np.generic)):
    return np.array(x)
  raise TypeError(
    f"{where}: '{key}' must be a torch tensor, numpy or JAX array, got {type(x).__name__}."
  )


def _flax_from_torch(x: np.ndarray, k: _Kind) -> np.ndarray:
  if x.ndim == 0:
    return x
  x = np.transpose(x, k.perm)
  if k.flip:
    x = np.flip(x, axis=tuple(range(k.ndim - 2)))
  return np.ascontiguousarray(x)


def _torch_from_flax(x: np.ndarray, k: _Kind) -> np.ndarray:
  if x.ndim == 0:
    return x
  if k.flip:
    x = np.flip(x, axis=tuple(range(k.ndim - 2)))
  return np.ascontiguousarray(np.transpose(x, np.argsort(k.perm)))


def _neg(axes: tuple[int, ...], ndim: int) -> Axis:
  """Kept axes as flaxnorm ``axis``: negative, counted from the end like ``-1``."""
  neg = tuple(a - ndim for a in axes)
  return neg[0] if len(neg) == 1 else neg


def _kept_axis(g_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> int | str | None:
  """The one axis weight norm keeps, from ``g``'s shape; ``None`` for a scalar.

  Returns ``"bad"`` when ``g`` fits no single kept axis.
  """
  if g_shape == ():
    return None
  for a in range(len(w_shape)):
    if g_shape == tuple(s if i == a else 1 for i, s in enumerate(w_shape)):
      return a
  return "bad"


def _matrix_maps(k: _Kind, torch_shape: tuple[int, ...], dim: int, kept: tuple[int, ...]):
  """Where each element of flaxnorm's matrix view sits in PyTorch's.

  PyTorch views the weight as ``moveaxis(w, dim, 0).reshape(m, n)``; flaxnorm
  views the converted kernel as ``as_matrix(kernel, kept)``. Returns
  ``(rows, cols)``, int arrays of flaxnorm's matrix shape holding the PyTorch
  row and column of each element, so vectors can be permuted between the two.
  """
  moved = (torch_shape[dim], *(s for i, s in enumerate(torch_shape) if i != dim))
  m, n = moved[0], math.prod(moved[1:])
  if max(m, n) >= 2**24:  # indices travel as float32 through as_matrix
    raise ValueError(f"a matrix view of shape ({m}, {n}) is too large to convert.")
  rows = np.broadcast_to(np.arange(m).reshape((m,) + (1,) * (len(moved) - 1)), moved)
  cols = np.broadcast_to(np.arange(n).reshape((1, *moved[1:])), moved)

  def view(idx: np.ndarray) -> np.ndarray:
    flax_idx = _flax_from_torch(np.moveaxis(idx, 0, dim), k).astype(np.float32)
    return np.asarray(_math.as_matrix(jnp.asarray(flax_idx), kept)).astype(np.int64)

  return view(rows), view(cols)


def _sn_dim(k: _Kind, spectral_dim: Any, where: str) -> int:
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


def _sn_views(k: _Kind, dim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """flaxnorm's kept axes for PyTorch's spectral-norm ``dim``: (output view, transposed view)."""
  a = k.perm.index(dim)
  return (a,), tuple(i for i in range(k.ndim) if i != a)


# --------------------------------------------------------------------------- #
# PyTorch -> flaxnorm, one layer.
# --------------------------------------------------------------------------- #


def _detect(keys: list[str], where: str) -> tuple[str | None, str, dict[str, str]]:
  """(method, style, role -> key) of one layer's keys, or a clear error."""
  unknown = sorted(set(keys) - set(_LAYER_KEYS))
  if unknown:
    raise ValueError(
      f"{where}: unexpected keys {unknown} (found {sorted(keys)}); a layer has 'bias' "
      f"and the keys of one PyTorch style: {[sorted(ks.values()) for ks in _KEYSETS.values()]}."
    )
  groups = {
    "plain ('weight')": [x for x in keys if x == "weight"],
    "legacy (weight_g/weight_v/weight_orig/weight_u)": [x for x in keys if x in _LEGACY],
    "parametrizations (parametrizations.weight.*)": [x for x in keys if x.startswith(_P)],
  }
  present = {g: ks for g, ks in groups.items() if ks}
  if len(present) > 1:
    raise ValueError(
      f"{where}: keys mix PyTorch styles: "
      + "; ".join(f"{g}: {sorted(ks)}" for g, ks in present.items())
      + ". A layer's keys come from one style; convert each state dict separately."
    )
  if not present:
    raise ValueError(
      f"{where}: no weight found among keys {sorted(keys)}; expected 'weight', "
      "'weight_g'/'weight_v', 'weight_orig'/'weight_u'/'weight_v' or "
      "'parametrizations.weight.*'."
    )
  found = next(iter(present.values()))
  style = "plain" if "weight" in keys else ("legacy" if found[0] in _LEGACY else "parametrizations")
  candidates = [(m, s) for (m, s) in _KEYSETS if s == style]
  # The method whose keys overlap most (weight_v alone is shared by both legacy ones).
  best = max(candidates, key=lambda ms: len(set(_KEYSETS[ms].values()) & set(found)))
  if len(candidates) == 2:
    other = next(c for c in candidates if c != best)
    own = set(_KEYSETS[best].values()) - set(_KEYSETS[other].values())
    theirs = set(_KEYSETS[other].values()) - set(_KEYSETS[best].values())
    if set(found) & theirs:
      raise ValueError(
        f"{where}: keys {sorted(found)} mix weight norm and spectral norm "
        f"({sorted(set(found) & own)} vs {sorted(set(found) & theirs)})."
      )
  roles = _KEYSETS[best]
  missing = sorted(set(roles.values()) - set(found))
  if missing:
    method = best[0] or "plain weight"
    raise ValueError(
      f"{where}: missing keys {missing} for a {style} {method} layer; found {sorted(keys)}."
    )
  return best[0], style, roles


def _shape_error(where: str, key: str, shape: tuple, expected: str, k: _Kind) -> ValueError:
  return ValueError(
    f"{where}: '{key}' has shape {shape}, which fits no {k.name} layout: expected "
    f"{expected} (PyTorch {k.name} weight {k.torch_layout} -> {k.flax_layout})."
  )


def _convert(
  tensors: Mapping[str, Any],
  kind: str,
  axis: Any,
  spectral_dim: int | None,
  collection: str,
  where: str,
) -> tuple[TorchLayer, dict[tuple[str, str], str]]:
  """from_torch, plus the PyTorch key behind each (collection, name) it fills."""
  k = _kind(kind, where)
  if not isinstance(tensors, Mapping):
    raise TypeError(f"{where}: tensors must be a mapping of key -> tensor, got {type(tensors)}.")
  method, style, roles = _detect(list(tensors), where)
  where = f"{where} ({kind}, {f'{style} {method}' if method else 'plain weight'})"
  arr = {role: _to_numpy(tensors[key], key, where) for role, key in roles.items()}
  wrole = "v" if method == "weight_norm" else "w"
  w = arr[wrole]
  wkey = roles[wrole]
  if w.ndim != k.ndim or 0 in w.shape:
    raise _shape_error(where, wkey, w.shape, f"{k.ndim} non-empty dims {k.torch_layout}", k)
  _checks.check_float_array(w, f"'{wkey}'", where)
  n = k.param
  params: dict[str, Any] = {}
  state: dict[str, Any] = {}
  src: dict[tuple[str, str], str] = {}

  if method is None:
    if axis is not None:
      raise ValueError(f"{where}: axis={axis!r} given, but '{wkey}' is a plain weight.")
    params[n], src["params", n] = _flax_from_torch(w, k), wkey
    out_axis: Axis = None
  elif method == "weight_norm":
    g = arr["g"]
    dim = _kept_axis(tuple(g.shape), tuple(w.shape))
    if dim == "bad":
      raise _shape_error(
        where,
        roles["g"],
        g.shape,
        f"() for dim=None, or {w.shape}'s shape with size 1 on every axis but the kept "
        f"dim (e.g. {(w.shape[0],) + (1,) * (w.ndim - 1)} for dim=0) to go with "
        f"'{roles['v']}' of shape {w.shape}",
        k,
      )
    have = None if dim is None else (k.perm.index(dim),)
    out_axis = None if have is None else _neg(have, k.ndim)
    if axis is not None and _checks.normalize_axes(axis, k.ndim, where) != have:
      raise ValueError(
        f"{where}: '{roles['g']}' of shape {g.shape} keeps PyTorch dim {dim} of "
        f"{k.torch_layout}, which is Flax axis={out_axis!r} of {k.flax_layout}; "
        f"axis={axis!r} would compute a different norm. Wrap the Flax layer with "
        "the axis returned here."
      )
    params[f"{n}_g"], src["params", f"{n}_g"] = _flax_from_torch(g, k), roles["g"]
    params[f"{n}_v"], src["params", f"{n}_v"] = _flax_from_torch(w, k), roles["v"]
  else:
    dim = _sn_dim(k, spectral_dim, where)
    m = w.shape[dim]
    cols = w.size // m
    for role, size in (("u", m), ("sv", cols)):
      if arr[role].shape != (size,):
        raise _shape_error(
          where,
          roles[role],
          arr[role].shape,
          f"({size},) for '{wkey}' of shape {w.shape} with spectral_dim={dim} "
          f"(PyTorch's matrix view moves dim {dim} to the rows)",
          k,
        )
    out_view, t_view = _sn_views(k, dim)
    exact = t_view if style == "parametrizations" else out_view
    if axis is None:
      kept = exact
    else:
      kept = _checks.normalize_axes(axis, k.ndim, where)
      if kept not in (out_view, t_view):
        raise ValueError(
          f"{where}: axis={axis!r} does not fit PyTorch spectral_dim={dim}: use "
          f"{_neg(exact, k.ndim)!r} (continues PyTorch's power iteration exactly) or "
          f"{_neg(out_view if exact == t_view else t_view, k.ndim)!r}."
        )
    kernel = _flax_from_torch(w, k)
    rows, colmap = _matrix_maps(k, tuple(w.shape), dim, kept)
    if kept == out_view:
      u, v = arr["u"][rows[:, 0]], arr["sv"][colmap[0, :]]
    else:  # flaxnorm's rows are PyTorch's columns: u <-> v swap roles.
      u, v = arr["sv"][colmap[:, 0]], arr["u"][rows[0, :]]
    vec = jnp.promote_types(u.dtype, jnp.float32)
    u, v = jnp.asarray(u, vec), jnp.asarray(v, vec)
    _, st = _math.spectral_normalize(jnp.asarray(kernel), u, v, axis=kept, n_steps=0)
    params[n], src["params", n] = kernel, wkey
    state = {f"{n}_u": st.u, f"{n}_v": st.v, f"{n}_sigma": st.sigma}
    src[collection, f"{n}_u"] = roles["u" if kept == out_view else "sv"]
    src[collection, f"{n}_v"] = roles["sv" if kept == out_view else "u"]
    src[collection, f"{n}_sigma"] = wkey
    out_axis = _neg(kept, k.ndim)

  if "bias" in tensors:
    b = _to_numpy(tensors["bias"], "bias", where)
    if k.bias_dim is None or b.shape != (w.shape[k.bias_dim],):
      expected = (
        "no bias (PyTorch's Embedding has none)"
        if k.bias_dim is None
        else f"({w.shape[k.bias_dim]},), axis {k.bias_dim} of '{wkey}' {w.shape}"
        + (" (grouped ConvTranspose is not supported by Flax)" if k.flip else "")
      )
      raise _shape_error(where, "bias", b.shape, expected, k)
    params["bias"], src["params", "bias"] = b, "bias"

  variables: dict[str, Any] = {"params": {key: jnp.asarray(x) for key, x in params.items()}}
  if state:
    variables[collection] = state
  return TorchLayer(variables, kind, method, out_axis, n, style), src


def from_torch(
  tensors: Mapping[str, Any],
  kind: str,
  *,
  axis: Axis = None,
  spectral_dim: int | None = None,
  collection: str = "spectral",
) -> TorchLayer:
  """Converts one PyTorch layer's tensors to flaxnorm variables for the matching Flax layer.

  Args:
    tensors: the layer's entries, keys relative to the layer (e.g.
      ``torch_layer.state_dict()``): ``weight``/``bias``, or a weight-norm or
      spectral-norm key set of either PyTorch API (see the module docstring).
      Values are torch tensors, numpy or JAX arrays; torch is not imported.
    kind: one of :data:`KINDS`: ``"linear"``, ``"conv1d"``/``"conv2d"``/``"conv3d"``,
      ``"conv_transpose1d"``/``2d``/``3d``, ``"embedding"``.
    axis: the flaxnorm ``axis`` the Flax layer is (to be) wrapped with. ``None``
      picks it: for weight norm PyTorch's ``dim`` (read from ``g``'s shape; any
      other axis raises, as the norm would differ); for spectral norm the axis
      that continues PyTorch's power iteration exactly. For new-style spectral
      norm the output axis (e.g. ``-1``) is also accepted: evaluation is the
      same, training steps iterate in flaxnorm's order.
    spectral_dim: the ``dim`` PyTorch's spectral norm was applied with (its
      default when ``None``: 1 for ConvTranspose, else 0).
    collection: the collection for the spectral state.

  Returns:
    A :class:`TorchLayer`: ``variables`` (jnp arrays in Flax layout, kernel
    ``(in, out)`` for ``linear``, ``(*k, in/groups, out)`` for convs and
    ConvTranspose, the latter flipped spatially) and the wrapping (``method``,
    ``axis``, ``name``; ``layer.wrap(nn.Dense(3))`` applies it). Spectral
    state: ``{name}_u`` ``(m,)``, ``{name}_v`` ``(n,)`` and
    ``{name}_sigma = u^T W v`` from the stored vectors.

  Raises:
    ValueError: unknown ``kind``; missing, unexpected or mixed-style keys; a
      shape that fits no layout of ``kind`` (the key, its shape and the
      expected layout are named).
    TypeError: a value that is not an array.

  Examples:
    >>> import numpy as np
    >>> layer = from_torch({"weight_g": np.ones((3, 1, 1), np.float32),
    ...                     "weight_v": np.ones((3, 2, 4), np.float32)}, "conv_transpose1d")
    >>> layer.method, layer.axis, layer.variables["params"]["kernel_g"].shape
    ('weight_norm', -2, (1, 3, 1))
  """
  return _convert(tensors, kind, axis, spectral_dim, collection, "from_torch")[0]


# --------------------------------------------------------------------------- #
# flaxnorm -> PyTorch, one layer.
# --------------------------------------------------------------------------- #


def _import_torch():
  try:
    import torch
  except ImportError:
    return None
  return torch


def _emit(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
  torch = _import_torch()
  if torch is None:
    return {key: np.array(x) for key, x in arrays.items()}
  out = {}
  for key, x in arrays.items():
    x = np.asarray(x)
    if x.dtype in (np.float16, np.float32, np.float64):
      out[key] = torch.from_numpy(np.array(x))
    else:  # bfloat16 and friends: numpy cannot hand them to torch directly
      out[key] = torch.from_numpy(x.astype(np.float32)).to(getattr(torch, x.dtype.name))
  return out


def to_torch(
  variables: Mapping[str, Any],
  kind: str,
  style: str = "parametrizations",
  *,
  axis: Axis = None,
  spectral_dim: int | None = None,
  collection: str = "spectral",
) -> dict[str, Any]:
  """Converts one Flax layer's flaxnorm variables to PyTorch tensors: the inverse of :func:`from_torch`.

  Args:
    variables: ``{"params": ..., collection: ...}`` of one layer (or its bare
      params), plain, weight-normed (``{name}_g``/``{name}_v``) or
      spectral-normed (``{name}`` and ``{name}_u``/``{name}_v`` in
      ``collection``).
    kind: one of :data:`KINDS`.
    style: ``"parametrizations"`` (``torch.nn.utils.parametrizations``) or
      ``"legacy"`` (``torch.nn.utils.weight_norm``/``spectral_norm``). Both
      load with ``load_state_dict(strict=True)`` into a module built with that
      API (weight norm's legacy keys load into either). A plain weight gives
      ``weight``/``bias`` whatever the style.
    axis: the flaxnorm ``axis`` the layer was wrapped with. Weight norm reads
      it from ``g``'s shape (a given one is checked). Spectral norm reads it
      from the shapes of ``u``/``v`` and needs it only when they have the same
      size. Where it is not the axis :func:`from_torch` picks for ``style``,
      evaluation matches but PyTorch's next training step iterates in its own
      order.
    spectral_dim: PyTorch's spectral-norm ``dim`` (its default when ``None``).
    collection: the collection holding the spectral state.

  Returns:
    ``{key: tensor}`` with keys relative to the layer, in PyTorch layout
    (``linear`` ``(out, in)``, conv ``(out, in/groups, *k)``, ConvTranspose
    ``(in, out, *k)``): torch tensors if torch can be imported, else numpy
    arrays.

  Raises:
    ValueError: unknown ``kind``/``style``, missing or unexpected params,
      shapes that fit no layout, or an ambiguous spectral view without ``axis``.
  """
  where = f"to_torch({kind!r})"
  k = _kind(kind, where)
  if style not in STYLES:
    raise ValueError(f"{where}: unknown style {style!r}; expected one of {list(STYLES)}.")
  if not isinstance(variables, Mapping):
    raise TypeError(f"{where}: variables must be a mapping, got {type(variables).__name__}.")
  params = variables["params"] if isinstance(variables.get("params"), Mapping) else variables
  state = variables.get(collection, {}) if params is not variables else {}
  params = {key: np.asarray(meta.unbox(x)) for key, x in params.items()}
  state = {key: np.asarray(meta.unbox(x)) for key, x in state.items()}
  n = k.param
  if f"{n}_g" in params and f"{n}_v" in params:
    method = "weight_norm"
  elif n in params:
    method = "spectral_norm" if f"{n}_u" in state else None
  else:
    raise ValueError(
      f"{where}: params have no '{n}' nor '{n}_g'/'{n}_v' (found {sorted(params)}); "
      f"a {k.name} layer's Flax param is {k.flax_layout}."
    )
  allowed = {n, f"{n}_g", f"{n}_v", "bias"} if method == "weight_norm" else {n, "bias"}
  extra = sorted(set(params) - allowed)
  if extra or (method == "weight_norm" and n in params):
    raise ValueError(
      f"{where}: unexpected params {extra or [n]} beside the {method or 'plain'} "
      f"'{n}' (found {sorted(params)})."
    )
  keys = _KEYSETS[(method, "plain" if method is None else style)]
  wkey = f"{n}_v" if method == "weight_norm" else n
  w = params[wkey]
  if w.ndim != k.ndim or 0 in w.shape:
    raise ValueError(
      f"{where}: param '{wkey}' has shape {w.shape}, which fits no {k.name} layout: "
      f"expected {k.ndim} non-empty dims, {k.flax_layout}."
    )
  out: dict[str, np.ndarray] = {}

  if method is None:
    out[keys["w"]] = _torch_from_flax(w, k)
  elif method == "weight_norm":
    g = params[f"{n}_g"]
    a = _kept_axis(tuple(g.shape), tuple(w.shape))
    if a == "bad":
      raise ValueError(
        f"{where}: param '{n}_g' of shape {g.shape} does not fit '{n}_v' of shape "
        f"{w.shape}: expected () or size 1 on every axis but one (what "
        "flaxnorm.weight_norm makes)."
      )
    if axis is not None:
      asked = _checks.normalize_axes(axis, k.ndim, where)
      if asked != (() if a is None else (a,)):
        raise ValueError(
          f"{where}: '{n}_g' of shape {g.shape} keeps axis "
          f"{None if a is None else a - k.ndim}, not axis={axis!r}."
        )
    out[keys["g"]] = _torch_from_flax(g, k)
    out[keys["v"]] = _torch_from_flax(w, k)
  else:
    u, v = state[f"{n}_u"], state.get(f"{n}_v")
    if v is None:
      raise ValueError(
        f"{where}: '{collection}' has '{n}_u' but no '{n}_v' (found {sorted(state)})."
      )
    dim = _sn_dim(k, spectral_dim, where)
    out_view, t_view = _sn_views(k, dim)
    if axis is not None:
      kept = _checks.normalize_axes(axis, k.ndim, where)
      if kept not in (out_view, t_view):
        raise ValueError(
          f"{where}: axis={axis!r} does not fit PyTorch spectral_dim={dim}: the Flax "
          f"layer must keep {_neg(out_view, k.ndim)!r} (PyTorch's matrix view) or "
          f"{_neg(t_view, k.ndim)!r} (its transpose)."
        )
    m, cols = w.shape[k.perm.index(dim)], w.size // w.shape[k.perm.index(dim)]
    fits = {
      view: (u.shape, v.shape) == shapes
      for view, shapes in ((out_view, ((m,), (cols,))), (t_view, ((cols,), (m,))))
    }
    if axis is not None:
      if not fits[kept]:
        raise ValueError(
          f"{where}: state '{n}_u' {u.shape} / '{n}_v' {v.shape} does not fit param "
          f"'{n}' {w.shape} with axis={axis!r}."
        )
    elif fits[out_view] and fits[t_view]:
      raise ValueError(
        f"{where}: '{n}_u' and '{n}_v' both have size {m}, so the axis the layer was "
        f"wrapped with cannot be read from their shapes; pass axis= "
        f"({_neg(out_view, k.ndim)!r} or {_neg(t_view, k.ndim)!r})."
      )
    elif fits[out_view] or fits[t_view]:
      kept = out_view if fits[out_view] else t_view
    else:
      raise ValueError(
        f"{where}: state '{n}_u' {u.shape} / '{n}_v' {v.shape} does not fit param "
        f"'{n}' {w.shape} ({k.flax_layout}) for PyTorch spectral_dim={dim}: expected "
        f"({m},)/({cols},) or, transposed, ({cols},)/({m},)."
      )
    torch_w = _torch_from_flax(w, k)
    rows, colmap = _matrix_maps(k, tuple(torch_w.shape), dim, kept)
    tu, tv = np.empty((m,), u.dtype), np.empty((cols,), u.dtype)
    if kept == out_view:
      tu[rows[:, 0]], tv[colmap[0, :]] = u, v
    else:
      tv[colmap[:, 0]], tu[rows[0, :]] = u, v
    out[keys["w"]], out[keys["u"]], out[keys["sv"]] = torch_w, tu, tv

  if "bias" in params:
    out["bias"] = params["bias"]
  return _emit(out)


def conv_transpose_padding(
  kernel_size: int | tuple[int, ...],
  padding: int | tuple[int, ...] = 0,
  *,
  dilation: int | tuple[int, ...] = 1,
  output_padding: int | tuple[int, ...] = 0,
) -> tuple[tuple[int, int], ...]:
  """The ``padding`` of ``nn.ConvTranspose`` that matches a PyTorch ConvTranspose.

  With Flax's default ``transpose_kernel=False`` and the kernel from
  :func:`from_torch`, ``nn.ConvTranspose(features, kernel_size, strides=stride,
  kernel_dilation=dilation, padding=conv_transpose_padding(...))`` gives
  PyTorch's output (``groups=1``).

  Args:
    kernel_size: PyTorch's ``kernel_size`` (an int, or one per spatial dim).
    padding: PyTorch's ``padding``.
    dilation: PyTorch's ``dilation``.
    output_padding: PyTorch's ``output_padding``.

  Returns:
    ``((lo, hi), ...)`` per spatial dim: ``lo = dilation * (k - 1) - padding``,
    ``hi = lo + output_padding``.

  Examples:
    >>> conv_transpose_padding(4, 1)
    ((2, 2),)
  """
  ks = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)

  def per_dim(x: int | tuple[int, ...], name: str) -> tuple[int, ...]:
    xs = (x,) * len(ks) if isinstance(x, int) else tuple(x)
    if len(xs) != len(ks) or not all(isinstance(i, int) and i >= 0 for i in xs):
      raise ValueError(
        f"conv_transpose_padding: {name}={x!r} must be an int >= 0 or one per "
        f"spatial dim ({len(ks)})."
      )
    return xs

  ps, ds, ops = (
    per_dim(padding, "padding"),
    per_dim(dilation, "dilation"),
    per_dim(output_padding, "output_padding"),
  )
  return tuple((d * (k - 1) - p, d * (k - 1) - p + op) for k, p, d, op in zip(ks, ps, ds, ops))


# --------------------------------------------------------------------------- #
# Whole models.
# --------------------------------------------------------------------------- #


class TorchLoadResult(NamedTuple):
  """What :func:`load_torch_state_dict` did.

  Attributes:
    variables: the filled Flax variables (a new tree; the input is not changed).
    layers: PyTorch layer prefix -> :class:`TorchLayer` (``path``, ``kind``,
      ``method``, ``axis``, ``style``) for every layer loaded; the input of
      :func:`to_torch_state_dict`.
    unused_keys: PyTorch key -> why it was not used (no Flax layer, not a
      supported layer, ...).
    unmatched_keys: Flax variables (``"params/a/kernel"``) no PyTorch key filled.
  """

  variables: dict[str, Any]
  layers: dict[str, TorchLayer]
  unused_keys: dict[str, str]
  unmatched_keys: tuple[str, ...]


KeyMap = Callable[[str], "str | tuple[str, ...] | None"] | Mapping[str, str] | None


def _linen_path(prefix: str) -> str:
  """PyTorch module path -> Linen path: ``"blocks.0.convs.1"`` -> ``"blocks_0/convs_1"``."""
  out: list[str] = []
  for part in prefix.split(".") if prefix else []:
    if part.isdigit():
      # Linen names list submodules "convs_0"; nn.Sequential's "layers_0".
      out.append(f"{out.pop()}_{part}" if out else f"layers_{part}")
    else:
      out.append(part)
  return "/".join(out)


def _resolve(key_map: KeyMap, prefix: str) -> tuple[str, ...] | None:
  if key_map is None:
    path: Any = _linen_path(prefix)
  elif callable(key_map):
    path = key_map(prefix)
  elif isinstance(key_map, Mapping):
    if prefix in key_map:
      path = key_map[prefix]
    else:
      hits = [p for p in key_map if p == "" or prefix.startswith(p + ".")]
      if not hits:
        return None
      best = max(hits, key=len)
      rest = _linen_path(prefix[len(best) + 1 :] if best else prefix)
      path = "/".join(x for x in (key_map[best], rest) if x)
  else:
    raise TypeError(
      f"load_torch_state_dict: key_map must be a function, a dict of prefixes or None, "
      f"got {type(key_map).__name__}."
    )
  if path is None:
    return None
  if isinstance(path, str):
    return tuple(p for p in path.split("/") if p)
  if isinstance(path, tuple) and all(isinstance(p, str) for p in path):
    return path
  raise TypeError(
    f"load_torch_state_dict: key_map gave {path!r} for '{prefix}'; expected a "
    "'a/b' string, a tuple of names or None."
  )


def _get(tree: Any, path: tuple[str, ...]) -> Any:
  for p in path:
    if not isinstance(tree, Mapping) or p not in tree:
      return None
    tree = tree[p]
  return tree if isinstance(tree, Mapping) else None


def _leaves(tree: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
  if isinstance(tree, Mapping):
    return [q for key, x in tree.items() for q in _leaves(x, (*path, key))]
  return [path]


def _copy(tree: Any) -> Any:
  return {key: _copy(x) for key, x in tree.items()} if isinstance(tree, Mapping) else tree


def _split_key(key: str) -> tuple[str, str] | None:
  for suffix in _LAYER_KEYS:
    if key == suffix:
      return "", suffix
    if key.endswith("." + suffix):
      return key[: -len(suffix) - 1], suffix
  return None


def _target_method(
  params: Mapping[str, Any], state: Mapping[str, Any] | None, n: str
) -> str | None:
  if f"{n}_g" in params:
    return "weight_norm"
  if n in params and state is not None and f"{n}_u" in state:
    return "spectral_norm"
  return None if n in params else "missing"


def _check_not_transposed(
  weight: Any, target: Mapping[str, Any], kind: str, prefix: str, where: str
) -> None:
  """Raises if an unnamed conv's weight only fits the target as a ConvTranspose."""
  tk = target.get("kernel", target.get("kernel_v"))
  if tk is None:
    return
  tshape, wshape = tuple(meta.unbox(tk).shape), tuple(weight.shape)
  alt = f"conv_transpose{kind[-2:]}"
  as_conv = _flax_from_torch(np.empty(wshape), _KINDS[kind]).shape
  as_transposed = _flax_from_torch(np.empty(wshape), _KINDS[alt]).shape
  if as_conv != tshape and as_transposed == tshape:
    raise ValueError(
      f"{where}: PyTorch weight {wshape} read as {kind} {_KINDS[kind].torch_layout} gives "
      f"{as_conv}, but the Flax kernel is {tshape}, which fits {alt} "
      f"{_KINDS[alt].torch_layout}. If this is a ConvTranspose, pass kinds={{'{prefix}': '{alt}'}}."
    )


def load_torch_state_dict(
  state_dict: Mapping[str, Any],
  variables: Mapping[str, Any],
  key_map: KeyMap,
  *,
  kinds: Mapping[str, str] | None = None,
  axes: Mapping[str, Axis] | None = None,
  strict: bool = True,
  collection: str = "spectral",
) -> TorchLoadResult:
  """Fills a Flax variables tree from a full PyTorch state dict.

  Keys are grouped by layer (``"ups.0.weight_g"`` is layer ``"ups.0"``); each
  layer maps to a Flax path through ``key_map`` and is converted with
  :func:`from_torch`. The Flax tree (from ``model.init``, or
  ``jax.eval_shape`` of it) fixes the wrapping of every layer, and each layer
  is checked against it: a plain, weight-normed or spectral-normed target must
  meet the same in PyTorch, and every shape must match, including ``g``'s (so a
  weight norm kept on another axis than PyTorch's ``dim`` is refused, e.g. a
  ConvTranspose that is not wrapped with ``axis=-2``). Spectral state is
  laid out for the target's axis (read from the shapes of ``u``/``v``; where
  both layouts fit, the one from :func:`from_torch`, or ``axes[prefix]``).

  Args:
    state_dict: PyTorch ``module.state_dict()`` (tensors or arrays).
    variables: the Flax variables to fill (``{"params": ..., collection: ...}``);
      values may be arrays, ``jax.ShapeDtypeStruct`` or boxed (``nn.Partitioned``).
      Loaded values take the target's dtype.
    key_map: PyTorch layer prefix -> Flax path. A function returning ``"a/b"``
      (or a tuple of names, or ``None`` to skip the layer); or a dict of
      prefixes ``{"generator.ups": "ups", ...}``: the longest key that is the
      prefix or a ``.``-bounded start of it wins, the rest of the prefix
      following Linen's naming (``"resblocks.0.convs.1"`` ->
      ``"resblocks_0/convs_1"``); ``None`` applies that naming to everything.
    kinds: PyTorch layer prefix -> kind. Layers not named are ``embedding``
      when the Flax layer has an ``embedding``, else by rank ``linear``,
      ``conv1d``, ``conv2d``: ConvTranspose layers must be named.
    axes: PyTorch layer prefix -> flaxnorm axis, to settle a spectral layer
      whose ``u`` and ``v`` have the same size.
    strict: raise if any PyTorch key is unused or any Flax variable unfilled.
    collection: the collection holding the spectral state.

  Returns:
    A :class:`TorchLoadResult` with the new variables, the converted layers,
    and the unused PyTorch keys and unmatched Flax variables.

  Raises:
    ValueError: a shape or wrapping mismatch (naming the PyTorch key, the Flax
      variable, both shapes and the expected layouts); with ``strict``, unused
      keys or unmatched variables (all listed).
  """
  where = "load_torch_state_dict"
  if not isinstance(variables, Mapping) or not isinstance(variables.get("params"), Mapping):
    raise ValueError(f"{where}: variables need a 'params' collection, got {type(variables)}.")
  kinds, axes = dict(kinds or {}), dict(axes or {})
  out = _copy(variables)
  groups: dict[str, dict[str, str]] = {}
  unused: dict[str, str] = {}
  for key in state_dict:
    split = _split_key(key)
    if split is None:
      unused[key] = "not a weight/bias key of a supported layer"
    else:
      groups.setdefault(split[0], {})[split[1]] = key
  for unknown in sorted((set(kinds) | set(axes)) - set(groups)):
    raise ValueError(f"{where}: kinds/axes name '{unknown}', which is no layer of the state dict.")

  layers: dict[str, TorchLayer] = {}
  filled: set[tuple[str, ...]] = set()
  for prefix, entries in groups.items():
    pre = f"{prefix}." if prefix else ""
    path = _resolve(key_map, prefix)
    fpath = "/".join(path or ())
    target = None if path is None else _get(out["params"], path)
    if target is None:
      reason = "key_map skips it" if path is None else f"no Flax layer at 'params/{fpath}'"
      unused.update({key: reason for key in entries.values()})
      continue
    tstate = _get(out.get(collection, {}), path)
    wkeys = [s for s in entries if s != "bias"]
    kind = kinds.get(prefix)
    if kind is None:
      ndim = len(state_dict[entries[wkeys[0]]].shape) if wkeys else 0
      if any(x.startswith("embedding") for x in target):
        kind = "embedding"
      else:
        kind = {2: "linear", 3: "conv1d", 4: "conv2d", 5: "conv3d"}.get(ndim)
      if kind is None:
        unused.update(
          {
            key: f"weight of rank {ndim}: not a linear/conv/embedding layer"
            for key in entries.values()
          }
        )
        continue
    k = _kind(kind, f"{where}: kinds['{prefix}']")
    tmethod = _target_method(target, tstate, k.param)
    lwhere = f"{where}: layer '{prefix}' -> 'params/{fpath}'"
    if prefix not in kinds and kind.startswith("conv") and wkeys:
      _check_not_transposed(state_dict[entries[wkeys[0]]], target, kind, prefix, lwhere)
    tensors = {s: state_dict[key] for s, key in entries.items()}
    layer, src = _convert(tensors, kind, axes.get(prefix), None, collection, lwhere)
    if prefix not in axes and layer.method == tmethod == "spectral_norm":
      # The target's u/v shapes tell which of the two views it is wrapped with.
      kernel = layer.variables["params"][k.param]
      out_view, t_view = _sn_views(k, k.sn_dim)
      m = kernel.shape[out_view[0]]
      shapes = tuple(
        tuple(meta.unbox(tstate[f"{k.param}_{x}"]).shape) if f"{k.param}_{x}" in tstate else None
        for x in ("u", "v")
      )
      fits = {out_view: shapes == ((m,), (kernel.size // m,))}
      fits[t_view] = shapes == ((kernel.size // m,), (m,))
      if all(fits.values()):
        exact = _checks.normalize_axes(layer.axis, k.ndim)
        alt = _neg(out_view if exact == t_view else t_view, k.ndim)
        raise ValueError(
          f"{lwhere}: the Flax layer's u and v both have size {m}, so its spectral-norm "
          f"axis cannot be read from their shapes; pass axes={{'{prefix}': A}} with A "
          f"the axis it is wrapped with: {layer.axis!r} continues PyTorch's "
          f"{layer.style} power iteration exactly, {alt!r} evaluates the same."
        )
      other = [view for view, ok in fits.items() if ok]
      if other and _checks.normalize_axes(layer.axis, k.ndim) != other[0]:
        layer, src = _convert(tensors, kind, _neg(other[0], k.ndim), None, collection, lwhere)

    if tmethod == "missing":
      raise ValueError(
        f"{lwhere}: the Flax layer has no '{k.param}' nor '{k.param}_g'/'{k.param}_v' "
        f"(it has {sorted(target)}) for PyTorch {sorted(entries.values())}; does "
        "key_map point at the right layer, and is the kind right?"
      )
    if layer.method != tmethod:
      names = sorted(target) + sorted(f"{collection}/{x}" for x in (tstate or {}))
      hint = {
        "weight_norm": f"wrap it with flaxnorm.weight_norm(..., axis={layer.axis!r})",
        "spectral_norm": f"wrap it with flaxnorm.spectral_norm(..., axis={layer.axis!r})",
        None: "fold the norm in PyTorch first (remove_weight_norm / remove_parametrizations)",
      }[layer.method]
      raise ValueError(
        f"{lwhere}: PyTorch has {layer.method or 'a plain weight'} "
        f"({sorted(entries.values())}) but the Flax layer has "
        f"{'a plain ' + repr(k.param) if tmethod is None else tmethod} ({names}); {hint}."
      )
    for col, leaves in layer.variables.items():
      tgt = target if col == "params" else tstate
      for name, value in leaves.items():
        tkey = f"{col}/{fpath}/{name}"
        if name not in tgt:
          raise ValueError(
            f"{lwhere}: PyTorch '{pre}{src[col, name]}' has no Flax counterpart "
            f"'{tkey}' (the layer has {sorted(tgt)}); e.g. use_bias=False in Flax "
            "but a bias in PyTorch?"
          )
        raw = tgt[name]
        tval = meta.unbox(raw)
        if tuple(tval.shape) != tuple(value.shape):
          tkey_src = f"{pre}{src[col, name]}"
          t_shape = tuple(np.shape(state_dict[tkey_src]))
          hint = ""
          if name.endswith("_g") and layer.method == "weight_norm":
            a = _kept_axis(tuple(tval.shape), tuple(meta.unbox(target[f"{k.param}_v"]).shape))
            hint += (
              f" The Flax layer keeps axis {a if a in (None, 'bad') else a - k.ndim!r}, PyTorch "
              f"keeps Flax axis {layer.axis!r}: wrap it with "
              f"flaxnorm.weight_norm(..., axis={layer.axis!r})."
            )
          raise ValueError(
            f"{lwhere}: shape mismatch for PyTorch '{tkey_src}' of shape {t_shape} "
            f"({k.name} layout {k.torch_layout}): converted to {tuple(value.shape)} "
            f"({k.flax_layout}), but the Flax '{tkey}' has shape {tuple(tval.shape)}." + hint
          )
        arr = jnp.asarray(value, tval.dtype)
        tgt[name] = raw.replace_boxed(arr) if isinstance(raw, meta.AxisMetadata) else arr
        filled.add((col, *path, name))
    layers[prefix] = layer._replace(path=fpath)

  unmatched = tuple(
    "/".join(leaf) for col in out for leaf in _leaves(out[col], (col,)) if leaf not in filled
  )
  if strict and (unused or unmatched):
    raise ValueError(
      f"{where}: {len(unused)} PyTorch keys unused, {len(unmatched)} Flax variables "
      "unmatched (strict=False returns them in the result).\n  unused: "
      + ("".join(f"\n    {key}: {why}" for key, why in unused.items()) or "none")
      + "\n  unmatched: "
      + ("".join(f"\n    {key}" for key in unmatched) or "none")
    )
  return TorchLoadResult(out, layers, unused, unmatched)


def to_torch_state_dict(
  variables: Mapping[str, Any],
  layers: Mapping[str, TorchLayer],
  *,
  style: str | None = None,
  collection: str = "spectral",
) -> dict[str, Any]:
  """Writes a PyTorch state dict from Flax variables: the inverse of :func:`load_torch_state_dict`.

  Args:
    variables: Flax variables (``{"params": ..., collection: ...}``).
    layers: PyTorch layer prefix -> :class:`TorchLayer` giving the Flax
      ``path``, ``kind``, ``axis`` and ``style`` (``TorchLoadResult.layers``).
    style: a key style for every layer, or ``None`` for each layer's own.
    collection: the collection holding the spectral state.

  Returns:
    ``{"prefix.key": tensor}`` (torch tensors, or numpy without torch).
  """
  out: dict[str, Any] = {}
  for prefix, layer in layers.items():
    path = tuple(p for p in layer.path.split("/") if p)
    params = _get(variables["params"], path)
    if params is None:
      raise ValueError(
        f"to_torch_state_dict: no Flax layer at 'params/{layer.path}' for '{prefix}'."
      )
    sub = {"params": params, collection: _get(variables.get(collection, {}), path) or {}}
    st = style or ("parametrizations" if layer.style == "plain" else layer.style)
    axis = layer.axis if layer.method else None
    for key, x in to_torch(sub, layer.kind, st, axis=axis, collection=collection).items():
      out[f"{prefix}.{key}" if prefix else key] = x
  return out
