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

Only a chain is bounded so. The walk also follows which values depend on the
model's inputs (forward) and which outputs are used (backward), to find what is
no chain whatever the layers' bounds (:class:`Counts`' ``unchained``): a branch
or trip count picked from the inputs, and a scan that feeds its carry through
the steps *and* whose per-step outputs made from it are used, or whose carry
takes in two input-dependent values at a step (an RNN returning its whole
sequence, or keeping it in a buffer, stacks ``b, b^2, ..., b^L`` side by side,
which neither power bounds). A run on a constant argument counts among the most
runs only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

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
  otherwise a marked constant stands in (unused: a jaxpr keeps it), a run on no
  input (no layer Flax runs on a container is certified, so no bound is looser).
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


class Counts(NamedTuple):
  """What :func:`runs` reads from a jaxpr.

  ``runs``: ``{layer: (fewest, most)}``; ``most`` is inf in a loop. A run on
  an argument that does not depend on the inputs (a constant) counts among the
  most, not the fewest: it adds no factor to a chain.
  ``unchained``: what makes the program no chain of its layers, whatever their
  bounds: ``"cond"`` or ``"while"`` whose branch or trip count depends on the
  inputs (what it computes can jump there), ``"scan"`` whose carry depends on
  the inputs and whose per-step outputs, made from the carry, are used, or whose
  carry takes in two input-dependent values at a step (steps side by side,
  ``b, b^2, ..., b^L``).
  """

  runs: dict[str, Runs]
  unchained: frozenset[str]


def runs(jaxpr: jex_core.Jaxpr, dependent: Sequence[bool]) -> Counts:
  """The :class:`Counts` of ``jaxpr``, whose ``invars`` depend on the inputs where ``dependent``."""
  live: dict[int, list[bool]] = {}
  _liveness(jaxpr, [True] * len(jaxpr.outvars), live)
  walk = _Walk(live)
  walk.run(jaxpr, list(dependent))
  counts = {t[len(_PREFIX) :]: n for t, n in walk.out.items()}
  return Counts(counts, frozenset(walk.unchained))


def _liveness(jaxpr: jex_core.Jaxpr, outs: list[bool], live: dict[int, list[bool]]) -> list[bool]:
  """Which of ``jaxpr``'s inputs its used outputs (``outs``) read.

  Records in ``live`` each equation's used outputs (by ``id``; a jaxpr shared
  by several calls gets the union).
  """
  used = {v for v, o in zip(jaxpr.outvars, outs, strict=True) if o and _is_var(v)}
  for eqn in reversed(jaxpr.eqns):
    eqn_outs = [v in used for v in eqn.outvars]
    eqn_outs = [a or b for a, b in zip(eqn_outs, live.get(id(eqn), eqn_outs), strict=True)]
    live[id(eqn)] = eqn_outs
    if any(eqn_outs):
      reads = _eqn_liveness(eqn, eqn_outs, live)
      used.update(v for v, r in zip(eqn.invars, reads, strict=True) if r and _is_var(v))
  return [v in used for v in jaxpr.invars]


def _eqn_liveness(
  eqn: jex_core.JaxprEqn, outs: list[bool], live: dict[int, list[bool]]
) -> list[bool]:
  """Which of ``eqn``'s inputs its used outputs read (all, where unsure)."""
  params, n_in = eqn.params, len(eqn.invars)
  if eqn.primitive.name == "scan":
    body, n_consts, n_carry = params["jaxpr"].jaxpr, params["num_consts"], params["num_carry"]
    carry = outs[:n_carry]
    while True:  # a carry is used if the next step's used outputs read it
      reads = _liveness(body, carry + outs[n_carry:], live)
      more = [c or r for c, r in zip(carry, reads[n_consts : n_consts + n_carry], strict=True)]
      if more == carry:
        live[id(eqn)] = carry + outs[n_carry:]  # a carry read inside the loop is used too
        return reads
      carry = more
  if eqn.primitive.name == "cond":
    branches = [_liveness(b.jaxpr, outs, live) for b in params["branches"]]
    return [True, *(any(r) for r in zip(*branches, strict=True))]
  subs = list(jex_core.jaxprs_in_params(params))
  if len(subs) == 1 and len(subs[0].invars) == n_in and len(subs[0].outvars) == len(outs):
    return _liveness(subs[0], outs, live)  # jit, remat, custom derivatives
  for sub in subs:  # while, and anything else: every output used
    _liveness(sub, [True] * len(sub.outvars), live)
  return [True] * n_in


