"""SN-GAN on a ring of 8 Gaussians, with and without ``flaxnorm.spectral_norm``.

Two GANs are trained from the same seed with the same optimizer; the only
difference is the discriminator's layer class. In the SN-GAN every ``nn.Dense``
of the discriminator is wrapped with ``flaxnorm.spectral_norm``: it keeps its
``kernel`` param and uses ``kernel / sigma``, where sigma comes from a power
iteration whose state lives in the ``spectral`` collection.

* Training: ``apply(..., mutable=["spectral"])`` runs one power iteration per
  call and returns the new state, which the jitted step threads to the next call.
* Evaluation: a plain ``apply(...)`` uses the stored state and changes nothing.

It prints, for both GANs, the share of samples within 3 std of a mode and the
number of modes covered, and writes to ``--out``:

* ``samples.png``: the real data and the generators' samples at several points
  of training, one row per GAN;
* ``sigmas.png``: each discriminator layer's spectral norm over training (the
  stored ``kernel_sigma`` of the SN-GAN; the plain GAN's own kernels, by SVD).

Run (a minute or two on 2 CPU cores)::

  python examples/sngan_mixture.py [--steps 3000] [--out out/sngan_mixture]
"""

from __future__ import annotations

import argparse
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from matplotlib.figure import Figure
from tqdm import tqdm

import flaxnorm

N_MODES, RADIUS, STD = 8, 2.0, 0.02
LATENT, BATCH, LR, SEED = 8, 128, 2e-3, 0
STEPS, CHUNK, SNAPSHOTS = 3000, 100, 4
ANGLES = 2 * np.pi * np.arange(N_MODES) / N_MODES
MODES = (RADIUS * np.stack([np.cos(ANGLES), np.sin(ANGLES)], axis=1)).astype(np.float32)


def sample_data(key, n):
  """n points (n, 2) of the ring: a random mode plus Gaussian noise."""
  k_mode, k_noise = jax.random.split(key)
  centers = jnp.asarray(MODES)[jax.random.randint(k_mode, (n,), 0, N_MODES)]
  return centers + STD * jax.random.normal(k_noise, (n, 2))


class MLP(nn.Module):
  features: tuple[int, ...]
  dense: type[nn.Module] = nn.Dense  # the layer class: plain or spectral-normed

  @nn.compact
  def __call__(self, x):
    for width in self.features[:-1]:
      x = nn.leaky_relu(self.dense(width)(x), 0.2)
    return self.dense(self.features[-1])(x)


GENERATOR = MLP((128, 128, 128, 2))  # (n, LATENT) noise -> (n, 2) points, the same in both GANs


@jax.jit
def sample(g_params, z):
  return GENERATOR.apply({"params": g_params}, z)


def spectral_sigmas(variables) -> dict[str, float]:
  """The stored sigma of every spectral-normed param: ``{"Dense_0/kernel": sigma, ...}``."""
  return {k: float(s) for k, s in flaxnorm.spectral_sigmas(variables).items()}


def kernel_norms(params) -> dict[str, float]:
  """The largest singular value of every kernel, by SVD: ``{"Dense_0/kernel": ...}``."""
  flat = traverse_util.flatten_dict(params, sep="/")
  return {
    k: float(np.linalg.svd(np.asarray(w), compute_uv=False)[0])
    for k, w in flat.items()
    if k.endswith("kernel")
  }


