"""A Lipschitz bound carried through a traced program, value by value.

Each value ``y`` of a jaxpr gets a number ``L(y)`` with ``‖Δy‖₂ ≤ L(y) ‖Δx‖₂``
for every change ``Δx`` of the inputs (all floating-point inputs as one
vector): 0 for what does not depend on them, 1 for an input. Each primitive has
a rule: ``L(a + b) ≤ L(a) + L(b)``, ``L(c · a) ≤ max|c| L(a)`` for a known
constant ``c``, ``L(concat(a, b)) ≤ √(L(a)² + L(b)²)``, broadcasting ``k``
copies multiplies by ``√k``, a sum of ``k`` elements by ``√k``, a pool by the
square root of how many windows share an element, a matrix product or a
convolution with a known constant by that constant's certified norm, elementwise
functions by their largest slope (GELU, softmax and log-softmax, found by their
programs in :mod:`flaxnorm._inline`). A layer with a certified norm ``b`` (marked by
:mod:`flaxnorm._call_counts`: its input and its output) maps ``L`` to ``b·L``,
whatever the primitives inside it; any other layer is followed primitive by
primitive, its variables' values known. Loops are followed step by step: a
scan's stacked outputs get ``√Σₜ L(yₜ)²``, one over slices alone (nothing
carried from the inputs) the largest step's. So a residual block gets ``1 +
b``, an RNN's whole output sequence the sum over its steps, where a product of
layer bounds is no bound at all.

Beside its bound, each value carries a span (:mod:`flaxnorm._spans`): an interval
holding its elements whatever the inputs (a sigmoid's ``[0, 1]``). A product of two
input-dependent values is bounded by them: ``L(a ⊙ b) ≤ max|a| L(b) + max|b| L(a)``
(an LSTM's or GRU's gates, a gated ``tanh ⊙ σ`` unit).

What gets ``inf`` (with the reason and the innermost layer running where it
arose, reported where it reaches an output): a product of two input-dependent
values one of which has no finite span, a scale or matrix not known here (not a
literal, a constant, or a value computed from them), ``exp`` or a power of a
value whose span does not bound its slope, a primitive without a rule, a
discrete value made from the inputs used as data or as an index, and a loop of
unknown trip count whose bound grows.
Selects on an input-dependent predicate (``jnp.where``, leaky ReLU) are taken
as continuous: the one precondition, as everywhere in ``lipschitz_bound``.
A branch picked from the inputs is refused
by :mod:`flaxnorm._call_counts`.
"""

from __future__ import annotations

import functools
import hashlib
import math
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from flaxnorm import _call_counts, _certify, _inline, _spans

_INF = math.inf
_T = TypeVar("_T")


def _up(x: float) -> float:
  """``x`` rounded up by one ulp: the bound's float arithmetic never rounds down."""
  return math.nextafter(x, _INF) if 0.0 < x < _INF else x


class _Origin(NamedTuple):
  """A value is an elementwise function of the value ``base`` (same shape), of slope at
  most ``slope`` (a number, or one per element, flattened), ``base`` having bound ``bound``.

  A select between such functions of one base is one of them (leaky ReLU: slope 1, not
  ``√(1 + 0.01²)``), a sum of them one whose slopes add, element by element (Snake,
  ``x + sin²(αx)/α`` per channel: slope ``1 + 2`` in each, where the largest ``α``
  times the largest ``1/α`` gave ``1 + 2 max α / min α``).
  """

  base: Any
  slope: float | np.ndarray
  bound: float


class _Value(NamedTuple):
  """``bound``: L of a value; ``why``: when it is inf, the reason, and ``where``: the
  path of the innermost layer running where it arose; ``origin`` (an :class:`_Origin`)
  and ``span``: see those."""

  bound: float
  why: str | None = None
  origin: _Origin | None = None
  where: str | None = None
  # An interval holding every element of a value that depends on the inputs, whatever
  # they are (:mod:`flaxnorm._spans`); a known value's is read from it (:func:`_span`).
  span: _spans.Span = _spans.ANY


_ZERO = _Value(0.0)


class _Raw(NamedTuple):
  """A variable as stored (its ``"collection/module/name"`` key), passed along unchanged
  but not known: a certified layer's, whose value no rule reads."""

  key: str


class _Lookup:
  """The values known in one jaxpr: a call gives a literal's or a known value, else None;
  :meth:`entry` also gives a stored variable's :class:`_Raw`."""

  def __init__(self, known: dict[Any, Any]) -> None:
    self.known = known

  def entry(self, v: Any) -> Any:
    return v.val if isinstance(v, jex_core.Literal) else self.known.get(v)

  def __call__(self, v: Any) -> Any:
    found = self.entry(v)
    return None if isinstance(found, _Raw) else found


def _inf(why: str) -> _Value:
  return _Value(_INF, why)


def _span(x: _Value, var: Any, value: Callable[[Any], Any]) -> _spans.Span:
  """The span of the value ``x`` held by ``var``: its own when it depends on the
  inputs, else its known value's (``ANY`` when not known)."""
  if x.bound:
    return x.span
  c = var.val if isinstance(var, jex_core.Literal) else value(var)
  return x.span if c is None else _spans.of_array(c)  # (a certified layer's output: its own)


def _spans_of(vals: Sequence[_Value], eqn: Any, value: Callable[[Any], Any]) -> list[_spans.Span]:
  return [_span(x, v, value) for x, v in zip(vals, eqn.invars, strict=True)]


# ``jax.nn``'s jitted elementwise activations (by the jit's name): their largest slope.
# A jit of that name counts only when its program is ``jax.nn``'s own (at default
# arguments): anything else is followed primitive by primitive.
_ACTIVATIONS = {
  "softplus": 1.0,
  "log_sigmoid": 1.0,
  "soft_sign": 1.0,
  "hard_tanh": 1.0,
  "elu": 1.0,  # alpha = 1
  "celu": 1.0,  # exp(x / alpha) <= 1 below 0
  "hard_sigmoid": 1.0 / 6.0,
  "silu": 1.0999,  # max of σ(x)(1 + x(1 - σ(x))): 1.09984 at x = 2.3994
  "hard_silu": 1.5,  # (relu6(x + 3) + x) / 6 at x = 3
  "selu": 1.7581,  # scale · alpha = 1.0507 · 1.67326
  "mish": 1.089,  # 1.0885 at x = 1.19
}


# The bounded ones' ranges.
_ACTIVATION_SPANS: dict[str, _spans.Span] = {
  "hard_tanh": (-1.0, 1.0),
  "soft_sign": (-1.0, 1.0),
  "hard_sigmoid": (0.0, 1.0),
}


# Those with an ``alpha`` argument: their largest slope for a given ``alpha`` (or None).
_ACTIVATIONS_OF_ALPHA: dict[str, Callable[[float], float | None]] = {
  "elu": lambda a: max(1.0, abs(a)),  # alpha · exp(x) below 0
  "celu": lambda a: 1.0 if a > 0 else None,  # exp(x / alpha) below 0: unbounded for alpha < 0
}


@functools.lru_cache(maxsize=256)
def _reference(name: str, avals: tuple[tuple[tuple[int, ...], Any, bool], ...]) -> str:
  """The program of ``jax.nn.<name>`` on such arguments, printed."""
  args = [jax.ShapeDtypeStruct(shape, dtype, weak_type=weak) for shape, dtype, weak in avals]
  (eqn,) = jax.make_jaxpr(getattr(jax.nn, name))(*args).jaxpr.eqns
  return str(eqn.params["jaxpr"])


def _activation_slope(eqn: Any, value: Callable[[Any], Any]) -> float | None:
  """The largest slope of a ``jax.nn`` activation ``eqn`` calls (real, with a known
  ``alpha`` if it takes one), or None."""
  name = str(eqn.params.get("name", ""))
  if eqn.primitive.name != "jit" or not _is_real_floating(eqn.invars[0]):
    return None
  if len(eqn.invars) == 1 and name in _ACTIVATIONS:
    slope = _ACTIVATIONS[name]
  elif len(eqn.invars) == 2 and name in _ACTIVATIONS_OF_ALPHA and value(eqn.invars[1]) is not None:
    alpha = np.asarray(value(eqn.invars[1]))
    slope = _ACTIVATIONS_OF_ALPHA[name](float(alpha)) if alpha.size == 1 else None
  else:
    return None
  avals = tuple(
    (tuple(v.aval.shape), v.aval.dtype, bool(getattr(v.aval, "weak_type", False)))
    for v in eqn.invars
  )
  return slope if str(eqn.params["jaxpr"]) == _reference(name, avals) else None


# Elementwise primitives of one operand: their largest slope (a value made from them is
# an elementwise function of the operand).
_SLOPES = {
  "neg": 1.0,
  "abs": 1.0,
  "tanh": 1.0,
  "sin": 1.0,
  "cos": 1.0,
  "atan": 1.0,
  "logistic": 0.25,
  "erf": 1.1284,  # 2 / √π
  "convert_element_type": 1.0,  # complex to real: its real part
  "reduce_precision": 1.0,
  "copy": 1.0,
  "copy_p": 1.0,
}
_REAL_SLOPES = {"tanh", "sin", "cos", "atan", "logistic", "erf"}  # on the real line only


def _logistic(x: float) -> float:
  return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


_HALF_PI = math.nextafter(math.pi / 2, _INF)
# Increasing elementwise primitives: the function, and its range.
_INCREASING: dict[str, tuple[Callable[[float], float], float, float]] = {
  "tanh": (math.tanh, -1.0, 1.0),
  "logistic": (_logistic, 0.0, 1.0),
  "erf": (math.erf, -1.0, 1.0),
  "atan": (math.atan, -_HALF_PI, _HALF_PI),
}


