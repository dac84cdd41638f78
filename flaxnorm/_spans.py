"""Intervals holding every element of a value whatever the inputs (its *span*).

A product of two values that both depend on the inputs is not Lipschitz in
general, but it is where both stay bounded: for ``y = a ⊙ b``,

    y(x) − y(x') = a(x) ⊙ (b(x) − b(x')) + b(x') ⊙ (a(x) − a(x')),

so ``L(y) ≤ max|a| · L(b) + max|b| · L(a)``. An LSTM's gates (sigmoids, in
``[0, 1]``) times its cell, a GRU's reset gate times its hidden state's
projection, a WaveNet-style gated unit ``tanh(a) ⊙ σ(b)``: each factor has a
span, which :mod:`flaxnorm._propagate` carries through the program beside the
bound, as intervals ``(lo, hi)`` (``ANY``: not known). Spans are of the program
in exact arithmetic, as the bound is; their endpoints are rounded outward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Span = tuple[float, float]
ANY: Span = (-math.inf, math.inf)
ZERO: Span = (0.0, 0.0)


def down(x: float) -> float:
  """``x`` rounded down by one ulp (inf and NaN as they are)."""
  return math.nextafter(x, -math.inf) if math.isfinite(x) else x


def up(x: float) -> float:
  """``x`` rounded up by one ulp (inf and NaN as they are)."""
  return math.nextafter(x, math.inf) if math.isfinite(x) else x


def _checked(lo: float, hi: float) -> Span:
  """``(lo, hi)``, or ``ANY`` when an endpoint is NaN (``inf − inf``)."""
  return ANY if math.isnan(lo) or math.isnan(hi) else (lo, hi)


def of_array(c: Any) -> Span:
  """The span of a known array: its smallest and largest element (``ANY`` for a
  complex one or one holding NaN; ``ZERO`` for an empty one)."""
  if jnp.issubdtype(getattr(c, "dtype", np.float64), jax.dtypes.extended):
    return ANY  # (a PRNG key)
  a = np.asarray(c)
  if a.dtype.kind not in "fiub" and not jnp.issubdtype(a.dtype, jnp.floating):  # (bfloat16)
    return ANY
  if not a.size:
    return ZERO
  a = a.astype(np.float64)
  lo, hi = float(a.min()), float(a.max())
  return _checked(lo, hi)


def magnitude(s: Span) -> float:
  """``max |y|`` over the span."""
  return max(abs(s[0]), abs(s[1]))


def within(inner: Span, outer: Span) -> bool:
  return outer[0] <= inner[0] and inner[1] <= outer[1]


def hull(spans: Iterable[Span]) -> Span:
  """The smallest span holding all of ``spans``."""
  found = list(spans)
  return (min(s[0] for s in found), max(s[1] for s in found)) if found else ANY


def total(spans: Sequence[Span], signs: Sequence[int]) -> Span:
  """The span of ``Σ signs[i] · y_i`` (``add``, ``sub``)."""
  lo = hi = 0.0
  for (a, b), sign in zip(spans, signs, strict=True):
    lo, hi = (lo + a, hi + b) if sign > 0 else (lo - b, hi - a)
  return _checked(down(lo), up(hi))


def product(a: Span, b: Span) -> Span:
  """The span of ``y · z`` for ``y`` in ``a`` and ``z`` in ``b``."""
  if a == ZERO or b == ZERO:
    return ZERO
  ends = [x * y for x in a for y in b]
  if any(math.isnan(e) for e in ends):  # 0 · inf: not known
    return ANY
  return down(min(ends)), up(max(ends))


def quotient(a: Span, c: Span, smallest: float) -> Span:
  """The span of ``y / z`` for ``y`` in ``a`` and ``z`` in ``c`` (a constant's, or a
  divisor's that keeps away from 0), whose smallest ``|z|`` is ``smallest > 0``."""
  if c[0] > 0 or c[1] < 0:
    return product(a, (down(1.0 / c[1]), up(1.0 / c[0])))
  r = up(magnitude(a) / smallest)  # c has both signs: |y / z| ≤ max|y| / min|z|
  return _checked(-r, r)


def times(s: Span, k: float) -> Span:
  """The span of a sum of ``k`` elements of span ``s`` (``k ≥ 0``)."""
  return _checked(down(s[0] * k), up(s[1] * k))


def rounded(s: Span, eps: float, tiny: float) -> Span:
  """``s`` widened by one rounding to a precision of relative ``eps`` (smallest normal
  ``tiny``): a conversion or ``reduce_precision`` stays within it (rounding is monotone)."""
  return _checked(down(s[0] - abs(s[0]) * eps - tiny), up(s[1] + abs(s[1]) * eps + tiny))


def monotone(s: Span, f: Callable[[float], float], lo: float, hi: float) -> Span:
  """The span of an increasing ``f`` of a value in ``s``, within ``[lo, hi]`` (``f``'s
  range), its ends widened by a few ulps for ``f``'s own rounding."""
  ends = [f(x) if math.isfinite(x) else (lo if x < 0 else hi) for x in s]
  widen = [e - 4 * math.ulp(e) for e in ends[:1]] + [e + 4 * math.ulp(e) for e in ends[1:]]
  return max(lo, widen[0]), min(hi, widen[1])


def dot(s: Span, c: np.ndarray, contracted: Sequence[int]) -> Span:
  """The span of ``Σₖ yₖ cₖⱼ`` (summed over ``c``'s ``contracted`` axes; the others
  index the outputs) for every ``yₖ`` in ``s``: ``mid · Σₖ cₖⱼ ± rad · Σₖ |cₖⱼ|``,
  widened by float64's summation error."""
  if not all(map(math.isfinite, s)):
    return ANY
  c = np.asarray(c, np.float64)
  mid, rad = (s[0] + s[1]) / 2, (s[1] - s[0]) / 2
  axes = tuple(contracted)
  sums, abs_sums = c.sum(axis=axes), np.abs(c).sum(axis=axes)
  n = math.prod(c.shape[a] for a in axes) + 2
  slack = abs_sums * ((abs(mid) + rad) * (1 + n * 2.0**-52)) * (n * 2.0**-52)
  lo, hi = mid * sums - rad * abs_sums - slack, mid * sums + rad * abs_sums + slack
  if not lo.size:
    return ZERO
  return _checked(down(float(lo.min())), up(float(hi.max())))


def _outward(s: Span) -> Span:
  """``s`` widened by 4 ulps each way (for ``math.pow``, ``exp``, ``log``: within 1 ulp)."""
  lo = s[0] - 4 * math.ulp(s[0]) if math.isfinite(s[0]) else s[0]
  hi = s[1] + 4 * math.ulp(s[1]) if math.isfinite(s[1]) else s[1]
  return _checked(lo, hi)


def _slope(x: float) -> float:
  return x * (1 + 2.0**-49) if math.isfinite(x) else x


def power(s: Span, n: float) -> tuple[float, Span] | None:
  """``yⁿ`` for ``y`` in ``s``: its largest ``|slope|`` there and its span, or None where
  the slope is unbounded or ``yⁿ`` is not real (a negative base, a non-integer ``n``)."""
  lo, hi = s
  small = 0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi))  # the smallest |y|
  big = magnitude(s)
  try:
    if n == 0:
      return 0.0, (1.0, 1.0)
    if n == 1:
      return 1.0, s
    if float(n).is_integer() and n > 0:
      if not math.isfinite(big):
        return None
      span = (lo**n, hi**n) if n % 2 else (small**n, big**n)
      return _slope(n * big ** (n - 1)), _outward(span)
    if float(n).is_integer():  # n < 0: 1 / y^|n|
      if not small:
        return None
      top = small**n
      span = (0.0, top) if n % 2 == 0 else (hi**n, lo**n)
      return _slope(-n * small ** (n - 1)), _outward(span)
    if lo < 0 or (n < 1 and lo == 0) or (n > 1 and not math.isfinite(hi)):
      return None  # (a negative base: NaN; a slope unbounded at 0 or at inf)
    slope = n * (hi if n > 1 else lo) ** (n - 1)
    span = (lo**n, hi**n) if n > 0 else (hi**n, lo**n)
    return _slope(abs(slope)), _outward(span)
  except (OverflowError, ZeroDivisionError):
    return None


def exp(s: Span) -> tuple[float, Span] | None:
  """``exp`` over ``s``: its largest slope, ``exp(hi)``, and its span."""
  try:
    top = math.exp(s[1])
  except OverflowError:
    return None
  low = math.exp(s[0]) if math.isfinite(s[0]) else 0.0
  return (_slope(top), _outward((low, top))) if math.isfinite(top) else None


def log(s: Span) -> tuple[float, Span] | None:
  """``log`` over ``s``: its largest slope, ``1 / lo``, and its span (``lo > 0``)."""
  if not s[0] > 0:
    return None
  return _slope(1.0 / s[0]), _outward((math.log(s[0]), math.log(s[1])))
