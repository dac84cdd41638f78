"""Where the output side stops paying: one layer's train step, kernel side against output side.

Run by hand (not a test)::

  python benchmarks/bench_side.py            # ~5 minutes on 2 CPU cores
  python benchmarks/bench_side.py --quick    # smoke run

flaxnorm scales a Flax linear layer's output instead of its kernel unless the
output (batch x positions x features) is more than ``KERNEL_SIDE_RATIO`` times
the kernel (``flaxnorm/_output_scale.py``). This measures that choice layer by
layer: an Adam train step (MSE loss) of one weight-normed or spectral-normed
``Dense``, 2-D ``Conv`` (3x3, SAME) or 1-D ``Conv`` (3 taps, the vocoder's
shape), with the side forced each way, over batches that sweep the
output-to-kernel size ratio across the threshold. The column ``kernel /
output`` is the kernel side's time over the output side's (below 1: the kernel
side is faster), the median of per-round ratios with its 95% interval
(``_suite_stats``). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _suite_stats as stats
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from _suite_flax import forced_side, linen_run

import flaxnorm

#: (name, layer, per-example input shape, batches): each layer keeps its kernel
#: and sweeps the batch, so the output-to-kernel ratio moves across the threshold.
CASES = (
  ("Dense 512->512", lambda: nn.Dense(512), (512,), (32, 128, 512, 1024, 2048, 8192)),
  ("Conv 3x3 64->64, 16x16", lambda: nn.Conv(64, (3, 3)), (16, 16, 64), (1, 2, 4, 16, 64)),
  ("Conv1d k3 128->128, 2048", lambda: nn.Conv(128, (3,)), (2048, 128), (1, 4)),
)
WRAPS = {"WN": flaxnorm.weight_norm, "SN": flaxnorm.spectral_norm}
SIDES = {"kernel": 0.0, "output": float("inf")}


def compiled_step(layer: nn.Module, x: jax.Array, side: float):
  """The layer's jitted train step, traced with the side forced, and its state."""
  with forced_side(side):
    variables = layer.init(jax.random.key(0), x)
    y = jnp.zeros(jax.eval_shape(layer.apply, variables, x).shape)
    run = linen_run(layer, variables, x, y, optax.adam(1e-4))
    compiled = jax.jit(run.step).lower(run.state, run.x, run.y).compile()
  box = {"state": run.state}

  def one():
    box["state"], loss = compiled(box["state"], run.x, run.y)
    jax.block_until_ready((box["state"], loss))

  return one


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  rounds, min_rounds, budget = (2, 2, 1) if args.quick else (30, 12, 12)
  print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, jax {jax.__version__}")
  print("| layer | batch | output / kernel | WN kernel / output | SN kernel / output |")
  print("|---|---:|---:|---:|---:|")
  for name, make, shape, batches in CASES[:1] if args.quick else CASES:
    for batch in batches[:2] if args.quick else batches:
      x = jax.random.normal(jax.random.key(1), (batch, *shape))
      steps = {
        (kind, side): compiled_step(wrap(make()), x, ratio)
        for kind, wrap in WRAPS.items()
        for side, ratio in SIDES.items()
      }
      for one in steps.values():
        one()
      times = stats.interleaved(steps, n=3, rounds=rounds, min_rounds=min_rounds, budget_s=budget)
      kernel = jax.eval_shape(make().init, jax.random.key(0), x)["params"]["kernel"]
      out_size = x.size // x.shape[-1] * kernel.shape[-1]  # stride 1, SAME
      cells = []
      for kind in WRAPS:
        r = stats.paired(times[kind, "kernel"], times[kind, "output"])
        cells.append(f"{r.median:.2f} ({r.lo:.2f}–{r.hi:.2f})")
      print(f"| {name} | {batch} | {out_size / kernel.size:.2g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
