"""Spectral norm inside Flax Linen's lifted transforms: ``nn.RNN``, ``nn.scan``, ``nn.vmap``.

Over time (``nn.RNN``, or ``nn.scan`` with the spectral collection in
``variable_broadcast``) the semantics are PyTorch's ``nn.LSTM`` with a
spectrally normed weight: the power iteration advances **once per apply** and
every time step uses the same normalized kernel; evaluation changes nothing.

How: Flax's lifted ``scan`` traces its body twice when a collection is
broadcast (``flax.core.axes_scan.scan``). The first trace computes the
broadcast variables' new values (the carry and the scanned inputs unknown, so
only loop-invariant work: a power-iteration step is loop-invariant, since it
depends on the kernel and the stored state only); the loop then reads those
values as closed-over constants, and its own writes to broadcast variables are
dropped. So the first trace runs the training step from the stored state and
stores the result; the loop finds exactly the arrays that step stored (the
same objects, :func:`take_fresh`) and uses them as they are, without iterating:
``sigma = u^T W v`` from the new vectors, which is the sigma the step computed.
A layer called twice per step iterates twice in the first trace, as outside a
scan, and both its calls in the loop use the state stored after the second.

With ``variable_axes`` (stacked layers, ensembles) each layer or member reads
its own slice, never a value stored in this apply, and trains as usual.

``nn.RNN`` lifts only ``params`` by default: a spectrally normed cell in it, or
an ``nn.RNN`` wrapped with ``recursive=True``, adds the spectral collection to
the RNN's ``variable_broadcast`` (:func:`broadcast_into`), unless the user
lifts it already.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import weakref
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
from flax.core import scope as core_scope

from flaxnorm import _subclass


def lifted_by(module: nn.Module) -> tuple[str, ...]:
  """The Flax lifts the module runs in (``("scan", "remat")``, ...; ``()`` for none).

  Flax names a lifted scope ``name(child)`` in its debug path (``flax.core.lift``),
  nested where lifts are (``remat(scan(cell))``): every name is read, so a scan
  is seen through an ``nn.remat`` or ``nn.jit`` around or inside it.
  """
  path = module.scope.debug_path if module.scope is not None else ()
  found = (name for p in path for name in re.findall(r"(\w+)\(", str(p)))
  return tuple(dict.fromkeys(found))


@dataclasses.dataclass
class _Stored:
  """A state vector ``u`` stored in a lifted scan, and the traces that met it."""

  u: weakref.ref  # the array (or tracer) itself
  stored_in: weakref.ref  # the root scope of the trace that stored it
  read_in: weakref.ref | None = None  # the first other trace that read it: the loop's


# The vectors ``u`` stored (or created) inside lifted scans, by id; an entry
# goes when its array does, so an id is never that of a dead array.
_STORED: dict[int, _Stored] = {}


def mark_fresh(module: nn.Module, u: Any) -> None:
  """Records ``u``, just stored by ``module`` inside a lifted scan (see the module docstring)."""
  if "scan" in lifted_by(module) and module.scope is not None:
    key = id(u)
    with contextlib.suppress(TypeError):  # not weakly referenceable: never fresh
      ref = weakref.ref(u, lambda _, key=key: _STORED.pop(key, None))
      _STORED[key] = _Stored(ref, weakref.ref(module.scope.root))


def take_fresh(module: nn.Module, u: Any) -> bool:
  """Whether the stored ``u`` is the one this scan's first trace stored, read by its loop.

  Flax gives each trace of a lifted body its own root scope. A ``u`` stored
  in the same trace (an earlier call of a layer called twice) is not fresh:
  that call iterates again, as outside a scan. The first other trace to read
  ``u`` is the loop's, and only it: a later apply given the same arrays
  iterates. Outside scans nothing is fresh.
  """
  stored = _STORED.get(id(u))
  if (
    "scan" not in lifted_by(module) or module.scope is None or stored is None or stored.u() is not u
  ):
    return False
  root = module.scope.root
  if stored.stored_in() is root:
    return False
  if stored.read_in is None:
    stored.read_in = weakref.ref(root)
  return stored.read_in() is root


def _lifts(rnn: nn.RNN, collection: str) -> bool:
  filters = [rnn.variable_broadcast, rnn.variable_carry, *rnn.variable_axes]
  return any(core_scope.in_filter(f, collection) for f in filters)


def broadcast_into(rnn: Any, collections: Iterable[str]) -> None:
  """Adds ``collections`` to ``rnn``'s ``variable_broadcast`` (if an ``nn.RNN`` lifting none of them).

  ``rnn`` is a bound instance (a clone made for this init/apply), so the
  change does not outlive the call.
  """
  if not isinstance(rnn, nn.RNN):
    return
  missing = sorted({c for c in collections if not _lifts(rnn, c)})
  if missing:
    widened = core_scope.union_filters(rnn.variable_broadcast, missing)
    object.__setattr__(rnn, "variable_broadcast", widened)  # frozen dataclass


def spectral_collections(cls: type) -> set[str]:
  """The collections holding the spectral state of a normalized class's params."""
  specs = _subclass.specs_of(cls).values()
  return {s.options.collection for s in specs if s.method == "spectral_norm"}