def train(discriminator: nn.Module, g_params, keys, n_steps: int, chunk: int, label: str) -> dict:
  """Trains one GAN from g_params; returns D's variables, samples and what the figures need."""
  key, kd = keys  # for the steps, for D's init
  # {'params'} for a plain D; {'params', 'spectral'} for a spectral-normed one.
  d_vars = jax.jit(discriminator.init)(kd, jnp.zeros((1, 2)))
  d_params = d_vars.pop("params")
  d_state = d_vars  # what is not trained: {'spectral': ...} for the SN-GAN, {} otherwise

  # SN-GAN's Adam (b1=0, b2=0.9); decaying the rate to 0 lets the samples
  # settle on the modes instead of orbiting them.
  lr = optax.linear_schedule(LR, 0.0, n_steps)
  g_tx, d_tx = optax.adam(lr, b1=0.0, b2=0.9), optax.adam(lr, b1=0.0, b2=0.9)
  g_opt, d_opt = g_tx.init(g_params), d_tx.init(d_params)

  def d_train(d_params, d_state, x):
    # Training mode: one power iteration per call; the new state comes back and
    # replaces the old one for the next call (for a plain D it stays {}).
    out, d_state = discriminator.apply({"params": d_params, **d_state}, x, mutable=["spectral"])
    return out, d_state

  def d_loss(d_params, d_state, g_params, real, z):
    fake = GENERATOR.apply({"params": g_params}, z)
    out, d_state = d_train(d_params, d_state, jnp.concatenate([real, fake]))  # (2 * BATCH, 1)
    d_real, d_fake = jnp.split(out, 2)
    # Hinge loss (Miyato et al., 2018).
    return jnp.mean(nn.relu(1 - d_real)) + jnp.mean(nn.relu(1 + d_fake)), d_state

  def g_loss(g_params, d_params, d_state, z):
    out, d_state = d_train(d_params, d_state, GENERATOR.apply({"params": g_params}, z))
    return -jnp.mean(out), d_state

  def train_step(state, key):
    g_params, d_params, d_state, g_opt, d_opt = state
    k_real, k_z1, k_z2 = jax.random.split(key, 3)
    real = sample_data(k_real, BATCH)
    (ld, d_state), grads = jax.value_and_grad(d_loss, has_aux=True)(
      d_params, d_state, g_params, real, jax.random.normal(k_z1, (BATCH, LATENT))
    )
    updates, d_opt = d_tx.update(grads, d_opt, d_params)
    d_params = optax.apply_updates(d_params, updates)
    # The state goes on through the G update too: one power iteration per D call.
    (lg, d_state), grads = jax.value_and_grad(g_loss, has_aux=True)(
      g_params, d_params, d_state, jax.random.normal(k_z2, (BATCH, LATENT))
    )
    updates, g_opt = g_tx.update(grads, g_opt, g_params)
    g_params = optax.apply_updates(g_params, updates)
    return (g_params, d_params, d_state, g_opt, d_opt), (ld, lg)

  @jax.jit
  def train_chunk(state, key):
    # `chunk` steps per call: the steps are tiny, so per-call dispatch would dominate.
    return jax.lax.scan(train_step, state, jax.random.split(key, chunk))

  z_fixed = jax.random.normal(jax.random.key(SEED + 1), (1000, LATENT))  # same z at every snapshot
  n_chunks = n_steps // chunk
  snap_at = set(np.linspace(0, n_chunks, SNAPSHOTS + 1).round().astype(int)[1:].tolist())
  history = {"step": [], "sigma": [], "snapshots": {}}

  state = (g_params, d_params, d_state, g_opt, d_opt)
  bar = tqdm(range(1, n_chunks + 1), desc=label, unit="chunk")
  for i in bar:
    key, sub = jax.random.split(key)
    state, (ld, lg) = train_chunk(state, sub)
    bar.set_postfix(d_loss=f"{float(ld.mean()):.3f}", g_loss=f"{float(lg.mean()):.3f}")
    g_params, d_params, d_state = state[:3]
    history["step"].append(i * chunk)
    # The SN-GAN's sigmas are stored in its state; the plain D's are computed.
    d_vars = {"params": d_params, **d_state}
    history["sigma"].append(spectral_sigmas(d_vars) if d_state else kernel_norms(d_params))
    if i in snap_at:
      history["snapshots"][i * chunk] = np.asarray(sample(g_params, z_fixed))

  # Evaluation: no mutable collection, so the stored state is used as is.
  key, kz = jax.random.split(key)
  fake = np.asarray(sample(g_params, jax.random.normal(kz, (5000, LATENT))))
  d_fake = float(jax.jit(discriminator.apply)(d_vars, fake).mean())
  return {"d_vars": d_vars, "fake": fake, "d_fake": d_fake, **history}


