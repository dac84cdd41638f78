"""Reports on spectrally normalized models: the stored sigmas and a Lipschitz bound.

These read variables (a Linen ``spectral`` collection, or the same layout from
``flaxnorm.tree``); ``flaxnorm.nnx.spectral_sigmas`` reads an NNX model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from flaxnorm import _axes, _certify, _checks, _fold, _operator, _options, _power, _subclass
from flaxnorm import linen as _linen


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

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import flaxnorm
    >>> model = nn.Sequential([flaxnorm.spectral_norm(nn.Dense(4)), nn.relu,
    ...                        flaxnorm.spectral_norm(nn.Dense(2))])
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> sorted(flaxnorm.spectral_sigmas(variables))
    ['layers_0/kernel', 'layers_2/kernel']
  """
  state = variables.get(collection, variables) if isinstance(variables, Mapping) else None
  if not isinstance(state, Mapping):
    raise TypeError(
      f"spectral_sigmas: variables must be a mapping with a '{collection}' collection, got "
      f"{type(variables).__name__}."
    )
  entries = _fold.spectral_entries(state, "spectral_sigmas")
  return {"/".join((*path, name)): meta.unbox(s) for path, name, (_, _, s) in entries}


class LipschitzBound(NamedTuple):
  """What :func:`lipschitz_bound` reports.

  Attributes:
    estimate: shape ``()``: the product of the layers' effective norms from the
      stored sigmas (``target``, or ``min(sigma, target)`` with ``"clip"``).
    certified: the product of certified upper bounds of what each layer
      computes (Gram iteration), or ``None`` when no model was given.
    layers: per param path (``"Dense_0/kernel"``): ``(estimate, certified)``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import flaxnorm
    >>> variables = flaxnorm.spectral_norm(nn.Dense(2)).init(jax.random.key(0), jnp.ones((1, 3)))
    >>> estimate, certified, layers = flaxnorm.lipschitz_bound(variables)
    >>> list(layers), certified
    (['kernel'], None)
  """

  estimate: jax.Array
  certified: float | None
  layers: dict[str, tuple[jax.Array, float | None]]


