"""PyTorch -> flaxnorm: a trained PyTorch model ported in one call, trained on in JAX, and back.

**A whole model.** ``TorchVocoder``, a small HiFi-GAN-style upsampler (a
weight-normed Conv1d, a weight-normed ConvTranspose1d x2 upsampler with two
residual dilated Conv1d, and a last Conv1d; both PyTorch weight-norm APIs),
learns in PyTorch for ``--steps`` Adam steps to turn a low-rate (cos, sin) pair
into a two-harmonic tone at twice the rate. Its checkpoint is loaded into the
same model written in Flax with one call::

  interop.load_torch_state_dict(torch_model.state_dict(), FlaxVocoder(), KEY_MAP, inputs=x)

where ``KEY_MAP`` renames the top-level PyTorch modules (``"block.convs.0"`` ->
``"stage/convs_0"``); each layer's kind (the ConvTranspose too), wrapping and
axis are read from the Flax model, traced shape-only. The script prints the largest difference
between the two frameworks' outputs, trains on in JAX (a jitted optax step)
for ``--steps`` more steps, writes the weights back with
``interop.to_torch_state_dict`` (``load_state_dict(strict=True)`` takes them)
and writes ``torch_interop.png`` (both frameworks' outputs overlaid; the loss,
PyTorch then JAX) to ``--out``.

**Parity checks.** The generator block alone and a spectral-normed Conv1d
discriminator stack, after one training-mode step (so the spectral state is a
trained one), are saved, loaded and compared, outputs, weights after
``remove_weight_norm`` and the round trip back to PyTorch. So is a
conditioning encoder: a bidirectional ``nn.LSTM`` with weight-normed weights
and an ``nn.MultiheadAttention``, into Flax's ``LSTMCell`` and
``MultiHeadDotProductAttention``. Two things to mirror
in Flax (``interop.from_torch(...).axis`` tells both):

* weight norm's ``dim=0`` on a ConvTranspose keeps its **input** channels:
  Flax ``axis=-2`` (the kernel is ``(k, in, out)``);
* the parametrization's power iteration starts from ``v``; flaxnorm continues
  it exactly on the transposed matrix view, ``axis=(-3, -2)`` for a Conv1d.

Needs CPU torch (without it, the script says so and exits 0). Run (under a minute)::

  python examples/torch_interop.py [--steps 300] [--out out/torch_interop]
"""

from __future__ import annotations

import sys
from importlib.util import find_spec

if find_spec("torch") is None:  # checked first: without torch, exit at once
  print("torch_interop.py needs PyTorch (pip install torch; CPU is enough): skipped.")
  sys.exit(0)

import argparse
import os
import tempfile
import time
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn as tnn
from torch.nn.utils import parametrizations
from tqdm import tqdm

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


class TorchEncoder(tnn.Module):
  """A conditioning encoder (batch, L, 8) -> (batch, L, 8): a bidirectional LSTM whose
  weights are weight-normed, self-attention over its outputs, a Linear."""

  def __init__(self, features: int = 8, hidden: int = 4, heads: int = 2):
    super().__init__()
    self.lstm = tnn.LSTM(features, hidden, batch_first=True, bidirectional=True)
    for name in ("weight_ih_l0", "weight_hh_l0", "weight_ih_l0_reverse", "weight_hh_l0_reverse"):
      parametrizations.weight_norm(self.lstm, name)  # keys lstm.parametrizations.weight_ih_l0...
    self.attn = tnn.MultiheadAttention(2 * hidden, heads, batch_first=True)  # in_proj_weight
    self.proj = tnn.Linear(2 * hidden, features)

  def forward(self, x):
    h = self.lstm(x)[0]
    return self.proj(h + self.attn(h, h, h, need_weights=False)[0])


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


class FlaxEncoder(nn.Module):
  """PyTorch's per-row weight norm of the packed LSTM weights is a weight norm of each gate's
  Dense; its packed q, k, v rows are the attention's query, key and value kernels."""

  hidden: int = 4
  heads: int = 2

  def setup(self):
    cell = lambda: flaxnorm.weight_norm(nn.LSTMCell(self.hidden), recursive=True)
    self.lstm = nn.Bidirectional(nn.RNN(cell()), nn.RNN(cell()))  # lstm.l0, lstm.l0_reverse
    self.attn = nn.MultiHeadDotProductAttention(num_heads=self.heads)
    self.proj = nn.Dense(8)

  def __call__(self, x):
    h = self.lstm(x)
    return self.proj(h + self.attn(h))


