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
LATENT, BATCH, STEPS, LR = 8, 256, 3000, 1e-3
MODES = RADIUS * np.stack(
  [
    np.cos(2 * np.pi * np.arange(N_MODES) / N_MODES),
    np.sin(2 * np.pi * np.arange(N_MODES) / N_MODES),
  ],
  axis=1,
).astype(np.float32)


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
  parser.add_argument("--steps", type=int, default=STEPS)
  args = parser.parse_args()
  start = time.perf_counter()

  key = jax.random.key(0)
  key, kg, kd = jax.random.split(key, 3)
  g_params = generator.init(kg, jnp.zeros((1, LATENT)))["params"]
  d_vars = discriminator.init(kd, jnp.zeros((1, 2)))  # {'params', 'spectral'}
  d_params, d_spectral = d_vars["params"], d_vars["spectral"]
  print("D layer 0:", jax.tree.map(jnp.shape, {k: v["Dense_0"] for k, v in d_vars.items()}))

  # beta1 = 0.5 as is usual for GANs.
  g_tx, d_tx = optax.adam(LR, b1=0.5), optax.adam(LR, b1=0.5)
  g_opt, d_opt = g_tx.init(g_params), d_tx.init(d_params)

  def d_train(d_params, spectral, x):
    # Training mode: iterate and return the new power-iteration state.
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

  @jax.jit
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

  state = (g_params, d_params, d_spectral, g_opt, d_opt)
  for step in range(1, args.steps + 1):
    key, sub = jax.random.split(key)
    state, (ld, lg) = train_step(state, sub)
    if step % 500 == 0 or step == 1:
      print(f"step {step:5d}  D loss {float(ld):.3f}  G loss {float(lg):.3f}")
  g_params, d_params, d_spectral, _, _ = state

  # Evaluation: no mutable collection, so the stored state is used as is.
  key, kz, kr = jax.random.split(key, 3)
  fake = np.asarray(generator.apply({"params": g_params}, jax.random.normal(kz, (5000, LATENT))))
  real = np.asarray(sample_data(kr, 5000))
  d_eval = discriminator.apply({"params": d_params, "spectral": d_spectral}, jnp.asarray(real))
  print(f"D(real) mean {float(d_eval.mean()):.3f} (eval mode)")

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
    ax.set_title(f"SN-GAN, {args.steps} steps: {len(covered)}/{N_MODES} modes")
    fig.savefig(args.plot, dpi=120, bbox_inches="tight")
    print(f"saved {args.plot}")


if __name__ == "__main__":
  main()
