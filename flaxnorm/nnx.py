"""Weight norm and spectral norm for Flax NNX modules.

Unlike Flax's own ``nnx.WeightNorm`` and ``nnx.SpectralNorm``, nothing here
writes a normalized weight back into the layer (google/flax#5576), and every
learnable quantity is an ``nnx.Param``, so ``nnx.grad`` and ``nnx.Optimizer``
reach it (google/flax#5577).

How it works: the transforms act **in place** and return the same module. They
switch the module's class to a cached subclass of its own class in which the
normalized param (``kernel`` by default) is a computed attribute: reading
``layer.kernel`` builds ``g * v / ||v||`` (weight norm) or ``W / sigma``
(spectral norm) from the stored variables at that moment. The layer's own code
(``self.kernel[...]`` in ``nnx.Linear.__call__``) therefore runs unchanged and
sees the normalized weight, ``isinstance(layer, nnx.Linear)`` still holds, and
every reference to the layer inside a bigger model sees the change. Wrap before
creating the ``nnx.Optimizer`` (its state is built from the params it sees).
The subclass is cached per (class, options), so ``nnx.split``/``nnx.merge``,
``nnx.jit``, ``copy.deepcopy`` and ``pickle`` work as for the plain layer.

NNX's own linear layers (``nnx.Linear``, ``nnx.LinearGeneral`` without
``batch_axis``, ``nnx.Conv``, ``nnx.ConvTranspose``, with their default dot
product and ``promote_dtype``) take a faster path with the same numbers: during
``__call__`` they read the bare ``v`` (or ``W``) and a zero bias, and their
output is scaled by ``g / ||v||`` (or ``1 / sigma``) and gets the bias after
(``flaxnorm._output_scale``). In a training call, spectral norm uses the sigma
of the iterations it has just run, as Linen does.

Variable layout for ``nnx.Linear(4, 3)``, as
``jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(layer)))``::

  weight_norm:   {'bias': (3,), 'kernel_g': (1, 3), 'kernel_v': (4, 3)}
  spectral_norm: {'bias': (3,), 'kernel': (4, 3),
                  'kernel_sigma': (), 'kernel_u': (3,), 'kernel_v': (4,)}

Names mirror the Linen transforms: ``kernel_g``/``kernel_v`` are ``nnx.Param``
(Linen's ``params``); ``kernel_u``/``kernel_v``/``kernel_sigma`` are
:class:`SpectralStateVar` (Linen's ``spectral`` collection), which
``wrt=nnx.Param`` excludes, so optimizers never touch them.

Training and evaluation follow NNX's convention: a spectrally normalized layer
has a ``use_running_average`` attribute (``False`` when wrapped), which
``model.eval()`` sets to ``True`` and ``model.train()`` back to ``False``, as
for ``nnx.BatchNorm`` (``nnx.view(model, use_running_average=True)`` works
too). In training, each ``__call__`` first runs ``n_power_iterations`` power
iterations and stores the new ``u``, ``v``, ``sigma``; in evaluation nothing is
stored and ``sigma = u^T W v`` from the stored vectors, exactly as Linen's
``apply`` with and without ``mutable=['spectral']``.

Limits: the layer must use the param as an array (``self.kernel[...]``, as
every Flax layer does); ``self.kernel.value`` fails, since the computed value
is an array, not a Variable. Only ``__call__`` iterates the spectral state.
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import types
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
from flax import nnx

from flaxnorm import _checks, _math, _output_scale
from flaxnorm._checks import Axis

__all__ = (
  "SpectralStateVar",
  "remove_spectral_norm",
  "remove_weight_norm",
  "spectral_norm",
  "weight_norm",
  "wrap_modules",
)

M = TypeVar("M", bound=nnx.Module)
PathParts = tuple[Any, ...]
Rngs = nnx.Rngs | jax.Array | int | None

#: The attribute ``model.train()``/``model.eval()`` set to ``False``/``True``.
_FLAG = "use_running_average"


@dataclasses.dataclass
class _Call:
  """What one ``__call__`` hands to the computed params it reads."""

  deferred: _output_scale.OutputScale | None  # the output takes the kernel's scale and the bias
  scales: dict[str, jax.Array]  # spectral scales of the iterations just run


# The modules inside their __call__, by id. A context variable rather than an
# instance attribute: NNX's graph functions (split, state, lifted transforms)
# see every instance attribute, and may run on the module during its call.
_CALLS: contextvars.ContextVar[dict[int, _Call]] = contextvars.ContextVar("flaxnorm_nnx_calls")


def _active_call(module: Any) -> _Call | None:
  return _CALLS.get({}).get(id(module))


# Flax's own (broken) wrappers, named in the error when someone wraps them.
_FLAX_WRAPPERS = tuple(
  t for t in (getattr(nnx, "WeightNorm", None), getattr(nnx, "SpectralNorm", None)) if t
)


class SpectralStateVar(nnx.Variable):
  """Power-iteration state of a spectrally normalized param.

  Holds ``{name}_u`` (shape ``(m,)``), ``{name}_v`` (shape ``(n,)``) and
  ``{name}_sigma`` (shape ``()``), float32 at least. It is not an
  ``nnx.Param``: ``nnx.grad`` and ``nnx.Optimizer(..., wrt=nnx.Param)`` skip
  it, and ``nnx.state(model, SpectralStateVar)`` selects it.
  """


# --------------------------------------------------------------------------- #
# What each transform computes when the layer reads its param.
# --------------------------------------------------------------------------- #


def _where(path: PathParts | None, module: Any, name: str) -> str:
  owner = type(module).__name__
  if path is None:
    return f"param '{name}' of {owner}"
  return f"param '{name}' of layer '{_path_str(path)}' ({owner})"


def _path_str(path: PathParts) -> str:
  return "/".join(str(p) for p in path) or "<top level>"


def _get(module: nnx.Module, attr: str, spec: Any, name: str) -> Any:
  var = vars(module).get(attr)
  if not isinstance(var, nnx.Variable):
    raise ValueError(
      f"{spec.method}: {_where(None, module, name)} needs the variable '{attr}', "
      f"found {type(var).__name__}. Was it removed (e.g. by nnx.pop) or replaced?"
    )
  return var


@dataclasses.dataclass(frozen=True)
class _WeightNorm:
  axis: Axis
  eps: float
  method: str = "weight_norm"

  def attrs(self, name: str) -> tuple[str, ...]:
    return (f"{name}_g", f"{name}_v")

  def factors(self, module: nnx.Module, name: str) -> tuple[jax.Array, jax.Array]:
    """``(v, g / ||v||)``: the kernel is their product."""
    g = _get(module, f"{name}_g", self, name)
    v = _get(module, f"{name}_v", self, name)
    return v[...], _math.weight_norm_scale(g[...], v[...], self.eps)


@dataclasses.dataclass(frozen=True)
class _SpectralNorm:
  axis: Axis
  n_power_iterations: int
  eps: float
  added_flag: bool  # this transform gave the module its train/eval attribute
  mode: str = "normalize"
  method: str = "spectral_norm"

  def attrs(self, name: str) -> tuple[str, ...]:
    return (f"{name}_u", f"{name}_v", f"{name}_sigma")

  def _state(self, module: nnx.Module, name: str):
    w = _get(module, name, self, name)
    u, v, sigma = (_get(module, a, self, name) for a in self.attrs(name))
    return w, u, v, sigma

  def factors(self, module: nnx.Module, name: str) -> tuple[jax.Array, jax.Array]:
    """``(W, 1 / sigma)``: the kernel is their product."""
    call = _active_call(module)
    if call is not None and name in call.scales:
      # In a training __call__: sigma from the iterations just run, as in Linen.
      return _get(module, name, self, name)[...], call.scales[name]
    # Otherwise sigma = u^T W v from the stored vectors.
    w, u, v, _ = self._state(module, name)
    scale, _ = _math.spectral_scale(
      w[...], u[...], v[...], axis=self.axis, n_steps=0, eps=self.eps, mode=self.mode
    )
    return w[...], scale

  def update(self, module: nnx.Module, name: str) -> jax.Array:
    """Iterates, stores the new state, and returns this call's (differentiable) scale."""
    w, u, v, sigma = self._state(module, name)
    scale, new = _math.spectral_scale(
      w[...],
      u[...],
      v[...],
      sigma=sigma[...],
      axis=self.axis,
      n_steps=self.n_power_iterations,
      eps=self.eps,
      mode=self.mode,
    )
    u[...], v[...], sigma[...] = new.u, new.v, new.sigma
    return scale


