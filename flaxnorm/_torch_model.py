"""Whole models: a PyTorch state dict into a Flax variables tree, and back.

Keys are grouped by layer prefix, each prefix is mapped to a Flax path
(``key_map``), and each layer is converted by ``_torch_convert`` and checked
against the Flax layer it fills: same wrapping, same shapes, same view.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxnorm import _checks
from flaxnorm._checks import Axis, Call
from flaxnorm._torch_attention import CLASSES, PARTS, split_attention_key
from flaxnorm._torch_composite import (
  _CELLS,
  _attention_layers,
  _cell_layers,
  _load_attention,
  _load_cell,
  _save_attention,
  _save_side,
)
from flaxnorm._torch_convert import TorchLayer, layer_to_numpy
from flaxnorm._torch_keys import detect, join, split_key
from flaxnorm._torch_layer import (
  _WHERE,
  NORM_BUFFERS,
  _as_matrix,
  _check_state_saved,
  _get,
  _kernel_ndim,
  _Load,
  _load_layer,
  _load_plain,
  _lookup,
  _member,
  _member_info,
  _Model,
  _shape,
  _Target,
  _under,
  _view_axis,
  _view_wrapping,
  _wrapping,
  member_prefixes,
  norm_to_numpy,
  write_stacks,
)
from flaxnorm._torch_layouts import LAYOUTS
from flaxnorm._torch_paths import KeyMap, Path, resolve, unindexed
from flaxnorm._torch_plain import TorchParam, params_to_numpy
from flaxnorm._torch_rnn import GATES, RnnKey, layout_of, split_rnn_key
from flaxnorm._torch_targets import FlaxLayer, from_linen, from_nnx, state_variables, to_nnx_state

# --------------------------------------------------------------------------- #
# Results.
# --------------------------------------------------------------------------- #


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
      path = layer.path if layer.member is None else f"{layer.path}[{layer.member}]"
      row = [prefix, "->", path, "", layer.kind, how, f"{layer.style} keys"]
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


# --------------------------------------------------------------------------- #
# Trees.
# --------------------------------------------------------------------------- #


def _leaves(tree: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
  if isinstance(tree, Mapping):
    return [q for key, x in tree.items() for q in _leaves(x, (*path, key))]
  return [path]


def _copy(tree: Any) -> Any:
  return {key: _copy(x) for key, x in tree.items()} if isinstance(tree, Mapping) else tree


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
    stacks={},
  )
  groups = _group(job)
  _check_overrides(job, groups.names())
  loose = groups.loose
  layers: dict[str, TorchLayer] = {}
  for cell, sides in groups.cells.items():
    single = all(c.layer == 0 for c in groups.cells if c.module == cell.module)
    layers.update(_load_cell(job, key_map, cell, sides, single))
  for module, parts in groups.attentions.items():
    layers.update(_load_attention(job, key_map, module, parts, groups.layers))
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
  write_stacks(job, complete=True)
  unmatched = [leaf for col in out for leaf in _leaves(out[col], (col,)) if leaf not in job.filled]
  unused = {key: job.unused[key] for key in state_dict if key in job.unused}
  if strict and (unused or unmatched):
    raise ValueError(_strict_message(unused, tuple("/".join(p) for p in unmatched)))
  if unmatched and isinstance(variables, nn.Module):
    _init_unmatched(variables, call, out, unmatched)
  write_stacks(job, complete=False)  # partial stacks over the initial values
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


Cells = dict[RnnKey, dict[str, dict[str, str]]]


Attentions = dict[str, dict[str, dict[str, str]]]


class _Groups(NamedTuple):
  """A state dict's keys, grouped.

  ``layers``: layer prefix -> layer key -> state-dict key. ``loose``: the keys
  of no layer -> why (a bias without a weight is none either: those keys load
  by name, if at all). ``cells``: PyTorch recurrent modules' keys by cell (an
  ``RnnKey`` with empty ``side`` and ``key``), then side, then their key as a
  linear layer's. ``attentions``: ``nn.MultiheadAttention`` keys by module
  prefix, then weight name (``"in_proj_weight"``, ...; its ``out_proj`` is a layer), then
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
    prefix, _, name = key.rpartition(".")
    split = (prefix, name) if name in NORM_BUFFERS else split_key(key)
    if split is None:
      g.loose[key] = "not a weight/bias key of a supported layer"
    else:
      g.layers.setdefault(split[0], {})[split[1]] = key
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
  """The Flax layer ``prefix`` maps to; ``None`` (its keys marked unused) if there is none.

  A prefix with an index (``layers.3.fc``) that no Flax layer spells may be a
  member of a stacked layer: the prefix without the index (``layers.fc``)
  finds it, with its params one axis larger than the PyTorch weight's and
  the index on that axis.
  """
  path = resolve(key_map, prefix, job.out["params"])
  params = None if path is None or isinstance(path, str) else _get(job.out["params"], path)
  if path is None or isinstance(path, str) or params is None:
    stacked = None if path is None else _stacked_target(job, key_map, prefix, entries)
    if stacked is not None:
      return stacked
    if path is None:
      reason = "key_map skips it"
    else:
      reason = path if isinstance(path, str) else f"no Flax layer at 'params/{'/'.join(path)}'"
    job.unused.update({key: reason for key in entries.values()})
    return None
  state = _get(job.out.get(job.collection, {}), path)
  stats = _get(job.out.get("batch_stats", {}), path)
  where = f"{_WHERE}: layer '{prefix}' -> 'params/{'/'.join(path)}'"
  return _Target(prefix, entries, path, params, state, job.collection, where, stats=stats)


