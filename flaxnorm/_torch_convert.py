"""One layer between PyTorch and flaxnorm, one function per method and direction.

PyTorch -> flaxnorm (:func:`layer_from_torch`) and flaxnorm -> PyTorch
(:func:`layer_to_numpy`) for a plain weight, a weight norm and a spectral norm.
Layouts come from ``_torch_layouts``, key names from ``_torch_keys``; torch is
never imported here (``flaxnorm.interop`` turns the numpy result into tensors).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from flaxnorm import _checks, _options
from flaxnorm import linen as _linen
from flaxnorm._checks import Axis
from flaxnorm._torch_keys import STYLES, check_style, detect, keys_for
from flaxnorm._torch_layouts import (
  Kind,
  SpectralViews,
  View,
  flax_from_torch,
  kept_axis,
  kind_of,
  neg_axis,
  pick_view,
  settle_weight_norm_axis,
  shape_error,
  spectral_dim_of,
  spectral_views,
  torch_from_flax,
)

# (collection, Flax name) -> the PyTorch key (relative to the layer) it was read from.
Sources = dict[tuple[str, str], str]


class TorchLayer(NamedTuple):
  """One converted PyTorch layer and the flaxnorm wrapping that reproduces it.

  Attributes:
    variables: ``{"params": ..., "spectral": ...}`` for the Flax layer (jnp
      arrays; ``"spectral"`` only for spectral norm): ``{name}`` or
      ``{name}_g``/``{name}_v``, ``bias``, and ``{name}_u``/``{name}_v``/
      ``{name}_sigma``.
    kind: the layer kind, one of :data:`KINDS`; or ``"lstm"``, ``"gru"``,
      ``"rnn"`` for one side (``weight_ih_l0``, ``weight_hh_l0``) of a PyTorch
      recurrent module loaded into a Flax cell; ``"multihead_attention"`` for
      an ``nn.MultiheadAttention``'s packed q, k, v; ``"norm"`` for a
      normalization layer (``variables`` its ``scale``, ``bias`` and
      ``batch_stats``).
    method: ``"weight_norm"``, ``"spectral_norm"`` or ``None`` (plain weight).
    axis: the ``axis`` to give flaxnorm's transform (``None`` for a plain
      weight, or for a whole-tensor weight norm, PyTorch's ``dim=None``).
    name: the Flax param, ``"kernel"`` or ``"embedding"``.
    style: the key style read, ``"legacy"``, ``"parametrizations"`` or
      ``"plain"``; pass it to :func:`to_torch` to write the same keys back.
    path: the Flax path (``"a/b"``) when loaded by :func:`load_torch_state_dict`.
    continues: spectral norm only: the PyTorch API whose power-iteration order
      the converted state continues with ``axis``, ``"legacy"`` (``v`` first)
      or ``"parametrizations"`` (``u`` first); training steps match PyTorch's
      when it equals ``style``. ``None`` for other layers.
    spectral_dim: spectral norm only: PyTorch's ``dim`` (non-negative) the
      state was read with; :func:`to_torch_state_dict` writes it back with
      the same. ``None`` for other layers.
    bias: one side of a recurrent cell only (``kind`` ``"lstm"``, ``"gru"``
      or ``"rnn"``, ``path`` the Flax cell): whether the PyTorch module has
      biases (``bias=True``), so that :func:`to_torch_state_dict` writes
      ``bias_ih_l*``/``bias_hh_l*``. ``None`` for other layers, whose bias is
      the Flax layer's.
    in_axes: a ``linear`` layer whose Flax kernel has more than two axes (a
      ``DenseGeneral``/``LinearGeneral``, an attention's ``query`` ``(E, H,
      D)`` or ``out`` ``(H, D, E)``): how many of its leading axes are
      PyTorch's input features; the weight is read and written as the kernel
      reshaped to ``(prod(in), prod(out))``. ``None`` for a 2-D kernel.
    member: a layer of a stack (``nn.scan`` over layers, an ``nn.vmap`` or
      ``nnx.vmap`` ensemble; PyTorch's ``layers.3.fc`` into Flax's
      ``layers/fc``): its index on the params' leading axis, ``variables``
      holding its slices. ``None`` for other layers.

  Examples:
    >>> import numpy as np
    >>> from flaxnorm import interop
    >>> layer = interop.from_torch({"weight": np.ones((3, 4), np.float32)}, "linear")
    >>> layer.kind, layer.method, layer.style, layer.variables["params"]["kernel"].shape
    ('linear', None, 'plain', (4, 3))
  """

  variables: dict[str, Any]
  kind: str
  method: str | None
  axis: Axis
  name: str
  style: str
  path: str = ""
  continues: str | None = None
  spectral_dim: int | None = None
  bias: bool | None = None
  in_axes: int | None = None
  member: int | None = None

  def wrap(self, target: Any, **kwargs: Any) -> Any:
    """Applies the matching flaxnorm Linen transform to ``target``.

    Args:
      target: a Linen Module class or instance, e.g. ``nn.ConvTranspose(4, (3,))``.
      **kwargs: more arguments for the transform (e.g. ``eps``).

    Returns:
      ``flaxnorm.weight_norm(target, name=self.name, axis=self.axis, **kwargs)``
      or the spectral-norm equivalent (with the ``collection`` the state was
      converted into); ``target`` itself for a plain weight.

    Examples:
      >>> import flax.linen as nn
      >>> import jax
      >>> import numpy as np
      >>> from flaxnorm import interop
      >>> layer = interop.from_torch(
      ...   {"weight_g": np.ones((3, 1)), "weight_v": np.ones((3, 4)), "bias": np.zeros(3)}, "linear"
      ... )
      >>> dense = layer.wrap(nn.Dense(3))  # flaxnorm.weight_norm(nn.Dense(3), axis=-1)
      >>> dense.apply(layer.variables, np.ones((1, 4), np.float32)).shape
      (1, 3)
    """
    if self.method is None:
      return target
    if self.method == "weight_norm":
      return _linen.weight_norm(target, name=self.name, axis=self.axis, **kwargs)
    # The collection the state was converted into (from_torch's collection=).
    state = [c for c in self.variables if c != "params"]
    if state and "collection" not in kwargs:
      kwargs["collection"] = state[0]
    return _linen.spectral_norm(target, name=self.name, axis=self.axis, **kwargs)


class _Parts(NamedTuple):
  """One converted layer's arrays, before they become a :class:`TorchLayer`."""

  params: dict[str, Any]  # Flax name -> array in Flax layout
  state: dict[str, Any]  # spectral state, {name}_u/_v/_sigma (empty unless spectral)
  src: Sources
  axis: Axis  # the flaxnorm axis they were laid out for
  continues: str | None = None  # spectral: the PyTorch API whose iteration order they continue