class _Normalized:
  """Data descriptor standing in for the normalized param on the subclass.

  It is a *data* descriptor (it has ``__set__``) so that it wins over the raw
  ``kernel`` Param that spectral norm keeps in the instance ``__dict__``; NNX's
  own flatten/unflatten use ``vars()`` and ``object.__setattr__``, which reach
  that raw Param through ``__set__``.
  """

  def __init__(self, name: str, spec: Any):
    self.name, self.spec = name, spec

  def __get__(self, obj, objtype=None):
    if obj is None:
      return self
    base, scale = self.spec.factors(obj, self.name)
    call = _active_call(obj)
    deferred = None if call is None else call.deferred
    if deferred is not None and deferred.take_scale(base, scale):
      return base  # __call__ scales the output instead
    return _math.apply_scale(base, scale)

  def __set__(self, obj, value):
    if isinstance(self.spec, _SpectralNorm):
      vars(obj)[self.name] = value  # the unnormalized weight (PyTorch's weight_orig)
      return
    g, v = self.spec.attrs(self.name)
    raise AttributeError(
      f"weight_norm: '{self.name}' of {type(obj).__name__} is computed from '{g}' and "
      f"'{v}'; assign to those, or call flaxnorm.nnx.remove_weight_norm first."
    )

  def __delete__(self, obj):
    if isinstance(self.spec, _SpectralNorm) and self.name in vars(obj):
      del vars(obj)[self.name]
      return
    raise AttributeError(
      f"{self.spec.method}: cannot delete '{self.name}' of {type(obj).__name__}; "
      f"call flaxnorm.nnx.remove_{self.spec.method} instead."
    )