def post_init(self: nn.Module) -> None:
  """``__post_init__`` of a normalized Linen class: an ``nn.RNN`` adopting it lifts its state."""
  # The normalized class's base: type(self) may be a subclass (nn.vmap's lifted class).
  normalized = next(k for k in type(self).__mro__ if "_flaxnorm_base" in vars(k))
  normalized._flaxnorm_base.__post_init__(self)
  _check_no_data_init_over_time(self)
  broadcast_into(self.parent, spectral_collections(type(self)))


def _check_no_data_init_over_time(module: nn.Module) -> None:
  """Raises for ``data_init=True`` on an ``nn.RNN`` or its cell: broadcast params cannot depend on data.

  Flax itself would fail at init with "broadcasted variable has a data dependency
  on the scan body", naming neither the layer nor ``data_init``.
  """
  specs = _subclass.specs_of(type(module)).values()
  if not any(getattr(s.options, "data_init", False) for s in specs):
    return
  if isinstance(module, nn.RNN) or isinstance(module.parent, nn.RNN):
    what = "an nn.RNN" if isinstance(module, nn.RNN) else "the cell of an nn.RNN"
    raise ValueError(
      f"weight_norm: data_init=True on {type(module).__name__}, {what}: the RNN "
      "broadcasts its params over time, so they cannot depend on the data. Wrap it with "
      "data_init=False (and set g and the bias from a batch yourself, if you need to)."
    )


def not_lifted_error(method: str, at: str, collection: str, lifts: tuple[str, ...]) -> ValueError:
  """The error for a spectral state missing inside Flax lifts: not passed, or not carried."""
  where = " and ".join(f"nn.{lift}" for lift in lifts)
  return ValueError(
    f"{method}: {at} runs inside a Flax {where} and finds no '{collection}' state. Either "
    f"the variables given to apply lack the '{collection}' collection (pass the full "
    f"variables from init()), or a lift does not carry the collection, so its "
    f"power-iteration state cannot be stored: lift it with the params: "
    f"over time (one shared kernel, the state advancing once per apply) "
    f"variable_broadcast=['params', '{collection}']; for stacked layers or an ensemble "
    f"(each its own state) variable_axes={{'params': 0, '{collection}': 0}} with "
    f"split_rngs={{'params': True, '{collection}': True}}. nn.RNN does the former itself "
    f"when flaxnorm wraps its cell or the RNN (spectral_norm(cell, recursive=True)); for "
    f"a cell that wraps its own layers, pass variable_broadcast=['params', '{collection}'] "
    "to nn.RNN."
  )