class _Torch(NamedTuple):
  """One PyTorch layer being read: its kind, keys and numpy arrays."""

  k: Kind
  roles: dict[str, str]  # role -> key
  arrays: dict[str, np.ndarray]  # role -> array, PyTorch layout
  wrole: str  # the role of the weight: "v" for weight norm, else "w"
  where: str

  @property
  def w(self) -> np.ndarray:
    return self.arrays[self.wrole]

  @property
  def wkey(self) -> str:
    return self.roles[self.wrole]


def _to_numpy(x: Any, key: str, where: str) -> np.ndarray:
  """A numpy copy of a torch tensor, numpy or JAX array (no torch import).

  A copy: torch optimizers update tensors in place, and the result must not
  change with them.
  """
  if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch.Tensor
    if getattr(x, "is_meta", False):
      raise ValueError(
        f"{where}: '{key}' is a tensor on PyTorch's meta device, which holds no values (a "
        "model built under torch.device('meta')): load its weights into it first."
      )
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
      return x.float().numpy().astype(jnp.bfloat16)
    return x.numpy().copy()
  if isinstance(x, (np.ndarray, jax.Array, np.generic)):
    return np.array(x)
  raise TypeError(
    f"{where}: '{key}' must be a torch tensor, numpy or JAX array, got {type(x).__name__}."
  )