class _Bias:
  """Data descriptor for ``bias`` on NNX's linear layers: zeros while the output is scaled.

  Outside such a call it is the plain attribute (kept in the instance
  ``__dict__``, which NNX's graph functions read).
  """

  def __get__(self, obj, objtype=None):
    if obj is None:
      return self
    try:
      value = vars(obj)["bias"]
    except KeyError:
      raise AttributeError(f"{type(obj).__name__} has no attribute 'bias'") from None
    call = _active_call(obj)
    if call is None or call.deferred is None or value is None:
      return value
    return call.deferred.take_bias(value[...])  # the layer adds zeros; __call__ adds the bias

  def __set__(self, obj, value):
    vars(obj)["bias"] = value

  def __delete__(self, obj):
    del vars(obj)["bias"]


def _linear_layers() -> dict[type, Callable[[Any], bool]]:
  """NNX's linear layers, each with a check that an instance runs Flax's own ops.

  Their output is linear in the kernel, with the bias added last along the
  trailing output axes and the kernel's last axis the output features (see
  ``flaxnorm._output_scale``). A custom dot product (e.g. quantized) may not be
  linear, so it keeps the normalized kernel.
  """
  lax = jax.lax
  promote = nnx.nn.dtypes.promote_dtype

  def default_promote(m):
    return getattr(m, "promote_dtype", promote) is promote

  return {
    nnx.Linear: lambda m: m.dot_general is lax.dot_general and default_promote(m),
    nnx.LinearGeneral: lambda m: (
      m.dot_general is None
      and m.dot_general_cls is None
      and not m.batch_axis
      and default_promote(m)
    ),
    nnx.Conv: lambda m: m.conv_general_dilated is lax.conv_general_dilated and default_promote(m),
    nnx.ConvTranspose: default_promote,
  }


_LINEAR_LAYERS = _linear_layers()


# --------------------------------------------------------------------------- #
# The normalized subclasses.
# --------------------------------------------------------------------------- #

_CLASS_CACHE: dict[tuple, type] = {}


def _specs_of(module: Any) -> dict[str, Any]:
  return dict(getattr(type(module), "_flaxnorm_specs", {}))


def _base_of(module: Any) -> type:
  return type(module).__dict__.get("_flaxnorm_base", type(module))


def _set_view_fn(base: type) -> Callable | None:
  """``set_view`` for ``nnx.view``: the flag, plus whatever the base accepts."""
  base_view = getattr(base, "set_view", None)
  param = inspect.Parameter
  params = [param("self", param.POSITIONAL_OR_KEYWORD)]
  if base_view is not None:
    params = list(inspect.signature(base_view).parameters.values())
    if _FLAG in {p.name for p in params}:
      return None  # the base already handles the flag
  # nnx.view matches kwargs against this signature to know which it consumed.
  flag = param(_FLAG, param.KEYWORD_ONLY, default=None, annotation=bool | None)
  rest = [p for p in params if p.kind is not param.VAR_KEYWORD]
  params = rest + [flag] + [p for p in params if p.kind is param.VAR_KEYWORD]

  def set_view(self, *args, use_running_average: bool | None = None, **kwargs):
    if use_running_average is not None:
      setattr(self, _FLAG, use_running_average)
    if base_view is not None:
      return base_view(self, *args, **kwargs)
    return None

  set_view.__signature__ = inspect.Signature(params)
  set_view.__doc__ = (
    f"Used by ``nnx.view``: ``{_FLAG}=True`` freezes the spectral norm state (eval)."
  )
  return set_view


def _defines_call(base: type) -> bool:
  # `base.__call__` of a class without one is the metaclass's (construction).
  return any("__call__" in vars(k) for k in base.__mro__ if k is not object)


