"""The SN-GAN of ``sngan_mixture.py`` in Flax NNX, with ``flaxnorm.nnx``.

The discriminator is an ``nnx.Sequential`` of ``nnx.Linear`` layers, wrapped in
place by ``flaxnorm.nnx.wrap_modules(d, flaxnorm.nnx.spectral_norm,
where=nnx.Linear)``: each layer keeps its ``kernel`` ``nnx.Param`` and uses
``kernel / sigma``; the power-iteration state (``kernel_u``, ``kernel_v``,
``kernel_sigma``) is a ``flaxnorm.nnx.SpectralStateVar``, which
``nnx.Optimizer(..., wrt=nnx.Param)`` leaves out.

* ``d.train()``: every call runs one power iteration and stores the new state
  in the layers, also inside ``nnx.jit`` and ``nnx.value_and_grad``.
* ``d.eval()``: the stored state is used and nothing changes.

It prints the share of samples within 3 std of a mode, the modes covered,
each layer's sigma and the discriminator's certified Lipschitz bound
(``flaxnorm.nnx.lipschitz_bound``), and writes ``nnx_sngan.png`` (data and samples; sigma of
each layer over training) to ``--out``. Run (about a minute on 2 CPU cores)::

  python examples/nnx_sngan.py [--steps 3000] [--out out/nnx_sngan]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from matplotlib.figure import Figure
from tqdm import tqdm

import flaxnorm.nnx as fnnx

N_MODES, RADIUS, STD = 8, 2.0, 0.02
LATENT, BATCH, LR, SEED, STEPS, LOG_EVERY = 8, 128, 2e-3, 0, 3000, 100
ANGLES = 2 * np.pi * np.arange(N_MODES) / N_MODES
MODES = (RADIUS * np.stack([np.cos(ANGLES), np.sin(ANGLES)], axis=1)).astype(np.float32)


def sample_data(key, n):
  """n points (n, 2) of the ring: a random mode plus Gaussian noise."""
  k_mode, k_noise = jax.random.split(key)
  centers = jnp.asarray(MODES)[jax.random.randint(k_mode, (n,), 0, N_MODES)]
  return centers + STD * jax.random.normal(k_noise, (n, 2))


def mlp(features: tuple[int, ...], rngs: nnx.Rngs) -> nnx.Sequential:
  """Linear layers with leaky ReLU between them: (n, features[0]) -> (n, features[-1])."""
  layers = []
  for d_in, d_out in itertools.pairwise(features):
    layers += [
      nnx.Linear(d_in, d_out, rngs=rngs),
      functools.partial(nnx.leaky_relu, negative_slope=0.2),
    ]
  return nnx.Sequential(*layers[:-1])


def spectral_sigmas(model: nnx.Module) -> dict[str, float]:
  """The stored sigma of every spectral-normed param: ``{"layers/0/kernel": sigma, ...}``."""
  return {k: float(s) for k, s in fnnx.spectral_sigmas(model).items()}


def mode_stats(samples: np.ndarray) -> tuple[float, int]:
  """Share of samples within 3 std of a mode, and the modes holding >= 1% of the samples."""
  dist = np.linalg.norm(samples[:, None, :] - MODES[None], axis=-1)  # (n, N_MODES)
  near = dist.min(1) < 3 * STD
  counts = np.bincount(dist.argmin(1)[near], minlength=N_MODES)
  return float(near.mean()), int((counts >= 0.01 * len(samples)).sum())


def plot(path: str, real: np.ndarray, fake: np.ndarray, steps: list[int], sigmas: list) -> None:
  fig = Figure(figsize=(9, 4), layout="constrained")
  ax_s, ax_sigma = fig.subplots(1, 2, width_ratios=(1, 1.3))
  ax_s.scatter(*real.T, s=12, c="tab:gray", alpha=0.3, label="data")
  ax_s.scatter(*fake.T, s=2, c="tab:blue", label="generator")
  ax_s.set_aspect("equal")
  ax_s.set_title(f"NNX SN-GAN: {mode_stats(fake)[1]}/{N_MODES} modes")
  ax_s.legend(loc="upper right", fontsize=8)
  for layer in sigmas[0]:
    ax_sigma.plot(steps, [s[layer] for s in sigmas], label=layer)
  ax_sigma.set_xlabel("step")
  ax_sigma.set_title("stored kernel_sigma of each discriminator layer")
  ax_sigma.legend(fontsize=8)
  fig.savefig(path, dpi=80)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=STEPS, help="training steps")
  parser.add_argument("--out", default="out/nnx_sngan", help="directory for the PNG")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  start = time.perf_counter()

  rngs = nnx.Rngs(SEED)
  g = mlp((LATENT, 128, 128, 128, 2), rngs)
  d = mlp((2, 128, 128, 128, 1), rngs)
  # In place; before the optimizer is made (it sees the params at creation).
  fnnx.wrap_modules(d, fnnx.spectral_norm, where=nnx.Linear, rngs=SEED)
  print("D layer 0:", jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(d.layers[0]))))

  lr = optax.linear_schedule(LR, 0.0, args.steps)  # as in sngan_mixture.py
  g_opt = nnx.Optimizer(g, optax.adam(lr, b1=0.0, b2=0.9), wrt=nnx.Param)
  d_opt = nnx.Optimizer(d, optax.adam(lr, b1=0.0, b2=0.9), wrt=nnx.Param)  # no u, v, sigma

  def d_loss(d, g, real, z):
    d_real, d_fake = jnp.split(d(jnp.concatenate([real, g(z)])), 2)  # updates d's state
    return jnp.mean(nnx.relu(1 - d_real)) + jnp.mean(nnx.relu(1 + d_fake))  # hinge loss

  def g_loss(g, d, z):
    return -jnp.mean(d(g(z)))  # d is an argument, not a closure: its state updates flow out

  @nnx.jit
  def train_step(g, d, g_opt, d_opt, key):
    k_real, k_z1, k_z2 = jax.random.split(key, 3)
    real = sample_data(k_real, BATCH)
    ld, grads = nnx.value_and_grad(d_loss)(d, g, real, jax.random.normal(k_z1, (BATCH, LATENT)))
    d_opt.update(d, grads)  # grads of d's nnx.Params only
    lg, grads = nnx.value_and_grad(g_loss)(g, d, jax.random.normal(k_z2, (BATCH, LATENT)))
    g_opt.update(g, grads)
    return ld, lg

  key = jax.random.key(SEED)
  steps, sigmas = [], []
  d.train()  # the power iteration runs at every call
  bar = tqdm(range(1, args.steps + 1), desc="NNX SN-GAN")
  for step in bar:
    key, sub = jax.random.split(key)
    ld, lg = train_step(g, d, g_opt, d_opt, sub)
    if step % LOG_EVERY == 0 or step == args.steps:
      bar.set_postfix(d_loss=f"{float(ld):.3f}", g_loss=f"{float(lg):.3f}")
      steps.append(step)
      sigmas.append(spectral_sigmas(d))

  # Evaluation: the stored state is used and left as it is.
  d.eval()
  key, kz, kr = jax.random.split(key, 3)
  fake = np.asarray(nnx.jit(lambda g, z: g(z))(g, jax.random.normal(kz, (5000, LATENT))))
  real = np.asarray(sample_data(kr, 5000))
  before = spectral_sigmas(d)
  d_fake = float(nnx.jit(lambda d, x: d(x).mean())(d, fake))
  assert spectral_sigmas(d) == before, "eval mode changed the spectral state"
  share, modes = mode_stats(fake)
  print(
    f"samples within 3 std of a mode {share:.3f}, modes covered {modes}/{N_MODES}, "
    f"eval-mode mean D(fake) {d_fake:.3f}"
  )
  for i, layer in enumerate(m for m in d.layers if isinstance(m, nnx.Linear)):
    sigma = float(layer.kernel_sigma[...])
    top = np.linalg.svd(np.asarray(layer.kernel), compute_uv=False)[0]  # kernel / sigma, computed
    print(
      f"layer {i}: sigma {sigma:.3f}, largest singular value of the normalized kernel {top:.4f}"
    )

  bound = fnnx.lipschitz_bound(d, (real[:1],))  # in eval mode: the stored state, as D evaluates
  layers = ", ".join(f"{c:.4f}" for _, c in bound.layers.values() if c is not None)
  print(f"certified Lipschitz bound of D: {bound.certified:.4f} (its layers: {layers})")

  plot(os.path.join(args.out, "nnx_sngan.png"), real[:1000], fake[:1000], steps, sigmas)
  print(f"wrote nnx_sngan.png to {args.out}  [{time.perf_counter() - start:.1f} s]")


if __name__ == "__main__":
  main()
