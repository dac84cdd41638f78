"""Whole models: a PyTorch state dict into a Flax variables tree, and back.

Keys are grouped by layer prefix, each prefix is mapped to a Flax path
(``key_map``), and each layer is converted by ``_torch_convert`` and checked
against the Flax layer it fills: same wrapping, same shapes, same view.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Collection, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import meta

from flaxnorm import _checks, _options
from flaxnorm._checks import Axis, Call
from flaxnorm._torch_attention import CLASSES, PARTS, WEIGHTS, parts_of, split_attention_key
from flaxnorm._torch_convert import (
  Sources,
  TorchLayer,
  _to_numpy,
  layer_from_torch,
  layer_to_numpy,
)
from flaxnorm._torch_keys import detect, join, named, split_key
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
from flaxnorm._torch_plain import TorchParam, params_to_numpy, shapes_fit
from flaxnorm._torch_rnn import (
  GATES,
  KIND_OF_GATES,
  Layout,
  RnnKey,
  expected_children,
  flax_biases,
  layout_of,
  rnn_key,
  rows,
  split_rnn_key,
  torch_bias,
)
from flaxnorm._torch_targets import (
  FlaxLayer,
  from_linen,
  from_nnx,
  state_variables,
  to_nnx_state,
)

_WHERE = "load_torch_state_dict"


class TorchLoadResult(NamedTuple):
  """What :func:`load_torch_state_dict` did.

  Attributes:
    variables: the filled Flax variables (a new tree; the input is not changed).
    layers: PyTorch layer prefix -> :class:`~flaxnorm.interop.TorchLayer` (``path``, ``kind``,
      ``method``, ``axis``, ``style``) for every layer loaded; the input of
      :func:`to_torch_state_dict`.
    unused_keys: PyTorch key -> why it was not used (no Flax layer, not a
      supported layer, ...).
    unmatched_keys: Flax variables (``"params/a/kernel"``) no PyTorch key filled.
    params: PyTorch key -> :class:`~flaxnorm.interop.TorchParam` for each
      tensor of no converted layer that loaded by name (a Snake ``alpha``);
      pass it to :func:`to_torch_state_dict` as ``params=``.

  Examples:
    >>> import numpy as np
    >>> from flaxnorm import interop
    >>> variables = {"params": {"fc": {"kernel": np.zeros((4, 3), np.float32)},
    ...                         "act": {"alpha": np.zeros(3, np.float32)}}}
    >>> sd = {"fc.weight": np.ones((3, 4), np.float32), "act.alpha": np.ones((1, 3, 1)),
    ...       "extra.weight": np.ones((2, 2))}
    >>> result = interop.load_torch_state_dict(sd, variables, None, strict=False)
    >>> sorted(result.layers), list(result.unused_keys)
    (['fc'], ['extra.weight'])
    >>> result.params
    {'act.alpha': TorchParam(path='act/alpha', shape=(1, 3, 1))}
  """

  variables: Any
  layers: dict[str, TorchLayer]
  unused_keys: dict[str, str]
  unmatched_keys: tuple[str, ...]
  params: dict[str, TorchParam]

  def summary(self) -> str:
    """One line per loaded layer: prefix, Flax path, kind, wrapping, key style, iteration order.

    A spectral layer's line ends with the PyTorch API whose power-iteration
    order its state continues (``continues legacy`` or ``continues
    parametrizations``); it differs from its key style only with
    ``strict=False``. Tensors loaded by name (``param``), unused keys and
    unmatched variables follow.

    Returns:
      The report, lines joined with ``"\\n"``.

    Examples:
      >>> import numpy as np
      >>> from flaxnorm import interop
      >>> variables = {"params": {"fc": {"kernel": np.zeros((4, 3), np.float32)}}}
      >>> sd = {"fc.weight": np.ones((3, 4), np.float32)}
      >>> print(interop.load_torch_state_dict(sd, variables).summary())
      fc -> fc  linear  plain  plain keys
    """
    rows = []
    for prefix, layer in self.layers.items():
      how = "plain" if layer.method is None else f"{layer.method}(axis={layer.axis!r})"
      row = [prefix, "->", layer.path, "", layer.kind, how, f"{layer.style} keys"]
      if layer.continues is not None:
        row.append(f"continues {layer.continues}")
      rows.append(row)
    for key, p in self.params.items():
      rows.append([key, "->", p.path, "", "param", f"shape {p.shape}", "loaded by name"])
    width = [max((len(r[i]) for r in rows), default=0) for i in range(3)]
    lines = [
      " ".join(r[i].ljust(width[i]) if i < 3 else r[i] for i in range(3)) + "  " + "  ".join(r[4:])
      for r in rows
    ]
    lines += [f"unused {key}: {why}" for key, why in self.unused_keys.items()]
    lines += [f"unmatched {key}" for key in self.unmatched_keys]
    return "\n".join(line.rstrip() for line in lines)


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


class _Target(NamedTuple):
  """A PyTorch layer and the Flax layer it fills (dicts of the output tree, filled in place)."""

  prefix: str  # the PyTorch layer prefix, "ups.0"
  entries: dict[str, str]  # its keys: layer key ("weight_g") -> state-dict key ("ups.0.weight_g")
  path: tuple[str, ...]  # the Flax path, ("ups_0",)
  params: dict[str, Any]
  state: dict[str, Any] | None  # the Flax layer's entries in the spectral collection
  collection: str
  where: str  # "load_torch_state_dict: layer 'ups.0' -> 'params/ups_0'"

  @property
  def fpath(self) -> str:
    return "/".join(self.path)


# --------------------------------------------------------------------------- #
# One layer, with a weight norm's axis settled where g fits several.
# --------------------------------------------------------------------------- #


# --------------------------------------------------------------------------- #
# Key maps and trees.
# --------------------------------------------------------------------------- #


def _get(tree: Any, path: tuple[str, ...]) -> Any:
  """The sub-mapping at ``path``, or ``None`` when there is none (or it is a leaf)."""
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


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(meta.unbox(x).shape)


# --------------------------------------------------------------------------- #
# Loading.
# --------------------------------------------------------------------------- #


def _targets(
  variables: Any, call: Call | None, collection: str
) -> tuple[Mapping[str, Any], dict[tuple[str, ...], FlaxLayer], Any]:
  """The variables to fill, the model's layers, and the NNX tree to write back (or ``None``)."""
  _check_instance(variables, "variables")
  if isinstance(variables, nn.Module):
    shapes, model = from_linen(variables, call)
    return shapes, model, None
  if call is not None:
    raise ValueError(
      f"{_WHERE}: inputs= is for a Linen model, and so is kwargs=, but variables is a "
      f"{'NNX module' if isinstance(variables, nnx.Module) else 'tree'}."
    )
  if isinstance(variables, nnx.Module):
    tree, model = from_nnx(variables, collection)
    return tree.variables, model, tree
  if not isinstance(variables, Mapping) or not isinstance(variables.get("params"), Mapping):
    raise ValueError(
      f"{_WHERE}: variables must be a Linen module (with inputs=), an NNX module or "
      f"variables with a 'params' collection, got {type(variables).__name__}."
    )
  return variables, {}, None


