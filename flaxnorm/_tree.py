"""Pytree-level folding shared by the removal functions of every face.

Trees are nested mappings (``dict``/``FrozenDict``) whose leaves are arrays or
boxed arrays (``flax.core.meta.AxisMetadata``, e.g. ``nn.Partitioned``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flax.core import meta

from flaxnorm import _math
from flaxnorm._checks import Axis


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


_STATE_SUFFIXES = ("_u", "_v", "_sigma")


def _fold_sn(
  params: Mapping[str, Any],
  state: Mapping[str, Any],
  axis: Axis | Mapping[str, Axis],
  eps: float,
  mode: str,
  path: tuple[str, ...],
) -> dict[str, Any]:
  out = dict(params)
  bases = {k[:-2] for k in state if k.endswith("_u") and not isinstance(state[k], Mapping)}
  for key, x in state.items():
    if isinstance(x, Mapping):
      if not isinstance(params.get(key), Mapping):
        raise ValueError(
          f"remove_spectral_norm: the spectral state has a layer {_join(path, key)!r} "
          "that the params do not have."
        )
      out[key] = _fold_sn(params[key], x, axis, eps, mode, (*path, key))
    elif not any(key.endswith(s) and key[: -len(s)] in bases for s in _STATE_SUFFIXES):
      raise ValueError(f"remove_spectral_norm: unexpected state entry {_join(path, key)!r}.")
  for base in sorted(bases):
    missing = [base + s for s in _STATE_SUFFIXES[1:2] if base + s not in state]
    if missing or base not in params or isinstance(params[base], Mapping):
      raise ValueError(
        f"remove_spectral_norm: state {_join(path, base + '_u')!r} needs "
        f"{_join(path, base + '_v')!r} in the state and a param {_join(path, base)!r}; "
        f"params here are {sorted(params)}."
      )
    raw = params[base]
    w = meta.unbox(raw)
    if isinstance(axis, Mapping):  # per-layer axes, keyed by layer path
      layer_axis = axis.get("/".join(path), -1)
    else:
      layer_axis = axis
    u, v = meta.unbox(state[f"{base}_u"]), meta.unbox(state[f"{base}_v"])
    try:
      w_sn, _ = _math.spectral_normalize(w, u, v, axis=layer_axis, n_steps=0, eps=eps, mode=mode)
    except ValueError as e:
      raise ValueError(
        f"remove_spectral_norm: param {_join(path, base)!r} of shape {tuple(w.shape)} "
        f"does not fit its state (u {tuple(u.shape)}, v {tuple(v.shape)}) with "
        f"axis={layer_axis!r}; pass the axis the layer was wrapped with. ({e})"
      ) from None
    out[base] = raw.replace_boxed(w_sn) if isinstance(raw, meta.AxisMetadata) else w_sn
  return out


def fold_spectral_norm(
  variables: Mapping[str, Any],
  collection: str = "spectral",
  *,
  axis: Axis | Mapping[str, Axis] = -1,
  eps: float = 1e-12,
  mode: str = "normalize",
) -> dict[str, Any]:
  """Divides each kernel with spectral state by ``sigma = u^T W v`` and drops the state."""
  if collection not in variables or "params" not in variables:
    raise ValueError(
      f"remove_spectral_norm: variables need 'params' and '{collection}' "
      f"collections, found {sorted(variables)}."
    )
  params = _fold_sn(variables["params"], variables[collection], axis, eps, mode, ())
  out = {k: x for k, x in variables.items() if k != collection}
  out["params"] = params
  return out
