"""PyTorch ``nn.MultiheadAttention`` and Flax's attention modules: the key side.

PyTorch keeps, under the module's prefix::

  in_proj_weight   (3E, E)   the q, k, v rows packed (when kdim = vdim = E)
  q_proj_weight    (E, E)    or one weight each (kdim or vdim another size)
  k_proj_weight    (E, kdim)
  v_proj_weight    (E, vdim)
  in_proj_bias     (3E,)     with bias=True
  out_proj.weight  (E, E)    a Linear, and out_proj.bias
  bias_k, bias_v   (1, 1, E) with add_bias_kv=True: no Flax module has them

Flax's ``nn.MultiHeadDotProductAttention``, ``nn.SelfAttention`` and
``nnx.MultiHeadAttention`` hold ``query``, ``key`` and ``value`` (kernel
``(in, H, D)``, bias ``(H, D)``) and ``out`` (kernel ``(H, D, E)``). Each part
loads as a ``linear`` layer through its kernel's ``(in, out)`` view, ``q``,
``k`` and ``v`` from their rows of the packed weight. Both compute
``softmax(q k^T / sqrt(D)) v`` per head, head ``h`` on features
``h*D:(h+1)*D``, so the outputs are the same.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from flaxnorm._torch_keys import split_named

#: Flax's parts, in PyTorch's packed order.
PARTS = ("query", "key", "value")
#: PyTorch's weights of one part each, when they are not packed.
OWN = {"q_proj_weight": "query", "k_proj_weight": "key", "v_proj_weight": "value"}
WEIGHTS = ("in_proj_weight", *OWN)
#: Flax attention classes, Linen and NNX.
CLASSES = ("MultiHeadDotProductAttention", "SelfAttention", "MultiHeadAttention")

_OTHER = re.compile(r"(?:(.*)\.)?(in_proj_bias|bias_k|bias_v)")


class AttentionKey(NamedTuple):
  """One key of a PyTorch ``nn.MultiheadAttention`` (not its ``out_proj``).

  Attributes:
    module: the module's prefix (``"blocks.0.attn"``).
    name: ``"in_proj_weight"``, ``"q_proj_weight"``, ... ``"in_proj_bias"``,
      ``"bias_k"`` or ``"bias_v"``.
    key: the key as a linear layer's (``"weight"``, ``"weight_g"``, ...;
      ``"bias"`` for the others).
  """

  module: str
  name: str
  key: str


def split_attention_key(key: str) -> AttentionKey | None:
  """``"attn.in_proj_weight"`` -> ``AttentionKey("attn", "in_proj_weight", "weight")``; else ``None``."""
  if m := _OTHER.fullmatch(key):
    return AttentionKey(m[1] or "", m[2], "bias")
  split = split_named(key, "|".join(WEIGHTS))
  return None if split is None else AttentionKey(*split)


def parts_of(name: str) -> tuple[str, ...]:
  """The Flax parts a PyTorch weight holds: all three for ``in_proj_weight``."""
  return PARTS if name == "in_proj_weight" else (OWN[name],)