def _class_for(base: type[M], specs: dict[str, Any]) -> type[M]:
  """The cached subclass of ``base`` computing the params in ``specs``."""
  if not specs:
    return base
  items = tuple(sorted(specs.items()))
  key = (base, items)
  if key in _CLASS_CACHE:
    return _CLASS_CACHE[key]
  spectral = [(n, s) for n, s in items if isinstance(s, _SpectralNorm)]
  ns: dict[str, Any] = {name: _Normalized(name, spec) for name, spec in items}

  scales_output = _LINEAR_LAYERS.get(base) if set(specs) == {"kernel"} else None
  if scales_output is not None:
    ns["bias"] = _Bias()
  if (spectral or scales_output is not None) and _defines_call(base):
    base_call = base.__call__

    def call(self, *args, **kwargs):
      state = _Call(None, {})
      if spectral and not getattr(self, _FLAG, False):  # training: iterate and store
        state.scales = {name: spec.update(self, name) for name, spec in spectral}
      if scales_output is not None and scales_output(self):
        # The layer reads the bare kernel and a zero bias; the scale and bias
        # go on its output (unless float16 compute: see _output_scale).
        state.deferred = _output_scale.for_call(self, args, kwargs)
      token = _CALLS.set({**_CALLS.get({}), id(self): state})
      try:
        y = base_call(self, *args, **kwargs)
      finally:
        _CALLS.reset(token)
      return y if state.deferred is None else state.deferred.finish(y)

    call.__doc__ = base_call.__doc__
    call.__name__ = "__call__"
    ns["__call__"] = call
  if spectral and any(s.added_flag for _, s in spectral):
    set_view = _set_view_fn(base)
    if set_view is not None:
      ns["set_view"] = set_view

  base_set_key, base_pop_key = base._graph_node_set_key, base._graph_node_pop_key

  def _graph_node_set_key(self, key, value):
    # Update the raw Variable in place (as NNX does) rather than going through
    # the computed attribute.
    current = vars(self).get(key)
    if key in specs and isinstance(current, nnx.Variable) and isinstance(value, nnx.Variable):
      current.update_from_state(value)
      return None
    return base_set_key(self, key, value)

  def _graph_node_pop_key(self, key):
    if key in specs and key in vars(self):
      value = vars(self)[key]
      delattr(self, key)
      return value
    return base_pop_key(self, key)

  def reduce_ex(self, protocol):
    # pickle finds classes by name, which gives the base class: rebuild the
    # subclass from (base, specs) instead.
    return (_new_normalized, (base, items), *object.__reduce_ex__(self, protocol)[2:])

  ns["__reduce_ex__"] = reduce_ex
  ns["_graph_node_set_key"] = _graph_node_set_key
  ns["_graph_node_pop_key"] = _graph_node_pop_key
  ns["_flaxnorm_base"] = base
  ns["_flaxnorm_specs"] = types.MappingProxyType(dict(items))
  # Keep the names: reprs, error messages and user code see the layer's class.
  ns["__module__"] = base.__module__
  ns["__qualname__"] = base.__qualname__
  wrapped = ", ".join(f"{s.method}({n!r})" for n, s in items)
  ns["__doc__"] = f"{base.__name__} with {wrapped}.\n\n{base.__doc__ or ''}"

  kwds = {}
  if getattr(base, "_pytree__is_pytree", None) is not None:
    kwds["pytree"] = base._pytree__is_pytree  # keep the base's pytree mode
  cls = types.new_class(base.__name__, (base,), kwds, lambda body: body.update(ns))
  _CLASS_CACHE[key] = cls
  return cls


def _new_normalized(base: type, items: tuple) -> Any:
  """Unpickles a normalized module: an empty instance of the cached subclass."""
  return object.__new__(_class_for(base, dict(items)))


def _swap_class(module: nnx.Module, specs: dict[str, Any]) -> None:
  # object.__setattr__: NNX's __setattr__ would record '__class__' as a field.
  object.__setattr__(module, "__class__", _class_for(_base_of(module), specs))


# --------------------------------------------------------------------------- #
# Planning (all checks, all math) then committing (mutation): a failing layer
# leaves every module untouched, also in wrap_modules.
# --------------------------------------------------------------------------- #


def _check_module(module: Any, method: str) -> None:
  if isinstance(module, nnx.Module):
    return
  hint = ""
  if type(module).__module__.startswith("flax.linen"):
    hint = f" For Linen modules use flaxnorm.{method}."
  elif isinstance(module, dict):
    hint = f" For a params tree use flaxnorm.tree (or flaxnorm.{method} for Linen variables)."
  raise TypeError(
    f"{method}: module must be a flax.nnx.Module instance, got {type(module).__name__}.{hint}"
  )


def _param_names(module: nnx.Module) -> list[str]:
  return sorted(k for k, x in vars(module).items() if isinstance(x, nnx.Param))