def as_matrix(w: np.ndarray, kept: View) -> np.ndarray:
  """``flaxnorm.as_matrix`` in numpy: the ``kept`` axes as rows, the rest as columns."""
  w = np.moveaxis(w, kept, tuple(range(len(kept))))
  return w.reshape(math.prod(w.shape[: len(kept)]), -1)


def _matrix_maps(
  k: Kind, torch_shape: tuple[int, ...], dim: int, kept: View
) -> tuple[np.ndarray, np.ndarray]:
  """Where each element of flaxnorm's matrix view sits in PyTorch's.

  PyTorch views the weight as ``moveaxis(w, dim, 0).reshape(m, n)``; flaxnorm
  views the converted kernel as ``as_matrix(kernel, kept)``.

  Returns:
    ``(rows, cols)``: int arrays of flaxnorm's matrix shape holding the
    PyTorch row and column of each element, so vectors can be permuted
    between the two.
  """
  moved = (torch_shape[dim], *(s for i, s in enumerate(torch_shape) if i != dim))
  m, n = moved[0], math.prod(moved[1:])
  rows = np.broadcast_to(np.arange(m).reshape((m,) + (1,) * (len(moved) - 1)), moved)
  cols = np.broadcast_to(np.arange(n).reshape((1, *moved[1:])), moved)

  def view(idx: np.ndarray) -> np.ndarray:
    return as_matrix(flax_from_torch(np.moveaxis(idx, 0, dim), k), kept)

  return view(rows), view(cols)


# --------------------------------------------------------------------------- #
# PyTorch -> flaxnorm.
# --------------------------------------------------------------------------- #


def _convert_from_torch(
  tensors: Mapping[str, Any],
  kind: str,
  axis: Axis,
  spectral_dim: int | None,
  collection: str,
  where: str,
) -> tuple[TorchLayer, Sources]:
  """``from_torch``, plus the PyTorch key behind each (collection, name) it fills."""
  k = kind_of(kind, where)
  if not isinstance(tensors, Mapping):
    raise TypeError(f"{where}: tensors must be a mapping of key -> tensor, got {type(tensors)}.")
  method, style, roles = detect(list(tensors), where)
  where = f"{where} ({kind}, {f'{style} {method}' if method else 'plain weight'})"
  arrays = {role: _to_numpy(tensors[key], key, where) for role, key in roles.items()}
  src = _Torch(k, roles, arrays, "v" if method == "weight_norm" else "w", where)
  if src.w.ndim != k.ndim or 0 in src.w.shape:
    raise shape_error(where, src.wkey, src.w.shape, f"{k.ndim} non-empty dims {k.torch_layout}", k)
  _checks.check_float_array(src.w, f"'{src.wkey}'", where, complex_ok=False)
  if method is None:
    parts = _plain_from_torch(src, axis)
  elif method == "weight_norm":
    parts = _weight_norm_from_torch(src, axis)
  else:
    parts = _spectral_from_torch(src, style, axis, spectral_dim, collection)
  if "bias" in tensors:
    parts.params["bias"], parts.src["params", "bias"] = (
      _bias_from_torch(tensors["bias"], src),
      "bias",
    )
  variables: dict[str, Any] = {"params": parts.params}
  if parts.state:
    variables[collection] = parts.state
  sdim = spectral_dim_of(k, spectral_dim, where) if method == "spectral_norm" else None
  layer = TorchLayer(variables, kind, method, parts.axis, k.param, style, "", parts.continues, sdim)
  return layer, parts.src


