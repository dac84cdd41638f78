"""Real architectures, ported from PyTorch in one call.

Small configurations of three published models, re-typed here in both
frameworks: a HiFi-GAN generator (ResBlock1 and ResBlock2, weight-normed
ConvTranspose1d upsamplers, ``remove_weight_norm`` for inference), Wav2Vec2's
positional conv embedding (``weight_norm(..., dim=2)`` on a grouped Conv1d) and
an SN-GAN projection discriminator (spectral-normed Conv2d, Linear and
Embedding, both PyTorch key styles, a square 1x1 shortcut); and PyTorch's own
``nn.TransformerEncoder`` into a Flax encoder whose layers are one ``nn.scan``.
Each is trained a few steps in PyTorch, then loaded with
``load_torch_state_dict`` from the Flax model alone (no ``kinds``, ``axes`` or
``key_map``) and compared.
"""

from __future__ import annotations

import copy
import warnings

import chex
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxnorm
import flaxnorm.nnx as fnnx
from flaxnorm import interop

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

TOL = 1e-5


def legacy(fn, module, **kwargs):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # the legacy hooks are deprecated
    return fn(module, **kwargs)


def train(model, loss_fn, steps=3):
  """A few Adam steps in PyTorch (train mode: spectral norms update their u, v)."""
  torch.manual_seed(1)
  opt = torch.optim.Adam(model.parameters(), lr=1e-2)
  for _ in range(steps):
    opt.zero_grad()
    loss_fn().backward()
    opt.step()


def ncl(x):
  """Flax NLC (or NHWC) -> PyTorch NCL (or NCHW)."""
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


def nlc(y):
  return np.moveaxis(y.detach().numpy(), 1, -1)


# --------------------------------------------------------------------------- #
# HiFi-GAN generator (Kong et al., 2020).
# --------------------------------------------------------------------------- #

SLOPE = 0.1
GEN = {"mels": 8, "ch": 16, "rates": (2, 2), "up_k": (4, 4), "rb_k": (3, 5)}
RB_TYPE = {3: "1", 5: "2"}  # ResBlock1 for kernel 3, ResBlock2 for kernel 5 (both kinds covered)
RB_DIL = {"1": (1, 3, 5), "2": (1, 3)}


def pad(k, d=1):
  return (k * d - d) // 2


class TorchResBlock1(tnn.Module):
  def __init__(self, ch, k, dil):
    super().__init__()
    wn = tnn.utils.weight_norm
    self.convs1 = tnn.ModuleList(
      [legacy(wn, tnn.Conv1d(ch, ch, k, dilation=d, padding=pad(k, d))) for d in dil]
    )
    self.convs2 = tnn.ModuleList([legacy(wn, tnn.Conv1d(ch, ch, k, padding=pad(k))) for _ in dil])

  def forward(self, x):
    for c1, c2 in zip(self.convs1, self.convs2):
      x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, SLOPE)), SLOPE))
    return x


class TorchResBlock2(tnn.Module):
  def __init__(self, ch, k, dil):
    super().__init__()
    wn = tnn.utils.weight_norm
    self.convs = tnn.ModuleList(
      [legacy(wn, tnn.Conv1d(ch, ch, k, dilation=d, padding=pad(k, d))) for d in dil]
    )

  def forward(self, x):
    for c in self.convs:
      x = x + c(F.leaky_relu(x, SLOPE))
    return x


