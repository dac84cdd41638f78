"""Train-step speed of flaxnorm's NNX face against plain ``nnx.Linear``.

Run by hand (not a test)::

  python benchmarks/bench_nnx_step.py            # ~1 minute on 2 CPU cores
  python benchmarks/bench_nnx_step.py --batch 1024

The same MLP as ``bench_train_step.py`` (512-1024-1024-1024-10, ReLU, softmax
cross-entropy, Adam), in NNX: an ``nnx.jit`` step over ``nnx.Optimizer`` with
every ``nnx.Linear`` plain, weight-normalized or spectrally normalized
(1 power iteration, training mode: the state is updated every step), and a
``nnx.Linear`` subclass under weight norm ("kernel path": what custom layers
get). Rounds interleave the variants; times are medians over rounds, ratios
medians of the per-round ratios to plain. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import jax
import numpy as np
import optax
from flax import nnx

import flaxnorm.nnx as fnx

SIZES = (512, 1024, 1024, 1024, 10)
VARIANTS = ("plain", "flaxnorm WN", "flaxnorm SN", "flaxnorm WN, kernel path")


class CustomLinear(nnx.Linear):
  """An ``nnx.Linear`` subclass: flaxnorm hands it the normalized kernel."""


class MLP(nnx.Module):
  def __init__(self, kind: str, rngs: nnx.Rngs):
    cls = CustomLinear if kind.endswith("kernel path") else nnx.Linear
    self.layers = nnx.List([cls(a, b, rngs=rngs) for a, b in itertools.pairwise(SIZES)])
    for layer in self.layers:
      if kind.startswith("flaxnorm WN"):
        fnx.weight_norm(layer)
      elif kind == "flaxnorm SN":
        fnx.spectral_norm(layer, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = nnx.relu(layer(x))
    return self.layers[-1](x)


@nnx.jit
def train_step(model, optimizer, x, y):
  def loss_fn(model):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=30)
  args = parser.parse_args()
  kx, ky = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (args.batch, SIZES[0]))
  y = jax.random.randint(ky, (args.batch,), 0, SIZES[-1])

  runs = {}
  for kind in VARIANTS:
    model = MLP(kind, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-4), wrt=nnx.Param)
    for _ in range(10):  # compile, then settle caches
      loss = train_step(model, optimizer, x, y)
    jax.block_until_ready(loss)
    runs[kind] = (model, optimizer)

  times = {kind: [] for kind in VARIANTS}
  for _ in range(args.rounds):
    for kind, (model, optimizer) in runs.items():
      t = time.perf_counter()
      for _ in range(10):
        loss = train_step(model, optimizer, x, y)
      jax.block_until_ready(loss)
      times[kind].append((time.perf_counter() - t) / 10 * 1e3)
      assert np.isfinite(float(loss)), kind

  print(f"NNX train step, batch {args.batch}, {args.rounds} rounds of 10 steps")
  print("| train step | time | ratio |\n|---|---:|---:|")
  for kind in VARIANTS:
    ratio = statistics.median(np.divide(times[kind], times["plain"]))
    print(f"| {kind} | {statistics.median(times[kind]):.2f} ms | {ratio:.2f} |")


if __name__ == "__main__":
  main()
