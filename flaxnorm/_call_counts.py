"""How many times a traced program runs each marked layer: an interval, ``(fewest, most)``.

A shape-only trace sees a loop's body once (or more, for traces a transform
throws away), so counting calls while tracing undercounts a layer that
``nn.scan`` applies ``length`` times and cannot count one inside a
``nn.while_loop``. Instead each call marks one of its array arguments with
``jax.ad_checkpoint.checkpoint_name`` (the identity, a ``name`` equation in the
jaxpr) named after the layer, and the finished jaxpr says how often each
layer runs. A mark in a trace that was thrown away is not in the jaxpr:
``(0, 0)``.

A layer's certified bound ``b`` enters a product as ``b ** most`` when
``b >= 1`` and ``b ** fewest`` when ``b < 1``, so the interval must hold the
layer's *effective* count in a chain:

- a ``scan`` of length ``L`` runs its body ``L`` times, chained through the
  carry or side by side over the scanned slices (a map, whose Lipschitz
  constant is one slice's): ``(fewest * min(L, 1), most * L)``;
- a ``while`` body runs an unknown number of times: ``(0, inf)``;
- ``cond`` runs one branch: the minimum and maximum over the branches of the
  layer's runs in each;
- ``jit``, ``remat`` and custom-derivative calls run once.

Only a chain is bounded so: a scan that feeds a layer's output back through its
carry *and* emits every step (an RNN returning its whole sequence) stacks
``b, b^2, ..., b^L`` side by side, which neither power bounds (a precondition of
``lipschitz_bound``, as other parallel branches are).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.extend import core as jex_core

_PREFIX = "flaxnorm_call_"


def mark(
  args: tuple[Any, ...], kwargs: dict[str, Any], layer: str
) -> tuple[tuple[Any, ...], dict[str, Any]]:
  """``(args, kwargs)`` of one run of ``layer``, the first argument marked if it is an array.

  Containers are left as they are (rebuilding a dict would reorder it);
  otherwise a marked scalar stands in (unused: a jaxpr keeps it).
  """
  tag = _PREFIX + layer
  if args and isinstance(args[0], jax.Array):
    return (checkpoint_name(args[0], tag), *args[1:]), kwargs
  first = next(iter(kwargs), None)
  if not args and first is not None and isinstance(kwargs[first], jax.Array):
    return args, {**kwargs, first: checkpoint_name(kwargs[first], tag)}
  checkpoint_name(jnp.zeros((), jnp.float32), tag)
  return args, kwargs


Runs = tuple[float, float]  # (fewest, most) times a mark runs


def runs(jaxpr: jex_core.Jaxpr) -> dict[str, Runs]:
  """``{layer: (fewest, most) runs}`` in ``jaxpr`` (a ``Jaxpr``); ``most`` is inf in a loop."""
  return {t[len(_PREFIX) :]: n for t, n in _walk(jaxpr).items()}


def _walk(jaxpr: jex_core.Jaxpr) -> dict[str, Runs]:
  """``{mark: (fewest, most)}`` for one run of ``jaxpr``, its sub-jaxprs included."""
  out: dict[str, Runs] = {}
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "name" and str(eqn.params.get("name", "")).startswith(_PREFIX):
      _add(out, {eqn.params["name"]: (1.0, 1.0)})
      continue
    subs = [_walk(sub) for sub in jex_core.jaxprs_in_params(eqn.params)]
    if name == "cond":  # one branch runs
      tags = set().union(*subs)
      _add(out, {t: _one_of([sub.get(t, (0.0, 0.0)) for sub in subs]) for t in tags})
    elif name == "scan":
      length = eqn.params["length"]
      for sub in subs:
        _add(
          out,
          {t: (lo * min(length, 1), hi * length if length else 0.0) for t, (lo, hi) in sub.items()},
        )
    elif name == "while":
      for sub in subs:
        _add(out, {t: (0.0, math.inf) for t in sub})
    else:
      for sub in subs:
        _add(out, sub)
  return out


def _one_of(counts: list[Runs]) -> Runs:
  """The runs of one of several alternatives (``cond`` branches)."""
  return min(lo for lo, _ in counts), max(hi for _, hi in counts)


def _add(out: dict[str, Runs], more: dict[str, Runs]) -> None:
  """Adds ``more``'s runs, one after the other, to ``out`` (in place)."""
  for t, (lo, hi) in more.items():
    old_lo, old_hi = out.get(t, (0.0, 0.0))
    out[t] = (old_lo + lo, old_hi + hi)