# --------------------------------------------------------------------------- #
# Conversion.
# --------------------------------------------------------------------------- #


def load_generator(state_dict, length: int = 16) -> interop.TorchLoadResult:
  """Flax variables for FlaxGenerator from a TorchGenerator state dict."""
  # The model is traced shape-only: it tells the ConvTranspose from a Conv; values all come
  # from the checkpoint.
  return interop.load_torch_state_dict(
    state_dict, FlaxGenerator(), inputs=jnp.zeros((1, length, 8))
  )


def load_discriminator(state_dict, length: int = 32) -> interop.TorchLoadResult:
  """Flax variables for FlaxDiscriminator from a TorchDiscriminator state dict."""
  shapes = jax.eval_shape(FlaxDiscriminator().init, jax.random.key(0), jnp.zeros((1, length, 1)))
  return interop.load_torch_state_dict(state_dict, shapes, None)


def ncl_to_nlc(x: torch.Tensor) -> np.ndarray:
  return np.moveaxis(x.detach().numpy(), 1, -1)


# --------------------------------------------------------------------------- #
# A whole model, trained in PyTorch and ported in one call. Layout: PyTorch
# NCL, Flax NLC; the Flax names differ from PyTorch's, so a key map is needed.
# --------------------------------------------------------------------------- #

STEPS, BATCH, LENGTH, LR, SEED = 300, 16, 64, 3e-3, 0


class TorchVocoder(tnn.Module):
  """(batch, 2, L) -> (batch, 1, 2 L): conv_pre, one TorchGenerator block, conv_post."""

  def __init__(self):
    super().__init__()
    self.conv_pre = parametrizations.weight_norm(tnn.Conv1d(2, 8, 7, padding=3))
    self.block = TorchGenerator(channels=8)
    self.conv_post = _legacy(torch.nn.utils.weight_norm, tnn.Conv1d(4, 1, 7, padding=3))

  def forward(self, x):
    return self.conv_post(F.leaky_relu(self.block(self.conv_pre(x)), SLOPE))


class FlaxVocoder(nn.Module):
  @nn.compact
  def __call__(self, x):  # (batch, L, 2) -> (batch, 2 L, 1)
    x = flaxnorm.weight_norm(nn.Conv)(8, (7,), padding=[(3, 3)], name="pre")(x)
    x = FlaxGenerator(channels=8, name="stage")(x)  # (batch, 2 L, 4)
    return flaxnorm.weight_norm(nn.Conv)(1, (7,), padding=[(3, 3)], name="post")(
      nn.leaky_relu(x, SLOPE)
    )


# PyTorch module prefix -> Flax path; below a prefix, the Flax tree decides ("convs.0" -> "convs_0").
KEY_MAP = {"conv_pre": "pre", "block": "stage", "conv_post": "post"}


def make_batch(rng: np.random.Generator, batch: int, length: int):
  """Conditioning (batch, 2, length) and target (batch, 1, 2 length), NCL, float32."""
  freq = rng.uniform(0.02, 0.06, (batch, 1))  # cycles per output sample
  phase = rng.uniform(0, 2 * np.pi, (batch, 1)) + 2 * np.pi * freq * np.arange(2 * length)
  target = 0.6 * np.sin(phase) + 0.3 * np.sin(2 * phase)
  cond = np.stack([np.cos(phase[:, ::2]), np.sin(phase[:, ::2])], axis=1)  # every 2nd sample
  return cond.astype(np.float32), target[:, None].astype(np.float32)


def train_torch(model: TorchVocoder, rng: np.random.Generator, steps: int) -> list[float]:
  opt = torch.optim.Adam(model.parameters(), lr=LR)
  losses = []
  bar = tqdm(range(steps), desc="PyTorch")
  for _ in bar:
    cond, target = map(torch.from_numpy, make_batch(rng, BATCH, LENGTH))
    loss = F.mse_loss(model(cond), target)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
    bar.set_postfix(loss=f"{losses[-1]:.2e}", refresh=False)
  return losses


