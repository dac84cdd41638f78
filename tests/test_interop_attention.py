"""PyTorch nn.MultiheadAttention and Linear into Flax attention and DenseGeneral, with parity.

Flax's attention keeps query, key and value kernels ``(in, H, D)`` and an out
kernel ``(H, D, E)``; PyTorch packs q, k, v into ``in_proj_weight`` ``(3E, E)``.
Each parity test runs both on the same input, writes the Flax variables back
and loads them into PyTorch with ``strict=True``.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxnorm
import flaxnorm.nnx as fnnx
from flaxnorm import interop

E, HEADS, L, B = 8, 2, 5, 2
RNG = np.random.RandomState(0)
X = RNG.randn(B, L, E).astype(np.float32)
TOL = 2e-6


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


def _torch_mha(torch, seed=0, **kwargs):
  torch.manual_seed(seed)
  holder = torch.nn.Module()
  holder.attn = torch.nn.MultiheadAttention(E, HEADS, batch_first=True, **kwargs)
  return holder


def _run(torch, holder, *inputs):
  holder.eval()
  with torch.no_grad():
    ts = [torch.from_numpy(x) for x in inputs] if len(inputs) == 3 else [torch.from_numpy(X)] * 3
    return holder.attn(*ts, need_weights=False)[0].numpy()


class _Linen(nn.Module):
  use_bias: bool = True
  norm: str = ""  # "", "weight_norm"

  def setup(self):
    attn = nn.MultiHeadDotProductAttention(num_heads=HEADS, use_bias=self.use_bias)
    self.attn = flaxnorm.weight_norm(attn, recursive=True) if self.norm else attn

  def __call__(self, q, k=None, v=None):
    return self.attn(q, k, v)


class _Nnx(nnx.Module):
  def __init__(self, kdim=E, vdim=E):
    self.attn = nnx.MultiHeadAttention(
      HEADS, E, qkv_features=E, out_features=E, decode=False, rngs=nnx.Rngs(0)
    )
    if kdim != E or vdim != E:  # key and value of other input sizes
      self.attn.key = nnx.LinearGeneral(kdim, (HEADS, E // HEADS), rngs=nnx.Rngs(1))
      self.attn.value = nnx.LinearGeneral(vdim, (HEADS, E // HEADS), rngs=nnx.Rngs(2))

  def __call__(self, q, k=None, v=None):
    return self.attn(q, k, v)


def _round_trip(torch, holder, result, want):
  holder.load_state_dict(interop.to_torch_state_dict(result.variables, result.layers), strict=True)
  np.testing.assert_allclose(_run(torch, holder), want, atol=TOL)


@pytest.mark.parametrize("bias", [True, False])
def test_linen_attention_matches_torch_both_ways(torch, bias):
  t = _torch_mha(torch, bias=bias)
  want = _run(torch, t)
  result = interop.load_torch_state_dict(t.state_dict(), _Linen(use_bias=bias), inputs=X)
  assert result.layers["attn.in_proj_weight"].kind == "multihead_attention"
  assert result.layers["attn.out_proj"].path == "attn/out"
  assert result.layers["attn.out_proj"].in_axes == 2
  q = result.variables["params"]["attn"]["query"]["kernel"]
  np.testing.assert_array_equal(
    q, t.attn.in_proj_weight.detach().numpy()[:E].T.reshape(E, HEADS, -1)
  )
  np.testing.assert_allclose(_Linen(use_bias=bias).apply(result.variables, X), want, atol=TOL)
  _round_trip(torch, t, result, want)


def test_nnx_attention_matches_torch_and_saves_from_the_model(torch):
  t = _torch_mha(torch)
  want = _run(torch, t)
  model = _Nnx()
  result = interop.load_torch_state_dict(t.state_dict(), model)
  nnx.update(model, result.variables)
  np.testing.assert_allclose(model(jnp.asarray(X)), want, atol=TOL)
  _round_trip(torch, t, result, want)
  got = interop.to_torch_state_dict(model)  # read from the model, no layers
  assert sorted(got) == sorted(t.state_dict())
  chex.assert_trees_all_close(
    {k: x.numpy() for k, x in got.items()}, {k: x.numpy() for k, x in t.state_dict().items()}
  )


def test_other_key_and_value_sizes_use_separate_weights(torch):
  kdim, vdim = 6, 5
  t = _torch_mha(torch, kdim=kdim, vdim=vdim)
  k, v = RNG.randn(B, 3, kdim).astype(np.float32), RNG.randn(B, 3, vdim).astype(np.float32)
  want = _run(torch, t, X, k, v)
  model = _Nnx(kdim, vdim)
  result = interop.load_torch_state_dict(t.state_dict(), model)
  assert sorted(result.layers) == [
    "attn.k_proj_weight",
    "attn.out_proj",
    "attn.q_proj_weight",
    "attn.v_proj_weight",
  ]
  nnx.update(model, result.variables)
  np.testing.assert_allclose(model(*map(jnp.asarray, (X, k, v))), want, atol=TOL)
  back = interop.to_torch_state_dict(model)
  assert sorted(back) == sorted(t.state_dict())
  t.load_state_dict(back, strict=True)
  np.testing.assert_allclose(_run(torch, t, X, k, v), want, atol=TOL)


def test_weight_norm_per_row_into_per_part_weight_norm(torch):
  t = _torch_mha(torch)
  wn = torch.nn.utils.parametrizations.weight_norm
  wn(t.attn, "in_proj_weight")
  wn(t.attn.out_proj, "weight")
  with torch.no_grad():  # move g away from ||v|| so that the test sees g
    t.attn.parametrizations.in_proj_weight.original0.mul_(torch.linspace(0.5, 2, 3 * E)[:, None])
  want = _run(torch, t)
  model = _Linen(norm="weight_norm")
  result = interop.load_torch_state_dict(t.state_dict(), model, inputs=X)
  layer = result.layers["attn.in_proj_weight"]
  assert (layer.method, layer.axis) == ("weight_norm", (-2, -1))  # the kernel's output axes
  assert result.variables["params"]["attn"]["key"]["kernel_g"].shape == (1, HEADS, E // HEADS)
  np.testing.assert_allclose(model.apply(result.variables, X), want, atol=TOL)
  _round_trip(torch, t, result, want)
  # Saved from the model alone: the same keys.
  got = interop.to_torch_state_dict(result.variables, model=model, inputs=X)
  assert sorted(got) == sorted(t.state_dict())


def test_spectral_norm_on_out_proj(torch):
  """PyTorch's parametrized out_proj continues in flaxnorm's iteration on the input axes.

  (PyTorch's legacy hooks never recompute ``out_proj.weight``: MultiheadAttention
  reads the attribute without calling ``out_proj``.)
  """
  t = _torch_mha(torch)
  torch.nn.utils.parametrizations.spectral_norm(t.attn.out_proj)
  t.train()
  with torch.no_grad():
    t.attn(*[torch.from_numpy(X)] * 3)  # one power-iteration step
  want = _run(torch, t)
  model = _Nnx()
  out_layers = nnx.All(nnx.PathContains("out"), nnx.LinearGeneral)
  fnnx.wrap_modules(model, fnnx.spectral_norm, where=out_layers, axis=(-3, -2))
  result = interop.load_torch_state_dict(t.state_dict(), model)
  assert result.layers["attn.out_proj"].continues == "parametrizations"
  nnx.update(model, result.variables)
  model.eval()
  np.testing.assert_allclose(model(jnp.asarray(X)), want, atol=TOL)
  _round_trip(torch, t, result, want)


def test_packed_spectral_norm_and_bias_kv_are_refused(torch):
  t = _torch_mha(torch)
  torch.nn.utils.parametrizations.spectral_norm(t.attn, "in_proj_weight")
  model = _Nnx()
  fnnx.wrap_modules(model, fnnx.spectral_norm, where=nnx.LinearGeneral)
  with pytest.raises(ValueError, match=r"divides q, k and v by one sigma of the packed"):
    interop.load_torch_state_dict(t.state_dict(), model)
  t = _torch_mha(torch, add_bias_kv=True)
  with pytest.raises(ValueError, match=r"'attn.bias_k'/'bias_v' \(add_bias_kv=True\)"):
    interop.load_torch_state_dict(t.state_dict(), _Nnx())


# --------------------------------------------------------------------------- #
# Without torch: numpy state dicts.
# --------------------------------------------------------------------------- #


def test_attention_key_map_and_wrong_module():
  variables = _Linen().init(jax.random.key(0), X)
  sd = {
    "enc.self_attn.in_proj_weight": RNG.randn(3 * E, E).astype(np.float32),
    "enc.self_attn.in_proj_bias": RNG.randn(3 * E).astype(np.float32),
    "enc.self_attn.out_proj.weight": RNG.randn(E, E).astype(np.float32),
    "enc.self_attn.out_proj.bias": RNG.randn(E).astype(np.float32),
  }
  result = interop.load_torch_state_dict(sd, variables, {"enc.self_attn": "attn"})
  np.testing.assert_array_equal(
    result.variables["params"]["attn"]["value"]["bias"],
    sd["enc.self_attn.in_proj_bias"][2 * E :].reshape(HEADS, -1),
  )
  np.testing.assert_array_equal(
    result.variables["params"]["attn"]["out"]["kernel"],
    sd["enc.self_attn.out_proj.weight"].T.reshape(HEADS, -1, E),
  )
  with pytest.raises(
    ValueError, match=r"'enc.self_attn' -> 'params/attn/query': an nn.MultiheadAttention"
  ):
    interop.load_torch_state_dict(sd, variables, {"enc.self_attn": "attn/query"})


class _General(nn.Module):
  features: tuple[int, ...]
  axis: int | tuple[int, ...] = (-2, -1)

  @nn.compact
  def __call__(self, x):
    return flaxnorm.weight_norm(nn.DenseGeneral(self.features, name="proj"), axis=self.axis)(x)


def _general_sd(out: int) -> dict[str, np.ndarray]:
  return {
    "proj.weight_g": np.linspace(0.5, 2, out, dtype=np.float32).reshape(out, 1),
    "proj.weight_v": RNG.randn(out, 4).astype(np.float32),
    "proj.bias": RNG.randn(out).astype(np.float32),
  }


# (1, 4): the kernel (4, 1, 4) splits as (4 | 1, 4) or (4, 1 | 4); the model says which.
@pytest.mark.parametrize("features", [(2, 3), (1, 4)])
def test_linear_into_dense_general_both_ways(features):
  net, out = _General(features), features[0] * features[1]
  x = np.ones((1, 4), np.float32)
  sd = _general_sd(out)
  result = interop.load_torch_state_dict(sd, net, inputs=x)
  layer = result.layers["proj"]
  assert (layer.axis, layer.in_axes) == ((-2, -1), 1)
  v = sd["proj.weight_v"]
  w = sd["proj.weight_g"] * v / np.linalg.norm(v, axis=1, keepdims=True)
  want = (x @ w.T + sd["proj.bias"]).reshape(1, *features)
  np.testing.assert_allclose(net.apply(result.variables, x), want, atol=1e-6)
  back = interop.to_torch_state_dict(result.variables, result.layers)
  chex.assert_trees_all_close({k: np.asarray(v) for k, v in back.items()}, sd)
  # Read from the model: the DenseGeneral is a Linear with its in_axes and kernel axes.
  got = interop.to_torch_state_dict(result.variables, model=net, inputs=x, style="legacy")
  chex.assert_trees_all_close({k: np.asarray(v) for k, v in got.items()}, sd)


def test_dense_general_kept_axes_of_no_matrix_axis_are_refused():
  with pytest.raises(
    ValueError, match=r"keeps axes \(2,\) of its 3-D 'kernel'.*no axis of PyTorch"
  ):
    interop.load_torch_state_dict(
      _general_sd(6), _General((2, 3), axis=-1), inputs=np.ones((1, 4), np.float32)
    )