def _plain_from_torch(src: _Torch, axis: Axis) -> _Parts:
  """``weight`` -> ``{name}``."""
  if axis is not None:
    raise ValueError(f"{src.where}: axis={axis!r} given, but '{src.wkey}' is a plain weight.")
  n = src.k.param
  return _Parts({n: flax_from_torch(src.w, src.k)}, {}, {("params", n): src.wkey}, None)


def _weight_norm_from_torch(src: _Torch, axis: Axis) -> _Parts:
  """``g`` ``(out, 1, ...)`` (PyTorch's ``dim``) and ``v`` -> ``{name}_g``, ``{name}_v``."""
  k, w, g, where = src.k, src.w, src.arrays["g"], src.where
  gkey, vkey = src.roles["g"], src.roles["v"]
  dim = kept_axis(
    tuple(g.shape),
    tuple(w.shape),
    lambda: shape_error(
      where,
      gkey,
      g.shape,
      f"() for dim=None, or {w.shape}'s shape with size 1 on every axis but the kept "
      f"dim (e.g. {(w.shape[0],) + (1,) * (w.ndim - 1)} for dim=0) to go with "
      f"'{vkey}' of shape {w.shape}",
      k,
    ),
  )
  have = None if dim is None else (k.perm.index(dim),)
  out_axis = None if have is None else neg_axis(have, k.ndim)
  if axis is not None and _checks.normalize_axes(axis, k.ndim, where) != have:
    raise ValueError(
      f"{where}: '{gkey}' of shape {g.shape} keeps PyTorch dim {dim} of "
      f"{k.torch_layout}, which is Flax axis={out_axis!r} of {k.flax_layout}; "
      f"axis={axis!r} would compute a different norm. Wrap the Flax layer with "
      f"axis={out_axis!r} and leave the axis out here (it is read from '{gkey}')."
    )
  g_name, v_name = _options.weight_norm_keys(k.param)
  params = {g_name: flax_from_torch(g, k), v_name: flax_from_torch(w, k)}
  return _Parts(params, {}, {("params", g_name): gkey, ("params", v_name): vkey}, out_axis)


def _spectral_from_torch(
  src: _Torch, style: str, axis: Axis, spectral_dim: int | None, collection: str
) -> _Parts:
  """``weight_orig`` and PyTorch's ``u`` ``(m,)``, ``v`` ``(n,)`` -> ``{name}`` and its state.

  ``sigma`` is recomputed from the stored vectors (``u^T W v``), as PyTorch's
  evaluation does.
  """
  k, w, where = src.k, src.w, src.where
  dim = spectral_dim_of(k, spectral_dim, where)
  kernel = flax_from_torch(w, k)
  views = spectral_views(k, dim, kernel.shape)
  if "sv" not in src.arrays:  # a PyTorch < 1.1 checkpoint
    _check_vector(src, "u", views.m, dim)
    src.arrays["sv"], src.roles["sv"] = _recover_v(src, dim), src.roles["w_sn"]
  for role, size in (("u", views.m), ("sv", views.n)):
    _check_vector(src, role, size, dim)
  kept = _view_from_torch(views, style, axis, where)
  u, v = _vectors_from_torch(src, views, kept)
  # sigma = u^T W v, as PyTorch's evaluation computes it (numpy: no JAX compile per layer).
  sigma = np.asarray(u.astype(np.float64) @ as_matrix(kernel, kept).astype(np.float64) @ v)
  n, swap = k.param, kept != views.out  # transposed: flaxnorm's u is PyTorch's v
  u_name, v_name, sigma_name = _options.spectral_keys(n)
  sources = {
    ("params", n): src.wkey,
    (collection, u_name): src.roles["sv" if swap else "u"],
    (collection, v_name): src.roles["u" if swap else "sv"],
    (collection, sigma_name): src.wkey,
  }
  state = dict(zip((u_name, v_name, sigma_name), (u, v, sigma.astype(u.dtype))))
  continues = "parametrizations" if kept == views.transposed else "legacy"
  return _Parts({n: kernel}, state, sources, neg_axis(kept, k.ndim), continues)


