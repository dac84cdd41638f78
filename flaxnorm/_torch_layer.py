"""One PyTorch layer into one Flax layer: the conversion, the checks, the fill.

Shared by whole-model loading (``_torch_model``) and by the modules of several
Flax layers (``_torch_composite``): a job (:class:`_Load`) holds the state
dict and the variables being filled; a target (:class:`_Target`) is one Flax
layer's dicts in them, filled in place. A Linear into a kernel of more axes
(``DenseGeneral``) goes through the kernel's ``(in, out)`` view.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from flax.core import meta

from flaxnorm import _checks, _options
from flaxnorm._checks import Axis
from flaxnorm._torch_convert import Sources, TorchLayer, _to_numpy, layer_from_torch
from flaxnorm._torch_keys import detect, join
from flaxnorm._torch_layouts import (
  KIND_BY_RANK,
  LAYOUTS,
  Kind,
  flax_from_torch,
  kept_axis,
  kind_of,
  neg_axis,
  pick_view,
  spectral_dim_of,
  spectral_views,
)
from flaxnorm._torch_paths import KeyMap, Path, resolve, torch_prefix
from flaxnorm._torch_plain import TorchParam, shapes_fit
from flaxnorm._torch_targets import FlaxLayer

_WHERE = "load_torch_state_dict"


#: Where the wrapping functions of a hint live.
_FACES = " (flaxnorm.* for Linen, flaxnorm.nnx.* for NNX)"


class _Load(NamedTuple):
  """One ``load_torch_state_dict`` call: its inputs and what it has done so far."""

  state_dict: Mapping[str, Any]
  out: dict[str, Any]  # the variables being filled (a copy of the input)
  kinds: dict[str, str]
  axes: dict[str, Axis]
  spectral_dims: dict[str, int]
  collection: str
  unused: dict[str, str]  # PyTorch key -> why
  plain: dict[str, TorchParam]  # PyTorch key -> the Flax param it loaded into by name
  filled: set[tuple[str, ...]]  # (collection, *path, name)
  model: dict[tuple[str, ...], FlaxLayer]  # what the Flax model says per path ({}: no model)
  strict: bool
  # Stacked leaves being filled one member at a time: (collection, *path, name) -> the numpy
  # array and the members written.
  stacks: dict[tuple[str, ...], tuple[np.ndarray, set[int]]]


class _Target(NamedTuple):
  """A PyTorch layer and the Flax layer it fills (dicts of the output tree, filled in place)."""

  prefix: str  # the PyTorch layer prefix, "ups.0"
  entries: dict[str, str]  # its keys: layer key ("weight_g") -> state-dict key ("ups.0.weight_g")
  path: tuple[str, ...]  # the Flax path, ("ups_0",)
  params: dict[str, Any]
  state: dict[str, Any] | None  # the Flax layer's entries in the spectral collection
  collection: str
  where: str  # "load_torch_state_dict: layer 'ups.0' -> 'params/ups_0'"
  member: int | None = None  # a member of a stacked layer: its index on the leading axis
  stats: dict[str, Any] | None = None  # a BatchNorm's entries in batch_stats

  def dicts(self) -> dict[str, dict[str, Any] | None]:
    """Collection -> the layer's dict in it (``None`` where it has none)."""
    return {"params": self.params, self.collection: self.state, "batch_stats": self.stats}

  @property
  def fpath(self) -> str:
    return "/".join(self.path)


def _get(tree: Any, path: tuple[str, ...]) -> Any:
  """The sub-mapping at ``path``, or ``None`` when there is none (or it is a leaf)."""
  for p in path:
    if not isinstance(tree, Mapping) or p not in tree:
      return None
    tree = tree[p]
  return tree if isinstance(tree, Mapping) else None


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(meta.unbox(x).shape)


def _under(prefix: str, key: str) -> bool:
  """Whether PyTorch layer ``prefix`` is ``key`` or below it (``"ups.0"`` is under ``"ups"``)."""
  return prefix == key or key == "" or prefix.startswith(key + ".")


def _lookup(given: Mapping[str, Any], prefix: str) -> Any:
  """``given``'s entry for ``prefix``: its own, else the longest key it is under; else ``None``."""
  keys = [key for key in given if _under(prefix, key)]
  return given[max(keys, key=len)] if keys else None


def _kind(job: _Load, t: _Target, info: FlaxLayer | None) -> str | None:
  """``kinds[prefix]``, else the Flax model's layer class, else the tree and the weight's rank."""
  given = _lookup(job.kinds, t.prefix)
  if given is not None:
    family = re.sub(r"\d+d$", "", given)  # conv_transpose1d -> conv_transpose
    if info is not None and info.family is not None and family != info.family:
      raise ValueError(
        f"{t.where}: kinds['{t.prefix}']={given!r}, but the Flax layer is a {info.cls} "
        f"({info.family}): its weight would be converted to another layout. Leave kinds out "
        "for this layer (the model's class is used)."
      )
    return given
  wkey = _weight_key(t)
  ndim = len(np.shape(job.state_dict[wkey]))
  if info is not None and info.family is not None:
    if info.family in ("linear", "embedding"):
      return info.family
    return f"{info.family}{ndim - 2}d" if 3 <= ndim <= 5 else None
  if any(x.startswith("embedding") for x in t.params):
    return "embedding"
  kind = KIND_BY_RANK.get(ndim)
  if kind is not None and kind.startswith("conv"):
    _check_not_transposed(job.state_dict[wkey], t, kind)
  return kind


