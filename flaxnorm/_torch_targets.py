"""What the Flax model says about each layer a PyTorch checkpoint fills.

``load_torch_state_dict`` can take the Flax model instead of (or to produce)
its variables. The model then tells, per layer path, its kind (Dense, Conv,
ConvTranspose, Embed), its wrapping (weight norm, spectral norm, plain) and the
axes the wrapping keeps, so that ``kinds=``/``axes=`` are overrides only:

* Linen: ``jax.eval_shape(model.init, ...)`` under ``nn.intercept_methods``
  records every module that runs (its ``scope.path`` and class), shape-only.
* NNX: ``nnx.iter_modules`` walks the module object; its ``Param`` and
  ``SpectralStateVar`` leaves become a Linen-like ``{"params", collection}``
  tree, and the loaded tree goes back into an ``nnx.State``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
from flax import nnx
from flax.core import meta

from flaxnorm import _axes, _checks, _subclass
from flaxnorm._checks import Call
from flaxnorm._nnx_plan import SpectralStateVar

Path = tuple[str, ...]


class FlaxLayer(NamedTuple):
  """One Flax module as the model declares it.

  Attributes:
    path: its path in the params tree (NNX integer keys as strings).
    family: ``"linear"``, ``"conv"``, ``"conv_transpose"`` or ``"embedding"``;
      ``None`` for a class interop does not map.
    cls: the plain layer class's name, for messages.
    wrapped: param name -> ``(method, kept axes)`` for each param a flaxnorm
      transform normalizes (kept axes non-negative; ``()`` is a whole-tensor
      weight norm).
    unsupported: why this layer cannot take a PyTorch weight (``""`` if it can).
    in_axes: a ``DenseGeneral``/``LinearGeneral``: how many leading kernel
      axes are its inputs (its kernel is PyTorch's Linear through the
      ``(in, out)`` view); ``None`` for other layers.
    stacked: how many leading axes its params have beyond the layer's own (a
      layer stacked by ``nn.scan``/``nn.vmap``/``nnx.vmap``: 1); the kept
      axes in ``wrapped`` count them.
  """

  path: Path
  family: str | None
  cls: str
  wrapped: dict[str, tuple[str, tuple[int, ...]]]
  unsupported: str = ""
  stacked: int = 0
  in_axes: int | None = None


def wrapped_axes(
  module: Any, name: str, ndim: int, spec: Any = None, rel: Path = ()
) -> tuple[int, ...]:
  """The kept axes of param ``name`` (of rank ``ndim``) that ``module``'s wrapping uses.

  The one place interop resolves a transform's ``axis`` option (``"auto"``,
  a callable or an axis mapping, as the wrapped layer itself does).

  Args:
    module: the Linen or NNX module.
    name: the param, e.g. ``"kernel"``.
    ndim: the param's rank.
    spec: the spec to read (a recursive Linen wrapping's, from an ancestor);
      ``None`` for ``module``'s own spec of ``name``.
    rel: ``module``'s path below the wrapping ancestor (an axis mapping's key).

  Returns:
    The kept axes, non-negative and sorted (``()`` for ``axis=None``).
  """
  spec = _subclass.specs_of(type(module))[name] if spec is None else spec
  at = f"'{name}' of {type(module).__name__}"
  axis = spec.options.axis
  if isinstance(axis, _axes.AxisMap):
    axis = axis.lookup(tuple(str(p) for p in rel))[1] if rel else _axes.AUTO
  return _checks.normalize_axes(_axes.resolve(axis, module, name, at), ndim, at)


def _selected(key: Any, params: Any, path: Path, rel: Path) -> list[str]:
  """The params at ``path`` that a selector ``key`` (a regex or predicate) picks."""
  node = params
  for p in path:
    node = node.get(p, {}) if isinstance(node, Mapping) else {}
  if not isinstance(node, Mapping):
    return []
  cands = {}  # param name as the layer asked for it (weight norm's g/v folded) -> array
  for k, x in node.items():
    if k.endswith("_g") and f"{k[:-2]}_v" in node:
      continue
    cands[k[:-2] if k.endswith("_v") and f"{k[:-2]}_g" in node else k] = meta.unbox(x)

  def shape(x: Any) -> Any:
    return jax.ShapeDtypeStruct(x.shape, x.dtype)

  return [
    k
    for k, x in cands.items()
    if hasattr(x, "shape") and key.matches((*map(str, rel), k), lambda x=x: shape(x))
  ]


def _family(module: Any) -> tuple[str | None, str]:
  """The layer family of a module's plain class, and why it cannot load if so."""
  base = _subclass.base_of(type(module))
  linen = {
    nn.ConvTranspose: "conv_transpose",
    nn.Conv: "conv",
    nn.Dense: "linear",
    nn.Embed: "embedding",
  }
  faces = {
    nnx.ConvTranspose: "conv_transpose",
    nnx.Conv: "conv",
    nnx.Linear: "linear",
    nnx.Embed: "embedding",
  }
  norms = (
    nn.LayerNorm, nn.GroupNorm, nn.BatchNorm, nn.RMSNorm, nn.InstanceNorm,
    nnx.LayerNorm, nnx.GroupNorm, nnx.BatchNorm, nnx.RMSNorm, nnx.InstanceNorm,
  )  # fmt: skip
  family = next((f for cls, f in {**linen, **faces}.items() if issubclass(base, cls)), None)
  family = "norm" if issubclass(base, norms) else family
  if _general_in_axes(module) is not None:
    family = "linear"
  why = ""
  if family == "conv_transpose" and getattr(module, "transpose_kernel", False):
    why = (
      "transpose_kernel=True is not mapped: build the ConvTranspose with "
      "transpose_kernel=False (the default) and padding=interop.conv_transpose_padding(...)"
    )
  if issubclass(base, (nn.SimpleCell, nnx.SimpleCell)) and getattr(module, "residual", False):
    why = (
      "residual=True adds the carry to each step, which PyTorch's nn.RNN does not: build "
      "the SimpleCell with residual=False (the default)"
    )
  return family, why