def _check_vector(src: _Torch, role: str, size: int, dim: int) -> None:
  """Raises unless PyTorch's vector ``role`` (``u`` or ``sv``) has shape ``(size,)``."""
  x, w = src.arrays[role], src.w
  if x.shape != (size,):
    raise shape_error(
      src.where,
      src.roles[role],
      x.shape,
      f"({size},) for '{src.wkey}' of shape {w.shape} with spectral_dim={dim} "
      f"(PyTorch's matrix view moves dim {dim} to the rows)",
      src.k,
    )


def _recover_v(src: _Torch, dim: int) -> np.ndarray:
  """PyTorch's ``v`` of a checkpoint written before version 1.1, as its load hook finds it.

  Such a checkpoint has ``weight_orig`` ``W``, ``weight_u`` ``u`` and the
  normalized ``weight`` ``W / sigma``. As PyTorch does, ``sigma`` is the mean
  ratio of the two weights and ``v`` solves ``W v = u`` (least squares), scaled
  so that ``u^T W v = sigma``: evaluation gives PyTorch's weight, and a training
  step recomputes ``v`` from ``u`` first anyway.
  """
  w, w_sn = src.w.astype(np.float64), src.arrays["w_sn"].astype(np.float64)
  key = src.roles["w_sn"]
  if w_sn.shape != w.shape:
    raise shape_error(src.where, key, w_sn.shape, f"{w.shape}, the shape of '{src.wkey}'", src.k)
  with np.errstate(divide="ignore", invalid="ignore"):
    sigma = float(np.mean((w / w_sn)[w_sn != 0])) if np.any(w_sn != 0) else float("nan")
  mat = np.moveaxis(w, dim, 0).reshape(w.shape[dim], -1)
  v = np.linalg.lstsq(mat, src.arrays["u"].astype(np.float64), rcond=None)[0]
  uwv = float(src.arrays["u"].astype(np.float64) @ mat @ v)
  if not (np.isfinite(sigma) and sigma > 0 and np.isfinite(uwv) and uwv != 0):
    raise ValueError(
      f"{src.where}: cannot recover PyTorch < 1.1's 'weight_v' from '{key}', '{src.wkey}' and "
      f"'{src.roles['u']}': sigma = mean('{src.wkey}' / '{key}') is {sigma}, u^T W pinv(W) u "
      f"is {uwv}; expected positive finite numbers."
    )
  return (v * (sigma / uwv)).astype(src.w.dtype)


def _view_from_torch(views: SpectralViews, style: str, axis: Axis, where: str) -> View:
  """The view to convert to: ``axis``'s (checked), or the one that continues ``style`` exactly."""
  exact = views.exact(style)
  if axis is None:
    return exact
  kept = _checks.normalize_axes(axis, views.ndim, where)
  if kept not in (views.out, views.transposed):
    raise ValueError(
      f"{where}: axis={axis!r} does not fit PyTorch spectral_dim={views.dim}: use "
      f"{neg_axis(exact, views.ndim)!r} (continues PyTorch's power iteration exactly) or "
      f"{neg_axis(views.other(exact), views.ndim)!r}."
    )
  return kept


def _vectors_from_torch(
  src: _Torch, views: SpectralViews, kept: View
) -> tuple[np.ndarray, np.ndarray]:
  """PyTorch's ``u`` ``(m,)``/``v`` ``(n,)`` as flaxnorm's ``u``/``v`` for view ``kept``, >= float32."""
  rows, cols = _matrix_maps(src.k, tuple(src.w.shape), views.dim, kept)
  tu, tv = src.arrays["u"], src.arrays["sv"]
  if kept == views.out:
    u, v = tu[rows[:, 0]], tv[cols[0, :]]
  else:  # flaxnorm's rows are PyTorch's columns: u <-> v swap roles.
    u, v = tv[cols[:, 0]], tu[rows[0, :]]
  vec = jnp.promote_types(u.dtype, jnp.float32)
  return np.asarray(u, vec), np.asarray(v, vec)