def _weight_key(t: _Target) -> str:
  """The PyTorch key of the layer's weight (``weight_v`` for a weight norm: ``g`` is no weight)."""
  _, _, roles = detect(list(t.entries), t.where)
  return t.entries[roles["v" if "g" in roles else "w"]]


def _check_rank(job: _Load, t: _Target, k: Kind) -> None:
  """Raises if the Flax weight's rank is not the PyTorch kind's (a Conv1d into a 2-D conv)."""
  for key in (k.param, _options.weight_norm_keys(k.param)[1]):
    shape = _shape(t.params[key]) if key in t.params else None
    if shape is not None and len(shape) != k.ndim:
      wkey = _weight_key(t)
      raise ValueError(
        f"{t.where}: PyTorch '{wkey}' of shape {tuple(np.shape(job.state_dict[wkey]))} is a "
        f"{k.name} weight {k.torch_layout}, rank {k.ndim} ({k.flax_layout}), but the Flax "
        f"'{key}' has shape {shape}, rank {len(shape)}: not the same kind of layer (does "
        "key_map point at the right layer?)."
      )


def _load_layer(job: _Load, t: _Target) -> TorchLayer | str:
  """Converts one PyTorch layer, checks it against its target and fills the target.

  Returns:
    The layer (with its Flax ``path``), or why it is no layer interop
    converts (its kind cannot be told; its tensors may still load by name).
  """
  if t.member is not None:
    return _load_member(job, t, t.member)
  if _is_norm(job, t):
    return _load_norm(job, t)
  if set(t.entries) & set(NORM_BUFFERS):
    return NORM_HINT
  split = _in_axes(job, t)
  if split is not None:
    return _load_as_matrix(job, t, split)
  info = job.model.get(t.path)
  if info is not None and info.unsupported:
    raise ValueError(f"{t.where}: the Flax {info.cls}: {info.unsupported}.")
  kind = _kind(job, t, info)
  if kind is None:
    rank = len(np.shape(job.state_dict[_weight_key(t)]))
    if info is not None and info.family is None:
      return f"a weight for the Flax {info.cls}, which is no linear, conv or embedding layer"
    if info is not None:
      return f"a weight of rank {rank}, which the Flax {info.cls} ({info.family}) does not take"
    return f"a weight of rank {rank}: not a linear/conv/embedding layer"
  k = kind_of(kind, f"{_WHERE}: kinds['{t.prefix}']")
  _check_rank(job, t, k)
  tmethod = _target_method(t, k.param)
  if (
    tmethod == "missing"
    and (info is None or info.family is None)
    and set(t.entries) <= set(t.params)
  ):
    return f"the Flax layer has params of its names ({sorted(t.entries)})"  # they load by name
  tensors = {s: job.state_dict[key] for s, key in t.entries.items()}
  sdim = _lookup(job.spectral_dims, t.prefix)
  _check_spectral_dim(tensors, k, t, sdim)

  def convert(axis: Axis) -> tuple[TorchLayer, Sources]:
    return layer_from_torch(tensors, kind, axis, sdim, job.collection, t.where)

  given_axis = _lookup(job.axes, t.prefix)
  layer, src = convert(given_axis)
  dim = k.sn_dim  # spectral_dims concern spectral layers only
  if layer.method == "spectral_norm":
    dim = spectral_dim_of(k, sdim, f"{_WHERE}: spectral_dims['{t.prefix}']")
  wrapped = info.wrapped.get(k.param) if info is not None else None  # (method, kept axes)
  _check_given_axis(given_axis, layer, wrapped, t, k)
  if given_axis is not None or layer.method is None:
    pass
  elif wrapped is not None and wrapped[0] == layer.method:
    # The model's axis: weight norm's is checked against PyTorch's dim, spectral norm's lays
    # the state out for its view.
    axis = neg_axis(wrapped[1], k.ndim) if wrapped[1] else None
    if axis != layer.axis:
      layer, src = convert(axis)
  elif wrapped is None and layer.method == tmethod == "spectral_norm":
    view = _target_view(layer, t, k, dim)
    if view is not None:
      layer, src = convert(neg_axis(view, k.ndim))
  if layer.method == "spectral_norm" and tmethod is None:
    _check_collection_found(job, t, wrapped is not None and wrapped[0] == layer.method)
  _check_wrapping(layer, t, k, tmethod)
  _check_order(job, layer, t, k, dim)
  variables = _fill(job, layer, src, t, k)
  return layer._replace(variables=variables, path="/".join(t.path))


