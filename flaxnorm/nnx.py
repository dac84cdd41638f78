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

import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
from flax import nnx

from flaxnorm import _checks, _math, _operator, _options, _subclass
from flaxnorm._checks import Axis
from flaxnorm._nnx_layer import (
  FLAG,
  SpectralNormSpec,
  WeightNormSpec,
  describe,
  operator_map,
  path_str,
  swap_class,
)

__all__ = (
  "SpectralStateVar",
  "remove_spectral_norm",
  "remove_weight_norm",
  "spectral_norm",
  "spectral_sigmas",
  "weight_norm",
  "wrap_modules",
)

M = TypeVar("M", bound=nnx.Module)
PathParts = tuple[Any, ...]
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
  at = describe(module, name, path)
  specs = _subclass.specs_of(type(module))
  if name in specs:
    raise ValueError(
      f"{method}: {at} is already wrapped by {specs[name].method}; a param can be "
      "normalized only once."
    )
  var = vars(module).get(name)
  if var is None:
    hint = " (e.g. name='embedding' for nnx.Embed)" if isinstance(module, nnx.Embed) else ""
    if isinstance(module, _FLAX_WRAPPERS):
      hint = " (this is Flax's own wrapper: apply flaxnorm to the plain layer instead)"
    raise ValueError(
      f"{method}: {at} does not exist. Its params are {_param_names(module)}; pass "
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


def _plan_weight_norm(
  module: nnx.Module,
  path: PathParts | None,
  names: tuple[str, ...],
  options: _options.WeightNormOptions,
) -> Callable[[], None]:
  spec = WeightNormSpec(options)
  _check_module(module, "weight_norm")
  new: dict[str, tuple[nnx.Variable, nnx.Variable]] = {}
  for name in names:
    at = describe(module, name, path)
    var = _check_param(module, name, "weight_norm", path)
    _check_free(module, spec.attrs(name), "weight_norm", path, name)
    w = var[...]
    _checks.check_float_array(w, "the param", at)
    kept = _checks.normalize_axes(options.axis, w.ndim, at)
    g, _ = _math.weight_norm_decompose(w, options.axis)
    meta = {}
    sharding = var.get_metadata("out_sharding", None)
    if sharding is not None and options.axis is not None:
      meta["out_sharding"] = tuple(s if i in kept else None for i, s in enumerate(sharding))
    elif sharding is not None:
      meta["out_sharding"] = ()
    # v is the original Param object: same metadata, same identity.
    new[name] = (var.copy(g, **meta), var)

  def commit() -> None:
    specs = _subclass.specs_of(type(module))
    for name in names:
      delattr(module, name)  # before the swap: the subclass computes `name`
      specs[name] = spec
    swap_class(module, specs)
    for name, (g, v) in new.items():
      g_attr, v_attr = spec.attrs(name)
      setattr(module, g_attr, g)
      setattr(module, v_attr, v)

  return commit


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
  options: _options.SpectralNormOptions,
  next_key: Callable[[int], jax.Array],
  input_shape: tuple[int, ...] | None = None,
) -> Callable[[], None]:
  _check_module(module, "spectral_norm")
  has_flag = hasattr(module, FLAG)
  others = [s for s in _subclass.specs_of(type(module)).values() if isinstance(s, SpectralNormSpec)]
  # Every spectral spec of a module records whether flaxnorm owns the flag, so
  # removing the last one knows whether to delete it.
  added = any(s.added_flag for s in others) if others else not has_flag
  spec = SpectralNormSpec(options, added_flag=added, input_shape=input_shape)
  states = {}
  for i, name in enumerate(names):
    at = describe(module, name, path)
    var = _check_param(module, name, "spectral_norm", path)
    _check_free(module, spec.attrs(name), "spectral_norm", path, name)
    w = var[...]
    kept = _checks.check_spectral_weight(w, options.axis, at)
    if options.operator:
      example = _operator_example(module, input_shape, at)
      linear = operator_map(module, name)
      states[name] = _operator.init_state(next_key(i), w, linear, example, options)
    else:
      states[name] = _math.spectral_state_init(
        next_key(i), w, axis=kept, n_steps=options.n_init_iterations, eps=options.eps
      )

  def commit() -> None:
    specs = _subclass.specs_of(type(module))
    specs.update(dict.fromkeys(names, spec))
    swap_class(module, specs)
    for name, state in states.items():
      for attr, value in zip(spec.attrs(name), state):
        setattr(module, attr, SpectralStateVar(value))
    if not has_flag:
      setattr(module, FLAG, False)  # starts in training mode, like nnx.BatchNorm

  return commit


# --------------------------------------------------------------------------- #
# Public API.
# --------------------------------------------------------------------------- #