def _stacked_target(
  job: _Load, key_map: KeyMap, prefix: str, entries: dict[str, str]
) -> _Target | None:
  """The member of a stacked Flax layer that PyTorch layer ``prefix`` is, or ``None``."""
  try:
    _, _, roles = detect([k for k in entries if k not in NORM_BUFFERS], _WHERE)
  except ValueError:  # no layer's key set: the caller reports it
    return None
  rank = len(np.shape(job.state_dict[entries[roles["v" if "g" in roles else "w"]]]))
  for path, i in unindexed(key_map, prefix, job.out["params"]):
    params = _get(job.out["params"], path) or {}
    names = ("kernel", "kernel_v", "embedding", "scale")
    leaf = next((params[n] for n in names if n in params), None)
    if leaf is None:
      continue
    shape = _shape(leaf)
    info = job.model.get(path)
    stacked = info.stacked if info is not None else len(shape) - rank
    if stacked == 1 and i < shape[0]:
      state = _get(job.out.get(job.collection, {}), path)
      stats = _get(job.out.get("batch_stats", {}), path)
      where = f"{_WHERE}: layer '{prefix}' -> 'params/{'/'.join(path)}'[{i}]"
      return _Target(prefix, entries, path, params, state, job.collection, where, i, stats)
  return None


# --------------------------------------------------------------------------- #
# Saving.
# --------------------------------------------------------------------------- #


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
  m = _Model(model, variables, (sequential, nnx_model), spectral_dims)
  out: dict[str, TorchLayer] = {}
  for path, info in model.items():
    if any(path[: len(c)] == c for c in cells):
      if path in cells:
        out.update(_cell_layers(m, path, cells[path]))
      continue
    if any(path[: len(a)] == a for a in attentions):
      if path in attentions:
        out.update(_attention_layers(m, path))
      continue
    if info.stacked and info.family:
      out.update(_stacked_layers(m, path))
      continue
    if info.family == "norm":
      out[m.prefix(path)] = TorchLayer({}, "norm", None, None, "scale", "plain", "/".join(path))
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
    prefix = m.prefix(path)
    k = info.in_axes
    if k is None:
      how = _wrapping(info, name, LAYOUTS[kind], shape, prefix, spectral_dims)
    else:  # a DenseGeneral: PyTorch's Linear through its (in, out) view
      how = _view_wrapping(info, shape, k, prefix, spectral_dims)
    out[prefix] = TorchLayer(
      {}, kind, *how[:2], name, how[2], "/".join(path), None, how[3], None, k
    )
  return out


def _stacked_layers(m: _Model, path: Path) -> dict[str, TorchLayer]:
  """A stacked layer as one PyTorch layer per member: ``layers/fc`` -> ``layers.0.fc``, ...

  The index goes after the outermost module of the path whose params all have
  the stack's leading size (the ``nn.scan``/``nn.vmap`` module, or the
  ``nnx.vmap``-made layer itself).
  """
  info = m.layers[path]
  where = f"to_torch_state_dict: 'params/{'/'.join(path)}'"
  if info.stacked != 1:
    raise ValueError(f"{where}: {info.stacked} stack axes; one is supported.")
  params = m.variables["params"]
  name = {"embedding": "embedding", "norm": "scale"}.get(info.family or "", "kernel")
  node = _get(params, path) or {}
  shape = _shape(node.get(name, node.get(f"{name}_v")))
  family = info.family or ""
  if family == "norm":
    return {
      prefix: TorchLayer({}, "norm", None, None, name, "plain", "/".join(path), member=i)
      for i, prefix in enumerate(member_prefixes(params, path, m.naming))
    }
  kind = family if family in ("linear", "embedding") else f"{family}{len(shape) - 3}d"
  if kind not in LAYOUTS:
    return {}
  member = _member_info(info, where)
  out = {}
  for i, prefix in enumerate(member_prefixes(params, path, m.naming)):
    k = info.in_axes
    if k is None:
      how = _wrapping(member, name, LAYOUTS[kind], shape[1:], prefix, m.spectral_dims)
    else:
      how = _view_wrapping(member, shape[1:], k, prefix, m.spectral_dims)
    out[prefix] = TorchLayer(
      {}, kind, how[0], how[1], name, how[2], "/".join(path), None, how[3], None, k, i
    )
  return out


def _members(tree: Any, i: int) -> Any:
  """Member ``i`` of every stacked leaf of a nested dict."""
  if isinstance(tree, Mapping):
    return {k: _members(x, i) for k, x in tree.items()}
  return _member(tree, i)


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
    if layer.member is not None:  # one layer of a stack: its slices
      sub = _members(sub, layer.member)
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
    if layer.kind == "norm":
      stats = _get(variables.get("batch_stats", {}), path)
      if stats is not None and layer.member is not None:
        stats = _members(stats, layer.member)
      out.update({join(prefix, k): x for k, x in norm_to_numpy(sub["params"], stats).items()})
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