def _unary_span(eqn: Any, s: _spans.Span) -> _spans.Span:
  """The span of a :data:`_SLOPES` primitive's output, its operand's span ``s``."""
  name = eqn.primitive.name
  if name in _INCREASING:
    return _spans.monotone(s, *_INCREASING[name])
  if name in ("sin", "cos"):
    return (-1.0, 1.0)
  if name == "neg":
    return (-s[1], -s[0])
  if name == "abs":
    return s if s[0] >= 0 else (-s[1], -s[0]) if s[1] <= 0 else (0.0, _spans.magnitude(s))
  if name in ("copy", "copy_p"):
    return s
  if name == "reduce_precision":
    bias = 2 ** (eqn.params["exponent_bits"] - 1) - 1
    eps, tiny, top = 2.0 ** -eqn.params["mantissa_bits"], 2.0 ** (1 - bias), 2.0 ** (bias + 1)
  elif _is_real_floating(eqn.invars[0]) and _is_real_floating(eqn.outvars[0]):
    info = jnp.finfo(eqn.outvars[0].aval.dtype)  # convert_element_type
    eps, tiny, top = float(info.eps), float(info.tiny), float(info.max)
  else:
    return _spans.ANY
  return _spans.rounded(s, eps, tiny) if _spans.magnitude(s) < top / 2 else _spans.ANY


# Rearrangements of their first operand (the others: shapes or nothing).
_MOVES = {
  "stop_gradient",
  "reshape",
  "squeeze",
  "expand_dims",
  "transpose",
  "rev",
  "slice",
  "sharding_constraint",
  "mesh_cast",
  "reshard",
  "pvary",
}
_DISCRETE = {  # outputs that jump: fine as a predicate, not as data
  "sign",
  "floor",
  "ceil",
  "round",
  "is_finite",
  "argmax",
  "argmin",
  "eq",
  "ne",
  "lt",
  "le",
  "gt",
  "ge",
  "and",
  "or",
  "not",
  "xor",
}


class Bound(NamedTuple):
  """What :func:`bound` found: ``value``, or inf with ``why`` and ``where`` (the path of
  the innermost layer the model was running there, ``""`` at the top level)."""

  value: float
  why: str | None = None
  where: str | None = None
  # Each followed layer's output bound over its input's, the most over its runs: a
  # certified norm of a layer linear in its one input (a Dense, a Conv), by module path.
  layers: Mapping[str, float] = types.MappingProxyType({})
  # Layers run on a value that does not depend on the inputs (an RNN's zero initial
  # carry): that run's norm is not in ``layers`` (a stacked layer's member may be missed).
  unmeasured: frozenset[str] = frozenset()


def bound(
  jaxpr: jex_core.ClosedJaxpr,
  dependent: Sequence[bool],
  layers: Mapping[str, float],
  known: Mapping[int, Any] | None = None,
  stored: Mapping[int, str] | None = None,
  n_steps: int = _certify.DEFAULT_GRAM_STEPS,
  gains: Mapping[str, tuple[float, float]] | None = None,
) -> Bound:
  """The Lipschitz bound of ``jaxpr``'s real outputs, as one vector, in its inputs.

  Args:
    jaxpr: the traced program, layer calls marked by :mod:`flaxnorm._call_counts`.
    dependent: which ``invars`` are the inputs the bound is over.
    layers: a certified norm per layer (its module path); a marked layer not
      here is followed primitive by primitive.
    known: the values of inputs that do not depend on the inputs the bound is
      over (integers held fixed, the variables of layers without a certificate
      of their own), by ``invars`` index.
    stored: the key (``"collection/module/name"``) of each other variable, by
      ``invars`` index: a certified layer's variables must reach it unchanged
      (its :func:`flaxnorm._call_counts.mark_variables` marks).
    n_steps: Gram steps for each known matrix or convolution kernel the walk
      bounds (:func:`flaxnorm.matrix_norm_bound`, :func:`flaxnorm.conv_norm_bound`).
    gains: per layer of ``layers``, ``(gain, offset)`` with ``max|y| ≤ gain ·
      max|x| + offset`` for its output ``y`` on an input ``x`` (its kernel's largest
      sum of absolute values per output, its bias's largest ``|b|``): the span of
      its output (:mod:`flaxnorm._spans`), else not known.

  Returns:
    A :class:`Bound`.
  """
  walk = _Walk(layers, n_steps, gains or {})
  ins = [_Value(1.0) if d else _ZERO for d in dependent]
  invars = jaxpr.jaxpr.invars
  values = {invars[i]: _Raw(k) for i, k in (stored or {}).items()}
  values |= _consts(jaxpr) | {invars[i]: x for i, x in (known or {}).items()}
  outs = walk.run(jaxpr.jaxpr, ins, values)
  real = [o for o, v in zip(outs, jaxpr.jaxpr.outvars, strict=True) if _is_real(v)]
  unmeasured = frozenset(walk.unmeasured)
  for o in real:
    if o.bound == _INF:
      return Bound(_INF, o.why, o.where, walk.ratios, unmeasured)
  return Bound(_norm([o.bound for o in real]), layers=walk.ratios, unmeasured=unmeasured)


def _better(out: _Value, fn: _inline.Inline, x: _Value) -> _Value:
  """``out``, or the bound of the inlined function ``fn`` of ``x`` when lower."""
  if x.bound == _INF or not x.bound:
    return out
  mine = _elementwise(fn.x, x, fn.slope) if fn.elementwise else _scaled(x, fn.slope)
  return mine if mine.bound < out.bound else out


def _mixed(
  out: _Value, eqn: Any, made: Mapping[Any, Any], read: Callable[[Any], _Value], value: _Lookup
) -> _Value:
  """The value ``out`` of the sum ``eqn``, tightened when the sum is ``(1 − z) ⊙ a + z ⊙ b``
  with ``z`` in ``[0, 1]`` (a GRU's or MGU's update): a convex combination, in the hull
  of ``a``'s and ``b``'s spans, and since ``y − y' = (1 − z)(a − a') + z(b − b') +
  (z − z')(b' − a')``, with ``L ≤ √(L(a)² + L(b)²) + max|b − a| L(z)`` (each element
  moves by at most the larger of ``a``'s and ``b``'s moves, plus ``z``'s)."""
  found = _mix_operands(eqn, made, value)
  if found is None:
    return out
  a, b, z = (read(v) for v in found)
  sa, sb, sz = (_span(x, v, value) for x, v in zip((a, b, z), found, strict=True))
  if not _spans.within(sz, (0.0, 1.0)) or _INF in (a.bound, b.bound, z.bound):
    return out
  apart = _spans.magnitude(_spans.total([sb, sa], [1, -1]))
  moved = _times(apart, z.bound) if z.bound else 0.0
  bound = _up(_norm([a.bound, b.bound]) + moved)
  span = _spans.hull([sa, sb])
  if out.bound != _INF:  # both hold: the tighter of each
    bound, span = min(bound, out.bound), (max(span[0], out.span[0]), min(span[1], out.span[1]))
  return _Value(bound, span=span) if math.isfinite(bound) else out


def _mix_operands(eqn: Any, made: Mapping[Any, Any], value: _Lookup) -> tuple | None:
  """``(a, b, z)`` when ``eqn`` adds ``(1 − z) ⊙ a`` and ``z ⊙ b`` (either order, all of
  the output's shape), else None."""
  products = [made.get(v) for v in eqn.invars if not isinstance(v, jex_core.Literal)]
  if len(products) != 2:
    return None
  p, q = products
  if p is None or q is None or p.primitive.name != "mul" or q.primitive.name != "mul":
    return None
  size = _size(eqn.outvars[0])
  for first, second in ((p, q), (q, p)):
    for i in (0, 1):
      w = first.invars[i]
      sub = None if isinstance(w, jex_core.Literal) else made.get(w)
      if sub is None or sub.primitive.name != "sub" or isinstance(sub.invars[1], jex_core.Literal):
        continue
      one, z = sub.invars
      ones = value(one)
      if ones is None or not np.all(np.asarray(ones) == 1) or z not in second.invars:
        continue
      a, b = first.invars[1 - i], second.invars[1 - second.invars.index(z)]
      if all(not isinstance(v, jex_core.Literal) and _size(v) == size for v in (a, b, z)):
        return a, b, z
  return None


def _fused_product(
  eqn: Any, made: Mapping[Any, Any], read: Callable[[Any], _Value], value: _Lookup
) -> tuple | None:
  """For a ``split`` of ``x @ C`` (through layer marks, plus a constant ``b``) along one
  of the known ``C``'s free axes: ``(x's value, C, that axis of C, C's contracted and
  batch axes, b's span)``, else None."""
  v, bias = eqn.invars[0], _spans.ZERO
  while not isinstance(v, jex_core.Literal) and v in made:
    e = made[v]
    if e.primitive.name == "name":  # a layer's mark: the identity
      v = e.invars[0]
    elif e.primitive.name == "add" and len(e.invars) == 2:
      deps = [read(u).bound > 0 for u in e.invars]
      if deps.count(True) != 1:
        return None
      j = deps.index(True)
      bias = _spans.total([bias, _span(read(e.invars[1 - j]), e.invars[1 - j], value)], [1, 1])
      v = e.invars[j]
    else:
      break
  dot = None if isinstance(v, jex_core.Literal) else made.get(v)
  if dot is None or dot.primitive.name != "dot_general":
    return None
  deps = [read(u).bound > 0 for u in dot.invars]
  if deps.count(True) != 1 or not all(_size(u) for u in dot.invars):
    return None
  i = deps.index(True)
  c = value(dot.invars[1 - i])
  if c is None or not np.isrealobj(c) or not np.all(np.isfinite(c)):
    return None
  (contracted, batched) = (d[1 - i] for d in dot.params["dimension_numbers"])
  (x_contracted, x_batched) = (d[i] for d in dot.params["dimension_numbers"])
  c_free = [d for d in range(np.ndim(c)) if d not in contracted and d not in batched]
  n_x_free = np.ndim(dot.invars[i].aval) - len(x_contracted) - len(x_batched)
  first = len(batched) + (n_x_free if i == 0 else 0)  # where C's free axes sit in the output
  at = eqn.params["axis"] - first
  if not 0 <= at < len(c_free):
    return None
  return read(dot.invars[i]), np.asarray(c), c_free[at], contracted, batched, bias


