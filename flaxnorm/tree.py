"""Weight norm and spectral norm on plain parameter pytrees, for any pure apply function.

Like Haiku's ``SNParamsTree``, but for both methods and for any pytree: a Linen
``params`` dict, a hand-written dict of ``jnp`` arrays, or the array half of an
equinox model (``eqx.partition(model, eqx.is_array)``). Nothing is wrapped: you
turn the stored tree into the tree your apply function expects, inside the
function you differentiate.

Layout for the params of ``nn.Dense(3)`` on 4 features,
``{'Dense_0': {'bias': (3,), 'kernel': (4, 3)}}`` as
``jax.tree.map(jnp.shape, ...)``::

  weight_norm_init(params):        {'Dense_0': {'bias': (3,), 'kernel_g': (1, 3), 'kernel_v': (4, 3)}}
  spectral_norm_init(params, key): {'Dense_0': {'kernel_sigma': (), 'kernel_u': (3,), 'kernel_v': (4,)}}

These are exactly the Linen transforms' ``params`` and ``spectral`` layouts, so
``flaxnorm.remove_weight_norm(wn_params)`` and
``flaxnorm.remove_spectral_norm({'params': params, 'spectral': state})`` work
on them, and a checkpoint moves between the Linen and pytree faces unchanged.

Where the selected leaf has no dict parent to add keys to (a list item, an
equinox field), weight norm replaces the leaf by a :class:`WeightNormParam`
node ``(g, v)``; the spectral state is always a nested dict whose keys are the
path's keys as strings (``{'layers': {'0': {'weight_u': ...}}}``).

Selection (``names``): leaf names (the dict key or attribute name of the leaf),
or a predicate ``(path, leaf) -> bool`` called on every array leaf, ``path``
being the tuple of keys (``str`` for dict keys and attributes, ``int`` for
sequence positions). Boxed leaves (``nn.Partitioned``) must be unboxed first
(``flax.core.meta.unbox``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
from flax import nnx
from flax.core import meta

from flaxnorm import _axes, _checks, _fold, _math, _options, _power, _select
from flaxnorm._checks import Axis

__all__ = (
  "SpectralNormTransform",
  "WeightNormParam",
  "WeightNormTransform",
  "spectral_norm",
  "spectral_norm_apply",
  "spectral_norm_init",
  "weight_norm",
  "weight_norm_apply",
  "weight_norm_init",
)

Path = _select.Path
Selector = _select.Selector


class _Default(str):
  """The default ``name``, told apart from an explicit ``name="kernel"`` (see ``names=``)."""

  __slots__ = ()


_KERNEL: Selector = _Default("kernel")


class WeightNormParam(NamedTuple):
  """A weight-normalized leaf where there is no dict to hold ``{name}_g``/``{name}_v``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flaxnorm.tree
    >>> layers = [jnp.ones((4, 3))]  # a list: no dict to add keys to
    >>> wn = flaxnorm.tree.weight_norm_init(layers, name=lambda path, x: True)
    >>> jax.tree.map(jnp.shape, wn[0])
    WeightNormParam(g=(1, 3), v=(4, 3))
  """

  g: Any  # magnitude: the weight's rank with size 1 on the reduced axes.
  v: Any  # direction: the weight's shape.


# --------------------------------------------------------------------------- #
# Weight norm.
# --------------------------------------------------------------------------- #


def _check_plain(params: Any, fn: str) -> None:
  """Raises for a tree of ``nnx.Variable`` (an ``nnx.State``): this face takes arrays."""
  is_variable = lambda x: isinstance(x, nnx.Variable)
  if any(map(is_variable, jax.tree.leaves(params, is_leaf=is_variable))):
    raise TypeError(
      f"{fn}: params holds nnx.Variable leaves (an nnx.State?); flaxnorm.tree takes a "
      "pytree of arrays. Wrap the NNX module with flaxnorm.nnx instead, or pass "
      "nnx.to_pure_dict(state)."
    )


def _decompose(x: Any, axis: Axis, path: Path) -> tuple[Any, Any]:
  at = f"tree path '{_select.path_str(path)}'"
  _checks.check_float_array(x, "the param", at)
  _checks.normalize_axes(axis, x.ndim, at)
  return _math.weight_norm_decompose(x, axis)


def _wn_init(node: Any, path: Path, select: _select.Selection, axis: Axis) -> Any:
  if isinstance(node, Mapping):
    out: dict = {}
    for k, x in node.items():
      p = (*path, k)
      if select(p, x):
        gk, vk = f"{k}_g", f"{k}_v"
        if gk in node or vk in node:
          raise ValueError(
            f"weight_norm_init: '{_select.path_str(p)}' already has a '{gk}' or '{vk}' beside it "
            "(already weight-normalized?)."
          )
        out[gk], out[vk] = _decompose(x, axis, p)
      else:
        out[k] = _wn_init(x, p, select, axis)
    return _select.rebuild(node, out)
  if _select.is_leaf(node):
    return node
  children, treedef = _select.children(node)
  new = []
  for k, x in children:
    p = (*path, k)
    new.append(
      WeightNormParam(*_decompose(x, axis, p)) if select(p, x) else _wn_init(x, p, select, axis)
    )
  return treedef.unflatten(new)


def weight_norm_init(
  params: Any, *, name: Selector = _KERNEL, axis: Axis = -1, names: Selector | None = None
) -> Any:
  """Splits the selected weights into magnitude and direction: ``w = g * v / ||v||``.

  Args:
    params: any pytree of arrays (nested dicts, lists, equinox modules...).
    name: leaf names (``"kernel"``, ``("kernel", "embedding")``) or a predicate
      ``(path, leaf) -> bool``; every name must match at least one leaf.
    axis: the kept axis or axes (PyTorch's ``dim``), the same for every selected
      leaf; ``-1`` for Flax kernels ``(in, out)``, ``0`` for PyTorch-layout
      weights ``(out, in)`` (equinox), ``None`` for one whole-tensor norm.
    names: the former name of ``name``, still accepted.

  Returns:
    A tree where each selected leaf ``{name}`` in a dict is replaced by
    ``{name}_g`` (the leaf's rank with size 1 on the reduced axes, e.g.
    ``(1, out)``) and ``{name}_v`` (the leaf itself), and any other selected
    leaf by ``WeightNormParam(g, v)``. :func:`weight_norm_apply` of it gives
    back ``params`` (to rounding; a weight whose norm over the reduced axes is
    at most ``eps`` comes back times ``||w|| / eps``, see
    :func:`flaxnorm.weight_norm_compose`).

  Raises:
    ValueError: a name matches nothing (the message lists the leaves), or a
      selected leaf is already split (one of a ``{x}_g``/``{x}_v`` pair or a
      :class:`WeightNormParam`) or is spectral state.
    TypeError: a selected leaf is not a float array; ``name`` and ``names``
      both given.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flaxnorm.tree
    >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    >>> wn = flaxnorm.tree.weight_norm_init(params)
    >>> jax.tree.map(jnp.shape, wn)
    {'dense': {'bias': (3,), 'kernel_g': (1, 3), 'kernel_v': (4, 3)}}
    >>> jax.tree.map(jnp.shape, flaxnorm.tree.weight_norm_apply(wn))
    {'dense': {'bias': (3,), 'kernel': (4, 3)}}

  References:
    Salimans & Kingma, "Weight Normalization: A Simple Reparameterization to
    Accelerate Training of Deep Neural Networks", NeurIPS 2016.
  """

  name, argname = _name_or_names(name, names, "weight_norm_init")
  options = _options.WeightNormOptions(
    axis=_axes.explicit(axis, "weight_norm_init"), at="weight_norm_init"
  )
  return _weight_norm_init(params, _select.Selection(name, "weight_norm_init", argname), options)


def _name_or_names(name: Selector, names: Selector | None, fn: str) -> tuple[Selector, str]:
  """The selector from ``name=`` or its older spelling ``names=``, and which was used."""
  if names is None:
    return name, "name"
  if name is not _KERNEL:
    raise TypeError(f"{fn}: pass name= or names= (its older spelling), not both.")
  return names, "names"


def _weight_norm_init(
  params: Any, select: _select.Selection, options: _options.WeightNormOptions
) -> Any:
  _check_plain(params, options.at)
  if _select.is_array(params):
    select((), params)  # a bare array: nowhere to put {name}_g, explained by the check
  _check_not_normalized(params, select, options.at)
  out = _wn_init(params, (), select, _axes.explicit(options.axis, options.at))
  select.check_all_found(params)
  return out


def _check_pair(g: Any, v: Any, path: Path, keys: Sequence[str]) -> None:
  """Raises, naming the tree path, unless ``g`` and ``v`` are a pair :func:`weight_norm_apply` composes.

  ``g`` must be real and ``v``'s rank with size 1 on the reduced axes (its
  other sizes ``v``'s), or a scalar: what :func:`weight_norm_init` makes.
  """
  at = f"tree path '{_select.path_str(path)}'"
  _checks.check_float_array(g, keys[0], at, complex_ok=False)
  _checks.check_float_array(v, keys[1], at)
  if g.ndim and g.ndim != v.ndim:  # no layout: the reduced axes are read from g's sizes
    raise ValueError(
      f"weight_norm_apply: {keys[0]} at {at} has shape {g.shape}: it must have {keys[1]}'s "
      f"rank ({v.ndim}, shape {v.shape}) with size 1 on the reduced axes, or be a scalar "
      "(axis=None). A stack of pairs made under jax.vmap is composed under jax.vmap too."
    )
  kept = None if not g.shape else tuple(i for i, n in enumerate(g.shape) if n != 1)
  _checks.check_g_fits(g.shape, v.shape, kept, keys[0], at)


def _groups(node: Mapping, suffixes: Sequence[str]) -> dict[str, tuple[str, ...]]:
  """``{base: ({base}{suffix}, ...)}`` for each complete group of array leaves in ``node``.

  With :data:`_options.WEIGHT_NORM_SUFFIXES`, the weight-norm pairs
  :func:`weight_norm_apply` composes; with :data:`_options.SPECTRAL_SUFFIXES`,
  the spectral states.
  """
  out = {}
  for k in node:
    for suffix in suffixes:
      if isinstance(k, str) and k.endswith(suffix):
        keys = tuple(k[: -len(suffix)] + s for s in suffixes)
        if all(_select.is_array(meta.unbox(node.get(key))) for key in keys):
          out[k[: -len(suffix)]] = keys
  return out


def _made_by_flaxnorm(tree: Any, path: Path = ()) -> dict[Path, str]:
  """The leaves of ``tree`` that flaxnorm made, by path, each with what it is part of."""
  if isinstance(tree, WeightNormParam):
    return {(*path, f): f"a WeightNormParam{_WN_MADE}" for f in tree._fields}
  found: dict[Path, str] = {}
  if isinstance(tree, Mapping):
    for what, (suffixes, why) in _MADE.items():
      for keys in _groups(tree, suffixes).values():
        found.update({(*path, k): f"{what} {'/'.join(keys)}{why}" for k in keys})
  if not _select.is_leaf(tree):
    for k, x in _select.children(tree)[0]:
      found.update(_made_by_flaxnorm(x, (*path, k)))
  return found


_WN_MADE = ": it is weight-normalized already (weight_norm_apply gives the plain weights back)"
#: What :func:`_made_by_flaxnorm` finds in a dict, and why it is no plain weight.
_MADE = {
  "the weight-norm pair": (_options.WEIGHT_NORM_SUFFIXES, _WN_MADE),
  "the spectral state": (_options.SPECTRAL_SUFFIXES, ", which is no param: pass the params alone"),
}


def _check_not_normalized(params: Any, select: _select.Selection, fn: str) -> None:
  """Raises if ``select`` picks a leaf flaxnorm made (normalizing it again would be silent)."""
  made = _made_by_flaxnorm(params)
  for p, x in _select.leaves(params, is_leaf=lambda x: isinstance(x, WeightNormParam)):
    if isinstance(x, WeightNormParam) and select.names and p and p[-1] in select.names:
      raise ValueError(
        f"{fn}: the node at tree path '{_select.path_str(p)}' is a WeightNormParam{_WN_MADE}."
      )
  for p, x in _select.leaves(params):
    if p in made and select(p, x):
      raise ValueError(
        f"{fn}: the leaf at tree path '{_select.path_str(p)}' is part of {made[p]}. "
        "Select plain weights only."
      )


def _wn_apply(node: Any, path: Path, eps: float, count: list[int]) -> Any:
  if isinstance(node, WeightNormParam):
    count[0] += 1
    _check_pair(node.g, node.v, path, ("g", "v"))
    return _math.weight_norm_compose(node.g, node.v, eps)
  if isinstance(node, Mapping):
    for base, (gk, vk) in _groups(node, _options.WEIGHT_NORM_SUFFIXES).items():
      _check_pair(meta.unbox(node[gk]), meta.unbox(node[vk]), (*path, base), (gk, vk))
    out = _fold.fold_weight_norm_level(
      node, eps, path, lambda x, p: _wn_apply(x, p, eps, count), "weight_norm_apply"
    )
    count[0] += len(node) - len(out)  # each folded pair is two keys made one
    return _select.rebuild(node, out)
  if _select.is_leaf(node):
    return node
  children, treedef = _select.children(node)
  return treedef.unflatten([_wn_apply(x, (*path, k), eps, count) for k, x in children])


def weight_norm_apply(params: Any, *, eps: float = 1e-12) -> Any:
  """Builds the plain weights ``w = g * v / ||v||`` from a :func:`weight_norm_init` tree.

  Differentiable in ``g`` and ``v``; call it inside the loss you differentiate.

  Args:
    params: a tree from :func:`weight_norm_init` (or a Linen weight-norm params
      tree): every ``{x}_g``/``{x}_v`` pair of a dict and every
      :class:`WeightNormParam` is composed.
    eps: lower bound on ``||v||``; a zero ``v`` gives a zero weight with finite
      gradients.

  Returns:
    The tree your apply function expects: each pair replaced by ``{x}`` with
    ``v``'s shape and dtype, everything else unchanged.

  Raises:
    ValueError: the tree holds no weight-normalized pair, or a ``g`` does not
      fit its ``v`` (the message names the tree path).
    TypeError: a ``g`` or ``v`` is not a float array (``g`` real).

  Examples:
    >>> import jax.numpy as jnp
    >>> import flaxnorm.tree
    >>> wn = {"dense": {"kernel_g": jnp.array([[10.0]]), "kernel_v": jnp.array([[3.0], [4.0]])}}
    >>> flaxnorm.tree.weight_norm_apply(wn)["dense"]["kernel"]
    Array([[6.],
           [8.]], dtype=float32)

  References:
    Salimans & Kingma, "Weight Normalization: A Simple Reparameterization to
    Accelerate Training of Deep Neural Networks", NeurIPS 2016.
  """
  eps = _checks.check_eps(eps, "weight_norm_apply")
  _check_plain(params, "weight_norm_apply")
  count = [0]
  out = _wn_apply(params, (), eps, count)
  if not count[0]:
    paths = [_select.path_str(p) for p, _ in _select.leaves(params)]
    raise ValueError(
      "weight_norm_apply: found no {x}_g/{x}_v pair and no WeightNormParam; pass the "
      f"tree from weight_norm_init. The leaves are {paths}."
    )
  return out


# --------------------------------------------------------------------------- #
# Spectral norm.
# --------------------------------------------------------------------------- #


def spectral_norm_init(
  params: Any,
  key: jax.Array,
  *,
  name: Selector = _KERNEL,
  axis: Axis = -1,
  n_init_iterations: int = _power.DEFAULT_N_INIT_ITERATIONS,
  eps: float = 1e-12,
  names: Selector | None = None,
) -> dict:
  """Creates the power-iteration state of the selected weights.

  Each selected weight (at least 2-D) gets random ``u``, ``v`` followed by
  ``n_init_iterations`` power iterations, so sigma is accurate from the first
  step (as ``flaxnorm.spectral_norm`` does at ``init``).

  Args:
    params: any pytree of arrays; it is not changed.
    key: a PRNG key; each selected leaf gets its own split of it.
    name: leaf names or a predicate ``(path, leaf) -> bool``.
    axis: the kept (output) axis or axes, rows of the matrix view
      ``moveaxis(w, axis, 0).reshape(m, n)``: ``-1`` for Flax kernels, ``0``
      for PyTorch-layout weights. Pass the same to :func:`spectral_norm_apply`.
    n_init_iterations: iterations to run now (>= 0).
    eps: see :func:`flaxnorm.power_iteration`.
    names: the former name of ``name``, still accepted.

  Returns:
    A nested dict following the selected leaves' paths (keys as strings), with
    ``{name}_u`` (shape ``(m,)``), ``{name}_v`` (shape ``(n,)``) and
    ``{name}_sigma`` (shape ``()``), float32 at least: Linen's ``spectral``
    collection layout.

  Raises:
    ValueError: a name matches nothing, a weight has fewer than 2 dims, or a
      selected leaf is one of a weight-norm pair or spectral state.
    TypeError: a selected leaf is not a float array, ``key`` is not one PRNG
      key, or ``name`` and ``names`` are both given.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flaxnorm.tree
    >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    >>> state = flaxnorm.tree.spectral_norm_init(params, jax.random.key(0))
    >>> jax.tree.map(jnp.shape, state)
    {'dense': {'kernel_sigma': (), 'kernel_u': (3,), 'kernel_v': (4,)}}
    >>> sn_params, state = flaxnorm.tree.spectral_norm_apply(params, state, update=True)

  References:
    Miyato, Kataoka, Koyama & Yoshida, "Spectral Normalization for Generative
    Adversarial Networks", ICLR 2018.
  """
  name, argname = _name_or_names(name, names, "spectral_norm_init")
  options = _options.SpectralNormOptions(
    axis=_axes.explicit(axis, "spectral_norm_init"),
    n_init_iterations=n_init_iterations,
    eps=eps,
    at="spectral_norm_init",
  )
  return _spectral_norm_init(
    params, key, _select.Selection(name, "spectral_norm_init", argname), options
  )


def _spectral_norm_init(
  params: Any, key: jax.Array, select: _select.Selection, options: _options.SpectralNormOptions
) -> dict:
  key = _checks.check_key(key, "key", options.at)
  _check_plain(params, options.at)
  _check_not_normalized(params, select, options.at)
  chosen = [(p, x) for p, x in _select.leaves(params) if select(p, x)]
  select.check_all_found(params)
  for p, x in chosen:
    _checks.check_spectral_weight(
      x, _axes.explicit(options.axis, options.at), f"tree path '{_select.path_str(p)}'"
    )
  state: dict = {}
  for (p, x), k in zip(chosen, jax.random.split(key, len(chosen))):
    node = state
    for part in p[:-1]:
      node = node.setdefault(str(part), {})
    s = _power.spectral_state_init(
      k,
      x,
      axis=_axes.explicit(options.axis, options.at),
      n_steps=options.n_init_iterations,
      eps=options.eps,
    )
    node.update(zip(_options.spectral_keys(str(p[-1])), s))
  return state


def spectral_norm_apply(
  params: Any,
  state: Mapping,
  *,
  update: bool,
  n_power_iterations: int = 1,
  axis: Axis = -1,
  eps: float = 1e-12,
  mode: str = "normalize",
  target: float = 1.0,
) -> tuple[Any, Any]:
  """Divides each weight that has spectral state by its spectral norm.

  Args:
    params: the plain params tree (the one :func:`spectral_norm_init` saw).
    state: the state from :func:`spectral_norm_init` (or a Linen ``spectral``
      collection).
    update: ``True`` (training): run ``n_power_iterations`` iterations from the
      stored vectors and return the new state. ``False`` (evaluation): no
      iteration, ``sigma = u^T W v`` from the stored vectors, and ``state`` is
      returned as is. A Python bool (it changes the computation).
    n_power_iterations: iterations per training call (>= 1).
    axis: the kept axis given to :func:`spectral_norm_init`.
    eps: see :func:`flaxnorm.spectral_normalize`.
    mode: ``"normalize"`` (``w * target / sigma``) or ``"clip"``
      (``w * min(1, target / sigma)``).
    target: the spectral norm to normalize (or clip) to; > 0.

  Returns:
    ``(normalized params, new state)``: params of the same structure with each
    such weight ``w`` replaced by ``w / sigma`` (same shape and dtype,
    differentiable in ``w`` through sigma too), and the state with the new
    ``u`` (``(m,)``), ``v`` (``(n,)``) and ``sigma`` (``()``), which carry no
    gradient.

  Raises:
    ValueError: the state names a weight the params lack, or does not fit it.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flaxnorm.tree
    >>> params = {"dense": {"kernel": jnp.diag(jnp.array([4.0, 1.0]))}}
    >>> state = flaxnorm.tree.spectral_norm_init(params, jax.random.key(0))
    >>> sn_params, state = flaxnorm.tree.spectral_norm_apply(params, state, update=True)
    >>> jnp.round(sn_params["dense"]["kernel"], 4)
    Array([[1.  , 0.  ],
           [0.  , 0.25]], dtype=float32)

  References:
    Miyato, Kataoka, Koyama & Yoshida, "Spectral Normalization for Generative
    Adversarial Networks", ICLR 2018.
  """
  options = _options.SpectralNormOptions(
    axis=_axes.explicit(axis, "spectral_norm_apply"),
    n_power_iterations=n_power_iterations,
    eps=eps,
    mode=mode,
    target=target,
    at="spectral_norm_apply",
  )
  return _spectral_norm_apply(params, state, update, options)


def _spectral_norm_apply(
  params: Any, state: Mapping, update: bool, options: _options.SpectralNormOptions
) -> tuple[Any, Any]:
  fn = options.at
  _checks.check_bool(update, "update", fn)
  _check_plain(params, fn)
  if not isinstance(state, Mapping):
    raise TypeError(
      f"{fn}: state must be the dict from spectral_norm_init, got {type(state).__name__}."
    )
  leaves = {tuple(str(k) for k in p): x for p, x in _select.leaves(params)}
  normalized: dict[Path, Any] = {}
  new_state: dict[Path, Any] = {}
  hint = "pass the state from spectral_norm_init (or a Linen 'spectral' collection)"
  for layer, name, (u, v, sigma) in _fold.some_spectral_entries(state, fn, "the state", hint):
    path = tuple(map(str, (*layer, name)))  # int keys too (nnx.Sequential state)
    w = leaves.get(path)
    if w is None:
      raise ValueError(
        f"{fn}: the state has '{_select.path_str(path)}_u' but params have no leaf "
        f"'{_select.path_str(path)}'. The leaves are {[_select.path_str(p) for p in leaves]}."
      )
    if not _select.is_array(w):
      hint = " Unbox it first: flax.core.meta.unbox(params)." if _select.is_box(w) else ""
      raise TypeError(
        f"{fn}: the leaf at tree path '{_select.path_str(path)}' is a {type(w).__name__}, "
        f"not an array.{hint}"
      )
    at = f"{fn}: param '{_select.path_str(path)}'"
    kept = _fold.check_spectral_state(w, (u, v, sigma), name, _axes.explicit(options.axis, at), at)
    n_steps = options.n_power_iterations if update else 0
    normalized[path], new_state[path] = _power.spectral_normalize(
      w,
      u,
      v,
      sigma=sigma,
      axis=kept,
      n_steps=n_steps,
      eps=options.eps,
      mode=options.mode,
      target=options.target,
    )
  out = jax.tree_util.tree_map_with_path(
    lambda p, x: normalized.get(tuple(str(_select.key(k)) for k in p), x),
    params,
    is_leaf=_select.is_box,
  )
  if not update:
    return out, state
  return out, _replace_state(state, (), new_state)


def _replace_state(state: Mapping, path: Path, new: dict[Path, Any]) -> Mapping:
  """``state`` with the new ``(u, v, sigma)`` of each path in ``new``; containers keep their type."""
  out = {}
  for k, x in state.items():
    if isinstance(x, Mapping):
      out[k] = _replace_state(x, (*path, str(k)), new)
      continue
    for i, suffix in enumerate(_options.SPECTRAL_SUFFIXES):
      if isinstance(k, str) and k.endswith(suffix) and (*path, k[: -len(suffix)]) in new:
        out[k] = new[(*path, k[: -len(suffix)])][i]
        break
    else:
      out[k] = x
  return _select.rebuild(state, out)


# --------------------------------------------------------------------------- #
# Bound forms: the options stated once, optax-style.
# --------------------------------------------------------------------------- #


class WeightNormTransform(NamedTuple):
  """Weight norm with its options bound, from :func:`weight_norm` (see its example).

  Attributes:
    init: ``params -> wn_params``, as :func:`weight_norm_init`.
    apply: ``wn_params -> params``, as :func:`weight_norm_apply`.

  Examples:
    >>> import flaxnorm.tree
    >>> init, apply = flaxnorm.tree.weight_norm(axis=0)  # a NamedTuple: unpacks
  """

  init: Callable[[Any], Any]
  apply: Callable[[Any], Any]


class SpectralNormTransform(NamedTuple):
  """Spectral norm with its options bound, from :func:`spectral_norm` (see its example).

  Attributes:
    init: ``(params, key) -> state``, as :func:`spectral_norm_init`.
    apply: ``(params, state, *, update) -> (params, state)``, as
      :func:`spectral_norm_apply`.

  Examples:
    >>> import flaxnorm.tree
    >>> init, apply = flaxnorm.tree.spectral_norm(mode="clip")  # a NamedTuple: unpacks
  """

  init: Callable[[Any, jax.Array], dict]
  apply: Callable[..., tuple[Any, Any]]


def weight_norm(
  *, name: Selector = "kernel", axis: Axis = -1, eps: float = 1e-12
) -> WeightNormTransform:
  """Weight norm on a params pytree, its options checked once (like an optax transform).

  Args:
    name: leaf names or a predicate ``(path, leaf) -> bool`` (see
      :func:`weight_norm_init`).
    axis: the kept axis or axes; ``-1`` for Flax kernels, ``0`` for
      PyTorch-layout weights, ``None`` for one whole-tensor norm.
    eps: lower bound on ``||v||``.

  Returns:
    A :class:`WeightNormTransform` whose ``init`` splits each selected leaf
    ``w`` into ``{name}_g`` (``w``'s rank, size 1 on the reduced axes) and
    ``{name}_v`` (``w``'s shape), and whose ``apply`` composes them back.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flaxnorm.tree
    >>> wn = flaxnorm.tree.weight_norm(name="kernel")
    >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    >>> wn_params = wn.init(params)
    >>> jax.tree.map(jnp.shape, wn_params)
    {'dense': {'bias': (3,), 'kernel_g': (1, 3), 'kernel_v': (4, 3)}}
    >>> jax.tree.map(jnp.shape, wn.apply(wn_params))
    {'dense': {'bias': (3,), 'kernel': (4, 3)}}

  References:
    Salimans & Kingma, "Weight Normalization: A Simple Reparameterization to
    Accelerate Training of Deep Neural Networks", NeurIPS 2016.
  """
  at = "flaxnorm.tree.weight_norm"
  options = _options.WeightNormOptions(axis=_axes.explicit(axis, at), eps=eps, at=at)
  _select.Selection(name, at)  # checks the names now

  def init(params: Any) -> Any:
    return _weight_norm_init(params, _select.Selection(name, at), options)

  def apply(wn_params: Any) -> Any:
    return weight_norm_apply(wn_params, eps=options.eps)

  return WeightNormTransform(init, apply)


def spectral_norm(
  *,
  name: Selector = "kernel",
  axis: Axis = -1,
  n_power_iterations: int = 1,
  n_init_iterations: int = _power.DEFAULT_N_INIT_ITERATIONS,
  eps: float = 1e-12,
  mode: str = "normalize",
  target: float = 1.0,
) -> SpectralNormTransform:
  """Spectral norm on a params pytree, its options checked once (like an optax transform).

  Args:
    name: leaf names or a predicate ``(path, leaf) -> bool``.
    axis: the kept (output) axis or axes, the rows of the matrix view.
    n_power_iterations: iterations per training apply (>= 1).
    n_init_iterations: iterations in ``init`` (>= 0).
    eps: norms at or below it count as zero.
    mode: ``"normalize"`` (``w * target / sigma``) or ``"clip"``
      (``w * min(1, target / sigma)``).
    target: the spectral norm to normalize (or clip) to; > 0.

  Returns:
    A :class:`SpectralNormTransform`: ``init(params, key)`` gives the state
    (``{name}_u`` ``(m,)``, ``{name}_v`` ``(n,)``, ``{name}_sigma`` ``()`` per
    selected leaf, Linen's ``spectral`` layout), and
    ``apply(params, state, update=...)`` the normalized params and the new state.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flaxnorm.tree
    >>> sn = flaxnorm.tree.spectral_norm(n_power_iterations=2)
    >>> params = {"dense": {"kernel": jnp.eye(3) * 2.0, "bias": jnp.zeros(3)}}
    >>> state = sn.init(params, jax.random.key(0))
    >>> sn_params, state = sn.apply(params, state, update=True)   # training
    >>> sn_params["dense"]["kernel"][0, 0]
    Array(1., dtype=float32)
    >>> sn_params, _ = sn.apply(params, state, update=False)      # evaluation

  References:
    Miyato, Kataoka, Koyama & Yoshida, "Spectral Normalization for Generative
    Adversarial Networks", ICLR 2018.
  """
  at = "flaxnorm.tree.spectral_norm"
  options = _options.SpectralNormOptions(
    axis=_axes.explicit(axis, at),
    n_power_iterations=n_power_iterations,
    n_init_iterations=n_init_iterations,
    eps=eps,
    mode=mode,
    target=target,
    at=at,
  )
  _select.Selection(name, at)  # checks the names now

  def init(params: Any, key: jax.Array) -> dict:
    return _spectral_norm_init(params, key, _select.Selection(name, at), options)

  def apply(params: Any, state: Mapping, *, update: bool) -> tuple[Any, Any]:
    return _spectral_norm_apply(params, state, update, options)

  return SpectralNormTransform(init, apply)
