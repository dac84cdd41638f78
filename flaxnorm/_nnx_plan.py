"""Planning the NNX transforms: every check and all the math first, then one commit.

A failing layer leaves every module untouched, also in ``wrap_modules``: each
``_plan_*`` function checks a module and computes its new variables, and returns
a ``commit`` that only mutates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx
from jax.core import Tracer

from flaxnorm import (
  _axes,
  _checks,
  _math,
  _nnx_ensemble,
  _operator,
  _options,
  _power,
  _select,
  _subclass,
)
from flaxnorm._nnx_layer import (
  FLAG,
  SpectralNormSpec,
  WeightNormSpec,
  describe,
  operator_map,
  path_str,
  remember_path,
  swap_class,
)

PathParts = tuple[Any, ...]
#: Param names as checked by the face, or a regex / predicate selector.
Names = tuple[str, ...] | _select.ParamSelector
Rngs = nnx.Rngs | jax.Array | int | None

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

  Examples:
    >>> from flax import nnx
    >>> import flaxnorm.nnx
    >>> layer = flaxnorm.nnx.spectral_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    >>> sorted(nnx.to_pure_dict(nnx.state(layer, flaxnorm.nnx.SpectralStateVar)))
    ['kernel_sigma', 'kernel_u', 'kernel_v']
  """


SpectralStateVar.__module__ = "flaxnorm.nnx"  # its public home: pickles find it there


def check_module(module: Any, method: str) -> None:
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


def iter_modules(model: nnx.Module) -> list[tuple[PathParts, nnx.Module]]:
  """Each module of ``model`` once (a shared layer at its first path), with its path."""
  seen: set[int] = set()
  out = []
  for path, module in nnx.iter_modules(model):
    if id(module) not in seen:
      seen.add(id(module))
      out.append((tuple(path), module))
  return out


def param_names(module: nnx.Module) -> list[str]:
  return sorted(k for k, x in vars(module).items() if isinstance(x, nnx.Param))


def select_names(
  module: nnx.Module, path: PathParts | None, names: Names, method: str, required: bool = True
) -> tuple[str, ...]:
  """The param names ``names`` picks on ``module``: names as given, or a selector's matches.

  A selector sees each ``nnx.Param`` attribute that flaxnorm did not create, at
  its path below the wrapped module (``wrap_modules``: below the model).
  """
  if not isinstance(names, _select.ParamSelector):
    return names
  specs = _subclass.specs_of(type(module))
  own = {a for n, s in specs.items() for a in s.attrs(n)}
  params = {k: x for k, x in vars(module).items() if isinstance(x, nnx.Param) and k not in own}
  prefix = tuple(str(p) for p in path or ())
  hits = tuple(k for k in sorted(params) if names.matches((*prefix, k), lambda k=k: params[k][...]))
  if not hits and required:
    where = type(module).__name__
    where = where if path is None else f"layer '{path_str(path)}' ({where})"
    raise ValueError(
      f"{method}: name={names!r} matched no param of {where}. "
      f"Its params are {['/'.join((*prefix, k)) for k in sorted(params)]}."
    )
  return hits


def _check_param(module: nnx.Module, name: str, method: str, path: PathParts | None) -> nnx.Param:
  at = describe(module, name, path)
  specs = _subclass.specs_of(type(module))
  if name in specs:
    raise ValueError(
      f"{method}: {at} is already wrapped by {specs[name].method}; a param can be "
      "normalized only once."
    )
  owner = next((n for n, s in specs.items() if name in s.attrs(n)), None)
  if owner is not None:
    raise ValueError(
      f"{method}: {at} belongs to {specs[owner].method} of param '{owner}' (flaxnorm made "
      "it); a param can be normalized only once."
    )
  var = vars(module).get(name)
  if var is None:
    hint = " (e.g. name='embedding' for nnx.Embed)" if isinstance(module, nnx.Embed) else ""
    if isinstance(module, _FLAX_WRAPPERS):
      hint = " (this is Flax's own wrapper: apply flaxnorm to the plain layer instead)"
    inner = sorted({type(m).__name__ for p, m in nnx.iter_modules(module) if p and param_names(m)})
    if inner and not param_names(module) and not isinstance(module, _FLAX_WRAPPERS):
      raise ValueError(
        f"{method}: {at} does not exist: {type(module).__name__} holds no params itself, "
        f"its submodules ({', '.join(inner)}) do. Wrap those: flaxnorm.nnx.wrap_modules("
        f"model, flaxnorm.nnx.{method}, where=nnx.{inner[0]}), or wrap each layer."
      )
    raise ValueError(
      f"{method}: {at} does not exist. Its params are {param_names(module)}; pass "
      f"one of them as name=...{hint}."
    )
  if not isinstance(var, nnx.Param):
    raise TypeError(
      f"{method}: {at} must be an nnx.Param, got {type(var).__name__}; only "
      "trainable params can be normalized."
    )
  return var