def _bias_from_torch(bias: Any, src: _Torch) -> np.ndarray:
  """``bias`` ``(out,)`` (``(out,)`` of ``(in, out, *k)`` for ConvTranspose), checked."""
  k, w = src.k, src.w
  b = _to_numpy(bias, "bias", src.where)
  if k.bias_dim is None or b.shape != (w.shape[k.bias_dim],):
    expected = (
      "no bias (PyTorch's Embedding has none)"
      if k.bias_dim is None
      else f"({w.shape[k.bias_dim]},), axis {k.bias_dim} of '{src.wkey}' {w.shape}"
      + (" (grouped ConvTranspose is not supported by Flax)" if k.flip else "")
    )
    raise shape_error(src.where, "bias", b.shape, expected, k)
  return b


# --------------------------------------------------------------------------- #
# flaxnorm -> PyTorch.
# --------------------------------------------------------------------------- #


class _Flax(NamedTuple):
  """One Flax layer being written: its kind and unboxed numpy arrays."""

  k: Kind
  params: dict[str, np.ndarray]  # Flax name -> array, Flax layout
  state: dict[str, np.ndarray]  # the spectral state ({} unless spectral)
  collection: str
  where: str


def _convert_to_numpy(
  variables: Mapping[str, Any],
  kind: str,
  style: str,
  axis: Axis,
  spectral_dim: int | None,
  collection: str,
) -> dict[str, np.ndarray]:
  """``to_torch``, with numpy arrays for tensors (PyTorch layout, keys of ``style``)."""
  where = f"to_torch({kind!r})"
  k = kind_of(kind, where)
  if style != "plain":  # from_torch's style of a plain layer: fine for a plain one
    check_style(style, where)
  if not isinstance(variables, Mapping):
    raise TypeError(f"{where}: variables must be a mapping, got {type(variables).__name__}.")
  src = _Flax(k, *_flax_arrays(variables, collection), collection, where)
  method = _flax_method(src)
  if style == "plain" and method is not None:
    raise ValueError(
      f"{where}: style 'plain' is for a plain layer, but these variables hold {method}; "
      f"expected one of {list(STYLES)}."
    )
  keys = keys_for(method, style)
  wkey = _options.weight_norm_keys(k.param)[1] if method == "weight_norm" else k.param
  w = src.params[wkey]
  _checks.check_float_array(w, f"param '{wkey}'", where, complex_ok=False)
  if w.ndim != k.ndim or 0 in w.shape:
    raise ValueError(
      f"{where}: param '{wkey}' has shape {w.shape}, which fits no {k.name} layout: "
      f"expected {k.ndim} non-empty dims, {k.flax_layout}."
    )
  if method is None:
    out = {keys["w"]: torch_from_flax(w, k)}
  elif method == "weight_norm":
    out = _weight_norm_to_torch(src, keys, axis)
  else:
    out = _spectral_to_torch(src, keys, axis, spectral_dim)
  if "bias" in src.params:
    out["bias"] = src.params["bias"]
  return out