def _consts(closed: Any) -> dict[Any, Any]:
  """The known values of a closed jaxpr's constants."""
  return dict(zip(closed.jaxpr.constvars, closed.consts, strict=True))


def _is_real(v: Any) -> bool:
  return jnp.issubdtype(v.aval.dtype, jnp.inexact)


def _size(v: Any) -> int:
  return math.prod(getattr(v.aval, "shape", ()))


def _norm(bounds: Sequence[float]) -> float:
  """``√Σ b²``: the bound of several values side by side (one vector)."""
  nonzero = [b for b in bounds if b]
  if len(nonzero) <= 1:
    return nonzero[0] if nonzero else 0.0
  return _up(math.sqrt(_up(math.fsum(_times(b, b) for b in nonzero))))


def _times(a: float, b: float) -> float:
  """``a · b`` rounded up (exact when either is 1)."""
  return b if a == 1.0 else a if b == 1.0 else _up(a * b)


class _Walk:
  """One pass: each jaxpr variable's :class:`_Value`."""

  def __init__(
    self, layers: Mapping[str, float], n_steps: int, gains: Mapping[str, tuple[float, float]]
  ) -> None:
    self.layers = layers
    self.gains = gains
    self.n_steps = n_steps  # Gram steps of each known kernel's norm
    self.entered: dict[str, _Value] = {}  # each marked call's input (by call id)
    self.running: dict[str, str] = {}  # the calls begun and not ended: their paths, in order
    self.changed: dict[str, str] = {}  # calls whose layer reads a variable not as stored
    self.ratios: dict[str, float] = {}  # see Bound.layers
    self.unmeasured: set[str] = set()  # see Bound.unmeasured
    self.norms: dict[tuple[Any, ...], Any] = {}  # see norm
    self.inlined: dict[int, tuple[jex_core.Jaxpr, dict[Any, _inline.Inline]]] = {}
    self.made: dict[int, tuple[jex_core.Jaxpr, dict[Any, Any]]] = {}  # see producers

  def inline(self, jaxpr: jex_core.Jaxpr) -> dict[Any, _inline.Inline]:
    """:func:`flaxnorm._inline.found` of ``jaxpr``, once (a loop's body runs every step)."""
    if id(jaxpr) not in self.inlined:
      self.inlined[id(jaxpr)] = (jaxpr, _inline.found(jaxpr))  # (holds jaxpr: its id stays)
    return self.inlined[id(jaxpr)][1]

  def producers(self, jaxpr: jex_core.Jaxpr) -> dict[Any, Any]:
    """The equation computing each variable of ``jaxpr``, once."""
    if id(jaxpr) not in self.made:
      self.made[id(jaxpr)] = (jaxpr, {v: e for e in jaxpr.eqns for v in e.outvars})
    return self.made[id(jaxpr)][1]

  def norm(self, known: Any, compute: Callable[[], _T], *more: Any) -> _T:
    """``compute()``: a norm of the value ``known``, ``more`` (hashable) being all else
    it depends on, or what it gave for the same before (a loop's steps meet the same
    kernel again)."""
    data = np.ascontiguousarray(known)
    digest = hashlib.blake2b(data.tobytes(), digest_size=16).digest()
    key = (data.shape, str(data.dtype), digest, *more)
    if key not in self.norms:
      self.norms[key] = compute()
    return self.norms[key]

  def run(
    self,
    jaxpr: jex_core.Jaxpr,
    ins: Sequence[_Value],
    known: Mapping[Any, Any],
    outer: Sequence[Any] | None = None,
    keep: dict[Any, Any] | None = None,
  ) -> list[_Value]:
    """The values of ``jaxpr``'s outputs.

    ``known``: constants' values. ``outer``: the caller's variables for
    ``jaxpr``'s inputs, to which an output's ``origin`` is translated (dropped
    when None or a literal: a jaxpr run twice must not share its variables).
    ``keep``: where the values known at the end go (a loop's next step reuses
    those computed from its constants alone).
    """
    env: dict[Any, _Value] = dict(zip(jaxpr.invars, ins, strict=True))
    known = dict(known)
    value = _Lookup(known)
    inlined = self.inline(jaxpr)
    made = self.producers(jaxpr)

    def read(v: Any) -> _Value:
      return _ZERO if isinstance(v, jex_core.Literal) else env.get(v, _ZERO)

    for eqn in jaxpr.eqns:
      vals = [read(v) for v in eqn.invars]
      where = next(reversed(self.running.values()), "")
      if eqn.primitive.name == "name":  # a mark: the identity, known values passed along
        outs = self._eqn(eqn, vals, value)
        if value.entry(eqn.invars[0]) is not None:
          known[eqn.outvars[0]] = value.entry(eqn.invars[0])
      elif any(x.bound for x in vals):
        outs = self._eqn(eqn, vals, value)
        if eqn.primitive.name == "split":
          outs = self._parts(outs, eqn, made, read, value)
      else:
        outs = [_ZERO] * len(eqn.outvars)
        if not all(v in known for v in eqn.outvars):  # (else: computed by an earlier step)
          known.update(_folded(eqn, [value(v) for v in eqn.invars]))
      for var, out in zip(eqn.outvars, outs, strict=True):
        if var in inlined:
          out = _better(out, inlined[var], env.get(inlined[var].x, _ZERO))
        if eqn.primitive.name == "add" and out.bound:
          out = _mixed(out, eqn, made, read, value)
        if out.bound and not _size(var):  # no element: nothing moves
          out = _ZERO
        if out.bound and out.bound != _INF and not _is_real(var):
          out = _inf(f"{eqn.primitive.name} makes a discrete value from the inputs")
        if out.span != _spans.ANY and not _is_real_floating(var):  # (a complex value)
          out = out._replace(span=_spans.ANY)
        if math.isnan(out.bound) or (out.bound == _INF and out.why is None):
          out = _inf("the bound overflows float64 here, or is NaN (a NaN constant)")
        if out.bound == _INF and out.where is None:
          out = out._replace(where=where)
        env[var] = out
    if keep is not None:
      keep.update(known)
    inner = {*jaxpr.constvars, *(v for e in jaxpr.eqns for v in e.outvars)}
    rename = dict(zip(jaxpr.invars, outer or (), strict=False))
    return [_renamed(read(v), rename, inner | set(jaxpr.invars)) for v in jaxpr.outvars]

  def _eqn(self, eqn: Any, vals: list[_Value], value: _Lookup) -> list[_Value]:
    name = eqn.primitive.name
    if name == "name":
      return [self._mark(str(eqn.params.get("name", "")), vals[0], value.entry(eqn.invars[0]))]
    if name in _ORDERED and any(
      x.bound and not _is_real_floating(v) for x, v in zip(vals, eqn.invars, strict=True)
    ):
      return [_inf(f"{name} of complex values (ordered lexicographically: it jumps)")] * len(
        eqn.outvars
      )
    rule = _RULES.get(name)
    if rule is not None:
      return rule(self, eqn, vals, value)
    if name in _SLOPES:
      if name in _REAL_SLOPES and not _is_real_floating(eqn.invars[0]):
        return [_inf(f"{name} of a complex value (its slope is unbounded off the real line)")]
      return [_elementwise(eqn.invars[0], vals[0], _SLOPES[name], _unary_span(eqn, vals[0].span))]
    if name in _MOVES:
      return [_plain(vals[0])]
    if name in _DISCRETE:
      return [_inf(f"{name} of a value that depends on the inputs jumps")] * len(eqn.outvars)
    subs = list(jex_core.jaxprs_in_params(eqn.params))
    if name in _CALLS and len(subs) == 1 and len(subs[0].invars) == len(vals):
      slope = _activation_slope(eqn, value)
      if slope is not None:
        span = _ACTIVATION_SPANS.get(str(eqn.params.get("name")), _spans.ANY)
        return [_elementwise(eqn.invars[0], vals[0], slope, span)]
      ins = [_with_origin(x, v) for x, v in zip(vals, eqn.invars, strict=True)]
      known = _passed(subs[0].invars, eqn.invars, value, _sub_consts(eqn))
      return self.run(subs[0], ins, known, eqn.invars)
    why = f"no Lipschitz rule for {name} of a value that depends on the inputs"
    return [_inf(why)] * len(eqn.outvars)

  def _parts(
    self,
    outs: list[_Value],
    eqn: Any,
    made: Mapping[Any, Any],
    read: Callable[[Any], _Value],
    value: _Lookup,
  ) -> list[_Value]:
    """The parts ``outs`` of the ``split`` ``eqn``, tightened when the split cuts the
    free axis of a known matrix in a product ``x @ C`` (plus a constant: a bias): part
    ``k`` is ``x @ C_k``, bounded by ``C_k``'s norm (a fused kernel, an
    ``nn.OptimizedLSTMCell``'s or ``nnx.GRUCell``'s gates, each its own)."""
    found = _fused_product(eqn, made, read, value)
    if found is None:
      return outs
    x, c, axis, contracted, batched, bias = found
    ends = np.cumsum([0, *(int(n) for n in eqn.params["sizes"])])
    tightened = []
    for out, start, end in zip(outs, ends[:-1], ends[1:], strict=True):
      part = np.take(c, range(start, end), axis=axis)
      matrices = functools.partial(_matrix_norm, part, contracted, batched, self.n_steps)
      mine = _scaled(x, self.norm(part, matrices, "dot", tuple(contracted), tuple(batched)))
      if mine.bound >= out.bound:
        tightened.append(out)
        continue
      span = _spans.total([_spans.dot(x.span, part, contracted), bias], [1, 1])
      tightened.append(mine._replace(span=(max(span[0], out.span[0]), min(span[1], out.span[1]))))
    return tightened

  def _mark(self, tag: str, x: _Value, entry: Any) -> _Value:
    """A layer's marked input (recorded), a variable it reads (checked: as stored), or
    its output (``b`` times its input's bound)."""
    call = _call_counts.call_of(tag)
    if call is None:
      return x
    kind, path, key = call
    if kind == "in":  # (recorded with its span: a known value's when it is one)
      known = entry is not None and not isinstance(entry, _Raw) and not x.bound
      self.entered[key] = x._replace(span=_spans.of_array(entry)) if known else x
      self.running[key] = path
      return x
    if kind == "var":
      key, _, name = key.partition(_call_counts.SEP)
      if not (isinstance(entry, _Raw) and entry.key == name) and path in self.layers:
        self.changed[key] = name
      return x
    self.running.pop(key, None)
    entered = self.entered.get(key)
    if entered is not None and entered.bound and x.bound < _INF:
      ratio = _up(x.bound / entered.bound)
      self.ratios[path] = max(self.ratios.get(path, 0.0), ratio)
    elif entered is not None and not entered.bound:
      self.unmeasured.add(path)
    if kind == "end" or path not in self.layers or entered is None:
      return x
    if key in self.changed:
      return _Value(_INF, _CHANGED.format(self.changed[key]), None, path)
    out = _scaled(entered, self.layers[path])
    return out if out.bound == _INF else out._replace(span=self._output_span(path, entered))

  def _output_span(self, path: str, entered: _Value) -> _spans.Span:
    """The span of a certified layer's output, its input ``entered``: from its gain."""
    gain, offset = self.gains.get(path, (_INF, _INF))
    r = _up(_up(gain * _spans.magnitude(entered.span)) + offset)
    return (-r, r) if math.isfinite(r) else _spans.ANY


