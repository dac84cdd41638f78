"""The library's train step against an earlier commit of itself, in one process.

Run by hand (not a test), from the repository root::

  python benchmarks/bench_against.py 60d0530                      # mlp128, disc, gen
  python benchmarks/bench_against.py 60d0530 --models disc --dtype bfloat16 --budget 60

The package as it was at ``REV`` (``git archive``) is copied to a temporary
folder as ``flaxnorm_then`` (its imports renamed), so both versions run side by
side. Each model of the suite (``_suite_shapes.MODELS``) is built in Linen
three times, plain, wrapped by today's ``flaxnorm`` and by ``flaxnorm_then``
(``--method``: ``spectral_norm`` or ``weight_norm``), trained with the suite's
Adam step, and timed in interleaved rounds (``_suite_stats.interleaved``).
``now / then`` is the median of per-round ratios with its 95% interval; below
1 the current code is faster. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _suite_shapes as shapes
import _suite_stats as stats
import jax
import jax.numpy as jnp
import optax
from _suite_common import data
from _suite_flax import LinenNet, linen_run

import flaxnorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checkout(rev: str, into: str) -> str:
  """``flaxnorm`` at ``rev`` as the package ``flaxnorm_then`` under ``into``; returns its name."""
  archive = subprocess.run(
    ["git", "-C", ROOT, "archive", rev, "flaxnorm"], check=True, capture_output=True
  ).stdout
  subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
  package = os.path.join(into, "flaxnorm_then")
  os.rename(os.path.join(into, "flaxnorm"), package)
  for folder, _, files in os.walk(package):
    for name in (f for f in files if f.endswith(".py")):
      path = os.path.join(folder, name)
      with open(path) as f:
        text = re.sub(r"\bflaxnorm(?=[. ]|$)", "flaxnorm_then", f.read(), flags=re.M)
      with open(path, "w") as f:
        f.write(text)
  return "flaxnorm_then"


def compiled_step(model: str, wrap, dtype):
  """A call running one compiled Adam step of ``model`` built with ``wrap``, blocking."""
  x, y = data(model, dtype)
  net = LinenNet(shapes.MODELS[model][0], wrap, dtype)
  run = linen_run(net, net.init(jax.random.key(0), x), x, y, optax.adam(shapes.LR))
  step = jax.jit(run.step).lower(run.state, x, y).compile()
  box = [run.state]

  def go():
    box[0], loss = step(box[0], x, y)
    loss.block_until_ready()

  go()
  return go


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("rev", help="the earlier commit")
  parser.add_argument("--models", default="mlp128,disc,gen")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--method", default="spectral_norm", choices=["spectral_norm", "weight_norm"])
  parser.add_argument("--budget", type=float, default=150.0, help="seconds per model")
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)
  with tempfile.TemporaryDirectory() as tmp:
    sys.path.insert(0, tmp)
    then = importlib.import_module(checkout(args.rev, tmp))
    print(f"{args.method}, {args.dtype}: now / then ({args.rev}), and each over plain")
    for model in args.models.split(","):
      steps = {
        "plain": compiled_step(model, lambda m: m, dtype),
        "now": compiled_step(model, getattr(flaxnorm, args.method), dtype),
        "then": compiled_step(model, getattr(then, args.method), dtype),
      }
      t = stats.interleaved(steps, n=3, rounds=100_000, min_rounds=10, budget_s=args.budget)
      r, now, old = (
        stats.paired(t["now"], t["then"]),
        stats.paired(t["now"], t["plain"]),
        stats.paired(t["then"], t["plain"]),
      )
      print(
        f"{model}: {len(t['plain'])} rounds, plain {min(t['plain']):.2f} ms; now / then "
        f"{r.median:.3f} ({r.lo:.3f}-{r.hi:.3f}); now {now.median:.3f}, then "
        f"{old.median:.3f} x plain",
        flush=True,
      )


if __name__ == "__main__":
  main()
