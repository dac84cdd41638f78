"""Removal (folding) of weight norm and spectral norm in nested variable trees.

``remove_weight_norm`` and ``remove_spectral_norm`` (exported by ``flaxnorm``)
serve Linen variables and the trees of ``flaxnorm.tree``; this module also holds
the one reader of the spectral state layout, used by ``flaxnorm.tree``.

Trees are nested mappings (``dict``/``FrozenDict``) whose leaves are arrays or
boxed arrays (``flax.core.meta.AxisMetadata``, e.g. ``nn.Partitioned``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta
from jax.core import Tracer

from flaxnorm import _checks, _math, _options, _power
from flaxnorm._checks import Axis

#: How error messages name the top of a tree or model, in every face.
TOP = "<top level>"


def _join(path: tuple[Any, ...], key: Any) -> str:
  return _slash((*path, key))


def _slash(path: tuple[Any, ...]) -> str:
  """``"a/0/b"``: a path of str keys, or int ones (``nnx.Sequential``/``nnx.List`` state)."""
  return "/".join(map(str, path))


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
          f"{fn}: {_join(path, base)!r} exists beside "
          f"{base}_g/{base}_v; cannot fold the pair into it."
        )
      if key.endswith("_v"):
        v = meta.unbox(x)
        w = _math.weight_norm_compose(_stacked_g(meta.unbox(node[f"{base}_g"]), v), v, eps)
        out[base] = x.replace_boxed(w) if isinstance(x, meta.AxisMetadata) else w
    else:
      out[key] = recurse(x, (*path, key))
  return out


def _stacked_g(g: Any, v: Any) -> Any:
  """``g`` in ``v``'s rank where it is a stack of whole-tensor ``g`` (``axis=None``).

  A layer stacked by ``nn.vmap``/``nn.scan`` (or ``jax.vmap`` of ``init``) with
  ``axis=None`` has ``g`` of the stack's shape, ``v.shape[:k]``: one scalar per
  member, each normalizing its own member (size 1 on every other axis).
  """
  k = jnp.ndim(g)
  if 0 < k < jnp.ndim(v) and jnp.shape(g) == jnp.shape(v)[:k]:
    return jnp.reshape(g, (*jnp.shape(g), *(1,) * (jnp.ndim(v) - k)))
  return g


def _fold_wn(tree: Mapping[str, Any], eps: float, path: tuple[str, ...]) -> dict[str, Any]:
  def recurse(x, p):
    return _fold_wn(x, eps, p) if isinstance(x, Mapping) else x

  return fold_weight_norm_level(tree, eps, path, recurse, "remove_weight_norm")


def remove_weight_norm(variables: Mapping[str, Any], *, eps: float = 1e-12) -> dict[str, Any]:
  """Folds every ``{x}_g``/``{x}_v`` param pair back into a plain ``{x}``.

  Args:
    variables: a Linen variables dict (``{"params": ..., ...}``) or a bare params
      tree; boxed values (``nn.Partitioned``) keep their metadata.
    eps: the ``eps`` the layer was wrapped with.

  Returns:
    Variables for the plain (unwrapped) layer; applying it gives the wrapped
    layer's output. Other collections are returned unchanged.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import flaxnorm
    >>> x = jnp.ones((1, 4))
    >>> variables = flaxnorm.weight_norm(nn.Dense(3)).init(jax.random.key(0), x)
    >>> plain = flaxnorm.remove_weight_norm(variables)
    >>> jax.tree.map(jnp.shape, plain)
    {'params': {'bias': (3,), 'kernel': (4, 3)}}
    >>> y = nn.Dense(3).apply(plain, x)  # the wrapped layer's output
  """
  if isinstance(variables.get("params"), Mapping):
    return {**variables, "params": _fold_wn(variables["params"], eps, ())}
  return _fold_wn(variables, eps, ())


def some_spectral_entries(
  state: Mapping[str, Any], fn: str, what: str, hint: str
) -> list[tuple[tuple[str, ...], str, tuple[Any, Any, Any]]]:
  """:func:`spectral_entries`, raising if there are none (nothing would be normalized).

  ``what`` names the state in the message (``"the state"``); ``hint`` says what to pass.
  """
  entries = spectral_entries(state, fn)
  if not entries:
    raise ValueError(
      f"{fn}: {what} holds no {{x}}_u/{{x}}_v/{{x}}_sigma state (got "
      f"{jax.tree.map(jnp.shape, dict(state))}); {hint}."
    )
  return entries


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
    if isinstance(k, str)
    and k.endswith(_options.SPECTRAL_SUFFIXES[0])
    and not isinstance(x, Mapping)
  }
  for key, x in state.items():
    if isinstance(x, Mapping):
      out += spectral_entries(x, fn, (*path, key))
    elif not isinstance(key, str) or not any(
      key.endswith(s) and key[: -len(s)] in bases for s in _options.SPECTRAL_SUFFIXES
    ):
      raise ValueError(
        f"{fn}: unexpected state entry {_join(path, key)!r}: entries are {{x}}_u, {{x}}_v "
        "and {x}_sigma (from spectral_norm_init or a Linen 'spectral' collection)."
      )
  for base in sorted(bases):
    keys = _options.spectral_keys(base)
    missing = [k for k in keys if k not in state]
    if missing:
      raise ValueError(f"{fn}: state at {_slash(path) or TOP!r} has {keys[0]} but lacks {missing}.")
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
  for x, key in zip(state, _options.spectral_keys(name)):
    _checks.check_float_array(
      meta.unbox(x), f"the stored {key}", at, complex_ok=not key.endswith("_sigma")
    )
  shapes = [jnp.shape(meta.unbox(x)) for x in state]
  _checks.check_state_fits(w.shape, kept, shapes, _options.spectral_keys(name), at, axis_given=axis)
  return kept


def stored_axes(w: Any, u: Any, v: Any, name: str, at: str) -> tuple[int, ...]:
  """The kept axes a stored ``(u, v)`` was iterated with, read from the state itself.

  The candidates are the sets of kernel axes whose sizes fit ``u`` and ``v``
  (``Embed``'s ``0``, ``Dense``'s ``-1``, a ``ConvTranspose(transpose_kernel=True)``'s
  ``-2``, an ``Einsum``'s output letters wherever they sit). When several fit
  (a square kernel), power iteration leaves ``u``
  exactly along ``W v`` in the view it iterated (up to rounding and the
  optimizer's steps since), and along it in another view only by chance: the
  best-aligned view wins when every other is 100x further from aligned (or
  folds to the same kernel); otherwise the caller must give ``axis``.
  """
  shape, u_size, v_size = np.shape(w), math.prod(np.shape(u)), math.prod(np.shape(v))
  views = [a for k in range(1, len(shape)) for a in itertools.combinations(range(len(shape)), k)]
  fits = [a for a in views if math.prod(shape[i] for i in a) == u_size]
  fits = [a for a in fits if math.prod(shape) // u_size == v_size]
  if len(fits) == 1:  # from the shapes alone: no values read (jit, eval_shape, sharded)
    return fits[0]
  if any(isinstance(x, Tracer) for x in (w, u, v)):
    raise ValueError(
      f"{at} of shape {tuple(shape)}: several axes fit its stored state ({name}_u "
      f"{tuple(np.shape(u))}, {name}_v {tuple(np.shape(v))}: candidates {fits}), and under "
      "jit or eval_shape its values cannot be read to tell which; pass axis=... as given "
      "to spectral_norm."
    )
  dtype = np.complex128 if any(np.iscomplexobj(x) for x in (w, u, v)) else np.float64
  w, u, v = (np.asarray(x, dtype) for x in (w, u, v))
  scored = {a: _view_fit(w, u, v, a) for a in fits}
  if scored:
    kept = max(scored, key=scored.__getitem__)
    best, sigma = scored[kept]
    # Views whose sigma is the best's fold to the same kernel (a symmetric one):
    # any of them will do. Every other view must fit 100x worse than the best.
    others = [fit for fit, s in scored.values() if abs(s - sigma) > 1e-6 * sigma]
    if not others or (best > 0.9 and all(1 - best < 1e-2 * (1 - fit) for fit in others)):
      return kept
  raise ValueError(
    f"{at} of shape {tuple(w.shape)}: cannot tell from its stored state "
    f"({name}_u {tuple(u.shape)}, {name}_v {tuple(v.shape)}) which axis it was wrapped with "
    f"(candidates {fits or 'none'}); pass axis=... as given to spectral_norm."
  )


def _view_fit(w: np.ndarray, u: np.ndarray, v: np.ndarray, kept: tuple[int, ...]) -> tuple:
  """``(fit, sigma)`` of the stored vectors in the matrix view ``W`` keeping ``kept``.

  ``fit = |u^H W v| / (||u|| ||W v||)``, ``u``'s alignment with ``W v``: power
  iteration's last step sets ``u = W v / ||W v||``, so in the view it iterated
  ``1 - fit`` is rounding (or the optimizer steps since); ``sigma = |u^H W v|``.
  """
  mat = np.moveaxis(w, kept, range(len(kept))).reshape(u.size, v.size)
  wv = mat @ v.reshape(-1)
  sigma = float(abs(np.vdot(u.reshape(-1), wv)))
  norm = float(np.linalg.norm(u) * np.linalg.norm(wv))
  return (sigma / norm if norm > 0 else 0.0), sigma


def spectral_fold_one(
  w: Any,
  state: tuple[Any, Any, Any],
  name: str,
  axis: Axis | Literal["auto"],
  options: _options.SpectralNormOptions,
  at: str,
) -> Any:
  """The kernel the layer uses in evaluation; ``w`` may be boxed.

  Kernel mode: ``w / sigma`` with ``sigma = u^T W v`` from the stored vectors.
  Operator mode (``u`` and ``v`` are examples, with a batch axis): ``w /
  sigma`` with the stored sigma, as its evaluation does. A state stacked by
  ``nn.vmap`` or ``nn.scan`` (``sigma`` not a scalar) folds member by member.
  """
  raw, w = w, meta.unbox(w)
  u, v, sigma = (meta.unbox(x) for x in state)
  stack = jnp.shape(sigma)
  if stack:  # stacked by nn.vmap / nn.scan: each member on its own
    if any(jnp.shape(x)[: len(stack)] != stack for x in (w, u, v)):
      raise ValueError(
        f"{at}: a stacked state (sigma of shape {stack}) needs the kernel, u and v stacked "
        f"on the same leading axes; got kernel {jnp.shape(w)}, u {jnp.shape(u)}, "
        f"v {jnp.shape(v)} (nn.vmap / nn.scan with variable_axes 0 for params and state)."
      )
    members = [
      _fold_member(w[i], (u[i], v[i], sigma[i]), name, axis, options, at)
      for i in np.ndindex(*stack)
    ]
    w_sn = jnp.stack(members).reshape(jnp.shape(w))
  else:
    w_sn = _fold_member(w, (u, v, sigma), name, axis, options, at)
  return raw.replace_boxed(w_sn) if isinstance(raw, meta.AxisMetadata) else w_sn


def _fold_member(
  w: Any,
  state: tuple[Any, Any, Any],
  name: str,
  axis: Axis | Literal["auto"],
  options: _options.SpectralNormOptions,
  at: str,
) -> Any:
  """One (unstacked) member's evaluation kernel: see :func:`spectral_fold_one`."""
  u, v, sigma = state
  if jnp.ndim(u) >= 2 and jnp.ndim(v) >= 2:  # operator mode: one example each
    scale = _power.sigma_scale(
      sigma, options.eps, mode=options.mode, target=options.target, at=options.at
    )
    w_sn = _math.apply_scale(w, scale)
  else:
    if axis == "auto":
      axis = stored_axes(w, u, v, name, at)
    kept = check_spectral_state(w, state, name, axis, at)
    w_sn, _ = _power.spectral_normalize(
      w, u, v, axis=kept, n_steps=0, eps=options.eps, mode=options.mode, target=options.target
    )
  return w_sn


def remove_spectral_norm(
  variables: Mapping[str, Any],
  collection: str = "spectral",
  *,
  axis: Axis | Literal["auto"] | Mapping[str, Axis | Literal["auto"]] = "auto",
  eps: float = 1e-12,
  mode: str = "normalize",
  target: float = 1.0,
) -> dict[str, Any]:
  """Divides every spectrally normalized kernel by its sigma and drops the state.

  Sigma is ``u^T W v`` from the stored vectors, as in evaluation, so the plain
  layer applied to the result gives the wrapped layer's eval output.

  Args:
    variables: a Linen variables dict with ``params`` and ``collection``.
    collection: the collection holding the spectral state.
    axis: the kept axis the layers were wrapped with, or a mapping from layer
      path (``"Block_0/Dense_1"``) to axis, layers missing from it taking
      ``"auto"``. ``"auto"`` (default) reads it from the stored state: the
      leading or trailing kernel axes whose sizes fit ``u`` and ``v`` (for a
      square view, the one along which ``u`` is aligned with ``W v``), and asks
      for ``axis`` when that is ambiguous. Only a square view reads values, so
      under ``jax.jit`` or ``jax.eval_shape`` it needs ``axis``.
    eps: the ``eps`` the layers were wrapped with.
    mode: the ``mode`` the layers were wrapped with.
    target: the ``target`` the layers were wrapped with.

  Returns:
    Variables for the plain layer, without ``collection``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import flaxnorm
    >>> x = jnp.ones((1, 4))
    >>> layer = flaxnorm.spectral_norm(nn.Dense(3))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> plain = flaxnorm.remove_spectral_norm(variables)
    >>> jax.tree.map(jnp.shape, plain)
    {'params': {'bias': (3,), 'kernel': (4, 3)}}
    >>> bool(jnp.allclose(nn.Dense(3).apply(plain, x), layer.apply(variables, x)))
    True
  """
  fn = "remove_spectral_norm"
  # Checked once (eps, mode, target); the axis may differ per layer.
  options = _options.SpectralNormOptions(eps=eps, mode=mode, target=target, at=fn)
  if collection not in variables or "params" not in variables:
    raise ValueError(
      f"{fn}: variables need 'params' and '{collection}' collections, found {sorted(variables)}."
    )
  params = _copy_mappings(variables["params"])
  entries = some_spectral_entries(
    variables[collection],
    fn,
    f"the '{collection}' collection",
    "pass the variables of the spectrally normalized model",
  )
  _check_axis_map(axis, {_slash(path) for path, _, _ in entries}, fn)
  for path, name, state in entries:
    node = params
    for part in path:
      node = node.get(part) if isinstance(node, dict) else None
      if node is None:
        raise ValueError(
          f"{fn}: the spectral state has a layer {_slash(path)!r} that the params do not have."
        )
    if name not in node or isinstance(node[name], Mapping):
      raise ValueError(
        f"{fn}: state {_join(path, name + '_u')!r} needs a param {_join(path, name)!r}; "
        f"params here are {sorted(node)}."
      )
    layer_axis = axis.get(_slash(path), "auto") if isinstance(axis, Mapping) else axis
    at = f"{fn}: param {_join(path, name)!r}"
    node[name] = spectral_fold_one(node[name], state, name, layer_axis, options, at)
  return {
    **{k: x for k, x in variables.items() if k not in (collection, "params")},
    "params": params,
  }


def _check_axis_map(axis: Any, layers: set[str], fn: str) -> None:
  """Raises if an ``axis`` mapping names a layer without spectral state (a typo would be silent)."""
  if not isinstance(axis, Mapping):
    return
  unknown = sorted(str(k) for k in axis if k not in layers)
  if unknown:
    raise ValueError(
      f"{fn}: axis names layers {unknown} that have no spectral state; the spectrally "
      f"normalized layers are {sorted(layers)} (paths like 'Block_0/Dense_1', '' for the top level)."
    )


def _copy_mappings(tree: Any) -> Any:
  """A copy of the nested mappings of ``tree`` as dicts (leaves shared)."""
  if isinstance(tree, Mapping):
    return {k: _copy_mappings(x) for k, x in tree.items()}
  return tree
