"""PyTorch tensors of no converted layer (Snake's ``alpha``, a lone ``bias``), by name both ways.

``load_torch_state_dict`` loads such a tensor into the Flax param of the same
path and name when the shapes agree up to axes of size 1 (a ``(1, C, 1)``
broadcast vector for a ``(C,)`` param) and records it as a :class:`TorchParam`;
``to_torch_state_dict(..., params=result.params)`` writes it back in PyTorch's
shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from flax.core import meta


class TorchParam(NamedTuple):
  """A PyTorch tensor loaded by name into a Flax param (no layer converts it).

  Attributes:
    path: the Flax param's path under ``params``, ``"act/alpha"``.
    shape: the PyTorch tensor's shape. It is the Flax param's shape, or a
      vector's with other axes of size 1 (``(1, C, 1)`` for ``(C,)``).

  Examples:
    >>> from flaxnorm import interop
    >>> interop.TorchParam("act/alpha", (1, 4, 1))
    TorchParam(path='act/alpha', shape=(1, 4, 1))
  """

  path: str
  shape: tuple[int, ...]


def shapes_fit(torch_shape: tuple[int, ...], flax_shape: tuple[int, ...]) -> bool:
  """Whether a tensor loads by name: equal shapes, or one vector's with size-1 axes around it.

  Only vectors are reshaped: two tensors with several axes of size above 1
  may order them differently (``(C, H, W)`` against ``(H, W, C)``).
  """
  if torch_shape == flax_shape:
    return True
  big = [d for d in torch_shape if d != 1]
  return len(big) <= 1 and big == [d for d in flax_shape if d != 1]


def params_to_numpy(
  params: Mapping[str, Any], plain: Mapping[str, TorchParam | str], where: str
) -> dict[str, np.ndarray]:
  """PyTorch key -> the Flax param at ``plain[key]``, in the recorded PyTorch shape.

  Args:
    params: the ``params`` collection.
    plain: PyTorch key -> :class:`TorchParam`, or a path (the Flax shape is kept).
    where: the caller, for errors.

  Returns:
    ``{key: array}``.

  Raises:
    TypeError: ``plain`` is not a mapping of str to ``TorchParam`` or path.
    ValueError: no Flax param at a path, or a shape it cannot take.
  """
  if not isinstance(plain, Mapping):
    raise TypeError(
      f"{where}: params must be a mapping of PyTorch key -> TorchParam or Flax path "
      f"(TorchLoadResult.params), got {type(plain).__name__}."
    )
  out = {}
  for key, entry in plain.items():
    p = TorchParam(entry, ()) if isinstance(entry, str) else entry
    if not (isinstance(key, str) and isinstance(p, TorchParam) and isinstance(p.path, str)):
      raise TypeError(
        f"{where}: params['{key}'] must be a TorchParam or a Flax path 'a/b/name', got {entry!r}."
      )
    x = params
    for name in (n for n in p.path.split("/") if n):
      x = x.get(name) if isinstance(x, Mapping) else None
    if x is None or isinstance(x, Mapping):
      raise ValueError(f"{where}: params['{key}']: no Flax param at 'params/{p.path}'.")
    x = np.asarray(meta.unbox(x))
    shape = tuple(p.shape) if isinstance(entry, TorchParam) else x.shape
    if not shapes_fit(shape, x.shape):
      raise ValueError(
        f"{where}: params['{key}']: the Flax param 'params/{p.path}' of shape {x.shape} "
        f"cannot be written as PyTorch's shape {shape}."
      )
    out[key] = x.reshape(shape)
  return out
