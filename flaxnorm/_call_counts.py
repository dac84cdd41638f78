"""How many times a traced program runs each marked call.

A shape-only trace sees a loop's body once (or more, for traces a transform
throws away), so counting calls while tracing undercounts a layer that
``nn.scan`` applies ``length`` times and cannot count one inside a
``nn.while_loop``. Instead each call marks one of its array arguments with
``jax.ad_checkpoint.checkpoint_name`` (the identity, a ``name`` equation in the
jaxpr), and the finished jaxpr says how often each mark runs: the sum over its
equations, each times the ``length`` of every ``scan`` around it; a mark in a
``while`` body runs an unknown number of times (``math.inf``); one in a trace
that was thrown away is not in the jaxpr (0). ``cond`` branches both count (an
upper bound); ``jit``, ``remat`` and custom-derivative calls count once.
"""

from __future__ import annotations

import collections
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.extend import core as jex_core

_PREFIX = "flaxnorm_call_"


class Marks:
  """Hands out one mark per call; :func:`runs` reads them back from the jaxpr."""

  def __init__(self) -> None:
    self._ids = itertools.count()

  def mark(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, str]:
    """``(args, kwargs)`` with their first array marked, and the mark.

    Without an array argument a marked scalar stands in (unused: a jaxpr keeps it).
    """
    tag = f"{_PREFIX}{next(self._ids)}"
    leaves, tree = jax.tree.flatten((args, kwargs))
    for i, x in enumerate(leaves):
      if isinstance(x, jax.Array):
        leaves[i] = checkpoint_name(x, tag)
        break
    else:
      checkpoint_name(jnp.zeros((), jnp.float32), tag)
    args, kwargs = jax.tree.unflatten(tree, leaves)
    return args, kwargs, tag


def runs(jaxpr: Any) -> dict[str, float]:
  """``{mark: times it runs}`` in ``jaxpr`` (a ``Jaxpr``); ``math.inf`` in a ``while`` body."""
  out: collections.defaultdict[str, float] = collections.defaultdict(float)
  _walk(jaxpr, 1.0, out)
  return dict(out)


def _walk(jaxpr: Any, factor: float, out: collections.defaultdict[str, float]) -> None:
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "name" and str(eqn.params.get("name", "")).startswith(_PREFIX):
      out[eqn.params["name"]] += factor
    inner = factor
    if name == "scan":
      inner = factor * eqn.params["length"] if eqn.params["length"] else 0.0
    elif name == "while":
      inner = math.inf if factor else 0.0
    for sub in jex_core.jaxprs_in_params(eqn.params):
      _walk(sub, inner, out)
