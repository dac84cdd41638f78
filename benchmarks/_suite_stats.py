"""How the suite times and compares: interleaved rounds, paired ratios, bootstrap intervals.

No JAX here: the PyTorch process (``_suite_torch.py``) times the same way.

A *round* runs every variant of one model once, in an order shuffled per
round (so no variant always follows the same neighbour or runs first), each
for ``steps`` steps timed one by one; the round keeps the fastest of those
steps (noise on a shared machine only adds time). A variant is compared with
another by the per-round ratio of their times, so a drift in the machine's
load that spans a round hits both alike; the reported ratio is the median over
rounds and its 95% interval a percentile bootstrap of that median.

The variants of one *group* (a face: its plain step and everything divided by
it) run back to back within a round, so a variant and its base are timed
within a fraction of a round of each other rather than anywhere in it (a
round of the generator's 19 variants lasts 6 s, in which a shared VM's speed
can drift by 10-20%).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

#: Resamples of the bootstrap interval (seeded: a rerun on saved times agrees).
BOOTSTRAP = 2000


def interleaved(
  steps: Mapping[str, Callable[[], object]],
  *,
  n: int,
  rounds: int,
  min_rounds: int,
  budget_s: float,
  group: Callable[[str], str] = lambda key: "",
  seed: int = 0,
) -> dict[str, list[float]]:
  """Milliseconds per step of every variant, one value per round.

  Args:
    steps: variant -> a call that runs one step and blocks until it is done.
    n: steps per variant per round (the round keeps the fastest).
    rounds: at most this many rounds.
    min_rounds: at least this many, whatever the budget.
    budget_s: seconds after which no new round starts (once ``min_rounds`` ran).
    group: variant -> its group; a group's variants run back to back in a
      round (the groups' order and each group's order shuffled per round).
    seed: the order shuffle's seed.

  Returns:
    ``{variant: [ms of round 0, ms of round 1, ...]}``, all of the same length.
  """
  times: dict[str, list[float]] = {k: [] for k in steps}
  groups: dict[str, list[str]] = {}
  for key in steps:
    groups.setdefault(group(key), []).append(key)
  blocks = list(groups.values())
  shuffle = random.Random(seed).shuffle
  deadline = time.perf_counter() + budget_s
  for r in range(rounds):
    shuffle(blocks)
    for block in blocks:
      shuffle(block)
    for key in (key for block in blocks for key in block):
      best = float("inf")
      for _ in range(n):
        t = time.perf_counter()
        steps[key]()
        best = min(best, time.perf_counter() - t)
      times[key].append(best * 1e3)
    if r + 1 >= min_rounds and time.perf_counter() > deadline:
      break
  return times


@dataclasses.dataclass(frozen=True)
class Ratio:
  """A paired ratio: the median over rounds and its 95% bootstrap interval."""

  median: float
  lo: float
  hi: float


def paired(a: Sequence[float], b: Sequence[float]) -> Ratio:
  """The per-round ratio ``a / b`` (``a[i]`` and ``b[i]`` from the same round)."""
  return ratio_of(np.divide(a, b))


def relative(a: Sequence[float], base_a: Sequence[float], b, base_b) -> Ratio:
  """``(a / base_a) / (b / base_b)`` per round: two variants' overheads over their own bases."""
  return ratio_of(np.divide(np.divide(a, base_a), np.divide(b, base_b)))


def ratio_of(per_round: np.ndarray) -> Ratio:
  """Median of per-round ratios with a seeded percentile bootstrap of the median."""
  per_round = np.asarray(per_round, np.float64)
  rng = np.random.default_rng(0)
  picks = rng.integers(0, len(per_round), (BOOTSTRAP, len(per_round)))
  medians = np.median(per_round[picks], axis=1)
  lo, hi = np.percentile(medians, [2.5, 97.5])
  return Ratio(float(np.median(per_round)), float(lo), float(hi))


def verdict(r: Ratio, target: float) -> str:
  """PASS when the interval lies at or below ``target``, MISS above it, else within noise."""
  if r.hi <= target:
    return "PASS"
  if r.lo > target:
    return "MISS"
  return "within noise"
