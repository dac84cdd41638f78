"""Folding of nested variable trees, shared by the removal functions of every face.

Trees are nested mappings (``dict``/``FrozenDict``) whose leaves are arrays or
boxed arrays (``flax.core.meta.AxisMetadata``, e.g. ``nn.Partitioned``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from flax.core import meta

from flaxnorm import _checks, _math, _options
from flaxnorm._checks import Axis

#: How error messages name the top of a tree or model, in every face.
TOP = "<top level>"


def _join(path: tuple[str, ...], key: str) -> str:
  return "/".join((*path, key))


def _is_weight(x: Any) -> bool:
  return isinstance(x, meta.AxisMetadata) or hasattr(x, "dtype")


def fold_weight_norm_level(
  node: Mapping[Any, Any],
  eps: float,
  path: tuple[Any, ...],
  recurse: Callable[[Any, tuple[Any, ...]], Any],
  fn: str,
) -> dict[Any, Any]:
  """Composes the ``{x}_g``/``{x}_v`` pairs of one mapping; ``recurse`` handles the rest.

  Boxed pairs (``nn.Partitioned``) are unboxed to compute and the result is
  boxed like ``{x}_v``. ``fn`` names the caller in error messages.
  """
  bases = {
    k[:-2]
    for k, x in node.items()
    if isinstance(k, str)
    and k.endswith("_g")
    and _is_weight(x)
    and _is_weight(node.get(f"{k[:-2]}_v"))
  }
  out: dict[Any, Any] = {}
  for key, x in node.items():
    base = key[:-2] if isinstance(key, str) else None
    if base in bases and key[-2:] in ("_g", "_v"):
      if base in node:
        raise ValueError(
          f"{fn}: {_join(tuple(map(str, path)), base)!r} exists beside "
          f"{base}_g/{base}_v; cannot fold the pair into it."
        )
      if key.endswith("_v"):
        w = _math.weight_norm_compose(meta.unbox(node[f"{base}_g"]), meta.unbox(x), eps)
        out[base] = x.replace_boxed(w) if isinstance(x, meta.AxisMetadata) else w
    else:
      out[key] = recurse(x, (*path, key))
  return out


def _fold_wn(tree: Mapping[str, Any], eps: float, path: tuple[str, ...]) -> dict[str, Any]:
  def recurse(x, p):
    return _fold_wn(x, eps, p) if isinstance(x, Mapping) else x

  return fold_weight_norm_level(tree, eps, path, recurse, "remove_weight_norm")


def fold_weight_norm(variables: Mapping[str, Any], *, eps: float = 1e-12) -> dict[str, Any]:
  """Composes every ``{x}_g``/``{x}_v`` pair of ``variables['params']`` into ``{x}``.

  A tree without a ``'params'`` key is taken as a bare params tree.
  """
  if isinstance(variables.get("params"), Mapping):
    return {**variables, "params": _fold_wn(variables["params"], eps, ())}
  return _fold_wn(variables, eps, ())


def spectral_entries(
  state: Mapping[str, Any], fn: str, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], str, tuple[Any, Any, Any]]]:
  """Reads a spectral state tree: ``[(layer path, param name, (u, v, sigma))]``.

  The layout is Linen's ``spectral`` collection (and ``flaxnorm.tree``'s): nested
  mappings whose leaves are ``{x}_u``, ``{x}_v`` and ``{x}_sigma``. Anything
  else, or an incomplete triple, is a ``ValueError`` naming ``fn``.
  """
  out = []
  bases = {
    k[: -len(_options.SPECTRAL_SUFFIXES[0])]
    for k, x in state.items()
    if k.endswith(_options.SPECTRAL_SUFFIXES[0]) and not isinstance(x, Mapping)
  }
  for key, x in state.items():
    if isinstance(x, Mapping):
      out += spectral_entries(x, fn, (*path, key))
    elif not any(key.endswith(s) and key[: -len(s)] in bases for s in _options.SPECTRAL_SUFFIXES):
      raise ValueError(
        f"{fn}: unexpected state entry {_join(path, key)!r}: entries are {{x}}_u, {{x}}_v "
        "and {x}_sigma (from spectral_norm_init or a Linen 'spectral' collection)."
      )
  for base in sorted(bases):
    keys = _options.spectral_keys(base)
    missing = [k for k in keys if k not in state]
    if missing:
      raise ValueError(
        f"{fn}: state at {'/'.join(path) or TOP!r} has {keys[0]} but lacks {missing}."
      )
    out.append((path, base, (state[keys[0]], state[keys[1]], state[keys[2]])))
  return out


def check_spectral_state(
  w: Any, state: tuple[Any, Any, Any], name: str, axis: Axis, at: str
) -> tuple[int, ...]:
  """Checks a kernel and a stored state given with a user's ``axis``; returns the kept axes.

  Args:
    w: the (unboxed) kernel.
    state: its stored ``(u, v, sigma)``.
    name: the param's name (``kernel``), for the state's key names.
    axis: the ``axis`` the caller passed: the error points at it.
    at: the param's place, e.g. ``"remove_spectral_norm: param 'Dense_0/kernel'"``.
  """
  kept = _checks.check_spectral_weight(w, axis, at)
  shapes = [jnp.shape(meta.unbox(x)) for x in state]
  _checks.check_state_fits(w.shape, kept, shapes, _options.spectral_keys(name), at, axis_given=axis)
  return kept


def spectral_fold_one(
  w: Any, state: tuple[Any, Any, Any], name: str, axis: Axis, eps: float, mode: str, at: str
) -> Any:
  """``w / sigma`` from the stored vectors (``sigma = u^T W v``); ``w`` may be boxed."""
  raw, w = w, meta.unbox(w)
  kept = check_spectral_state(w, state, name, axis, at)
  u, v, _ = (meta.unbox(x) for x in state)
  w_sn, _ = _math.spectral_normalize(w, u, v, axis=kept, n_steps=0, eps=eps, mode=mode)
  return raw.replace_boxed(w_sn) if isinstance(raw, meta.AxisMetadata) else w_sn


def fold_spectral_norm(
  variables: Mapping[str, Any],
  collection: str = "spectral",
  *,
  axis: Axis | Mapping[str, Axis] = -1,
  eps: float = 1e-12,
  mode: str = "normalize",
) -> dict[str, Any]:
  """Divides each kernel with spectral state by ``sigma = u^T W v`` and drops the state."""
  fn = "remove_spectral_norm"
  if collection not in variables or "params" not in variables:
    raise ValueError(
      f"{fn}: variables need 'params' and '{collection}' collections, found {sorted(variables)}."
    )
  params = _copy_mappings(variables["params"])
  for path, name, state in spectral_entries(variables[collection], fn):
    node = params
    for part in path:
      node = node.get(part) if isinstance(node, dict) else None
      if node is None:
        raise ValueError(
          f"{fn}: the spectral state has a layer {'/'.join(path)!r} that the params do not have."
        )
    if name not in node or isinstance(node[name], Mapping):
      raise ValueError(
        f"{fn}: state {_join(path, name + '_u')!r} needs a param {_join(path, name)!r}; "
        f"params here are {sorted(node)}."
      )
    layer_axis = axis.get("/".join(path), -1) if isinstance(axis, Mapping) else axis
    at = f"{fn}: param {_join(path, name)!r}"
    node[name] = spectral_fold_one(node[name], state, name, layer_axis, eps, mode, at)
  return {
    **{k: x for k, x in variables.items() if k not in (collection, "params")},
    "params": params,
  }


def _copy_mappings(tree: Any) -> Any:
  """A copy of the nested mappings of ``tree`` as dicts (leaves shared)."""
  if isinstance(tree, Mapping):
    return {k: _copy_mappings(x) for k, x in tree.items()}
  return tree
