"""A small SN-GAN on a ring of 8 Gaussians, with ``flaxnorm.spectral_norm``.

Every ``nn.Dense`` of the discriminator is wrapped with
``flaxnorm.spectral_norm``: it keeps its ``kernel`` param and uses
``kernel / sigma``, where sigma comes from power iteration whose state lives in
the ``spectral`` collection.

* Training: ``apply(..., mutable=["spectral"])`` runs one power iteration per
  call and returns the new state, which is merged back into the variables.
* Evaluation: a plain ``apply(...)`` uses the stored state and changes nothing.

At the end it reports sample quality (share of samples within 3 std of a mode,
modes covered) and checks each layer's ``kernel / sigma`` with a numpy SVD::

  python examples/sngan_mixture.py [--plot samples.png]
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import flaxnorm

N_MODES, RADIUS, STD = 8, 2.0, 0.02
LATENT, BATCH, STEPS, CHUNK, LR = 8, 256, 6000, 100, 2e-3
ANGLES = 2 * np.pi * np.arange(N_MODES) / N_MODES
MODES = (RADIUS * np.stack([np.cos(ANGLES), np.sin(ANGLES)], axis=1)).astype(np.float32)


def sample_data(key, n):
  k_mode, k_noise = jax.random.split(key)
  centers = jnp.asarray(MODES)[jax.random.randint(k_mode, (n,), 0, N_MODES)]
  return centers + STD * jax.random.normal(k_noise, (n, 2))


class MLP(nn.Module):
  features: tuple[int, ...]
  dense: type[nn.Module] = nn.Dense

  @nn.compact
  def __call__(self, x):
    for width in self.features[:-1]:
      x = nn.leaky_relu(self.dense(width)(x), 0.2)
    return self.dense(self.features[-1])(x)


generator = MLP((128, 128, 128, 2))
discriminator = MLP((128, 128, 128, 1), dense=flaxnorm.spectral_norm(nn.Dense))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--plot", metavar="PNG", help="save a scatter of real and fake samples")
  parser.add_argument("--steps", type=int, default=STEPS, help=f"multiple of {CHUNK}")
  args = parser.parse_args()
  start = time.perf_counter()

  key = jax.random.key(0)
  key, kg, kd = jax.random.split(key, 3)
  g_params = generator.init(kg, jnp.zeros((1, LATENT)))["params"]
  d_vars = discriminator.init(kd, jnp.zeros((1, 2)))  # {'params', 'spectral'}
  d_params, d_spectral = d_vars["params"], d_vars["spectral"]
  print("D layer 0:", jax.tree.map(jnp.shape, {k: v["Dense_0"] for k, v in d_vars.items()}))

  # SN-GAN's Adam (b1=0, b2=0.9); decaying the rate to 0 lets the samples
  # settle on the modes instead of orbiting them.
  n_steps = args.steps // CHUNK * CHUNK
  lr = optax.linear_schedule(LR, 0.0, n_steps)
  g_tx, d_tx = optax.adam(lr, b1=0.0, b2=0.9), optax.adam(lr, b1=0.0, b2=0.9)
  g_opt, d_opt = g_tx.init(g_params), d_tx.init(d_params)

  def d_train(d_params, spectral, x):
    # Training mode: one power iteration; the new state comes back in
    # `updates` and replaces the old one for the next call.
    out, updates = discriminator.apply(
      {"params": d_params, "spectral": spectral}, x, mutable=["spectral"]
    )
    return out, updates["spectral"]

  def d_loss(d_params, spectral, g_params, real, z):
    fake = generator.apply({"params": g_params}, z)
    out, spectral = d_train(d_params, spectral, jnp.concatenate([real, fake]))
    d_real, d_fake = jnp.split(out, 2)
    # Hinge loss (Miyato et al., 2018).
    return jnp.mean(nn.relu(1 - d_real)) + jnp.mean(nn.relu(1 + d_fake)), spectral

  def g_loss(g_params, d_params, spectral, z):
    fake = generator.apply({"params": g_params}, z)
    out, spectral = d_train(d_params, spectral, fake)
    return -jnp.mean(out), spectral

  def train_step(state, key):
    g_params, d_params, spectral, g_opt, d_opt = state
    k_real, k_z1, k_z2 = jax.random.split(key, 3)
    real = sample_data(k_real, BATCH)
    (ld, spectral), grads = jax.value_and_grad(d_loss, has_aux=True)(
      d_params, spectral, g_params, real, jax.random.normal(k_z1, (BATCH, LATENT))
    )
    updates, d_opt = d_tx.update(grads, d_opt, d_params)
    d_params = optax.apply_updates(d_params, updates)
    # Threading the state through both updates: one power iteration per D call.
    (lg, spectral), grads = jax.value_and_grad(g_loss, has_aux=True)(
      g_params, d_params, spectral, jax.random.normal(k_z2, (BATCH, LATENT))
    )
    updates, g_opt = g_tx.update(grads, g_opt, g_params)
    g_params = optax.apply_updates(g_params, updates)
    return (g_params, d_params, spectral, g_opt, d_opt), (ld, lg)

  @jax.jit
  def train_chunk(state, key):
    # CHUNK steps per call: the steps are tiny, so per-call dispatch would dominate.
    return jax.lax.scan(train_step, state, jax.random.split(key, CHUNK))

  state = (g_params, d_params, d_spectral, g_opt, d_opt)
  for step in range(CHUNK, n_steps + 1, CHUNK):
    key, sub = jax.random.split(key)
    state, (ld, lg) = train_chunk(state, sub)
    if step % 1000 == 0:
      print(f"step {step:5d}  D loss {float(ld.mean()):.3f}  G loss {float(lg.mean()):.3f}")
  g_params, d_params, d_spectral, _, _ = state

  # Evaluation: no mutable collection, so the stored state is used as is.
  key, kz, kr = jax.random.split(key, 3)
  fake = np.asarray(generator.apply({"params": g_params}, jax.random.normal(kz, (5000, LATENT))))
  real = np.asarray(sample_data(kr, 5000))
  d_vars = {"params": d_params, "spectral": d_spectral}  # the trained state merged back
  d_real, d_fake = (float(discriminator.apply(d_vars, x).mean()) for x in (real, fake))
  print(f"eval mode: mean D(real) {d_real:.3f}, mean D(fake) {d_fake:.3f}")

  dist = np.linalg.norm(fake[:, None, :] - MODES[None], axis=-1)
  near = dist.min(1) < 3 * STD
  covered = np.unique(dist.argmin(1)[near])
  print(f"samples within 3 std of a mode: {near.mean():.3f}")
  print(f"modes covered: {len(covered)} / {N_MODES}")

  # The normalized kernel is kernel / sigma: its top singular value should be ~1.
  for layer in sorted(d_params):
    w = np.asarray(d_params[layer]["kernel"])
    sigma = float(d_spectral[layer]["kernel_sigma"])
    top = np.linalg.svd(w / sigma, compute_uv=False)[0]
    print(f"{layer}: sigma {sigma:.3f}  largest singular value of kernel / sigma {top:.4f}")
  print(f"[{time.perf_counter() - start:.1f} s]")

  if args.plot:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(*real[:1000].T, s=4, alpha=0.5, label="data")
    ax.scatter(*fake[:1000].T, s=4, alpha=0.5, label="generator")
    ax.set_aspect("equal")
    ax.legend(loc="upper right")
    ax.set_title(f"SN-GAN, {n_steps} steps: {len(covered)}/{N_MODES} modes")
    fig.savefig(args.plot, dpi=120, bbox_inches="tight")
    print(f"saved {args.plot}")


if __name__ == "__main__":
  main()
