"""What a normalized NNX layer computes when it reads its param, and its class body.

``flaxnorm.nnx`` switches a layer's class to a subclass (built by
``flaxnorm._subclass``) whose normalized param is a data descriptor
(:class:`_Normalized`): reading ``layer.kernel`` asks the spec for the factors
``(base, scale)`` of the kernel ``base * scale`` from the stored variables. The
subclass's ``__call__`` first iterates the spectral state (training), and for
NNX's own linear layers moves the scale and the bias to the output
(``flaxnorm._output_scale``). Everything reads the specs from the class.
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

from flaxnorm import (
  _axes,
  _checks,
  _data_init,
  _math,
  _nnx_ensemble,
  _operator,
  _options,
  _output_scale,
  _power,
  _select,
  _subclass,
)

#: The attribute ``model.train()``/``model.eval()`` set to ``False``/``True``.
FLAG = "use_running_average"


@dataclasses.dataclass
class _Call:
  """What one ``__call__`` hands to the computed params it reads."""

  deferred: _output_scale.OutputScale | None  # the output takes the kernel's scale and the bias
  scales: dict[str, jax.Array]  # spectral scales of the iterations just run
  kernels: dict[str, jax.Array] = dataclasses.field(default_factory=dict)  # read as given


# The modules inside their __call__, by id. A context variable rather than an
# instance attribute: NNX's graph functions (split, state, lifted transforms)
# see every instance attribute, and may run on the module during its call.
_CALLS: contextvars.ContextVar[dict[int, _Call]] = contextvars.ContextVar("flaxnorm_nnx_calls")


#: True inside an ``nnx.RNN``'s time loop whose step already ran (``flaxnorm._nnx_scan``):
#: spectrally normed layers use their stored state as it is.
FROZEN: contextvars.ContextVar[bool] = contextvars.ContextVar("flaxnorm_nnx_frozen", default=False)


def _active_call(module: Any) -> _Call | None:
  return _CALLS.get({}).get(id(module))


#: The attribute holding the path ``wrap_modules`` found a layer at, for messages at
#: call time (a layer wrapped on its own has none). A static attribute (a tuple of
#: names), so ``nnx.split``/``nnx.merge`` and ``nnx.jit`` keep it; NNX's repr hides it.
PATH_ATTR = "_flaxnorm_path"


def remember_path(module: Any, path: tuple[Any, ...]) -> None:
  setattr(module, PATH_ATTR, tuple(path))


def describe(module: Any, name: str, path: tuple[Any, ...] | None = None) -> str:
  """``param 'kernel' of layer 'a/b' (Linear)``, for error messages (no path: unknown)."""
  owner = type(module).__name__
  path = vars(module).get(PATH_ATTR) if path is None else path
  if path is None:
    return f"param '{name}' of {owner}"
  return f"param '{name}' of layer '{path_str(path)}' ({owner})"


path_str = _select.path_str  # "a/0/b", or "<top level>"


def _get(module: nnx.Module, attr: str, method: str, name: str) -> Any:
  var = vars(module).get(attr)
  if not isinstance(var, nnx.Variable):
    raise ValueError(
      f"{method}: {describe(module, name)} needs the variable '{attr}', "
      f"found {type(var).__name__}. Was it removed (e.g. by nnx.pop) or replaced?"
    )
  return var


# --------------------------------------------------------------------------- #
# The specs: what each transform computes from the stored variables.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class WeightNormSpec(_subclass.SpecBase):
  options: _options.WeightNormOptions
  member_ndim: int | None = None  # one member's rank: more is an nnx.vmap stack (_nnx_ensemble)

  def attrs(self, name: str) -> tuple[str, ...]:
    return _options.weight_norm_keys(name)

  def factors(self, module: nnx.Module, name: str) -> tuple[jax.Array, jax.Array]:
    """``(v, g / ||v||)``: the kernel is their product."""
    g, v = (_get(module, a, self.method, name) for a in self.attrs(name))
    if _nnx_ensemble.is_stacked(self, v[...]):
      return _nnx_ensemble.stacked_factors(self, v[...], g[...], v[...])
    at = describe(module, name)
    axis = _axes.explicit(self.options.axis, at)
    kept = None if axis is None else _checks.normalize_axes(axis, v[...].ndim, at)
    _checks.check_g_fits(g[...].shape, v[...].shape, kept, self.attrs(name)[0], at)
    return v[...], _math.weight_norm_scale(g[...], v[...], self.options.eps)


@dataclasses.dataclass(frozen=True)
class SpectralNormSpec(_subclass.SpecBase):
  options: _options.SpectralNormOptions
  added_flag: bool  # this transform gave the module its train/eval attribute
  input_shape: tuple[int, ...] | None = None  # operator mode: one example, no batch axis
  member_ndim: int | None = None  # one member's rank: more is an nnx.vmap stack (_nnx_ensemble)

  def attrs(self, name: str) -> tuple[str, ...]:
    return _options.spectral_keys(name)

  def _state(self, module: nnx.Module, name: str) -> tuple[Any, tuple[int, ...], list[Any]]:
    """The kernel Variable, its kept axes and its checked state Variables."""
    w = _get(module, name, self.method, name)
    state = [_get(module, a, self.method, name) for a in self.attrs(name)]
    at = describe(module, name)
    kept = _checks.check_spectral_weight(w[...], _axes.explicit(self.options.axis, at), at)
    if not self.options.operator:
      shapes = [jax.numpy.shape(x[...]) for x in state]
      _checks.check_state_fits(w[...].shape, kept, shapes, self.attrs(name), at)
    return w, kept, state

  def factors(self, module: nnx.Module, name: str) -> tuple[jax.Array, jax.Array]:
    """``(W, 1 / sigma)``: the kernel is their product."""
    call = _active_call(module)
    if call is not None and name in call.scales:
      # In a training __call__: sigma from the iterations just run, as in Linen.
      return _get(module, name, self.method, name)[...], call.scales[name]
    w = _get(module, name, self.method, name)[...]
    if _nnx_ensemble.is_stacked(self, w):  # outside nnx.vmap: every member's kernel
      state = (_get(module, a, self.method, name)[...] for a in self.attrs(name))
      return _nnx_ensemble.stacked_factors(self, w, *state)
    w, kept, (u, v, sigma) = self._state(module, name)
    opts = self.options
    if opts.operator and FROZEN.get() and not getattr(module, FLAG, False):
      # Training, in an nnx.RNN's time loop: sigma of the step just stored, differentiable.
      stored = _power.SpectralState(u[...], v[...], sigma[...])
      return w[...], _operator.fresh_scale(w[...], stored, operator_map(module, name), opts)
    if opts.operator:  # the stored sigma, as Linen's evaluation
      return w[...], _operator.eval_scale(sigma[...], opts)
    # Otherwise sigma = u^T W v from the stored vectors.
    scale, _ = _power.spectral_scale(
      w[...], u[...], v[...], axis=kept, n_steps=0, eps=opts.eps, mode=opts.mode, target=opts.target
    )
    return w[...], scale

  def check_example(self, module: nnx.Module, name: str, shape: tuple[int, ...]) -> None:
    """Operator mode in evaluation: raises unless inputs of ``shape`` have the size sigma is for."""
    if not self.options.operator:
      return
    if _nnx_ensemble.is_stacked(self, _get(module, name, self.method, name)[...]):
      return  # every member's call is checked under nnx.vmap
    v = _get(module, self.attrs(name)[1], self.method, name)[...]
    example = _operator.example_of(shape, v.shape)
    _operator.check_input_shape(v.shape, example, self.attrs(name), describe(module, name))

  def update(self, module: nnx.Module, name: str, shape: tuple[int, ...]) -> jax.Array:
    """Iterates, stores the new state, and returns this call's (differentiable) scale.

    ``shape`` is this call's input shape (operator mode checks its example).
    """
    if _nnx_ensemble.is_stacked(self, _get(module, name, self.method, name)[...]):
      raise _nnx_ensemble.not_under_vmap_error(self.method, describe(module, name))
    w, kept, (u, v, sigma) = self._state(module, name)
    opts = self.options
    if opts.operator:
      at = describe(module, name)
      example = _operator.example_of(shape, v[...].shape)
      _operator.check_input_shape(v[...].shape, example, self.attrs(name), at)
      stored = _power.SpectralState(u[...], v[...], sigma[...])
      scale, new = _operator.iterate(w[...], stored, operator_map(module, name), opts)
      u[...], v[...], sigma[...] = new.u, new.v, new.sigma
      return scale
    scale, new = _power.spectral_scale(
      w[...],
      u[...],
      v[...],
      sigma=sigma[...],
      axis=kept,
      n_steps=opts.n_power_iterations,
      eps=opts.eps,
      mode=opts.mode,
      target=opts.target,
    )
    u[...], v[...], sigma[...] = new.u, new.v, new.sigma
    return scale


def operator_map(module: nnx.Module, name: str) -> _operator.Linear:
  """Operator mode's ``w -> (x -> A_w x)``: the layer's own ``__call__`` with kernel ``w``.

  The layer reads ``w`` for ``name`` (see :class:`_Normalized`); the linear part
  is the JVP at zero, so the bias plays no part. It computes in the layer's own
  dtype.
  """
  base_call = _subclass.base_of(type(module)).__call__

  def with_kernel(w: jax.Array) -> Callable[[jax.Array], jax.Array]:
    def f(x: jax.Array) -> jax.Array:
      token = _CALLS.set({**_CALLS.get({}), id(module): _Call(None, {}, {name: w})})
      try:
        return base_call(module, x)
      finally:
        _CALLS.reset(token)

    return lambda x: jax.jvp(f, (jax.numpy.zeros_like(x),), (x,))[1]

  return with_kernel


# --------------------------------------------------------------------------- #
# The class body.
# --------------------------------------------------------------------------- #


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
    call = _active_call(obj)
    if call is not None and self.name in call.kernels:
      return call.kernels[self.name]  # operator mode's map, for a given kernel
    base, scale = self.spec.factors(obj, self.name)
    deferred = None if call is None else call.deferred
    if deferred is not None and deferred.take_scale(base, scale):
      return base  # __call__ scales the output instead
    return _output_scale.scale_kernel(deferred, base, scale)

  def __set__(self, obj, value):
    if isinstance(self.spec, SpectralNormSpec):
      vars(obj)[self.name] = value  # the unnormalized weight (PyTorch's weight_orig)
      return
    g, v = _options.weight_norm_keys(self.name)
    raise AttributeError(
      f"weight_norm: '{self.name}' of {type(obj).__name__} is computed from '{g}' and "
      f"'{v}'; assign to those, or call flaxnorm.nnx.remove_weight_norm first."
    )

  def __delete__(self, obj):
    if isinstance(self.spec, SpectralNormSpec) and self.name in vars(obj):
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
  promote = nnx_dtypes.promote_dtype

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


def _set_view_fn(base: type) -> Callable | None:
  """``set_view`` for ``nnx.view``: the flag, plus whatever the base accepts."""
  base_view = getattr(base, "set_view", None)
  param = inspect.Parameter
  params = [param("self", param.POSITIONAL_OR_KEYWORD)]
  if base_view is not None:
    params = list(inspect.signature(base_view).parameters.values())
    if FLAG in {p.name for p in params}:
      return None  # the base already handles the flag
  # nnx.view matches kwargs against this signature to know which it consumed.
  flag = param(FLAG, param.KEYWORD_ONLY, default=None, annotation=bool | None)
  rest = [p for p in params if p.kind is not param.VAR_KEYWORD]
  params = rest + [flag] + [p for p in params if p.kind is param.VAR_KEYWORD]

  def set_view(self, *args, use_running_average: bool | None = None, **kwargs):
    if use_running_average is not None:
      setattr(self, FLAG, use_running_average)
    if base_view is not None:
      return base_view(self, *args, **kwargs)
    return None

  set_view.__signature__ = inspect.Signature(params)
  set_view.__doc__ = (
    f"Used by ``nnx.view``: ``{FLAG}=True`` freezes the spectral norm state (eval)."
  )
  return set_view


def _defines_call(base: type) -> bool:
  # `base.__call__` of a class without one is the metaclass's (construction).
  return any("__call__" in vars(k) for k in base.__mro__ if k is not object)


# --------------------------------------------------------------------------- #
# Weight norm's data-dependent init (flaxnorm._data_init), for nnx.data_init:
# while a run is active, each weight-normed linear layer's first call gets the
# unit-norm kernel and a zero bias, sets g and the bias from its output t, and
# returns g * t + b.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class DataInitRun:
  """One ``flaxnorm.nnx.data_init`` run: the layers still to initialize, and those done, by id."""

  init_scale: float
  pending: dict[int, tuple[int, ...]]  # layer id -> its output feature axes
  done: set[int] = dataclasses.field(default_factory=set)


DATA_INIT: contextvars.ContextVar[DataInitRun | None] = contextvars.ContextVar(
  "flaxnorm_nnx_data_init", default=None
)


class _BiasTaker:
  """Stands in for the ``OutputScale`` during data init: the layer adds a zero bias."""

  bias: jax.Array | None = None

  def take_scale(self, base: jax.Array, scale: jax.Array) -> bool:
    del base, scale
    return False

  def take_bias(self, bias: jax.Array) -> jax.Array:
    self.bias = bias
    return jax.numpy.zeros_like(bias)


def data_init_axes(module: nnx.Module, at: str) -> tuple[int, ...]:
  """The output feature axes of a weight-normed layer that data init supports, or raises.

  Args:
    module: a module whose class carries flaxnorm specs.
    at: its path, for the error message.
  """
  base = _subclass.base_of(type(module))
  specs = _subclass.specs_of(type(module))
  spec = specs.get("kernel")
  runs_own_ops = _LINEAR_LAYERS.get(base)
  if (
    set(specs) != {"kernel"}
    or not isinstance(spec, WeightNormSpec)
    or runs_own_ops is None
    or not runs_own_ops(module)
  ):
    raise ValueError(
      f"data_init: layer '{at}' ({base.__name__}) is weight-normed but data_init supports "
      f"only nnx.Linear, nnx.LinearGeneral (no batch_axis), nnx.Conv and nnx.ConvTranspose "
      f"with Flax's own ops and only 'kernel' wrapped (found {sorted(specs)})."
    )
  ndim = vars(module)["kernel_v"][...].ndim
  n = len(module.out_features) if isinstance(module, nnx.LinearGeneral) else 1
  first = ndim - n - (1 if getattr(module, "transpose_kernel", False) else 0)
  features = {first + i: i - n for i in range(n)}
  kept = _checks.normalize_axes(_axes.explicit(spec.options.axis, at), ndim, at)
  return _data_init.feature_axes(kept, ndim, features, f"layer '{at}' ({base.__name__})", True)


def _start_data_init(module: nnx.Module, state: _Call) -> tuple[int, ...] | None:
  """In a data-init run, prepares the layer's first call; returns its feature axes."""
  run = DATA_INIT.get()
  if run is None or id(module) in run.done:
    return None
  spec = _subclass.specs_of(type(module)).get("kernel")
  if id(module) not in run.pending:
    if isinstance(spec, WeightNormSpec):  # not one of the model's layers: a transform's copy
      raise ValueError(
        f"data_init: {describe(module, 'kernel')} was called through an NNX transform "
        "(nnx.remat, nnx.vmap, nnx.scan, nnx.RNN, ...) that calls a copy of the layer, so "
        "data_init cannot set its g and bias. Run data_init on a model that calls its "
        "weight-normed layers directly, or set g and the bias by hand."
      )
    return None
  assert isinstance(spec, WeightNormSpec)
  run.done.add(id(module))
  g, v = (_get(module, a, "data_init", "kernel") for a in spec.attrs("kernel"))
  scale = _math.weight_norm_scale(jax.numpy.ones_like(g[...]), v[...], spec.options.eps)
  state.kernels = {"kernel": _math.apply_scale(v[...], scale)}
  state.deferred = _BiasTaker()  # type: ignore[assignment]  # duck-typed OutputScale
  return run.pending.pop(id(module))