def _check_param(module: nnx.Module, name: str, method: str, path: PathParts | None) -> nnx.Param:
  where = _where(path, module, name)
  specs = _specs_of(module)
  if name in specs:
    raise ValueError(
      f"{method}: {where} is already wrapped by {specs[name].method}; a param can be "
      "normalized only once."
    )
  var = vars(module).get(name)
  if var is None:
    hint = " (e.g. name='embedding' for nnx.Embed)" if isinstance(module, nnx.Embed) else ""
    if isinstance(module, _FLAX_WRAPPERS):
      hint = " (this is Flax's own wrapper: apply flaxnorm to the plain layer instead)"
    raise ValueError(
      f"{method}: {where} does not exist. Its params are {_param_names(module)}; pass "
      f"one of them as name=...{hint}."
    )
  if not isinstance(var, nnx.Param):
    raise TypeError(
      f"{method}: {where} must be an nnx.Param, got {type(var).__name__}; only "
      "trainable params can be normalized."
    )
  return var


def _check_free(module: nnx.Module, attrs: Sequence[str], method: str, path, name: str) -> None:
  taken = [a for a in attrs if a in vars(module) or hasattr(type(module), a)]
  if taken:
    raise ValueError(
      f"{method}: cannot wrap {_where(path, module, name)}: {taken} already exist on the "
      "layer (already wrapped?)."
    )


def _plan_weight_norm(
  module: nnx.Module, path: PathParts | None, names: tuple[str, ...], spec: _WeightNorm
) -> Callable[[], None]:
  _check_module(module, "weight_norm")
  new: dict[str, tuple[nnx.Param, nnx.Param]] = {}
  for name in names:
    where = _where(path, module, name)
    var = _check_param(module, name, "weight_norm", path)
    _check_free(module, spec.attrs(name), "weight_norm", path, name)
    w = var[...]
    _checks.check_float_array(w, "the param", where)
    kept = _checks.normalize_axes(spec.axis, w.ndim, where)
    g, _ = _math.weight_norm_decompose(w, spec.axis)
    meta = {}
    sharding = var.get_metadata("out_sharding", None)
    if sharding is not None and spec.axis is not None:
      meta["out_sharding"] = tuple(s if i in kept else None for i, s in enumerate(sharding))
    elif sharding is not None:
      meta["out_sharding"] = ()
    # v is the original Param object: same metadata, same identity.
    new[name] = (var.copy(g, **meta), var)

  def commit() -> None:
    specs = _specs_of(module)
    for name in names:
      delattr(module, name)  # before the swap: the subclass computes `name`
      specs[name] = spec
    _swap_class(module, specs)
    for name, (g, v) in new.items():
      g_attr, v_attr = spec.attrs(name)
      setattr(module, g_attr, g)
      setattr(module, v_attr, v)

  return commit


def _make_key_source(rngs: Rngs, method: str) -> Callable[[int], jax.Array]:
  if isinstance(rngs, nnx.Rngs):
    # Linen draws from a 'spectral' stream when given one, else from 'params'.
    return lambda _: rngs["spectral"]() if "spectral" in rngs else rngs.params()
  if rngs is None:
    rngs = 0
  if isinstance(rngs, int) and not isinstance(rngs, bool):
    key = jax.random.key(rngs)
  elif isinstance(rngs, jax.Array):
    key = rngs
  else:
    raise TypeError(
      f"{method}: rngs must be an nnx.Rngs, a PRNG key, an int seed or None, got "
      f"{type(rngs).__name__}."
    )
  return lambda i: jax.random.fold_in(key, i) if i else key


def _plan_spectral_norm(
  module: nnx.Module,
  path: PathParts | None,
  names: tuple[str, ...],
  spec: _SpectralNorm,
  n_init_iterations: int,
  next_key: Callable[[int], jax.Array],
) -> Callable[[], None]:
  _check_module(module, "spectral_norm")
  has_flag = hasattr(module, _FLAG)
  others = [s for s in _specs_of(module).values() if isinstance(s, _SpectralNorm)]
  # Every spectral spec of a module records whether flaxnorm owns the flag, so
  # removing the last one knows whether to delete it.
  added = any(s.added_flag for s in others) if others else not has_flag
  spec = dataclasses.replace(spec, added_flag=added)
  states = {}
  for i, name in enumerate(names):
    where = _where(path, module, name)
    var = _check_param(module, name, "spectral_norm", path)
    _check_free(module, spec.attrs(name), "spectral_norm", path, name)
    w = var[...]
    kept = _checks.check_spectral_weight(w, spec.axis, where)
    states[name] = _math.spectral_state_init(
      next_key(i), w, axis=kept, n_steps=n_init_iterations, eps=spec.eps
    )

  def commit() -> None:
    specs = _specs_of(module)
    specs.update(dict.fromkeys(names, spec))
    _swap_class(module, specs)
    for name, state in states.items():
      for attr, value in zip(spec.attrs(name), state):
        setattr(module, attr, SpectralStateVar(value))
    if not has_flag:
      setattr(module, _FLAG, False)  # starts in training mode, like nnx.BatchNorm

  return commit