def _flax_arrays(
  variables: Mapping[str, Any], collection: str
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(params, spectral state) as unboxed numpy.

  Bare params (no ``"params"`` key, the tree face's layout) may hold the
  layer's state under ``collection`` beside them.
  """
  if isinstance(variables.get("params"), Mapping):
    params, state = variables["params"], variables.get(collection, {})
  else:  # bare params (the tree face): the layer's state may sit beside them
    state = variables.get(collection, {})
    state = state if isinstance(state, Mapping) else {}
    params = {key: x for key, x in variables.items() if not (key == collection and state)}
  return (
    {key: np.asarray(meta.unbox(x)) for key, x in params.items()},
    {key: np.asarray(meta.unbox(x)) for key, x in state.items()},
  )


def _flax_method(src: _Flax) -> str | None:
  """The method a Flax layer's variables hold; raises on a missing or an extra param."""
  k, params, n = src.k, src.params, src.k.param
  g_name, v_name = _options.weight_norm_keys(n)
  if g_name in params and v_name in params:
    method = "weight_norm"
  elif n in params:
    method = "spectral_norm" if _options.spectral_keys(n)[0] in src.state else None
  else:
    raise ValueError(
      f"{src.where}: params have no '{n}' nor '{n}_g'/'{n}_v' (found {sorted(params)}); "
      f"a {k.name} layer's Flax param is {k.flax_layout}."
    )
  allowed = {n, g_name, v_name, "bias"} if method == "weight_norm" else {n, "bias"}
  extra = sorted(set(params) - allowed)
  if extra or (method == "weight_norm" and n in params):
    raise ValueError(
      f"{src.where}: unexpected params {extra or [n]} beside the {method or 'plain'} "
      f"'{n}' (found {sorted(params)})."
    )
  return method


def _weight_norm_to_torch(src: _Flax, keys: Mapping[str, str], axis: Axis) -> dict[str, np.ndarray]:
  """``{name}_g`` and ``{name}_v`` -> PyTorch's ``g`` (size 1 but on ``dim``) and ``v``."""
  k, n, where = src.k, src.k.param, src.where
  g, w = (src.params[key] for key in _options.weight_norm_keys(n))
  a = kept_axis(
    tuple(g.shape),
    tuple(w.shape),
    lambda: ValueError(
      f"{where}: param '{n}_g' of shape {g.shape} does not fit '{n}_v' of shape "
      f"{w.shape}: expected () or size 1 on every axis but one (what "
      "flaxnorm.weight_norm makes)."
    ),
  )
  if axis is not None:
    asked = _checks.normalize_axes(axis, k.ndim, where)
    if asked != (() if a is None else (a,)):
      raise ValueError(
        f"{where}: '{n}_g' of shape {g.shape} keeps axis "
        f"{None if a is None else a - k.ndim}, not axis={axis!r}."
      )
  return {keys["g"]: torch_from_flax(g, k), keys["v"]: torch_from_flax(w, k)}


def _spectral_to_torch(
  src: _Flax, keys: Mapping[str, str], axis: Axis, spectral_dim: int | None
) -> dict[str, np.ndarray]:
  """``{name}`` and its ``u``/``v`` (either view) -> PyTorch's weight, ``u`` ``(m,)``, ``v`` ``(n,)``."""
  k, n, where = src.k, src.k.param, src.where
  u_name, v_name, _ = _options.spectral_keys(n)
  w, u, v = src.params[n], src.state[u_name], src.state.get(v_name)
  if v is None:
    raise ValueError(
      f"{where}: '{src.collection}' has '{n}_u' but no '{n}_v' (found {sorted(src.state)})."
    )
  views = spectral_views(k, spectral_dim_of(k, spectral_dim, where), tuple(w.shape))
  kept = _flax_view(src, views, tuple(u.shape), tuple(v.shape), axis)
  torch_w = torch_from_flax(w, k)
  rows, cols = _matrix_maps(k, tuple(torch_w.shape), views.dim, kept)
  # Each PyTorch vector keeps the dtype of the flaxnorm vector it comes from.
  if kept == views.out:
    tu, tv = np.empty((views.m,), u.dtype), np.empty((views.n,), v.dtype)
    tu[rows[:, 0]], tv[cols[0, :]] = u, v
  else:
    tu, tv = np.empty((views.m,), v.dtype), np.empty((views.n,), u.dtype)
    tv[cols[:, 0]], tu[rows[0, :]] = u, v
  return {keys["w"]: torch_w, keys["u"]: tu, keys["sv"]: tv}


def _flax_view(
  src: _Flax,
  views: SpectralViews,
  u_shape: tuple[int, ...],
  v_shape: tuple[int, ...],
  axis: Axis,
) -> View:
  """The view a Flax layer's ``u``/``v`` are laid out for: ``axis``'s (checked) or their shapes'."""
  n, where, ndim = src.k.param, src.where, views.ndim
  w_shape = tuple(src.params[n].shape)
  out, t = neg_axis(views.out, ndim), neg_axis(views.transposed, ndim)
  if axis is not None:
    kept = _checks.normalize_axes(axis, ndim, where)
    if kept not in (views.out, views.transposed):
      raise ValueError(
        f"{where}: axis={axis!r} does not fit PyTorch spectral_dim={views.dim}: the Flax "
        f"layer must keep {out!r} (PyTorch's matrix view) or {t!r} (its transpose)."
      )
    if kept not in views.fitting(u_shape, v_shape):
      raise ValueError(
        f"{where}: state '{n}_u' {u_shape} / '{n}_v' {v_shape} does not fit param "
        f"'{n}' {w_shape} with axis={axis!r}."
      )
    return kept
  kept = pick_view(
    views,
    u_shape,
    v_shape,
    lambda: (
      f"{where}: '{n}_u' and '{n}_v' both have size {views.m}, so the axis the layer "
      f"was wrapped with cannot be read from their shapes; pass axis= ({out!r} or {t!r})."
    ),
  )
  if kept is None:
    raise ValueError(
      f"{where}: state '{n}_u' {u_shape} / '{n}_v' {v_shape} does not fit param "
      f"'{n}' {w_shape} ({src.k.flax_layout}) for PyTorch spectral_dim={views.dim}: expected "
      f"({views.m},)/({views.n},) or, transposed, ({views.n},)/({views.m},)."
    )
  return kept


def _wn_shapes(tensors: Mapping[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
  """PyTorch weight norm's ``(g, v)`` shapes, of either key style; ``None`` for another layer."""
  for style in STYLES:
    keys = keys_for("weight_norm", style)
    if keys["g"] in tensors and keys["v"] in tensors:
      return tuple(np.shape(tensors[keys["g"]])), tuple(np.shape(tensors[keys["v"]]))
  return None


def layer_from_torch(
  tensors: Mapping[str, Any],
  kind: str,
  axis: Axis,
  spectral_dim: int | None,
  collection: str,
  where: str,
) -> tuple[TorchLayer, Sources]:
  """``from_torch``, plus the PyTorch key behind each (collection, name) it fills.

  A weight norm whose ``g`` fits several axes takes ``axis`` or dim 0.
  """
  shapes = _wn_shapes(tensors)
  settled = None
  if shapes is not None:
    settled = settle_weight_norm_axis(kind_of(kind, where), shapes, axis, True, where)
  if settled is None:
    return _convert_from_torch(tensors, kind, axis, spectral_dim, collection, where)
  layer, src = _convert_from_torch(tensors, kind, settled[0], spectral_dim, collection, where)
  return layer._replace(axis=settled[1]), src


def layer_to_numpy(
  variables: Mapping[str, Any],
  kind: str,
  style: str,
  axis: Axis,
  spectral_dim: int | None,
  collection: str,
) -> dict[str, np.ndarray]:
  """``to_torch`` as numpy arrays. A weight norm whose ``g`` fits several axes accepts any of them.

  They all give the same PyTorch tensors (``g`` is all ones then).
  """
  where = f"to_torch({kind!r})"
  k = kind_of(kind, where)
  params = variables.get("params") if isinstance(variables, Mapping) else None
  params = params if isinstance(params, Mapping) else variables
  g_name, v_name = _options.weight_norm_keys(k.param)
  if isinstance(params, Mapping) and g_name in params and v_name in params:
    shapes = tuple(np.shape(meta.unbox(params[n])) for n in (g_name, v_name))
    if settle_weight_norm_axis(k, (shapes[0], shapes[1]), axis, False, where) is not None:
      axis = None
  return _convert_to_numpy(variables, kind, style, axis, spectral_dim, collection)