def _is_var(v: Any) -> bool:
  return not isinstance(v, jex_core.Literal)


def _is_inexact(v: Any) -> bool:
  """Whether a jaxpr variable holds real or complex numbers (not ints, bools or keys)."""
  return jnp.issubdtype(v.aval.dtype, jnp.inexact)


def inexact(jaxpr: jex_core.Jaxpr) -> list[bool]:
  """Which of ``jaxpr``'s inputs hold real or complex numbers: data, not flags or keys."""
  return [_is_inexact(v) for v in jaxpr.invars]


class _Walk:
  """One pass over a jaxpr: each mark's runs, and which values depend on the inputs."""

  def __init__(self, live: dict[int, list[bool]]) -> None:
    self.live = live  # each equation's used outputs, from _liveness
    self.out: dict[str, Runs] = {}
    self.unchained: set[str] = set()

  def run(self, jaxpr: jex_core.Jaxpr, dependent: list[bool]) -> list[bool]:
    """Adds one run of ``jaxpr`` to ``out``; returns which of its outputs depend on the inputs."""
    deps: dict[Any, bool] = dict(zip(jaxpr.invars, dependent, strict=True))

    def dep(v: Any) -> bool:
      return _is_var(v) and deps.get(v, False)

    for eqn in jaxpr.eqns:
      ins = [dep(v) for v in eqn.invars]
      outs = self._eqn(eqn, ins)
      deps.update(zip(eqn.outvars, outs, strict=True))
    return [dep(v) for v in jaxpr.outvars]

  def _eqn(self, eqn: jex_core.JaxprEqn, ins: list[bool]) -> list[bool]:
    """Walks one equation; returns which of its outputs depend on the inputs."""
    name, params = eqn.primitive.name, eqn.params
    if name == "name" and str(params.get("name", "")).startswith(_PREFIX):
      _add(self.out, {params["name"]: (1.0 if ins[0] else 0.0, 1.0)})
      return ins
    if name == "cond":  # one branch runs, chosen by the first operand
      return self._cond(params["branches"], ins)
    if name == "scan":
      return self._scan(eqn, ins)
    if name == "while":
      return self._while(params, ins)
    subs = list(jex_core.jaxprs_in_params(params))
    outs = [any(ins)] * len(eqn.outvars)
    for sub in subs:  # jit, remat, custom derivatives: once, arguments in order
      sub_ins = ins if len(sub.invars) == len(ins) else [any(ins)] * len(sub.invars)
      sub_outs = self.run(sub, sub_ins)
      if len(subs) == 1 and len(sub_outs) == len(outs):
        outs = sub_outs
    return outs

  def _nested(self, jaxpr: jex_core.Jaxpr, ins: list[bool]) -> tuple[dict[str, Runs], list[bool]]:
    """One run of ``jaxpr``'s marks, apart from ``out``, and its outputs' dependence."""
    outer, self.out = self.out, {}
    try:
      outs = self.run(jaxpr, ins)
      return self.out, outs
    finally:
      self.out = outer

  def _cond(self, branches: Sequence[Any], ins: list[bool]) -> list[bool]:
    index, ops = ins[0], ins[1:]
    if index:
      self.unchained.add("cond")
    walked = [self._nested(b.jaxpr, ops) for b in branches]
    tags = set().union(*(w for w, _ in walked))
    _add(self.out, {t: _one_of([w.get(t, (0.0, 0.0)) for w, _ in walked]) for t in tags})
    return [index or any(o) for o in zip(*(outs for _, outs in walked), strict=True)]

  def _loop(self, body: jex_core.Jaxpr, consts: list[bool], carry: list[bool], rest: list[bool]):
    """Walks a loop body until its carry's dependence is settled: ``(marks, outputs, carry)``."""
    while True:
      marks, outs = self._nested(body, consts + carry + rest)
      more = [c or o for c, o in zip(carry, outs[: len(carry)], strict=True)]
      if more == carry:
        return marks, outs, carry
      carry = more

  def _scan(self, eqn: jex_core.JaxprEqn, ins: list[bool]) -> list[bool]:
    params = eqn.params
    n_consts, n_carry, length = params["num_consts"], params["num_carry"], params["length"]
    body, consts, carry = params["jaxpr"].jaxpr, ins[:n_consts], ins[n_consts : n_consts + n_carry]
    xs = ins[n_consts + n_carry :]
    marks, outs, carry = self._loop(body, consts, carry, xs)
    scaled = {
      t: (lo * min(length, 1), hi * length if length else 0.0) for t, (lo, hi) in marks.items()
    }
    _add(self.out, scaled)
    if length > 1 and any(carry):
      self._check_steps(eqn, consts + carry + xs, n_consts, n_carry)
    return carry + outs[n_carry:]

  def _check_steps(self, eqn: jex_core.JaxprEqn, ins: list[bool], n_consts: int, n_carry: int):
    """Adds ``"scan"`` unless the scan's steps form one chain (``ins``: its body's inputs).

    Not a chain: per-step outputs made from the carry that are used (the steps
    side by side), or a carry that takes in two input-dependent values in a step
    (a buffer of steps, an accumulator, an LSTM's cell state: a sum of branches).
    """
    body, carry = eqn.params["jaxpr"].jaxpr, slice(n_consts, n_consts + n_carry)
    sources = [0] * n_carry  # per carry out: how many dependent body inputs it reads
    via_carry = [False] * (len(eqn.outvars) - n_carry)
    for k in (k for k, d in enumerate(ins) if d):
      one = [i == k for i in range(len(ins))]
      _, outs = self._nested(body, one)
      sources = [n + o for n, o in zip(sources, outs[:n_carry], strict=True)]
      if carry.start <= k < carry.stop:
        via_carry = [v or o for v, o in zip(via_carry, outs[n_carry:], strict=True)]
    # Only used real values count (an integer carry is an index: searchsorted's bisection).
    used = [
      u and _is_inexact(v)
      for u, v in zip(self.live.get(id(eqn), [True] * len(eqn.outvars)), eqn.outvars, strict=True)
    ]
    combined = any(n > 1 and u for n, u in zip(sources, used[:n_carry], strict=True))
    if combined or any(v and u for v, u in zip(via_carry, used[n_carry:], strict=True)):
      self.unchained.add("scan")

  def _while(self, params: Mapping[str, Any], ins: list[bool]) -> list[bool]:
    n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
    cond_consts, body_consts = ins[:n_cond], ins[n_cond : n_cond + n_body]
    marks, _, carry = self._loop(
      params["body_jaxpr"].jaxpr, body_consts, ins[n_cond + n_body :], []
    )
    cond_marks, (stop,) = self._nested(params["cond_jaxpr"].jaxpr, cond_consts + carry)
    if stop:
      self.unchained.add("while")
    _add(self.out, {t: (0.0, math.inf) for t in {**marks, **cond_marks}})
    return [c or stop for c in carry]


def _one_of(counts: list[Runs]) -> Runs:
  """The runs of one of several alternatives (``cond`` branches)."""
  return min(lo for lo, _ in counts), max(hi for _, hi in counts)


def _add(out: dict[str, Runs], more: dict[str, Runs]) -> None:
  """Adds ``more``'s runs, one after the other, to ``out`` (in place)."""
  for t, (lo, hi) in more.items():
    old_lo, old_hi = out.get(t, (0.0, 0.0))
    out[t] = (old_lo + lo, old_hi + hi)