_CHANGED = (
  "the layer computes with {} changed from the stored variable (nn.map_variables, "
  "nn.WeightNorm, nn.SpectralNorm): its certificate bounds the stored one"
)


def _folded(eqn: Any, args: Sequence[Any]) -> dict[Any, Any]:
  """The outputs of ``eqn`` when its operands ``args`` are known constants (a constant
  broadcast or reshaped before it scales, indices computed from an integer input):
  computed, when they are small."""
  if (
    any(a is None for a in args)
    or eqn.primitive.name in _NOT_FOLDED
    or eqn.effects  # a callback, a print: not run here
    or sum(_size(v) for v in eqn.outvars) > _FOLD_LIMIT
    or any(jnp.issubdtype(v.aval.dtype, jax.dtypes.extended) for v in eqn.outvars)
  ):  # (PRNG keys: the draws they make are not folded either)
    return {}
  try:
    outs = eqn.primitive.bind(*args, **eqn.params)
  except Exception:  # a custom_jvp_call binds with its rule: its program is what it computes
    call = eqn.params.get("call_jaxpr")
    try:
      outs = jex_core.jaxpr_as_fun(call)(*args) if isinstance(call, jex_core.ClosedJaxpr) else None
    except Exception:
      outs = None
    if outs is None:  # not foldable here: left unknown
      return {}
  outs = outs if eqn.primitive.multiple_results else [outs]
  return dict(zip(eqn.outvars, (np.asarray(o) for o in outs), strict=True))


_FOLD_LIMIT = 1 << 24  # elements (a 64 MiB float32 kernel)
_NOT_FOLDED = {  # a value each run draws anew
  "random_bits",
  "random_seed",
  "random_wrap",
  "random_unwrap",
  "rng_bit_generator",
  "rng_uniform",
}
# Primitives that order their operands: of complex values (ordered lexicographically) they jump.
_ORDERED = {
  "max",
  "min",
  "clamp",
  "reduce_max",
  "reduce_min",
  "reduce_window_max",
  "reduce_window_min",
  "cummax",
  "cummin",
  "cumlogsumexp",
  "scatter-max",
  "scatter-min",
  "sort",
}


# Primitives that call their one subprogram once on their operands, in order.
_CALLS = {
  "jit",
  "pjit",
  "closed_call",
  "core_call",
  "remat",
  "remat2",
  "checkpoint",
  "custom_jvp_call",
  "custom_vjp_call",
  "custom_vjp_call_jaxpr",
}


def _passed(
  invars: Sequence[Any], operands: Sequence[Any], value: _Lookup, known: Mapping
) -> dict[Any, Any]:
  """``known`` with a subprogram's inputs whose operands' values are known (or stored
  variables: :class:`_Raw`)."""
  found = dict(known)
  for inner, outer in zip(invars, operands, strict=True):
    c = value.entry(outer)
    if c is not None:
      found[inner] = c
  return found


def _is_real_floating(v: Any) -> bool:
  return jnp.issubdtype(v.aval.dtype, jnp.floating)


def _renamed(x: _Value, rename: Mapping[Any, Any], inner: set[Any]) -> _Value:
  """``x`` as its caller sees it: an origin among the callee's inputs becomes the
  caller's operand; one among the callee's own values is dropped (a jaxpr run twice
  must not share them); one in the caller's scope stays."""
  if x.origin is None or x.origin.base not in inner:
    return x
  base = rename.get(x.origin.base)
  if base is None or isinstance(base, jex_core.Literal):
    return _plain(x)
  return x._replace(origin=x.origin._replace(base=base))


def _with_origin(x: _Value, var: Any) -> _Value:
  """``x``, held by ``var``, as its own origin when it has none (passed into a callee:
  a select there between functions of it is one of them)."""
  if x.origin is not None or not 0.0 < x.bound < _INF or isinstance(var, jex_core.Literal):
    return x
  return x._replace(origin=_Origin(var, 1.0, x.bound))


def _plain(x: _Value) -> _Value:
  """``x`` without its origin."""
  return x._replace(origin=None)


def _scaled(x: _Value, factor: float) -> _Value:
  if x.bound == _INF or x.bound == 0.0:
    return _plain(x)
  return _Value(_times(x.bound, factor))


def _sub_consts(eqn: Any) -> dict[Any, Any]:
  for p in eqn.params.values():
    if isinstance(p, jex_core.ClosedJaxpr):
      return _consts(p)
  return {}


def _elementwise(
  var: Any, x: _Value, slope: float | np.ndarray, span: _spans.Span = _spans.ANY
) -> _Value:
  """An elementwise function, of slope at most ``slope`` (a number, or one per element
  of ``x``) and values in ``span``, of ``x`` (held by ``var``)."""
  if x.bound == _INF:
    return x
  o = _origin_of(x, var)
  composed = _Origin(o.base, _slopes_times(o.slope, slope), o.bound)
  return _Value(_through(composed, _times(x.bound, _top(slope))), None, composed, span=span)


def _origin_of(x: _Value, var: Any) -> _Origin:
  """``x``'s origin: a value is an elementwise function of itself, slope 1."""
  return x.origin if x.origin is not None else _Origin(var, 1.0, x.bound)


def _top(slope: float | np.ndarray) -> float:
  """The largest of slopes (rounded up: an array's are float64, rounded as they were made)."""
  return float(np.max(slope, initial=0.0)) if isinstance(slope, np.ndarray) else slope


def _through(o: _Origin, bound: float) -> float:
  """``bound``, or ``L(base) · max slope`` when lower (a chain of per-element scales)."""
  return min(bound, _times(o.bound, _top(o.slope)))


_SLOPES_LIMIT = 1 << 22  # elements: past this, per-element slopes collapse to their largest


def _slopes_times(a: float | np.ndarray, b: float | np.ndarray) -> float | np.ndarray:
  """Slopes ``a · b`` per element (each rounded up)."""
  if not isinstance(a, np.ndarray) and not isinstance(b, np.ndarray):
    return _times(a, b)
  product = np.nextafter(np.multiply(a, b, dtype=np.float64), np.inf)
  return product if product.size <= _SLOPES_LIMIT else float(product.max(initial=0.0))


def _slopes_plus(slopes: Sequence[float | np.ndarray]) -> float | np.ndarray:
  """Slopes added, element by element (rounded up)."""
  if not any(isinstance(s, np.ndarray) for s in slopes):
    return _up(math.fsum(slopes))  # (a sum of two or more: at most one rounding per term)
  total = np.sum(np.broadcast_arrays(*[np.asarray(s, np.float64) for s in slopes]), axis=0)
  return np.nextafter(total * (1 + len(slopes) * 2.0**-52), np.inf)


def _grown(vals: Sequence[_Value], eqn: Any) -> list[tuple[_Value, Any]]:
  """The operands that depend on the inputs, each with its growth from broadcasting to
  the output (``k`` copies of each element: ``√k``), and its variable."""
  out = _size(eqn.outvars[0])
  found = []
  for x, v in zip(vals, eqn.invars, strict=True):
    if x.bound:
      n = _size(v)
      if n and out > n:  # copies: the same span
        x = _scaled(x, math.sqrt(out / n))._replace(span=x.span)
      found.append((x, v))
  return found


def _first_inf(parts: Sequence[_Value]) -> _Value | None:
  return next((x for x in parts if x.bound == _INF), None)


