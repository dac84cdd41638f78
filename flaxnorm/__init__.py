"""flaxnorm: weight norm and spectral norm for JAX and Flax, as pure functional transforms."""

# The other faces are submodules: flaxnorm.nnx, flaxnorm.tree, flaxnorm.interop.
from flaxnorm import interop, nnx, tree
from flaxnorm._certify import DEFAULT_GRAM_STEPS, conv_norm_bound, matrix_norm_bound
from flaxnorm._math import l2_normalize, weight_norm_compose, weight_norm_decompose
from flaxnorm._operator import operator_power_iteration
from flaxnorm._power import (
  DEFAULT_N_INIT_ITERATIONS,
  SpectralState,
  as_matrix,
  power_iteration,
  scale_by_sigma,
  spectral_normalize,
  spectral_state_init,
)
from flaxnorm._reports import LipschitzBound, lipschitz_bound, spectral_sigmas
from flaxnorm.linen import remove_spectral_norm, remove_weight_norm, spectral_norm, weight_norm

__version__ = "0.1.0"

__all__ = (
  "DEFAULT_GRAM_STEPS",
  "DEFAULT_N_INIT_ITERATIONS",
  "LipschitzBound",
  "SpectralState",
  "as_matrix",
  "conv_norm_bound",
  "interop",
  "l2_normalize",
  "lipschitz_bound",
  "matrix_norm_bound",
  "nnx",
  "operator_power_iteration",
  "power_iteration",
  "remove_spectral_norm",
  "remove_weight_norm",
  "scale_by_sigma",
  "spectral_norm",
  "spectral_normalize",
  "spectral_sigmas",
  "spectral_state_init",
  "tree",
  "weight_norm",
  "weight_norm_compose",
  "weight_norm_decompose",
)
