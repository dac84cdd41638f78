"""PyTorch normalization layers into Flax's: LayerNorm, GroupNorm, BatchNorm, RMSNorm.

``weight`` is Flax's ``scale``, ``bias`` its ``bias``, a BatchNorm's
``running_mean``/``running_var`` its ``batch_stats`` ``mean``/``var``
(``nnx.BatchStat`` in NNX); ``num_batches_tracked`` has no Flax counterpart.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxnorm import interop

C = 6
X = np.random.RandomState(0).randn(3, 4).astype(np.float32)
EPS = 1e-5


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


def _torch_model(torch):
  torch.manual_seed(0)
  t = torch.nn.Module()
  t.fc = torch.nn.Linear(4, C)
  t.ln, t.bn = torch.nn.LayerNorm(C), torch.nn.BatchNorm1d(C)
  t.gn, t.rms = torch.nn.GroupNorm(2, C), torch.nn.RMSNorm(C, eps=EPS)
  with torch.no_grad():
    for norm in (t.ln, t.bn, t.gn, t.rms):
      for p in norm.parameters():
        p.normal_()
    t.bn.train()
    t.bn(torch.randn(8, C) * 3 + 1)  # running statistics away from (0, 1)
  t.eval()

  def run(x):
    with torch.no_grad():
      return t.rms(t.gn(t.bn(t.ln(t.fc(torch.from_numpy(x)))))).numpy()

  return t, run


class _Linen(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm(epsilon=EPS, name="ln")(nn.Dense(C, name="fc")(x))
    x = nn.BatchNorm(use_running_average=True, epsilon=EPS, name="bn")(x)
    x = nn.GroupNorm(num_groups=2, epsilon=EPS, name="gn")(x)
    return nn.RMSNorm(epsilon=EPS, name="rms")(x)


class _Nnx(nnx.Module):
  def __init__(self):
    rngs = nnx.Rngs(0)
    self.fc = nnx.Linear(4, C, rngs=rngs)
    self.ln = nnx.LayerNorm(C, epsilon=EPS, rngs=rngs)
    self.bn = nnx.BatchNorm(C, epsilon=EPS, use_running_average=True, rngs=rngs)
    self.gn = nnx.GroupNorm(C, num_groups=2, epsilon=EPS, rngs=rngs)
    self.rms = nnx.RMSNorm(C, epsilon=EPS, rngs=rngs)

  def __call__(self, x):
    return self.rms(self.gn(self.bn(self.ln(self.fc(x)))))


def _same(got, want):
  assert sorted(got) == sorted(want)
  for key, x in want.items():
    np.testing.assert_array_equal(np.asarray(got[key]), x.numpy(), err_msg=key)


def test_linen_norms_both_ways(torch):
  t, run = _torch_model(torch)
  result = interop.load_torch_state_dict(t.state_dict(), _Linen(), inputs=X)
  assert {p: layer.kind for p, layer in result.layers.items()} == {
    "fc": "linear",
    "ln": "norm",
    "bn": "norm",
    "gn": "norm",
    "rms": "norm",
  }
  stats = result.variables["batch_stats"]["bn"]
  np.testing.assert_array_equal(stats["var"], t.bn.running_var.numpy())
  np.testing.assert_allclose(_Linen().apply(result.variables, X), run(X), atol=2e-6)
  # Written back (num_batches_tracked as 0), from the load and from the model.
  want = {**t.state_dict(), "bn.num_batches_tracked": torch.tensor(0)}
  _same(interop.to_torch_state_dict(result.variables, result.layers), want)
  _same(interop.to_torch_state_dict(result.variables, model=_Linen(), inputs=X), want)


def test_nnx_norms_and_batch_stats(torch):
  t, run = _torch_model(torch)
  model = _Nnx()
  result = interop.load_torch_state_dict(t.state_dict(), model)
  nnx.update(model, result.variables)
  np.testing.assert_array_equal(model.bn.mean.get_value(), t.bn.running_mean.numpy())
  np.testing.assert_allclose(model(jnp.asarray(X)), run(X), atol=2e-6)
  got = interop.to_torch_state_dict(model)
  t.load_state_dict(got, strict=True)
  np.testing.assert_allclose(run(X), model(jnp.asarray(X)), atol=2e-6)


def test_layer_norm_in_a_scanned_block(torch):
  torch.manual_seed(1)
  t = torch.nn.Module()
  t.layers = torch.nn.ModuleList(torch.nn.Module() for _ in range(2))
  for block in t.layers:
    block.fc, block.ln = torch.nn.Linear(C, C), torch.nn.LayerNorm(C)
    with torch.no_grad():
      block.ln.weight.normal_()

  class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
      return nn.LayerNorm(epsilon=EPS, name="ln")(nn.Dense(C, name="fc")(h)), None

  class Net(nn.Module):
    @nn.compact
    def __call__(self, h):
      stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
      return stack(name="layers")(h, None)[0]

  x = np.random.RandomState(2).randn(3, C).astype(np.float32)
  with torch.no_grad():
    want = torch.from_numpy(x)
    for block in t.layers:
      want = block.ln(block.fc(want))
  result = interop.load_torch_state_dict(t.state_dict(), Net(), inputs=x)
  assert result.layers["layers.1.ln"].member == 1
  np.testing.assert_allclose(Net().apply(result.variables, x), want.numpy(), atol=2e-6)
  _same(interop.to_torch_state_dict(result.variables, model=Net(), inputs=x), t.state_dict())


def test_norm_found_by_its_scale_without_a_model():
  variables = jax.eval_shape(_Linen().init, jax.random.key(0), X)
  rng = np.random.RandomState(3)
  sd = {"fc.weight": rng.randn(C, 4), "fc.bias": rng.randn(C)}
  for name in ("ln", "bn", "gn"):
    sd.update({f"{name}.weight": rng.randn(C), f"{name}.bias": rng.randn(C)})
  sd.update(
    {"rms.weight": rng.randn(C), "bn.running_mean": rng.randn(C), "bn.running_var": rng.rand(C)}
  )
  sd = {k: x.astype(np.float32) for k, x in sd.items()}
  result = interop.load_torch_state_dict(sd, variables)
  np.testing.assert_array_equal(result.variables["params"]["gn"]["scale"], sd["gn.weight"])
  np.testing.assert_array_equal(
    result.variables["batch_stats"]["bn"]["mean"], sd["bn.running_mean"]
  )


def test_norm_mismatches_are_named(torch):
  t = torch.nn.Module()
  t.ln = torch.nn.LayerNorm(C)

  class NoScale(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.LayerNorm(use_scale=False, name="ln")(x)

  x = np.ones((2, C), np.float32)
  with pytest.raises(ValueError, match=r"'ln.weight' has no Flax counterpart 'params/ln/scale'"):
    interop.load_torch_state_dict(t.state_dict(), NoScale(), inputs=x)
  t.ln = torch.nn.LayerNorm(C, elementwise_affine=False)  # nothing for the Flax scale, bias
  variables = {"params": {"ln": {"scale": np.ones(C, np.float32), "bias": np.zeros(C, np.float32)}}}
  with pytest.raises(ValueError, match=r"unmatched: \n    params/ln/scale\n    params/ln/bias"):
    interop.load_torch_state_dict(t.state_dict(), variables)
  # A BatchNorm's buffers for a Flax layer that is no normalization layer.
  sd = {"fc.weight": np.ones((C, C), np.float32), "fc.running_mean": np.zeros(C, np.float32)}
  dense = {"params": {"fc": {"kernel": np.zeros((C, C), np.float32)}}}
  result = interop.load_torch_state_dict(sd, dense, strict=False)
  assert "its Flax target is no LayerNorm" in result.unused_keys["fc.running_mean"]