def lipschitz_bound(
  variables: Mapping[str, Any],
  collection: str = "spectral",
  *,
  target: float = 1.0,
  mode: str = "normalize",
  model: nn.Module | None = None,
  inputs: tuple[Any, ...] = (),
  n_gram_steps: int | None = None,
) -> LipschitzBound:
  """The Lipschitz constant of a feed-forward chain after spectral norm: estimate and bound.

  Each spectrally normalized layer's effective norm is ``target`` with
  ``mode="normalize"`` and ``min(sigma, target)`` with ``"clip"`` (sigma the
  stored estimate); the estimate is their product. It holds for a *chain*
  ``f = f_L ∘ a ∘ ... ∘ a ∘ f_1`` whose activations ``a`` are 1-Lipschitz (ReLU,
  leaky ReLU, tanh, ...), whose every linear layer is spectrally normalized, and
  with no skip connections or normalization layers: those change the constant.
  Power iteration's sigma is a lower estimate of a kernel's norm, and the kernel
  mode's matrix view is not a convolution's operator norm, so the estimate is
  not a certificate.

  With ``model`` and ``inputs`` the bound is also *certified*: the model is
  traced shape-only on ``inputs`` to learn each wrapped layer's kind, options
  and input size, and each layer gets a guaranteed upper bound on the norm of
  what it computes in evaluation (Gram iteration on the kernel's matrix, or on
  a convolution's FFT-domain blocks, times the layer's scale ``target /
  sigma``). Certified layers: ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Conv``
  (any strides, padding, groups, dilation, ``mask``) run by Flax's own code;
  for any other wrapped layer (a subclass, a custom ``dot_general`` or
  ``conv_general_dilated``, another layer) its certificate, and the product,
  are ``None``. A layer the model calls ``k`` times (weight tying) counts ``k``
  times; on inputs of different sizes it is refused. Layers stacked by
  ``nn.scan``/``nn.vmap`` (a state with a stack axis) are refused: bound each
  member's variables.

  Args:
    variables: Linen variables with ``collection`` (or the collection itself).
    collection: the collection holding the spectral state.
    target: the ``target`` the layers were wrapped with (without ``model``;
      with it, each layer's own).
    mode: the ``mode`` the layers were wrapped with (likewise).
    model: the Linen model the variables belong to, for the certificate.
    inputs: example inputs of ``model.apply`` (shapes matter, not values).
    n_gram_steps: Gram iterations per layer (default
      ``flaxnorm.DEFAULT_GRAM_STEPS``: within 1% of the true norm for
      Gaussian kernels).

  Returns:
    A :class:`LipschitzBound`.

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
  _checks.check_mode(mode, "lipschitz_bound")
  target = _checks.check_target(target, "lipschitz_bound")
  if model is not None and not isinstance(inputs, tuple):
    raise TypeError(
      f"lipschitz_bound: inputs must be a tuple of model.apply's arguments, e.g. (x,), "
      f"got {type(inputs).__name__}."
    )
  sigmas = spectral_sigmas(variables, collection)
  for path, sigma in sigmas.items():
    if jnp.ndim(sigma):
      raise ValueError(
        f"lipschitz_bound: the state at '{path}' holds {jnp.shape(sigma)} sigmas (a layer "
        "stacked by nn.scan or nn.vmap): its bound is not one layer's. Bound each member's "
        "variables on their own."
      )
  layers_seen = _trace_layers(model, variables, inputs) if model is not None else {}
  steps = _certify.DEFAULT_GRAM_STEPS if n_gram_steps is None else n_gram_steps
  layers: dict[str, tuple[jax.Array, float | None]] = {}
  for path, sigma in sigmas.items():
    seen = layers_seen.get(path)
    options = seen.options if seen is not None else None
    estimate = _effective_norm(
      sigma, options.target if options else target, options.mode if options else mode
    )
    certified = _certified(seen, variables, collection, path, steps) if seen else None
    if seen is not None and seen.calls > 1:  # a chain through it k times: k factors
      estimate = estimate**seen.calls
      certified = None if certified is None else certified**seen.calls
    layers[path] = (estimate, certified)
  estimate = jnp.ones((), jnp.float32)
  for norm, _ in layers.values():
    estimate = estimate * norm
  certified: float | None = None
  if model is not None and all(c is not None for _, c in layers.values()):
    certified = 1.0
    for _, c in layers.values():
      certified *= c or 0.0
  return LipschitzBound(estimate, certified, layers)


class _Seen(NamedTuple):
  """A wrapped layer as the model's trace saw it."""

  module: nn.Module
  name: str
  options: Any  # flaxnorm._options.SpectralNormOptions
  input_shape: tuple[int, ...]
  calls: int = 1  # how many times the model calls it


def _trace_layers(
  model: nn.Module, variables: Mapping[str, Any], inputs: tuple
) -> dict[str, _Seen]:
  """Runs ``model.apply`` shape-only; records every spectrally normalized layer's call."""
  seen: dict[str, _Seen] = {}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    specs = _subclass.specs_of(type(module))
    if context.method_name == "__call__" and args and module.scope is not None:
      for key, spec in specs.items():
        if spec.method != "spectral_norm":
          continue
        names = [key] if isinstance(key, str) else _selected(variables, spec, module, specs)
        for name in names:
          path = "/".join((*map(str, module.scope.path), name))
          shape = tuple(jnp.shape(args[0]))
          if path not in seen:
            seen[path] = _Seen(module, name, spec.options, shape)
          elif seen[path].input_shape != shape:  # a conv's bound depends on its input size
            raise ValueError(
              f"lipschitz_bound: the model calls '{path}' on inputs of shapes "
              f"{seen[path].input_shape} and {shape}; a certificate covers one size per layer."
            )
          else:
            seen[path] = seen[path]._replace(calls=seen[path].calls + 1)
    return next_fun(*args, **kwargs)

  def run(variables):
    with nn.intercept_methods(interceptor):
      return model.apply(variables, *inputs)

  jax.eval_shape(run, dict(variables))
  return seen