def _check_instance(model: Any, argname: str, where: str = _WHERE) -> None:
  """Raises if ``model`` is a Linen or NNX module class where an instance is expected."""
  if isinstance(model, type) and issubclass(model, (nn.Module, nnx.Module)):
    raise TypeError(
      f"{where}: {argname} must be a module instance, got the class {model.__name__}: "
      f"pass {model.__name__}(...)."
    )


def _check_args(
  state_dict: Any, kinds: Any, axes: Any, spectral_dims: Any, strict: Any, collection: Any
) -> None:
  """Raises unless ``load_torch_state_dict``'s arguments have their documented types."""
  if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) for k in state_dict):
    raise TypeError(
      f"{_WHERE}: state_dict must be a mapping of str key -> tensor (module.state_dict()), "
      f"got {type(state_dict).__name__}."
    )
  for argname, given, value, example in (
    ("kinds", kinds, "kind", "{'ups': 'conv_transpose1d'}"),
    ("axes", axes, "axis", "{'fc': -2}"),
    ("spectral_dims", spectral_dims, "int dim", "{'ups': 0}"),
  ):
    if given is not None and not (
      isinstance(given, Mapping) and all(isinstance(p, str) for p in given)
    ):
      raise TypeError(
        f"{_WHERE}: {argname} must be a mapping of PyTorch layer prefix (str) -> {value}, "
        f"e.g. {example} (the prefix '' names every layer), got {given!r}."
      )
  for prefix, dim in (spectral_dims or {}).items():
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
      raise TypeError(
        f"{_WHERE}: spectral_dims['{prefix}'] must be an int (the dim PyTorch's spectral_norm "
        f"was applied with) or None, got {dim!r}."
      )
  _checks.check_bool(strict, "strict", _WHERE)
  _checks.check_collection(collection, _WHERE)


def _given(given: Mapping[str, Any] | None) -> dict[str, Any]:
  """An override mapping without its ``None`` ("not given") entries."""
  return {p: x for p, x in (given or {}).items() if x is not None}


Options = tuple[
  Mapping[str, "str | None"] | None,
  Mapping[str, Axis] | None,
  Any,
  Mapping[str, "int | None"] | None,
]


def load(
  state_dict: Mapping[str, Any],
  variables: Any,
  key_map: KeyMap,
  options: Options,
  strict: bool,
  collection: str,
) -> TorchLoadResult:
  """``load_torch_state_dict``: group the keys by layer, load each, report what is left.

  ``options`` is ``(kinds, axes, call, spectral_dims)`` (``call``: a Linen
  model's example call); ``None`` entries of the mappings mean "not given"
  (read from the model or the tree).
  """
  kinds, axes, call, spectral_dims = options
  _check_args(state_dict, kinds, axes, spectral_dims, strict, collection)
  tree, model, nnx_tree = _targets(variables, call, collection)
  job = _Load(
    state_dict=state_dict,
    out=_copy(tree),
    kinds=_given(kinds),
    axes=_given(axes),
    spectral_dims=_given(spectral_dims),
    collection=collection,
    unused={},
    plain={},
    filled=set(),
    model=model,
    strict=strict,
  )
  groups = _group(job)
  _check_overrides(job, groups.names())
  loose = groups.loose
  layers: dict[str, TorchLayer] = {}
  for cell, sides in groups.cells.items():
    single = all(c.layer == 0 for c in groups.cells if c.module == cell.module)
    layers.update(_load_cell(job, key_map, cell, sides, single))
  for module, parts in groups.attentions.items():
    layers.update(_load_attention(job, key_map, module, parts))
  for prefix, entries in groups.layers.items():
    target = _target(job, key_map, prefix, entries)
    layer = None if target is None else _load_layer(job, target)
    if isinstance(layer, TorchLayer):
      layers[prefix] = layer
    elif layer is not None:  # not a layer interop converts: its tensors may still fit by name
      loose.update({key: layer for key in entries.values()})
  for key, why in loose.items():
    _load_plain(job, key_map, key, why)
  out = job.out
  unmatched = [leaf for col in out for leaf in _leaves(out[col], (col,)) if leaf not in job.filled]
  unused = {key: job.unused[key] for key in state_dict if key in job.unused}
  if strict and (unused or unmatched):
    raise ValueError(_strict_message(unused, tuple("/".join(p) for p in unmatched)))
  if unmatched and isinstance(variables, nn.Module):
    _init_unmatched(variables, call, out, unmatched)
  filled = out if nnx_tree is None else to_nnx_state(nnx_tree, out)
  plain = {key: job.plain[key] for key in state_dict if key in job.plain}
  return TorchLoadResult(filled, layers, unused, tuple("/".join(p) for p in unmatched), plain)


def _check_overrides(job: _Load, groups: Collection[str]) -> None:
  """Raises if ``kinds``/``axes``/``spectral_dims`` name a prefix that is no layer."""
  for argname, given in (
    ("kinds", job.kinds),
    ("axes", job.axes),
    ("spectral_dims", job.spectral_dims),
  ):
    unknown = sorted(p for p in given if not any(_under(g, p) for g in groups))
    if unknown:
      raise ValueError(
        f"{_WHERE}: {argname} names '{unknown[0]}', which is no layer of the state dict "
        f"(its layers: {sorted(groups)[:8]}{' ...' if len(groups) > 8 else ''})."
      )