class TorchGenerator(tnn.Module):
  def __init__(self):
    super().__init__()
    wn, c = tnn.utils.weight_norm, GEN["ch"]
    # conv_pre in the parametrizations style, the rest legacy: both key styles in one model.
    self.conv_pre = tnn.utils.parametrizations.weight_norm(tnn.Conv1d(GEN["mels"], c, 7, padding=3))
    self.ups = tnn.ModuleList()
    self.resblocks = tnn.ModuleList()
    for i, (u, k) in enumerate(zip(GEN["rates"], GEN["up_k"])):
      up = tnn.ConvTranspose1d(c // 2**i, c // 2 ** (i + 1), k, u, padding=(k - u) // 2)
      self.ups.append(legacy(wn, up))
      for rk in GEN["rb_k"]:
        block = TorchResBlock1 if RB_TYPE[rk] == "1" else TorchResBlock2
        self.resblocks.append(block(c // 2 ** (i + 1), rk, RB_DIL[RB_TYPE[rk]]))
    self.conv_post = legacy(wn, tnn.Conv1d(c // 2 ** len(GEN["rates"]), 1, 7, padding=3))

  def forward(self, x):
    x = self.conv_pre(x)
    nk = len(GEN["rb_k"])
    for i, up in enumerate(self.ups):
      x = up(F.leaky_relu(x, SLOPE))
      x = sum(self.resblocks[i * nk + j](x) for j in range(nk)) / nk
    return torch.tanh(self.conv_post(F.leaky_relu(x)))

  def remove_weight_norm(self):
    for m in self.modules():
      if hasattr(m, "weight_g"):
        tnn.utils.remove_weight_norm(m)
    tnn.utils.parametrize.remove_parametrizations(self.conv_pre, "weight")


def wn_conv(ch, k, d=1, normed=True):
  conv = nn.Conv(ch, (k,), kernel_dilation=(d,), padding=[(pad(k, d), pad(k, d))])
  return flaxnorm.weight_norm(conv) if normed else conv


class FlaxResBlock1(nn.Module):
  ch: int
  k: int
  dil: tuple[int, ...]
  normed: bool = True

  def setup(self):
    self.convs1 = [wn_conv(self.ch, self.k, d, self.normed) for d in self.dil]
    self.convs2 = [wn_conv(self.ch, self.k, 1, self.normed) for _ in self.dil]

  def __call__(self, x):
    for c1, c2 in zip(self.convs1, self.convs2):
      x = x + c2(nn.leaky_relu(c1(nn.leaky_relu(x, SLOPE)), SLOPE))
    return x


class FlaxResBlock2(nn.Module):
  ch: int
  k: int
  dil: tuple[int, ...]
  normed: bool = True

  def setup(self):
    self.convs = [wn_conv(self.ch, self.k, d, self.normed) for d in self.dil]

  def __call__(self, x):
    for c in self.convs:
      x = x + c(nn.leaky_relu(x, SLOPE))
    return x


class FlaxGenerator(nn.Module):
  normed: bool = True

  def setup(self):
    c, ups, blocks = GEN["ch"], [], []
    for i, (u, k) in enumerate(zip(GEN["rates"], GEN["up_k"])):
      padding = interop.conv_transpose_padding(k, (k - u) // 2)
      up = nn.ConvTranspose(c // 2 ** (i + 1), (k,), strides=(u,), padding=padding)
      # PyTorch's dim=0 on a ConvTranspose weight (in, out, k) keeps the input channels.
      ups.append(flaxnorm.weight_norm(up, axis=-2) if self.normed else up)
      for rk in GEN["rb_k"]:
        block = FlaxResBlock1 if RB_TYPE[rk] == "1" else FlaxResBlock2
        blocks.append(block(c // 2 ** (i + 1), rk, RB_DIL[RB_TYPE[rk]], self.normed))
    self.conv_pre = wn_conv(c, 7, normed=self.normed)
    self.ups, self.resblocks = ups, blocks
    self.conv_post = wn_conv(1, 7, normed=self.normed)

  def __call__(self, x):
    x = self.conv_pre(x)
    nk = len(GEN["rb_k"])
    for i, up in enumerate(self.ups):
      x = up(nn.leaky_relu(x, SLOPE))
      x = sum(self.resblocks[i * nk + j](x) for j in range(nk)) / nk
    return jnp.tanh(self.conv_post(nn.leaky_relu(x, 0.01)))


def test_hifigan_generator():
  torch.manual_seed(0)
  gen = TorchGenerator()
  x = np.random.default_rng(0).normal(size=(2, 6, GEN["mels"])).astype(np.float32)
  target = torch.randn(2, 1, 24)
  train(gen, lambda: F.l1_loss(gen(ncl(x)), target))
  result = interop.load_torch_state_dict(gen.state_dict(), FlaxGenerator(), inputs=jnp.asarray(x))
  assert result.layers["ups.1"].axis == -2 and result.layers["ups.1"].kind == "conv_transpose1d"
  assert result.layers["resblocks.1.convs.1"].path == "resblocks_1/convs_1"
  assert result.layers["conv_pre"].style == "parametrizations"
  with torch.no_grad():
    expected = nlc(gen(ncl(x)))
  got = FlaxGenerator().apply(result.variables, x)
  chex.assert_trees_all_close(got, expected, atol=TOL)
  # Inference: fold the norms on both sides; the folded weights agree.
  folded = flaxnorm.remove_weight_norm(result.variables)
  plain_gen = copy.deepcopy(gen)
  plain_gen.remove_weight_norm()
  plain = interop.load_torch_state_dict(
    plain_gen.state_dict(), FlaxGenerator(normed=False), inputs=jnp.asarray(x)
  )
  assert all(layer.method is None for layer in plain.layers.values())
  chex.assert_trees_all_close(folded, plain.variables, atol=1e-6)


# --------------------------------------------------------------------------- #
# Wav2Vec2's positional conv embedding (Baevski et al., 2020).
# --------------------------------------------------------------------------- #

HID, GROUPS, POS_K = 32, 16, 4


class TorchPosConv(tnn.Module):
  def __init__(self):
    super().__init__()
    conv = tnn.Conv1d(HID, HID, POS_K, padding=POS_K // 2, groups=GROUPS)
    self.conv = tnn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)

  def forward(self, h):  # (batch, time, hidden)
    y = self.conv(h.transpose(1, 2))[:, :, :-1]  # an even kernel: drop the extra step
    return F.gelu(y).transpose(1, 2)


class LinenPosConv(nn.Module):
  @nn.compact
  def __call__(self, h):
    conv = nn.Conv(HID, (POS_K,), padding=[(POS_K // 2,) * 2], feature_group_count=GROUPS)
    # PyTorch's dim=2 of the weight (out, in/groups, k) is the kernel axis: Flax's -3.
    y = flaxnorm.weight_norm(conv, axis=-3, name="kernel")(h)
    return nn.gelu(y[:, :-1], approximate=False)


class NnxPosConv(nnx.Module):
  def __init__(self, rngs):
    conv = nnx.Conv(
      HID, HID, (POS_K,), padding=[(POS_K // 2,) * 2], feature_group_count=GROUPS, rngs=rngs
    )
    self.conv = fnnx.weight_norm(conv, axis=-3)

  def __call__(self, h):
    return nnx.gelu(self.conv(h)[:, :-1], approximate=False)


def test_wav2vec2_positional_conv_linen_and_nnx():
  torch.manual_seed(0)
  pos = TorchPosConv()
  h = np.random.default_rng(1).normal(size=(2, 7, HID)).astype(np.float32)
  train(pos, lambda: pos(torch.from_numpy(h)).square().mean())
  sd = pos.state_dict()
  with torch.no_grad():
    expected = pos(torch.from_numpy(h)).numpy()
  linen = interop.load_torch_state_dict(sd, LinenPosConv(), {"conv": "Conv_0"}, inputs=h)
  assert linen.layers["conv"].axis == -3
  chex.assert_trees_all_close(LinenPosConv().apply(linen.variables, h), expected, atol=TOL)
  model = NnxPosConv(nnx.Rngs(0))
  res = interop.load_torch_state_dict(sd, model)  # "conv" is the NNX attribute's name
  assert res.layers["conv"].path == "conv"
  nnx.update(model, res.variables)
  chex.assert_trees_all_close(model(jnp.asarray(h)), expected, atol=TOL)
  back = interop.to_torch_state_dict(model, res.layers)
  assert set(back) == set(sd)
  assert set(interop.to_torch_state_dict(model)) == set(sd)  # layers read from the NNX model
  for key, x in sd.items():
    np.testing.assert_array_equal(back[key].numpy(), x.numpy())


# --------------------------------------------------------------------------- #
# SN-GAN projection discriminator (Miyato & Koyama, 2018).
# --------------------------------------------------------------------------- #

SN_CH, N_CLASSES = 16, 5
# Key style per layer: block1 and the linear head legacy, block2 (its square 1x1 shortcut
# 16 -> 16 included) and the class embedding parametrizations.
STYLE = {
  "block1": "legacy",
  "block2": "parametrizations",
  "l_y": "legacy",
  "embed": "parametrizations",
}


def sn(module, style):
  utils = tnn.utils
  if style == "legacy":
    return legacy(utils.spectral_norm, module)
  return utils.parametrizations.spectral_norm(module)


class TorchDBlock(tnn.Module):
  def __init__(self, cin, cout, style, first):
    super().__init__()
    self.first = first
    self.c1 = sn(tnn.Conv2d(cin, cout, 3, padding=1), style)
    self.c2 = sn(tnn.Conv2d(cout, cout, 3, padding=1), style)
    self.c_sc = sn(tnn.Conv2d(cin, cout, 1), style)

  def forward(self, x):
    h = self.c1(x if self.first else F.relu(x))
    h = F.avg_pool2d(self.c2(F.relu(h)), 2)
    sc = self.c_sc(F.avg_pool2d(x, 2)) if self.first else F.avg_pool2d(self.c_sc(x), 2)
    return h + sc


class TorchDiscriminator(tnn.Module):
  def __init__(self):
    super().__init__()
    self.block1 = TorchDBlock(3, SN_CH, STYLE["block1"], True)
    self.block2 = TorchDBlock(SN_CH, SN_CH, STYLE["block2"], False)
    self.l_y = sn(tnn.Linear(SN_CH, 1), STYLE["l_y"])
    self.embed = sn(tnn.Embedding(N_CLASSES, SN_CH), STYLE["embed"])

  def forward(self, x, y):
    h = F.relu(self.block2(self.block1(x))).sum(dim=(2, 3))
    return self.l_y(h)[:, 0] + (self.embed(y) * h).sum(dim=1)


def sn_axis(kind, style):
  """The flaxnorm axis that continues PyTorch's power iteration (the porting guide's table)."""
  return {
    ("conv", "legacy"): -1,
    ("conv", "parametrizations"): (-4, -3, -2),
    ("linear", "legacy"): -1,
    ("embedding", "parametrizations"): -1,
  }[kind, style]


def avg_pool(x):
  return nn.avg_pool(x, (2, 2), (2, 2))


class FlaxDBlock(nn.Module):
  cout: int
  style: str
  first: bool

  def setup(self):
    axis = sn_axis("conv", self.style)
    self.c1 = flaxnorm.spectral_norm(nn.Conv(self.cout, (3, 3), padding=1), axis=axis)
    self.c2 = flaxnorm.spectral_norm(nn.Conv(self.cout, (3, 3), padding=1), axis=axis)
    self.c_sc = flaxnorm.spectral_norm(nn.Conv(self.cout, (1, 1)), axis=axis)

  def __call__(self, x):
    h = self.c1(x if self.first else nn.relu(x))
    h = avg_pool(self.c2(nn.relu(h)))
    return h + (self.c_sc(avg_pool(x)) if self.first else avg_pool(self.c_sc(x)))


class FlaxDiscriminator(nn.Module):
  embed_axis: int = sn_axis("embedding", STYLE["embed"])

  def setup(self):
    self.block1 = FlaxDBlock(SN_CH, STYLE["block1"], True)
    self.block2 = FlaxDBlock(SN_CH, STYLE["block2"], False)
    self.l_y = flaxnorm.spectral_norm(nn.Dense(1), axis=sn_axis("linear", STYLE["l_y"]))
    embed = nn.Embed(N_CLASSES, SN_CH)
    self.embed = flaxnorm.spectral_norm(embed, name="embedding", axis=self.embed_axis)

  def __call__(self, x, y):
    h = nn.relu(self.block2(self.block1(x))).sum(axis=(1, 2))
    return self.l_y(h)[:, 0] + (self.embed(y) * h).sum(axis=1)


def sn_state(module):
  """``{prefix.key: array}`` of every spectral-norm u/v buffer in a PyTorch module."""
  return {
    k: v.numpy().copy()
    for k, v in module.state_dict().items()
    if k.endswith(("weight_u", "weight_v", "0._u", "0._v")) and "_g" not in k
  }


def test_sngan_projection_discriminator_continues_pytorch():
  torch.manual_seed(0)
  disc = TorchDiscriminator()
  rng = np.random.default_rng(2)
  x = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
  y = rng.integers(0, N_CLASSES, size=4)
  train(disc, lambda: F.relu(1.0 - disc(ncl(x), torch.from_numpy(y))).mean())
  disc.eval()
  with torch.no_grad():
    expected = disc(ncl(x), torch.from_numpy(y)).numpy()
  result = interop.load_torch_state_dict(disc.state_dict(), FlaxDiscriminator(), inputs=(x, y))
  # The square 1x1 shortcut (u, v both of size 16) needs no axes=: the model knows its axis.
  assert result.layers["block2.c_sc"].axis == (-4, -3, -2)
  assert all(layer.continues == layer.style for layer in result.layers.values())
  assert result.layers["embed"].kind == "embedding"
  model = FlaxDiscriminator()
  chex.assert_trees_all_close(model.apply(result.variables, x, y), expected, atol=TOL)
  # One more training-mode step on both sides: the power iterations continue alike.
  disc.train()
  with torch.no_grad():
    disc(ncl(x), torch.from_numpy(y))
  _, updated = model.apply(result.variables, x, y, mutable=["spectral"])
  variables = {**result.variables, **updated}
  back = interop.to_torch_state_dict(variables, result.layers)
  # Without the layers, from the model: each spectral layer gets the style its axis continues.
  from_model = interop.to_torch_state_dict(variables, model=model, inputs=(x, y))
  assert set(from_model) == set(disc.state_dict())
  torch_state = sn_state(disc)
  assert len(torch_state) == 2 * 8
  for key, value in torch_state.items():
    np.testing.assert_allclose(back[key].numpy(), value, atol=1e-5, err_msg=key)
  # sigma = u^T W v of the new vectors, as PyTorch's next evaluation computes it.
  w = disc.embed.parametrizations.weight.original.detach()
  sn_mod = disc.embed.parametrizations.weight[0]
  torch_sigma = float(sn_mod._u @ w @ sn_mod._v)
  np.testing.assert_allclose(
    variables["spectral"]["embed"]["embedding_sigma"], torch_sigma, rtol=1e-5
  )


def test_sngan_wrong_iteration_order_is_refused():
  """The embedding wrapped with the legacy order's axis, loaded from a parametrizations checkpoint."""
  torch.manual_seed(0)
  sd = TorchDiscriminator().state_dict()
  x, y = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32)
  wrong = FlaxDiscriminator(embed_axis=-2)
  with pytest.raises(ValueError, match=r"layer 'embed' -> 'params/embed'.*Wrap it with axis=-1"):
    interop.load_torch_state_dict(sd, wrong, inputs=(x, y))
  with pytest.warns(UserWarning, match=r"'embed'.*evaluation is the same"):
    res = interop.load_torch_state_dict(sd, wrong, inputs=(x, y), strict=False)
  assert (
    res.layers["embed"].continues == "legacy" and res.layers["embed"].style == "parametrizations"
  )
  assert "continues legacy" in res.summary().splitlines()[-1]


def test_sngan_head_nnx():
  """The NNX face: spectral state in SpectralStateVar, continued in PyTorch's order."""

  class Head(nnx.Module):
    def __init__(self, rngs):
      self.l_y = fnnx.spectral_norm(nnx.Linear(SN_CH, 1, rngs=rngs), rngs=rngs)
      self.embed = fnnx.spectral_norm(
        nnx.Embed(N_CLASSES, SN_CH, rngs=rngs), name="embedding", axis=-1, rngs=rngs
      )

  torch.manual_seed(0)
  disc = TorchDiscriminator()
  sd = {k: v for k, v in disc.state_dict().items() if k.startswith(("l_y.", "embed."))}
  head = Head(nnx.Rngs(0))
  res = interop.load_torch_state_dict(sd, head)
  nnx.update(head, res.variables)
  np.testing.assert_array_equal(
    head.embed.embedding_v[...], sd["embed.parametrizations.weight.0._u"]
  )
  np.testing.assert_array_equal(head.l_y.kernel_u[...], sd["l_y.weight_u"])


# --------------------------------------------------------------------------- #
# PyTorch's own nn.TransformerEncoder, into a Flax encoder whose layers are one nn.scan.
# --------------------------------------------------------------------------- #


class _EncoderLayer(nn.Module):
  """nn.TransformerEncoderLayer (post-norm, ReLU), as Flax modules of PyTorch's names."""

  heads: int
  hidden: int

  @nn.compact
  def __call__(self, x, _):
    e = x.shape[-1]
    x = nn.LayerNorm(epsilon=1e-5, name="norm1")(
      x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="self_attn")(x)
    )
    h = nn.Dense(e, name="linear2")(nn.relu(nn.Dense(self.hidden, name="linear1")(x)))
    return nn.LayerNorm(epsilon=1e-5, name="norm2")(x + h), None


class _Encoder(nn.Module):
  depth: int = 3

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(
      _EncoderLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.depth
    )
    return stack(heads=2, hidden=16, name="layers")(x, None)[0]


def test_torch_transformer_encoder_into_a_scanned_flax_encoder():
  """Three trained nn.TransformerEncoderLayer (attention, LayerNorm, Linear) in one call, no
  key map: ``layers.2.self_attn.in_proj_weight`` is member 2 of the scanned ``self_attn``."""
  torch.manual_seed(0)
  layer = tnn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
  encoder = tnn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
  x = torch.randn(2, 5, 8)
  train(encoder, lambda: encoder(x).pow(2).mean())
  encoder.eval()
  with torch.no_grad():
    want = encoder(x).numpy()
  result = interop.load_torch_state_dict(encoder.state_dict(), _Encoder(), inputs=x.numpy())
  assert result.layers["layers.2.norm2"].member == 2
  chex.assert_trees_all_close(_Encoder().apply(result.variables, x.numpy()), want, atol=TOL)
  back = interop.to_torch_state_dict(result.variables, model=_Encoder(), inputs=x.numpy())
  encoder.load_state_dict(back, strict=True)
  with torch.no_grad():
    chex.assert_trees_all_close(encoder(x).numpy(), want, atol=TOL)


# --------------------------------------------------------------------------- #
# A spectral-norm checkpoint written before PyTorch 1.1.
# --------------------------------------------------------------------------- #


def test_pre_1_1_spectral_norm_checkpoint():
  """``weight_orig``, ``weight_u`` and the normalized ``weight``, no ``weight_v``: read as PyTorch does."""
  torch.manual_seed(0)
  # A tall weight (5, 3): W^T W is invertible, so PyTorch's pinverse is well conditioned.
  lin = legacy(tnn.utils.spectral_norm, tnn.Linear(3, 5))
  with torch.no_grad():
    lin(torch.randn(2, 3))  # one training step: u, v and the weight buffer are consistent
  old = {k: v for k, v in lin.state_dict().items() if k != "weight_v"}
  old["weight"] = lin.weight.detach().clone()  # written as a buffer before 1.1
  fresh = legacy(tnn.utils.spectral_norm, tnn.Linear(3, 5))
  fresh.load_state_dict(old)  # PyTorch recovers v from weight and u
  layer = interop.from_torch(old, "linear")
  assert layer.method == "spectral_norm" and layer.style == "legacy"
  back = interop.to_torch(layer.variables, "linear", "legacy")
  np.testing.assert_allclose(back["weight_v"].numpy(), fresh.weight_v.numpy(), rtol=1e-4, atol=1e-6)
  fresh.eval()
  with torch.no_grad():
    x = torch.randn(2, 3)
    expected = fresh(x).numpy()
  got = layer.wrap(nn.Dense(5)).apply(layer.variables, x.numpy())
  chex.assert_trees_all_close(got, expected, atol=TOL)
  with pytest.raises(ValueError, match=r"'weight' has shape \(5, 4\).*expected \(5, 3\)"):
    interop.from_torch({**old, "weight": torch.zeros(5, 4)}, "linear")
