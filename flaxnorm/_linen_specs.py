"""What a normalized Linen layer does when it asks for a wrapped param: the specs.

Each transform's spec, called by the normalized class's ``param`` method with
the layer, the param's name and a function creating the raw param, returns
``(raw param, base, scale)``: the kernel the layer uses is ``base * scale``,
with ``scale`` a scalar (spectral norm) or of shape ``(1, ..., out)`` (weight
norm), so that ``flaxnorm.linen`` can move the scale to a linear layer's
output. The spectral state's train/eval logic and its creation at init are
here; the class mechanics are in ``flaxnorm.linen``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from flax.core import meta
from flax.core import scope as core_scope

from flaxnorm import (
  _axes,
  _checks,
  _linen_data_init,
  _linen_operator,
  _linen_scan,
  _math,
  _operator,
  _options,
  _power,
  _subclass,
)

#: Creates a raw (possibly boxed) param with the layer's initializer, by name.
_Create = Callable[[str], Any]
#: ``(raw param, base, scale)``: the layer's kernel is ``base * scale``.
_Factors = tuple[Any, jax.Array, jax.Array]


def describe(module: nn.Module, name: str) -> str:
  path = "/".join(str(p) for p in module.scope.path) if module.scope is not None else ""
  return f"param '{name}' of layer '{path or '<top level>'}' ({type(module).__name__})"


def _kept_axis(options: Any, module: nn.Module, name: str, at: str) -> _checks.Axis:
  """The explicit axis the options' ``axis`` means for ``module``'s param ``name``."""
  args, kwargs = module.__dict__.get(_linen_operator.INPUTS, ((), {}))
  # nn.Einsum takes its equation as the call's second argument, too.
  call = {"einsum_str": kwargs.get("einsum_str", args[1] if len(args) > 1 else None)}
  # An axis mapping was resolved for each submodule; the root's own params take the default.
  axis = _axes.AUTO if isinstance(options.axis, _axes.AxisMap) else options.axis
  return _axes.resolve(axis, module, name, at, call)


def _rebox(raw: Any, value: Any, names: tuple | None) -> Any:
  """Boxes ``value`` like ``raw`` (e.g. ``nn.Partitioned``) with new axis names."""
  if names is not None and isinstance(raw, meta.Partitioned):
    return dataclasses.replace(raw, value=value, names=names)
  return value


def _axis_names(raw: Any) -> tuple | None:
  return tuple(raw.names) if isinstance(raw, meta.Partitioned) else None


def _check_pair_present(module: nn.Module, name: str, keys: tuple[str, str], at: str) -> None:
  """Where params are read-only, raises unless they hold both ``{name}_g`` and ``{name}_v``.

  (Where they are mutable, init or ``apply(..., mutable=True)``, Flax creates them.)
  """
  if module.is_mutable_collection("params") or all(module.has_variable("params", k) for k in keys):
    return
  plain = module.has_variable("params", name)
  raise ValueError(
    f"weight_norm: {at} needs params {list(keys)}, found "
    f"{[k for k in (*keys, name) if module.has_variable('params', k)]}"
    + (
      f": these are the plain layer's params. Convert them with "
      f"flaxnorm.tree.weight_norm_init(params, name='{name}') (the same output), or init "
      "the wrapped layer."
      if plain
      else ". Pass the full variables from init()."
    )
  )


def _check_no_plain(module: nn.Module, name: str, keys: tuple[str, str], at: str) -> None:
  """Raises if params hold a plain ``{name}`` where weight norm makes ``{name}_g``, ``{name}_v``."""
  if not module.has_variable("params", name):
    return
  raise ValueError(
    f"weight_norm: {at} finds a plain '{name}' param where it keeps {list(keys)}: the same "
    "layer instance is also called unwrapped or with spectral norm, or the variables mix "
    f"plain and weight-normed params. Weight norm replaces '{name}' by {list(keys)}, so one "
    "layer cannot have both: wrap the instance once and call the wrapped module wherever "
    "the layer is used (or convert plain params with flaxnorm.tree.weight_norm_init)."
  )


@dataclasses.dataclass(frozen=True)
class WeightNormSpec(_subclass.SpecBase):
  options: _options.WeightNormOptions

  def __call__(self, module: nn.Module, name: str, create_param: _Create) -> _Factors:
    at = describe(module, name)
    axis = _kept_axis(self.options, module, name, at)
    g_key, v_key = _options.weight_norm_keys(name)
    _check_pair_present(module, name, (g_key, v_key), at)
    _check_no_plain(module, name, (g_key, v_key), at)
    raw_v = create_param(v_key)
    v = meta.unbox(raw_v)
    _checks.check_float_array(v, "the param", at)
    kept = _checks.normalize_axes(axis, v.ndim, at)
    names = _axis_names(raw_v)

    def init_g():
      g, _ = _math.weight_norm_decompose(v, axis)
      if names is None:
        return g
      g_names = () if axis is None else tuple(n if i in kept else None for i, n in enumerate(names))
      return _rebox(raw_v, g, g_names)

    initialize = (
      self.options.data_init
      and module.is_initializing()
      and not module.has_variable("params", g_key)  # a shared layer's later calls: as set
    )
    g = module.variable("params", g_key, init_g).value
    if initialize:
      # The layer gets the unit-norm direction; _call then sets g from its output.
      init = module.__dict__.get("_flaxnorm_output_scale")
      g_shape = meta.unbox(g).shape
      return raw_v, v, _linen_data_init.start(init, at, g_key, kept, v, g_shape, self.options.eps)
    _checks.check_g_fits(
      jax.numpy.shape(meta.unbox(g)), v.shape, None if axis is None else kept, g_key, at
    )
    return raw_v, v, _math.weight_norm_scale(g, v, self.options.eps)


@dataclasses.dataclass(frozen=True)
class SpectralNormSpec(_subclass.SpecBase):
  options: _options.SpectralNormOptions

  def __call__(self, module: nn.Module, name: str, create_param: _Create) -> _Factors:
    opts, at = self.options, describe(module, name)
    raw_w = create_param(name)
    w = meta.unbox(raw_w)
    kept = _checks.check_spectral_weight(w, _kept_axis(opts, module, name, at), at)
    keys = _options.spectral_keys(name)
    layer_map = _linen_operator.LayerMap(module, name, at) if opts.operator else None
    stored = self._stored_state(module, w, kept, keys, layer_map, at)
    if stored is None:
      state = self._create_state(module, raw_w, w, kept, keys, layer_map, at)
      train = fresh = False  # the state was just converged
    else:
      state, train, fresh = stored
    if layer_map is None:
      n_steps = opts.n_power_iterations if train else 0
      scale, new = _power.spectral_scale(
        w,
        state.u,
        state.v,
        sigma=state.sigma,
        axis=kept,
        n_steps=n_steps,
        eps=opts.eps,
        mode=opts.mode,
        target=opts.target,
      )
    elif train:
      scale, new = _operator.iterate(w, state, layer_map.linear, opts)
    elif fresh:  # sigma of this apply's step, differentiable
      scale, new = _operator.fresh_scale(w, state, layer_map.linear, opts), state
    else:
      scale, new = _operator.eval_scale(state.sigma, opts), state
    if train:
      for key, value in zip(keys, new):
        raw = module.get_variable(opts.collection, key)
        boxed = raw.replace_boxed(value) if isinstance(raw, meta.AxisMetadata) else value
        module.put_variable(opts.collection, key, boxed)
      _linen_scan.mark_fresh(module, new.u)
    return raw_w, w, scale

  def _stored_state(
    self,
    module: nn.Module,
    w: jax.Array,
    kept: tuple[int, ...],
    keys: tuple,
    layer_map: _linen_operator.LayerMap | None,
    at: str,
  ) -> tuple[_power.SpectralState, bool, bool] | None:
    """``(checked stored state, train, fresh)``, or ``None`` at init (to create it).

    ``fresh``: a scan's loop reading the state its first trace stored, used as
    it is (see flaxnorm._linen_scan).
    """
    opts = self.options
    present = [module.has_variable(opts.collection, k) for k in keys]
    if all(present):
      state = _power.SpectralState(
        *(meta.unbox(module.get_variable(opts.collection, k)) for k in keys)
      )
      if layer_map is None:
        shapes = (state.u.shape, state.v.shape, jax.numpy.shape(state.sigma))
        _checks.check_state_fits(w.shape, kept, shapes, keys, at)
      else:
        _operator.check_input_shape(state.v.shape, layer_map.example.shape, keys, at)
      # Training (collection mutable) iterates and stores; evaluation uses the
      # stored vectors and changes nothing.
      fresh = _linen_scan.take_fresh(module, state.u)
      return state, module.is_mutable_collection(opts.collection) and not fresh, fresh
    lifts = _linen_scan.lifted_by(module)
    if not any(present) and lifts and not module.is_mutable_collection(opts.collection):
      raise _linen_scan.not_lifted_error(self.method, at, opts.collection, lifts)
    if any(present) or not module.is_initializing():
      raise ValueError(
        f"spectral_norm: the state of {at} is missing from the "
        f"'{opts.collection}' collection (found {[k for k, p in zip(keys, present) if p]}, "
        f"need {list(keys)}). Pass the full variables from init(), "
        f"e.g. apply({{'params': ..., '{opts.collection}': ...}}, ...)."
      )
    return None

  def _create_state(
    self,
    module: nn.Module,
    raw_w: Any,
    w: jax.Array,
    kept: tuple[int, ...],
    keys: tuple,
    layer_map: _linen_operator.LayerMap | None,
    at: str,
  ) -> _power.SpectralState:
    """The converged start state, stored boxed like the kernel (sharding metadata)."""
    opts = self.options
    key = _state_key(module, keys[0])
    names = _axis_names(raw_w)
    if layer_map is None:
      state = _power.spectral_state_init(
        key, w, axis=kept, n_steps=opts.n_init_iterations, eps=opts.eps
      )
      # u lies along the kept axis; with several kept axes it has no one name.
      u_names = None if names is None else ((names[kept[0]],) if len(kept) == 1 else (None,))
    else:
      _operator.check_real_kernel(w, at)
      layer_map.check_linear(tuple(w.shape), at)
      state = _operator.init_state(key, w, layer_map.linear, layer_map.example.shape, opts)
      u_names = None if names is None else (None,) * state.u.ndim
    v_names = None if names is None else (None,) * state.v.ndim
    boxes = (
      _rebox(raw_w, state.u, u_names),
      _rebox(raw_w, state.v, v_names),
      _rebox(raw_w, state.sigma, None if names is None else ()),
    )
    for key, box in zip(keys, boxes):
      module.variable(opts.collection, key, lambda b=box: b)
    _linen_scan.mark_fresh(module, state.u)
    return state


def _state_key(module: nn.Module, tag: str) -> jax.Array:
  """The random start's key: the ``'spectral'`` stream, else one derived from ``'params'``.

  Derived, not drawn: ``make_rng('params')`` would advance the layer's params
  stream, so a param the layer creates after its kernel (a bias with a random
  init) would differ from the plain layer's.
  """
  if module.has_rng("spectral"):
    return module.make_rng("spectral")
  scope = module.scope
  assert scope is not None
  if not scope.has_rng("params"):
    return module.make_rng("params")  # Flax's own error names the missing stream
  return core_scope.LazyRng.create(scope.rngs["params"], "flaxnorm", tag).as_jax_rng()