def _init_unmatched(
  model: nn.Module, call: Call | None, out: dict[str, Any], leaves: list[tuple[str, ...]]
) -> None:
  """Gives the unmatched leaves of a Linen model their initial values (``jax.random.key(0)``).

  Its variables were traced shape-only, so they are ``jax.ShapeDtypeStruct``
  until a value is put there.
  """
  assert call is not None  # (from_linen has traced the model with it)
  args, kwargs = jax.tree.map(
    lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x, call
  )
  init = model.init(jax.random.key(0), *args, **kwargs)
  for leaf in leaves:
    src, dst = init, out
    for p in leaf[:-1]:
      src, dst = src[p], dst[p]
    dst[leaf[-1]] = src[leaf[-1]]


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


def _under(prefix: str, key: str) -> bool:
  """Whether PyTorch layer ``prefix`` is ``key`` or below it (``"ups.0"`` is under ``"ups"``)."""
  return prefix == key or key == "" or prefix.startswith(key + ".")


def _lookup(given: Mapping[str, Any], prefix: str) -> Any:
  """``given``'s entry for ``prefix``: its own, else the longest key it is under; else ``None``."""
  keys = [key for key in given if _under(prefix, key)]
  return given[max(keys, key=len)] if keys else None


_NORM_HINT = (
  "a normalization layer's buffer: interop converts linear, conv and embedding layers; map "
  "a BatchNorm by hand (weight -> params scale, bias -> params bias, running_mean/var -> "
  "batch_stats mean/var) or skip it with key_map"
)


Cells = dict[RnnKey, dict[str, dict[str, str]]]
Attentions = dict[str, dict[str, dict[str, str]]]


class _Groups(NamedTuple):
  """A state dict's keys, grouped.

  ``layers``: layer prefix -> layer key -> state-dict key. ``loose``: the keys
  of no layer -> why (a bias without a weight is none either: those keys load
  by name, if at all). ``cells``: PyTorch recurrent modules' keys by cell (an
  ``RnnKey`` with empty ``side`` and ``key``), then side, then their key as a
  linear layer's. ``attentions``: ``nn.MultiheadAttention`` keys by module
  prefix, then weight name (``"in_proj_weight"``, ..., ``"out_proj"``), then
  key as a linear layer's.
  """

  layers: dict[str, dict[str, str]]
  loose: dict[str, str]
  cells: Cells
  attentions: Attentions

  def names(self) -> list[str]:
    """Every layer's name, for ``kinds``/``axes``/``spectral_dims``."""
    cells = [c._replace(side=s).prefix for c, sides in self.cells.items() for s in sides]
    attentions = [join(m, n) for m, parts in self.attentions.items() for n in parts]
    return [*self.layers, *cells, *attentions]


def _group(job: _Load) -> _Groups:
  """The state dict's keys by layer, recurrent cell and attention module (see :class:`_Groups`)."""
  g = _Groups({}, {}, {}, {})
  for key in job.state_dict:
    rk = split_rnn_key(key)
    if rk is not None:
      g.cells.setdefault(rk._replace(side="", key=""), {}).setdefault(rk.side, {})[rk.key] = key
      continue
    ak = split_attention_key(key)
    if ak is not None:
      g.attentions.setdefault(ak.module, {}).setdefault(ak.name, {})[ak.key] = key
      continue
    split = split_key(key)
    if split is None:
      norm = key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
      g.loose[key] = _NORM_HINT if norm else "not a weight/bias key of a supported layer"
    else:
      g.layers.setdefault(split[0], {})[split[1]] = key
  for module, parts in g.attentions.items():
    if join(module, "out_proj") in g.layers:
      parts["out_proj"] = g.layers.pop(join(module, "out_proj"))
  for prefix in [p for p, entries in g.layers.items() if set(entries) == {"bias"}]:
    g.loose[g.layers.pop(prefix)["bias"]] = "a bias without a weight"
  return g


def _strict_message(unused: Mapping[str, str], unmatched: tuple[str, ...]) -> str:
  return (
    f"{_WHERE}: {len(unused)} PyTorch keys unused, {len(unmatched)} Flax variables "
    "unmatched (strict=False returns them in the result).\n  unused: "
    + ("".join(f"\n    {key}: {why}" for key, why in unused.items()) or "none")
    + "\n  unmatched: "
    + ("".join(f"\n    {key}" for key in unmatched) or "none")
  )


def _target(job: _Load, key_map: KeyMap, prefix: str, entries: dict[str, str]) -> _Target | None:
  """The Flax layer ``prefix`` maps to; ``None`` (its keys marked unused) if there is none."""
  path = resolve(key_map, prefix, job.out["params"])
  params = None if path is None or isinstance(path, str) else _get(job.out["params"], path)
  if path is None or isinstance(path, str) or params is None:
    if path is None:
      reason = "key_map skips it"
    else:
      reason = path if isinstance(path, str) else f"no Flax layer at 'params/{'/'.join(path)}'"
    job.unused.update({key: reason for key in entries.values()})
    return None
  state = _get(job.out.get(job.collection, {}), path)
  where = f"{_WHERE}: layer '{prefix}' -> 'params/{'/'.join(path)}'"
  return _Target(prefix, entries, path, params, state, job.collection, where)


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
  if kernel is None or len(_shape(kernel)) <= 2 or given not in (None, "linear"):
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


def _load_as_matrix(job: _Load, t: _Target, k: int) -> TorchLayer | str:
  """Loads a PyTorch Linear into a kernel of more axes through its ``(in, out)`` view."""
  names = [n for n in t.params if n in ("kernel", "kernel_g", "kernel_v", "bias")]
  view = {n: _as_matrix(t.params[n], n, k) for n in names}
  ndim = len(_shape(t.params.get("kernel", t.params.get("kernel_v"))))
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
# Recurrent cells: each side of a PyTorch nn.LSTM/GRU/RNN layer as linear layers.
# --------------------------------------------------------------------------- #


