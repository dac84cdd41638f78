"""Complex kernels (complex64, complex128) in every face: the math, Linen, NNX, tree, removal.

Weight norm keeps ``g`` real (``||v||`` over ``|v|^2``); spectral norm iterates
with the conjugate transpose and keeps a real ``sigma = Re(u^H W v)``, checked
against ``numpy.linalg.svd``. Operator mode, Lipschitz certificates and PyTorch
interop refuse complex kernels with a clear error.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import flaxnorm
import flaxnorm.nnx as fnx
import flaxnorm.tree as ft

C64 = jnp.complex64


def _cnormal(key, shape, dtype=C64):
  return jax.random.normal(key, shape, dtype)


def _top_sigma(w, axis=-1):
  """The largest singular value of flaxnorm's matrix view, from numpy's complex SVD."""
  mat = np.asarray(flaxnorm.as_matrix(jnp.asarray(w), axis), np.complex128)
  return float(np.linalg.svd(mat, compute_uv=False)[0])


# (shape, what it stands for): a Dense kernel (in, out) and a Conv kernel (kh, kw, in, out).
SHAPES = {"dense": (5, 3), "conv": (3, 3, 2, 4)}


@pytest.mark.parametrize("kind", list(SHAPES))
def test_math_complex_matches_svd(kind):
  w = _cnormal(jax.random.key(0), SHAPES[kind])
  state = flaxnorm.spectral_state_init(jax.random.key(1), w, n_steps=500)
  assert state.u.dtype == C64 and state.v.dtype == C64 and state.sigma.dtype == jnp.float32
  np.testing.assert_allclose(float(state.sigma), _top_sigma(w), rtol=1e-5)
  mat = flaxnorm.as_matrix(w)
  # u and v are the top singular pair: W v = sigma u and W^H u = sigma v, with unit norms.
  chex.assert_trees_all_close(mat @ state.v, state.sigma * state.u, atol=1e-5)
  chex.assert_trees_all_close(jnp.conj(mat.T) @ state.u, state.sigma * state.v, atol=1e-5)
  w_sn, _ = flaxnorm.spectral_normalize(w, state.u, state.v, n_steps=0)
  assert w_sn.dtype == C64
  np.testing.assert_allclose(_top_sigma(w_sn), 1.0, rtol=1e-5)
  # Weight norm: g real, the column norms over |w|^2; composing gives w back.
  g, v = flaxnorm.weight_norm_decompose(w)
  assert g.dtype == jnp.float32
  expected = np.linalg.norm(np.asarray(w).reshape(-1, w.shape[-1]), axis=0)
  np.testing.assert_allclose(np.asarray(g).reshape(-1), expected, rtol=1e-6)
  chex.assert_trees_all_close(flaxnorm.weight_norm_compose(g, v), w, atol=1e-6)


def test_complex128_under_x64():
  with jax.enable_x64(True):
    w = _cnormal(jax.random.key(0), (6, 4), jnp.complex128)
    state = flaxnorm.spectral_state_init(jax.random.key(1), w, n_steps=500)
    assert state.u.dtype == jnp.complex128 and state.sigma.dtype == jnp.float64
    np.testing.assert_allclose(float(state.sigma), _top_sigma(w), rtol=1e-10)
    g, v = flaxnorm.weight_norm_decompose(w)
    assert g.dtype == jnp.float64
    chex.assert_trees_all_close(flaxnorm.weight_norm_compose(g, v), w, atol=1e-12)


def test_sigma_gradient_is_the_closed_form():
  # sigma = Re(u^H W v) with u, v held fixed: JAX's gradient of a real function of
  # W = X + iY is d/dX - i d/dY, here conj(u) v^T.
  w = _cnormal(jax.random.key(0), (4, 3))  # the matrix itself: axis=0 keeps its rows
  state = flaxnorm.spectral_state_init(jax.random.key(1), w, axis=0)
  grad = jax.grad(lambda w: flaxnorm.power_iteration(w, state.u, v=state.v, n_steps=1)[2])(w)
  u, v, _ = flaxnorm.power_iteration(w, state.u, v=state.v, n_steps=1)
  chex.assert_trees_all_close(grad, jnp.outer(jnp.conj(u), v), atol=1e-6)


def test_gradients_match_finite_differences():
  with jax.enable_x64(True):
    key_w, key_c = jax.random.split(jax.random.key(0))
    w = _cnormal(key_w, (4, 3), jnp.complex128)
    c = _cnormal(key_c, (4, 3), jnp.complex128)
    state = flaxnorm.spectral_state_init(jax.random.key(1), w, n_steps=3)  # unconverged

    def spectral(w):  # from the stored vectors: u and v do not depend on w
      w_sn, _ = flaxnorm.spectral_normalize(w, state.u, state.v, n_steps=0)
      return jnp.sum(jnp.abs(w_sn * c) ** 2)

    def weight(g, v):
      return jnp.sum(jnp.abs(flaxnorm.weight_norm_compose(g, v) * c) ** 2)

    g = jnp.linspace(0.5, 2.0, 3).reshape(1, 3)
    check_grads(spectral, (w,), order=1, modes=["rev"])
    check_grads(weight, (g, w), order=1, modes=["rev"])


def test_zero_complex_weight_stays_finite():
  w = jnp.zeros((4, 3), C64)
  state = flaxnorm.spectral_state_init(jax.random.key(0), w)

  def spectral(w):
    w_sn, new = flaxnorm.spectral_normalize(w, state.u, state.v)
    return jnp.sum(jnp.abs(w_sn) ** 2), (w_sn, new)

  def weight(g, v):
    w = flaxnorm.weight_norm_compose(g, v)
    return jnp.sum(jnp.abs(w) ** 2), w

  (_, (w_sn, new)), grad = jax.value_and_grad(spectral, has_aux=True)(w)
  chex.assert_trees_all_equal(w_sn, w)
  chex.assert_tree_all_finite((grad, new))
  chex.assert_trees_all_equal(new.u, state.u)  # a zero product keeps the previous vector
  (_, w_wn), grads = jax.value_and_grad(weight, (0, 1), has_aux=True)(jnp.ones((1, 3)), w)
  chex.assert_trees_all_equal(w_wn, w)
  chex.assert_tree_all_finite(grads)


# --------------------------------------------------------------------------- #
# Linen.
# --------------------------------------------------------------------------- #

LINEN = {
  "dense": (lambda: nn.Dense(3, param_dtype=C64, dtype=C64), (2, 4)),
  "conv": (lambda: nn.Conv(4, (3, 3), param_dtype=C64, dtype=C64), (2, 5, 5, 2)),
}


def _loss(y):
  return jnp.sum(jnp.abs(y) ** 2 * jnp.arange(1, y.shape[-1] + 1))


@pytest.mark.parametrize("kind", list(LINEN))
def test_linen_spectral_norm_complex(kind):
  make, shape = LINEN[kind]
  x = _cnormal(jax.random.key(1), shape)
  wrapped = flaxnorm.spectral_norm(make())
  variables = wrapped.init(jax.random.key(0), x)
  w, state = variables["params"]["kernel"], variables["spectral"]
  assert state["kernel_u"].dtype == C64 and state["kernel_sigma"].dtype == jnp.float32
  np.testing.assert_allclose(float(state["kernel_sigma"]), _top_sigma(w), rtol=1e-4)
  assert flaxnorm.spectral_sigmas(variables)["kernel"].dtype == jnp.float32

  # Training: the output-scaled fast path equals the plain layer with the kernel
  # path's w / sigma, outputs and gradients (complex params, real loss).
  def wrapped_loss(p):
    y, upd = wrapped.apply({"params": p, "spectral": state}, x, mutable=["spectral"])
    return _loss(y), upd["spectral"]

  def plain_loss(p):
    w_sn, new = flaxnorm.spectral_normalize(p["kernel"], state["kernel_u"], state["kernel_v"])
    return _loss(make().apply({"params": {**p, "kernel": w_sn}}, x)), new

  (l1, s1), g1 = jax.value_and_grad(wrapped_loss, has_aux=True)(variables["params"])
  (l2, s2), g2 = jax.value_and_grad(plain_loss, has_aux=True)(variables["params"])
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  chex.assert_trees_all_close(g1, g2, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(s1["kernel_u"], s2.u, atol=1e-6)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g1))
  # Removal gives the evaluation output.
  plain = flaxnorm.remove_spectral_norm(variables)
  chex.assert_trees_all_close(
    make().apply(plain, x), wrapped.apply(variables, x), atol=1e-5, rtol=1e-5
  )


@pytest.mark.parametrize("kind", list(LINEN))
def test_linen_weight_norm_complex(kind):
  make, shape = LINEN[kind]
  x = _cnormal(jax.random.key(1), shape)
  wrapped = flaxnorm.weight_norm(make())
  params = wrapped.init(jax.random.key(0), x)["params"]
  g, v = params["kernel_g"], params["kernel_v"]
  assert g.dtype == jnp.float32 and v.dtype == C64
  # Unchanged at init: the plain complex layer with kernel v.
  plain = {"kernel": v, "bias": params["bias"]}
  y = make().apply({"params": plain}, x)
  chex.assert_trees_all_close(wrapped.apply({"params": params}, x), y, atol=1e-5, rtol=1e-5)
  # g away from ||v||: the fast path equals the plain layer with w = g v / ||v||.
  params = {**params, "kernel_g": g * jnp.linspace(0.5, 2.0, g.size).reshape(g.shape)}

  def plain_loss(p):
    w = flaxnorm.weight_norm_compose(p["kernel_g"], p["kernel_v"])
    return _loss(make().apply({"params": {"kernel": w, "bias": p["bias"]}}, x))

  l1, g1 = jax.value_and_grad(lambda p: _loss(wrapped.apply({"params": p}, x)))(params)
  l2, g2 = jax.value_and_grad(plain_loss)(params)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  chex.assert_trees_all_close(g1, g2, atol=1e-4, rtol=1e-5)
  assert g1["kernel_g"].dtype == jnp.float32  # a real param gets a real gradient
  folded = flaxnorm.remove_weight_norm({"params": params})
  chex.assert_trees_all_close(
    make().apply(folded, x), wrapped.apply({"params": params}, x), atol=1e-5, rtol=1e-5
  )


# --------------------------------------------------------------------------- #
# NNX and tree.
# --------------------------------------------------------------------------- #

NNX = {
  "dense": (lambda: nnx.Linear(4, 3, param_dtype=C64, dtype=C64, rngs=nnx.Rngs(0)), (2, 4)),
  "conv": (
    lambda: nnx.Conv(2, 4, (3, 3), param_dtype=C64, dtype=C64, rngs=nnx.Rngs(0)),
    (2, 5, 5, 2),
  ),
}


@pytest.mark.parametrize("kind", list(NNX))
def test_nnx_complex(kind):
  make, shape = NNX[kind]
  x = _cnormal(jax.random.key(1), shape)
  y_plain = make()(x)
  layer = fnx.weight_norm(make())
  assert layer.kernel_g[...].dtype == jnp.float32
  chex.assert_trees_all_close(layer(x), y_plain, atol=1e-5, rtol=1e-5)
  grads = nnx.grad(lambda m: _loss(m(x)))(layer)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  fnx.remove_weight_norm(layer)
  chex.assert_trees_all_close(layer(x), y_plain, atol=1e-5, rtol=1e-5)

  layer = fnx.spectral_norm(make())
  w = layer.kernel[...]  # the normalized kernel
  sigma = fnx.spectral_sigmas(layer)["kernel"]
  assert sigma.dtype == jnp.float32 and layer.kernel_u[...].dtype == C64
  np.testing.assert_allclose(float(sigma) * _top_sigma(w), _top_sigma(make().kernel[...]), 1e-4)
  np.testing.assert_allclose(_top_sigma(w), 1.0, rtol=1e-4)
  layer.eval()
  y = layer(x)
  fnx.remove_spectral_norm(layer)
  chex.assert_trees_all_close(layer(x), y, atol=1e-5, rtol=1e-5)


def test_tree_complex():
  params = {"a": {"kernel": _cnormal(jax.random.key(0), (5, 3)), "bias": jnp.zeros(3, C64)}}
  state = ft.spectral_norm_init(params, jax.random.key(1))
  w = params["a"]["kernel"]
  np.testing.assert_allclose(float(state["a"]["kernel_sigma"]), _top_sigma(w), rtol=1e-4)
  normalized, new = ft.spectral_norm_apply(params, state, update=True)
  np.testing.assert_allclose(_top_sigma(normalized["a"]["kernel"]), 1.0, rtol=1e-4)
  assert new["a"]["kernel_u"].dtype == C64
  wn = ft.weight_norm_init(params)
  assert wn["a"]["kernel_g"].dtype == jnp.float32
  chex.assert_trees_all_close(ft.weight_norm_apply(wn), params, atol=1e-6)


# --------------------------------------------------------------------------- #
# What refuses complex, and PyTorch parity.
# --------------------------------------------------------------------------- #


def test_operator_mode_refuses_complex():
  x = jnp.ones((1, 4), C64)
  layer = flaxnorm.spectral_norm(nn.Dense(3, param_dtype=C64, dtype=C64), operator=True)
  with pytest.raises(TypeError, match=r"operator=True.*layer '<top level>'.*complex64.*real"):
    layer.init(jax.random.key(0), x)
  linear = nnx.Linear(4, 3, param_dtype=C64, dtype=C64, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=r"operator=True.*Linear.*complex64.*operator=False"):
    fnx.spectral_norm(linear, operator=True, input_shape=(4,))
  assert "kernel_u" not in vars(linear)  # nothing was changed


def test_complex_refusals():
  w = jnp.ones((3, 4), C64)
  with pytest.raises(
    TypeError, match=r"g at weight_norm_compose must be a floating-point.*complex is not"
  ):
    flaxnorm.weight_norm_compose(jnp.ones((1, 4), C64), w)
  with pytest.raises(TypeError, match=r"power_iteration: u is complex64 but w is float32"):
    flaxnorm.power_iteration(jnp.ones((3, 4)), jnp.ones(3, C64), n_steps=1)
  with pytest.raises(TypeError, match=r"'weight'.*complex is not supported"):
    flaxnorm.interop.from_torch({"weight": np.ones((3, 4), np.complex64)}, "linear")
  with pytest.raises(TypeError, match=r"param 'kernel'.*complex is not supported"):
    flaxnorm.interop.to_torch({"params": {"kernel": np.ones((4, 3), np.complex64)}}, "linear")
  model = flaxnorm.spectral_norm(nn.Dense(3, param_dtype=C64, dtype=C64))
  variables = model.init(jax.random.key(0), jnp.ones((1, 4), C64))
  with pytest.raises(TypeError, match=r"param 'kernel' at lipschitz_bound.*complex is not"):
    flaxnorm.lipschitz_bound(variables, model=model, inputs=(jnp.ones((1, 4), C64),))
  with pytest.raises(TypeError, match=r"must be a floating-point array.*complex128\), got int32"):
    flaxnorm.weight_norm_decompose(jnp.ones((3, 4), jnp.int32))


def test_torch_spectral_norm_parity_cfloat():
  torch = pytest.importorskip("torch")
  from torch.nn.utils import parametrizations

  torch.manual_seed(0)
  linear = parametrizations.spectral_norm(torch.nn.Linear(4, 3, dtype=torch.cfloat))
  sn = linear.parametrizations.weight[0]
  u0, v0 = sn._u.detach().numpy().copy(), sn._v.detach().numpy().copy()
  w = linear.parametrizations.weight.original.detach().numpy()  # (out, in)
  linear.train()
  w_torch = linear.weight.detach().numpy()  # one power-iteration step, then w / sigma
  # Flax's kernel is (in, out); its matrix view (out, in) is PyTorch's weight.
  w_sn, state = flaxnorm.spectral_normalize(jnp.asarray(w.T), jnp.asarray(u0), jnp.asarray(v0))
  np.testing.assert_allclose(np.asarray(w_sn).T, w_torch, atol=1e-6)
  np.testing.assert_allclose(np.asarray(state.u), sn._u.detach().numpy(), atol=1e-6)
  np.testing.assert_allclose(np.asarray(state.v), sn._v.detach().numpy(), atol=1e-6)
