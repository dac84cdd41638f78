"""PyTorch ModuleLists into stacked Flax layers (nn.scan layer stacks, nnx.vmap ensembles).

PyTorch's ``layers.3.fc`` is member 3 of the Flax layer ``layers/fc``, whose
params have a leading axis: each member loads and saves as a layer of its own.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxnorm
import flaxnorm.nnx as fnnx
from flaxnorm import interop

D, N = 4, 3
X = np.random.RandomState(0).randn(2, D).astype(np.float32)


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


class _Block(nn.Module):
  axis: int = -2  # continues PyTorch's parametrized spectral norm

  @nn.compact
  def __call__(self, x, _):
    dense = flaxnorm.spectral_norm(nn.Dense(D, name="fc"), axis=self.axis)
    return nn.relu(dense(x)), None


class _Scanned(nn.Module):
  """Three blocks stacked by nn.scan: params layers/fc/kernel (3, D, D)."""

  axis: int = -2  # the blocks' spectral-norm axis

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(
      _Block,
      variable_axes={"params": 0, "spectral": 0},
      split_rngs={"params": True, "spectral": True},
      length=N,
    )
    return stack(axis=self.axis, name="layers")(x, None)[0]


def _torch_stack(torch):
  torch.manual_seed(0)
  sn = torch.nn.utils.parametrizations.spectral_norm
  model = torch.nn.Module()
  model.layers = torch.nn.ModuleList(torch.nn.Module() for _ in range(N))
  for block in model.layers:
    block.fc = sn(torch.nn.Linear(D, D))

  def run(x):
    for block in model.layers:
      x = torch.relu(block.fc(x))
    return x

  return model, run


def test_linen_scan_stack_continues_pytorch(torch):
  model, run = _torch_stack(torch)
  with torch.no_grad():
    run(torch.from_numpy(X))  # a training step of the power iteration
  model.eval()
  with torch.no_grad():
    want = run(torch.from_numpy(X)).numpy()
  result = interop.load_torch_state_dict(model.state_dict(), _Scanned(), inputs=X)
  assert [layer.member for layer in result.layers.values()] == [0, 1, 2]
  assert result.summary().splitlines()[1].startswith("layers.1.fc -> layers/fc[1]  linear")
  assert result.layers["layers.2.fc"].continues == "parametrizations"
  np.testing.assert_allclose(_Scanned().apply(result.variables, X), want, atol=1e-6)
  kernel = result.variables["params"]["layers"]["fc"]["kernel"]
  np.testing.assert_array_equal(
    kernel[1], model.layers[1].fc.parametrizations.weight.original.detach().numpy().T
  )
  back = interop.to_torch_state_dict(result.variables, result.layers)
  assert sorted(back) == sorted(model.state_dict())
  for key, x in model.state_dict().items():
    np.testing.assert_array_equal(back[key].numpy(), x.numpy())
  # Read from the model: the index goes after the scanned module, layers.0.fc, ...
  got = interop.to_torch_state_dict(result.variables, model=_Scanned(), inputs=X)
  assert sorted(got) == sorted(back)
  for key, x in back.items():
    np.testing.assert_array_equal(got[key].numpy(), x.numpy())


def test_nnx_ensemble_with_weight_norm(torch):
  torch.manual_seed(1)
  wn = torch.nn.utils.parametrizations.weight_norm
  members = torch.nn.ModuleList(wn(torch.nn.Linear(D, 2)) for _ in range(N))
  holder = torch.nn.Module()
  holder.members = members
  with torch.no_grad():
    want = np.stack([m(torch.from_numpy(X)).numpy() for m in members])

  @nnx.vmap
  def make(key):
    return nnx.Linear(D, 2, rngs=nnx.Rngs(key))

  class Ensemble(nnx.Module):
    def __init__(self):
      self.members = fnnx.weight_norm(make(jax.random.split(jax.random.key(0), N)), ensemble_axis=0)

    def __call__(self, x):
      return nnx.vmap(lambda m, x: m(x), in_axes=(0, None))(self.members, x)

  model = Ensemble()
  result = interop.load_torch_state_dict(holder.state_dict(), model)
  assert result.layers["members.2"].path == "members"
  nnx.update(model, result.variables)
  np.testing.assert_allclose(model(jnp.asarray(X)), want, atol=1e-6)
  back = interop.to_torch_state_dict(result.variables, result.layers)
  holder.load_state_dict(back, strict=True)
  # Read from the model: the stack's members are members.0, members.1, ...
  got = interop.to_torch_state_dict(model)
  assert sorted(got) == sorted(holder.state_dict())
  for key, x in holder.state_dict().items():
    np.testing.assert_array_equal(got[key].numpy(), x.numpy())


def test_variables_only_and_a_partial_stack():
  rng = np.random.RandomState(2)
  sd = {}
  for i in range(N):
    sd[f"layers.{i}.fc.parametrizations.weight.original"] = rng.randn(D, D).astype(np.float32)
    sd[f"layers.{i}.fc.parametrizations.weight.0._u"] = rng.randn(D).astype(np.float32)
    sd[f"layers.{i}.fc.parametrizations.weight.0._v"] = rng.randn(D).astype(np.float32)
    sd[f"layers.{i}.fc.bias"] = rng.randn(D).astype(np.float32)
  shapes = jax.eval_shape(_Scanned().init, jax.random.key(0), X)
  result = interop.load_torch_state_dict(sd, shapes, axes={"layers": -2})
  kernel = result.variables["params"]["layers"]["fc"]["kernel"]
  np.testing.assert_array_equal(kernel[2], sd["layers.2.fc.parametrizations.weight.original"].T)
  # Member 2 missing: strict lists the stacked leaves; strict=False keeps members 0 and 1 and
  # gives member 2 the model's initial values.
  partial = {k: x for k, x in sd.items() if not k.startswith("layers.2.")}
  with pytest.raises(ValueError, match=r"unmatched: \n    params/layers/fc/bias"):
    interop.load_torch_state_dict(partial, _Scanned(), inputs=X)
  got = interop.load_torch_state_dict(partial, _Scanned(), inputs=X, strict=False)
  assert "params/layers/fc/kernel" in got.unmatched_keys
  kernel = got.variables["params"]["layers"]["fc"]["kernel"]
  init = _Scanned().init(jax.random.key(0), X)["params"]["layers"]["fc"]["kernel"]
  np.testing.assert_array_equal(kernel[0], sd["layers.0.fc.parametrizations.weight.original"].T)
  np.testing.assert_array_equal(kernel[2], init[2])


def test_positive_axis_of_a_stacked_layer_is_the_members():
  """axis=0 inside nn.scan keeps each member's input axis, not the stack axis."""
  rng = np.random.RandomState(3)
  sd = {
    f"layers.{i}.fc.{k}": x
    for i in range(N)
    for k, x in {
      "weight_orig": rng.randn(D, D).astype(np.float32),
      "weight_u": rng.randn(D).astype(np.float32),
      "weight_v": rng.randn(D).astype(np.float32),
      "bias": np.zeros(D, np.float32),
    }.items()
  }

  with pytest.raises(ValueError, match=r"wrapped with spectral_norm\(\.\.\., axis=-2\)"):
    interop.load_torch_state_dict(sd, _Scanned(axis=0), inputs=X)  # legacy order wants axis=-1
  with pytest.warns(UserWarning, match=r"next training step would differ"):
    result = interop.load_torch_state_dict(sd, _Scanned(axis=0), inputs=X, strict=False)
  assert result.layers["layers.0.fc"].axis == -2