def _finish_data_init(
  module: nnx.Module, axes: tuple[int, ...], bias: jax.Array | None, t: jax.Array
) -> jax.Array:
  """Sets ``g`` (and the bias) from the unit-norm layer's output ``t``; returns ``g * t + b``."""
  run = DATA_INIT.get()
  assert run is not None
  g_var = vars(module)["kernel_g"]
  shape = None if bias is None else tuple(bias.shape)
  at = describe(module, "kernel")
  g, b, y = _data_init.normalize(t, axes, run.init_scale, g_var[...].shape, shape, at, True)
  g_var[...] = g.astype(g_var[...].dtype)
  if b is not None and bias is not None:
    vars(module)["bias"][...] = b.astype(bias.dtype)
  return y


def _call(self, *args, **kwargs):
  """``__call__`` of a normalized layer: iterate (training), then the layer's own call."""
  cls = type(self)
  specs = _subclass.specs_of(cls)
  state = _Call(None, {})
  inputs = args[0] if args else kwargs.get("inputs")
  shape = tuple(getattr(inputs, "shape", ()))  # operator mode's check reads its example
  _check_not_stacked(self)
  spectral = {name: s for name, s in specs.items() if isinstance(s, SpectralNormSpec)}
  if not getattr(self, FLAG, False) and not FROZEN.get():  # training: iterate and store
    state.scales = {name: spec.update(self, name, shape) for name, spec in spectral.items()}
  else:  # evaluation: operator mode's sigma holds for the size it was found at only
    for name, spec in spectral.items():
      spec.check_example(self, name, shape)
  scales_output = _LINEAR_LAYERS.get(_subclass.base_of(cls)) if set(specs) == {"kernel"} else None
  if scales_output is not None and scales_output(self):
    # The layer reads the bare kernel and a zero bias; the scale and bias go
    # on its output (unless float16 compute: see _output_scale).
    operator = any(isinstance(s, SpectralNormSpec) and s.options.operator for s in specs.values())
    state.deferred = _output_scale.for_call(self, args, kwargs, operator)
  init_axes = _start_data_init(self, state)
  token = _CALLS.set({**_CALLS.get({}), id(self): state})
  try:
    y = _subclass.base_of(cls).__call__(self, *args, **kwargs)
  finally:
    _CALLS.reset(token)
  if init_axes is not None:
    return _finish_data_init(self, init_axes, getattr(state.deferred, "bias", None), y)
  return y if state.deferred is None else state.deferred.finish(y)


