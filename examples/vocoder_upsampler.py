"""A HiFi-GAN-shaped upsampler with ``flaxnorm.weight_norm``, then ``remove_weight_norm``.

The generator turns a low-rate conditioning signal (one frame per 16 samples)
into a waveform, as a neural vocoder turns a mel spectrogram into audio: a
first ``nn.Conv``, then per stage a leaky ReLU, an ``nn.ConvTranspose``
upsampler (x4, half the channels) and a residual block of dilated ``nn.Conv``
(dilations 1, 3, 9), and a last ``nn.Conv`` to one channel. Every conv is
wrapped with ``flaxnorm.weight_norm``, as in HiFi-GAN, with HiFi-GAN's axes:
PyTorch's ``weight_norm`` keeps ``dim=0``, the output channels of a ``Conv1d``
(``axis="auto"`` here) but the *input* channels of a ``ConvTranspose1d``
(``axis=-2`` of Flax's ``(window, in, out)`` kernel). Layout NWC:
``(batch, frames, 4) -> (batch, 16 * frames, 1)``.

The data are generated: a voice-like tone (4 harmonics of an f0 chirp between
60 and 150 Hz at a notional 8 kHz, under a moving envelope). The conditioning
holds, per frame, the envelope, f0 and the fundamental's phase (cos, sin): they
fix the waveform, so an L1 loss is enough here (a real vocoder, given only a mel
spectrogram, needs its adversarial losses to choose the phase).

After training, ``flaxnorm.remove_weight_norm`` folds each ``kernel_g`` and
``kernel_v`` into a plain ``kernel`` for inference in the same model built from
plain ``nn.Conv``/``nn.ConvTranspose``; the script prints the largest change of
the output (and exits non-zero above 1e-4), the L1 error and the SNR on a
longer held-out clip, and writes ``vocoder.png`` (target and generated
waveforms, and their spectrograms) to ``--out``. Run (about a minute on 2 CPU
cores)::

  python examples/vocoder_upsampler.py [--steps 1500] [--out out/vocoder_upsampler]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.figure import Figure
from tqdm import tqdm

import flaxnorm

FS, RATES, SLOPE = 8000, (4, 4), 0.1  # notional sample rate (Hz); upsampling; leaky ReLU slope
HOP = int(np.prod(RATES))  # samples per conditioning frame
HARMONICS = (1.0, 0.5, 0.3, 0.2)  # amplitudes of f0, 2 f0, 3 f0, 4 f0
STEPS, BATCH, FRAMES, LR, SEED = 1500, 8, 32, 3e-3, 0  # training clips: 32 frames = 512 samples


def make_batch(key, batch: int, frames: int):
  """Conditioning ``(batch, frames, 4)`` and target waveform ``(batch, frames * HOP, 1)``."""
  k_f0, k_rate, k_phase, k_env_phase = jax.random.split(key, 4)
  t = jnp.arange(frames * HOP) / FS  # (n,) seconds
  f_start, f_end = jax.random.uniform(k_f0, (2, batch, 1), minval=60.0, maxval=150.0)
  f0 = f_start + (f_end - f_start) * t / t[-1]  # (batch, n) Hz: a linear chirp
  rate = jax.random.uniform(k_rate, (batch, 1), minval=4.0, maxval=16.0)  # envelope, Hz
  phase0, env_phase0 = (
    jax.random.uniform(k, (batch, 1), maxval=2 * jnp.pi) for k in (k_phase, k_env_phase)
  )
  phase = phase0 + 2 * jnp.pi * jnp.cumsum(f0, axis=1) / FS  # of the fundamental
  env = 0.5 + 0.4 * jnp.sin(2 * jnp.pi * rate * t + env_phase0)  # (batch, n)
  amps = jnp.asarray(HARMONICS)
  k = jnp.arange(1, len(HARMONICS) + 1)
  wave = env * jnp.sum(amps * jnp.sin(k * phase[..., None]), -1) / amps.sum()  # (batch, n)
  mid = jnp.arange(frames) * HOP + HOP // 2  # each frame's centre sample
  features = (env[:, mid], f0[:, mid] / 100.0 - 1.0, jnp.cos(phase[:, mid]), jnp.sin(phase[:, mid]))
  return jnp.stack(features, axis=-1), wave[..., None]


class ResBlock(nn.Module):
  """HiFi-GAN's residual block, in short: per dilation, two convs and a skip."""

  channels: int
  dilations: tuple[int, ...]
  conv: type[nn.Module]

  @nn.compact
  def __call__(self, x):  # (batch, n, channels) -> same
    for d in self.dilations:
      y = self.conv(self.channels, (3,), kernel_dilation=(d,))(nn.leaky_relu(x, SLOPE))
      x = x + self.conv(self.channels, (3,))(nn.leaky_relu(y, SLOPE))
    return x


