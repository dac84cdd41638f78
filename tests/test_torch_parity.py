"""Parity with PyTorch's weight_norm and spectral_norm (skipped where torch is missing)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxnorm

torch = pytest.importorskip("torch")


def _np(t):
  return t.detach().cpu().numpy()


@pytest.mark.parametrize("api", ["legacy", "parametrizations"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_weight_norm_outputs_and_gradients(kind, api):
  torch.manual_seed(0)
  if kind == "linear":
    tlayer, x = torch.nn.Linear(5, 3), torch.randn(4, 5)
    to_flax = lambda w: w.T  # (out, in) -> (in, out)
    flayer, fx = nn.Dense(3), jnp.asarray(_np(x))
  else:
    tlayer, x = torch.nn.Conv1d(2, 3, 3, padding=1), torch.randn(4, 2, 7)
    to_flax = lambda w: np.transpose(w, (2, 1, 0))  # (out, in, k) -> (k, in, out)
    flayer, fx = nn.Conv(3, (3,), padding=1), jnp.asarray(_np(x).transpose(0, 2, 1))
  if api == "legacy":
    tlayer = torch.nn.utils.weight_norm(tlayer)
    g_of, v_of = (lambda m: m.weight_g), (lambda m: m.weight_v)
  else:
    tlayer = torch.nn.utils.parametrizations.weight_norm(tlayer)
    g_of = lambda m: m.parametrizations.weight.original0
    v_of = lambda m: m.parametrizations.weight.original1
  with torch.no_grad():  # move g away from ||v|| so the test sees g
    g_of(tlayer).mul_(torch.linspace(0.5, 2.0, 3).reshape(-1, *[1] * (g_of(tlayer).ndim - 1)))

  y = tlayer(x)
  y.pow(2).sum().backward()

  params = {
    "kernel_g": jnp.asarray(to_flax(_np(g_of(tlayer)))),
    "kernel_v": jnp.asarray(to_flax(_np(v_of(tlayer)))),
    "bias": jnp.asarray(_np(tlayer.bias)),
  }
  wrapped = flaxnorm.weight_norm(flayer)
  fy = wrapped.apply({"params": params}, fx)
  ty = _np(y) if kind == "linear" else _np(y).transpose(0, 2, 1)
  np.testing.assert_allclose(fy, ty, rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda p: jnp.sum(wrapped.apply({"params": p}, fx) ** 2))(params)
  np.testing.assert_allclose(
    grads["kernel_g"], to_flax(_np(g_of(tlayer).grad)), rtol=1e-4, atol=1e-5
  )
  np.testing.assert_allclose(
    grads["kernel_v"], to_flax(_np(v_of(tlayer).grad)), rtol=1e-4, atol=1e-5
  )


@pytest.mark.parametrize("n", [1, 3])
def test_spectral_norm_state_after_iterations(n):
  torch.manual_seed(0)
  tlayer = torch.nn.utils.spectral_norm(torch.nn.Linear(6, 4), n_power_iterations=n)
  u0, v0 = _np(tlayer.weight_u).copy(), _np(tlayer.weight_v).copy()
  x = torch.randn(2, 6)
  tlayer.train()
  y = tlayer(x)
  w = _np(tlayer.weight_orig)
  t_sigma = float(_np(tlayer.weight_u) @ w @ _np(tlayer.weight_v))

  layer = flaxnorm.spectral_norm(nn.Dense(4), n_power_iterations=n)
  variables = {
    "params": {"kernel": jnp.asarray(w.T), "bias": jnp.asarray(_np(tlayer.bias))},
    "spectral": {
      "kernel_u": jnp.asarray(u0),
      "kernel_v": jnp.asarray(v0),
      "kernel_sigma": jnp.zeros(()),
    },
  }
  fy, updates = layer.apply(variables, jnp.asarray(_np(x)), mutable=["spectral"])
  state = updates["spectral"]
  np.testing.assert_allclose(state["kernel_u"], _np(tlayer.weight_u), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state["kernel_v"], _np(tlayer.weight_v), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state["kernel_sigma"], t_sigma, rtol=1e-5)
  np.testing.assert_allclose(fy, _np(y), rtol=1e-5, atol=1e-6)

  # Eval: both use the stored vectors without iterating.
  tlayer.eval()
  with torch.no_grad():
    ty = tlayer(x)
  fy = layer.apply({**variables, **updates}, jnp.asarray(_np(x)))
  np.testing.assert_allclose(fy, _np(ty), rtol=1e-5, atol=1e-6)


def test_spectral_norm_parametrizations_api():
  torch.manual_seed(1)
  lin = torch.nn.Linear(5, 3)
  tlayer = torch.nn.utils.parametrizations.spectral_norm(lin, n_power_iterations=2)
  param = tlayer.parametrizations.weight[0]
  u0, v0 = _np(param._u).copy(), _np(param._v).copy()
  x = torch.randn(2, 5)
  y = tlayer(x)  # training mode: 2 iterations, then W / sigma
  layer = flaxnorm.spectral_norm(nn.Dense(3), n_power_iterations=2)
  variables = {
    "params": {
      "kernel": jnp.asarray(_np(tlayer.parametrizations.weight.original).T),
      "bias": jnp.asarray(_np(lin.bias)),
    },
    "spectral": {
      "kernel_u": jnp.asarray(u0),
      "kernel_v": jnp.asarray(v0),
      "kernel_sigma": jnp.zeros(()),
    },
  }
  fy, updates = layer.apply(variables, jnp.asarray(_np(x)), mutable=["spectral"])
  np.testing.assert_allclose(fy, _np(y), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates["spectral"]["kernel_u"], _np(param._u), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates["spectral"]["kernel_v"], _np(param._v), rtol=1e-5, atol=1e-6)