def train_jax(variables, rng: np.random.Generator, steps: int) -> tuple[dict, list[float]]:
  model = FlaxVocoder()
  tx = optax.adam(LR)  # a new Adam: its moments are not in the checkpoint
  params = variables["params"]
  opt_state = tx.init(params)

  def loss_fn(params, cond, target):
    return jnp.mean((model.apply({"params": params}, cond) - target) ** 2)

  @jax.jit
  def train_step(params, opt_state, cond, target):
    loss, grads = jax.value_and_grad(loss_fn)(params, cond, target)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  bar = tqdm(range(steps), desc="JAX")
  for _ in bar:
    cond, target = (np.moveaxis(a, 1, -1) for a in make_batch(rng, BATCH, LENGTH))  # NCL -> NLC
    params, opt_state, loss = train_step(params, opt_state, cond, target)
    losses.append(float(loss))
    bar.set_postfix(loss=f"{losses[-1]:.2e}", refresh=False)
  return {"params": params}, losses


def plot(path: str, cond, target, y_torch, y_flax, losses: tuple[list, list]) -> None:
  fig = Figure(figsize=(10, 3.5), layout="constrained")
  ax_out, ax_loss = fig.subplots(1, 2, width_ratios=(1.6, 1))
  t = np.arange(len(target))
  ax_out.plot(t, target, c="0.7", lw=4, label="target")
  ax_out.plot(t, y_torch, c="tab:orange", lw=2, label="PyTorch")
  ax_out.plot(t, y_flax, "--", c="tab:blue", lw=1.5, label="Flax (ported)")
  ax_out.plot(t[::2], cond, ".", c="k", ms=3, label="conditioning (cos)")
  diff = np.abs(y_flax - y_torch).max()
  ax_out.set_title(f"one clip after porting: max |Flax - PyTorch| = {diff:.1e}")
  ax_out.set_xlabel("sample")
  ax_out.legend(fontsize=8, ncol=4, loc="lower center")
  n = len(losses[0])
  ax_loss.plot(np.arange(1, n + 1), losses[0], c="tab:orange", label="PyTorch")
  ax_loss.plot(np.arange(n + 1, n + len(losses[1]) + 1), losses[1], c="tab:blue", label="JAX")
  ax_loss.set_yscale("log")
  ax_loss.set_xlabel("step")
  ax_loss.set_title("training loss (MSE)")
  ax_loss.legend()
  fig.savefig(path, dpi=80)


def port_and_train(steps: int, out: str) -> dict[str, float]:
  """Trains TorchVocoder, ports it, trains on in JAX, writes it back; returns the max differences."""
  torch.manual_seed(SEED)
  rng = np.random.default_rng(SEED)
  torch_model = TorchVocoder()
  torch_losses = train_torch(torch_model, rng, steps)
  torch_model.eval()

  # One call loads the model: kinds and axes come from the Flax model, every value from the
  # checkpoint.
  x = jnp.zeros((1, LENGTH, 2))
  result = interop.load_torch_state_dict(torch_model.state_dict(), FlaxVocoder(), KEY_MAP, inputs=x)
  print("layers:", {p: (lay.path, lay.style, lay.axis) for p, lay in result.layers.items()})

  cond, target = make_batch(np.random.default_rng(SEED + 1), 1, 4 * LENGTH)  # a longer clip
  apply = jax.jit(FlaxVocoder().apply)
  with torch.no_grad():
    y_torch = torch_model(torch.from_numpy(cond)).numpy()  # (1, 1, 8 LENGTH)
  y_flax = np.asarray(apply(result.variables, np.moveaxis(cond, 1, -1)))  # (1, 8 LENGTH, 1)
  diffs = {"ported model output": float(np.abs(np.moveaxis(y_flax, -1, 1) - y_torch).max())}

  variables, jax_losses = train_jax(result.variables, rng, steps)
  # Back to PyTorch: the same keys and styles the checkpoint had.
  torch_model.load_state_dict(interop.to_torch_state_dict(variables, result.layers), strict=True)
  with torch.no_grad():
    y_back = torch_model(torch.from_numpy(cond)).numpy()
  y_jax = np.asarray(apply(variables, np.moveaxis(cond, 1, -1)))
  diffs["JAX-trained model back in PyTorch"] = float(
    np.abs(np.moveaxis(y_jax, -1, 1) - y_back).max()
  )
  print(f"loss: PyTorch last step {torch_losses[-1]:.2e}, JAX last step {jax_losses[-1]:.2e}")

  plot(
    os.path.join(out, "torch_interop.png"),
    cond[0, 0],
    target[0, 0],
    y_torch[0, 0],
    y_flax[0, :, 0],
    (torch_losses, jax_losses),
  )
  return diffs