class Generator(nn.Module):
  channels: int = 32
  dilations: tuple[int, ...] = (1, 3, 9)
  conv: type[nn.Module] = nn.Conv  # the layer classes: plain or weight-normed
  conv_transpose: type[nn.Module] = nn.ConvTranspose

  @nn.compact
  def __call__(self, cond):  # (batch, frames, 4) -> (batch, frames * HOP, 1)
    x = self.conv(self.channels, (7,))(cond)
    channels = self.channels
    for r in RATES:  # (batch, n, c) -> (batch, r * n, c // 2)
      channels //= 2
      x = self.conv_transpose(channels, (2 * r,), strides=(r,))(nn.leaky_relu(x, SLOPE))
      x = ResBlock(channels, self.dilations, self.conv)(x)
    return jnp.tanh(self.conv(1, (7,))(nn.leaky_relu(x, SLOPE)))


def plot(path: str, cond, target, generated) -> None:
  fig = Figure(figsize=(9, 6), layout="constrained")
  axes = fig.subplot_mosaic([["wave", "wave"], ["zoom", "zoom"], ["target", "generated"]])
  t = np.arange(len(target)) / FS
  for ax in (axes["wave"], axes["zoom"]):
    ax.plot(t, target, lw=1.2, label="target")
    ax.plot(t, generated, lw=0.8, ls="--", label="generated")
    ax.set_ylabel("amplitude")
  axes["wave"].plot(np.arange(len(cond)) * HOP / FS, cond[:, 0], c="k", lw=0.8, label="envelope")
  axes["wave"].legend(loc="upper right", ncol=3, fontsize=8)
  axes["wave"].set_title(f"held-out clip, {len(t) / FS:.2f} s at {FS} Hz")
  axes["zoom"].set_xlim(t[len(t) // 2], t[len(t) // 2] + 0.05)
  axes["zoom"].set_xlabel("time (s)")
  for name, wave in (("target", target), ("generated", generated)):
    axes[name].specgram(wave, NFFT=256, Fs=FS, noverlap=192, cmap="magma", vmin=-120)
    axes[name].set_ylim(0, 1000)
    axes[name].set_title(f"{name}: spectrogram")
    axes[name].set_xlabel("time (s)")
  axes["target"].set_ylabel("frequency (Hz)")
  fig.savefig(path, dpi=80)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps")
  parser.add_argument("--out", default="out/vocoder_upsampler", help="directory for the PNG")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  start = time.perf_counter()

  model = Generator(
    conv=flaxnorm.weight_norm(nn.Conv),
    # PyTorch's dim=0 on a ConvTranspose1d: one g per input channel.
    conv_transpose=flaxnorm.weight_norm(nn.ConvTranspose, axis=-2),
  )
  key, init_key = jax.random.split(jax.random.key(SEED))
  params = jax.jit(model.init)(init_key, jnp.zeros((1, FRAMES, 4)))["params"]
  # The first upsampler: kernel_g (1, 32, 1), kernel_v (8, 32, 16), bias (16,).
  print("ConvTranspose_0:", jax.tree.map(jnp.shape, params["ConvTranspose_0"]))

  tx = optax.adam(optax.cosine_decay_schedule(LR, args.steps))
  opt_state = tx.init(params)

  def loss_fn(params, cond, wave):
    return jnp.mean(jnp.abs(model.apply({"params": params}, cond) - wave))  # L1

  @jax.jit
  def train_step(params, opt_state, key):
    cond, wave = make_batch(key, BATCH, FRAMES)  # fresh clips every step
    loss, grads = jax.value_and_grad(loss_fn)(params, cond, wave)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  bar = tqdm(range(args.steps), desc="train")
  for step in bar:
    key, sub = jax.random.split(key)
    params, opt_state, loss = train_step(params, opt_state, sub)
    if step % 25 == 0 or step == args.steps - 1:
      bar.set_postfix(l1=f"{float(loss):.4f}")

  # Inference: fold the weight norm away and run the same net built from plain layers.
  @jax.jit
  def evaluate(params, key):
    cond, target = make_batch(key, 1, 256)  # a held-out clip: (1, 256, 4), (1, 4096, 1)
    plain_params = flaxnorm.remove_weight_norm({"params": params})["params"]
    generated = Generator().apply({"params": plain_params}, cond)
    diff = jnp.max(jnp.abs(model.apply({"params": params}, cond) - generated))
    return cond[0], target[0, :, 0], generated[0, :, 0], diff

  cond, target, generated, diff = jax.device_get(evaluate(params, jax.random.key(SEED + 1)))
  l1 = np.mean(np.abs(generated - target))
  snr = 10 * np.log10(np.sum(target**2) / np.sum((generated - target) ** 2))
  print(f"after remove_weight_norm: max |weight norm - plain| = {diff:.1e}")
  print(f"held-out clip: L1 {l1:.4f}, SNR {snr:.1f} dB")

  plot(os.path.join(args.out, "vocoder.png"), cond, target, generated)
  print(f"wrote vocoder.png to {args.out}  [{time.perf_counter() - start:.1f} s]")
  if diff > 1e-4:
    print("FAILED: remove_weight_norm changed the output", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