def _load_plain(job: _Load, key_map: KeyMap, key: str, why: str) -> None:
  """Loads PyTorch ``key`` (``"a.b.alpha"``) as is into the Flax param of its name and shape.

  For the tensors of no layer interop converts (a Snake ``alpha``, a bias
  alone); when there is no such param, ``key`` goes to ``job.unused`` with
  ``why`` and the reason.
  """
  prefix, _, name = key.rpartition(".")
  path = resolve(key_map, prefix, job.out["params"])
  node = None if path is None or isinstance(path, str) else _get(job.out["params"], path)
  raw = None if node is None else node.get(name)
  shape = tuple(np.shape(job.state_dict[key]))
  flax_key = f"params/{'/'.join((*path, name))}" if isinstance(path, tuple) else ""
  if path is None or isinstance(path, str):
    reason = "key_map skips it" if path is None else path
  elif node is None or raw is None or isinstance(raw, Mapping):
    reason = f"no Flax param '{flax_key}'"
  elif not shapes_fit(shape, _shape(raw)):
    reason = f"shape {shape}, but the Flax '{flax_key}' has shape {_shape(raw)}"
  else:
    arr = _to_numpy(job.state_dict[key], key, _WHERE).astype(meta.unbox(raw).dtype, copy=False)
    arr = jax.device_put(arr.reshape(_shape(raw)))
    node[name] = raw.replace_boxed(arr) if isinstance(raw, meta.AxisMetadata) else arr
    job.filled.add(("params", *path, name))
    job.plain[key] = TorchParam("/".join((*path, name)), shape)
    return
  job.unused[key] = f"{why}; {reason}"


# --------------------------------------------------------------------------- #
# Normalization layers: LayerNorm, GroupNorm, BatchNorm, RMSNorm, InstanceNorm.
# --------------------------------------------------------------------------- #

#: PyTorch's buffers of a BatchNorm (or an InstanceNorm with track_running_stats).
NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
#: PyTorch key -> (Flax collection, name) of a normalization layer.
_NORM_KEYS = {
  "weight": ("params", "scale"),
  "bias": ("params", "bias"),
  "running_mean": ("batch_stats", "mean"),
  "running_var": ("batch_stats", "var"),
}
NORM_HINT = (
  "a normalization layer's tensors, but its Flax target is no LayerNorm, GroupNorm, BatchNorm, "
  "RMSNorm or InstanceNorm (no 'scale')"
)


def _is_norm(job: _Load, t: _Target) -> bool:
  """Whether the target is a normalization layer: by the model's class, else by its ``scale``."""
  info = job.model.get(t.path)
  if info is not None and info.family is not None:
    return info.family == "norm"
  return "scale" in t.params and not {"kernel", "kernel_v", "embedding"} & set(t.params)


def _load_norm(job: _Load, t: _Target) -> TorchLayer:
  """Fills a Flax normalization layer: weight -> scale, bias, running_mean/var -> batch_stats.

  ``num_batches_tracked`` has no Flax counterpart (a cumulative average,
  PyTorch's ``momentum=None``, has none either) and is read as used.
  """
  written: dict[str, dict[str, Any]] = {}
  for key, sd_key in t.entries.items():
    if key == "num_batches_tracked":
      continue
    if key not in _NORM_KEYS:
      raise ValueError(
        f"{t.where}: PyTorch '{sd_key}' is no key of a normalization layer (weight, bias, "
        f"running_mean, running_var, num_batches_tracked)."
      )
    col, name = _NORM_KEYS[key]
    tgt = t.dicts()[col]
    if tgt is None or name not in tgt:
      raise ValueError(
        f"{t.where}: PyTorch '{sd_key}' has no Flax counterpart '{col}/{t.fpath}/{name}' (the "
        f"layer has params {sorted(t.params)}{'' if t.stats is None else f', batch_stats {sorted(t.stats)}'}); "
        "e.g. use_scale=False or use_bias=False in Flax, elementwise_affine=True or affine=True "
        "in PyTorch?"
      )
    raw = tgt[name]
    shape = _shape(raw)
    arr = _to_numpy(job.state_dict[sd_key], sd_key, t.where)
    if arr.size != _size(shape):
      raise ValueError(
        f"{t.where}: shape mismatch for PyTorch '{sd_key}' of shape {arr.shape}: the Flax "
        f"'{col}/{t.fpath}/{name}' has shape {shape}."
      )
    arr = jax.device_put(arr.reshape(shape).astype(meta.unbox(raw).dtype, copy=False))
    tgt[name] = raw.replace_boxed(arr) if isinstance(raw, meta.AxisMetadata) else arr
    written.setdefault(col, {})[name] = arr
    job.filled.add((col, *t.path, name))
  return TorchLayer(written, "norm", None, None, "scale", "plain", t.fpath)


def norm_to_numpy(
  params: Mapping[str, Any], stats: Mapping[str, Any] | None
) -> dict[str, np.ndarray]:
  """A Flax normalization layer's PyTorch tensors (a BatchNorm's buffers with ``stats``)."""
  out = {}
  for key, (col, name) in _NORM_KEYS.items():
    src = params if col == "params" else stats or {}
    if name in src:
      out[key] = np.asarray(meta.unbox(src[name]))
  if stats:
    out["num_batches_tracked"] = np.array(0, np.int64)
  return out


# --------------------------------------------------------------------------- #
# A member of a stacked layer (nn.scan over layers, nn.vmap or nnx.vmap ensembles).
# --------------------------------------------------------------------------- #


def _member(x: Any, i: int) -> Any:
  """Member ``i`` of a stacked leaf (unboxed): its slice on the leading axis."""
  x = meta.unbox(x)
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype)
  return np.asarray(x)[i]