def _ndims(params: Any, path: Path) -> dict[str, int]:
  """Param name -> rank, for the leaves of the params tree at ``path``."""
  node = params
  for p in path:
    node = node.get(p, {}) if isinstance(node, Mapping) else {}
  if not isinstance(node, Mapping):
    return {}
  return {k: len(x.shape) for k, x in node.items() if hasattr(meta.unbox(x), "shape")}


def _param_ndim(ndims: dict[str, int], name: str) -> int | None:
  """The rank of ``name``, or of its weight-norm direction ``{name}_v``."""
  return ndims.get(name, ndims.get(f"{name}_v"))


def describe(
  modules: Sequence[tuple[Path, Any]], params: Mapping[str, Any]
) -> dict[Path, FlaxLayer]:
  """Path -> :class:`FlaxLayer` for each module; recursive Linen wrappings reach descendants."""
  out: dict[Path, FlaxLayer] = {}
  inherited: dict[Path, dict[Any, tuple[Path, Any]]] = {}  # path -> key -> (owner path, spec)
  for path, module in sorted(modules, key=lambda pm: len(pm[0])):
    specs = {n: (path, s) for n, s in _subclass.specs_of(type(module)).items()}
    for anc in (path[:i] for i in range(len(path) - 1, -1, -1)):
      for n, (owner, s) in inherited.get(anc, {}).items():
        if s.recursive:
          specs.setdefault(n, (owner, s))
    inherited[path] = specs
    ndims = _ndims(params, path)
    family, why = _family(module)
    own = _own_rank(module)
    ndim = _param_ndim(
      ndims, {"embedding": "embedding", "norm": "scale"}.get(family or "", "kernel")
    )
    stacked = ndim - own if own is not None and ndim is not None and ndim > own else 0
    wrapped = {}
    for key, (owner, s) in specs.items():
      rel = path[len(owner) :]
      names = [key] if isinstance(key, str) else _selected(key, params, path, rel)
      for n in names:
        ndim = _param_ndim(ndims, n)
        if ndim is not None:  # the wrapper sees one member (stack axes lead): its axes, shifted
          kept = wrapped_axes(module, n, ndim - stacked, s, rel)
          wrapped[n] = (s.method, tuple(a + stacked for a in kept))
    cls = _subclass.base_of(type(module)).__name__
    out[path] = FlaxLayer(path, family, cls, wrapped, why, stacked, _general_in_axes(module))
  return out


def _general_in_axes(module: Any) -> int | None:
  """A ``DenseGeneral``/``LinearGeneral`` without batch axes: its number of input axes."""
  base = _subclass.base_of(type(module))
  if issubclass(base, nn.DenseGeneral) and not module.batch_dims:
    return 1 if isinstance(module.axis, int) else len(module.axis)
  if issubclass(base, nnx.LinearGeneral) and not module.batch_axis:
    return len(module.in_features)
  return None


def _own_rank(module: Any) -> int | None:
  """The rank of the layer's own kernel (or embedding), from its attributes; ``None`` if unknown."""
  base = _subclass.base_of(type(module))
  if issubclass(base, (nn.Dense, nn.Embed, nnx.Linear, nnx.Embed)):
    return 2
  if issubclass(base, (nn.Conv, nn.ConvTranspose, nnx.Conv, nnx.ConvTranspose)):
    size = module.kernel_size
    return (1 if isinstance(size, int) else len(size)) + 2
  if issubclass(base, nn.DenseGeneral):
    axis, features = module.axis, module.features
    n_axis = 1 if isinstance(axis, int) else len(axis)
    return n_axis + (1 if isinstance(features, int) else len(features))
  if issubclass(base, nnx.LinearGeneral):
    return len(module.in_features) + len(module.out_features)
  if issubclass(base, (nn.LayerNorm, nn.RMSNorm)):  # scale over the feature axes
    axes = module.feature_axes
    return 1 if isinstance(axes, int) else len(axes)
  if _family(module)[0] == "norm":
    return 1
  return None


