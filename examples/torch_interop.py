"""PyTorch checkpoint -> flaxnorm, end to end, and back.

A HiFi-GAN-style generator block (a weight-normed ConvTranspose1d upsampler and
two residual, dilated, weight-normed Conv1d with leaky ReLU) and a
spectral-normed Conv1d discriminator stack are built in PyTorch, run for one
training-mode step (so the spectral state is a trained one), saved to a file,
and loaded into the same models written in Flax with flaxnorm. The script
prints the largest difference between the two frameworks' outputs, between
their weights after removing the weight norm, and of the round trip back to
PyTorch.

Both PyTorch APIs appear: the legacy ``torch.nn.utils.weight_norm`` /
``spectral_norm`` hooks and ``torch.nn.utils.parametrizations``. Two things to
mirror in Flax (``interop.from_torch(...).axis`` tells both):

* weight norm's ``dim=0`` on a ConvTranspose keeps its **input** channels:
  Flax ``axis=-2`` (the kernel is ``(k, in, out)``);
* the parametrization's power iteration starts from ``v``; flaxnorm continues
  it exactly on the transposed matrix view, ``axis=(-3, -2)`` for a Conv1d.

Run: ``python examples/torch_interop.py`` (CPU torch; a few seconds).
"""

from __future__ import annotations

import os
import tempfile
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn as tnn
from torch.nn.utils import parametrizations

import flaxnorm
from flaxnorm import interop

SLOPE = 0.1  # leaky ReLU slope, HiFi-GAN's


def _legacy(fn, module: tnn.Module, **kwargs) -> tnn.Module:
  with warnings.catch_warnings():  # torch deprecates the legacy hooks
    warnings.simplefilter("ignore", FutureWarning)
    return fn(module, **kwargs)


# --------------------------------------------------------------------------- #
# PyTorch models (layout NCL).
# --------------------------------------------------------------------------- #