def _member_info(info: FlaxLayer, where: str) -> FlaxLayer:
  """The model's stacked layer as one member: kept axes without the stack axis."""
  wrapped = {}
  for name, (method, kept) in info.wrapped.items():
    if any(a < info.stacked for a in kept):
      raise ValueError(
        f"{where}: the Flax layer's {method} keeps axis {min(kept)} of its stacked '{name}', "
        "the stack axis: each member would be normalized with the others, which no PyTorch "
        "layer of the stack is."
      )
    wrapped[name] = (method, tuple(a - info.stacked for a in kept))
  return info._replace(wrapped=wrapped, stacked=0)


def _load_member(job: _Load, t: _Target, i: int) -> TorchLayer | str:
  """Loads a PyTorch layer into member ``i`` of a stacked Flax layer.

  The member's slices are filled as a layer of their own, then copied into
  ``job.stacks``; :func:`write_stacks` puts the stacked arrays in place.
  """
  sliced = {
    col: None if d is None else {n: _member(x, i) for n, x in d.items()}
    for col, d in t.dicts().items()
  }
  view = t._replace(
    params=sliced["params"],
    state=sliced[t.collection],
    stats=sliced["batch_stats"],
    member=None,
  )
  model = dict(job.model)
  if t.path in model:
    model[t.path] = _member_info(model[t.path], t.where)
  member = job._replace(model=model, filled=set())
  layer = _load_layer(member, view)
  if isinstance(layer, str):
    return layer
  for col, *_, name in member.filled:
    src = view.dicts()[col] or {}
    raw = meta.unbox((t.dicts()[col] or {})[name])
    key = (col, *t.path, name)
    if key not in job.stacks:
      job.stacks[key] = (np.zeros(raw.shape, raw.dtype), set())
    array, done = job.stacks[key]
    array[i] = np.asarray(src[name])
    done.add(i)
  return layer._replace(member=i)


class _Model(NamedTuple):
  """What saving reads from a Flax model: its layers, variables, naming and spectral dims."""

  layers: Mapping[tuple[str, ...], FlaxLayer]
  variables: Mapping[str, Any]
  naming: tuple[set[Path], bool]  # torch_prefix's Sequential paths and NNX flag
  spectral_dims: Mapping[str, int]

  def prefix(self, path: Path) -> str:
    return torch_prefix(path, self.variables["params"], *self.naming)


def member_prefixes(
  params: Mapping[str, Any], path: Path, naming: tuple[set[Path], bool]
) -> list[str]:
  """The PyTorch prefix of each member of the stacked module at ``path``.

  The index goes after the outermost module of the path whose params all have
  the stack's leading size (the ``nn.scan``/``nn.vmap`` module, or the
  ``nnx.vmap``-made layer itself): ``layers/fc`` -> ``layers.0.fc``, ...
  ``naming`` is :func:`~flaxnorm._torch_paths.torch_prefix`'s Sequential
  paths and NNX flag.
  """
  size = _leaf_shapes(_get(params, path))[0][:1]
  k = next(
    k
    for k in range(1, len(path) + 1)
    if all(s[:1] == size for s in _leaf_shapes(_get(params, path[:k])))
  )
  head, full = (torch_prefix(p, params, *naming) for p in (path[:k], path))
  return [f"{join(head, str(i))}{full[len(head) :]}" for i in range(size[0])]


def _leaf_shapes(tree: Any) -> list[tuple[int, ...]]:
  if isinstance(tree, Mapping):
    return [s for x in tree.values() for s in _leaf_shapes(x)]
  return [_shape(tree)]


def write_stacks(job: _Load, complete: bool) -> None:
  """Puts the stacked arrays filled member by member into ``job.out``.

  Args:
    job: the load.
    complete: ``True``: mark those with every member written as filled (call
      before the unmatched leaves are listed); ``False``: write them all, a
      partial one over the target's values (its other members kept).
  """
  for key, (array, done) in job.stacks.items():
    if complete:
      if done == set(range(array.shape[0])):
        job.filled.add(key)
      continue
    node = _get(job.out[key[0]], key[1:-1])
    assert node is not None
    raw = node[key[-1]]
    base = meta.unbox(raw)
    out = array if isinstance(base, jax.ShapeDtypeStruct) else np.array(base)
    members = sorted(done)
    out[members] = array[members]
    arr = jax.device_put(out)
    node[key[-1]] = raw.replace_boxed(arr) if isinstance(raw, meta.AxisMetadata) else arr


# --------------------------------------------------------------------------- #
# A PyTorch Linear into a Flax kernel of more axes (DenseGeneral, LinearGeneral).
# --------------------------------------------------------------------------- #


