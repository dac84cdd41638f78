"""Time of a whole model's certified Lipschitz bound, Linen against NNX.

Run by hand (not a test)::

  python benchmarks/bench_model_certificate.py            # ~2-3 minutes on 2 CPU cores
  python benchmarks/bench_model_certificate.py --quick    # smoke run: smaller shapes

The same three spectrally normalized models in both faces, in evaluation:
the suite's MLP 512 -> 1024 -> 1024 -> 1024 -> 10, its conv discriminator
(32 x 32 x 3 -> conv64 -> conv128 -> conv256, 3 x 3, stride 2, SAME, leaky
ReLU -> dense 1) and a SimpleCell RNN (16 -> 64) over 1,000 steps.
``flaxnorm.lipschitz_bound(variables, model=..., inputs=...)`` bounds each
spectral layer from its stored state (Gram iteration on the kernel, σ's
rounding interval); ``flaxnorm.nnx.lipschitz_bound(model, inputs)`` follows
every layer with its variables' values (Gram iteration on the normalized
kernel as the layer computes it). Times are the median of ``--repeats`` calls
(default 3), trace included; the first call is not counted.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import statistics
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

import flaxnorm
import flaxnorm.nnx as fnx


def _median(fn: Callable[[], float | None], repeats: int) -> tuple[float, float | None]:
  fn()  # first call: caches of the trace and the reference programs
  times, value = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    value = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), value


def _linen(layers: list[Callable[[], nn.Module]]) -> Callable[[], nn.Module]:
  return lambda: nn.Sequential([f() for f in layers])


def _models(quick: bool) -> dict[str, tuple[nn.Module, nnx.Module, jax.Array]]:
  """Each model in Linen and NNX, with an example input."""
  width, steps, image = (64, 50, 16) if quick else (1024, 1000, 32)
  sizes = [32 if quick else 512, width, width, width, 10]
  sn, leaky, rngs = flaxnorm.spectral_norm, jax.nn.leaky_relu, nnx.Rngs(0)
  mlp = nn.Sequential([*_between([sn(nn.Dense(n)) for n in sizes[1:]], nn.relu)])
  linears = [nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)]
  nnx_mlp = nnx.Sequential(*_between(linears, nnx.relu))
  fnx.wrap_modules(nnx_mlp, fnx.spectral_norm, where=nnx.Linear)
  flat = lambda x: x.reshape(x.shape[0], -1)
  convs = [sn(nn.Conv(c, (3, 3), strides=2, padding="SAME")) for c in (64, 128, 256)]
  disc = nn.Sequential([*_between(convs, leaky), leaky, flat, sn(nn.Dense(1))])
  channels = [3, 64, 128, 256]
  nnx_convs = [
    nnx.Conv(a, b, (3, 3), strides=2, padding="SAME", rngs=rngs)
    for a, b in itertools.pairwise(channels)
  ]
  head = nnx.Linear(256 * (image // 8) ** 2, 1, rngs=rngs)
  nnx_disc = nnx.Sequential(*_between(nnx_convs, leaky), leaky, flat, head)
  fnx.wrap_modules(nnx_disc, fnx.spectral_norm, where=(nnx.Conv, nnx.Linear))
  rnn = sn(nn.RNN(nn.SimpleCell(64)), recursive=True)
  nnx_rnn = nnx.RNN(nnx.SimpleCell(16, 64, rngs=rngs))
  fnx.wrap_modules(nnx_rnn, fnx.spectral_norm, where=nnx.Linear)
  return {
    "MLP 512-1024-1024-1024-10": (mlp, nnx_mlp, jnp.ones((1, sizes[0]))),
    "conv discriminator": (disc, nnx_disc, jnp.ones((1, image, image, 3))),
    f"SimpleCell(64) RNN, {steps} steps": (rnn, nnx_rnn, jnp.ones((1, steps, 16))),
  }


def _between(layers: list, activation: Callable) -> list:
  """``layers`` with ``activation`` between each two."""
  out = [layers[0]]
  for layer in layers[1:]:
    out += [activation, layer]
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="smoke run: small shapes")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  print(
    f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
    f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, jax {jax.__version__}, flaxnorm "
    f"{flaxnorm.__version__}"
  )
  print("| model | Linen: time (s) | Linen: certified | NNX: time (s) | NNX: certified |")
  print("|---|---:|---:|---:|---:|")
  for name, (linen_model, nnx_model, x) in _models(args.quick).items():
    variables = linen_model.init(jax.random.key(0), x)
    nnx_model.eval()

    def linen_bound(model=linen_model, variables=variables, x=x) -> float | None:
      return flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,)).certified

    def nnx_bound(model=nnx_model, x=x) -> float | None:
      return fnx.lipschitz_bound(model, (x,)).certified

    t_linen, b_linen = _median(linen_bound, args.repeats)
    t_nnx, b_nnx = _median(nnx_bound, args.repeats)
    print(f"| {name} | {t_linen:.2f} | {b_linen:.4g} | {t_nnx:.2f} | {b_nnx:.4g} |")


if __name__ == "__main__":
  main()
