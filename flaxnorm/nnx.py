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

import dataclasses
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
from flax import nnx

from flaxnorm import (
  _axes,
  _checks,
  _math,
  _nnx_bound,
  _nnx_layer,
  _nnx_plan,
  _nnx_scan,
  _options,
  _power,
  _select,
  _subclass,
)
from flaxnorm._axes import AxisOption
from flaxnorm._nnx_layer import (
  FLAG,
  PATH_ATTR,
  DataInitRun,
  SpectralNormSpec,
  WeightNormSpec,
  path_str,
  swap_class,
)
from flaxnorm._reports import LipschitzBound

__all__ = (
  "SpectralStateVar",
  "data_init",
  "lipschitz_bound",
  "remove_spectral_norm",
  "remove_weight_norm",
  "spectral_norm",
  "spectral_sigmas",
  "weight_norm",
  "wrap_modules",
)

M = TypeVar("M", bound=nnx.Module)
#: What ``name`` accepts: param names, or a regex / ``(path, param) -> bool`` over their paths.
Names = str | Sequence[str] | re.Pattern[str] | Callable[[tuple[str, ...], Any], bool]
PathParts = _nnx_plan.PathParts
Rngs = _nnx_plan.Rngs
SpectralStateVar = _nnx_plan.SpectralStateVar


# --------------------------------------------------------------------------- #
# Public API.
# --------------------------------------------------------------------------- #


