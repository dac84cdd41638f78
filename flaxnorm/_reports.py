"""Reports on spectrally normalized models: the stored sigmas and a Lipschitz bound.

These read variables (a Linen ``spectral`` collection, or the same layout from
``flaxnorm.tree``); ``flaxnorm.nnx.spectral_sigmas`` reads an NNX model.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import meta
from jax.core import Tracer

from flaxnorm import (
  _axes,
  _call_counts,
  _certify,
  _checks,
  _fold,
  _math,
  _options,
  _output_scale,
  _power,
  _propagate,
  _spans,
  _subclass,
)
from flaxnorm import linen as _linen
from flaxnorm._checks import Call

_AT = "lipschitz_bound"
_T = TypeVar("_T")


def spectral_sigmas(
  variables: Mapping[str, Any], collection: str = "spectral"
) -> dict[str, jax.Array]:
  """The stored sigma of every spectrally normalized param, keyed by its path.

  Sigma is the spectral-norm estimate of the *unnormalized* kernel from the last
  training call (or from init): the value to log to watch the layers' scale.

  Args:
    variables: Linen variables with ``collection`` (or that collection itself, as
      ``flaxnorm.tree.spectral_norm_init`` returns it).
    collection: the collection holding the spectral state.

  Returns:
    ``{"Dense_0/kernel": sigma, ...}`` in path order, each sigma of shape ``()``.

  Raises:
    TypeError: ``variables`` is not a mapping, or ``collection`` not a str.
    ValueError: Linen variables without ``collection`` (the message lists the
      collections they hold), or a state entry that is not ``{x}_u``,
      ``{x}_v`` or ``{x}_sigma``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import flaxnorm
    >>> model = nn.Sequential([flaxnorm.spectral_norm(nn.Dense(4)), nn.relu,
    ...                        flaxnorm.spectral_norm(nn.Dense(2))])
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> sorted(flaxnorm.spectral_sigmas(variables))
    ['layers_0/kernel', 'layers_2/kernel']
  """
  return _sigmas(variables, collection, "spectral_sigmas")


def _sigmas(variables: Any, collection: Any, fn: str, hint: str = "") -> dict[str, jax.Array]:
  """:func:`spectral_sigmas`, its messages naming ``fn`` (``hint`` ends a missing collection's)."""
  collection = _checks.check_collection(collection, fn)
  if not isinstance(variables, Mapping):
    raise TypeError(
      f"{fn}: variables must be a mapping with a '{collection}' collection, got "
      f"{type(variables).__name__}."
    )
  state = variables.get(collection, variables)
  if collection not in variables and "params" in variables:  # Linen variables without it
    raise ValueError(
      f"{fn}: collection '{collection}' is not in the variables, which hold the collections "
      f"{sorted(map(str, variables))}: no layer is spectrally normalized (plain or "
      "weight-normed variables), or its state is under another collection name." + hint
    )
  if not isinstance(state, Mapping):
    raise TypeError(
      f"{fn}: collection '{collection}' must be a mapping, got {type(state).__name__}."
    )
  entries = _fold.spectral_entries(state, fn)
  return {"/".join((*path, name)): meta.unbox(s) for path, name, (_, _, s) in entries}


class LipschitzBound(NamedTuple):
  """What :func:`lipschitz_bound` reports.

  Attributes:
    estimate: shape ``()``: the product of the layers' norms in ``layers``: a
      spectrally normalized layer's effective norm from its stored sigma
      (``target``, or ``min(sigma, target)`` with ``"clip"``), and (with a
      model) a plain linear layer's certified norm, as it has no sigma.
    certified: a certified upper bound of the model's Lipschitz constant: each
      linear layer's certified norm (Gram iteration) carried through what the
      model computes between its layers (sums, branches, scalings, pools,
      activations, loops); ``None`` when no model was given, some layer has no
      bound, or no rule bounds what the model computes (see ``reasons``).
    layers: per param path (``"Dense_0/kernel"``): ``(estimate, certified)``,
      the layer's effective and certified norms, each to the power of the most
      times the model runs it.
    reasons: why ``certified`` is ``None``, per layer or param path (empty
      without a model, and when ``certified`` is a float).

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import flaxnorm
    >>> variables = flaxnorm.spectral_norm(nn.Dense(2)).init(jax.random.key(0), jnp.ones((1, 3)))
    >>> estimate, certified, layers, reasons = flaxnorm.lipschitz_bound(variables)
    >>> list(layers), certified, reasons
    (['kernel'], None, {})
  """

  estimate: jax.Array
  certified: float | None
  layers: dict[str, tuple[jax.Array, float | None]]
  reasons: dict[str, str]


def lipschitz_bound(
  variables: Mapping[str, Any],
  collection: str = "spectral",
  *,
  target: float = 1.0,
  mode: str = "normalize",
  model: nn.Module | None = None,
  inputs: tuple[Any, ...] = (),
  kwargs: Mapping[str, Any] | None = None,
  n_gram_steps: int | None = None,
) -> LipschitzBound:
  """The Lipschitz constant of a network after spectral norm: estimate and certified bound.

  Each spectrally normalized layer's effective norm is ``target`` with
  ``mode="normalize"`` and ``min(sigma, target)`` with ``"clip"`` (sigma the
  stored estimate); the estimate is their product. It is the constant of a
  *chain* ``f = f_L ∘ a ∘ ... ∘ a ∘ f_1`` whose activations ``a`` are
  1-Lipschitz, whose every linear layer is spectrally normalized, with no skip
  connections or normalization layers. Power iteration's sigma is a lower
  estimate of a kernel's norm, and the kernel mode's matrix view is not a
  convolution's operator norm, so the estimate is not a certificate.

  With ``model`` and ``inputs`` the bound is also *certified*, for any
  architecture the rules cover. The model is traced shape-only on ``inputs``
  to see every layer it calls, with its kind, options and input size, and
  each layer that holds variables gets a guaranteed upper bound on the norm of
  what it computes in evaluation (Gram iteration on the kernel's matrix, or on
  a convolution's FFT-domain blocks, times the largest scale ``target /
  sigma`` a wrapped layer can compute: its sigma as it computes it, in its own
  dtype, with a rigorous rounding margin). Certified layers: ``nn.Dense``,
  ``nn.DenseGeneral`` and ``nn.Conv`` (any strides, zero or circular padding,
  groups, kernel dilation, ``mask``) run by Flax's own code, spectrally
  normalized, weight-normed or plain (then the estimate counts their
  certified norm too); biases add no factor. A model with no spectrally
  normalized layer (no ``collection`` in the variables) is certified from its
  ``params``. Any other module holding variables (``ConvTranspose``,
  ``BatchNorm``, ``Embed``, a subclass, a module's own ``self.param``) is
  followed primitive by primitive with its variables' values (below), as is a
  plain or weight-normed layer with options the layer bound does not cover (a
  custom ``dot_general`` or ``conv_general_dilated``, a Conv with
  ``REFLECT`` or negative padding or ``input_dilation``). A spectrally
  normalized layer with such options or of another kind makes the
  certificate ``None``, with the reason under its path in ``reasons``. A
  layer in an ``nn.while_loop`` is followed through the loop's steps (its
  row: to the power inf, the runs not being counted). A layer whose params (and spectral
  state) ``nn.scan``/``nn.vmap`` stacked is followed too, each step or member
  with its own slice; its row is the walk's norm of its largest member. A
  Conv called on inputs of different spatial sizes is a ``ValueError``, and so
  are stacked spectral states without ``model`` (a product of sigmas is no
  one layer's).

  The layers' bounds are then carried through the traced program, value by
  value (``L(y)`` with ``|dy| <= L(y) |dx|``, all floating-point inputs as
  one vector, all real outputs as one): a sum adds bounds (a residual block
  ``x + f(x)``: ``1 + b``), values side by side (``concatenate``, a max of
  two branches) get the root of the sum of squares, a known scale its
  largest magnitude, a matrix product or convolution with a known operand
  that operand's certified norm (a transposed convolution through its
  phases), broadcasting or summing ``k`` elements ``sqrt(k)``, a pool the
  square root of how many windows share an element (times the window for a
  sum), an activation its largest slope; loops are followed step by step (an
  RNN's whole output sequence, a sum of steps). Known: literals, constants,
  what the model computes from them, integer inputs held fixed, and the
  variables of the modules followed. What no rule bounds gets a reason under
  the path of the module running there (``"<top level>"`` for the model's
  own code): a product of two values that depend on the inputs (gates,
  attention, normalization by a statistic of the input), a scale or matrix
  that is not known (dropout in training), ``exp``, powers, a gather at
  indices computed from the inputs, values sorted by keys from the inputs,
  a comparison used as data, and a branch or loop trip count picked from the
  inputs. Selects on the inputs (``jnp.where``, leaky ReLU) are taken as
  continuous: a precondition, not checked.

  Args:
    variables: Linen variables with ``collection`` (or the collection itself
      without ``model``); with ``model``, its variables with ``params`` (and
      ``collection`` if a layer is spectrally normalized).
    collection: the collection holding the spectral state.
    target: the ``target`` the layers were wrapped with (without ``model``;
      with it, each layer's own).
    mode: the ``mode`` the layers were wrapped with (likewise).
    model: the Linen model the variables belong to, for the certificate.
    inputs: example inputs of ``model.apply`` (shapes matter, not values:
      arrays or ``jax.ShapeDtypeStruct``; the bound is over the floating-point
      arrays, Python scalars, integers, bools and keys being held fixed). With
      ``model``, ``inputs`` or ``kwargs`` must hold some argument; without it
      both are refused.
    kwargs: keyword arguments of ``model.apply``, the module's
      (``{"train": False}``) or its own (``{"method": "encode"}``), held fixed
      or traced as ``inputs`` are.
    n_gram_steps: Gram iterations per kernel, 1 to 40 (default
      ``flaxnorm.DEFAULT_GRAM_STEPS``: within 1% of the true norm for
      Gaussian kernels), for the certified layers and every known kernel the
      walk meets alike.

  Returns:
    A :class:`LipschitzBound`.

  Raises:
    TypeError: ``model`` is not a Linen module (an NNX module, say),
      ``inputs`` not a tuple, ``kwargs`` not a mapping by ``str``,
      ``n_gram_steps`` not an int, or a kernel not real floating-point.
    ValueError: ``variables`` lack ``collection`` (with ``model``: only when
      the model has a spectrally normalized layer), or lack ``params`` with
      ``model`` (``{}``, a model without params, is accepted), ``model``
      with neither ``inputs`` nor ``kwargs``, either of them without
      ``model``, ``n_gram_steps`` not in ``[1, 40]``, a stacked spectral state
      without ``model``, or a Conv called on inputs of different spatial sizes.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import flaxnorm
    >>> model = nn.Sequential([flaxnorm.spectral_norm(nn.Dense(4), target=2.0), nn.relu,
    ...                        flaxnorm.spectral_norm(nn.Dense(2), target=2.0)])
    >>> x = jnp.ones((1, 3))
    >>> variables = model.init(jax.random.key(0), x)
    >>> bound = flaxnorm.lipschitz_bound(variables, target=2.0, model=model, inputs=(x,))
    >>> float(bound.estimate)
    4.0
    >>> 4.0 <= bound.certified < 4.0 * 1.01 ** 2
    True

  References:
    Gouk, Frank, Pfahringer & Cree, "Regularisation of Neural Networks by
    Enforcing Lipschitz Continuity", Machine Learning 110, 2021. Delattre,
    Barthélemy, Araujo & Allauzen, "Efficient Bound of Lipschitz Constant for
    Convolutional Layers by Gram Iteration", ICML 2023.
  """
  _checks.check_mode(mode, _AT)
  target = _checks.check_target(target, _AT)
  steps, call = _check_model_args(model, inputs, kwargs, n_gram_steps)
  if model is None:
    sigmas = _unstacked(_sigmas(variables, collection, _AT, _NO_MODEL_HINT))
    layers: dict[str, tuple[jax.Array, float | None]] = {
      p: (_effective_norm(s, target, mode), None) for p, s in sigmas.items()
    }
    return LipschitzBound(_product([e for e, _ in layers.values()]), None, layers, {})
  return _model_bound(variables, collection, model, call, steps, (target, mode))


def _model_bound(
  variables: Mapping[str, Any],
  collection: str,
  model: nn.Module,
  call: Call,
  steps: int,
  wrapped: tuple[float, str],
) -> LipschitzBound:
  """:func:`lipschitz_bound` with a model (``wrapped``: ``(target, mode)`` for uncalled layers)."""
  _check_has_params(variables)
  trace = _trace_layers(model, variables, call)
  sigmas: dict[str, jax.Array] = {}
  if collection in variables or trace.spectral:  # else: no layer is spectrally normalized
    sigmas = _sigmas(variables, collection, _AT)
  layers: dict[str, tuple[jax.Array, float | None]] = {}
  per_run: dict[str, float] = {}  # each layer's bound for one run, by module path
  gains: dict[str, float] = {}  # and its kernel's ∞-norm (see _Norm), by module path
  stacked: dict[str, tuple[str, float]] = {}  # a stacked layer's row: (module path, runs)
  reasons = {  # a layer whose state is under another collection: its sigma is not read
    p: f"spectrally normalized, but its state is not in collection '{collection}'"
    for p in trace.spectral
    if p not in sigmas
  }
  cols = {collection, "intermediates", *(s.options.collection for s in trace.spectral.values())}
  skip = (set(sigmas) | set(trace.spectral), cols)  # spectral kernels: bounded above, or not
  followed: set[str] = set()  # modules without a certificate, followed primitive by primitive
  for path, sigma in sigmas.items():
    seen = trace.spectral.get(path)
    if seen is None and path in trace.idle:  # never runs: no factor
      continue
    if seen is None:
      reasons[path] = "the model did not call this spectrally normalized layer on these inputs"
      layers[path] = (_effective_norm(sigma, *wrapped), None)
      continue
    norm = power(_effective_norm(sigma, seen.options.target, seen.options.mode), seen.calls)
    if jnp.ndim(sigma) or _stacked_param(trace, seen, variables):  # nn.scan/nn.vmap: followed
      followed.add(_module_path(seen.module))
      stacked[path] = (_module_path(seen.module), seen.calls)
      layers[path] = (jnp.max(norm), None)
      continue
    bound = _guarded(
      reasons, path, functools.partial(_certified, seen, variables, collection, path, steps)
    )
    layers[path] = (norm, None if bound is None else power(bound.norm, seen.calls))
    if bound is not None:
      _times(per_run, gains, _module_path(seen.module), bound)
  for path, seen in trace.modules.items():
    if path in trace.idle and not seen.calls:
      continue
    bound = _plain_layer(seen, path, variables, skip, steps, layers, reasons, followed, stacked)
    if bound is not None:
      _times(per_run, gains, path, bound)
  add_unchained(reasons, trace.unchained)
  slashed = sorted(p for p, seen in trace.modules.items() if "/" in "".join(_names(seen.module)))
  if slashed:
    reasons[_TOP] = (
      f"the names of the modules at {slashed} hold '/', which makes paths ambiguous (one "
      "layer's variables could be read as another's): rename them"
    )
  certified = None
  if not reasons:
    found = _propagated(trace, (per_run, gains), variables, followed, reasons, steps)
    certified = found.value if found.why is None else None
    for at, (module, runs) in stacked.items():  # the walk's norm of the largest member
      ratio = None if module in found.unmeasured else found.layers.get(module)
      most = None if ratio is None else power(ratio, runs)
      if at in layers:  # spectral: its estimate from the stored sigmas
        layers[at] = (layers[at][0], most)
      elif most is not None:
        layers[at] = (jnp.asarray(most, jnp.float32), most)
  estimate = _product([e for e, _ in layers.values()])
  return LipschitzBound(estimate, certified, layers, reasons)


def _propagated(
  trace: _Trace,
  certified: tuple[dict[str, float], dict[str, float]],
  variables: Mapping[str, Any],
  followed: set[str],
  reasons: dict[str, str],
  steps: int,
) -> _propagate.Bound:
  """The certificate: each ``certified`` layer's bound (and kernel's ∞-norm, for its
  output's span), by module path, carried through the traced program, the
  variables of the ``followed`` modules known there (the reason under the path of
  the layer running where no rule bounds what the model computes), each known kernel
  bounded with ``steps`` Gram steps."""
  assert trace.program is not None
  closed, dependent, fixed, keys = trace.program
  per_run, gains = certified
  leaves = jax.tree.leaves(dict(variables))
  known = {i: np.asarray(x) for i, x in enumerate(leaves) if keys[i][0] in followed}
  stored = {i: key for i, (owner, key) in enumerate(keys) if owner not in followed}
  spans = {path: (gain, _largest_bias(variables, path)) for path, gain in gains.items()}
  found = _propagate.bound(
    closed, dependent, per_run, {**known, **fixed}, stored, steps, gains=spans
  )
  if found.why is not None:
    reasons[found.where or _TOP] = found.why
  return found


def _stacked_param(trace: _Trace, seen: _Seen, variables: Mapping[str, Any]) -> bool:
  """Whether the spectral layer ``seen`` computes with a slice of its stored param (its
  state unstacked: one sigma for members ``nn.vmap`` stacked)."""
  path = _module_path(seen.module)
  return _sliced(trace.modules.get(path, seen), _node(variables.get("params", {}), path), seen.name)


def _sliced(seen: _Seen, params: Mapping[str, Any], name: str) -> bool:
  """Whether the module ``seen`` computes with a slice of its stored param ``name``
  (``params``: its own): stacked by ``nn.scan``/``nn.vmap``."""
  inside = (seen.param_shapes or {}).get(name)
  stored = params.get(name)
  return (
    inside is not None and stored is not None and tuple(jnp.shape(meta.unbox(stored))) != inside
  )


def _times(per_run: dict[str, float], gains: dict[str, float], path: str, found: _Norm) -> None:
  per_run[path] = per_run.get(path, 1.0) * found.norm
  gains[path] = math.inf if path in gains else found.gain  # (two kernels: not known)


def _largest_bias(variables: Mapping[str, Any], path: str) -> float:
  """``max |b|`` of a certified layer's bias (a weight-normed one's: at most its ``g``'s)."""
  node = _node(variables["params"], path)
  for name in ("bias", "bias_g"):
    if name in node:
      b = np.abs(np.asarray(meta.unbox(node[name]))).astype(np.float64)
      return float(b.max()) if b.size else 0.0
  return 0.0


class _Norm(NamedTuple):
  """A certified layer kernel's bounds: ``norm`` (its operator norm), ``gain`` (its
  largest sum of ``|w|`` over one output's inputs, rounded up: ``max|y| ≤ gain ·
  max|x|`` for the kernel's map ``y`` of ``x``, whatever its padding or strides)."""

  norm: float
  gain: float


def _module_path(module: nn.Module) -> str:
  return "/".join(_names(module))


def _names(module: nn.Module) -> list[str]:
  """The names on the path to ``module``."""
  return list(map(str, module.scope.path)) if module.scope is not None else []


_NO_MODEL_HINT = (
  " Without model= and inputs= there are no sigmas to multiply; with them, "
  "lipschitz_bound certifies plain and weight-normed models too."
)


def _unstacked(sigmas: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """``sigmas``, after checking that each is one layer's (shape ``()``)."""
  for path, sigma in sigmas.items():
    if jnp.ndim(sigma):
      raise ValueError(
        f"{_AT}: the state at '{path}' holds {jnp.shape(sigma)} sigmas (a layer "
        "stacked by nn.scan or nn.vmap): its bound is not one layer's. Pass model= and "
        "inputs= (each member is then followed with its own state), or bound each member's "
        "variables on their own."
      )
  return sigmas


def _check_has_params(variables: Any) -> None:
  """Raises unless ``variables`` are a mapping with ``params`` (what the model applies)."""
  if not isinstance(variables, Mapping):
    raise TypeError(
      f"{_AT}: variables must be a mapping (the model's variables), got {type(variables).__name__}."
    )
  if variables and "params" not in variables:  # {}: a model without params
    raise ValueError(
      f"{_AT}: with model, variables must be the model's variables with a 'params' "
      f"collection (as model.init returns them), got the collections "
      f"{sorted(map(str, variables))}."
    )


def _check_model_args(model: Any, inputs: Any, kwargs: Any, n_gram_steps: Any) -> tuple[int, Call]:
  """Checks ``model``, ``inputs``, ``kwargs`` and ``n_gram_steps``; returns the Gram
  steps and the model's call."""
  steps = check_gram_steps(n_gram_steps)
  if model is None:
    unused = (
      isinstance(inputs, tuple) and not inputs,
      kwargs is None or (isinstance(kwargs, Mapping) and not kwargs),
    )
    for name, given, empty in zip(("inputs", "kwargs"), (inputs, kwargs), unused, strict=True):
      if not empty:
        raise ValueError(
          f"{_AT}: {name} are given without model; pass the Linen model too (model=...) to "
          f"certify the bound, or leave {name} out, got {name} of type "
          f"{type(given).__name__}."
        )
    return steps, Call((), {})
  if not isinstance(model, nn.Module):
    raise TypeError(
      f"{_AT}: model must be the flax.linen Module the variables belong to, got "
      f"{type(model).__name__}"
      + (
        " (a flax.nnx module holds its variables: certify it with "
        "flaxnorm.nnx.lipschitz_bound(model, inputs), and read its sigmas with "
        "flaxnorm.nnx.spectral_sigmas)."
        if isinstance(model, nnx.Module)
        else "."
      )
    )
  return steps, check_call(inputs, kwargs, "model.apply's arguments after the variables")


def power(b: Any, runs: float) -> Any:
  """``b`` (a float or an array) to the most of ``runs`` runs; ``runs`` inf (a while loop,
  whose trip count is not counted): ``b`` where ``b <= 1``, else inf."""
  if isinstance(b, jax.Array):
    return b**runs if runs != math.inf else jnp.where(b <= 1, b, jnp.inf)
  if runs == math.inf:
    return float(b) if b <= 1 else math.inf
  with np.errstate(over="ignore"):  # b ** runs beyond float64: inf
    return float(np.float64(b) ** runs)


def check_gram_steps(n_gram_steps: Any) -> int:
  """``n_gram_steps`` checked (None: ``flaxnorm.DEFAULT_GRAM_STEPS``)."""
  if n_gram_steps is None:
    return _certify.DEFAULT_GRAM_STEPS
  return _certify.check_steps(n_gram_steps, _AT, "n_gram_steps")


def check_call(inputs: Any, kwargs: Any, arguments: str) -> Call:
  """``(inputs, kwargs)`` checked: a tuple (of ``arguments``, for the messages) and
  ``None`` or a mapping of keyword arguments by name, not both empty."""
  if not isinstance(inputs, tuple):
    raise TypeError(
      f"{_AT}: inputs must be a tuple of {arguments}, e.g. (x,), got {type(inputs).__name__}."
    )
  kwargs = _checks.check_kwargs(kwargs, _AT)
  if not inputs and not kwargs:
    raise ValueError(
      f"{_AT}: model needs example inputs to trace: inputs must hold {arguments}, e.g. "
      "inputs=(x,), got () and no kwargs (keyword arguments go in kwargs=)."
    )
  return Call(inputs, kwargs)


def _product(factors: list[Any], one: Any = None) -> Any:
  """The product of ``factors``, starting at ``one`` (a float32 ``1.0`` array if None)."""
  out = jnp.ones((), jnp.float32) if one is None else one
  for f in factors:
    out = out * f
  return out


class _UncertifiedError(Exception):
  """A layer without a certificate; the message says why."""


class _StackedError(_UncertifiedError):
  """A layer whose params ``nn.scan``/``nn.vmap`` stacked: followed, each step (or member)
  with its own slice known."""


class _Seen(NamedTuple):
  """A layer as the model's trace saw it."""

  module: nn.Module
  name: str
  options: Any  # flaxnorm._options.SpectralNormOptions (None for a plain layer)
  input_shape: tuple[int, ...]
  calls: float = 1  # how many times the model runs it, at most (inf: in a while loop)
  param_shapes: dict[str, tuple[int, ...]] | None = None  # its own params', as it sees them


class _Trace(NamedTuple):
  """What the model's trace saw: spectral layers by param path, all modules by path."""

  spectral: dict[str, _Seen]
  modules: dict[str, _Seen]
  idle: set[str]  # layers called in the trace that the program never runs (a scan of length 0)
  unchained: frozenset[str] = frozenset()  # see _call_counts.Counts
  # The jaxpr, which invars are the inputs, the values of those held fixed (by index), and
  # each variable's (module path, key) (the first invars).
  program: tuple[Any, tuple[bool, ...], dict[int, Any], tuple[tuple[str, str], ...]] | None = None


_TOP = "<top level>"
_JUMP = (
  " from its inputs: what it computes can jump where the choice changes, and no product "
  "of layer bounds bounds a jump"
)
_UNCHAINED = {  # see flaxnorm._call_counts.Counts
  "cond": "the model picks a branch (nn.cond, nn.switch, lax.cond)" + _JUMP,
  "while": "the model picks a loop's trip count (nn.while_loop, lax.while_loop)" + _JUMP,
  "inputs": (
    "no input is a floating-point array the bound could be over (Python scalars, "
    "integers, bools and PRNG keys are held fixed): pass the inputs as arrays"
  ),
}


def add_unchained(reasons: dict[str, str], unchained: frozenset[str] | set[str]) -> None:
  """Adds the reasons for what no Lipschitz bound covers (:data:`_UNCHAINED`) under
  ``"<top level>"``, after any reason there."""
  if unchained:
    top = [reasons[_TOP]] if _TOP in reasons else []
    reasons[_TOP] = "; ".join(top + [_UNCHAINED[u] for u in sorted(unchained)])


def _trace_layers(model: nn.Module, variables: Mapping[str, Any], call: Call) -> _Trace:
  """Traces ``model.apply`` shape-only; counts how often each module and spectral layer runs.

  A layer is counted as often as the traced program runs it
  (:mod:`flaxnorm._call_counts`): ``length`` times in an ``nn.scan``. The
  inputs are traced as :func:`traced_inputs` says.
  """
  trace, floats = traced_inputs(functools.partial(_trace_once, model, variables, call), call)
  return trace if floats else trace._replace(unchained=trace.unchained | {"inputs"})


def traced_inputs(trace: Callable[[list[int]], _T], inputs: tuple) -> tuple[_T, bool]:
  """``trace(traced)``, ``traced`` the indices of the leaves of ``inputs`` to trace;
  and whether any of them is floating-point.

  The arrays in ``inputs`` (JAX, numpy, ``ShapeDtypeStruct``) are traced, and
  the bound is over the floating-point ones: integers, bools and PRNG keys are
  held fixed, as Python scalars are. A model that reads an input's values in
  Python (a flag, a size) is traced again with only the floating-point arrays.
  """
  leaves = jax.tree.leaves(inputs)
  traced = [i for i, x in enumerate(leaves) if isinstance(x, _ARRAYS)]
  floats = [i for i in traced if jnp.issubdtype(leaves[i].dtype, jnp.inexact)]
  try:
    return trace(traced), bool(floats)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    if floats == traced:
      raise
    return trace(floats), bool(floats)


def with_traced(inputs: tuple, traced: list[int], arrays: list[Any]) -> tuple:
  """``inputs`` with the leaves at ``traced`` replaced by ``arrays``."""
  leaves, treedef = jax.tree.flatten(inputs)
  for i, x in zip(traced, arrays, strict=True):
    leaves[i] = x
  return jax.tree.unflatten(treedef, leaves)


def read_program(
  closed: Any, n_vars: int, inputs: tuple, traced: list[int]
) -> tuple[tuple[bool, ...], dict[int, Any], _call_counts.Counts]:
  """What the bound needs of a program traced on ``n_vars`` variables, then the
  ``traced`` leaves of ``inputs``: which invars are inputs it is over, the values
  of those held fixed (integer and bool arrays with values: an RNN's
  ``seq_lengths``), by invar index, and how often each marked layer runs."""
  leaves = jax.tree.leaves(inputs)
  data = _call_counts.inexact(closed.jaxpr)  # keys, flags and indices are held fixed
  dependent = tuple(d and i >= n_vars for i, d in enumerate(data))
  fixed = {
    n_vars + j: np.asarray(leaves[i])
    for j, i in enumerate(traced)
    if not isinstance(leaves[i], jax.ShapeDtypeStruct)
    and (jnp.issubdtype(leaves[i].dtype, jnp.integer) or leaves[i].dtype == np.bool_)
  }
  return dependent, fixed, _call_counts.runs(closed.jaxpr, dependent)


_ARRAYS = (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)


def _trace_once(
  model: nn.Module, variables: Mapping[str, Any], call: Call, traced: list[int]
) -> _Trace:
  """:func:`_trace_layers` with the ``traced`` leaves of ``call`` as the traced inputs."""
  trace = _Trace({}, {}, set())
  calls: list[tuple[dict[str, _Seen], str, _Seen, str]] = []  # (table, path, seen, module)
  active: list[str] = []  # module paths being called: a nested call on one is the same use

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if module.scope is None:
      return next_fun(*args, **kwargs)
    path = _module_path(module)
    first = args[0] if args else next(iter(kwargs.values()), None)  # layer(x) or layer(inputs=x)
    shape = tuple(getattr(first, "shape", ())) if context.method_name == "__call__" else None
    _record_module(trace.modules, path, module)
    call = None
    if shape is not None:  # runs counted per module path: a nested call is the same run
      for key, spec in _subclass.specs_of(type(module)).items():
        if spec.method == "spectral_norm":  # the wrapped (recursive) clone's call is nested
          for name in _spectral_names(key, spec, module, variables):
            seen = _Seen(module, name, spec.options, shape)
            calls.append((trace.spectral, _join(path, name), seen, path))
      if path not in active:
        call = len(calls)
        args, kwargs = _call_counts.mark(args, kwargs, path, call)
        if _subclass.base_of(type(module)) in _CERTIFIED:
          _call_counts.mark_variables(module.variables, path, call)
        calls.append((trace.modules, path, _Seen(module, "", None, shape), path))
    if context.method_name != "__call__":  # a lifted transform's function run as its method
      return next_fun(*args, **kwargs)
    active.append(path)
    try:
      out = next_fun(*args, **kwargs)
    finally:
      active.pop()
    if call is None:
      return out
    # Only a certified layer's output is its bound times its input's.
    certified = _subclass.base_of(type(module)) in _CERTIFIED
    return _call_counts.mark_output(out, path, call, certified=certified)

  def run(variables, arrays):
    with nn.intercept_methods(interceptor), _output_scale.kernel_side():
      args, kwargs = with_traced(call, traced, arrays)
      return model.apply(variables, *args, **kwargs)

  variables = dict(variables)
  leaves = jax.tree.leaves(call)
  closed = jax.make_jaxpr(run)(variables, [leaves[i] for i in traced])
  dependent, fixed, counts = read_program(closed, len(jax.tree.leaves(variables)), call, traced)
  keys = tuple(_key(p) for p, _ in jax.tree_util.tree_flatten_with_path(variables)[0])
  trace = trace._replace(unchained=counts.unchained, program=(closed, dependent, fixed, keys))
  for table, path, seen, module in calls:
    most = counts.runs.get(module, 0.0)
    if most:  # inf in a while loop: its trip count is not counted here (the walk follows it)
      _count(table, path, seen._replace(calls=most if most == math.inf else int(most)))
    else:
      trace.idle.add(path)
  return trace


def _key(path: tuple) -> tuple[str, str]:
  """``(module path, "collection/module/name")`` of the variable at ``path`` (boxes'
  fields left out)."""
  keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
  return "/".join(keys[1:-1]), "/".join(keys)


def _spectral_names(key: Any, spec: Any, module: nn.Module, variables: Mapping) -> list[str]:
  """The params a spectral spec normalizes in ``module`` (none for a ``recursive`` root's name)."""
  if not isinstance(key, str):
    return _selected(variables, spec, module)
  own = module.variables.get("params", {}) if module.scope is not None else {}
  return [key] if not isinstance(own.get(key, None), Mapping | type(None)) else []


def _join(path: str, name: str) -> str:
  return f"{path}/{name}" if path else name


def _count(seen: dict[str, _Seen], path: str, new: _Seen) -> None:
  """Records a call of the layer at ``path`` on ``new.input_shape``; it runs ``new.calls`` times."""
  old = seen.get(path)
  if old is None or not old.calls:
    seen[path] = new if old is None else old._replace(input_shape=new.input_shape, calls=new.calls)
  elif _size_key(old) != _size_key(new):  # a conv's bound depends on its input size
    raise ValueError(
      f"{_AT}: the model calls '{path}' on inputs of shapes {old.input_shape} and "
      f"{new.input_shape}; a certificate covers one size per layer."
    )
  # else: the same layer's runs, counted already


def _size_key(seen: _Seen) -> tuple[int, ...]:
  """What of a layer's input shape its bound depends on: a Conv's spatial sizes; nothing
  for a dense layer (one size per batch, or with another batch); all of it otherwise."""
  base = _subclass.base_of(type(seen.module))
  if base is nn.Conv:
    n = len(seen.module.kernel_size)
    return seen.input_shape[-n - 1 : -1]
  return () if base in (nn.Dense, nn.DenseGeneral) else seen.input_shape


def _record_module(modules: dict[str, _Seen], path: str, module: nn.Module) -> None:
  """Records ``module`` (uncounted: :func:`_trace_layers` counts its runs)."""
  old = modules.get(path)
  if old is None or _subclass.specs_of(type(module)):  # a wrapped (recursive) clone: its specs
    own = module.variables.get("params", {})
    shapes = {
      k: tuple(jnp.shape(meta.unbox(x))) for k, x in own.items() if not isinstance(x, Mapping)
    }
    calls = old.calls if old is not None else 0
    shape = old.input_shape if old is not None else ()
    modules[path] = _Seen(module, "", None, shape, calls, param_shapes=shapes)


def _selected(variables: Mapping[str, Any], spec: Any, module: nn.Module) -> list:
  """The params a selector spec normalized on ``module``: those with state not named by others."""
  node: Any = variables.get(spec.options.collection, {})
  for part in module.scope.path if module.scope is not None else ():
    node = node.get(part, {}) if isinstance(node, Mapping) else {}
  u = _options.SPECTRAL_SUFFIXES[0]
  names = [k[: -len(u)] for k, x in node.items() if k.endswith(u) and not isinstance(x, Mapping)]
  return [n for n in names if n not in _subclass.specs_of(type(module))]


def _node(tree: Any, path: str) -> Any:
  """The mapping at ``path`` (``"a/b"``) in ``tree``, or ``{}``."""
  for part in path.split("/") if path else ():
    tree = tree.get(part, {}) if isinstance(tree, Mapping) else {}
  return tree if isinstance(tree, Mapping) else {}


def _guarded(reasons: dict[str, str], path: str, bound: Callable[[], _T]) -> _T | None:
  """``bound()``, or None with the reason under ``path`` when the layer has no certificate."""
  try:
    return bound()
  except _UncertifiedError as e:
    reasons[path] = str(e)
  except _certify.UnsupportedError as e:  # an option, size or state Flax runs, no bound covers
    reasons[path] = f"no certified bound: {e}"
  return None


_BIASES = ("bias", "bias_g", "bias_v")  # biases (plain or weight-normed) of Flax's linear layers
_KERNELS = ("kernel", "kernel_g", "kernel_v")


def _plain_layer(
  seen: _Seen,
  path: str,
  variables: Mapping[str, Any],
  skip: tuple[set[str], set[str]],
  n_steps: int,
  layers: dict[str, tuple[jax.Array, float | None]],
  reasons: dict[str, str],
  followed: set[str],
  stacked: dict[str, tuple[str, float]],
) -> _Norm | None:
  """Adds the certified norm of a called module's kernel that spectral norm left plain.

  A certified layer's plain or weight-normed kernel gets a bound (its bias adds no
  factor), any other variable it holds a reason. Any other module holding
  variables is followed primitive by primitive, its variables' values known
  (``nn.ConvTranspose``, ``nn.Embed``, ``nn.BatchNorm``, a ``self.param``), and
  so is a certified kind whose options or code the layer bound does not cover (a
  subclass, a custom ``dot_general``, ``input_dilation``, ``REFLECT`` or negative
  padding, ``batch_dims``, a mask the model computes), and one whose params
  ``nn.scan``/``nn.vmap`` stacked (each step reads its own member).

  Args:
    seen: the module as the trace saw it.
    path: its path (``""`` at the top level).
    variables: the model's variables.
    skip: the spectral params' paths (bounded on their own), and the collections
      not to look at (the spectral state's, ``intermediates``).
    n_steps: Gram steps.
    layers: where the bound goes, under ``{path}/kernel``.
    reasons: where a reason goes when there is no bound.
    followed: where the path goes when the module is followed.
    stacked: where a stacked kernel's row goes: ``(path, runs)``, its norm read
      from the walk.

  Returns:
    The kernel's bounds for one run, or None.
  """
  spectral, cols = skip
  own = _own_variables(variables, path, cols)
  names = [f"{c}/{n}" for c, n in own if c != "params" or _join(path, n) not in spectral]
  if _subclass.base_of(type(seen.module)) not in _CERTIFIED:
    if names:
      followed.add(path)
    return None
  bound = None
  if _subclass.base_of(type(seen.module)) in _linen._LINEAR_LAYERS:
    names = [n for n in names if n not in [f"params/{b}" for b in _BIASES]]
  if "params/kernel" in names or {"params/kernel_g", "params/kernel_v"} <= set(names):
    names = [n for n in names if n not in [f"params/{k}" for k in _KERNELS]]
    params = _node(variables["params"], path)
    at = _join(path, "kernel")
    try:
      bound = _plain_bound(seen, params, path, n_steps)
    except _StackedError:
      followed.add(path)
      stacked[at] = (path, seen.calls)
    except (_UncertifiedError, _certify.UnsupportedError):  # an option or use no bound covers:
      followed.add(path)  # its kernel is known, bounded where the layer's code uses it
    if bound is not None:
      most = power(bound.norm, seen.calls)
      with np.errstate(over="ignore"):  # b ** runs beyond float32: inf
        layers[at] = (jnp.asarray(most, jnp.float32), most)
  if names:
    reasons[path or _TOP] = (
      f"{type(seen.module).__name__} holds {names}, which no certificate covers: only the "
      "kernels of nn.Dense, nn.DenseGeneral and nn.Conv (plain, weight-normed or spectrally "
      "normalized) and their biases are bounded"
    )
  return bound


def _own_variables(variables: Mapping[str, Any], path: str, cols: set[str]) -> list:
  """``(collection, name)`` of the variables of the module at ``path`` (not its submodules')."""
  found = []
  for col, tree in variables.items():
    if col not in cols:
      node = _node(tree, path)
      found += [(col, k) for k, x in node.items() if not isinstance(x, Mapping)]
  return found


def _plain_bound(seen: _Seen, params: Mapping[str, Any], path: str, n_steps: int) -> _Norm:
  """The certified bounds of a module's plain or weight-normed kernel."""
  at = _join(path, "kernel")
  if not seen.calls:
    raise _UncertifiedError(
      "the model used this layer only through methods other than __call__, which are not counted"
    )
  names = ("kernel",) if "kernel" in params else ("kernel_g", "kernel_v")
  for name in names:
    if _sliced(seen, params, name):
      raise _StackedError(f"{at}: {name} stacked by nn.scan or nn.vmap")
  w = meta.unbox(params["kernel"]) if "kernel" in params else _weight_normed(seen, params)
  w = jnp.asarray(w)  # as the layer sees it (float32 without x64)
  _checks.check_float_array(w, f"param '{at}'", _AT, complex_ok=False)
  return _kernel_bound(seen, np.asarray(w, np.float64), n_steps)


def _weight_normed(seen: _Seen, params: Mapping[str, Any]) -> jax.Array:
  """The kernel a weight-normed layer computes with: ``g * v / max(||v||, eps)``.

  ``eps`` is the layer's own when the trace saw its spec, else the smallest
  accepted: a smaller ``eps`` never gives a smaller kernel, so the bound holds.
  """
  specs = _subclass.specs_of(type(seen.module)).values()
  eps = min([s.options.eps for s in specs if s.method == "weight_norm"], default=1e-300)
  g, v = meta.unbox(params["kernel_g"]), meta.unbox(params["kernel_v"])
  return _math.weight_norm_compose(g, v, eps)


def _certified(
  seen: _Seen, variables: Mapping[str, Any], collection: str, path: str, n_steps: int
) -> _Norm:
  """Certified bounds of the kernel one wrapped layer computes with in evaluation."""
  parts = path.split("/")
  w = variables["params"]
  state = variables[collection]
  for part in parts[:-1]:
    w, state = w[part], state[part]
  w = jnp.asarray(meta.unbox(w[parts[-1]]))  # as the layer sees it (float32 without x64)
  # A certificate for a complex kernel is not implemented: refuse, never drop its imaginary part.
  _checks.check_float_array(w, f"param '{path}'", _AT, complex_ok=False)
  w64 = np.asarray(w, np.float64)
  bound = _kernel_bound(seen, w64, n_steps)
  u, v, sigma = (meta.unbox(state[k]) for k in _options.spectral_keys(seen.name))
  scale = _largest_scale(seen, path, w64, w.dtype, (u, v, sigma))
  return _Norm(bound.norm * scale, _spans.up(bound.gain * scale))


def _largest_scale(seen: _Seen, path: str, w: np.ndarray, w_dtype: Any, state: tuple) -> float:
  """The largest ``|scale|`` the layer can multiply its kernel by in evaluation.

  Not the scale recomputed here: the layer computes ``sigma`` (and ``target /
  sigma``) in its own dtype, with rounding that cancellation in ``u^T W v``
  magnifies (a float64 layer's sigma recomputed in float32 was off by 4e-5
  where a fixed margin allowed 1e-6). So sigma gets an interval that holds
  whatever order the layer sums in (a dot-product error bound, see
  ``_certify.eval_sigma_range``), and the scale its largest value over it.
  Operator mode divides by the stored sigma, known exactly.
  """
  u, v, sigma = state
  opts = seen.options
  if opts.operator:  # evaluation divides by the stored sigma, in its own dtype
    sigma = jnp.asarray(sigma)
    lo = hi = float(sigma)
    dtype = sigma.dtype
  else:
    # An axis mapping was resolved per submodule: the root's own params take "auto".
    axis = _axes.AUTO if isinstance(opts.axis, _axes.AxisMap) else opts.axis
    kept = _checks.normalize_axes(_axes.resolve(axis, seen.module, seen.name, path), w.ndim)
    dtype = _math.compute_dtype(w_dtype)  # power_iteration's, whatever the state's dtype
    lo, hi = _certify.eval_sigma_range(_certify.matrix_of(w, kept), u, v, opts.eps, dtype)
  return _certify.scale_bound(lo, hi, dtype, eps=opts.eps, mode=opts.mode, target=opts.target)


_CERTIFIED = (nn.Conv, nn.Dense, nn.DenseGeneral)


def _kernel_bound(seen: _Seen, w: np.ndarray, n_steps: int) -> _Norm:
  """Bounds of the kernel's own norms, for Flax's own layers run by their own code.

  A subclass may override ``__call__`` and a custom ``dot_general`` scale the
  product: neither is what the kernel's norm bounds; they raise
  :class:`_UncertifiedError`, as do the layers and options not certified.
  """
  m = seen.module
  base = _subclass.base_of(type(m))
  if base not in _CERTIFIED:
    raise _UncertifiedError(
      f"{base.__name__} is not certified: only nn.Dense, nn.DenseGeneral and nn.Conv are"
    )
  if not _linen.runs_flax_code(m, _CERTIFIED):
    raise _UncertifiedError(
      f"{type(m).__name__} does not run Flax's own {base.__name__} code (a subclass, or a custom "
      "dot_general, conv_general_dilated or promote_dtype): its kernel's norm does not bound it"
    )
  if getattr(m, "mask", None) is not None:  # the layer computes with w * mask
    if isinstance(m.mask, Tracer):
      raise _UncertifiedError(
        "its mask is traced (computed inside the model, or passed in through inputs), so the "
        "shape-only trace has no values for it: build the mask with numpy outside the model "
        "and give it to the layer as an attribute to certify the layer"
      )
    w = w * np.asarray(m.mask, np.float64)
  n_out = len(m.features) if base is nn.DenseGeneral and isinstance(m.features, tuple) else 1
  return _Norm(_operator_norm(seen, w, n_steps, n_out), _gain(w, n_out))


def _gain(w: np.ndarray, n_out: int) -> float:
  """The largest sum of ``|w|`` over the inputs of one of the last ``n_out`` axes'
  outputs, rounded up for float64's summation."""
  sums = np.abs(w).sum(axis=tuple(range(w.ndim - n_out)))
  n = w.size // max(sums.size, 1)
  return _spans.up(float(sums.max(initial=0.0)) * (1 + (n + 2) * 2.0**-52))


def _operator_norm(seen: _Seen, w: np.ndarray, n_steps: int, n_out: int) -> float:
  """The certified norm of a certified layer's (masked) kernel ``w`` (``n_out`` output axes)."""
  m = seen.module
  base = _subclass.base_of(type(m))
  if base is nn.Conv:
    if not _all_ones(getattr(m, "input_dilation", 1)):
      raise _UncertifiedError(f"nn.Conv with input_dilation={m.input_dilation!r} is not certified")
    spatial = w.ndim - 2  # (batch..., *spatial, features): the axes before the last
    return _certify.conv_norm_bound(
      w,
      seen.input_shape[-spatial - 1 : -1],
      strides=m.strides or 1,
      padding=m.padding,
      feature_group_count=m.feature_group_count,
      kernel_dilation=m.kernel_dilation or 1,
      n_steps=n_steps,
    )
  if base is nn.Dense:
    return _certify.matrix_norm_bound(w, axis=-1, n_steps=n_steps)
  if m.batch_dims:
    raise _UncertifiedError("nn.DenseGeneral with batch_dims is not certified")
  kept = tuple(range(w.ndim - n_out, w.ndim))
  return _certify.matrix_norm_bound(w, axis=kept, n_steps=n_steps)


def _all_ones(dilation: Any) -> bool:
  """Whether a Flax dilation (``None``, an int or one per axis) dilates nothing."""
  if dilation is None or isinstance(dilation, (int, np.integer)):
    return dilation in (None, 1)
  return all(d == 1 for d in dilation)


def _effective_norm(sigma: jax.Array, target: float, mode: str) -> jax.Array:
  """The spectral norm of ``w * scale`` for a kernel whose norm is ``sigma``."""
  sigma = jnp.asarray(sigma, jnp.float32)
  # |sigma * scale|: a negative stored sigma (a state not iterated yet) divides the kernel
  # by a negative number, which flips its sign but not its norm.
  return jnp.abs(sigma * _power.sigma_scale(sigma, mode=mode, target=target, at=_AT))