def weight_norm(
  module: M,
  /,
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

  References:
    Salimans & Kingma, "Weight Normalization: A Simple Reparameterization to
    Accelerate Training of Deep Neural Networks", NeurIPS 2016.
  """
  names = _checks.check_names(name)
  options = _options.WeightNormOptions(axis=axis, eps=eps)
  _plan_weight_norm(module, None, names, options)()
  return module


def spectral_norm(
  module: M,
  /,
  *,
  name: str | Sequence[str] = "kernel",
  axis: Axis = -1,
  n_power_iterations: int = 1,
  n_init_iterations: int = _math.DEFAULT_N_INIT_ITERATIONS,
  eps: float = 1e-12,
  mode: str = "normalize",
  target: float = 1.0,
  operator: bool = False,
  input_shape: Sequence[int] | None = None,
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
    mode: ``"normalize"`` uses ``W * target / sigma``; ``"clip"`` uses
      ``W * min(1, target / sigma)`` (only kernels with spectral norm above
      ``target`` shrink; Gouk et al., 2021).
    target: the spectral norm to normalize (or clip) to; > 0, finite.
    operator: ``True``: power iteration runs through the layer's own linear
      map on one example (its ``__call__`` and, by ``jax.vjp``, its transpose),
      so sigma is the norm of what the layer computes, e.g. a convolution's
      true operator norm (see :func:`flaxnorm.spectral_norm`). Needs
      ``input_shape``. ``{name}_u``/``{name}_v`` then have the shapes of one
      output/input example; evaluation uses the stored sigma.
    input_shape: operator mode: the shape of one input example without the
      batch axis, e.g. ``(32, 32, 3)`` for an ``nnx.Conv`` on 32x32 RGB images
      (NNX builds layers without inputs, so it must be given).
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

  References:
    Miyato, Kataoka, Koyama & Yoshida, "Spectral Normalization for Generative
    Adversarial Networks", ICLR 2018.
  """
  names = _checks.check_names(name)
  options = _options.SpectralNormOptions(
    axis=axis,
    n_power_iterations=n_power_iterations,
    n_init_iterations=n_init_iterations,
    eps=eps,
    mode=mode,
    target=target,
    operator=operator,
  )
  keys = _make_key_source(rngs, "spectral_norm")
  shape = _checks.check_shape(input_shape, "input_shape", "spectral_norm")
  _plan_spectral_norm(module, None, names, options, keys, shape)()
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
    found = [f"{path_str(p)} ({type(m).__name__})" for p, m in modules]
    raise ValueError(
      f"wrap_modules: no submodule matches where={where!r}. The modules are {found}."
    )
  names = _checks.check_names(args["name"])
  if method == "weight_norm":
    wn = _options.WeightNormOptions(axis=args["axis"], eps=args["eps"])
    commits = [_plan_weight_norm(m, p, names, wn) for p, m in chosen]
  else:
    option_names = (
      "axis", "n_power_iterations", "n_init_iterations", "eps", "mode", "target", "operator"
    )  # fmt: skip
    sn = _options.SpectralNormOptions(**{k: args[k] for k in option_names})
    source = _make_key_source(args["rngs"], "spectral_norm")
    shape = _checks.check_shape(args["input_shape"], "input_shape", "spectral_norm")
    commits = [
      _plan_spectral_norm(m, p, names, sn, _offset(source, i * len(names)), shape)
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
    specs = {n: s for n, s in _subclass.specs_of(type(m)).items() if isinstance(s, kind)}
    wrapped += [f"{path_str(path)}:{n}" for n in specs]
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
    specs = _subclass.specs_of(type(m))
    raw = {}
    for n, s in chosen.items():
      raw[n] = vars(m)[f"{n}_v"] if isinstance(s, WeightNormSpec) else vars(m)[n]
      for attr in s.attrs(n):
        delattr(m, attr)
      del specs[n]
    if any(isinstance(s, SpectralNormSpec) and s.added_flag for s in chosen.values()) and not any(
      isinstance(s, SpectralNormSpec) for s in specs.values()
    ):
      delattr(m, FLAG)
    swap_class(m, specs)
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

  Examples:
    >>> from flax import nnx
    >>> import flaxnorm.nnx
    >>> layer = flaxnorm.nnx.weight_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    >>> layer = flaxnorm.nnx.remove_weight_norm(layer)
    >>> sorted(nnx.to_pure_dict(nnx.state(layer)))
    ['bias', 'kernel']
    >>> type(layer) is nnx.Linear
    True
  """
  _remove(module, name, WeightNormSpec, "weight_norm")
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

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import flaxnorm.nnx
    >>> layer = flaxnorm.nnx.spectral_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    >>> layer.eval()
    >>> y = layer(jnp.ones((1, 4)))
    >>> layer = flaxnorm.nnx.remove_spectral_norm(layer)
    >>> sorted(nnx.to_pure_dict(nnx.state(layer)))
    ['bias', 'kernel']
    >>> bool(jnp.allclose(layer(jnp.ones((1, 4))), y))
    True
  """
  _remove(module, name, SpectralNormSpec, "spectral_norm")
  return module


def spectral_sigmas(model: nnx.Module) -> dict[str, jax.Array]:
  """The stored sigma of every spectrally normalized param of ``model``, keyed by path.

  The NNX counterpart of :func:`flaxnorm.spectral_sigmas`: sigma is the
  spectral-norm estimate of the unnormalized kernel from the last training call
  (or from wrapping), for logging.

  Args:
    model: an ``nnx.Module``; it and all its submodules are searched.

  Returns:
    ``{"layers/0/kernel": sigma, ...}``, each of shape ``()``.

  Examples:
    >>> from flax import nnx
    >>> import flaxnorm.nnx
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    >>> model = flaxnorm.nnx.wrap_modules(model, flaxnorm.nnx.spectral_norm, where=nnx.Linear)
    >>> sorted(flaxnorm.nnx.spectral_sigmas(model))
    ['layers/0/kernel', 'layers/2/kernel']
  """
  _check_module(model, "spectral_sigmas")
  out = {}
  for path, m in _iter_modules(model):
    for name, spec in _subclass.specs_of(type(m)).items():
      if isinstance(spec, SpectralNormSpec):
        out["/".join((*map(str, path), name))] = vars(m)[spec.attrs(name)[2]][...]
  return out