def weight_norm(
  module: M,
  /,
  *,
  name: Names = "kernel",
  axis: AxisOption = "auto",
  eps: float = 1e-12,
  ensemble_axis: int | None = None,
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
      ``nnx.Embed``, a sequence of names, a compiled regular expression searched
      in the param's path joined by ``/``, or a predicate ``(path, param) -> bool``
      (``param`` its array).
    axis: the kept axis or axes (PyTorch's ``dim``); the norm runs over all the
      others. ``"auto"`` (default): the layer's output-feature axes (``-1`` for
      ``Linear``/``Conv``/``ConvTranspose``, the ``out_features`` axes of
      ``LinearGeneral``, an ``Einsum`` equation's output axes, ``0`` for
      ``Embed``'s ``embedding``); an int or tuple; ``None`` for one norm of the
      whole tensor (``g`` of shape ``()``); or a callable
      ``(module, param_name) -> axis``. Mappings by submodule: see
      :func:`wrap_modules`.
    eps: lower bound on ``||v||``; a zero ``v`` gives a zero kernel with finite
      gradients.
    ensemble_axis: ``0`` for a module stacked by ``nnx.vmap`` (an ensemble,
      params with a leading ensemble axis): each member gets its own ``g``
      (shape ``(E, *member g)``), as if wrapped alone, and ``axis`` counts in one
      member's param. Call it under ``nnx.vmap`` (see :func:`spectral_norm`).
      ``None`` (default): an unstacked module; NNX's own layers with one axis
      too many are refused, so the stack cannot get a single norm by accident.

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
  names = _select.parse_names(name)
  options = _options.WeightNormOptions(axis=axis, eps=eps)
  ensemble = _checks.check_ensemble_axis(ensemble_axis, "weight_norm")
  _nnx_plan.plan_weight_norm(module, None, names, options, ensemble)()
  return module


def spectral_norm(
  module: M,
  /,
  *,
  name: Names = "kernel",
  axis: AxisOption = "auto",
  n_power_iterations: int = 1,
  n_init_iterations: int = _power.DEFAULT_N_INIT_ITERATIONS,
  eps: float = 1e-12,
  mode: str = "normalize",
  target: float = 1.0,
  operator: bool = False,
  input_shape: Sequence[int] | None = None,
  rngs: Rngs = None,
  ensemble_axis: int | None = None,
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
    name: the param(s) to normalize: names, a regex or a predicate, as in
      :func:`weight_norm`.
    axis: the kept (output) axis or axes, the rows of the matrix view;
      ``"auto"`` (default) for the layer's output-feature axes (for which sigma
      is the layer's own norm), or as in :func:`weight_norm`.
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
    ensemble_axis: ``0`` for a module stacked by ``nnx.vmap`` (an ensemble or
      a layer stack for ``nnx.scan``, params with a leading axis of size
      ``E``): each member gets its own state (``{name}_u`` ``(E, m)``,
      ``{name}_v`` ``(E, n)``, ``{name}_sigma`` ``(E,)``), computed as if it
      were wrapped alone; ``axis`` counts in one member's param. Call the
      members under ``nnx.vmap`` (or ``nnx.scan``) with ``in_axes=0``, e.g. an
      ``nnx.vmap``-ed training step. Not with ``operator=True``. ``None``
      (default): an unstacked module; NNX's own layers with one axis too many
      are refused, so the stack cannot get a single sigma by accident.

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
  names = _select.parse_names(name)
  options = _options.SpectralNormOptions(
    axis=axis,
    n_power_iterations=n_power_iterations,
    n_init_iterations=n_init_iterations,
    eps=eps,
    mode=mode,
    target=target,
    operator=operator,
  )
  keys = _nnx_plan.make_key_source(rngs, "spectral_norm")
  shape = _input_shape(input_shape, options.operator)
  ensemble = _checks.check_ensemble_axis(ensemble_axis, "spectral_norm")
  _nnx_plan.plan_spectral_norm(module, None, names, options, keys, shape, ensemble)()
  return module


def _input_shape(input_shape: Any, operator: bool) -> tuple[int, ...] | None:
  """``input_shape`` checked; it means something in operator mode only."""
  shape = _checks.check_shape(input_shape, "input_shape", "spectral_norm")
  if shape is not None and not operator:
    raise ValueError(
      f"spectral_norm: input_shape={shape} is for operator mode: pass operator=True with it "
      "(the norm of the layer's map on inputs of that shape), or leave it out (the kernel's "
      "matrix norm)."
    )
  return shape


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
      a tuple of them, ``nnx.All``/``nnx.Any`` combinations such as
      ``nnx.All(nnx.PathContains('encoder'), nnx.Linear)`` (``PathContains``
      alone also matches the container), or a callable ``(path, module) -> bool``.
    **kwargs: passed to ``transform`` (``name=``, ``axis=``, ``rngs=`` ...). With
      ``rngs`` a key or seed, each module gets its own key folded in from it.
      ``axis`` may here also be a mapping from module name (the last part of its
      path) or path (``"layers/1"``) to axis, the others taking ``"auto"``. With
      ``name`` a regex or predicate, modules where it matches nothing are left
      alone.

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
  _nnx_plan.check_module(model, method)
  try:
    bound = inspect.signature(transform).bind(model, **kwargs)
  except TypeError as e:
    raise TypeError(f"wrap_modules: bad arguments for {method}: {e}.") from None
  bound.apply_defaults()
  args = bound.arguments
  predicate = nnx.filterlib.to_predicate(where)
  modules = _nnx_plan.iter_modules(model)
  chosen = [(p, m) for p, m in modules if predicate(p, m)]
  if not chosen:
    found = [f"{path_str(p)} ({type(m).__name__})" for p, m in modules]
    raise ValueError(
      f"wrap_modules: no submodule matches where={where!r}. The modules are {found}."
    )
  names = _select.parse_names(args["name"])
  ensemble = _checks.check_ensemble_axis(args["ensemble_axis"], method)
  if isinstance(names, _select.ParamSelector):  # modules it picks nothing of are left alone
    picked = [(p, m, _nnx_plan.select_names(m, p, names, method, False)) for p, m in chosen]
    picked = [(p, m, n) for p, m, n in picked if n]
    if not picked:
      params = [path_str((*p, k)) for p, m in chosen for k in _nnx_plan.param_names(m)]
      raise ValueError(
        f"wrap_modules: name={names!r} matched no param of the chosen modules. Their params "
        f"are {params}."
      )
  else:
    picked = [(p, m, names) for p, m in chosen]
  if method == "weight_norm":
    wn = _options.WeightNormOptions(axis=args["axis"], eps=args["eps"])
    axes = _module_axes(wn, picked)
    commits = [
      _nnx_plan.plan_weight_norm(m, p, n, dataclasses.replace(wn, axis=a), ensemble)
      for (p, m, n), a in zip(picked, axes)
    ]
  else:
    option_names = (
      "axis", "n_power_iterations", "n_init_iterations", "eps", "mode", "target", "operator"
    )  # fmt: skip
    sn = _options.SpectralNormOptions(**{k: args[k] for k in option_names})
    axes = _module_axes(sn, picked)
    source = _nnx_plan.make_key_source(args["rngs"], "spectral_norm")
    shape = _input_shape(args["input_shape"], sn.operator)
    commits, start = [], 0
    for (p, m, n), a in zip(picked, axes):
      keys = _nnx_plan.offset(source, start)  # one key per param, never two alike
      start += len(n)
      opts = dataclasses.replace(sn, axis=a)
      commits.append(_nnx_plan.plan_spectral_norm(m, p, n, opts, keys, shape, ensemble))
  for commit in commits:
    commit()
  # An nnx.RNN whose cell layers this call wrapped iterates once per call, not per time step.
  _nnx_scan.adopt_rnns(model, [m for _, m, _ in picked])
  return model


def _module_axes(options: Any, picked: Sequence[tuple[PathParts, Any, Any]]) -> list[Any]:
  """Each picked module's ``axis``: an axis mapping looked up by its path, else as given."""
  axis = options.axis
  if not isinstance(axis, _axes.AxisMap):
    return [axis] * len(picked)
  found = [axis.lookup(tuple(str(x) for x in p)) for p, _, _ in picked]
  unused = [k for k in axis.names() if k not in {key for key, _ in found}]
  if unused:
    raise ValueError(
      f"wrap_modules: the axis mapping names {unused}, which match no chosen module. The "
      f"chosen modules are {[path_str(p) for p, _, _ in picked]}; a key is a module name "
      "(the last part of its path) or a path."
    )
  return [a for _, a in found]


def data_init(model: nnx.Module, /, *args: Any, init_scale: float = 1.0, **kwargs: Any) -> Any:
  """Weight norm's data-dependent init (Salimans & Kingma, 2016, §3.3): one call on a batch.

  Runs ``model(*args, **kwargs)`` once. Each layer wrapped by
  :func:`weight_norm` computes, at its first call, ``t = layer(x; v/||v||)``
  without bias, the mean ``mu`` and std ``s`` of each output feature over all
  the other axes, sets ``g = init_scale / s`` and ``bias = -mu * init_scale / s``
  (in place), and returns ``g * t + bias``: layer by layer, each sees the
  previous one's normalized output, so every weight-normed layer's output on
  the batch has mean 0 and std ``init_scale`` per feature. Statistics are in
  float32; a feature constant on the batch gets ``s = 1``. A layer without bias
  sets only ``g`` (its output keeps a mean of ``mu * g``). Layers the call does
  not reach keep their ``g``; a layer called twice is set at its first call.
  The call itself is the model's (spectral norm iterates, BatchNorm updates in
  training mode). Call it once, before training (before creating the
  ``nnx.Optimizer``). On an error the model's state is restored.

  Args:
    model: an ``nnx.Module`` with at least one weight-normed ``nnx.Linear``,
      ``nnx.LinearGeneral`` (no ``batch_axis``), ``nnx.Conv`` or
      ``nnx.ConvTranspose`` (Flax's own ops), whose kept axes are output
      features (the default ``axis=-1``). Modified in place.
    *args: the model's positional inputs, e.g. a batch of shape ``(batch, ...)``.
    init_scale: the std of each output feature on the batch (> 0, finite).
    **kwargs: the model's keyword arguments.

  Returns:
    The model's output on the batch, as computed with the new ``g`` and bias.

  Raises:
    ValueError: no weight-normed layer in ``model``; a weight-normed layer of
      another kind, or kept axes that are not its output features (the message
      names its path); ``init_scale`` not > 0.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import flaxnorm.nnx
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    >>> model = flaxnorm.nnx.wrap_modules(model, flaxnorm.nnx.weight_norm, where=nnx.Linear)
    >>> x = jax.random.normal(jax.random.key(0), (64, 4))
    >>> y = flaxnorm.nnx.data_init(model, x)
    >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-5) and jnp.allclose(y.std(0), 1, atol=1e-4))
    True

  References:
    Salimans & Kingma, "Weight Normalization: A Simple Reparameterization to
    Accelerate Training of Deep Neural Networks", NeurIPS 2016, §3.3.
  """
  _nnx_plan.check_module(model, "data_init")
  init_scale = _checks.check_init_scale(init_scale, "data_init")
  pending = {}
  for path, m in _nnx_plan.iter_modules(model):
    if any(isinstance(s, WeightNormSpec) for s in _subclass.specs_of(type(m)).values()):
      pending[id(m)] = _nnx_layer.data_init_axes(m, path_str(path))
  if not pending:
    found = [f"{path_str(p)} ({type(m).__name__})" for p, m in _nnx_plan.iter_modules(model)]
    raise ValueError(
      f"data_init: {type(model).__name__} has no layer wrapped by flaxnorm.nnx.weight_norm "
      f"(its modules are {found}). Wrap them first, e.g. "
      f"flaxnorm.nnx.wrap_modules(model, flaxnorm.nnx.weight_norm, where=nnx.Linear)."
    )
  # The arrays, not the Variables (which the call updates in place).
  before = nnx.to_pure_dict(nnx.state(model))
  token = _nnx_layer.DATA_INIT.set(DataInitRun(init_scale, pending))
  try:
    return model(*args, **kwargs)
  except BaseException:
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, before)
    nnx.update(model, state)
    raise
  finally:
    _nnx_layer.DATA_INIT.reset(token)


def _remove(module: Any, name: Any, kind: type, method: str) -> None:
  _nnx_plan.check_module(module, f"remove_{method}")
  wanted = None if name is None else set(_checks.check_names(name))
  plans = []
  wrapped = []
  for path, m in _nnx_plan.iter_modules(module):
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
    if not specs and PATH_ATTR in vars(m):
      delattr(m, PATH_ATTR)  # a plain layer again
    for n, value in values.items():
      if n in vars(m):
        delattr(m, n)
      setattr(m, n, raw[n].copy(value))
  _nnx_scan.release_rnns(module)


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
    ``{"layers/0/kernel": sigma, ...}``, each of shape ``()`` (``(E,)`` for an
    ``nnx.vmap`` ensemble: one per member).

  Examples:
    >>> from flax import nnx
    >>> import flaxnorm.nnx
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    >>> model = flaxnorm.nnx.wrap_modules(model, flaxnorm.nnx.spectral_norm, where=nnx.Linear)
    >>> sorted(flaxnorm.nnx.spectral_sigmas(model))
    ['layers/0/kernel', 'layers/2/kernel']
  """
  _nnx_plan.check_module(model, "spectral_sigmas")
  out = {}
  for path, m in _nnx_plan.iter_modules(model):
    for name, spec in _subclass.specs_of(type(m)).items():
      if isinstance(spec, SpectralNormSpec):
        out["/".join((*map(str, path), name))] = vars(m)[spec.attrs(name)[2]][...]
  return out


def lipschitz_bound(
  model: nnx.Module,
  inputs: tuple[Any, ...],
  *,
  kwargs: Mapping[str, Any] | None = None,
  n_gram_steps: int | None = None,
) -> LipschitzBound:
  """A certified upper bound of an NNX model's Lipschitz constant, with its layers' norms.

  The NNX counterpart of :func:`flaxnorm.lipschitz_bound` with ``model=``:
  ``model(*inputs, **kwargs)`` is traced shape-only, and the bound is over its
  floating-point inputs, in the ℓ2 norm of all of them as one vector and of
  all its real outputs as one vector, for inputs of these shapes. The model
  holds its variables, so every layer is followed with their values known: a
  kernel is bounded by the certified norm (Gram iteration) of what the layer
  computes with it (``W · target / σ`` from the stored vectors, or ``g · v /
  ‖v‖``; transposed and local convolutions alike), and what the model
  computes between and inside the layers by the rules of
  :func:`flaxnorm.lipschitz_bound` (sums, branches, known scales, pools,
  activations by their largest slope, loops step by step). Selects on the
  inputs (``jnp.where``, leaky ReLU) are taken as continuous: a precondition,
  not checked.

  The bound is of the model as it is called now: call ``model.eval()`` first
  to bound it as it evaluates (in training, spectrally normalized layers
  bound the σ their power iteration would compute in this call, dropout counts
  ``1 / (1 − rate)`` whatever mask it draws, and normalization by batch
  statistics gets a reason). The model is not changed.

  Args:
    model: an ``nnx.Module``, called as ``model(*inputs, **kwargs)``.
    inputs: a tuple of its positional call arguments (shapes matter, not
      values: arrays or ``jax.ShapeDtypeStruct``; integer and bool arrays,
      PRNG keys and Python values are held fixed).
    kwargs: its keyword call arguments (``{"mask": m}``), held fixed or traced
      as ``inputs`` are.
    n_gram_steps: Gram iterations per kernel, 1 to 40 (default
      ``flaxnorm.DEFAULT_GRAM_STEPS``).

  Returns:
    A :class:`flaxnorm.LipschitzBound`: ``certified`` (a float, or None with
    ``reasons`` keyed by the path of the module running where no rule bounds
    what the model computes), ``layers`` keyed by param path
    (``"layers/0/kernel"``): a spectrally normalized param's effective norm
    from its stored σ (the largest member's in an ``nnx.vmap`` ensemble), or a
    plain or weight-normed linear layer's certified norm, with the layer's
    certified norm, each to the power of the most times the model runs it; and
    ``estimate``, their product.

  Raises:
    TypeError: ``model`` is not an ``nnx.Module``, ``inputs`` not a tuple,
      ``kwargs`` not a mapping by ``str``, or ``n_gram_steps`` not an int.
    ValueError: ``inputs`` and ``kwargs`` are both empty, or ``n_gram_steps``
      is not in ``[1, 40]``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import flaxnorm.nnx
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    >>> model = flaxnorm.nnx.wrap_modules(model, flaxnorm.nnx.spectral_norm, where=nnx.Linear,
    ...                                   n_init_iterations=200)
    >>> model.eval()  # bound the model as it evaluates
    >>> bound = flaxnorm.nnx.lipschitz_bound(model, (jnp.ones((1, 3)),))
    >>> sorted(bound.layers), bound.reasons
    (['layers/0/kernel', 'layers/2/kernel'], {})
    >>> 0.99 < bound.certified < 1.01
    True

  References:
    Delattre, Barthélemy, Araujo & Allauzen, "Efficient Bound of Lipschitz
    Constant for Convolutional Layers by Gram Iteration", ICML 2023.
  """
  return _nnx_bound.lipschitz_bound(model, inputs, kwargs, n_gram_steps)