def _check_free(module: nnx.Module, attrs: Sequence[str], method: str, path, name: str) -> None:
  taken = [a for a in attrs if a in vars(module) or hasattr(type(module), a)]
  if taken:
    raise ValueError(
      f"{method}: cannot wrap {describe(module, name, path)}: {taken} already exist on the "
      "layer (already wrapped?)."
    )


def plan_weight_norm(
  module: nnx.Module,
  path: PathParts | None,
  names: Names,
  options: _options.WeightNormOptions,
  ensemble_axis: int | None = None,
) -> Callable[[], None]:
  check_module(module, "weight_norm")
  new: dict[str, tuple[nnx.Variable, nnx.Variable]] = {}
  specs: dict[str, WeightNormSpec] = {}
  for name in select_names(module, path, names, "weight_norm"):
    at = describe(module, name, path)
    var = _check_param(module, name, "weight_norm", path)
    w = var[...]
    _checks.check_float_array(w, "the param", at)
    _nnx_ensemble.check_stacking(module, name, w, ensemble_axis, "weight_norm", at)
    axis = _axes.resolve(options.axis, module, name, at)
    opts = dataclasses.replace(options, axis=axis)
    spec = specs[name] = WeightNormSpec(opts, _nnx_ensemble.member_rank(w, ensemble_axis))
    _check_free(module, spec.attrs(name), "weight_norm", path, name)
    if ensemble_axis is None:
      kept = _checks.normalize_axes(axis, w.ndim, at)
      g, _ = _math.weight_norm_decompose(w, axis)
    else:  # each member its own g; its axes count after the ensemble axis
      kept = (0, *(k + 1 for k in _nnx_ensemble.member_axes(axis, w, at, False)))
      g = _nnx_ensemble.weight_norm_g(w, opts)
    axis_names = _sharding_names(var)
    meta = {}
    if axis_names is not None:  # g: the kept axes' names (none for axis=None's scalar)
      g_names = tuple(n if i in kept else None for i, n in enumerate(axis_names))
      meta["out_sharding"] = g_names if axis is not None else ()
    # v is the original Param object: same metadata, same identity.
    new[name] = (var.copy(g, **meta), var)

  def commit() -> None:
    if path is not None:
      remember_path(module, path)
    all_specs = _subclass.specs_of(type(module))
    for name in specs:
      delattr(module, name)  # before the swap: the subclass computes `name`
      all_specs[name] = specs[name]
    swap_class(module, all_specs)
    for name, (g, v) in new.items():
      g_attr, v_attr = specs[name].attrs(name)
      setattr(module, g_attr, g)
      setattr(module, v_attr, v)

  return commit


def _sharding_names(var: nnx.Variable) -> tuple[Any, ...] | None:
  """The param's axis names for sharding (``nnx.with_partitioning``), if any."""
  names = var.get_metadata("out_sharding", None)
  return tuple(names) if isinstance(names, tuple) else None


def _state_metadata(
  var: nnx.Variable, kept: tuple[int, ...], state: _power.SpectralState, stacked: bool
) -> tuple[dict[str, Any], ...]:
  """Sharding metadata of ``u``, ``v`` and ``sigma``, as Linen boxes them.

  ``u`` lies along the kept axis (``kept`` counts the whole param's axes) and
  takes its name when there is one kept axis; everything else is replicated,
  but for the ensemble axis of a stacked param.
  """
  names = _sharding_names(var)
  if names is None:
    return {}, {}, {}
  lead = names[:1] if stacked else ()
  u_rest = state.u.ndim - len(lead)
  u_names = (
    (*lead, names[kept[0]]) if len(kept) == 1 and u_rest == 1 else (*lead, *(None,) * u_rest)
  )
  v_names = (*lead, *(None,) * (state.v.ndim - len(lead)))
  mesh = {"mesh": m} if (m := var.get_metadata("mesh", None)) is not None else {}
  return tuple({"out_sharding": n, **mesh} for n in (u_names, v_names, lead))


