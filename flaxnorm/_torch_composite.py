"""PyTorch modules that fill several Flax layers, both ways.

A PyTorch ``nn.LSTM``/``nn.GRU``/``nn.RNN`` layer fills a Flax cell (one Dense
per gate and side, or one packed Linear per side: ``_torch_rnn``), an
``nn.MultiheadAttention`` fills a Flax attention's ``query``, ``key``,
``value`` and ``out`` (``_torch_attention``). Each part is one linear layer of
``_torch_layer``, with its rows of the packed weight; saving writes the parts
and joins their rows again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
from flax.core import meta

from flaxnorm._checks import Axis
from flaxnorm._torch_attention import PARTS, WEIGHTS, parts_of
from flaxnorm._torch_convert import TorchLayer, _to_numpy, layer_to_numpy
from flaxnorm._torch_keys import detect, join, named
from flaxnorm._torch_layer import (
  _WHERE,
  _as_matrix,
  _check_state_saved,
  _get,
  _kernel_ndim,
  _kernel_shape,
  _Load,
  _load_layer,
  _load_plain,
  _lookup,
  _member_info,
  _Model,
  _Target,
  _view_axis,
  _view_wrapping,
  _wrapping,
  member_prefixes,
)
from flaxnorm._torch_layouts import LAYOUTS
from flaxnorm._torch_paths import KeyMap, Path, resolve, unindexed
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
  said = " (key_map maps PyTorch prefixes to Flax paths)"  # resolve's hint, said once below
  whys = [w.removesuffix(said).removeprefix("no Flax layer for it; ") for w in whys]
  hint = f"key_map={{'{cell.cell}': 'path/to/cell'}} names it"
  tried = "; ".join(dict.fromkeys(whys))
  return None if skipped else f"{tried if len(tried) < 240 else tried[:240] + ' ...'} ({hint})"


def _by_name(
  job: _Load, key_map: KeyMap, keys: list[str], node: Mapping[str, Any], why: str
) -> bool:
  """Loads a module's keys by name when its Flax module keeps PyTorch's param names.

  A Flax port that names its params ``weight_ih_l0`` or ``in_proj_weight``
  (its own cell or attention) takes them as they are (``_load_plain``).

  Returns:
    Whether it does (then every key is loaded by name or reported unused).
  """
  names = {key.rpartition(".")[2] for key in keys} - {"weight", "bias"}  # out_proj's are no sign
  if not names & set(node):
    return False
  for key in keys:
    _load_plain(job, key_map, key, why)
  return True


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
  keys = [k for side in sides.values() for k in side.values()]
  path = _cell_path(job, key_map, cell, single)
  if not isinstance(path, tuple):
    reason = "key_map skips it" if path is None else f"no Flax cell for it: {path}"
    job.unused.update({key: f"recurrent layer '{cell.cell}': {reason}" for key in keys})
    return {}
  node = _get(job.out["params"], path) or {}
  layout = layout_of(kind, node)
  where = f"{where} -> 'params/{'/'.join(path)}'"
  info = job.model.get(path)
  if info is not None and info.unsupported:
    raise ValueError(f"{where}: the Flax {info.cls}: {info.unsupported}.")
  if layout is None and _by_name(job, key_map, keys, node, "no Flax cell there"):
    return {}
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

  method: str | None
  roles: dict[str, str]  # key as a linear layer's -> role ("w", "v", "g", "u", ...)
  arrays: dict[str, np.ndarray]  # key as a linear layer's -> array, PyTorch layout
  n_rows: int  # rows of the packed weight

  def part(
    self, picked: np.ndarray | None, why: Callable[[tuple[int, ...]], str]
  ) -> dict[str, np.ndarray]:
    """The tensors of the part on rows ``picked`` (``None``: all of them, as they are).

    A weight's rows and a weight norm's ``g`` per row split; a ``g`` taken
    across the rows, or a spectral norm's vectors, do not: ``why(shape)``
    says so in the error.
    """
    out = {}
    for k, x in self.arrays.items():
      per_row = self.roles[k] in ("w", "v", "w_sn") or (
        self.roles[k] == "g" and x.shape[:1] == (self.n_rows,) and x.size == self.n_rows
      )
      if picked is not None and not per_row:
        raise ValueError(why(x.shape))
      out[k] = x if picked is None else x[picked]
    return out


def _packed(job: _Load, prefix: str, entries: Mapping[str, str], where: str) -> _Packed:
  """Reads one PyTorch weight kept under its own name (``entries``: its keys as a linear layer's)."""
  keys = {k: key for k, key in entries.items() if k != "bias"}
  method, _, roles = detect(list(keys), where)
  arrays = {k: _to_numpy(job.state_dict[key], key, where) for k, key in keys.items()}
  wkey = roles["v" if "v" in roles else "w"]
  role_of = {k: r for r, k in roles.items()}
  return _Packed(method, role_of, arrays, arrays[wkey].shape[0])


def _load_part(
  job: _Load,
  name: str,
  vprefix: str,
  path: Path,
  tensors: dict[str, np.ndarray],
  member: int | None = None,
) -> TorchLayer:
  """Loads one part (``tensors``, keys as a linear layer's) into the Flax linear layer at ``path``.

  ``name`` is the PyTorch weight the part is of: its ``axes``/``spectral_dims``
  entries apply; ``vprefix`` names the part in messages; ``member`` is the
  index into a stacked layer, if it is one.
  """
  t = _Target(
    vprefix,
    {k: f"{vprefix}.{k}" for k in tensors},
    path,
    _get(job.out["params"], path) or {},
    _get(job.out.get(job.collection, {}), path),
    job.collection,
    f"{_WHERE}: '{vprefix}' -> 'params/{'/'.join(path)}'",
    member,
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


def _attention_path(
  job: _Load, key_map: KeyMap, module: str, keys: list[str]
) -> tuple[Path, int | None] | None:
  """The Flax attention module PyTorch ``module`` fills; ``None`` (its keys unused) if none.

  Returns:
    Its path, and the member when it is one of a stack (``layers.3.attn`` in
    the ``nn.scan``-stacked ``layers/attn``, whose query kernel has a leading
    axis), else ``None``.
  """
  params = job.out["params"]
  path = resolve(key_map, module, params) if module or key_map is not None else ()
  node = None if path is None or isinstance(path, str) else _get(params, path)
  if node is None and path is not None:
    stacked = _stacked_attention(job, key_map, module)
    if stacked is not None:
      return stacked
  if node is not None and isinstance(path, tuple):
    missing = [p for p in (*PARTS, "out") if p not in node]
    if missing and _by_name(job, key_map, keys, node, "no Flax attention there"):
      return None
    if missing:
      raise ValueError(
        f"{_WHERE}: PyTorch attention '{module}' -> 'params/{'/'.join(path)}': an "
        f"nn.MultiheadAttention, but the Flax module there has {sorted(node)}, not "
        "query, key, value and out (a Flax MultiHeadDotProductAttention, SelfAttention or "
        f"nnx.MultiHeadAttention); does key_map map '{module}' to the right module?"
      )
    return path, None
  if path is None:
    reason = "key_map skips it"
  else:
    reason = path if isinstance(path, str) else f"no Flax module at 'params/{'/'.join(path)}'"
  job.unused.update({key: f"attention '{module}': {reason}" for key in keys})
  return None


def _stacked_attention(job: _Load, key_map: KeyMap, module: str) -> tuple[Path, int] | None:
  """The stacked Flax attention and member that ``module`` (with an index) is, or ``None``."""
  for path, i in unindexed(key_map, module, job.out["params"]):
    query = _get(job.out["params"], (*path, "query"))
    shape = () if query is None else _kernel_shape(query)
    if len(shape) == 4 and i < shape[0]:
      return path, i
  return None


def _load_attention(
  job: _Load,
  key_map: KeyMap,
  module: str,
  parts: dict[str, dict[str, str]],
  layers: dict[str, dict[str, str]],
) -> dict[str, TorchLayer]:
  """Loads one ``nn.MultiheadAttention`` into a Flax attention module's four parts.

  Its ``out_proj`` is taken from ``layers`` (the state dict's layers) when the
  Flax module is an attention; otherwise it stays a layer of its own.

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
  weights = [n for n in parts if n != "in_proj_bias"]
  if not weights:
    raise ValueError(f"{where}: no in_proj_weight nor q/k/v_proj_weight among its keys.")
  found = _attention_path(job, key_map, module, [k for p in parts.values() for k in p.values()])
  if found is None:
    return {}
  path, member = found
  out_proj = layers.pop(join(module, "out_proj"), None)
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
      e = w.n_rows // 3 if packed else w.n_rows
      picked = np.arange(i * e, (i + 1) * e) if packed else None
      tensors = w.part(picked, lambda shape: _across_parts(where, prefix, w.method, shape))
      if b is not None:
        tensors["bias"] = b[np.arange(i * e, (i + 1) * e)]
      vprefix = f"{prefix}[{child}]" if packed else prefix
      loaded[child] = _load_part(job, prefix, vprefix, (*path, child), tensors, member)
    out[prefix] = _joined(loaded, kind="multihead_attention", path="/".join(path))
  if out_proj is not None:
    prefix = join(module, "out_proj")
    t = _Target(
      prefix,
      out_proj,
      (*path, "out"),
      _get(job.out["params"], (*path, "out")) or {},
      _get(job.out.get(job.collection, {}), (*path, "out")),
      job.collection,
      f"{_WHERE}: layer '{prefix}' -> 'params/{'/'.join((*path, 'out'))}'",
      member,
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
# Read from the model, and saved.
# --------------------------------------------------------------------------- #


#: Flax cell classes -> the PyTorch recurrent module they are one layer of.
_CELLS = {"LSTMCell": "lstm", "OptimizedLSTMCell": "lstm", "GRUCell": "gru", "SimpleCell": "rnn"}


def _attention_layers(m: _Model, path: Path) -> dict[str, TorchLayer]:
  """A Flax attention module as a PyTorch ``nn.MultiheadAttention`` (one per member of a stack).

  Its query, key and value are ``in_proj_weight`` when they take inputs of one
  size, else ``q_proj_weight``, ``k_proj_weight`` and ``v_proj_weight``; its
  ``out`` is ``out_proj``. In an ``nn.scan`` stack (a query kernel of four
  axes), member ``i`` is ``layers.i.attn``.
  """
  params = m.variables["params"]
  shapes = {p: _kernel_shape(_get(params, (*path, p)) or {}) for p in (*PARTS, "out")}
  stacked = len(shapes["query"]) - 3
  if stacked not in (0, 1):
    raise ValueError(f"to_torch_state_dict: 'params/{'/'.join(path)}': {stacked} stack axes.")
  shapes = {p: shape[stacked:] for p, shape in shapes.items()}
  if stacked:
    modules = member_prefixes(params, path, m.naming)
  else:
    modules = [m.prefix(path)]
  packed = len({shapes[p][0] for p in PARTS}) == 1
  weights = ["in_proj_weight"] if packed else list(WEIGHTS[1:])
  out = {}
  for name in [*weights, "out_proj"]:
    child = (*path, "out" if name == "out_proj" else parts_of(name)[0])
    shape = shapes[child[-1]]
    k = len(shape) - 1 if name == "out_proj" else 1
    where = f"to_torch_state_dict: 'params/{'/'.join(child)}'"
    info = m.layers.get(child)
    info = info if info is None or not stacked else _member_info(info, where)
    kind, tpath = ("linear", child) if name == "out_proj" else ("multihead_attention", path)
    for i, module in enumerate(modules):
      prefix = join(module, name)
      method, axis, style, dim = _view_wrapping(info, shape, k, prefix, m.spectral_dims)
      out[prefix] = TorchLayer(
        {}, kind, method, axis, "kernel", style, "/".join(tpath), None, dim, None, k,
        i if stacked else None,
      )  # fmt: skip
  return out


def _cell_layers(m: _Model, path: Path, kind: str) -> dict[str, TorchLayer]:
  """The two sides of a Flax cell as one layer of a PyTorch recurrent module (see above)."""
  params = m.variables["params"]
  layout = layout_of(kind, _get(params, path) or {})
  assert layout is not None  # (only cells with a layout are passed)
  if m.layers[path].unsupported:
    where = f"to_torch_state_dict: the Flax {m.layers[path].cls} at 'params/{'/'.join(path)}'"
    raise ValueError(f"{where}: {m.layers[path].unsupported}.")
  holder, reverse = path[:-1] if path[-1] == "cell" else path, False
  if holder and holder[-1] in ("forward_rnn", "backward_rnn"):
    holder, reverse = holder[:-1], holder[-1] == "backward_rnn"
  module = m.prefix(holder)
  out = {}
  for side in ("ih", "hh"):
    child = (*path, layout.children(side)[0])
    node = _get(params, child) or {}
    shape = _kernel_shape(node)
    prefix = RnnKey(module, 0, reverse, side, "weight").prefix
    how = _wrapping(
      m.layers.get(child), "kernel", LAYOUTS["linear"], shape, prefix, m.spectral_dims
    )
    out[prefix] = TorchLayer(
      {}, kind, how[0], how[1], "kernel", how[2], "/".join(path), None, how[3], True
    )
  return out


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
    weight = max(joined.values(), key=np.size)  # the weight (or v), not g or u
    hidden = weight.shape[0] // len(GATES[layer.kind])
    out[rnn_key("bias", rk.param)] = torch_bias(layout, biases, rk.side, hidden, weight.dtype)
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
