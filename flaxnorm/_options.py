"""The options of the two transforms, checked once and shared by every face.

Each face (Linen, NNX, tree) builds one frozen options value from its
arguments; construction validates and canonicalizes them (a list ``axis``
becomes a tuple, counts are ints, ...), so the faces never check an option
themselves and two equal settings compare (and hash, for class caches) equal.
The names of the variables each transform creates are here too, in one table.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from flaxnorm import _axes, _checks
from flaxnorm._axes import AxisOption
from flaxnorm._power import DEFAULT_N_INIT_ITERATIONS

#: Params that replace a weight-normalized ``{name}``: ``{name}_g``, ``{name}_v``.
WEIGHT_NORM_SUFFIXES = ("_g", "_v")
#: Spectral state of a param ``{name}``: ``{name}_u``, ``{name}_v``, ``{name}_sigma``.
SPECTRAL_SUFFIXES = ("_u", "_v", "_sigma")


def weight_norm_keys(name: str) -> tuple[str, str]:
  """``({name}_g, {name}_v)``."""
  g, v = WEIGHT_NORM_SUFFIXES
  return name + g, name + v


def spectral_keys(name: str) -> tuple[str, str, str]:
  """``({name}_u, {name}_v, {name}_sigma)``."""
  u, v, sigma = SPECTRAL_SUFFIXES
  return name + u, name + v, name + sigma


@dataclasses.dataclass(frozen=True)
class WeightNormOptions:
  """Weight norm's options, validated at construction.

  Attributes:
    axis: the kept axis or axes (PyTorch's ``dim``), ``None`` for one norm of
      the whole tensor, ``"auto"`` for the layer's output-feature axes, a
      callable ``(module, param_name) -> axis``, or (recursive wrapping) an
      :class:`flaxnorm._axes.AxisMap` by submodule.
    eps: lower bound on ``||v||`` (> 0).
    recursive: Linen only: also reach the params of the layer's submodules.
    data_init: Linen only: set ``g`` and the bias from the init batch at
      ``init`` (Salimans & Kingma, 2016, §3.3; see ``flaxnorm._data_init``).
    init_scale: the std per output feature that ``data_init`` gives (> 0, finite).
    at: the public function the options came from, for error messages (not
      part of equality).
  """

  axis: AxisOption = _axes.AUTO
  eps: float = 1e-12
  recursive: bool = False
  data_init: bool = False
  init_scale: float = 1.0
  at: str = dataclasses.field(default="weight_norm", compare=False, repr=False)
  method: ClassVar[str] = "weight_norm"

  def __post_init__(self):
    _set(self, "axis", _axes.canonical(self.axis, self.at, allow_none=True))
    _set(self, "eps", _checks.check_eps(self.eps, self.at))
    _set(self, "recursive", _checks.check_bool(self.recursive, "recursive", self.at))
    _set(self, "data_init", _checks.check_bool(self.data_init, "data_init", self.at))
    _set(self, "init_scale", _checks.check_init_scale(self.init_scale, self.at))


@dataclasses.dataclass(frozen=True)
class SpectralNormOptions:
  """Spectral norm's options, validated at construction.

  Attributes:
    axis: the kept (output) axis or axes, the rows of the matrix view;
      ``"auto"``, a callable or an ``AxisMap`` as for weight norm.
    n_power_iterations: iterations per training call (>= 1).
    n_init_iterations: iterations when the state is created (>= 0).
    eps: norms at or below it count as zero (> 0).
    collection: the Linen collection (and tree key) holding the state.
    mode: ``"normalize"`` (``w * target / sigma``) or ``"clip"``
      (``w * min(1, target / sigma)``).
    target: the spectral norm to normalize (or clip) to (> 0, finite).
    operator: iterate through the layer's own linear map (its true operator
      norm, e.g. a convolution's) instead of the kernel's matrix view.
    recursive: Linen only: also reach the params of the layer's submodules.
    at: the public function the options came from, for error messages.
  """

  axis: AxisOption = _axes.AUTO
  n_power_iterations: int = 1
  n_init_iterations: int = DEFAULT_N_INIT_ITERATIONS
  eps: float = 1e-12
  collection: str = "spectral"
  mode: str = "normalize"
  target: float = 1.0
  operator: bool = False
  recursive: bool = False
  at: str = dataclasses.field(default="spectral_norm", compare=False, repr=False)
  method: ClassVar[str] = "spectral_norm"

  def __post_init__(self):
    at = self.at
    _set(self, "axis", _axes.canonical(self.axis, at, allow_none=False))
    n = _checks.check_count(self.n_power_iterations, "n_power_iterations", 1, at)
    _set(self, "n_power_iterations", n)
    n = _checks.check_count(self.n_init_iterations, "n_init_iterations", 0, at)
    _set(self, "n_init_iterations", n)
    _set(self, "eps", _checks.check_eps(self.eps, at, spectral=True))
    _set(self, "collection", _checks.check_collection(self.collection, at))
    _set(self, "mode", _checks.check_mode(self.mode, at))
    _set(self, "target", _checks.check_target(self.target, at))
    _set(self, "operator", _checks.check_bool(self.operator, "operator", at))
    _set(self, "recursive", _checks.check_bool(self.recursive, "recursive", at))


def _set(options: object, field: str, value: object) -> None:
  object.__setattr__(options, field, value)  # frozen: canonicalize in place once