# --------------------------------------------------------------------------- #
# Public API.
# --------------------------------------------------------------------------- #


def _wn_spec(axis: Any, eps: Any) -> _WeightNorm:
  _checks.check_axis_arg(axis, "weight_norm")
  return _WeightNorm(
    axis=tuple(axis) if isinstance(axis, list) else axis, eps=_checks.check_eps(eps, "weight_norm")
  )


def weight_norm(
  module: M,
  *,
  name: str | Sequence[str] = "kernel",
  axis: Axis = -1,
  eps: float = 1e-12,
) -> M:
  """Reparametrizes a layer's param as ``w = g * v / ||v||`` (Salimans & Kingma, 2016), in place.

  The ``nnx.Param`` ``{name}`` is replaced by two ``nnx.Param``\\ s: ``{name}_g``
  (magnitude: the param's rank with size 1 on the reduced axes, e.g. ``(1, out)``
  for a ``Linear`` kernel ``(in, out)``) and ``{name}_v`` (direction: the
  original Param object, shape unchanged). At wrap time ``v = w`` and
  ``g = ||w||``, so the output is unchanged. ``layer.{name}`` becomes a value
  computed whenever it is read; it is never stored, so the optimizer trains
  ``g`` and ``v`` and nothing overwrites them.

  Args:
    module: an ``nnx.Module`` holding ``{name}`` as an ``nnx.Param`` (``Linear``,
      ``LinearGeneral``, ``Conv``, ``ConvTranspose``, ``Embed``, or your own).
      It is modified in place. To wrap layers inside a model, pass them
      (``weight_norm(model.encoder)``) or use :func:`wrap_modules`.
    name: the param(s) to normalize: ``"kernel"``, ``"embedding"`` for
      ``nnx.Embed``, or a sequence of names.
    axis: the kept axis or axes (PyTorch's ``dim``); the norm runs over all the
      others. ``-1`` is the output-feature axis of Flax kernels; use ``axis=0``
      with ``name="embedding"`` for a per-row norm of ``nnx.Embed``; ``None``
      for one norm of the whole tensor (``g`` of shape ``()``).
    eps: lower bound on ``||v||``; a zero ``v`` gives a zero kernel with finite
      gradients.

  Returns:
    ``module`` itself, now an instance of a subclass of its class.

  Raises:
    TypeError: ``module`` is not an ``nnx.Module``, the param is not an
      ``nnx.Param`` or not floating point.
    ValueError: the param does not exist, is already wrapped, or ``axis`` is out
      of range.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import flaxnorm.nnx
    >>> layer = flaxnorm.nnx.weight_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    >>> jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(layer, nnx.Param)))
    {'bias': (3,), 'kernel_g': (1, 3), 'kernel_v': (4, 3)}
    >>> layer(jnp.ones((2, 4))).shape
    (2, 3)
  """
  names = _checks.check_names(name)
  _plan_weight_norm(module, None, names, _wn_spec(axis, eps))()
  return module


def _sn_spec(
  axis: Any, n_power_iterations: Any, n_init_iterations: Any, eps: Any, mode: Any = "normalize"
):
  _checks.check_axis_arg(axis, "spectral_norm", allow_none=False)
  spec = _SpectralNorm(
    axis=tuple(axis) if isinstance(axis, list) else axis,
    n_power_iterations=_checks.check_count(
      n_power_iterations, "n_power_iterations", 1, "spectral_norm"
    ),
    eps=_checks.check_eps(eps, "spectral_norm"),
    added_flag=False,
    mode=_checks.check_mode(mode, "spectral_norm"),
  )
  return spec, _checks.check_count(n_init_iterations, "n_init_iterations", 0, "spectral_norm")