def _operator_example(
  module: nnx.Module, input_shape: tuple[int, ...] | None, at: str
) -> tuple[int, ...]:
  """One input example's shape ``(1, *input_shape)``, checked: the layer takes it, linearly."""
  if input_shape is None:
    raise ValueError(
      f"spectral_norm(operator=True): {at} needs input_shape=..., the shape of one input "
      "example without the batch axis (e.g. input_shape=(32, 32, 3) for an nnx.Conv on "
      "32x32 RGB images): NNX builds layers without inputs."
    )
  spatial = getattr(module, "kernel_size", None)  # nnx.Conv, nnx.ConvTranspose
  if isinstance(spatial, Sequence) and len(input_shape) != len(spatial) + 1:
    raise ValueError(
      f"spectral_norm(operator=True): {at} takes input_shape=(*spatial, features), "
      f"{len(spatial) + 1} dims for its {len(spatial)} spatial dims, got {input_shape}: one "
      "example, without the batch axis (sigma is the norm for one example)."
    )
  example = (1, *input_shape)
  try:
    jax.eval_shape(module, jax.ShapeDtypeStruct(example, jax.numpy.float32))
  except Exception as e:  # the layer's own error says what it expected
    raise ValueError(
      f"spectral_norm(operator=True): {at} cannot take input_shape={input_shape} "
      f"(inputs of shape {example}): {type(e).__name__}: {e}"
    ) from None
  _operator.check_linear(lambda x: module(x), example, at)
  return example


def _concrete_copy(module: nnx.Module) -> nnx.Module:
  """A copy of ``module`` whose traced values are concrete stand-ins of their shapes.

  The linearity checks run on concrete values, also when the layer is built under
  ``nnx.jit`` or ``nnx.eval_shape`` (abstract params): they do not depend on
  the params' values, so fixed values stand in (``_operator.stand_in``; split
  fixed keys for keys).
  """
  graphdef, state = nnx.split(module)

  def stand_in(leaf: Any) -> Any:
    if not isinstance(leaf, Tracer):
      return leaf
    with jax.ensure_compile_time_eval():
      if jax.numpy.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.random.split(jax.random.key(2), leaf.shape)
      return jax.numpy.asarray(_operator.stand_in(leaf.shape, leaf.dtype))

  return nnx.merge(graphdef, jax.tree.map(stand_in, state))


def _copy_map(module: nnx.Module, name: str) -> _operator.Linear:
  """``w -> (x -> A_w x)`` through a copy of the not yet wrapped layer given kernel ``w``.

  For the init-time check that the layer is linear in its kernel (the wrapped
  layer's :func:`operator_map` reads ``w`` only once the class is swapped).
  ``module`` must hold concrete values (see :func:`_concrete_copy`).
  """

  def with_kernel(w: jax.Array) -> Callable[[jax.Array], jax.Array]:
    copy = nnx.clone(module)
    var = vars(copy)[name]
    var[...] = w.astype(var[...].dtype)  # the check's float32 kernel, as the param's dtype
    return lambda x: jax.jvp(lambda z: copy(z), (jax.numpy.zeros_like(x),), (x,))[1]

  return with_kernel


def make_key_source(rngs: Rngs, method: str) -> Callable[[int], jax.Array]:
  if isinstance(rngs, nnx.Rngs):
    if not any(stream in rngs for stream in ("spectral", "params", "default")):
      raise ValueError(
        f"{method}: rngs needs a 'spectral', 'params' or default stream for the start "
        f"vectors, got an nnx.Rngs without one (e.g. nnx.Rngs(0) or nnx.Rngs(params=0))."
      )
    # Linen draws from a 'spectral' stream when given one, else from 'params'.
    return lambda _: rngs["spectral"]() if "spectral" in rngs else rngs.params()
  if rngs is None:
    rngs = 0
  if isinstance(rngs, int) and not isinstance(rngs, bool):
    if not -(2**63) <= rngs < 2**64:
      raise ValueError(f"{method}: an int seed for rngs must fit in 64 bits, got {rngs}.")
    key = jax.random.key(rngs)
  elif isinstance(rngs, jax.Array):
    key = _checks.check_key(rngs, "rngs", method)
  else:
    raise TypeError(
      f"{method}: rngs must be an nnx.Rngs, a PRNG key, an int seed or None, got "
      f"{type(rngs).__name__}."
    )
  return lambda i: jax.random.fold_in(key, i) if i else key