def check_parity(seed: int = 0, verbose: bool = False) -> dict[str, float]:
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
  encoder = TorchEncoder().eval()
  frames = torch.randn(2, 6, 8)
  # The LSTM's gates split into the cells' Dense layers (its two biases summed), and the
  # attention's packed q, k, v into query, key and value: one call, no key map.
  e = interop.load_torch_state_dict(encoder.state_dict(), FlaxEncoder(), inputs=frames.numpy())
  with torch.no_grad():
    e_torch = encoder(frames).numpy()
  e_flax = jax.jit(FlaxEncoder().apply)(e.variables, frames.numpy())
  mel = torch.randn(2, 8, 16)
  with torch.no_grad():
    g_torch, d_torch = gen(mel), disc(audio)
  g_flax = jax.jit(FlaxGenerator().apply)(g.variables, ncl_to_nlc(mel))
  d_flax = jax.jit(FlaxDiscriminator().apply)(d.variables, ncl_to_nlc(audio))  # eval: stored u, v
  diffs = {
    "generator output": float(np.abs(np.asarray(g_flax) - ncl_to_nlc(g_torch)).max()),
    "discriminator output": float(np.abs(np.asarray(d_flax) - ncl_to_nlc(d_torch)).max()),
    "encoder output (LSTM, attention)": float(np.abs(np.asarray(e_flax) - e_torch).max()),
  }

  # Removing weight norm on both sides gives the same plain weights.
  plain = jax.jit(flaxnorm.remove_weight_norm)(g.variables)
  _legacy(torch.nn.utils.remove_weight_norm, gen.up)
  for conv in gen.convs:
    torch.nn.utils.parametrize.remove_parametrizations(conv, "weight")
  torch_plain = interop.load_torch_state_dict(
    # Variables without a model: kinds names every layer (square convs fit both layouts).
    gen.state_dict(),
    plain,
    None,
    kinds={"": "conv1d", "up": "conv_transpose1d"},
  ).variables
  diffs["weights after remove_weight_norm"] = max(
    float(np.abs(np.asarray(a) - np.asarray(b)).max())
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(torch_plain))
  )

  # Round trip: PyTorch -> flaxnorm -> PyTorch reproduces every tensor.
  round_trip = 0.0
  for result, sd in ((g, ckpt["generator"]), (d, ckpt["discriminator"])):
    back = interop.to_torch_state_dict(result.variables, result.layers)
    assert set(back) == set(sd), sorted(set(back) ^ set(sd))
    round_trip = max(round_trip, max(float((back[k] - sd[k]).abs().max()) for k in sd))
  diffs["round trip"] = round_trip
  # The encoder's LSTM biases come back summed on one side (PyTorch adds the two), so its
  # round trip is checked on the outputs: the written state dict loads strictly.
  encoder.load_state_dict(interop.to_torch_state_dict(e.variables, e.layers), strict=True)
  with torch.no_grad():
    diffs["encoder round trip (outputs)"] = float(np.abs(encoder(frames).numpy() - e_torch).max())

  if verbose:
    for what, diff in diffs.items():
      print(f"max |flax - torch| {what:>34}: {diff:.3g}")
  return diffs


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=STEPS, help="steps in PyTorch, then in JAX")
  parser.add_argument("--out", default="out/torch_interop", help="directory for the PNG")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  start = time.perf_counter()
  diffs = port_and_train(args.steps, args.out)
  diffs.update(check_parity())
  for what, diff in diffs.items():
    print(f"max |flax - torch| {what:>34}: {diff:.3g}")
  print(f"wrote torch_interop.png to {args.out}  [{time.perf_counter() - start:.1f} s]")
  if max(diffs.values()) > 1e-4:
    print("FAILED: the frameworks disagree by more than 1e-4", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