def test_scanned_transformer_blocks_with_attention(torch):
  """A ModuleList of attention blocks into one nn.scan-stacked block, both ways."""
  e, heads = 8, 2
  torch.manual_seed(4)
  model = torch.nn.Module()
  model.layers = torch.nn.ModuleList(torch.nn.Module() for _ in range(N))
  for block in model.layers:
    block.attn = torch.nn.MultiheadAttention(e, heads, batch_first=True)
    block.fc = torch.nn.Linear(e, e)

  def run(h):
    for block in model.layers:
      h = h + block.attn(h, h, h, need_weights=False)[0]
      h = h + torch.relu(block.fc(h))
    return h

  class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
      h = h + nn.MultiHeadDotProductAttention(num_heads=heads, name="attn")(h)
      return h + nn.relu(nn.Dense(e, name="fc")(h)), None

  class Net(nn.Module):
    @nn.compact
    def __call__(self, h):
      stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=N)
      return stack(name="layers")(h, None)[0]

  x = np.random.RandomState(5).randn(2, 5, e).astype(np.float32)
  with torch.no_grad():
    want = run(torch.from_numpy(x)).numpy()
  result = interop.load_torch_state_dict(model.state_dict(), Net(), inputs=x)
  assert result.layers["layers.2.attn.in_proj_weight"].member == 2
  assert result.layers["layers.1.attn.out_proj"].path == "layers/attn/out"
  np.testing.assert_allclose(Net().apply(result.variables, x), want, atol=2e-6)
  for got in (
    interop.to_torch_state_dict(result.variables, result.layers),
    interop.to_torch_state_dict(result.variables, model=Net(), inputs=x),
  ):
    assert sorted(got) == sorted(model.state_dict())
    for key, value in model.state_dict().items():
      np.testing.assert_array_equal(got[key].numpy(), value.numpy())


def test_a_norm_over_the_stack_axis_has_no_member_view():
  """Flax's wrappers normalize each member (they see one); a layer description that keeps
  the stack axis (as a hand-built stack could) is refused rather than sliced."""
  from flaxnorm._torch_layer import _member_info
  from flaxnorm._torch_targets import FlaxLayer

  info = FlaxLayer(("layers", "fc"), "linear", "Dense", {"kernel": ("weight_norm", (0, 2))}, "", 1)
  with pytest.raises(ValueError, match=r"keeps axis 0 of its stacked 'kernel', the stack axis"):
    _member_info(info, "here")
  kept = _member_info(info._replace(wrapped={"kernel": ("weight_norm", (2,))}), "here")
  assert (kept.wrapped, kept.stacked) == ({"kernel": ("weight_norm", (1,))}, 0)