def plan_spectral_norm(
  module: nnx.Module,
  path: PathParts | None,
  names: Names,
  options: _options.SpectralNormOptions,
  next_key: Callable[[int], jax.Array],
  input_shape: tuple[int, ...] | None = None,
  ensemble_axis: int | None = None,
) -> Callable[[], None]:
  check_module(module, "spectral_norm")
  has_flag = hasattr(module, FLAG)
  others = [s for s in _subclass.specs_of(type(module)).values() if isinstance(s, SpectralNormSpec)]
  # Every spectral spec of a module records whether flaxnorm owns the flag, so
  # removing the last one knows whether to delete it.
  added = any(s.added_flag for s in others) if others else not has_flag
  states, specs, metas = {}, {}, {}
  for i, name in enumerate(select_names(module, path, names, "spectral_norm")):
    at = describe(module, name, path)
    var = _check_param(module, name, "spectral_norm", path)
    w = var[...]
    _checks.check_float_array(w, "the param", at)
    _nnx_ensemble.check_stacking(module, name, w, ensemble_axis, "spectral_norm", at)
    member_ndim = _nnx_ensemble.member_rank(w, ensemble_axis)
    axis = _axes.resolve(options.axis, module, name, at)
    opts = dataclasses.replace(options, axis=axis)
    spec = specs[name] = SpectralNormSpec(opts, added, input_shape, member_ndim)
    _check_free(module, spec.attrs(name), "spectral_norm", path, name)
    if ensemble_axis is not None:
      if options.operator:
        raise ValueError(
          f"spectral_norm: operator=True does not support ensemble_axis (at {at}); wrap "
          "each member inside the vmapped constructor instead."
        )
      kept = _nnx_ensemble.member_axes(axis, w, at, True)
      states[name] = _nnx_ensemble.spectral_state_init(next_key(i), w, kept, opts)
      metas[name] = _state_metadata(var, tuple(k + 1 for k in kept), states[name], True)
      continue
    kept = _checks.check_spectral_weight(w, axis, at)
    if options.operator:
      _operator.check_real_kernel(w, at)
      probe = _concrete_copy(module)
      example = _operator_example(probe, input_shape, at)
      _operator.check_kernel_linear(_copy_map(probe, name), tuple(w.shape), example, at)
      linear = operator_map(module, name)
      states[name] = _operator.init_state(next_key(i), w, linear, example, options)
    else:
      states[name] = _power.spectral_state_init(
        next_key(i), w, axis=kept, n_steps=options.n_init_iterations, eps=options.eps
      )
    metas[name] = _state_metadata(var, kept, states[name], False)

  def commit() -> None:
    if path is not None:
      remember_path(module, path)
    all_specs = _subclass.specs_of(type(module))
    all_specs.update(specs)
    swap_class(module, all_specs)
    for name, state in states.items():
      for attr, value, meta in zip(specs[name].attrs(name), state, metas[name]):
        setattr(module, attr, _state_variable(value, meta))
    if not has_flag:
      setattr(module, FLAG, False)  # starts in training mode, like nnx.BatchNorm

  return commit


def _state_variable(value: jax.Array, meta: dict[str, Any]) -> SpectralStateVar:
  """A state Variable with its sharding names, sharded by them where there is a mesh.

  Under a mesh (the context's, or the kernel's own) NNX shards it eagerly, as it does
  ``kernel_g``: an ``Explicit`` mesh requires an array's sharding to match its names.
  Without one (a layer made under a mesh, wrapped outside it) the names are metadata
  only, as Linen's boxes, for ``nnx.get_partition_spec``.
  """
  if meta and ("mesh" in meta or not jax.sharding.get_abstract_mesh().empty):
    return SpectralStateVar(value, **meta)
  var = SpectralStateVar(value)
  if meta:
    var.set_metadata(**meta)
  return var


def offset(source: Callable[[int], jax.Array], start: int) -> Callable[[int], jax.Array]:
  return lambda i: source(start + i)
