"""Operator-mode against kernel-mode spectral norm: train-step time and sigma.

Run by hand (not a test)::

  python benchmarks/bench_operator.py            # ~1 minute on 2 CPU cores
  python benchmarks/bench_operator.py --quick    # smoke run

A jitted Adam step (mean squared output, ``value_and_grad``) of the conv
discriminator 32x32x3 -> conv64 -> conv128 -> conv256 (3x3, stride 2, SAME,
leaky ReLU) -> dense 1, batch 64, every layer wrapped with
``flaxnorm.spectral_norm`` (one power iteration per step, state threaded
through), in kernel mode and in operator mode (``operator=True``: the iteration
is two convolutions on one example per layer, against the batch's forward and
backward). Rounds alternate the variants so machine load hits both alike;
the ratio is the median of per-round ratios. Also printed: each conv's sigma in
both modes after init (kernel mode's matrix-view norm vs the operator norm).
Target (from the issue): operator <= 1.3x kernel mode. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import flaxnorm


class Discriminator(nn.Module):
  operator: bool

  @nn.compact
  def __call__(self, x):
    for features in (64, 128, 256):
      conv = nn.Conv(features, (3, 3), strides=2)
      x = nn.leaky_relu(flaxnorm.spectral_norm(conv, operator=self.operator)(x), 0.2)
    dense = flaxnorm.spectral_norm(nn.Dense(1), operator=self.operator)
    return dense(x.reshape(x.shape[0], -1))


def make_step(model, opt):
  @jax.jit
  def step(params, spectral, opt_state, x):
    def loss_fn(params):
      y, upd = model.apply({"params": params, "spectral": spectral}, x, mutable=["spectral"])
      return jnp.mean(y**2), upd["spectral"]

    (loss, spectral), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), spectral, opt_state, loss

  return step


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--steps", type=int, default=5, help="steps per variant per round")
  args = parser.parse_args()
  rounds, steps = (3, 2) if args.quick else (args.rounds, args.steps)
  x = jax.random.normal(jax.random.key(0), (64, 32, 32, 3))
  opt = optax.adam(1e-4)
  runs = {}
  for operator in (False, True):
    model = Discriminator(operator)
    variables = model.init(jax.random.key(1), x)
    state = [variables["params"], variables["spectral"], opt.init(variables["params"])]
    step = make_step(model, opt)
    t0 = time.perf_counter()
    jax.block_until_ready(step(*state, x))
    runs[operator] = (step, state, time.perf_counter() - t0, variables)
  times = {False: [], True: []}
  for _ in range(rounds):
    for operator, (step, state, _, _) in runs.items():
      t0 = time.perf_counter()
      for _ in range(steps):
        out = step(*state, x)
        state[:3] = out[:3]
      jax.block_until_ready(out)
      times[operator].append((time.perf_counter() - t0) / steps)
  ratios = [op / k for op, k in zip(times[True], times[False])]
  print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"jax {jax.__version__}, {jax.devices()[0].platform}")  # fmt: skip
  for operator, label in ((False, "kernel mode"), (True, "operator mode")):
    print(f"{label:>14}: step {statistics.median(times[operator]) * 1e3:7.2f} ms, "
          f"first call (compile + run) {runs[operator][2]:.2f} s")  # fmt: skip
  ratio = statistics.median(ratios)
  print(f"operator / kernel: {ratio:.2f} (target <= 1.3: {'PASS' if ratio <= 1.3 else 'MISS'})")
  sigmas = {op: flaxnorm.spectral_sigmas(runs[op][3]) for op in runs}
  for path in sigmas[False]:
    k, o = float(sigmas[False][path]), float(sigmas[True][path])
    print(f"  {path:>16}: sigma kernel view {k:6.3f}, operator {o:6.3f}, ratio {o / k:.2f}")


if __name__ == "__main__":
  main()
