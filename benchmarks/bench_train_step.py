"""Train-step speed and compile time of flaxnorm vs plain Dense and Flax's wrappers.

Run by hand (not a test)::

  python benchmarks/bench_train_step.py              # full run, ~2 minutes on 2 CPU cores
  python benchmarks/bench_train_step.py --quick      # smoke run
  python benchmarks/bench_train_step.py --donate     # donate params/opt state/stats (all variants)
  python benchmarks/bench_train_step.py --batch 1024

(a) A jitted Adam step (softmax cross-entropy, ``value_and_grad``) of a ReLU MLP
512-1024-1024-1024-10, batch 128, with every Dense: plain, flaxnorm weight norm,
flaxnorm spectral norm (1 power iteration, training mode: the state is updated
and threaded through every step), ``flax.linen.WeightNorm``,
``flax.linen.SpectralNorm`` (``update_stats=True``); flaxnorm on a ``Dense``
subclass ("kernel path": what any custom layer gets, the normalized kernel,
where Flax's own linear layers scale their output instead); and references: a
Dense whose kernel is multiplied by a learned ``(1, out)`` scale (the least
that handing a layer a new kernel costs), and weight norm's output scaling in
parts (see ``ScaledOutputDense``). Each round times a batch of steps of every
variant in turn, so drifts in machine load hit all alike; times are medians
over rounds, ratios medians of the per-round ratios to plain.

(b) Lower + compile time of the spectral-norm train step against the number of
power iterations: flaxnorm runs them in a ``fori_loop``, Flax unrolls them in
Python. A fresh function per measurement keeps jit's caches out.

Targets (from the issue) are printed as PASS/MISS; nothing is asserted.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import statistics
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import flaxnorm

SIZES = (512, 1024, 1024, 1024, 10)
VARIANTS = (
  "plain",
  "flaxnorm WN",
  "flaxnorm SN",
  "flax WN",
  "flax SN",
  "flaxnorm WN, kernel path",
  "flaxnorm SN, kernel path",
  "kernel * scale",
  "output * g",
  "output * g/norm(v), norm fixed",
)
# updated in training
MUTABLE = {
  "flaxnorm SN": "spectral",
  "flaxnorm SN, kernel path": "spectral",
  "flax SN": "batch_stats",
}
TARGETS = {"flaxnorm WN": 1.08, "flaxnorm SN": 1.12}


class ScaledDense(nn.Module):
  """Reference: a Dense computing with ``kernel * scale``, ``scale`` a learned (1, out) row."""

  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.linear.default_kernel_init, (x.shape[-1], self.features))
    scale = self.param("scale", nn.initializers.ones, (1, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return x @ (kernel * scale) + bias


class ScaledOutputDense(nn.Module):
  """Reference: ``(x @ v) * scale + b``, weight norm's output scaling in parts.

  ``"g"``: a learned (1, out) row only; ``"g / |v| fixed"``: weight norm's scale,
  its norm held out of the gradient. What remains to weight norm is the norm's
  gradient, ``-g ds / |v|^3 * v``: the optimizer's first- and second-moment
  updates each read ``v`` once more for it.
  """

  features: int
  scale: str = "g"

  @nn.compact
  def __call__(self, x):
    v = self.param("kernel_v", nn.linear.default_kernel_init, (x.shape[-1], self.features))
    g = self.param("kernel_g", nn.initializers.ones, (1, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    scale = g
    if self.scale == "g / |v| fixed":
      scale = g * jax.lax.stop_gradient(jax.lax.rsqrt(jnp.sum(v * v, axis=0, keepdims=True)))
    return (x @ v) * scale + bias


class CustomDense(nn.Dense):
  """A Dense subclass: flaxnorm hands it the normalized kernel (the path of any custom layer)."""


class MLP(nn.Module):
  kind: str = "plain"
  n_power: int = 1

  def layer(self, features):
    dense = nn.Dense(features)
    if self.kind == "flaxnorm WN":
      return flaxnorm.weight_norm(dense)
    if self.kind == "flaxnorm SN":
      return flaxnorm.spectral_norm(dense, n_power_iterations=self.n_power)
    if self.kind == "flax WN":
      return nn.WeightNorm(dense)
    if self.kind == "flax SN":
      return functools.partial(nn.SpectralNorm(dense, n_steps=self.n_power), update_stats=True)
    if self.kind == "flaxnorm WN, kernel path":
      return flaxnorm.weight_norm(CustomDense(features))
    if self.kind == "flaxnorm SN, kernel path":
      return flaxnorm.spectral_norm(CustomDense(features), n_power_iterations=self.n_power)
    if self.kind == "kernel * scale":
      return ScaledDense(features)
    if self.kind == "output * g":
      return ScaledOutputDense(features)
    if self.kind == "output * g/norm(v), norm fixed":
      return ScaledOutputDense(features, "g / |v| fixed")
    return dense

  @nn.compact
  def __call__(self, x):
    for features in SIZES[1:-1]:
      x = nn.relu(self.layer(features)(x))
    return self.layer(SIZES[-1])(x)


def make_step(model, tx, donate=False):
  """A fresh jitted train step: (params, opt_state, stats, x, y) -> the same + loss."""
  mutable = [MUTABLE[model.kind]] if model.kind in MUTABLE else []

  def loss_fn(params, stats, x, y):
    if mutable:
      logits, stats = model.apply({"params": params, **stats}, x, mutable=mutable)
    else:
      logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), stats

  def step(params, opt_state, stats, x, y):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, stats, loss

  return jax.jit(step, donate_argnums=(0, 1, 2) if donate else ())


def setup(kind, batch, n_power=1):
  model = MLP(kind, n_power)
  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (batch, SIZES[0]))
  y = jax.random.randint(ky, (batch,), 0, SIZES[-1])
  variables = model.init(kp, x)
  params = variables["params"]
  stats = {k: v for k, v in variables.items() if k != "params"}
  tx = optax.adam(1e-4)
  return model, tx, [params, tx.init(params), stats, x, y]


def bench_steps(batch, rounds, steps, warmup, donate):
  """ms/step of every variant: all compiled first, then timed in interleaved rounds."""
  runs = {}
  for kind in VARIANTS:
    model, tx, args = setup(kind, batch)
    step = make_step(model, tx, donate)
    for _ in range(warmup):  # compile, then settle caches and the allocator
      *args[:3], loss = step(*args)
    jax.block_until_ready(loss)
    runs[kind] = (step, args)

  times = {kind: [] for kind in VARIANTS}
  for _ in range(rounds):
    for kind, (step, args) in runs.items():
      t = time.perf_counter()
      for _ in range(steps):
        *args[:3], loss = step(*args)  # args[:3] updated in place: state is threaded
      jax.block_until_ready((args[:3], loss))
      times[kind].append((time.perf_counter() - t) / steps * 1e3)
      assert np.isfinite(float(loss)), kind
  return times


def compile_time(kind, batch, n_power, reps):
  """Median seconds (lower, compile) of a fresh train step."""
  model, tx, args = setup(kind, batch, n_power)
  lowers, compiles = [], []
  for _ in range(reps):
    step = make_step(model, tx)  # a new function: no jit cache hit
    t0 = time.perf_counter()
    lowered = step.lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    lowers.append(t1 - t0)
    compiles.append(time.perf_counter() - t1)
  return statistics.median(lowers), statistics.median(compiles)


def verdict(value, target):
  return "PASS" if value <= target else "MISS"


def cpu_name():
  name = platform.processor()
  if not name and os.path.exists("/proc/cpuinfo"):  # empty on most Linux systems
    with open("/proc/cpuinfo") as f:
      name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
  return name or platform.machine()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="few repetitions (smoke run)")
  parser.add_argument("--donate", action="store_true", help="donate params, opt state, stats")
  parser.add_argument("--batch", type=int, default=128)
  args = parser.parse_args()
  if args.quick:
    rounds, steps, warmup, reps, flax_reps = 3, 2, 2, 1, 1
  else:
    rounds, steps, warmup, reps, flax_reps = 30, 10, 10, 5, 3
  dev = jax.devices()[0]
  machine = (
    f"{cpu_name()}, {os.cpu_count()} CPUs, jax {jax.__version__}, flax {flax.__version__}, "
    f"device {dev.platform} ({dev.device_kind})"
  )
  t_start = time.perf_counter()
  print(f"# {machine}")

  print(f"(a) train step, batch {args.batch}: {rounds} rounds x {steps} steps ...", flush=True)
  times = bench_steps(args.batch, rounds, steps, warmup, args.donate)
  ms = {kind: statistics.median(t) for kind, t in times.items()}
  # Ratios paired within each round (same machine state), then the median.
  paired = {k: statistics.median(np.divide(t, times["plain"])) for k, t in times.items()}
  for kind in VARIANTS:
    q1, q3 = np.percentile(times[kind], [25, 75])
    print(f"  {kind:25s} {ms[kind]:7.2f} ms/step (IQR {q1:.2f}-{q3:.2f})  x{paired[kind]:.3f}")

  print("(b) SN train step: lower + compile seconds ...", flush=True)
  comp = {}
  for kind, ns, r in (("flaxnorm SN", (1, 2, 50, 1000), reps), ("flax SN", (1, 50), flax_reps)):
    for n in ns:
      lower, compile_ = compile_time(kind, args.batch, n, r)
      comp[kind, n] = lower + compile_
      print(
        f"  {kind:12s} n={n:<5d} {lower:5.2f} + {compile_:5.2f} = {comp[kind, n]:5.2f} s",
        flush=True,
      )

  rows = []
  for kind in VARIANTS:
    ratio = paired[kind]
    target = TARGETS.get(kind)
    check = (f"≤ {target}", verdict(ratio, target)) if target else ("", "")
    rows.append((f"train step, {kind}", f"{ms[kind]:.2f} ms", f"{ratio:.2f}", *check))
  for (kind, n), t in comp.items():
    rows.append((f"compile, {kind}, n_power={n}", f"{t:.2f} s", "", "", ""))
  for kind, a, b, target in (
    ("flaxnorm SN", 50, 1, 1.4),
    ("flaxnorm SN", 1000, 2, 1.2),
    ("flax SN", 50, 1, None),
  ):
    ratio = comp[kind, a] / comp[kind, b]
    check = (f"≤ {target}", verdict(ratio, target)) if target else ("", "")
    rows.append((f"compile ratio, {kind}, n={a} / n={b}", "", f"{ratio:.2f}", *check))

  print()
  print(
    f"{datetime.date.today()}, {machine}. MLP {'-'.join(map(str, SIZES))}, batch {args.batch}, "
    f"Adam; ms/step: medians of {rounds} interleaved rounds of {steps} steps, ratios: "
    "medians of the per-round ratios to plain"
    f"{', donated buffers' if args.donate else ''}; compile (lower + compile): medians of "
    f"{reps} (Flax: {flax_reps}).{' QUICK RUN.' if args.quick else ''}"
  )
  print()
  print("| measurement | time | ratio | target | |")
  print("|---|---:|---:|---|---|")
  for row in rows:
    print("| " + " | ".join(row) + " |")
  print(f"\n[total {time.perf_counter() - t_start:.0f} s]")


if __name__ == "__main__":
  main()
