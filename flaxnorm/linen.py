"""Weight norm and spectral norm for Flax Linen modules.

Both transforms take a Linen Module **class** (returning a transformed class,
like ``nn.remat(nn.Dense)``) or a Module **instance** (returning a module that
behaves like it). The transformed module is a subclass of the layer's class
whose ``param`` method builds the normalized kernel whenever the layer asks for
it, so variables stay at the layer's own path (no extra nesting level) and the
layer's code runs unchanged. Nothing writes a normalized weight back into
params. Flax's own linear layers (``Dense``, ``Conv``, ...) get the bare kernel
and have their output scaled instead (``(x @ v) * g / ||v||``), the same numbers
with fewer kernel-sized passes (see ``flaxnorm._output_scale``).

Variable layout for ``nn.Dense(3)`` on inputs with 4 features::

  weight_norm:   {'params': {'bias': (3,), 'kernel_g': (1, 3), 'kernel_v': (4, 3)}}
  spectral_norm: {'params': {'bias': (3,), 'kernel': (4, 3)},
                  'spectral': {'kernel_sigma': (), 'kernel_u': (3,), 'kernel_v': (4,)}}
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, overload

import flax.linen as nn
import jax
from flax.core import meta
from flax.linen import dtypes as linen_dtypes

from flaxnorm import (
  _axes,
  _linen_data_init,
  _linen_operator,
  _linen_scan,
  _options,
  _output_scale,
  _power,
  _select,
  _subclass,
)
from flaxnorm._axes import AxisOption
from flaxnorm._fold import remove_spectral_norm, remove_weight_norm
from flaxnorm._linen_specs import SpectralNormSpec as _SpectralNorm
from flaxnorm._linen_specs import WeightNormSpec as _WeightNorm
from flaxnorm._linen_specs import describe as _describe

__all__ = ("remove_spectral_norm", "remove_weight_norm", "spectral_norm", "weight_norm")

M = TypeVar("M", bound=nn.Module)
#: What ``name`` accepts: param names, or a regex / ``(path, param) -> bool`` over their paths.
Names = str | Sequence[str] | re.Pattern[str] | Callable[[tuple[str, ...], Any], bool]

# --------------------------------------------------------------------------- #
# Output scaling for Flax's linear layers.
# --------------------------------------------------------------------------- #

# Layers whose output is linear in the kernel, with the bias added last along
# the trailing output axes and the kernel's last axis the output features
# (except a transposed ConvTranspose kernel's): see flaxnorm._output_scale.
_LINEAR_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.ConvLocal, nn.ConvTranspose)
_CUSTOM_OPS = ("dot_general", "dot_general_cls", "conv_general_dilated", "conv_general_dilated_cls")


def _data_init_scale(module: nn.Module) -> float | None:
  """The ``init_scale`` of the layer's ``data_init=True`` weight norm whose ``g`` is still to set."""
  for key, spec in _subclass.specs_of(type(module)).items():
    # data_init runs on a linear layer's kernel, which a selector may pick too.
    g_key = _options.weight_norm_keys(key if isinstance(key, str) else "kernel")[0]
    if (
      isinstance(spec, _WeightNorm)
      and spec.options.data_init
      and not module.has_variable("params", g_key)  # a shared layer's later calls: as set
    ):
      return spec.options.init_scale
  return None


def runs_flax_code(module: nn.Module, layers: tuple[type, ...]) -> bool:
  """Whether ``module`` is one of ``layers`` (exactly), run by Flax's own code.

  A subclass may override ``__call__``, and a custom op (a quantized
  ``dot_general``) or ``promote_dtype`` changes what the kernel computes.
  """
  if _subclass.base_of(type(module)) not in layers:
    return False
  if any(getattr(module, op, None) is not None for op in _CUSTOM_OPS):
    return False
  return getattr(module, "promote_dtype", linen_dtypes.promote_dtype) is linen_dtypes.promote_dtype


def _scales_output(module: nn.Module) -> bool:
  """Whether ``module`` is one of Flax's linear layers, run by Flax's own code."""
  if not runs_flax_code(module, _LINEAR_LAYERS):
    return False
  batch_dims = getattr(module, "batch_dims", ())
  return not isinstance(batch_dims, int) and len(batch_dims) == 0


# --------------------------------------------------------------------------- #
# Building the transformed class / instance.
# --------------------------------------------------------------------------- #