def _check_not_stacked(module: nnx.Module) -> None:
  """Raises for an ensemble called outside ``nnx.vmap`` (it is called member by member)."""
  for name, spec in _subclass.specs_of(type(module)).items():
    probe = spec.attrs(name)[1] if isinstance(spec, WeightNormSpec) else name
    if _nnx_ensemble.is_stacked(spec, _get(module, probe, spec.method, name)[...]):
      raise _nnx_ensemble.not_under_vmap_error(spec.method, describe(module, name))


def _attend(self, *args, **kwargs):
  """``nnx.Embed.attend`` of a normalized embedding: refused outside ``nnx.vmap`` for a stack."""
  _check_not_stacked(self)
  return _subclass.base_of(type(self)).attend(self, *args, **kwargs)


def _graph_node_set_key(self, key, value):
  # Update the raw Variable in place (as NNX does) rather than going through
  # the computed attribute.
  current = vars(self).get(key)
  specs = type(self)._flaxnorm_specs
  if key in specs and isinstance(current, nnx.Variable) and isinstance(value, nnx.Variable):
    current.update_from_state(value)
    return None
  return _subclass.base_of(type(self))._graph_node_set_key(self, key, value)


def _graph_node_pop_key(self, key):
  if key in type(self)._flaxnorm_specs and key in vars(self):
    value = vars(self)[key]
    delattr(self, key)
    return value
  return _subclass.base_of(type(self))._graph_node_pop_key(self, key)


