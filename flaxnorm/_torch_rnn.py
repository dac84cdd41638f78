"""PyTorch recurrent modules (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``) and Flax cells: the array side.

PyTorch packs each recurrent layer's gates into one matrix per side::

  weight_ih_l{k}[_reverse]   (G*H, I)    bias_ih_l{k}[_reverse]   (G*H,)
  weight_hh_l{k}[_reverse]   (G*H, H)    bias_hh_l{k}[_reverse]   (G*H,)

with ``G`` gates: 4 for an LSTM (i, f, g, o), 3 for a GRU (r, z, n), 1 for a
plain RNN. A weight norm or spectral norm on one of them keeps PyTorch's key
styles with the weight's name in place of ``weight``
(``weight_hh_l0_g``, ``parametrizations.weight_hh_l0.original0``, ...).

Flax cells hold one Dense per gate and side (Linen ``LSTMCell``,
``OptimizedLSTMCell``, ``GRUCell``, ``SimpleCell``; NNX ``LSTMCell``) or one
packed Linear per side in PyTorch's gate order (NNX ``OptimizedLSTMCell``,
``GRUCell``, ``SimpleCell``). Each side of a cell is converted as ``linear``
layers, one per Flax child, with the rows of its gates; this module finds the
layout, slices and joins the tensors, and moves the biases: Flax keeps one
bias where PyTorch adds two (``b_ih + b_hh``), except for a GRU's ``n`` gate,
whose hidden term is multiplied by ``r`` and keeps its own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from flaxnorm._torch_keys import join, named, split_named

#: Gates per kind, in PyTorch's packed order.
GATES = {"lstm": "ifgo", "gru": "rzn", "rnn": "h"}
KIND_OF_GATES = {len(g): kind for kind, g in GATES.items()}
#: Gates whose hidden term is not summed with the input term: their biases stay apart.
_APART = {"gru": "n"}

_NAME = re.compile(r"weight_(ih|hh|hr)_l(\d+)(_reverse)?")
_BIAS = re.compile(r"(?:(.*)\.)?bias_(ih|hh|hr)_l(\d+)(_reverse)?")


class RnnKey(NamedTuple):
  """One key of a PyTorch recurrent module, read as a key of a ``linear`` layer.

  Attributes:
    module: the module's prefix (``"encoder.lstm"``; ``""`` at the root).
    layer: the layer index ``k`` of ``_l{k}``.
    reverse: whether it is the backward direction (``_reverse``).
    side: ``"ih"``, ``"hh"`` or ``"hr"`` (an LSTM's projection).
    key: the key as a linear layer's: ``"weight"``, ``"weight_g"``,
      ``"parametrizations.weight.original0"``, ``"bias"``, ...
  """

  module: str
  layer: int
  reverse: bool
  side: str
  key: str

  @property
  def cell(self) -> str:
    """The cell's name: ``"lstm.l0"``, ``"lstm.l0_reverse"``."""
    return join(self.module, f"l{self.layer}{'_reverse' if self.reverse else ''}")

  @property
  def prefix(self) -> str:
    """The PyTorch name of the side's weight: ``"lstm.weight_hh_l0"``."""
    return join(self.module, self.param)

  @property
  def param(self) -> str:
    return f"weight_{self.side}_l{self.layer}{'_reverse' if self.reverse else ''}"


def split_rnn_key(key: str) -> RnnKey | None:
  """``"lstm.weight_hh_l0_g"`` -> ``RnnKey("lstm", 0, False, "hh", "weight_g")``; ``None`` if no RNN key."""
  if m := _BIAS.fullmatch(key):
    return RnnKey(m[1] or "", int(m[3]), bool(m[4]), m[2], "bias")
  split = split_named(key, _NAME.pattern.replace("(", "(?:"))
  if split is None:
    return None
  module, name, std = split
  m = _NAME.fullmatch(name)
  assert m is not None
  return RnnKey(module, int(m[2]), bool(m[3]), m[1], std)


def rnn_key(std: str, param: str) -> str:
  """The inverse of :func:`split_rnn_key` for one side: ``("weight_g", "weight_hh_l0")`` -> ``"weight_hh_l0_g"``."""
  return param.replace("weight", "bias", 1) if std == "bias" else named(std, param)


class Layout(NamedTuple):
  """Where a Flax cell keeps each side's gates: one child per gate, or one packed child."""

  kind: str
  ih: tuple[str, ...]
  hh: tuple[str, ...]
  cls: str  # for messages

  def children(self, side: str) -> tuple[str, ...]:
    return self.ih if side == "ih" else self.hh

  def gates_of(self, side: str) -> list[tuple[str, str]]:
    """``(child, gates)`` per child of ``side``, gates as letters in packed order."""
    names, gates = self.children(side), GATES[self.kind]
    return [(names[0], gates)] if len(names) == 1 else list(zip(names, gates, strict=True))


LAYOUTS = (
  Layout("lstm", ("ii", "if", "ig", "io"), ("hi", "hf", "hg", "ho"), "Linen (Optimized)LSTMCell"),
  Layout("lstm", ("ii", "if_", "ig", "io"), ("hi", "hf", "hg", "ho"), "NNX LSTMCell"),
  Layout("lstm", ("dense_i",), ("dense_h",), "NNX OptimizedLSTMCell"),
  Layout("gru", ("ir", "iz", "in"), ("hr", "hz", "hn"), "Linen GRUCell"),
  Layout("gru", ("dense_i",), ("dense_h",), "NNX GRUCell"),
  Layout("rnn", ("i",), ("h",), "Linen SimpleCell"),
  Layout("rnn", ("dense_i",), ("dense_h",), "NNX SimpleCell"),
)


def layout_of(kind: str, node: Mapping[str, Any]) -> Layout | None:
  """The layout of ``kind`` whose children the cell's params ``node`` all has."""
  return next(
    (lay for lay in LAYOUTS if lay.kind == kind and set(lay.ih + lay.hh) <= set(node)), None
  )


def expected_children(kind: str) -> str:
  """The layouts of ``kind``, for messages."""
  return "; ".join(
    f"{lay.cls}: {', '.join(lay.ih + lay.hh)}" for lay in LAYOUTS if lay.kind == kind
  )


def rows(gates: str, kind: str, hidden: int) -> np.ndarray:
  """The packed rows of ``gates`` in a ``(G*hidden, ...)`` PyTorch tensor of ``kind``."""
  return np.concatenate([np.arange(hidden) + GATES[kind].index(g) * hidden for g in gates])


def _has_bias(node: Mapping[str, Any], child: str) -> bool:
  sub = node.get(child)
  return isinstance(sub, Mapping) and "bias" in sub


def flax_biases(
  layout: Layout,
  node: Mapping[str, Any],
  b_ih: np.ndarray,
  b_hh: np.ndarray,
  hidden: int,
) -> tuple[dict[tuple[str, str], np.ndarray], list[tuple[str, str]]]:
  """PyTorch's two biases as the Flax cell's: ``(side, child) -> bias`` for each child with one.

  A gate's two biases are summed into the side that has a bias, except a
  GRU's ``n`` gate, whose biases stay on their sides.

  Returns:
    The biases, and ``(gate, side)`` of each nonzero PyTorch bias part with no
    Flax bias to go to (the cell cannot hold it).
  """
  out: dict[tuple[str, str], list[np.ndarray]] = {}
  lost: list[tuple[str, str]] = []
  slot = {
    (side, g): child
    for side in ("ih", "hh")
    for child, gates in layout.gates_of(side)
    for g in gates
  }
  for side in ("ih", "hh"):
    for child, _ in layout.gates_of(side):
      if _has_bias(node, child):
        out[side, child] = []
  for g in GATES[layout.kind]:
    r = rows(g, layout.kind, hidden)
    parts = {"ih": b_ih[r], "hh": b_hh[r]}
    if g not in _APART.get(layout.kind, ""):
      home = next((s for s in ("hh", "ih") if (s, slot[s, g]) in out), None)
      parts = {
        s: (parts["ih"] + parts["hh"] if s == home else np.zeros_like(parts[s])) for s in parts
      }
      if home is None and np.any(parts["ih"] + parts["hh"] != 0):
        lost.append((g, "ih+hh"))
    for s, part in parts.items():
      if (s, slot[s, g]) in out:
        out[s, slot[s, g]].append(part)
      elif np.any(part != 0):
        lost.append((g, s))
  return {key: np.concatenate(ps) for key, ps in out.items()}, lost


def torch_bias(
  layout: Layout, biases: Mapping[str, np.ndarray], side: str, hidden: int, dtype: Any
) -> np.ndarray:
  """PyTorch's ``bias_{side}`` from the Flax cell's biases (``child -> bias``, the children with one).

  A summed gate's bias is written on the side Flax keeps it on, and zeros (of
  ``dtype``, the weight's) on the other: PyTorch adds the two, so the outputs
  are the same.
  """
  parts = []
  for child, gates in layout.gates_of(side):
    bias = biases.get(child)
    for i, _ in enumerate(gates):
      parts.append(
        np.zeros(hidden, dtype) if bias is None else np.asarray(bias)[i * hidden : (i + 1) * hidden]
      )
  return np.concatenate(parts)