def _in_axes(job: _Load, t: _Target) -> int | None:
  """How many leading axes of the target's kernel are a PyTorch Linear's inputs, when it has > 2.

  ``None`` for a 2-D kernel, a layer that is no Linear (by ``kinds`` or the
  weight's rank), or a kernel no split of which gives the weight's sizes.
  """
  kernel = t.params.get("kernel", t.params.get("kernel_v"))
  given = _lookup(job.kinds, t.prefix)
  info = job.model.get(t.path)
  family = None if info is None else info.family
  if kernel is None or len(_shape(kernel)) <= 2 or given not in (None, "linear"):
    return None
  if family not in (None, "linear"):  # a Conv's kernel: the normal path checks the kind
    return None
  try:
    wshape = tuple(np.shape(job.state_dict[_weight_key(t)]))
  except ValueError:  # no weight among the keys: the normal path says so
    return None
  shape = _shape(kernel)
  if len(wshape) != 2:
    return None
  fits = [
    k
    for k in range(1, len(shape))
    if _size(shape[:k]) == wshape[1] and _size(shape[k:]) == wshape[0]
  ]
  if info is not None and info.in_axes is not None:  # the model's split (size-1 axes fit several)
    return info.in_axes if info.in_axes in fits else None
  return fits[0] if len(fits) == 1 else None


def _kernel_shape(params: Mapping[str, Any]) -> tuple[int, ...]:
  return _shape(params.get("kernel", params.get("kernel_v")))


def _kernel_ndim(params: Mapping[str, Any]) -> int:
  return len(_kernel_shape(params))


def _size(shape: tuple[int, ...]) -> int:
  return int(np.prod(shape, dtype=np.int64))


def _as_matrix(x: Any, name: str, k: int) -> Any:
  """``x`` (unboxed) reshaped to its 2-D view: a kernel (or its ``g``/``v``) ``(in, out)``, a bias ``(out,)``."""
  x = meta.unbox(x)
  shape = tuple(x.shape)
  view = (_size(shape),) if name == "bias" else (_size(shape[:k]), _size(shape[k:]))
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(view, x.dtype)
  return np.reshape(np.asarray(x), view)


def _matrix_info(info: FlaxLayer | None, where: str, k: int, ndim: int) -> FlaxLayer | None:
  """The model's layer as a Linear: its kernel's kept axes in the 2-D view."""
  if info is None:
    return None
  wrapped = {}
  for name, (method, kept) in info.wrapped.items():
    view = {(): (), tuple(range(k, ndim)): (1,), tuple(range(k)): (0,)}.get(tuple(sorted(kept)))
    if view is None:
      raise ValueError(
        f"{where}: the Flax layer's {method} keeps axes {kept} of its {ndim}-D '{name}', "
        f"whose first {k} axes are PyTorch's inputs: no axis of PyTorch's (out, in) weight "
        f"does that. Wrap it keeping all output axes {tuple(range(k - ndim, 0))} (PyTorch's "
        f"dim=0) or all input axes {tuple(range(-ndim, k - ndim))}."
      )
    wrapped[name] = (method, view)
  return info._replace(family="linear", wrapped=wrapped)


def _view_wrapping(
  info: FlaxLayer | None,
  shape: tuple[int, ...],
  k: int,
  prefix: str,
  spectral_dims: Mapping[str, int],
) -> tuple[str | None, Axis, str, int | None]:
  """:func:`_wrapping` of a kernel of more axes read as PyTorch's Linear (``k`` input axes).

  The axis is returned in the kernel's axes.
  """
  where = f"to_torch_state_dict: '{prefix}'"
  view = (_size(shape[:k]), _size(shape[k:]))
  info = _matrix_info(info, where, k, len(shape))
  method, axis, style, dim = _wrapping(
    info, "kernel", LAYOUTS["linear"], view, prefix, spectral_dims
  )
  return method, _kernel_axis(axis, k, len(shape)), style, dim


def _load_as_matrix(job: _Load, t: _Target, k: int) -> TorchLayer | str:
  """Loads a PyTorch Linear into a kernel of more axes through its ``(in, out)`` view."""
  names = [n for n in t.params if n in ("kernel", "kernel_g", "kernel_v", "bias")]
  view = {n: _as_matrix(t.params[n], n, k) for n in names}
  ndim = _kernel_ndim(t.params)
  model = dict(job.model)
  if t.path in model:
    model[t.path] = _matrix_info(model[t.path], t.where, k, ndim)  # type: ignore[assignment]
  layer = _load_layer(job._replace(model=model), t._replace(params=view))
  if isinstance(layer, str):
    return layer
  params = {}
  for name, arr in layer.variables["params"].items():
    raw = t.params[name]
    arr = jax.device_put(np.reshape(np.asarray(arr), _shape(raw)))  # no op to compile
    t.params[name] = raw.replace_boxed(arr) if isinstance(raw, meta.AxisMetadata) else arr
    params[name] = arr
  axis = _kernel_axis(layer.axis, k, ndim)
  return layer._replace(variables={**layer.variables, "params": params}, axis=axis, in_axes=k)


def _kernel_axis(axis: Axis, k: int, ndim: int) -> Axis:
  """A 2-D view's axis (``-1``: outputs, ``-2``: inputs) as the axes of the ``ndim``-D kernel."""
  if axis is None:
    return None
  picked = range(k - ndim, 0) if axis in (-1, 1, (-1,), (1,)) else range(-ndim, k - ndim)
  return tuple(picked) if len(picked) > 1 else picked[0]