def spectral_norm(
  module: M,
  *,
  name: str | Sequence[str] = "kernel",
  axis: Axis = -1,
  n_power_iterations: int = 1,
  n_init_iterations: int = _math.DEFAULT_N_INIT_ITERATIONS,
  eps: float = 1e-12,
  mode: str = "normalize",
  rngs: Rngs = None,
) -> M:
  """Divides a layer's param by its spectral norm (Miyato et al., 2018), in place.

  The ``nnx.Param`` ``{name}`` stays (the unnormalized weight, PyTorch's
  ``weight_orig``); reading ``layer.{name}`` gives ``W / sigma``. The
  power-iteration state is stored as :class:`SpectralStateVar`\\ s beside it:
  ``{name}_u`` (shape ``(m,)``, ``m`` the size of the kept axis),
  ``{name}_v`` (shape ``(n,)``, the product of the other axes) and
  ``{name}_sigma`` (shape ``()``), for PyTorch's matrix view
  ``moveaxis(W, axis, 0).reshape(m, n)``.

  * At wrap time: random ``u``, ``v``, then ``n_init_iterations`` iterations, so
    sigma is accurate from the first step.
  * ``__call__`` in training mode (``use_running_average`` false, after
    wrapping or ``model.train()``): ``n_power_iterations`` iterations from the
    stored vectors; the new ``u``, ``v``, ``sigma`` are stored and used.
  * ``__call__`` in evaluation mode (after ``model.eval()``): no iteration,
    ``sigma = u^T W v`` from the stored vectors; nothing changes.

  Iterations run in a ``jax.lax.fori_loop`` and carry no gradient; ``sigma`` is
  differentiable in ``W``. Only ``__call__`` updates the state; other methods
  (e.g. ``nnx.Embed.attend``) and reading ``layer.{name}`` use the stored
  vectors.

  Args:
    module: an ``nnx.Module`` holding ``{name}`` as an ``nnx.Param`` with at
      least 2 dims; modified in place.
    name: the param(s) to normalize.
    axis: the kept (output) axis or axes, the rows of the matrix view; ``-1``
      for Flax kernels, ``0`` for ``nnx.Embed``'s ``embedding``.
    n_power_iterations: iterations per training call (>= 1).
    n_init_iterations: iterations at wrap time (>= 0).
    eps: norms at or below ``eps`` count as zero; a zero kernel stays zero.
    mode: ``"normalize"`` uses ``W / sigma``; ``"clip"`` uses
      ``W / max(sigma, 1)`` (only kernels with spectral norm above 1 shrink).
    rngs: where the random start comes from: an ``nnx.Rngs`` (its
      ``'spectral'`` stream if it has one, else ``params``), a PRNG key, an int
      seed, or ``None`` (seed 0; after ``n_init_iterations`` the start hardly
      matters).

  Returns:
    ``module`` itself, now an instance of a subclass of its class, with a
    ``use_running_average`` attribute (``False``) unless it had one already.

  Raises:
    TypeError: bad module, param type or argument type.
    ValueError: the param does not exist, is already wrapped, has fewer than 2
      dims, or ``axis`` is out of range.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import flaxnorm.nnx
    >>> layer = flaxnorm.nnx.spectral_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    >>> jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(layer, flaxnorm.nnx.SpectralStateVar)))
    {'kernel_sigma': (), 'kernel_u': (3,), 'kernel_v': (4,)}
    >>> y = layer(jnp.ones((2, 4)))  # training: updates kernel_u/_v/_sigma
    >>> layer.eval()
    >>> y = layer(jnp.ones((2, 4)))  # evaluation: state frozen
  """
  names = _checks.check_names(name)
  spec, n_init = _sn_spec(axis, n_power_iterations, n_init_iterations, eps, mode)
  keys = _make_key_source(rngs, "spectral_norm")
  _plan_spectral_norm(module, None, names, spec, n_init, keys)()
  return module


def _iter_modules(model: nnx.Module) -> list[tuple[PathParts, nnx.Module]]:
  seen: set[int] = set()
  out = []
  for path, module in nnx.iter_modules(model):
    if id(module) not in seen:  # a shared layer is wrapped once
      seen.add(id(module))
      out.append((tuple(path), module))
  return out


def wrap_modules(
  model: M,
  transform: Callable[..., Any],
  *,
  where: Any,
  **kwargs: Any,
) -> M:
  """Applies :func:`weight_norm` or :func:`spectral_norm` to every submodule matching a filter.

  All matching modules are checked (and the spectral state computed) before any
  is changed, so an error leaves the model untouched.

  Args:
    model: the root ``nnx.Module``; itself included in the search.
    transform: ``flaxnorm.nnx.weight_norm`` or ``flaxnorm.nnx.spectral_norm``.
    where: an NNX filter on ``(path, module)``: a module type (``nnx.Linear``),
      a tuple of them, ``nnx.PathContains('encoder')``, ``nnx.All``/``nnx.Any``
      combinations, or a callable ``(path, module) -> bool``.
    **kwargs: passed to ``transform`` (``name=``, ``axis=``, ``rngs=`` ...). With
      ``rngs`` a key or seed, each module gets its own key folded in from it.

  Returns:
    ``model`` itself, modified in place.

  Raises:
    ValueError: nothing matches ``where`` (the message lists the submodules), or
      a matching module cannot be wrapped (the message names its path).

  Examples:
    >>> from flax import nnx
    >>> import flaxnorm.nnx
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    >>> model = flaxnorm.nnx.wrap_modules(model, flaxnorm.nnx.weight_norm, where=nnx.Linear)
    >>> sorted(nnx.to_pure_dict(nnx.state(model))['layers'][0])
    ['bias', 'kernel_g', 'kernel_v']
  """
  if transform is weight_norm:
    method = "weight_norm"
  elif transform is spectral_norm:
    method = "spectral_norm"
  else:
    raise TypeError(
      "wrap_modules: transform must be flaxnorm.nnx.weight_norm or "
      f"flaxnorm.nnx.spectral_norm, got {transform!r}."
    )
  _check_module(model, method)
  try:
    bound = inspect.signature(transform).bind(model, **kwargs)
  except TypeError as e:
    raise TypeError(f"wrap_modules: bad arguments for {method}: {e}.") from None
  bound.apply_defaults()
  args = bound.arguments
  predicate = nnx.filterlib.to_predicate(where)
  modules = _iter_modules(model)
  chosen = [(p, m) for p, m in modules if predicate(p, m)]
  if not chosen:
    found = [f"{_path_str(p)} ({type(m).__name__})" for p, m in modules]
    raise ValueError(
      f"wrap_modules: no submodule matches where={where!r}. The modules are {found}."
    )
  names = _checks.check_names(args["name"])
  if method == "weight_norm":
    spec = _wn_spec(args["axis"], args["eps"])
    commits = [_plan_weight_norm(m, p, names, spec) for p, m in chosen]
  else:
    spec, n_init = _sn_spec(
      args["axis"], args["n_power_iterations"], args["n_init_iterations"], args["eps"], args["mode"]
    )
    source = _make_key_source(args["rngs"], "spectral_norm")
    commits = [
      _plan_spectral_norm(m, p, names, spec, n_init, _offset(source, i * len(names)))
      for i, (p, m) in enumerate(chosen)
    ]
  for commit in commits:
    commit()
  return model