def _sum_rule(walk: _Walk, eqn: Any, vals: list[_Value], value: Any) -> list[_Value]:
  parts = [x for x, _ in _grown(vals, eqn)]
  bad = _first_inf(parts)
  if bad is not None:
    return [_plain(bad)]
  signs = [1, -1] if eqn.primitive.name == "sub" else [1] * len(vals)
  span = _spans.total(_spans_of(vals, eqn, value), signs)
  if len(parts) == 1:
    return [_plain(parts[0])._replace(span=span)]
  out = _Value(_up(math.fsum(x.bound for x in parts)), span=span)
  return [_added(out, vals, eqn)]


def _added(out: _Value, vals: list[_Value], eqn: Any) -> _Value:
  """The sum ``out`` of ``vals``, or better when every part that depends on the inputs
  is an elementwise function of one value, of its shape: one too, whose slopes add."""
  size = _size(eqn.outvars[0])
  parts = [(x, v) for x, v in zip(vals, eqn.invars, strict=True) if x.bound]
  if not all(_size(v) == size for _, v in parts):
    return out
  origins = [_origin_of(x, v) for x, v in parts]
  if len({o.base for o in origins}) != 1:
    return out
  summed = _Origin(origins[0].base, _slopes_plus([o.slope for o in origins]), origins[0].bound)
  return out._replace(bound=_through(summed, out.bound), origin=summed)


def _side_by_side(parts: Sequence[_Value]) -> _Value:
  """Values whose elements each move by one of the parts' elements' changes: ``√Σ L²``."""
  return _first_inf(parts) or _Value(_norm([x.bound for x in parts]))


def _max_rule(walk: _Walk, eqn: Any, vals: list[_Value], value: Any) -> list[_Value]:
  """``max``/``min``/``clamp``: elementwise, each output moves with one operand."""
  out = _picked(_grown(vals, eqn), eqn)
  spans = _spans_of(vals, eqn, value)
  if eqn.primitive.name == "clamp":  # clamp(a, x, b) = min(max(x, a), b)
    (a0, a1), (x0, x1), (b0, b1) = spans
    span = (min(max(x0, a0), b0), min(max(x1, a1), b1))
  else:
    pick = max if eqn.primitive.name == "max" else min
    span = (pick(lo for lo, _ in spans), pick(hi for _, hi in spans))
  return [out if out.bound == _INF else out._replace(span=span)]


def _picked(cases: list[tuple[_Value, Any]], eqn: Any) -> _Value:
  """Each element one of ``cases``' (values and their variables) elements: ``√Σ L²``, or
  the largest slope when all are elementwise functions of one value."""
  bad = _first_inf([x for x, _ in cases])
  if bad is not None:
    return bad
  origins = [_origin_of(x, v) for x, v in cases]
  if all(_size(v) == _size(eqn.outvars[0]) for _, v in cases):
    shared = _shared(origins)
    if shared is not None:
      return _Value(_through(shared, max(x.bound for x, _ in cases)), None, shared)
  return _side_by_side([x for x, _ in cases])


def _shared(origins: Sequence[_Origin | None]) -> _Origin | None:
  """One origin for values that are all elementwise functions of one value (the largest
  slope, element by element), or None."""
  found = [o for o in origins if o is not None]
  if len(found) != len(origins) or len({o.base for o in found}) != 1:
    return None
  slopes = [o.slope for o in found]
  if any(isinstance(s, np.ndarray) for s in slopes):
    slope = np.maximum.reduce(np.broadcast_arrays(*[np.asarray(s, np.float64) for s in slopes]))
  else:
    slope = max(slopes)
  return _Origin(found[0].base, slope, found[0].bound)


def _largest(value: Any) -> float | None:
  """``max |c|`` of a known constant, or None."""
  if value is None:
    return None
  a = np.abs(np.asarray(value)).astype(np.float64)  # |c| of a complex c too
  return float(a.max()) if a.size else 0.0


_COMPUTED = (
  "the model {} a value it computes that is not known here (not a literal, a constant, "
  "or a variable of a module without a certificate of its own: noise from a key, a "
  "certified layer's param used outside it, params nn.scan slices per step, an array "
  "too large to compute here)"
)


def _scale_by(
  eqn: Any,
  vals: list[_Value],
  factor: float | None,
  verb: str,
  span: _spans.Span,
  c: Any = None,
  invert: bool = False,
) -> list[_Value]:
  """The one input-dependent operand of ``eqn`` times a constant of largest ``|c|``
  ``factor`` (``c``: the constant, when known; ``invert``: divided by it), giving
  values in ``span``."""
  ((x, v),) = _grown(vals, eqn)
  if factor is None:
    return [_inf(_COMPUTED.format(verb))]
  if not math.isfinite(factor):
    return [_inf(f"the model {verb} a constant that holds inf or NaN")]
  if _size(v) == _size(eqn.outvars[0]):
    slope: float | np.ndarray = factor
    if c is not None and np.size(c) > 1:  # (a same-shape constant: one slope per element)
      slope = np.abs(np.asarray(c)).astype(np.float64).reshape(-1)
      slope = np.nextafter(1.0 / slope, np.inf) if invert else slope
    return [_elementwise(v, x, slope, span)]
  return [_scaled(x, factor)._replace(span=span)]


def _mul_rule(walk: _Walk, eqn: Any, vals: list[_Value], value: Any) -> list[_Value]:
  """A scale by a known constant; or, of two values that both depend on the inputs, a
  product bounded by their spans: ``max|a| L(b) + max|b| L(a)`` (:mod:`flaxnorm._spans`)."""
  span = _spans.product(*_spans_of(vals, eqn, value))
  if all(x.bound for x in vals):
    (a, _), (b, _) = _grown(vals, eqn)
    ra, rb = _spans.magnitude(a.span), _spans.magnitude(b.span)
    if not all(map(math.isfinite, (ra, rb, a.bound, b.bound))):
      return [_inf(_PRODUCT)]
    return [_Value(_up(_times(ra, b.bound) + _times(rb, a.bound)), span=span)]
  k = 1 if vals[0].bound else 0
  c = value(eqn.invars[k])
  factor = _largest(c)
  if factor is None:  # not known, but within a span (a certified layer's output)
    factor = _spans.magnitude(vals[k].span)
    factor = factor if math.isfinite(factor) else None
  return _scale_by(eqn, vals, factor, "multiplies by", span, c)


_PRODUCT = (
  "mul of two values that depend on the inputs, one of them not known to stay in a bounded "
  "interval (a product is bounded where both factors are, as a sigmoid's or tanh's output: "
  "not Lipschitz in general)"
)


def _div_rule(walk: _Walk, eqn: Any, vals: list[_Value], value: Any) -> list[_Value]:
  """A division by a known constant; or by a value that depends on the inputs and whose
  span keeps away from 0, by at least ``m``: since ``a/b − a'/b' = (a − a')/b +
  a'(b' − b)/(b b')``, ``L ≤ L(a)/m + max|a| L(b)/m²``."""
  if vals[1].bound:
    return [_quotient(eqn, vals, value)]
  c = value(eqn.invars[1])
  smallest = None if c is None else np.abs(np.asarray(c)).astype(np.float64).min(initial=np.inf)
  dtype = eqn.invars[1].aval.dtype
  tiny = jnp.finfo(dtype).tiny if jnp.issubdtype(dtype, jnp.inexact) else 1
  if smallest is not None and smallest < tiny:
    return [_inf("div by a constant that holds 0 or a subnormal number (flushed to 0)")]
  span = _spans.ANY
  if smallest is not None:
    span = _spans.quotient(vals[0].span, _spans.of_array(c), float(smallest))
  factor = None if smallest is None else _up(1.0 / float(smallest))
  return _scale_by(eqn, vals, factor, "divides by", span, c, invert=True)


def _quotient(eqn: Any, vals: list[_Value], value: Any) -> _Value:
  """:func:`_div_rule` by a value that depends on the inputs."""
  grown = [x for x, _ in _grown(vals, eqn)]
  a, b = grown if len(grown) == 2 else (_ZERO, grown[0])
  sa, sb = _spans_of(vals, eqn, value)
  m = 0.0 if sb[0] <= 0 <= sb[1] else min(abs(sb[0]), abs(sb[1]))
  ra = _spans.magnitude(sa)
  if not m or _INF in (a.bound, b.bound) or not math.isfinite(ra):
    return _inf(
      "div by a value that depends on the inputs, not known to stay away from 0 (or of a "
      "numerator not known to stay bounded): not Lipschitz in general"
    )
  moved = _up(_up(_times(ra, b.bound) / m) / m) if ra else 0.0
  return _Value(_up(_up(a.bound / m) + moved), span=_spans.quotient(sa, sb, m))


def _select_rule(walk: _Walk, eqn: Any, vals: list[_Value], value: Any) -> list[_Value]:
  """``select_n``: the predicate is taken as picking continuously (a precondition)."""
  cases = _grown([_ZERO, *vals[1:]], eqn)
  if not cases:  # constants picked by the inputs: a step
    return [_inf("select_n between values fixed by the inputs, picked by them (a step)")]
  return [_hulled(_picked(cases, eqn), _spans_of(vals, eqn, value)[1:])]


def _hulled(x: _Value, spans: Sequence[_spans.Span]) -> _Value:
  """``x``, one of values of ``spans`` side by side or picked: in their hull."""
  return x if x.bound == _INF else x._replace(span=_spans.hull(spans))


def _concat_rule(walk: _Walk, eqn: Any, vals: list[_Value], value: Any) -> list[_Value]:
  return [_hulled(_side_by_side(vals), _spans_of(vals, eqn, value))]