def _view_axis(axis: Axis, k: int, ndim: int) -> Axis:
  """The inverse of :func:`_kernel_axis`: the 2-D view's axis of the kernel's axes ``axis``."""
  if axis is None:
    return None
  kept = _checks.normalize_axes(axis, ndim)
  views = {tuple(range(k, ndim)): -1, tuple(range(k)): -2}
  if kept not in views:
    raise ValueError(
      f"to_torch_state_dict: axis {axis!r} of a {ndim}-D kernel whose first {k} axes are "
      "PyTorch's inputs is no axis of PyTorch's (out, in) weight."
    )
  return views[kept]


# --------------------------------------------------------------------------- #
# The checks of one layer, and the fill.
# --------------------------------------------------------------------------- #


def _grouped(converted: tuple[int, ...], flax_shape: tuple[int, ...]) -> bool:
  """Whether the Flax kernel has ``groups`` times the converted one's outputs, all else equal."""
  out, want = converted[-1], flax_shape[-1]
  return converted[:-1] == flax_shape[:-1] and want > out > 0 and want % out == 0


def _check_given_axis(
  given: Axis | None,
  layer: TorchLayer,
  wrapped: tuple[str, tuple[int, ...]] | None,
  t: _Target,
  k: Kind,
) -> None:
  """Raises if ``axes`` gives a layer another axis than the Flax model wraps it with."""
  if given is None or wrapped is None or wrapped[0] != layer.method:
    return
  if _checks.normalize_axes(layer.axis, k.ndim) == wrapped[1]:  # both sorted, () for None
    return
  model_axis = neg_axis(wrapped[1], k.ndim) if wrapped[1] else None
  what = (
    "its g would have another shape"
    if layer.method == "weight_norm"
    else ("its state would be laid out for another matrix view (the outputs would differ)")
  )
  raise ValueError(
    f"{t.where}: axes['{t.prefix}']={given!r}, but the Flax layer is wrapped with "
    f"{layer.method}(..., axis={model_axis!r}): {what}. Leave axes out for this layer (the "
    f"model's axis is used), or wrap it with axis={layer.axis!r}."
  )


def _target_method(t: _Target, n: str) -> str | None:
  """``"weight_norm"``, ``"spectral_norm"``, ``None`` (plain) or ``"missing"`` (no ``n``)."""
  if _options.weight_norm_keys(n)[0] in t.params:
    return "weight_norm"
  if n in t.params and t.state is not None and _options.spectral_keys(n)[0] in t.state:
    return "spectral_norm"
  return None if n in t.params else "missing"


def _check_spectral_dim(tensors: Mapping[str, Any], k: Kind, t: _Target, sdim: int | None) -> None:
  """Raises if PyTorch's spectral ``u`` fits another ``dim`` than the default, none given."""
  method, _, roles = detect(list(tensors), t.where)
  if method != "spectral_norm" or sdim is not None:
    return
  w, u = (tuple(np.shape(tensors[roles[r]])) for r in ("w", "u"))
  if len(w) != k.ndim or u == (w[k.sn_dim],):
    return
  dims = [d for d in range(len(w)) if u == (w[d],)]
  if dims:
    raise ValueError(
      f"{t.where}: PyTorch '{t.entries[roles['u']]}' has shape {u}, the size of dim {dims[0]} "
      f"of '{t.entries[roles['w']]}' {w} ({k.name} {k.torch_layout}), not of PyTorch's default "
      f"spectral-norm dim={k.sn_dim}: pass spectral_dims={{'{t.prefix}': {dims[0]}}} (the dim "
      "its spectral_norm was applied with)."
    )


def _check_not_transposed(weight: Any, t: _Target, kind: str) -> None:
  """Raises if a conv's weight, not named in ``kinds``, fits the target as a ConvTranspose.

  Only as one: the kind is wrong. As both (a square layer, as many input as
  output channels): the variables cannot tell which, so ``kinds`` must name
  it (``kinds={"": "conv1d", "ups": "conv_transpose1d"}`` names every layer).
  """
  tk = t.params.get("kernel", t.params.get("kernel_v"))
  if tk is None:
    return
  tshape, wshape = _shape(tk), tuple(weight.shape)
  alt = f"conv_transpose{kind[-2:]}"
  as_conv = flax_from_torch(np.empty(wshape), LAYOUTS[kind]).shape
  as_transposed = flax_from_torch(np.empty(wshape), LAYOUTS[alt]).shape
  if as_conv == as_transposed == tshape:
    raise ValueError(
      f"{t.where}: PyTorch weight {wshape} fits the Flax kernel {tshape} both as {kind} "
      f"{LAYOUTS[kind].torch_layout} and as {alt} {LAYOUTS[alt].torch_layout} (as many input "
      "as output channels), and the variables do not say which the layer is: pass the Flax "
      f"model (it knows its ConvTranspose layers) or kinds={{'{t.prefix}': '{alt}'}} for a "
      f"ConvTranspose, kinds={{'{t.prefix}': '{kind}'}} for a Conv (a prefix names the layers "
      f"below it; kinds={{'': '{kind}', ...}} names every layer)."
    )
  if as_conv != tshape and as_transposed == tshape:
    raise ValueError(
      f"{t.where}: PyTorch weight {wshape} read as {kind} {LAYOUTS[kind].torch_layout} gives "
      f"{as_conv}, but the Flax kernel is {tshape}, which fits {alt} "
      f"{LAYOUTS[alt].torch_layout}. If this is a ConvTranspose, pass the Flax model (it knows its "
      f"ConvTranspose layers) or kinds={{'{t.prefix}': '{alt}'}}."
    )