# --------------------------------------------------------------------------- #
# Linen.
# --------------------------------------------------------------------------- #


def linen_call(inputs: Any, kwargs: Any, where: str) -> Call | None:
  """A Linen model's example call: ``inputs`` (one argument or a tuple) and ``kwargs``
  (checked), or None when neither is given."""
  checked = _checks.check_kwargs(kwargs, where)
  if inputs is None and kwargs is None:
    return None
  args = () if inputs is None else inputs if isinstance(inputs, tuple) else (inputs,)
  return Call(args, checked)


def from_linen(
  model: nn.Module, call: Call | None, where: str = "load_torch_state_dict"
) -> tuple[dict[str, Any], dict[Path, FlaxLayer]]:
  """Traces ``model.init`` shape-only; returns its variable shapes and its layers.

  Args:
    model: an unbound Linen module.
    call: the example call of ``model.__call__``: arrays (or
      ``jax.ShapeDtypeStruct``) are traced, Python scalars (a train flag) passed
      as they are.
    where: the public function, for the message.

  Returns:
    ``(variables, layers)``: ``jax.ShapeDtypeStruct`` leaves, and path -> layer.
  """
  if call is None:
    raise ValueError(
      f"{where}: a Linen model needs its example inputs: pass "
      "inputs=x (or a tuple of the arguments of its __call__; kwargs= its keyword arguments)."
    )
  seen: dict[Path, Any] = {}

  def record(next_fun: Callable[..., Any], a: Any, kw: Any, context: Any) -> Any:
    m = context.module
    if m.scope is not None:
      seen.setdefault(tuple(m.scope.path), m)
    return next_fun(*a, **kw)

  # Python scalars (a train flag) stay static; arrays and array trees are traced.
  values = [*call.args, *call.kwargs.values()]
  static = [isinstance(a, (bool, int, float, complex, str, type(None))) for a in values]

  def init(*traced: Any) -> Any:
    it = iter(traced)
    given = [a if s else next(it) for a, s in zip(values, static, strict=True)]
    n = len(call.args)
    return model.init(jax.random.key(0), *given[:n], **dict(zip(call.kwargs, given[n:])))

  with nn.intercept_methods(record):
    shapes = jax.eval_shape(init, *(a for a, s in zip(values, static, strict=True) if not s))
  variables = dict(shapes)
  return variables, describe(list(seen.items()), variables.get("params", {}))


# --------------------------------------------------------------------------- #
# NNX.
# --------------------------------------------------------------------------- #


class NnxTree(NamedTuple):
  """An NNX model's loadable leaves as a Linen-like tree, and the way back."""

  variables: dict[str, Any]  # {"params": ..., collection: ...}, string keys
  state: Any  # the model's full nnx.State
  back: dict[tuple[str, ...], tuple[Any, ...]]  # (collection, *str path) -> state path


def from_nnx(model: nnx.Module, collection: str) -> tuple[NnxTree, dict[Path, FlaxLayer]]:
  """The params and spectral state of an NNX model as ``{"params", collection}``, and its layers."""
  state = nnx.state(model)
  variables, back = state_variables(state, collection)
  seen: set[int] = set()
  modules = []
  for path, module in nnx.iter_modules(model):
    if id(module) not in seen:
      seen.add(id(module))
      modules.append((tuple(str(p) for p in path), module))
  return NnxTree(variables, state, back), describe(modules, variables["params"])


def state_variables(
  state: Any, collection: str
) -> tuple[dict[str, Any], dict[tuple[str, ...], tuple[Any, ...]]]:
  """An ``nnx.State``'s params and spectral state as ``{"params", collection}``, and each leaf's path back."""
  variables: dict[str, Any] = {"params": {}, collection: {}, "batch_stats": {}}
  back: dict[tuple[str, ...], tuple[Any, ...]] = {}
  for path, var in nnx.to_flat_state(state):
    if isinstance(var, nnx.Param):
      col = "params"
    elif isinstance(var, SpectralStateVar):
      col = collection
    elif isinstance(var, nnx.BatchStat):  # a BatchNorm's running_mean / running_var
      col = "batch_stats"
    else:  # rng state, ...: no PyTorch tensor fills them
      continue
    spath = tuple(str(p) for p in path)
    node = variables[col]
    for p in spath[:-1]:
      node = node.setdefault(p, {})
    node[spath[-1]] = var.get_value()
    back[(col, *spath)] = tuple(path)
  for col in (collection, "batch_stats"):
    if not variables[col]:
      del variables[col]
  return variables, back


def to_nnx_state(tree: NnxTree, variables: Mapping[str, Any]) -> Any:
  """The model's ``nnx.State`` with the loaded values of ``variables`` in it."""
  flat = dict(nnx.to_flat_state(tree.state))
  for key, path in tree.back.items():
    node: Any = variables
    for p in key:
      node = node[p]
    flat[path] = flat[path].replace(node)
  return nnx.from_flat_state(flat)
