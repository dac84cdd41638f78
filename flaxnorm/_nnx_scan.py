"""Spectral norm in an NNX ``nnx.RNN``: the state advances once per call.

The semantics are PyTorch's ``nn.LSTM`` with a spectrally normed weight, as in
Linen (``flaxnorm._linen_scan``): in training, one ``n_power_iterations`` step
per call of the RNN, before its time loop, and every time step uses the same
normalized kernel (``sigma = u^T W v`` from the new vectors, differentiable
in ``W``); in evaluation nothing changes.

``nnx.RNN`` carries the cell's state through its ``nnx.scan``, so without this
a spectrally normed layer of the cell would iterate at every time step (its
``__call__`` cannot tell a time step from a call). :func:`adopt_rnns` gives
each ``nnx.RNN`` (or subclass of it) whose cell holds layers just spectrally
normed a subclass of its class (:class:`RNN` for ``nnx.RNN`` itself) whose
``__call__`` runs the step for all of them first, then the time loop with
their iteration turned off (``flaxnorm._nnx_layer.FROZEN``).
``flaxnorm.nnx.wrap_modules`` calls it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flax import nnx

from flaxnorm import _subclass
from flaxnorm._nnx_layer import FLAG, FROZEN, SpectralNormSpec, class_keywords


def _spectral_layers(module: nnx.Module) -> list[tuple[nnx.Module, str, SpectralNormSpec]]:
  out = []
  for _, m in nnx.iter_modules(module):
    for name, spec in _subclass.specs_of(type(m)).items():
      if isinstance(spec, SpectralNormSpec):
        out.append((m, name, spec))
  return out


def _call_once(self: Any, *args: Any, **kwargs: Any) -> Any:
  """``__call__`` of an adopted RNN: the one step of each spectral cell layer, then the loop."""
  for m, name, spec in _spectral_layers(self.cell):
    if not getattr(m, FLAG, False):  # training: the one step, stored
      v = vars(m)[spec.attrs(name)[1]][...]
      spec.update(m, name, tuple(v.shape))  # operator mode: v is one input example, as given
  token = FROZEN.set(True)
  try:
    return type(self)._flaxnorm_rnn_base.__call__(self, *args, **kwargs)
  finally:
    FROZEN.reset(token)


class RNN(nnx.RNN):
  """``nnx.RNN`` whose spectrally normed cell layers iterate once per call, not per time step.

  Made by ``flaxnorm.nnx.wrap_modules``; see ``flaxnorm._nnx_scan``.
  """

  _flaxnorm_rnn_base = nnx.RNN
  __call__ = _call_once


_ADOPTED: dict[type, type] = {nnx.RNN: RNN}


def adopted_class(base: type) -> type:
  """The cached subclass of ``base`` (``nnx.RNN`` or a subclass) with :func:`_call_once`."""
  if base not in _ADOPTED:
    body = {
      "__call__": _call_once,
      "_flaxnorm_rnn_base": base,
      "_flaxnorm_rebuild": classmethod(
        lambda cls: (adopted_class, (vars(cls)["_flaxnorm_rnn_base"],))
      ),
    }
    _ADOPTED[base] = _subclass.subclass(base, body, class_keywords(base))
  return _ADOPTED[base]


def _adopted(m: nnx.Module) -> bool:
  return "_flaxnorm_rnn_base" in vars(type(m))


def adopt_rnns(model: nnx.Module, wrapped: Iterable[nnx.Module]) -> None:
  """Adopts each ``nnx.RNN`` in ``model`` whose cell holds a spectrally normed layer of ``wrapped``.

  An RNN whose cell layers were wrapped on their own, by another call, keeps
  its class (and iterates at every time step, as documented).
  """
  ids = {id(m) for m in wrapped if _spectral_layers(m)}
  for _, m in nnx.iter_modules(model):
    cell = getattr(m, "cell", None) if isinstance(m, nnx.RNN) and not _adopted(m) else None
    if cell is not None and any(id(c) in ids for _, c in nnx.iter_modules(cell)):
      object.__setattr__(m, "__class__", adopted_class(type(m)))  # NNX's __setattr__ records fields


def release_rnns(model: nnx.Module) -> None:
  """Gives each adopted RNN in ``model`` whose cell has no spectrally normed layer left its class back."""
  for _, m in nnx.iter_modules(model):
    if isinstance(m, nnx.RNN) and _adopted(m) and not _spectral_layers(m.cell):
      object.__setattr__(m, "__class__", vars(type(m))["_flaxnorm_rnn_base"])
