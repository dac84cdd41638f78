"""Spectral norm in an NNX ``nnx.RNN``: the state advances once per call.

The semantics are PyTorch's ``nn.LSTM`` with a spectrally normed weight, as in
Linen (``flaxnorm._linen_scan``): in training, one ``n_power_iterations`` step
per call of the RNN, before its time loop, and every time step uses the same
normalized kernel (``sigma = u^T W v`` from the new vectors, differentiable
in ``W``); in evaluation nothing changes.

``nnx.RNN`` carries the cell's state through its ``nnx.scan``, so without this
a spectrally normed layer of the cell would iterate at every time step (its
``__call__`` cannot tell a time step from a call). :func:`adopt_rnns` gives
every ``nnx.RNN`` whose cell holds spectrally normed layers the class
:class:`RNN`, a subclass whose ``__call__`` runs the step for all of them
first, then the time loop with their iteration turned off
(``flaxnorm._nnx_layer.FROZEN``). ``flaxnorm.nnx.wrap_modules`` calls it.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from flaxnorm import _subclass
from flaxnorm._nnx_layer import FLAG, FROZEN, SpectralNormSpec


def _spectral_layers(module: nnx.Module) -> list[tuple[nnx.Module, str, SpectralNormSpec]]:
  out = []
  for _, m in nnx.iter_modules(module):
    for name, spec in _subclass.specs_of(type(m)).items():
      if isinstance(spec, SpectralNormSpec):
        out.append((m, name, spec))
  return out


class RNN(nnx.RNN):
  """``nnx.RNN`` whose spectrally normed cell layers iterate once per call, not per time step.

  Made by ``flaxnorm.nnx.wrap_modules``; see ``flaxnorm._nnx_scan``.
  """

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    for m, name, spec in _spectral_layers(self.cell):
      if not getattr(m, FLAG, False):  # training: the one step, stored
        v = vars(m)[spec.attrs(name)[1]][...]
        spec.update(m, name, tuple(v.shape))  # operator mode: v is one input example, as given
    token = FROZEN.set(True)
    try:
      return super().__call__(*args, **kwargs)
    finally:
      FROZEN.reset(token)


def adopt_rnns(model: nnx.Module) -> None:
  """Gives each plain ``nnx.RNN`` in ``model`` with spectrally normed cell layers the class :class:`RNN`."""
  for _, m in nnx.iter_modules(model):
    if type(m) is nnx.RNN and _spectral_layers(m.cell):
      object.__setattr__(m, "__class__", RNN)  # NNX's __setattr__ would record a field


def release_rnns(model: nnx.Module) -> None:
  """Gives each :class:`RNN` in ``model`` whose cell has no spectrally normed layer left ``nnx.RNN`` back."""
  for _, m in nnx.iter_modules(model):
    if type(m) is RNN and not _spectral_layers(m.cell):
      object.__setattr__(m, "__class__", nnx.RNN)