def _cell_path(job: _Load, key_map: KeyMap, cell: RnnKey, single: bool) -> Path | str | None:
  """The Flax cell that PyTorch cell ``cell`` fills; ``None`` if ``key_map`` skips it, else why not.

  Tried in order: the cell's name (``lstm.l0``, ``lstm.l0_reverse``), the
  forward name, the layer as an index (``lstm.0``: ``lstm_0``, ``lstm/0``,
  ...) and, for a one-layer module, the module (``lstm``). Below the match, an
  ``nn.Bidirectional``'s ``forward_rnn``/``backward_rnn`` and an ``nn.RNN``'s
  ``cell`` are followed.
  """
  names = [cell.cell, cell._replace(reverse=False).cell, join(cell.module, str(cell.layer))]
  names += [cell.module] if single else []
  params, whys, skipped = job.out["params"], [], True
  for name in dict.fromkeys(names):
    path = resolve(key_map, name, params) if name or key_map is None else ()
    if path is None:
      continue
    skipped = False
    if isinstance(path, str) or _get(params, path) is None:
      whys.append(path if isinstance(path, str) else f"no Flax module at 'params/{'/'.join(path)}'")
      continue
    if cell.reverse and name != cell.cell:
      if "backward_rnn" not in _get(params, path):
        whys.append(f"'params/{'/'.join(path)}' has no backward_rnn (an nn.Bidirectional)")
        continue
      path = (*path, "backward_rnn")
    elif "forward_rnn" in _get(params, path):
      path = (*path, "forward_rnn")
    return (*path, "cell") if "cell" in _get(params, path) else path
  hint = " (key_map maps PyTorch prefixes to Flax paths)"
  whys = [w.removesuffix(hint).removeprefix("no Flax layer for it; ") for w in whys]
  hint = f"key_map={{'{cell.cell}': 'path/to/cell'}} names it"
  tried = "; ".join(dict.fromkeys(whys))
  return None if skipped else f"{tried if len(tried) < 240 else tried[:240] + ' ...'} ({hint})"