def mode_stats(samples: np.ndarray) -> tuple[float, int]:
  """Share of samples within 3 std of a mode, and the modes holding >= 1% of the samples."""
  dist = np.linalg.norm(samples[:, None, :] - MODES[None], axis=-1)  # (n, N_MODES)
  near = dist.min(1) < 3 * STD
  counts = np.bincount(dist.argmin(1)[near], minlength=N_MODES)
  return float(near.mean()), int((counts >= 0.01 * len(samples)).sum())


def plot_samples(path: str, real: np.ndarray, runs: dict[str, dict]) -> None:
  steps = sorted(next(iter(runs.values()))["snapshots"])
  fig = Figure(figsize=(2.4 * (len(steps) + 1), 2.5 * len(runs)), layout="constrained")
  axes = fig.subplots(len(runs), len(steps) + 1, squeeze=False, sharex=True, sharey=True)
  for row, (label, run) in zip(axes, runs.items()):
    row[0].scatter(*real[:1000].T, s=2, c="tab:gray")
    row[0].set_title("data")
    row[0].set_ylabel(label)
    for ax, step in zip(row[1:], steps):
      _, modes = mode_stats(run["snapshots"][step])
      ax.scatter(*run["snapshots"][step].T, s=2, c="tab:blue" if "SN" in label else "tab:red")
      ax.set_title(f"step {step}: {modes}/{N_MODES} modes", fontsize=9)
  for ax in axes.flat:
    ax.set_xlim(-3, 3)
    ax.set_ylim(-3, 3)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
  fig.savefig(path, dpi=80)


def plot_sigmas(path: str, runs: dict[str, dict]) -> None:
  fig = Figure(figsize=(8, 3.5), layout="constrained")
  ax = fig.subplots()
  for (label, run), style in zip(runs.items(), ("-", "--")):
    for j, layer in enumerate(run["sigma"][0]):
      sigmas = [s[layer] for s in run["sigma"]]
      ax.plot(run["step"], sigmas, style, color=f"C{j}", label=f"{label}: {layer}")
  ax.set_xlabel("step")
  ax.set_ylabel("largest singular value of the kernel")
  ax.set_title("discriminator: sigma of each layer")
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
  fig.savefig(path, dpi=80)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=STEPS, help="training steps of each GAN")
  parser.add_argument("--out", default="out/sngan_mixture", help="directory for the PNGs")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  start = time.perf_counter()

  chunk = min(CHUNK, args.steps)
  n_steps = args.steps // chunk * chunk
  key, kg, kd = jax.random.split(jax.random.key(SEED), 3)
  g_params = jax.jit(GENERATOR.init)(kg, jnp.zeros((1, LATENT)))["params"]  # one G init for both
  discriminators = {  # the only difference between the two GANs: D's layer class
    "SN-GAN": MLP((128, 128, 128, 1), flaxnorm.spectral_norm(nn.Dense)),
    "plain GAN": MLP((128, 128, 128, 1)),
  }
  runs = {
    label: train(d, g_params, (key, kd), n_steps, chunk, label)
    for label, d in discriminators.items()
  }

  for label, run in runs.items():
    share, modes = mode_stats(run["fake"])
    print(
      f"{label:>9}: samples within 3 std of a mode {share:.3f}, modes covered {modes}/{N_MODES}, "
      f"eval-mode mean D(fake) {run['d_fake']:.3f}"
    )

  # The normalized kernel is kernel / sigma: its largest singular value is ~1.
  d_vars = runs["SN-GAN"]["d_vars"]
  for layer, sigma in spectral_sigmas(d_vars).items():
    w = np.asarray(traverse_util.flatten_dict(d_vars["params"], sep="/")[layer])
    top = np.linalg.svd(w / sigma, compute_uv=False)[0]
    print(f"SN-GAN {layer}: sigma {sigma:.3f}, largest singular value of kernel / sigma {top:.4f}")

  real = np.asarray(sample_data(jax.random.key(SEED + 2), 1000))
  plot_samples(os.path.join(args.out, "samples.png"), real, runs)
  plot_sigmas(os.path.join(args.out, "sigmas.png"), runs)
  print(f"wrote samples.png, sigmas.png to {args.out}  [{time.perf_counter() - start:.1f} s]")


if __name__ == "__main__":
  main()