def _target_view(layer: TorchLayer, t: _Target, k: Kind, dim: int) -> tuple[int, ...] | None:
  """The spectral view the target is wrapped with, when it is not the one ``layer`` has.

  Read from the shapes of the target's ``u``/``v``; ``None`` when they fit
  ``layer``'s view or neither (the shape check then names the mismatch).
  """
  kernel = layer.variables["params"][k.param]
  views = spectral_views(k, dim, tuple(kernel.shape))
  exact = views.exact(layer.style)  # the view layer was converted to (no axes[prefix])
  state = t.state or {}
  u, v = (state.get(key) for key in _options.spectral_keys(k.param)[:2])
  view = pick_view(
    views,
    None if u is None else _shape(u),
    None if v is None else _shape(v),
    lambda: (
      f"{t.where}: the Flax layer's u and v both have size {views.m}, so its "
      f"spectral-norm axis cannot be read from their shapes; pass axes={{'{t.prefix}': A}} "
      f"with A the axis it is wrapped with: {layer.axis!r} continues PyTorch's "
      f"{layer.style} power iteration exactly, {neg_axis(views.other(exact), k.ndim)!r} "
      "evaluates the same."
    ),
  )
  return None if view == exact else view


def _check_collection_found(job: _Load, t: _Target, model_wraps_it: bool) -> None:
  """Raises, for a PyTorch spectral layer whose target has no state, if ``collection`` is absent.

  The Flax layer looks plain then, but its state may well be in another
  collection (a mistyped ``collection``): it is, when the variables hold other
  collections than ``params`` or the Flax model wraps the layer.
  """
  if job.collection in job.out or not (model_wraps_it or len(job.out) > 1):
    return
  raise ValueError(
    f"{t.where}: PyTorch has spectral_norm ({sorted(t.entries.values())}) but the collection "
    f"{job.collection!r} is not in the Flax variables (they have {sorted(job.out)}): pass "
    "collection= the collection the layer keeps its spectral state in (its "
    "spectral_norm(..., collection=)), or wrap the layer with flaxnorm.spectral_norm."
  )


def _check_wrapping(layer: TorchLayer, t: _Target, k: Kind, tmethod: str | None) -> None:
  """Raises unless the target has ``k.param`` and the same method as PyTorch."""
  entries = t.entries
  if tmethod == "missing":
    raise ValueError(
      f"{t.where}: the Flax layer has no '{k.param}' nor '{k.param}_g'/'{k.param}_v' "
      f"(it has {sorted(t.params)}) for PyTorch {sorted(entries.values())}; does "
      "key_map point at the right layer, and is the kind right?"
    )
  if layer.method == tmethod:
    return
  names = sorted(t.params) + sorted(f"{t.collection}/{x}" for x in (t.state or {}))
  hint = {
    "weight_norm": f"wrap it with weight_norm(..., axis={layer.axis!r}){_FACES}",
    "spectral_norm": f"wrap it with spectral_norm(..., axis={layer.axis!r}){_FACES}",
    None: (
      "PyTorch's weight is plain: load it into the Flax model without this wrapper, then "
      "normalize the params (flaxnorm.tree.weight_norm_init / spectral_norm_init)"
    ),
  }[layer.method]
  if layer.method == "spectral_norm" and tmethod is None:
    hint += f" (wrapped already? then the variables lack its {t.collection!r} collection)"
  raise ValueError(
    f"{t.where}: PyTorch has {layer.method or 'a plain weight'} "
    f"({sorted(entries.values())}) but the Flax layer has "
    f"{'a plain ' + repr(k.param) if tmethod is None else tmethod} ({names}); {hint}."
  )


def _check_order(job: _Load, layer: TorchLayer, t: _Target, k: Kind, dim: int) -> None:
  """Refuses (warns with ``strict=False``) a spectral layer iterating in the other order than PyTorch."""
  if layer.method != "spectral_norm" or layer.continues == layer.style:
    return
  kernel = layer.variables["params"][k.param]
  exact = neg_axis(spectral_views(k, dim, tuple(kernel.shape)).exact(layer.style), k.ndim)
  msg = (
    f"{t.where}: the Flax layer is wrapped with spectral_norm(..., axis={layer.axis!r}), whose "
    f"power iteration runs in the order of PyTorch's {layer.continues} spectral norm, not in "
    f"the order of the {layer.style} checkpoint: evaluation is the same, but the next "
    f"training step would differ from PyTorch's. Wrap it with axis={exact!r} to continue "
    "PyTorch's iteration, or pass strict=False to load it anyway (with this warning)."
  )
  if job.strict:
    raise ValueError(msg)
  warnings.warn(msg, UserWarning, stacklevel=4)