def _load_cell(
  job: _Load, key_map: KeyMap, cell: RnnKey, sides: dict[str, dict[str, str]], single: bool
) -> dict[str, TorchLayer]:
  """Loads one layer and direction of a PyTorch recurrent module into a Flax cell.

  Returns:
    ``{"lstm.weight_ih_l0": layer, "lstm.weight_hh_l0": layer}``, or ``{}``
    when there is no Flax cell for it (its keys are then unused).
  """
  where = f"{_WHERE}: PyTorch recurrent layer '{cell.cell}'"
  if "hr" in sides:
    raise ValueError(
      f"{where}: '{cell._replace(side='hr').prefix}' is an LSTM projection (proj_size > 0), "
      "which no Flax cell has."
    )
  missing = [s for s in ("ih", "hh") if not set(sides.get(s, {})) - {"bias"}]
  if missing:
    raise ValueError(
      f"{where}: no '{cell._replace(side=missing[0]).prefix}' among its keys "
      f"{sorted(k for side in sides.values() for k in side.values())}."
    )
  hh = cell._replace(side="hh")
  _, _, roles = detect([k for k in sides["hh"] if k != "bias"], where)
  shape = tuple(np.shape(job.state_dict[sides["hh"][roles["v" if "v" in roles else "w"]]]))
  kind = KIND_OF_GATES.get(shape[0] // shape[1]) if len(shape) == 2 and shape[1] else None
  if kind is None or shape[0] % shape[1]:
    raise ValueError(
      f"{where}: '{hh.prefix}' has shape {shape}, which is (G*hidden, hidden) for no G of "
      "1 (nn.RNN), 3 (nn.GRU) or 4 (nn.LSTM)."
    )
  hidden = shape[1]
  path = _cell_path(job, key_map, cell, single)
  if not isinstance(path, tuple):
    reason = "key_map skips it" if path is None else f"no Flax cell for it: {path}"
    keys = [k for side in sides.values() for k in side.values()]
    job.unused.update({key: f"recurrent layer '{cell.cell}': {reason}" for key in keys})
    return {}
  node = _get(job.out["params"], path) or {}
  layout = layout_of(kind, node)
  where = f"{where} -> 'params/{'/'.join(path)}'"
  if layout is None:
    raise ValueError(
      f"{where}: PyTorch's is an nn.{kind.upper()} layer, but the "
      f"Flax module there has {sorted(node)}; expected a cell with {expected_children(kind)} "
      f"(does key_map map '{cell.cell}' to the right module?)."
    )
  biases = _cell_biases(job, sides, layout, node, hidden, where)
  has_bias = "bias" in sides["ih"] or "bias" in sides["hh"]
  out = {}
  for side in ("ih", "hh"):
    layer = _load_side(job, cell._replace(side=side), sides[side], (layout, path, hidden), biases)
    out[cell._replace(side=side).prefix] = layer._replace(bias=has_bias)
  return out


def _cell_biases(
  job: _Load,
  sides: dict[str, dict[str, str]],
  layout: Layout,
  node: Mapping[str, Any],
  hidden: int,
  where: str,
) -> dict[tuple[str, str], np.ndarray]:
  """The Flax cell's biases, ``(side, child) -> bias``; raises if PyTorch's cannot all go there."""
  size = len(GATES[layout.kind]) * hidden
  b = {}
  for side in ("ih", "hh"):
    key = sides[side].get("bias")
    b[side] = (
      np.zeros(size, np.float32) if key is None else _to_numpy(job.state_dict[key], key, where)
    )
    if b[side].shape != (size,):
      raise ValueError(
        f"{where}: '{key}' has shape {b[side].shape}, expected ({size},) (G*hidden)."
      )
  biases, lost = flax_biases(layout, node, b["ih"], b["hh"], hidden)
  if lost:
    gate, side = lost[0]
    raise ValueError(
      f"{where}: PyTorch's bias of gate "
      f"'{gate}' ({side}) is nonzero, but the Flax {layout.cls} has no bias for that term "
      f"(its children with a bias: {sorted(c for _, c in biases)}). "
      + (
        "Its GRU computes n = tanh(W_in x + b_in + r * (W_hn h)) without PyTorch's b_hn: "
        "use Linen's nn.GRUCell, which has it."
        if layout.kind == "gru"
        else "Build the cell with its biases."
      )
    )
  return biases


class _Packed(NamedTuple):
  """One PyTorch weight of several parts (gates, or attention's q, k, v) packed by rows."""

  prefix: str  # its PyTorch name, "lstm.weight_hh_l0"
  method: str | None
  roles: dict[str, str]  # key as a linear layer's -> role ("w", "v", "g", "u", ...)
  arrays: dict[str, np.ndarray]  # key as a linear layer's -> array, PyTorch layout
  rows: int  # rows of the packed weight

  def part(
    self, rows: np.ndarray | None, why: Callable[[tuple[int, ...]], str]
  ) -> dict[str, np.ndarray]:
    """The tensors of the part on ``rows`` (``None``: all of them, as they are).

    A weight's rows and a weight norm's ``g`` per row split; a ``g`` taken
    across the rows, or a spectral norm's vectors, do not: ``why(shape)``
    says so in the error.
    """
    out = {}
    for k, x in self.arrays.items():
      per_row = self.roles[k] in ("w", "v", "w_sn") or (
        self.roles[k] == "g" and x.shape[:1] == (self.rows,) and x.size == self.rows
      )
      if rows is not None and not per_row:
        raise ValueError(why(x.shape))
      out[k] = x if rows is None else x[rows]
    return out


def _packed(job: _Load, prefix: str, entries: Mapping[str, str], where: str) -> _Packed:
  """Reads one PyTorch weight kept under its own name (``entries``: its keys as a linear layer's)."""
  keys = {k: key for k, key in entries.items() if k != "bias"}
  method, _, roles = detect(list(keys), where)
  arrays = {k: _to_numpy(job.state_dict[key], key, where) for k, key in keys.items()}
  wkey = roles["v" if "v" in roles else "w"]
  role_of = {k: r for r, k in roles.items()}
  return _Packed(prefix, method, role_of, arrays, arrays[wkey].shape[0])


def _load_part(
  job: _Load, name: str, vprefix: str, path: Path, tensors: dict[str, np.ndarray]
) -> TorchLayer:
  """Loads one part (``tensors``, keys as a linear layer's) into the Flax linear layer at ``path``.

  ``name`` is the PyTorch weight the part is of: its ``axes``/``spectral_dims``
  entries apply; ``vprefix`` names the part in messages.
  """
  t = _Target(
    vprefix,
    {k: f"{vprefix}.{k}" for k in tensors},
    path,
    _get(job.out["params"], path) or {},
    _get(job.out.get(job.collection, {}), path),
    job.collection,
    f"{_WHERE}: '{vprefix}' -> 'params/{'/'.join(path)}'",
  )
  vjob = job._replace(
    state_dict={f"{vprefix}.{k}": x for k, x in tensors.items()},
    kinds={"": "linear"},
    axes=_one(job.axes, name, vprefix),
    spectral_dims=_one(job.spectral_dims, name, vprefix),
  )
  layer = _load_layer(vjob, t)
  if isinstance(layer, str):
    raise ValueError(f"{t.where}: {layer}.")
  return layer


def _joined(parts: Mapping[str, TorchLayer], **fields: Any) -> TorchLayer:
  """One layer of several Flax children: ``variables`` ``{col: {child: ...}}``, the first's wrapping."""
  variables: dict[str, Any] = {}
  for child, layer in parts.items():
    for col, leaves in layer.variables.items():
      variables.setdefault(col, {})[child] = leaves
  return next(iter(parts.values()))._replace(variables=variables, **fields)


def _load_side(
  job: _Load,
  rk: RnnKey,
  entries: dict[str, str],
  cell: tuple[Layout, Path, int],
  biases: dict[tuple[str, str], np.ndarray],
) -> TorchLayer:
  """Loads one side's weight (``rk.prefix``) into the cell's children, each as a linear layer.

  A child that holds one gate gets that gate's rows of the weight (and of a
  weight norm's ``g``); a packed child gets all of them, as they are.
  """
  layout, path, hidden = cell
  where = f"{_WHERE}: '{rk.prefix}' -> 'params/{'/'.join(path)}'"
  w = _packed(job, rk.prefix, entries, where)
  parts: dict[str, TorchLayer] = {}
  for child, gates in layout.gates_of(rk.side):
    packed = len(gates) == len(GATES[layout.kind])
    picked = None if packed else rows(gates, layout.kind, hidden)
    tensors = w.part(picked, lambda shape: _unsliced(where, rk, w.method, shape, layout))
    if (rk.side, child) in biases:
      tensors["bias"] = biases[rk.side, child]
    vprefix = rk.prefix if packed else f"{rk.prefix}[{gates}]"
    parts[child] = _load_part(job, rk.prefix, vprefix, (*path, child), tensors)
  return _joined(parts, kind=layout.kind, path="/".join(path))


def _one(given: Mapping[str, Any], prefix: str, vprefix: str) -> dict[str, Any]:
  """``{vprefix: given's entry for prefix}``, or ``{}`` when it has none."""
  value = _lookup(given, prefix)
  return {} if value is None else {vprefix: value}


def _unsliced(
  where: str, rk: RnnKey, method: str | None, shape: tuple[int, ...], layout: Layout
) -> str:
  """Why a normalized PyTorch weight cannot be split into the cell's per-gate layers."""
  gates = len(GATES[layout.kind])
  if method == "spectral_norm":
    what = (
      f"PyTorch's spectral norm divides all {gates} gates of '{rk.prefix}' by one sigma of the "
      "packed matrix"
    )
  else:
    what = (
      f"PyTorch's weight norm of '{rk.prefix}' (g of shape {shape}: dim is not 0) takes its "
      "norms across the gates"
    )
  return (
    f"{where}: {what}, but the Flax {layout.cls} keeps one Dense per gate, so no per-gate "
    "wrapping reproduces it. Load it into a cell with packed kernels in PyTorch's gate order "
    "(NNX OptimizedLSTMCell, GRUCell or SimpleCell) wrapped the same way."
  )


# --------------------------------------------------------------------------- #
# Attention: a PyTorch nn.MultiheadAttention into Flax's query, key, value, out.
# --------------------------------------------------------------------------- #


def _attention_path(job: _Load, key_map: KeyMap, module: str, keys: list[str]) -> Path | None:
  """The Flax attention module PyTorch ``module`` fills; ``None`` (its keys unused) if none."""
  params = job.out["params"]
  path = resolve(key_map, module, params) if module or key_map is not None else ()
  node = None if path is None or isinstance(path, str) else _get(params, path)
  if node is not None and isinstance(path, tuple):
    missing = [p for p in (*PARTS, "out") if p not in node]
    if missing:
      raise ValueError(
        f"{_WHERE}: PyTorch attention '{module}' -> 'params/{'/'.join(path)}': an "
        f"nn.MultiheadAttention, but the Flax module there has {sorted(node)}, not "
        "query, key, value and out (a Flax MultiHeadDotProductAttention, SelfAttention or "
        f"nnx.MultiHeadAttention); does key_map map '{module}' to the right module?"
      )
    return path
  if path is None:
    reason = "key_map skips it"
  else:
    reason = path if isinstance(path, str) else f"no Flax module at 'params/{'/'.join(path)}'"
  job.unused.update({key: f"attention '{module}': {reason}" for key in keys})
  return None


def _load_attention(
  job: _Load, key_map: KeyMap, module: str, parts: dict[str, dict[str, str]]
) -> dict[str, TorchLayer]:
  """Loads one ``nn.MultiheadAttention`` into a Flax attention module's four parts.

  Returns:
    ``{"attn.in_proj_weight": layer, "attn.out_proj": layer}`` (or one layer
    per ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``); ``{}`` when
    there is no Flax module for it.
  """
  where = f"{_WHERE}: PyTorch attention '{module}'"
  if "bias_k" in parts or "bias_v" in parts:
    raise ValueError(
      f"{where}: '{join(module, 'bias_k')}'/'bias_v' (add_bias_kv=True) append a learned key "
      "and value to every sequence, which no Flax attention module does."
    )
  weights = [n for n in parts if n not in ("in_proj_bias", "out_proj")]
  if not weights:
    raise ValueError(f"{where}: no in_proj_weight nor q/k/v_proj_weight among its keys.")
  path = _attention_path(job, key_map, module, [k for p in parts.values() for k in p.values()])
  if path is None:
    return {}
  bias = parts.get("in_proj_bias", {}).get("bias")
  b = None if bias is None else _to_numpy(job.state_dict[bias], bias, where)
  out: dict[str, TorchLayer] = {}
  for name in weights:
    prefix = join(module, name)
    w = _packed(job, prefix, parts[name], f"{where}: '{prefix}'")
    loaded = {}
    for child in parts_of(name):
      i = PARTS.index(child)
      packed = name == "in_proj_weight"
      e = w.rows // 3 if packed else w.rows
      picked = np.arange(i * e, (i + 1) * e) if packed else None
      tensors = w.part(picked, lambda shape: _across_parts(where, prefix, w.method, shape))
      if b is not None:
        tensors["bias"] = b[np.arange(i * e, (i + 1) * e)]
      vprefix = f"{prefix}[{child}]" if packed else prefix
      loaded[child] = _load_part(job, prefix, vprefix, (*path, child), tensors)
    out[prefix] = _joined(loaded, kind="multihead_attention", path="/".join(path))
  if "out_proj" in parts:
    prefix = join(module, "out_proj")
    t = _Target(
      prefix,
      parts["out_proj"],
      (*path, "out"),
      _get(job.out["params"], (*path, "out")) or {},
      _get(job.out.get(job.collection, {}), (*path, "out")),
      job.collection,
      f"{_WHERE}: layer '{prefix}' -> 'params/{'/'.join((*path, 'out'))}'",
    )
    layer = _load_layer(job, t)
    if isinstance(layer, str):
      raise ValueError(f"{t.where}: {layer}.")
    out[prefix] = layer
  return out


def _across_parts(where: str, prefix: str, method: str | None, shape: tuple[int, ...]) -> str:
  """Why a normalized packed ``in_proj_weight`` cannot be split into query, key and value."""
  what = (
    "a spectral norm divides q, k and v by one sigma of the packed (3E, E) matrix"
    if method == "spectral_norm"
    else f"a weight norm with g of shape {shape} (dim is not 0) takes its norms across q, k, v"
  )
  return (
    f"{where}: on '{prefix}' {what}, but Flax's query, key and value are three layers: no "
    "wrapping of theirs reproduces it."
  )


# --------------------------------------------------------------------------- #
# Saving.
# --------------------------------------------------------------------------- #


#: Flax cell classes -> the PyTorch recurrent module they are one layer of.
_CELLS = {"LSTMCell": "lstm", "OptimizedLSTMCell": "lstm", "GRUCell": "gru", "SimpleCell": "rnn"}


def _layers_of_model(
  model: Mapping[tuple[str, ...], FlaxLayer],
  variables: Mapping[str, Any],
  spectral_dims: Mapping[str, int],
  nnx_model: bool,
) -> dict[str, TorchLayer]:
  """PyTorch prefix -> layer for each layer of the model that has a PyTorch weight.

  Kind, wrapping and axis come from the model; a spectral layer gets the key
  style whose power iteration its axis continues, other layers the
  parametrizations style. Prefixes follow :func:`~flaxnorm._torch_paths.torch_prefix`.
  A recurrent cell (Linen or NNX ``LSTMCell``, ``OptimizedLSTMCell``,
  ``GRUCell``, ``SimpleCell``) is one layer of a PyTorch ``nn.LSTM``/``GRU``/
  ``RNN`` named after the module holding it (an ``nn.RNN``'s ``cell`` and an
  ``nn.Bidirectional``'s ``forward_rnn``/``backward_rnn`` left out):
  ``{prefix}.weight_ih_l0``, ``{prefix}.weight_hh_l0`` (``_reverse`` for a
  backward RNN).
  """
  sequential = {path for path, info in model.items() if info.cls == "Sequential"}
  cells = {
    path: _CELLS[info.cls]
    for path, info in model.items()
    if info.cls in _CELLS and layout_of(_CELLS[info.cls], _get(variables["params"], path) or {})
  }
  attentions = {
    path
    for path, info in model.items()
    if info.cls in CLASSES and {*PARTS, "out"} <= set(_get(variables["params"], path) or {})
  }
  naming = (sequential, nnx_model)
  out: dict[str, TorchLayer] = {}
  for path, info in model.items():
    if any(path[: len(c)] == c for c in cells):
      if path in cells:
        out.update(_cell_layers(model, variables, path, cells[path], naming, spectral_dims))
      continue
    if any(path[: len(a)] == a for a in attentions):
      if path in attentions:
        out.update(_attention_layers(model, variables, path, naming, spectral_dims))
      continue
    params = _get(variables["params"], path)
    name = "embedding" if info.family == "embedding" else "kernel"
    leaf = None if params is None else params.get(name, params.get(f"{name}_v"))
    if info.family is None or leaf is None:
      continue
    if info.unsupported:
      raise ValueError(
        f"to_torch_state_dict: the Flax {info.cls} at 'params/{'/'.join(path)}': "
        f"{info.unsupported}."
      )
    shape = _shape(leaf)
    kind = (
      info.family if info.family in ("linear", "embedding") else f"{info.family}{len(shape) - 2}d"
    )
    if kind not in LAYOUTS:
      continue
    prefix = torch_prefix(path, variables["params"], sequential, nnx_model)
    method, axis, style, sdim = _wrapping(info, name, LAYOUTS[kind], shape, prefix, spectral_dims)
    out[prefix] = TorchLayer({}, kind, method, axis, name, style, "/".join(path), None, sdim)
  return out


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


def _attention_layers(
  model: Mapping[tuple[str, ...], FlaxLayer],
  variables: Mapping[str, Any],
  path: Path,
  naming: tuple[set[Path], bool],
  spectral_dims: Mapping[str, int],
) -> dict[str, TorchLayer]:
  """A Flax attention module as a PyTorch ``nn.MultiheadAttention``.

  Its query, key and value are ``in_proj_weight`` when they take inputs of one
  size, else ``q_proj_weight``, ``k_proj_weight`` and ``v_proj_weight``; its
  ``out`` is ``out_proj``.
  """
  params = variables["params"]
  module = torch_prefix(path, params, *naming)
  shapes = {p: _kernel_shape(_get(params, (*path, p)) or {}) for p in (*PARTS, "out")}
  packed = len({shapes[p][0] for p in PARTS}) == 1
  weights = ["in_proj_weight"] if packed else list(WEIGHTS[1:])
  out = {}
  for name in [*weights, "out_proj"]:
    child = (*path, "out" if name == "out_proj" else parts_of(name)[0])
    shape = shapes[child[-1]]
    k = len(shape) - 1 if name == "out_proj" else 1
    where = f"to_torch_state_dict: 'params/{'/'.join(child)}'"
    info = _matrix_info(model.get(child), where, k, len(shape))
    view = (_size(shape[:k]), _size(shape[k:]))
    prefix = join(module, name)
    how = _wrapping(info, "kernel", LAYOUTS["linear"], view, prefix, spectral_dims)
    axis = _kernel_axis(how[1], k, len(shape))
    if name == "out_proj":
      kind, tpath = "linear", child
    else:
      kind, tpath = "multihead_attention", path
    out[prefix] = TorchLayer(
      {}, kind, how[0], axis, "kernel", how[2], "/".join(tpath), None, how[3], None, k
    )
  return out


def _cell_layers(
  model: Mapping[tuple[str, ...], FlaxLayer],
  variables: Mapping[str, Any],
  path: Path,
  kind: str,
  naming: tuple[set[Path], bool],
  spectral_dims: Mapping[str, int],
) -> dict[str, TorchLayer]:
  """The two sides of a Flax cell as one layer of a PyTorch recurrent module (see above)."""
  params = variables["params"]
  layout = layout_of(kind, _get(params, path) or {})
  assert layout is not None  # (only cells with a layout are passed)
  holder, reverse = path[:-1] if path[-1] == "cell" else path, False
  if holder and holder[-1] in ("forward_rnn", "backward_rnn"):
    holder, reverse = holder[:-1], holder[-1] == "backward_rnn"
  module = torch_prefix(holder, params, *naming)
  out = {}
  for side in ("ih", "hh"):
    child = (*path, layout.children(side)[0])
    node = _get(params, child) or {}
    shape = _shape(node.get("kernel", node.get("kernel_v")))
    prefix = RnnKey(module, 0, reverse, side, "weight").prefix
    how = _wrapping(model.get(child), "kernel", LAYOUTS["linear"], shape, prefix, spectral_dims)
    out[prefix] = TorchLayer(
      {}, kind, how[0], how[1], "kernel", how[2], "/".join(path), None, how[3], True
    )
  return out


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


def _save_side(
  prefix: str,
  layer: TorchLayer,
  cell: dict[str, Any],
  how: tuple[str, Axis, int | None],
  variables: Mapping[str, Any],
) -> dict[str, np.ndarray]:
  """One side of a Flax cell as PyTorch's packed ``weight_{side}_l{k}`` keys (and its bias).

  ``cell`` is ``{"params": ..., collection: ...}`` of the cell; ``how`` the
  key style, axis and spectral ``dim``. Each child is written as a linear
  layer and the children's rows are joined in PyTorch's gate order.
  """
  where = f"to_torch_state_dict: '{prefix}' -> 'params/{layer.path}'"
  rk = split_rnn_key(prefix)
  if rk is None or rk.key != "weight" or rk.side == "hr":
    raise ValueError(
      f"{where}: a {layer.kind} layer's prefix must name one side of a PyTorch recurrent "
      "module, like 'lstm.weight_ih_l0' or 'gru.weight_hh_l1_reverse' (TorchLoadResult.layers)."
    )
  layout = layout_of(layer.kind, cell["params"])
  if layout is None:
    raise ValueError(
      f"{where}: the Flax module has {sorted(cell['params'])}, no {layer.kind} cell "
      f"({expected_children(layer.kind)})."
    )
  children = layout.gates_of(rk.side)
  joined, biases = _save_parts(layer, cell, [c for c, _ in children], how, (prefix, variables))
  out = {rnn_key(k, rk.param): x for k, x in joined.items()}
  if layer.bias is not False:
    hidden = next(iter(joined.values())).shape[0] // len(GATES[layer.kind])
    out[rnn_key("bias", rk.param)] = torch_bias(layout, biases, rk.side, hidden)
  return {join(rk.module, k): x for k, x in out.items()}


def _save_parts(
  layer: TorchLayer,
  holder: dict[str, Any],
  children: list[str],
  how: tuple[str, Axis, int | None],
  context: tuple[str, Mapping[str, Any]],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Writes children of ``holder`` as linear layers and joins their rows, in order.

  ``holder`` is ``{"params": ..., collection: ...}`` of the Flax module; ``how``
  the key style, axis and spectral ``dim``; ``context`` the PyTorch prefix and
  all variables (for messages). A child kernel of more than two axes (an
  attention's query) is read as ``(in, out)`` with ``layer.in_axes`` input axes.

  Returns:
    Key as a linear layer's -> the joined tensor; and child -> its bias.
  """
  prefix, variables = context
  where = f"to_torch_state_dict: '{prefix}' -> 'params/{layer.path}'"
  (collection,) = [c for c in holder if c != "params"]
  parts, biases = [], {}
  for child in children:
    sub = {col: _get(holder[col], (child,)) or {} for col in holder}
    _check_state_saved(
      layer._replace(path=f"{layer.path}/{child}"), sub[collection], prefix, collection, variables
    )
    style, axis, sdim = how
    if layer.in_axes is not None:
      ndim = _kernel_ndim(sub["params"])
      axis = _view_axis(axis, layer.in_axes, ndim)
      sub["params"] = {n: _as_matrix(x, n, layer.in_axes) for n, x in sub["params"].items()}
    arrays = layer_to_numpy(sub, "linear", style, axis, sdim, collection)
    if "bias" in arrays:
      biases[child] = arrays.pop("bias")
    parts.append(arrays)
  if len(parts) > 1 and layer.method == "spectral_norm":
    raise ValueError(
      f"{where}: its {', '.join(children)} are {len(parts)} spectral-normed layers, each with "
      f"its own sigma; PyTorch's '{prefix}' is one weight with one sigma for all of them."
    )
  if any(set(p) != set(parts[0]) for p in parts):
    raise ValueError(
      f"{where}: its {', '.join(children)} are not wrapped alike "
      f"({[sorted(p) for p in parts]}); PyTorch normalizes the packed weight one way."
    )
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, biases


def _save_attention(
  prefix: str,
  layer: TorchLayer,
  holder: dict[str, Any],
  how: tuple[str, Axis, int | None],
  variables: Mapping[str, Any],
) -> dict[str, np.ndarray]:
  """A Flax attention's query, key, value as ``in_proj_weight`` (or one ``q/k/v_proj_weight``).

  The ``in_proj_weight`` or ``q_proj_weight`` layer also writes
  ``in_proj_bias``, when the Flax parts have biases.
  """
  module, _, name = prefix.rpartition(".")
  if name not in WEIGHTS:
    raise ValueError(
      f"to_torch_state_dict: '{prefix}' -> 'params/{layer.path}': a multihead_attention "
      f"layer's prefix must end with one of {list(WEIGHTS)} (TorchLoadResult.layers)."
    )
  layer = layer._replace(in_axes=1 if layer.in_axes is None else layer.in_axes)
  joined, _ = _save_parts(layer, holder, list(parts_of(name)), how, (prefix, variables))
  out = {named(k, name): x for k, x in joined.items()}
  biases = [(holder["params"].get(p) or {}).get("bias") for p in PARTS]
  if name in ("in_proj_weight", "q_proj_weight") and all(b is not None for b in biases):
    out["in_proj_bias"] = np.concatenate(
      [np.reshape(np.asarray(meta.unbox(b)), -1) for b in biases]
    )
  return {join(module, k): x for k, x in out.items()}


def save(
  variables: Mapping[str, Any] | nnx.Module,
  layers: Mapping[str, TorchLayer] | None,
  style: str | None,
  collection: str,
  model: nn.Module | None = None,
  call: Call | None = None,
  spectral_dims: Mapping[str, int | None] | None = None,
  plain: Mapping[str, TorchParam | str] | None = None,
) -> dict[str, np.ndarray]:
  """``to_torch_state_dict``, with numpy arrays for tensors (``variables`` may be an NNX model).

  A spectral layer's ``dim`` is ``spectral_dims``' entry, else the
  ``TorchLayer``'s (as loaded), else PyTorch's default.
  """
  info: dict[tuple[str, ...], FlaxLayer] = {}
  _check_instance(variables, "variables", "to_torch_state_dict")
  _check_instance(model, "model", "to_torch_state_dict")
  _checks.check_collection(collection, "to_torch_state_dict")
  dims = _given(spectral_dims)
  nnx_model = isinstance(variables, (nnx.Module, nnx.State))
  if isinstance(variables, nnx.Module):
    tree, info = from_nnx(variables, collection)
    variables = tree.variables
  elif isinstance(variables, nnx.State):  # TorchLoadResult.variables of an NNX model
    variables = state_variables(variables, collection)[0]
  if model is not None and not info:
    info = from_linen(model, call, "to_torch_state_dict")[1]
  if layers is None:
    if not info:
      raise ValueError(
        "to_torch_state_dict: pass layers (TorchLoadResult.layers), or the model: an NNX "
        "module as variables, or model= and inputs= for a Linen module."
      )
    layers = _layers_of_model(info, variables, dims, nnx_model)
  out: dict[str, np.ndarray] = {}
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
    sdim = _lookup(dims, prefix)
    sdim = layer.spectral_dim if sdim is None else sdim
    if layer.kind in GATES:
      out.update(_save_side(prefix, layer, sub, (st, axis, sdim), variables))
      continue
    if layer.kind == "multihead_attention":
      out.update(_save_attention(prefix, layer, sub, (st, axis, sdim), variables))
      continue
    _check_state_saved(layer, sub[collection], prefix, collection, variables)
    if layer.in_axes is not None:
      axis = _view_axis(axis, layer.in_axes, _kernel_ndim(sub["params"]))
      sub["params"] = {n: _as_matrix(x, n, layer.in_axes) for n, x in sub["params"].items()}
    for key, x in layer_to_numpy(sub, layer.kind, st, axis, sdim, collection).items():
      out[f"{prefix}.{key}" if prefix else key] = x
  if plain is not None:
    arrays = params_to_numpy(variables["params"], plain, "to_torch_state_dict")
    if clash := sorted(set(arrays) & set(out)):
      raise ValueError(
        f"to_torch_state_dict: params names '{clash[0]}', a key one of the layers writes."
      )
    out.update(arrays)
  return out