Subtree = tuple[tuple[str, ...], tuple[str, ...]]  # (scope path, its path below the root)


def _field_modules(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
  """The modules in ``module``'s fields, named as Flax names adopted ones (``layers_0``)."""
  for f in dataclasses.fields(module):  # pyright: ignore[reportArgumentType]
    if not f.init or f.name in ("parent", "name"):
      continue
    value = getattr(module, f.name)
    if isinstance(value, nn.Module):
      yield f.name, value
    elif isinstance(value, (list, tuple)):
      yield from ((f"{f.name}_{i}", m) for i, m in enumerate(value) if isinstance(m, nn.Module))
    elif isinstance(value, Mapping):
      yield from ((f"{f.name}_{k}", m) for k, m in value.items() if isinstance(m, nn.Module))


def _subtrees(root: nn.Module) -> list[Subtree]:
  """Where ``root``'s recursive transform reaches: its scope and its fields' modules.

  A module made in the parent's compact method and passed in
  (``nn.RNN(nn.LSTMCell(8))`` there) is the parent's child, so Flax puts it
  beside ``root``, not below: it is reached all the same, under its field name.
  """
  root_path = tuple(str(p) for p in root.scope.path) if root.scope is not None else ()
  out: list[Subtree] = [(root_path, ())]
  for name, m in _field_modules(root):
    path = tuple(str(p) for p in m.scope.path) if m.scope is not None else None
    if path is not None and path[: len(root_path)] != root_path:
      out.append((path, (name,)))
  return out


def _relative(module: nn.Module, subtrees: list[Subtree]) -> tuple[str, ...] | None:
  """``module``'s path below the root (``None`` if it is not below it), as ``_subtrees`` reach."""
  if module.scope is None:
    return None
  path = tuple(str(p) for p in module.scope.path)
  for at, prefix in subtrees:
    if path[: len(at)] == at and (prefix or len(path) > len(at)):
      return prefix + path[len(at) :]
  return None


class _Tracker:
  """What a wrapped module and its recursive clones saw in one call, for its checks."""

  def __init__(self) -> None:
    self.hits: set[Any] = set()  # spec keys (names, selectors) that reached a param
    self.params: list[str] = []  # paths of the params asked for, below the root
    self.submodules: list[str] = []  # paths of the submodules reached
    self.axis_keys: set[str] = set()  # axis-mapping keys that matched a submodule


def _tracker(module: nn.Module) -> _Tracker:
  return module.__dict__.setdefault("_flaxnorm_tracker", _Tracker())


def _descendant_specs(root_specs: Mapping[Any, Any], rel: tuple[str, ...], seen: _Tracker) -> dict:
  """The root's specs for a submodule at ``rel`` below it: not recursive, axis mapped."""
  specs = {}
  for key, spec in root_specs.items():
    options = dataclasses.replace(spec.options, recursive=False)
    if isinstance(options.axis, _axes.AxisMap):
      matched, axis = options.axis.lookup(rel)
      if matched is not None:
        seen.axis_keys.add(matched)
      options = dataclasses.replace(options, axis=axis)
    specs[key] = type(spec)(options)
  return specs


def _propagate(root: nn.Module):
  """An interceptor that runs ``root``'s descendants as normalized clones.

  With ``recursive=True`` the transform reaches params that child modules
  create (the ``Dense`` layers inside ``nn.LSTMCell``): each method call on a
  descendant made during ``root``'s call runs on a clone of it with the same
  fields, in the same scope, whose class normalizes the same names (with the
  axis an axis mapping gives its path). The original's ``setup`` is skipped,
  since only the clone is used.
  """
  root_specs = _subclass.specs_of(type(root))
  seen = _tracker(root)
  subtrees = _subtrees(root)

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    rel = None
    if not (
      hasattr(type(module), "_flaxnorm_specs")
      or _is_lifted(type(module))  # the lift's own clone comes through here again
      # A function lifted over the module (nn.RNN's scan body) is no method of
      # it; the module's own method calls inside come through here.
      or not callable(getattr(type(module), context.method_name, None))
    ):
      rel = _relative(module, subtrees)
    if rel is None:
      return next_fun(*args, **kwargs)
    if context.method_name == "setup":
      return None
    seen.submodules.append("/".join(rel))
    clone = _transform(module, _descendant_specs(root_specs, rel, seen), "recursive")
    # The clone's hits count for root's checks; its params' paths start at root.
    clone.__dict__.update(_flaxnorm_tracker=seen, _flaxnorm_rel=rel, _flaxnorm_propagated=True)
    return getattr(clone, context.method_name)(*args, **kwargs)

  return interceptor


def _check_layer_saw_names(module: nn.Module) -> None:
  """After a call: every wrapped name, selector and axis-mapping key found something."""
  if module.__dict__.get("_flaxnorm_propagated"):
    return
  seen = _tracker(module)
  for key, spec in _subclass.specs_of(type(module)).items():
    if key in seen.hits:
      continue
    if isinstance(key, _select.ParamSelector):
      raise ValueError(
        f"{spec.method}: name={key!r} matched no param of layer {_path(module)!r} "
        f"({type(module).__name__}){' or its submodules' if spec.recursive else ''}. "
        f"The params are {sorted(set(seen.params))}."
      )
    params = module.variables.get("params", {}) if module.scope is not None else {}
    found = sorted(k for k, x in params.items() if not isinstance(x, Mapping))
    children = sorted(k for k, x in params.items() if isinstance(x, Mapping))
    hint = (
      f" Its submodules {children} hold their own params: wrap the layers that create them."
      if children
      else ""
    )
    raise ValueError(
      f"{spec.method}: {_describe(module, key)} does not exist: the layer never "
      f"asked for it. Its params are {found}; pass one of them as name=... "
      f"(e.g. name='embedding' for nn.Embed).{hint}"
    )
  _check_axis_keys(module, seen)


def _check_axis_keys(module: nn.Module, seen: _Tracker) -> None:
  for spec in _subclass.specs_of(type(module)).values():
    axis = spec.options.axis
    keys = axis.names() if isinstance(axis, _axes.AxisMap) else []
    unused = [k for k in keys if k not in seen.axis_keys]
    if unused:
      raise ValueError(
        f"{spec.method}: the axis mapping names {unused}, which match no submodule of layer "
        f"{_path(module)!r} ({type(module).__name__}). Its submodules are "
        f"{sorted(set(seen.submodules))}; a key is a submodule name or a path below the layer."
      )


def _path(module: nn.Module) -> str:
  path = "/".join(str(p) for p in module.scope.path) if module.scope is not None else ""
  return path or "<top level>"


# --------------------------------------------------------------------------- #
# The normalized subclass: its methods read the specs from the class.
# --------------------------------------------------------------------------- #


def _spec_for(module: nn.Module, name: str, param: Callable[[], Any]) -> Any:
  """The spec that normalizes ``module``'s param ``name`` (by name or selector), or None."""
  specs = _subclass.specs_of(type(module))
  seen = _tracker(module)
  path = (*module.__dict__.get("_flaxnorm_rel", ()), name)
  seen.params.append("/".join(path))
  hits = [
    (key, spec)
    for key, spec in specs.items()
    if key == name or (isinstance(key, _select.ParamSelector) and key.matches(path, param))
  ]
  if len(hits) > 1:
    raise ValueError(
      f"{_describe(module, name)} is selected by {[k for k, _ in hits]}: a param can be "
      "normalized only once."
    )
  if not hits:
    return None
  seen.hits.add(hits[0][0])
  return hits[0][1]


@nn.nowrap
def _param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
  """``Module.param``, returning the normalized kernel for the wrapped names."""

  def shape() -> Any:  # what a predicate selector sees: the param's shape and dtype
    return jax.eval_shape(lambda: meta.unbox(init_fn(jax.random.key(0), *init_args, **init_kwargs)))

  spec = _spec_for(self, name, shape)
  deferred = self.__dict__.get("_flaxnorm_output_scale")
  base_param = _subclass.base_of(type(self)).param
  if spec is None:
    value = base_param(self, name, init_fn, *init_args, unbox=unbox, **init_kwargs)
    return value if deferred is None or name != "bias" else _defer_bias(deferred, value)

  def create(param_name: str) -> Any:
    return base_param(self, param_name, init_fn, *init_args, unbox=False, **init_kwargs)

  raw, base, scale = spec(self, name, create)
  if deferred is None or name != "kernel" or not deferred.take_scale(base, scale):
    base = _output_scale.scale_kernel(deferred, base, scale)
  value = base if unbox or not isinstance(raw, meta.AxisMetadata) else raw.replace_boxed(base)
  # A (normalized) bias of an output-scaled layer is added after the scaling.
  return value if deferred is None or name != "bias" else _defer_bias(deferred, value)


def _defer_bias(deferred: _output_scale.OutputScale, value: Any) -> Any:
  zeros = deferred.take_bias(meta.unbox(value))
  return value.replace_boxed(zeros) if isinstance(value, meta.AxisMetadata) else zeros


def _call(self, *args, **kwargs):
  """The layer's ``__call__``, with output scaling and the recursive interceptor."""
  cls = type(self)
  linear = _scales_output(self)
  init = _linen_data_init.for_call(self, _data_init_scale(self), linear)
  specs = _subclass.specs_of(cls).values()
  operator = any(isinstance(s, _SpectralNorm) and s.options.operator for s in specs)
  deferred = (
    _output_scale.for_call(self, args, kwargs, operator) if linear and init is None else None
  )
  # Flax's own layers run their unwrapped code in this (compact) call, so that
  # interceptors and capture_intermediates see one call, with the final
  # output; other layers run their own wrapped method.
  raw_call = cls.__dict__.get("_flaxnorm_raw_call")
  call = functools.partial(raw_call or _subclass.base_of(cls).__call__, self)
  self.__dict__["_flaxnorm_output_scale"] = init or deferred  # what _param hands scale and bias
  self.__dict__[_linen_operator.INPUTS] = (args, kwargs)
  _linen_scan.broadcast_into(self, _linen_scan.spectral_collections(cls))  # a wrapped nn.RNN
  try:
    if any(s.recursive for s in _subclass.specs_of(cls).values()):
      with nn.intercept_methods(_propagate(self)):
        out = call(*args, **kwargs)
    else:
      out = call(*args, **kwargs)
  finally:
    self.__dict__.pop("_flaxnorm_output_scale", None)
    self.__dict__.pop(_linen_operator.INPUTS, None)
  _check_layer_saw_names(self)
  if init is not None:
    return _linen_data_init.finish(self, init, out)
  return out if deferred is None else deferred.finish(out)


def _compact_call(self, *args, **kwargs):
  return _call(self, *args, **kwargs)


# Flax names module methods by __name__ (capture_intermediates looks for
# '__call__'); nn.compact marks the function itself, hence a separate one.
_call.__name__ = _compact_call.__name__ = "__call__"
_compact_call = nn.compact(_compact_call)


def _namespace(base: type, specs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """The class body of a normalized Linen class (see ``flaxnorm._subclass``)."""
  del specs  # read from the class at call time
  raw_call = None
  if base in _LINEAR_LAYERS:
    raw_call = getattr(base.__call__, "__wrapped__", None)  # before Module's wrapping
  body: dict[str, Any] = {"param": _param, "__post_init__": _linen_scan.post_init}
  if raw_call is not None:
    body.update(__call__=_compact_call, _flaxnorm_raw_call=staticmethod(raw_call))
  else:
    body["__call__"] = _call
  if base.setup is not nn.Module.setup:
    body["setup"] = _setup
  return body, {}


def _setup(self) -> None:
  """The layer's ``setup``, then the name checks: its params all exist by now.

  So a wrong ``name`` is reported also when the layer only runs another method
  (``nn.Embed.attend``, ``init(..., method=...)``).
  """
  _subclass.base_of(type(self)).setup(self)
  if not any(s.recursive for s in _subclass.specs_of(type(self)).values()):
    _check_layer_saw_names(self)


def _transform_class(cls: type[M], specs: Mapping[str, Any]) -> type[M]:
  merged = _subclass.merge(cls, specs)
  return _subclass.normalized_class(_subclass.base_of(cls), merged, _namespace)  # type: ignore[return-value]


def _is_lifted(cls: type) -> bool:
  # nn.remat/nn.jit/nn.vmap/... classes rebuild the layer from the class they
  # lifted (module_class(...)) inside the transform, bypassing any subclass.
  return cls.__module__ == "flax.linen.transforms" and len(cls.__mro__) > 1


def _check_not_lifted(cls: type, method: str) -> None:
  if _is_lifted(cls):
    inner = cls.__mro__[1].__name__
    raise TypeError(
      f"{method}: {cls.__name__} is a Flax-lifted class (nn.remat, nn.jit, nn.vmap, ... of "
      f"{inner}); the lift rebuilds the layer from {inner} itself, so a wrapper around it "
      f"would never see the layer's params. Wrap first, then lift: "
      f"nn.remat(flaxnorm.{method}(nn.{inner}))."
    )


def _transform(target: Any, specs: Mapping[str, Any], method: str) -> Any:
  if isinstance(target, type) and issubclass(target, nn.Module):
    _check_not_lifted(target, method)
    return _transform_class(target, specs)
  if isinstance(target, nn.Module):
    _check_not_lifted(type(target), method)
    cls = _transform_class(type(target), specs)
    attrs = {
      f.name: getattr(target, f.name)
      for f in dataclasses.fields(target)
      if f.init and f.name not in ("parent", "name")
    }
    if target.scope is not None:
      # Already attached (made in a compact method, or named in setup): its
      # name is taken, so run the new module in the same scope, rewound (its own
      # reservations, as the layer's next call would have), so that the layer
      # and the wrapper can both be called, in either order, sharing the params.
      return cls(**attrs, parent=target.scope.rewound())
    return cls(**attrs, parent=target.parent, name=target.name)
  hint = ""
  if type(target).__module__.startswith("flax.nnx"):
    hint = f" For NNX modules use flaxnorm.nnx.{method}."
  raise TypeError(
    f"{method}: the module (first argument) must be a flax.linen.Module class or instance, got "
    f"{target!r} of type {type(target).__name__}.{hint}"
  )


def _specs(name: Any, spec: _WeightNorm | _SpectralNorm) -> dict[Any, Any]:
  """``{name or selector: spec}`` for a public call, checking ``name`` and the axis mapping."""
  opts = spec.options
  if isinstance(opts.axis, _axes.AxisMap) and not opts.recursive:
    raise ValueError(
      f"{opts.method}: axis={dict(opts.axis.items)!r} maps submodules to axes, which needs "
      "recursive=True (the submodules' params are then normalized too)."
    )
  names = _select.parse_names(name)
  return {names: spec} if isinstance(names, _select.ParamSelector) else dict.fromkeys(names, spec)


# --------------------------------------------------------------------------- #
# Public API.
# --------------------------------------------------------------------------- #


@overload
def weight_norm(
  module: type[M],
  /,
  *,
  name: Names = ...,
  axis: AxisOption = ...,
  eps: float = ...,
  recursive: bool = ...,
  data_init: bool = ...,
  init_scale: float = ...,
) -> type[M]: ...
@overload
def weight_norm(
  module: M,
  /,
  *,
  name: Names = ...,
  axis: AxisOption = ...,
  eps: float = ...,
  recursive: bool = ...,
  data_init: bool = ...,
  init_scale: float = ...,
) -> M: ...
def weight_norm(
  module: type[M] | M,
  /,
  *,
  name: Names = "kernel",
  axis: AxisOption = "auto",
  eps: float = 1e-12,
  recursive: bool = False,
  data_init: bool = False,
  init_scale: float = 1.0,
) -> type[M] | M:
  """Reparametrizes a layer's kernel as ``w = g * v / ||v||`` (Salimans & Kingma, 2016).

  The param ``{name}`` is replaced by params ``{name}_g`` (magnitude, the
  kernel's rank with size 1 on the reduced axes) and ``{name}_v`` (direction,
  the kernel's shape), at the layer's own path. At init ``v = w`` and
  ``g = ||w||``, so the wrapped layer's output equals the plain layer's, as in
  PyTorch's ``weight_norm``.

  Args:
    module: a Linen Module class (a transformed class is returned) or instance
      (a module that behaves like it is returned); positional.
    name: the param(s) to normalize: a name (``"kernel"``, ``"embedding"``), a
      sequence of names, a compiled regular expression searched in each param's
      path below the wrapped module joined by ``/`` (``re.compile("kernel$")``),
      or a predicate ``(path, param) -> bool`` (``param`` a
      ``jax.ShapeDtypeStruct``; e.g. ``lambda path, p: p.ndim >= 2 and
      path[-1] != "bias"``: attention's biases are 2-D), to wrap a whole block
      with ``recursive=True`` and leave its biases and norm scales alone.
    axis: the kept axis or axes (PyTorch's ``dim``); the norm runs over all the
      others. ``"auto"`` (default): the layer's output-feature axes (``-1`` for
      ``Dense``/``Conv``/``ConvTranspose`` kernels ``(*window, in, out)``, the
      ``features`` axes of ``DenseGeneral``, the output axes of an ``Einsum``
      equation, ``0`` for ``nn.Embed``'s ``embedding``; the table is in the
      docs' Linen page, "Which axes"); an int or tuple of ints; ``None`` for
      a single norm of the whole tensor (``g`` of shape ``()``); a callable
      ``(module, param_name) -> axis``; or, with ``recursive=True``, a mapping
      from submodule name or path to axis (``{"query": (-2, -1), "out": -1}``),
      the others taking ``"auto"``.
    eps: lower bound on ``||v||``; a zero ``v`` gives a zero kernel with finite
      gradients.
    recursive: also normalize the params named ``name`` that the layer's
      submodules create (e.g. every ``kernel`` of the ``Dense`` layers inside
      ``nn.LSTMCell``), each at its own path.
    data_init: data-dependent init (Salimans & Kingma, 2016, §3.3): during
      ``model.init(key, batch)`` the layer computes ``t = layer(x; v/||v||)``
      without bias, sets ``g = init_scale / s`` and ``bias = -mu * init_scale / s``
      from the mean ``mu`` and std ``s`` (float32) of each output feature over
      the other axes, and returns ``g * t + bias`` to the next layer. A layer
      without bias sets only ``g``; a constant feature gets ``s = 1``. For
      ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv``, ``nn.ConvTranspose``
      whose kept axes are output features; ``apply`` never re-initializes.
    init_scale: the std of each output feature on the init batch with
      ``data_init`` (> 0, finite).

  Returns:
    The transformed class or module.

  Raises:
    TypeError: at wrap time, an option of the wrong type (``axis``, ``name``,
      a non-bool ``recursive``/``data_init``) or a module that is not a Linen
      layer.
    ValueError: at wrap time, ``eps`` or ``init_scale`` not > 0 and finite, or
      the param wrapped twice; at ``init``, a ``name`` the layer never creates,
      an ``axis`` out of range, or ``data_init=True`` on another layer, with
      kept axes that are not its output features, or on fewer than 2 values
      per output feature.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import flaxnorm
    >>> layer = flaxnorm.weight_norm(nn.Dense(3))
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> jax.tree.map(jnp.shape, variables)
    {'params': {'bias': (3,), 'kernel_g': (1, 3), 'kernel_v': (4, 3)}}
    >>> layer = flaxnorm.weight_norm(nn.Dense(3), data_init=True)
    >>> x = jax.random.normal(jax.random.key(1), (64, 4))
    >>> y, variables = layer.init_with_output(jax.random.key(0), x)
    >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-5) and jnp.allclose(y.std(0), 1, atol=1e-4))
    True

  References:
    Salimans & Kingma, "Weight Normalization: A Simple Reparameterization to
    Accelerate Training of Deep Neural Networks", NeurIPS 2016 (§3.3: the
    data-dependent init).
  """
  options = _options.WeightNormOptions(
    axis=axis, eps=eps, recursive=recursive, data_init=data_init, init_scale=init_scale
  )
  return _transform(module, _specs(name, _WeightNorm(options)), "weight_norm")


@overload
def spectral_norm(
  module: type[M],
  /,
  *,
  name: Names = ...,
  axis: AxisOption = ...,
  n_power_iterations: int = ...,
  n_init_iterations: int = ...,
  eps: float = ...,
  collection: str = ...,
  mode: str = ...,
  target: float = ...,
  operator: bool = ...,
  recursive: bool = ...,
) -> type[M]: ...
@overload
def spectral_norm(
  module: M,
  /,
  *,
  name: Names = ...,
  axis: AxisOption = ...,
  n_power_iterations: int = ...,
  n_init_iterations: int = ...,
  eps: float = ...,
  collection: str = ...,
  mode: str = ...,
  target: float = ...,
  operator: bool = ...,
  recursive: bool = ...,
) -> M: ...
def spectral_norm(
  module: type[M] | M,
  /,
  *,
  name: Names = "kernel",
  axis: AxisOption = "auto",
  n_power_iterations: int = 1,
  n_init_iterations: int = _power.DEFAULT_N_INIT_ITERATIONS,
  eps: float = 1e-12,
  collection: str = "spectral",
  mode: str = "normalize",
  target: float = 1.0,
  operator: bool = False,
  recursive: bool = False,
) -> type[M] | M:
  """Divides a layer's kernel by its spectral norm (Miyato et al., 2018).

  The param ``{name}`` stays (the unnormalized weight, PyTorch's
  ``weight_orig``); the layer uses ``w / sigma``. The power-iteration state sits
  in ``collection`` at the layer's path: ``{name}_u`` (shape ``(m,)``, ``m`` the
  size of the kept axis), ``{name}_v`` (shape ``(n,)``, the product of the
  other axes) and ``{name}_sigma`` (shape ``()``), the matrix view being
  PyTorch's ``moveaxis(w, axis, 0).reshape(m, n)``.

  * ``init``: random ``u``, ``v``, then ``n_init_iterations`` power iterations,
    so sigma is accurate from the first step.
  * ``apply`` with ``mutable=[collection]`` (training): ``n_power_iterations``
    iterations from the stored ``u``, ``v``; the new ``u``, ``v``, ``sigma`` are
    stored and that sigma is used.
  * ``apply`` without it (evaluation): no iteration; ``sigma = u^T W v`` from
    the stored vectors; nothing changes.

  Iterations run in a ``jax.lax.fori_loop`` (compile time does not grow with
  their number) and carry no gradient; ``sigma`` is differentiable in ``W``.
  The random start draws from the ``'spectral'`` rng stream if given to
  ``init``, else from ``'params'``.

  Args:
    module: a Linen Module class or instance (see :func:`weight_norm`); positional.
    name: the param(s) to normalize (at least 2-D each): names, a regex or a
      predicate, as in :func:`weight_norm`.
    axis: the kept (output) axis or axes, the rows of the matrix view
      (product of the kept axes) x (product of the others). ``"auto"``
      (default): the layer's output-feature axes, as in :func:`weight_norm`, for
      which sigma is the layer's own norm (``DenseGeneral``, ``Einsum`` and
      attention projections included); an explicit axis, a callable or (with
      ``recursive=True``) a mapping as in :func:`weight_norm`.
    n_power_iterations: iterations per training call (>= 1).
    n_init_iterations: iterations at init (>= 0).
    eps: norms at or below ``eps`` count as zero; a zero kernel stays zero.
    collection: the variable collection holding the state.
    mode: ``"normalize"`` uses ``w * target / sigma`` (spectral norm
      ``target``); ``"clip"`` uses ``w * min(1, target / sigma)``, shrinking
      only kernels whose spectral norm exceeds ``target`` (a ``target``-Lipschitz
      layer that may stay below it; Gouk et al., 2021).
    target: the spectral norm to normalize (or clip) to; > 0, finite.
    operator: ``False`` (PyTorch's behaviour): sigma is the norm of the
      kernel's matrix view. ``True``: power iteration runs through the layer's
      own linear map on one example (``x -> layer(x) - layer(0)`` and its
      transpose), so sigma is the norm of what the layer computes, e.g. a
      convolution's true operator norm with its strides, padding, dilation and
      groups (Farnia et al., 2019; Gouk et al., 2021). Then ``{name}_u`` has
      the shape of one output example and ``{name}_v`` of one input example
      (batch 1), fixed at init; sigma is exact for that input size; evaluation
      uses the stored sigma. The layer must be linear in its input (checked at
      init).
    recursive: also normalize the params named ``name`` of the layer's
      submodules (see :func:`weight_norm`).

  Returns:
    The transformed class or module.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import flaxnorm
    >>> layer = flaxnorm.spectral_norm(nn.Dense(3))
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> jax.tree.map(jnp.shape, variables)
    {'params': {'bias': (3,), 'kernel': (4, 3)}, 'spectral': {'kernel_sigma': (), 'kernel_u': (3,), 'kernel_v': (4,)}}
    >>> y, updates = layer.apply(variables, jnp.ones((1, 4)), mutable=['spectral'])  # train
    >>> y = layer.apply({**variables, **updates}, jnp.ones((1, 4)))  # eval

  References:
    Miyato, Kataoka, Koyama & Yoshida, "Spectral Normalization for Generative
    Adversarial Networks", ICLR 2018.
  """
  options = _options.SpectralNormOptions(
    axis=axis,
    n_power_iterations=n_power_iterations,
    n_init_iterations=n_init_iterations,
    eps=eps,
    collection=collection,
    mode=mode,
    target=target,
    operator=operator,
    recursive=recursive,
  )
  return _transform(module, _specs(name, _SpectralNorm(options)), "spectral_norm")