def _offset(source: Callable[[int], jax.Array], start: int) -> Callable[[int], jax.Array]:
  return lambda i: source(start + i)


def _remove(module: Any, name: Any, kind: type, method: str) -> None:
  _check_module(module, f"remove_{method}")
  wanted = None if name is None else set(_checks.check_names(name))
  plans = []
  wrapped = []
  for path, m in _iter_modules(module):
    specs = {n: s for n, s in _specs_of(m).items() if isinstance(s, kind)}
    wrapped += [f"{_path_str(path)}:{n}" for n in specs]
    chosen = {n: s for n, s in specs.items() if wanted is None or n in wanted}
    if chosen:
      plans.append((m, chosen))
  if not plans:
    what = "" if wanted is None else f" named {sorted(wanted)}"
    raise ValueError(
      f"remove_{method}: no param{what} of {type(module).__name__} or its submodules is "
      f"wrapped by {method}. Wrapped by it: {wrapped or 'none'}."
    )
  # Compute every folded weight before changing anything.
  folded = [
    (m, chosen, {n: _math.apply_scale(*s.factors(m, n)) for n, s in chosen.items()})
    for m, chosen in plans
  ]
  for m, chosen, values in folded:
    specs = _specs_of(m)
    raw = {}
    for n, s in chosen.items():
      raw[n] = vars(m)[f"{n}_v"] if isinstance(s, _WeightNorm) else vars(m)[n]
      for attr in s.attrs(n):
        delattr(m, attr)
      del specs[n]
    if any(isinstance(s, _SpectralNorm) and s.added_flag for s in chosen.values()) and not any(
      isinstance(s, _SpectralNorm) for s in specs.values()
    ):
      delattr(m, _FLAG)
    _swap_class(m, specs)
    for n, value in values.items():
      if n in vars(m):
        delattr(m, n)
      setattr(m, n, raw[n].copy(value))


def remove_weight_norm(module: M, *, name: str | Sequence[str] | None = None) -> M:
  """Folds ``{x}_g``/``{x}_v`` back into a plain ``nnx.Param`` ``{x}``, in place.

  Works on a wrapped layer or on any model containing wrapped layers (every
  one of them is folded). The layer gets back its own class, and its output is
  unchanged.

  Args:
    module: an ``nnx.Module``; it and all its submodules are searched.
    name: only fold these params (default: every weight-normalized param).

  Returns:
    ``module`` itself.

  Raises:
    ValueError: no weight-normalized param was found.
  """
  _remove(module, name, _WeightNorm, "weight_norm")
  return module


def remove_spectral_norm(module: M, *, name: str | Sequence[str] | None = None) -> M:
  """Replaces each spectrally normalized param by ``W / sigma`` and drops its state, in place.

  Sigma is ``u^T W v`` from the stored vectors, as in evaluation, so the plain
  layer gives the wrapped layer's eval output. The ``use_running_average``
  attribute added by :func:`spectral_norm` is removed too.

  Args:
    module: an ``nnx.Module``; it and all its submodules are searched.
    name: only fold these params (default: every spectrally normalized param).

  Returns:
    ``module`` itself.

  Raises:
    ValueError: no spectrally normalized param was found.
  """
  _remove(module, name, _SpectralNorm, "spectral_norm")
  return module
