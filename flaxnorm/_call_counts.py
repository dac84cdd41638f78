"""How many times a traced program runs each marked layer, at most.

A shape-only trace sees a loop's body once (or more, for traces a transform
throws away), so counting calls while tracing undercounts a layer that
``nn.scan`` applies ``length`` times and cannot count one inside a
``nn.while_loop``. Instead each call marks one of its array arguments with
``jax.ad_checkpoint.checkpoint_name`` (the identity, a ``name`` equation in the
jaxpr) named after the layer, and the finished jaxpr says how often each
layer runs: a ``scan`` of length ``L`` runs its body ``L`` times, a ``while``
body an unknown number (inf), a ``cond`` one branch (the most over them), and
``jit``, ``remat`` and custom-derivative calls once. A mark in a trace that was
thrown away is not in the jaxpr: 0. The count is each layer's power in the
report's per-layer table, and says which layers run in a loop of unknown length.

The certificate itself is :mod:`flaxnorm._propagate`'s, which also reads each
call's output mark (:func:`mark_output`: a certified layer's bound, or where
another layer's run ends). The walk here follows which values
depend on the model's inputs, to find what no Lipschitz bound covers
(:class:`Counts`' ``unchained``): a branch or a loop's trip count picked from
the inputs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.extend import core as jex_core

_PREFIX = "flaxnorm_call_"
_OUT = "flaxnorm_out_"
_END = "flaxnorm_end_"
_VAR = "flaxnorm_var_"
SEP = "|"  # between the layer's path and the call's number (and a variable's key)


def mark(
  args: tuple[Any, ...], kwargs: dict[str, Any], layer: str, call: int
) -> tuple[tuple[Any, ...], dict[str, Any]]:
  """``(args, kwargs)`` of one run (``call``) of ``layer``, the first argument marked.

  Containers are left as they are (rebuilding a dict would reorder it);
  otherwise a marked constant stands in (unused: a jaxpr keeps it), a run on no
  input (no layer Flax runs on a container is certified, so no bound is looser).
  """
  tag = f"{_PREFIX}{layer}{SEP}{call}"
  if args and isinstance(args[0], jax.Array):
    return (checkpoint_name(args[0], tag), *args[1:]), kwargs
  first = next(iter(kwargs), None)
  if not args and first is not None and isinstance(kwargs[first], jax.Array):
    return args, {**kwargs, first: checkpoint_name(kwargs[first], tag)}
  checkpoint_name(jnp.zeros((), jnp.float32), tag)
  return args, kwargs


def mark_output(out: Any, layer: str, call: int, *, certified: bool) -> Any:
  """``out`` of the run ``call`` of ``layer``, its arrays marked.

  A certified layer's output mark takes its bound (:mod:`flaxnorm._propagate`);
  another's only says where the run ends (a marked constant when it returns no
  array), so that a reason found in between names the layer.
  """
  tag = f"{_OUT if certified else _END}{layer}{SEP}{call}"
  if not any(isinstance(a, jax.Array) for a in jax.tree.leaves(out)):
    checkpoint_name(jnp.zeros((), jnp.float32), tag)
  return jax.tree.map(lambda a: checkpoint_name(a, tag) if isinstance(a, jax.Array) else a, out)


def mark_variables(variables: Mapping[str, Any], layer: str, call: int) -> None:
  """Marks the variables the run ``call`` of ``layer`` reads (its own, as its scope
  holds them: changed there by ``nn.map_variables``), each by its key
  ``"collection/layer/name"``: the marks' operands must be the stored variables (a
  numpy array or a number there is a constant: never one)."""
  for collection, tree in variables.items():
    for name, leaf in tree.items():
      if not isinstance(leaf, Mapping):
        key = "/".join([collection, *([layer] if layer else []), name])
        for a in jax.tree.leaves(leaf):
          checkpoint_name(jnp.asarray(a), _VAR + json.dumps([layer, call, key]))


def call_of(tag: str) -> tuple[str, str, str] | None:
  """``(kind, layer, call)`` of a mark's name (kind ``"in"``, ``"out"``, ``"end"``, or
  ``"var"`` with ``call`` then ``"<call>|<key>"``), or None for another name."""
  if tag.startswith(_VAR):  # JSON: names may hold any character
    layer, call, key = json.loads(tag[len(_VAR) :])
    return "var", layer, f"{call}{SEP}{key}"
  for kind, prefix in (("in", _PREFIX), ("out", _OUT), ("end", _END)):
    if tag.startswith(prefix):
      layer, _, call = tag[len(prefix) :].rpartition(SEP)
      return kind, layer, call
  return None


class Counts(NamedTuple):
  """What :func:`runs` reads from a jaxpr.

  ``runs``: ``{layer: most runs}``, inf in a loop of unknown length.
  ``unchained``: what no Lipschitz bound covers: ``"cond"`` or ``"while"``
  whose branch or trip count depends on the inputs (what it computes can jump
  there).
  """

  runs: dict[str, float]
  unchained: frozenset[str]


def runs(jaxpr: jex_core.Jaxpr, dependent: Sequence[bool]) -> Counts:
  """The :class:`Counts` of ``jaxpr``, whose ``invars`` depend on the inputs where ``dependent``."""
  walk = _Walk()
  walk.run(jaxpr, list(dependent))
  return Counts(walk.out, frozenset(walk.unchained))


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

  def __init__(self) -> None:
    self.out: dict[str, float] = {}
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
    call = call_of(str(params["name"])) if name == "name" else None
    if call is not None and call[0] == "in":
      _add(self.out, {call[1]: 1.0})
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

  def _nested(self, jaxpr: jex_core.Jaxpr, ins: list[bool]) -> tuple[dict[str, float], list[bool]]:
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
    _add(self.out, {t: max(w.get(t, 0.0) for w, _ in walked) for t in tags})  # one branch
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
    _add(self.out, {t: n * length for t, n in marks.items()})
    return carry + outs[n_carry:]

  def _while(self, params: Mapping[str, Any], ins: list[bool]) -> list[bool]:
    n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
    cond_consts, body_consts = ins[:n_cond], ins[n_cond : n_cond + n_body]
    marks, _, carry = self._loop(
      params["body_jaxpr"].jaxpr, body_consts, ins[n_cond + n_body :], []
    )
    cond_marks, (stop,) = self._nested(params["cond_jaxpr"].jaxpr, cond_consts + carry)
    if stop:
      self.unchained.add("while")
    _add(self.out, dict.fromkeys({**marks, **cond_marks}, math.inf))
    return [c or stop for c in carry]


def _add(out: dict[str, float], more: dict[str, float]) -> None:
  """Adds ``more``'s runs, one after the other, to ``out`` (in place)."""
  for t, n in more.items():
    out[t] = out.get(t, 0.0) + n