def _selected(variables: Mapping[str, Any], spec: Any, module: nn.Module, specs: dict) -> list:
  """The params a selector spec normalized on ``module``: those with state not named by others."""
  node: Any = variables.get(spec.options.collection, {})
  for part in module.scope.path if module.scope is not None else ():
    node = node.get(part, {}) if isinstance(node, Mapping) else {}
  u = _options.SPECTRAL_SUFFIXES[0]
  names = [k[: -len(u)] for k, x in node.items() if k.endswith(u) and not isinstance(x, Mapping)]
  return [n for n in names if n not in specs]


def _certified(
  seen: _Seen, variables: Mapping[str, Any], collection: str, path: str, n_steps: int
) -> float | None:
  """A certified bound on the norm of what one wrapped layer computes in evaluation."""
  parts = path.split("/")
  w = variables["params"]
  state = variables[collection]
  for part in parts[:-1]:
    w, state = w[part], state[part]
  w = meta.unbox(w[parts[-1]])
  # A certificate for a complex kernel is not implemented: refuse, never drop its imaginary part.
  _checks.check_float_array(w, f"param '{path}'", "lipschitz_bound", complex_ok=False)
  w = np.asarray(w, np.float64)
  bound = _kernel_bound(seen, w, n_steps)
  if bound is None:
    return None
  u, v, sigma = (meta.unbox(state[k]) for k in _options.spectral_keys(seen.name))
  opts = seen.options
  if opts.operator:
    scale = _operator.eval_scale(sigma, opts)
  else:
    # An axis mapping was resolved per submodule: the root's own params take "auto".
    axis = _axes.AUTO if isinstance(opts.axis, _axes.AxisMap) else opts.axis
    kept = _checks.normalize_axes(_axes.resolve(axis, seen.module, seen.name, path), w.ndim)
    scale, _ = _power.spectral_scale(
      jnp.asarray(w, jnp.float32), u, v, axis=kept, n_steps=0, eps=opts.eps, mode=opts.mode,
      target=opts.target,
    )  # fmt: skip
  return bound * abs(float(scale)) * (1 + 1e-6)  # the scale is float32: its rounding


def _kernel_bound(seen: _Seen, w: np.ndarray, n_steps: int) -> float | None:
  """A bound on the kernel's own norm, for Flax's own layers run by their own code; else None.

  A subclass may override ``__call__`` and a custom ``dot_general`` scale the
  product: neither is what the kernel's norm bounds.
  """
  m = seen.module
  if not _linen.runs_flax_code(m, (nn.Conv, nn.Dense, nn.DenseGeneral)):
    return None
  base = _subclass.base_of(type(m))
  if getattr(m, "mask", None) is not None:  # the layer computes with w * mask
    w = w * np.asarray(m.mask, np.float64)
  if base is nn.Conv and getattr(m, "input_dilation", 1) in (1, None):
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
  if base is nn.DenseGeneral and not m.batch_dims:
    n_out = len(m.features) if isinstance(m.features, tuple) else 1
    kept = tuple(range(w.ndim - n_out, w.ndim))
    return _certify.matrix_norm_bound(w, axis=kept, n_steps=n_steps)
  return None


def _effective_norm(sigma: jax.Array, target: float, mode: str) -> jax.Array:
  """The spectral norm of ``w * scale`` for a kernel whose norm is ``sigma``."""
  sigma = jnp.asarray(sigma, jnp.float32)
  return jnp.abs(sigma) * _power.sigma_scale(sigma, mode=mode, target=target, at="lipschitz_bound")