def namespace(base: type, specs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """The class body of a normalized NNX class (see ``flaxnorm._subclass``)."""
  body: dict[str, Any] = {name: _Normalized(name, spec) for name, spec in specs.items()}
  body.update(_graph_node_set_key=_graph_node_set_key, _graph_node_pop_key=_graph_node_pop_key)
  spectral = [s for s in specs.values() if isinstance(s, SpectralNormSpec)]
  scales_output = base in _LINEAR_LAYERS and set(specs) == {"kernel"}
  if scales_output:
    body["bias"] = _Bias()
  if _defines_call(base):  # also weight norm alone: a stacked layer outside nnx.vmap raises
    body["__call__"] = _call
  if issubclass(base, nnx.Embed):
    body["attend"] = _attend
  if any(s.added_flag for s in spectral):
    set_view = _set_view_fn(base)
    if set_view is not None:
      body["set_view"] = set_view
  return body, class_keywords(base)


def class_keywords(base: type) -> dict[str, Any]:
  """The class keywords a subclass of NNX module ``base`` needs: its pytree mode."""
  mode = getattr(base, "_pytree__is_pytree", None)
  return {} if mode is None else {"pytree": mode}


def swap_class(module: nnx.Module, specs: Mapping[str, Any]) -> None:
  """Gives ``module`` the normalized class of its base for ``specs`` (its base if none)."""
  cls = _subclass.normalized_class(_subclass.base_of(type(module)), specs, namespace)
  # object.__setattr__: NNX's __setattr__ would record '__class__' as a field.
  object.__setattr__(module, "__class__", cls)
