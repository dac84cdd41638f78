"""Reports on spectrally normalized models: the stored sigmas and a Lipschitz bound.

These read variables (a Linen ``spectral`` collection, or the same layout from
``flaxnorm.tree``); ``flaxnorm.nnx.spectral_sigmas`` reads an NNX model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax.core import meta

from flaxnorm import _checks, _fold, _math


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

  Args:
    variables: Linen variables with ``collection`` (or the collection itself).
    collection: the collection holding the spectral state.
    target: the ``target`` the layers were wrapped with.
    mode: the ``mode`` the layers were wrapped with.

  Returns:
    A :class:`LipschitzBound`.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import flaxnorm
    >>> model = nn.Sequential([flaxnorm.spectral_norm(nn.Dense(4), target=2.0), nn.relu,
    ...                        flaxnorm.spectral_norm(nn.Dense(2), target=2.0)])
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> float(flaxnorm.lipschitz_bound(variables, target=2.0).estimate)
    4.0

  References:
    Gouk, Frank, Pfahringer & Cree, "Regularisation of Neural Networks by
    Enforcing Lipschitz Continuity", Machine Learning 110, 2021.
  """
  _checks.check_mode(mode, "lipschitz_bound")
  target = _checks.check_target(target, "lipschitz_bound")
  layers: dict[str, tuple[jax.Array, float | None]] = {
    path: (_effective_norm(s, target, mode), None)
    for path, s in spectral_sigmas(variables, collection).items()
  }
  estimate = jnp.ones((), jnp.float32)
  for norm, _ in layers.values():
    estimate = estimate * norm
  return LipschitzBound(estimate, None, layers)


def _effective_norm(sigma: jax.Array, target: float, mode: str) -> jax.Array:
  """The spectral norm of ``w * scale`` for a kernel whose norm is ``sigma``."""
  sigma = jnp.asarray(sigma, jnp.float32)
  return jnp.abs(sigma) * _math.sigma_scale(sigma, mode=mode, target=target, at="lipschitz_bound")