def _broadcast_rule(walk: _Walk, eqn: Any, vals: list[_Value], value: Any) -> list[_Value]:
  """``broadcast_in_dim``, ``tile``: copies, ``√k``; an elementwise function of its
  operand only when nothing moves (a ``broadcast_in_dim`` may also permute axes)."""
  (x, _), *_ = _grown(vals[:1], eqn)
  dims = eqn.params.get("broadcast_dimensions", ())
  moves = list(dims) != sorted(dims) or _size(eqn.invars[0]) != _size(eqn.outvars[0])
  return [_plain(x) if moves or eqn.primitive.name == "tile" else x]


def _reduce_sum_rule(walk: _Walk, eqn: Any, vals: list[_Value], value: Any) -> list[_Value]:
  """A sum of ``k`` elements moves by at most ``√k`` times their change (Cauchy-Schwarz)."""
  n, m = _size(eqn.invars[0]), max(_size(eqn.outvars[0]), 1)
  out = _scaled(vals[0], math.sqrt(n / m))
  return [out if out.bound == _INF else out._replace(span=_spans.times(vals[0].span, n / m))]


def _reduce_max_rule(walk: _Walk, eqn: Any, vals: list[_Value], value: Any) -> list[_Value]:
  """``reduce_max``/``reduce_min``: each output moves by one element's change."""
  return [_plain(vals[0])]


def _pad_rule(walk: _Walk, eqn: Any, vals: list[_Value], value: Any) -> list[_Value]:
  """The operand side by side with its padding value (copied to every padded element)."""
  padding = _grown([_ZERO, vals[1]], eqn)
  out = _side_by_side([_plain(vals[0]), *(x for x, _ in padding)])
  return [_hulled(out, _spans_of(vals, eqn, value))]


def _split_rule(walk: _Walk, eqn: Any, vals: list[_Value], value: Any) -> list[_Value]:
  """``split``, ``unstack``: each part is a slice."""
  return [_plain(vals[0])] * len(eqn.outvars)


# Indexing primitives: ``(where the indices start, where they end, the data operands)``.
_INDEXED = {
  "dynamic_slice": (slice(1, None), (0,)),
  "dynamic_update_slice": (slice(2, None), (0, 1)),
  "scatter": (slice(1, 2), (0, 2)),  # a set (no update_jaxpr): each element from one source
  "scatter-max": (slice(1, 2), (0, 2)),  # each element the largest of those sent to it
  "scatter-min": (slice(1, 2), (0, 2)),
  "gather": (slice(1, 2), (0,)),
}


def _indexed_rule(walk: _Walk, eqn: Any, vals: list[_Value], value: Any) -> list[_Value]:
  """Elements picked or placed at indices that must not depend on the inputs."""
  name = eqn.primitive.name
  indices, data = _INDEXED[name]
  if any(x.bound for x in vals[indices]):
    return [_inf(f"{name} at indices computed from the inputs (what it picks can jump)")]
  if name == "scatter" and eqn.params.get("update_jaxpr") is not None:
    return [_inf("scatter that combines updates with the operand (.at[].apply)")]
  if name == "gather":
    repeats = _repeats(eqn, value)
    if repeats is None:
      return [_inf("gather of a value that depends on the inputs at indices not known here")]
    return [_scaled(vals[0], math.sqrt(repeats))]
  return [_side_by_side([vals[i] for i in data])]


def _repeats(eqn: Any, value: Callable[[Any], Any]) -> int | None:
  """How many times a ``gather`` with known indices copies its most copied element: the
  gather run on the operand's element numbers."""
  indices, operand = value(eqn.invars[1]), eqn.invars[0].aval
  size = math.prod(operand.shape)
  if indices is None or size >= 2**31 or _size(eqn.outvars[0]) > _FOLD_LIMIT:
    return None
  numbers = jnp.arange(size, dtype=jnp.int32).reshape(operand.shape)
  params = {**eqn.params, "fill_value": -1}
  picked = np.asarray(eqn.primitive.bind(numbers, jnp.asarray(indices), **params)).ravel()
  picked = picked[(picked >= 0) & (picked < size)]
  return int(np.bincount(picked, minlength=1).max()) if picked.size else 0