class TorchGenerator(tnn.Module):
  """Upsampler + residual dilated convs: (batch, channels, L) -> (batch, channels // 2, stride * L)."""

  def __init__(self, channels: int = 8, kernel: int = 4, stride: int = 2, dilations=(1, 3)):
    super().__init__()
    up = tnn.ConvTranspose1d(
      channels, channels // 2, kernel, stride, padding=(kernel - stride) // 2
    )
    self.up = _legacy(torch.nn.utils.weight_norm, up)  # keys up.weight_g, up.weight_v
    self.convs = tnn.ModuleList(
      parametrizations.weight_norm(
        tnn.Conv1d(channels // 2, channels // 2, 3, dilation=d, padding=d)
      )
      for d in dilations
    )  # keys convs.0.parametrizations.weight.original0, ...

  def forward(self, x):
    x = self.up(F.leaky_relu(x, SLOPE))
    for conv in self.convs:
      x = x + conv(F.leaky_relu(x, SLOPE))
    return x


class TorchDiscriminator(tnn.Module):
  """Strided spectral-normed Conv1d stack: (batch, 1, L) -> (batch, 1, L // 4)."""

  def __init__(self):
    super().__init__()
    self.convs = tnn.ModuleList(
      [
        _legacy(torch.nn.utils.spectral_norm, tnn.Conv1d(1, 4, 5, stride=2, padding=2)),
        parametrizations.spectral_norm(tnn.Conv1d(4, 8, 5, stride=2, padding=2, groups=2)),
      ]
    )
    self.post = _legacy(torch.nn.utils.spectral_norm, tnn.Conv1d(8, 1, 3, padding=1))

  def forward(self, x):
    for conv in self.convs:
      x = F.leaky_relu(conv(x), SLOPE)
    return self.post(x)


# --------------------------------------------------------------------------- #
# The same models in Flax (layout NLC). Submodule names follow PyTorch's
# ("convs.0" -> "convs_0"), so load_torch_state_dict needs no key map.
# --------------------------------------------------------------------------- #


class FlaxGenerator(nn.Module):
  channels: int = 8
  kernel: int = 4
  stride: int = 2
  dilations: tuple[int, ...] = (1, 3)

  @nn.compact
  def __call__(self, x):
    c = self.channels // 2
    pad = interop.conv_transpose_padding(self.kernel, (self.kernel - self.stride) // 2)
    # PyTorch's weight_norm(dim=0) on ConvTranspose1d keeps the input channels.
    up = flaxnorm.weight_norm(nn.ConvTranspose, axis=-2)
    x = up(c, (self.kernel,), strides=(self.stride,), padding=pad, name="up")(
      nn.leaky_relu(x, SLOPE)
    )
    for i, d in enumerate(self.dilations):
      conv = flaxnorm.weight_norm(nn.Conv)(
        c, (3,), kernel_dilation=(d,), padding=[(d, d)], name=f"convs_{i}"
      )
      x = x + conv(nn.leaky_relu(x, SLOPE))
    return x


class FlaxDiscriminator(nn.Module):
  @nn.compact
  def __call__(self, x):
    legacy = flaxnorm.spectral_norm(nn.Conv)  # hook order: flaxnorm's own, axis=-1
    parametrized = flaxnorm.spectral_norm(nn.Conv, axis=(-3, -2))  # see the module docstring
    x = nn.leaky_relu(legacy(4, (5,), strides=(2,), padding=[(2, 2)], name="convs_0")(x), SLOPE)
    x = parametrized(
      8, (5,), strides=(2,), padding=[(2, 2)], feature_group_count=2, name="convs_1"
    )(x)
    x = nn.leaky_relu(x, SLOPE)
    return legacy(1, (3,), padding=[(1, 1)], name="post")(x)


# --------------------------------------------------------------------------- #
# Conversion.
# --------------------------------------------------------------------------- #


def load_generator(state_dict, length: int = 16) -> interop.TorchLoadResult:
  """Flax variables for FlaxGenerator from a TorchGenerator state dict."""
  # Shapes only: the values all come from the checkpoint.
  shapes = jax.eval_shape(FlaxGenerator().init, jax.random.key(0), jnp.zeros((1, length, 8)))
  # A ConvTranspose cannot be told from a Conv by its weight alone: name it.
  return interop.load_torch_state_dict(state_dict, shapes, None, kinds={"up": "conv_transpose1d"})


def load_discriminator(state_dict, length: int = 32) -> interop.TorchLoadResult:
  """Flax variables for FlaxDiscriminator from a TorchDiscriminator state dict."""
  shapes = jax.eval_shape(FlaxDiscriminator().init, jax.random.key(0), jnp.zeros((1, length, 1)))
  return interop.load_torch_state_dict(state_dict, shapes, None)


def ncl_to_nlc(x: torch.Tensor) -> np.ndarray:
  return np.moveaxis(x.detach().numpy(), 1, -1)


def main(seed: int = 0, verbose: bool = True) -> dict[str, float]:
  """Builds, saves and converts both models; returns the max differences."""
  torch.manual_seed(seed)
  gen, disc = TorchGenerator(), TorchDiscriminator()
  audio = torch.randn(2, 1, 32)
  with torch.no_grad():
    disc(audio)  # one training-mode forward: a power-iteration step
  gen.eval()
  disc.eval()

  with tempfile.TemporaryDirectory() as tmp:  # a checkpoint on disk, no download
    path = os.path.join(tmp, "checkpoint.pt")
    torch.save({"generator": gen.state_dict(), "discriminator": disc.state_dict()}, path)
    ckpt = torch.load(path)

  g, d = load_generator(ckpt["generator"]), load_discriminator(ckpt["discriminator"])
  mel = torch.randn(2, 8, 16)
  with torch.no_grad():
    g_torch, d_torch = gen(mel), disc(audio)
  g_flax = FlaxGenerator().apply(g.variables, ncl_to_nlc(mel))
  d_flax = FlaxDiscriminator().apply(d.variables, ncl_to_nlc(audio))  # eval: stored u, v
  diffs = {
    "generator output": float(np.abs(np.asarray(g_flax) - ncl_to_nlc(g_torch)).max()),
    "discriminator output": float(np.abs(np.asarray(d_flax) - ncl_to_nlc(d_torch)).max()),
  }

  # Removing weight norm on both sides gives the same plain weights.
  plain = flaxnorm.remove_weight_norm(g.variables)
  _legacy(torch.nn.utils.remove_weight_norm, gen.up)
  for conv in gen.convs:
    torch.nn.utils.parametrize.remove_parametrizations(conv, "weight")
  torch_plain = interop.load_torch_state_dict(
    gen.state_dict(), plain, None, kinds={"up": "conv_transpose1d"}
  ).variables
  diffs["weights after remove_weight_norm"] = max(
    float(jnp.abs(a - b).max())
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(torch_plain))
  )

  # Round trip: PyTorch -> flaxnorm -> PyTorch reproduces every tensor.
  round_trip = 0.0
  for result, sd in ((g, ckpt["generator"]), (d, ckpt["discriminator"])):
    back = interop.to_torch_state_dict(result.variables, result.layers)
    assert set(back) == set(sd), sorted(set(back) ^ set(sd))
    round_trip = max(round_trip, max(float((back[k] - sd[k]).abs().max()) for k in sd))
  diffs["round trip"] = round_trip

  if verbose:
    for what, diff in diffs.items():
      print(f"max |flax - torch| {what:>34}: {diff:.3g}")
  return diffs


if __name__ == "__main__":
  main()