def _fill(job: _Load, layer: TorchLayer, src: Sources, t: _Target, k: Kind) -> dict[str, Any]:
  """Writes ``layer``'s arrays into the target, in its dtype and boxing; shapes must match.

  Returns:
    The layer's variables as written (jnp arrays in the target's dtypes).
  """
  pre = f"{t.prefix}." if t.prefix else ""
  written: dict[str, Any] = {}
  for col, leaves in layer.variables.items():
    tgt = t.params if col == "params" else (t.state or {})
    for name, value in leaves.items():
      torch_key, flax_key = f"{pre}{src[col, name]}", f"{col}/{'/'.join(t.path)}/{name}"
      if name not in tgt:
        raise ValueError(
          f"{t.where}: PyTorch '{torch_key}' has no Flax counterpart "
          f"'{flax_key}' (the layer has {sorted(tgt)}); e.g. use_bias=False in Flax "
          "but a bias in PyTorch?"
        )
      raw = tgt[name]
      tval = meta.unbox(raw)
      if tuple(tval.shape) != tuple(value.shape):
        raise _mismatch(
          layer,
          t,
          k,
          torch=(torch_key, tuple(np.shape(job.state_dict[torch_key]))),
          flax=(flax_key, tuple(tval.shape), tuple(value.shape)),
        )
      # Cast in numpy, then a plain transfer: jnp.asarray would compile an op per shape.
      arr = jax.device_put(np.asarray(value).astype(tval.dtype, copy=False))
      tgt[name] = raw.replace_boxed(arr) if isinstance(raw, meta.AxisMetadata) else arr
      written.setdefault(col, {})[name] = arr
      job.filled.add((col, *t.path, name))
  return written


def _mismatch(
  layer: TorchLayer,
  t: _Target,
  k: Kind,
  *,
  torch: tuple[str, tuple[int, ...]],
  flax: tuple[str, tuple[int, ...], tuple[int, ...]],
) -> ValueError:
  """The shape mismatch of PyTorch ``(key, shape)`` and Flax ``(key, shape, converted shape)``.

  For a weight norm's ``g``, it says which axis each side keeps; raises
  instead if the Flax ``g`` fits no single axis of its ``v``.
  """
  (torch_key, torch_shape), (flax_key, flax_shape, converted) = torch, flax
  msg = (
    f"{t.where}: shape mismatch for PyTorch '{torch_key}' of shape {torch_shape} "
    f"({k.name} layout {k.torch_layout}): converted to {converted} "
    f"({k.flax_layout}), but the Flax '{flax_key}' has shape {flax_shape}."
  )
  if k.flip and len(flax_shape) == len(converted) and _grouped(converted, flax_shape):
    msg += (
      " A grouped PyTorch ConvTranspose (groups > 1, weight (in, out/groups, *k)) is not "
      "mapped: nn.ConvTranspose has no feature groups."
    )
  if not (flax_key.endswith(_options.WEIGHT_NORM_SUFFIXES[0]) and layer.method == "weight_norm"):
    return ValueError(msg)
  v_key = _options.weight_norm_keys(k.param)[1]
  v_shape = _shape(t.params[v_key])
  a = kept_axis(
    flax_shape,
    v_shape,
    lambda: ValueError(
      f"{msg} The Flax '{k.param}_g' {flax_shape} fits no single axis of '{v_key}' "
      f"{v_shape}: wrap the layer with weight_norm(..., axis={layer.axis!r}){_FACES}."
    ),
  )
  return ValueError(
    f"{msg} The Flax layer keeps axis {None if a is None else a - k.ndim!r}, PyTorch "
    f"keeps Flax axis {layer.axis!r}: wrap it with "
    f"weight_norm(..., axis={layer.axis!r}){_FACES}."
  )


# --------------------------------------------------------------------------- #
# Saving.
# --------------------------------------------------------------------------- #


def _wrapping(
  info: FlaxLayer | None,
  name: str,
  k: Kind,
  shape: tuple[int, ...],
  prefix: str,
  spectral_dims: Mapping[str, int],
) -> tuple[str | None, Axis, str, int | None]:
  """A model layer's ``(method, axis, style, spectral dim)`` as :class:`TorchLayer` has them."""
  method, kept = (None, ()) if info is None else info.wrapped.get(name, (None, ()))
  style, dim = "parametrizations", None
  if method == "spectral_norm":
    dim = spectral_dim_of(k, _lookup(spectral_dims, prefix), f"to_torch_state_dict: '{prefix}'")
    style = "parametrizations" if kept == spectral_views(k, dim, shape).transposed else "legacy"
  axis = neg_axis(kept, len(shape)) if method and kept else None
  return method, axis, style, dim


def _check_state_saved(
  layer: TorchLayer, state: Mapping[str, Any], prefix: str, collection: str, variables: Any
) -> None:
  """Raises for a spectral layer whose state is missing: its raw weight is no PyTorch weight."""
  if layer.method != "spectral_norm" or _options.spectral_keys(layer.name)[0] in state:
    return
  raise ValueError(
    f"to_torch_state_dict: '{prefix}' is a spectral_norm layer (its TorchLayer), but the "
    f"variables hold no '{collection}/{layer.path}/{_options.spectral_keys(layer.name)[0]}' "
    f"(collections: {sorted(variables)}): its '{layer.name}' is the weight before the norm, "
    f"so writing it as PyTorch's weight would change the outputs. Pass the full variables "
    f"(params and '{collection}'), or collection= the one the state is in; for a model whose "
    "norm was removed (flaxnorm.remove_spectral_norm), pass layers with method=None "
    "(layer._replace(method=None, axis=None))."
  )