def _window_overlap(params: Mapping[str, Any]) -> tuple[int, int]:
  """``(window size, most windows one element is in)`` of a ``reduce_window``."""
  size, overlap = 1, 1
  for w, s, d in zip(
    params["window_dimensions"], params["window_strides"], params["window_dilation"], strict=True
  ):
    size *= w
    overlap *= min(w, -(-((w - 1) * d + 1) // s))
  return size, overlap


def _window_sum_rule(walk: _Walk, eqn: Any, vals: list[_Value], value: Any) -> list[_Value]:
  """A sum over windows: ``‖A‖₂ ≤ √(‖A‖₁‖A‖∞) = √(overlap · window)`` for a 0/1 ``A``."""
  size, overlap = _window_overlap(eqn.params)
  return [_scaled(vals[0], math.sqrt(size * overlap))]


def _window_max_rule(walk: _Walk, eqn: Any, vals: list[_Value], value: Any) -> list[_Value]:
  """A max over windows moves by its element's change: ``√overlap`` over all windows."""
  _, overlap = _window_overlap(eqn.params)
  return [_scaled(vals[0], math.sqrt(overlap))]


def _sort_rule(walk: _Walk, eqn: Any, vals: list[_Value], value: Any) -> list[_Value]:
  """``sort``: sorting is 1-Lipschitz (GroupSort, MaxMin); values carried along by the
  keys jump where two keys cross (a discrete result for integers, a reason for reals)."""
  n_keys = eqn.params["num_keys"]
  if not any(x.bound for x in vals[:n_keys]):  # a fixed permutation
    return [_plain(x) for x in vals]
  key = _plain(vals[0]) if n_keys == 1 else _inf(_CARRIED)
  return [key, *[_inf(_CARRIED)] * (len(vals) - 1)]


_CARRIED = "sort that moves values by keys computed from the inputs (they jump where keys cross)"


def _each_rule(walk: _Walk, eqn: Any, vals: list[_Value], value: Any) -> list[_Value]:
  """``optimization_barrier``, ``device_put``: each output is its operand."""
  return [_plain(x) for x in vals]


def _cond_rule(walk: _Walk, eqn: Any, vals: list[_Value], value: Any) -> list[_Value]:
  """One branch runs: the largest bound over the branches (a branch picked from the
  inputs is refused by :mod:`flaxnorm._call_counts`)."""
  runs = [
    walk.run(b.jaxpr, vals[1:], _passed(b.jaxpr.invars, eqn.invars[1:], value, _consts(b)))
    for b in eqn.params["branches"]
  ]
  return [_one_of(outs) for outs in zip(*runs, strict=True)]


def _one_of(outs: Sequence[_Value]) -> _Value:
  """One of ``outs`` (a branch's): the largest bound; an elementwise function of a value
  only when every branch's is one of that value."""
  top = max(outs, key=lambda o: o.bound)
  shared = _shared([o.origin for o in outs])
  top = _hulled(top, [o.span for o in outs])
  return _plain(top) if top.bound == _INF or shared is None else top._replace(origin=shared)


def _scan_rule(walk: _Walk, eqn: Any, vals: list[_Value], value: Any) -> list[_Value]:
  """A scan, step by step (or one step, once the carry's bounds stop changing, or after
  ``_EXACT_STEPS`` once they stop growing; every step when it slices known values,
  a stack of layers' params, as each step's are then its own, or carries known
  values that change, a ``fori_loop``'s index).

  The stacked outputs get ``√Σₜ L(yₜ)²``; a scan that carries nothing from the
  inputs maps its slices side by side: the largest step's bound.
  """
  p = eqn.params
  n_consts, n_carry, length = p["num_consts"], p["num_carry"], p["length"]
  body = p["jaxpr"].jaxpr
  known = _passed(body.invars[:n_consts], eqn.invars[:n_consts], value, _consts(p["jaxpr"]))
  ins = [_plain(x) for x in vals]  # a slice moves at most as much as the whole
  consts, carry, xs = ins[:n_consts], ins[n_consts : n_consts + n_carry], ins[n_consts + n_carry :]
  if not length:
    return carry + [_ZERO] * (len(eqn.outvars) - n_carry)
  sliced = _sliced(eqn, value)
  step = functools.partial(_scan_step, walk, body, sliced, p["reverse"], n_consts, n_carry)
  found: dict[Any, Any] = {}
  carried = {}
  if length <= _EXACT_STEPS:  # a scan's initial carries known here
    carried = _known_values(eqn.invars[n_consts : n_consts + n_carry], carry, value)
  outs, after = step(known, 0, consts + carry + xs, carried, found)
  same = _from_consts(body, n_consts)  # what every step computes alike: computed once
  step = functools.partial(step, {**known, **{v: x for v, x in found.items() if v in same}})
  settled = _settled(sliced, p["reverse"], length)  # from here on every step reads alike
  if not any(x.bound for x in consts + carry + outs[:n_carry]) and not _chooses(body):
    first = (outs, carried, after)
    side = _side_by_side_steps(step, consts + carry + xs, first, n_carry, length, settled)
    if side is not None:
      return side
  squares = [0.0] * (len(eqn.outvars) - n_carry)  # steps side by side: √Σ L(y_t)²
  spans = [o.span for o in outs[n_carry:]]  # the stacked outputs': the hull of the steps'
  for t in range(length):
    if t:
      carried = after
      outs, after = step(t, consts + carry + xs, carried)
    bad = _first_inf(outs[n_carry:])
    if bad is not None:
      return [bad] * len(eqn.outvars)
    fixed = (
      t >= settled
      and [(o.bound, o.span) for o in outs[:n_carry]] == [(c.bound, c.span) for c in carry]
      and _same_values(carried, after)
    )
    if t >= max(_EXACT_STEPS, settled):  # the rules are monotone: a step that grows no
      fixed = not _grows(outs[:n_carry], carry)  # bound and no span
      outs = _widened(outs, carry)
    steps = length - t if fixed else 1  # at a fixed point every later step is this one
    squares = [_up(s + steps * _times(y.bound, y.bound)) for s, y in zip(squares, outs[n_carry:])]
    spans = [_spans.hull([s, y.span]) for s, y in zip(spans, outs[n_carry:], strict=True)]
    carry = outs[:n_carry]
    if fixed:
      break
  return carry + [
    _Value(_up(math.sqrt(s)), span=span) if s else _ZERO
    for s, span in zip(squares, spans, strict=True)
  ]


def _grows(outs: Sequence[_Value], carry: Sequence[_Value]) -> bool:
  """Whether a loop step's carries ``outs`` exceed its input ``carry`` in bound or span."""
  return any(
    o.bound > c.bound or not _spans.within(o.span, c.span) for o, c in zip(outs, carry, strict=True)
  )


def _widened(outs: list[_Value], carry: Sequence[_Value]) -> list[_Value]:
  """``outs`` with the spans of carries that outgrow ``carry``'s given up (``ANY``):
  so that a loop walked to a fixed point reaches one."""
  n = len(carry)
  wide = [
    o if _spans.within(o.span, c.span) else o._replace(span=_spans.ANY)
    for o, c in zip(outs[:n], carry, strict=True)
  ]
  return wide + outs[n:]


def _from_consts(body: jex_core.Jaxpr, n_consts: int) -> set[Any]:
  """The variables of ``body`` computed from its first ``n_consts`` inputs alone."""
  varying = set(body.invars[n_consts:])
  for e in body.eqns:
    if any(v in varying for v in e.invars if not isinstance(v, jex_core.Literal)):
      varying.update(e.outvars)
  return {*body.invars[:n_consts], *(v for e in body.eqns for v in e.outvars)} - varying


def _sliced(eqn: Any, value: _Lookup) -> dict[int, Any]:
  """The known values a scan slices (by position among its ``xs``)."""
  first = eqn.params["num_consts"] + eqn.params["num_carry"]
  found = {i: value(v) for i, v in enumerate(eqn.invars[first:])}
  return {i: np.asarray(c) for i, c in found.items() if c is not None}


def _same_values(a: Mapping[int, np.ndarray], b: Mapping[int, np.ndarray]) -> bool:
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _scan_step(
  walk: _Walk,
  body: jex_core.Jaxpr,
  sliced: Mapping[int, Any],
  reverse: bool,
  n_consts: int,
  n_carry: int,
  known: Mapping[Any, Any],
  t: int,
  ins: list[_Value],
  carried: Mapping[int, np.ndarray],
  keep: dict[Any, Any] | None = None,
) -> tuple[list[_Value], dict[int, np.ndarray]]:
  """The bounds of step ``t``'s outputs, the known slices it reads and the ``carried``
  values (by carry position) known; and the carries it gives that are known (``keep``:
  see :meth:`_Walk.run`)."""
  first = n_consts + n_carry  # where the body's slices begin
  known = {**known, **{body.invars[n_consts + j]: c for j, c in carried.items()}}
  if sliced:
    length = next(iter(sliced.values())).shape[0]
    k = length - 1 - t if reverse else t
    known = {**known, **{body.invars[first + i]: c[k] for i, c in sliced.items()}}
  kept: dict[Any, Any] = {} if keep is None else keep
  outs = [_plain(o) for o in walk.run(body, ins, known, keep=kept)]
  return outs, _known_values(body.outvars[:n_carry], outs[:n_carry], _Lookup(kept))


def _side_by_side_steps(
  step: Callable[..., tuple[list[_Value], dict[int, np.ndarray]]],
  ins: list[_Value],
  first: tuple[list[_Value], dict[int, np.ndarray], dict[int, np.ndarray]],
  n_carry: int,
  length: int,
  settled: int,
) -> list[_Value] | None:
  """The outputs of a scan whose first step carries nothing from the inputs, its steps
  (``first``: the first's outputs, and the known carries it read and gave) walked
  until every later one reads what the last did (its slices ``settled``, its known
  carries unchanged): each slice mapped alone, the largest step's bound; None when a
  later step carries something from the inputs after all (it reads another known
  slice)."""
  outs, before, after = first
  for t in range(1, length):
    if t > settled and _same_values(before, after):
      break
    more, following = step(t, ins, after)
    if any(o.bound for o in more[:n_carry]):
      return None
    outs = [
      _hulled(max(a, b, key=_worse), [a.span, b.span]) for a, b in zip(outs, more, strict=True)
    ]
    before, after = after, following
  return outs


def _settled(sliced: Mapping[int, Any], reverse: bool, length: int) -> int:
  """The first step from which every later step reads the same known slices (0 when the
  scan reads none)."""
  last = 0
  for c in sliced.values():
    if not c.size:
      continue
    flat = np.ascontiguousarray(c).view(np.uint8).reshape(length, -1)  # bits: -0.0 is not 0.0
    flat = flat[::-1] if reverse else flat
    changes = np.flatnonzero((flat[1:] != flat[:-1]).any(axis=1))
    last = max(last, int(changes[-1]) + 1 if changes.size else 0)
  return last


def _worse(x: _Value) -> float:
  return x.bound


_EXACT_STEPS = 4096  # a scan's steps followed one by one, at least


def _chooses(jaxpr: jex_core.Jaxpr) -> bool:
  """Whether ``jaxpr`` runs a ``cond`` or ``while``: their bound is the largest over the
  choices, which differ from step to step of a scan (no bound of one step's map)."""
  return any(
    e.primitive.name in ("cond", "while") or any(map(_chooses, jex_core.jaxprs_in_params(e.params)))
    for e in jaxpr.eqns
  )


def _dot_rule(walk: _Walk, eqn: Any, vals: list[_Value], value: Any) -> list[_Value]:
  """A matrix product with a known constant (a resize, ``x @ np_matrix``): the largest
  certified norm of its matrix per batch index (:func:`flaxnorm.matrix_norm_bound`)."""
  deps = [k for k, x in enumerate(vals) if x.bound]
  if len(deps) > 1:
    return [
      _inf(
        "dot_general of two values that depend on the inputs (no rule bounds it: not Lipschitz in general)"
      )
    ]
  i = deps[0]
  c = value(eqn.invars[1 - i])
  if c is None:
    return [_inf(_OUTSIDE.format("a matrix product (dot_general)"))]
  if not np.isrealobj(c) or not np.all(np.isfinite(c)):
    return [_inf("dot_general with a known operand that is complex or not finite (no rule here)")]
  (contracted, batched) = (d[1 - i] for d in eqn.params["dimension_numbers"])
  matrices = functools.partial(_matrix_norm, c, contracted, batched, walk.n_steps)
  norm = walk.norm(c, matrices, "dot", tuple(contracted), tuple(batched))
  return [_scaled(vals[i], norm)._replace(span=_spans.dot(vals[i].span, c, contracted))]


def _matrix_norm(c: Any, contracted: Sequence[int], batched: Sequence[int], n_steps: int) -> float:
  """The largest certified norm of ``c``'s matrices (``contracted`` by the rest), one per
  index of its ``batched`` axes, with ``n_steps`` Gram steps."""
  c = np.asarray(c, np.float64)
  free = [d for d in range(c.ndim) if d not in contracted and d not in batched]
  sizes = [math.prod(c.shape[d] for d in dims) for dims in (batched, contracted, free)]
  blocks = c.transpose([*batched, *contracted, *free]).reshape(sizes)
  return max((_certify.matrix_norm_bound(b, n_steps=n_steps) for b in blocks), default=0.0)


def _conv_rule(walk: _Walk, eqn: Any, vals: list[_Value], value: Any) -> list[_Value]:
  """A convolution with a known constant kernel (a blur, an anti-aliasing filter,
  ``jnp.convolve``): :func:`flaxnorm.conv_norm_bound` of that kernel on the input's
  spatial size; each example is mapped alone, by the same operator."""
  if vals[1].bound:
    return [_inf("conv_general_dilated with a kernel that depends on the inputs")]
  kernel, p = value(eqn.invars[1]), eqn.params
  if kernel is None:
    return [_inf(_OUTSIDE.format("a convolution (conv_general_dilated)"))]
  if not _size(eqn.outvars[0]):
    return [_ZERO]
  if p["batch_group_count"] != 1:
    return [_inf("conv_general_dilated with batch_group_count > 1 (no rule here)")]
  lhs, rhs, out = p["dimension_numbers"]
  shape, out_shape = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape

  def bound() -> float | str:  # the norm, or why conv_norm_bound refuses
    try:
      return _certify.dilated_conv_norm_bound(
        np.asarray(kernel).transpose([*rhs[2:], rhs[1], rhs[0]]),
        [shape[i] for i in lhs[2:]],
        [out_shape[i] for i in out[2:]],
        strides=p["window_strides"],
        padding=p["padding"],
        input_dilation=p["lhs_dilation"],
        kernel_dilation=p["rhs_dilation"],
        feature_group_count=p["feature_group_count"],
        n_steps=walk.n_steps,
      )
    except (TypeError, ValueError) as e:
      return str(e)

  norm = walk.norm(kernel, bound, "conv", shape, out_shape, repr(sorted(p.items())))
  if isinstance(norm, str):
    return [_inf(f"conv_general_dilated with a known kernel that conv_norm_bound refuses: {norm}")]
  summed = [d for d in range(len(rhs)) if d != rhs[0]]  # all but the output feature axis
  span = _spans.dot(_spans.hull([vals[0].span, _spans.ZERO]), kernel, summed)  # (0: padding)
  return [_scaled(vals[0], norm)._replace(span=span)]


def _smooth_rule(walk: _Walk, eqn: Any, vals: list[_Value], value: Any) -> list[_Value]:
  """``yⁿ`` (``integer_pow``, ``square``, ``pow`` by a known scalar, ``sqrt``, ``rsqrt``),
  ``exp``, ``log`` of a real value: elementwise, their largest slope over the
  operand's span (:mod:`flaxnorm._spans`: sin² in Snake, BigVGAN's activation, is
  ``2 max|sin|``); a reason where the span does not bound it (or ``yⁿ`` is not real)."""
  name = eqn.primitive.name
  x, s = vals[0], vals[0].span
  why = (
    f"no Lipschitz rule for {name} of a value that depends on the inputs and is not known "
    "to stay in an interval where its slope is bounded"
  )
  if not _is_real_floating(eqn.invars[0]):
    return [_inf(why)]
  if name == "pow":
    if len(vals) > 1 and vals[1].bound:
      return [_inf("pow with an exponent that depends on the inputs (no rule here)")]
    n = value(eqn.invars[1])
    if n is None or np.size(n) != 1:
      return [_inf(why)]
    found = _spans.power(s, float(np.asarray(n)))
  elif name == "exp":
    found = _spans.exp(s)
  elif name == "log":
    found = _spans.log(s)
  else:
    n = {"square": 2, "sqrt": 0.5, "rsqrt": -0.5}.get(name, eqn.params.get("y"))
    found = _spans.power(s, float(n))
  if found is None or x.bound == _INF:
    return [_inf(why) if x.bound != _INF else x]
  slope, span = found
  return [_elementwise(eqn.invars[0], x, slope, span)]


def _cumsum_rule(walk: _Walk, eqn: Any, vals: list[_Value], value: Any) -> list[_Value]:
  """Running sums along an axis of ``n``: the lower-triangular matrix of ones, whose
  norm is ``1 / (2 sin(π / (4n + 2)))`` (its singular values are known in closed form)."""
  n = eqn.invars[0].aval.shape[eqn.params["axis"]]
  return [_scaled(vals[0], _up(1.0 / (2.0 * math.sin(math.pi / (4 * n + 2)))) if n else 0.0)]


def _running_max_rule(walk: _Walk, eqn: Any, vals: list[_Value], value: Any) -> list[_Value]:
  """``cummax``, ``cummin``, ``cumlogsumexp`` along an axis of ``n``: each output moves
  by at most the largest change of the elements before it (all ``n`` outputs, when it
  is the first): ``√n``."""
  return [_scaled(vals[0], math.sqrt(eqn.invars[0].aval.shape[eqn.params["axis"]]))]


def _scatter_add_rule(walk: _Walk, eqn: Any, vals: list[_Value], value: Any) -> list[_Value]:
  """``.at[i].add(u)``, ``segment_sum`` at known indices ``i``: ``operand + S u`` with
  ``S`` sending each update to one element (or none), ``‖S‖₂ ≤ √(most updates one
  element receives)`` (Schur's test)."""
  name = eqn.primitive.name
  if vals[1].bound:
    return [_inf(f"{name} at indices computed from the inputs (what it adds where can jump)")]
  hits = _hits(eqn, value)
  if hits is None:
    return [_inf(f"{name} of a value that depends on the inputs at indices not known here")]
  parts = [x for x in (_plain(vals[0]), _scaled(vals[2], math.sqrt(hits))) if x.bound]
  bad = _first_inf(parts)
  return [bad or _Value(_up(math.fsum(x.bound for x in parts)))]


def _hits(eqn: Any, value: Callable[[Any], Any]) -> int | None:
  """The most updates a scatter with known indices sends to one element: it run on
  ones into zeros."""
  indices = value(eqn.invars[1])
  if indices is None or _size(eqn.outvars[0]) > _FOLD_LIMIT:
    return None
  zeros = jnp.zeros(eqn.invars[0].aval.shape, jnp.int32)
  ones = jnp.ones(eqn.invars[2].aval.shape, jnp.int32)
  numbers, mode = eqn.params["dimension_numbers"], eqn.params["mode"]
  counts = jax.lax.scatter_add(zeros, jnp.asarray(indices), ones, numbers, mode=mode)
  return int(np.asarray(counts).max(initial=0))


def _while_rule(walk: _Walk, eqn: Any, vals: list[_Value], value: Any) -> list[_Value]:
  """A while loop's carry: step by step when its condition reads only values known here
  (a counter: the exact trip count, up to ``_EXACT_STEPS``), else bounded when a step
  no longer grows its bound (any trip count)."""
  p = eqn.params
  n_cond, n_body = p["cond_nconsts"], p["body_nconsts"]
  consts, carry = vals[n_cond : n_cond + n_body], [_plain(x) for x in vals[n_cond + n_body :]]
  body = p["body_jaxpr"]
  operands = eqn.invars[n_cond : n_cond + n_body]
  known = _passed(body.jaxpr.invars[:n_body], operands, value, _consts(body))
  counted = _counted_loop(walk, eqn, [_plain(x) for x in vals], value, known)
  if counted is not None:
    return counted
  for _ in range(_WHILE_STEPS):
    outs = walk.run(body.jaxpr, consts + carry, known)
    if not _grows(outs, carry):
      return carry  # zero steps or more: none larger
    carry = [
      _Value(
        max(c.bound, o.bound),
        o.why or c.why,
        None,
        o.where or c.where,
        c.span if _spans.within(o.span, c.span) else _spans.ANY,
      )
      for c, o in zip(carry, outs, strict=True)
    ]
  why = "a loop of unknown trip count (nn.while_loop) whose carry's bound grows at each step"
  return [_inf(why)] * len(eqn.outvars)


_WHILE_STEPS = 32


def _counted_loop(
  walk: _Walk, eqn: Any, vals: list[_Value], value: _Lookup, known: Mapping[Any, Any]
) -> list[_Value] | None:
  """A while loop's carry, its steps walked while its condition, computed from the
  values known here (its constants, the carries that do not depend on the inputs),
  holds; None when a step's condition is not known or after ``_EXACT_STEPS`` steps.
  ``vals``: the loop's operands; ``known``: its body's constants' values."""
  p = eqn.params
  n_cond, n_body = p["cond_nconsts"], p["body_nconsts"]
  cond, body = p["cond_jaxpr"].jaxpr, p["body_jaxpr"].jaxpr
  cond_consts, consts, carry = (
    vals[:n_cond],
    vals[n_cond : n_cond + n_body],
    vals[n_cond + n_body :],
  )
  cond_known = _passed(cond.invars[:n_cond], eqn.invars[:n_cond], value, _consts(p["cond_jaxpr"]))
  carried = _known_values(eqn.invars[n_cond + n_body :], carry, value)
  for _ in range(_EXACT_STEPS + 1):
    kept: dict[Any, Any] = {}
    at = {cond.invars[n_cond + j]: c for j, c in carried.items()}
    walk.run(cond, cond_consts + carry, {**cond_known, **at}, keep=kept)
    go = _Lookup(kept)(cond.outvars[0])
    if go is None:
      return None
    if not bool(np.asarray(go)):
      return carry
    kept = {}
    at = {body.invars[n_body + j]: c for j, c in carried.items()}
    carry = [_plain(o) for o in walk.run(body, consts + carry, {**known, **at}, keep=kept)]
    carried = _known_values(body.outvars, carry, _Lookup(kept))
  return None


def _known_values(
  variables: Sequence[Any], bounds: Sequence[_Value], value: Callable[[Any], Any]
) -> dict[int, np.ndarray]:
  """The values of ``variables`` known (those that do not depend on the inputs), by position."""
  found = {}
  for j, (v, x) in enumerate(zip(variables, bounds, strict=True)):
    c = None if x.bound else value(v)
    if c is not None:
      found[j] = np.asarray(c)
  return found


_OUTSIDE = (
  "the model computes {} of a value that depends on the inputs with an operand not known "
  "here (not a literal, a constant, or a variable of a module without a certificate of its "
  "own: a certified layer's param used outside it, params nn.scan slices per step, an "
  "array too large to compute here)"
)


_RULES: dict[str, Callable[..., list[_Value]]] = {
  "add": _sum_rule,
  "sub": _sum_rule,
  "add_any": _sum_rule,
  "max": _max_rule,
  "min": _max_rule,
  "mul": _mul_rule,
  "div": _div_rule,
  "select_n": _select_rule,
  "concatenate": _concat_rule,
  "stack": _concat_rule,
  "unstack": _split_rule,
  "tile": _broadcast_rule,
  "broadcast_in_dim": _broadcast_rule,
  "reduce_sum": _reduce_sum_rule,
  "reduce_max": _reduce_max_rule,
  "reduce_min": _reduce_max_rule,
  "pad": _pad_rule,
  "split": _split_rule,
  "clamp": _max_rule,
  "reduce_window_sum": _window_sum_rule,
  "reduce_window_max": _window_max_rule,
  "reduce_window_min": _window_max_rule,
  **dict.fromkeys(_INDEXED, _indexed_rule),
  "sort": _sort_rule,
  "optimization_barrier": _each_rule,
  "device_put": _each_rule,
  "cond": _cond_rule,
  "scan": _scan_rule,
  "while": _while_rule,
  "dot_general": _dot_rule,
  "conv_general_dilated": _conv_rule,
  "cumsum": _cumsum_rule,
  "cummax": _running_max_rule,
  "cummin": _running_max_rule,
  "cumlogsumexp": _running_max_rule,
  "scatter-add": _scatter_add_rule,
  **dict.fromkeys(("integer_pow", "square", "pow", "sqrt", "rsqrt", "exp", "log"), _smooth_rule),
  "scatter-sub": _scatter_add_rule,
}
