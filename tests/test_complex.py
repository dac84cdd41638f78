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


# A Dense kernel (in, out) and a Conv kernel (kh, kw, in, out), the shapes of the
# layers below: every test shares the compiled ops (eager JAX compiles per shape).
SHAPES = {"dense": (4, 3), "conv": (3, 3, 2, 4)}


def _math_faces(w):
  """Spectral state (converged), normalized kernel, weight norm's g and recomposed w."""
  state = flaxnorm.spectral_state_init(jax.random.key(1), w)
  w_sn, _ = flaxnorm.spectral_normalize(w, state.u, state.v, n_steps=0)
  g, v = flaxnorm.weight_norm_decompose(w)
  return state, w_sn, g, flaxnorm.weight_norm_compose(g, v)


def _check_math(w, rtol, faces=_math_faces):
  state, w_sn, g, w_again = faces(w)
  real = jnp.finfo(w.dtype).dtype
  assert state.u.dtype == w.dtype and state.v.dtype == w.dtype and state.sigma.dtype == real
  np.testing.assert_allclose(float(state.sigma), _top_sigma(w), rtol=rtol)
  # u and v are the top singular pair: W v = sigma u and W^H u = sigma v.
  mat = np.asarray(flaxnorm.as_matrix(w))
  u, v, sigma = (np.asarray(x) for x in state)
  np.testing.assert_allclose(mat @ v, sigma * u, atol=10 * rtol)
  np.testing.assert_allclose(mat.conj().T @ u, sigma * v, atol=10 * rtol)
  assert w_sn.dtype == w.dtype
  np.testing.assert_allclose(_top_sigma(w_sn), 1.0, rtol=rtol)
  # Weight norm: g real, the column norms over |w|^2; composing gives w back.
  assert g.dtype == real
  expected = np.linalg.norm(np.asarray(w).reshape(-1, w.shape[-1]), axis=0)
  np.testing.assert_allclose(np.asarray(g).reshape(-1), expected, rtol=rtol)
  np.testing.assert_allclose(w_again, w, atol=rtol)


@pytest.mark.parametrize("kind", list(SHAPES))
def test_math_complex_matches_svd(kind):
  _check_math(_cnormal(jax.random.key(0), SHAPES[kind]), rtol=1e-5)


def test_complex128_under_x64():
  with jax.enable_x64(True):
    w = _cnormal(jax.random.key(0), SHAPES["dense"], jnp.complex128)
    _check_math(w, rtol=1e-10, faces=jax.jit(_math_faces))  # one compile, not one per op


def test_sigma_gradient_is_the_closed_form():
  # sigma = Re(u^H W v) with u, v held fixed: JAX's gradient of a real function of
  # W = X + iY is d/dX - i d/dY, here conj(u) v^T.
  w = _cnormal(jax.random.key(0), SHAPES["dense"])
  state = flaxnorm.spectral_state_init(jax.random.key(1), w)
  mat = flaxnorm.as_matrix(w)

  @jax.jit
  def sigma_and_grad(mat):
    def sigma(mat):
      u, v, sigma = flaxnorm.power_iteration(mat, state.u, v=state.v, n_steps=1)
      return sigma, (u, v)

    return jax.grad(sigma, has_aux=True)(mat)

  grad, (u, v) = sigma_and_grad(mat)
  chex.assert_trees_all_close(grad, jnp.outer(jnp.conj(u), v), atol=1e-6)


def test_gradients_match_finite_differences():
  with jax.enable_x64(True):
    key_w, key_c = jax.random.split(jax.random.key(0))
    w = _cnormal(key_w, SHAPES["dense"], jnp.complex128)
    c = _cnormal(key_c, SHAPES["dense"], jnp.complex128)
    state = flaxnorm.spectral_state_init(jax.random.key(1), w, n_steps=3)  # unconverged

    def spectral(w):  # from the stored vectors: u and v do not depend on w
      w_sn, _ = flaxnorm.spectral_normalize(w, state.u, state.v, n_steps=0)
      return jnp.sum(jnp.abs(w_sn * c) ** 2)

    def weight(g, v):
      return jnp.sum(jnp.abs(flaxnorm.weight_norm_compose(g, v) * c) ** 2)

    g = jnp.linspace(0.5, 2.0, 3).reshape(1, 3)
    check_grads(jax.jit(spectral), (w,), order=1, modes=["rev"])
    check_grads(jax.jit(weight), (g, w), order=1, modes=["rev"])


def test_zero_complex_weight_stays_finite():
  w = jnp.zeros(SHAPES["dense"], C64)
  state = flaxnorm.spectral_state_init(jax.random.key(0), w)

  def spectral(w):
    w_sn, new = flaxnorm.spectral_normalize(w, state.u, state.v)
    return jnp.sum(jnp.abs(w_sn) ** 2), (w_sn, new)

  def weight(g, v):
    w = flaxnorm.weight_norm_compose(g, v)
    return jnp.sum(jnp.abs(w) ** 2), w

  (_, (w_sn, new)), grad = jax.jit(jax.value_and_grad(spectral, has_aux=True))(w)
  chex.assert_trees_all_equal(w_sn, w)
  chex.assert_tree_all_finite((grad, new))
  chex.assert_trees_all_equal(new.u, state.u)  # a zero product keeps the previous vector
  (_, w_wn), grads = jax.jit(jax.value_and_grad(weight, (0, 1), has_aux=True))(jnp.ones((1, 3)), w)
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
  # Evaluation is the plain layer with w / sigma; removal gives that output.
  y = wrapped.apply(variables, x)
  w_sn = w / state["kernel_sigma"].astype(C64)
  y_sn = make().apply({"params": {**variables["params"], "kernel": w_sn}}, x)
  chex.assert_trees_all_close(y, y_sn, atol=1e-5, rtol=1e-5)
  y_removed = make().apply(flaxnorm.remove_spectral_norm(variables), x)
  chex.assert_trees_all_close(y_removed, y_sn, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(LINEN))
def test_linen_weight_norm_complex(kind):
  make, shape = LINEN[kind]
  x = _cnormal(jax.random.key(1), shape)
  wrapped = flaxnorm.weight_norm(make())
  params = wrapped.init(jax.random.key(0), x)["params"]
  g, v = params["kernel_g"], params["kernel_v"]
  assert g.dtype == jnp.float32 and v.dtype == C64
  # Unchanged at init: the plain complex layer with kernel v.
  y = make().apply({"params": {"kernel": v, "bias": params["bias"]}}, x)
  chex.assert_trees_all_close(wrapped.apply({"params": params}, x), y, atol=1e-5, rtol=1e-5)
  # g away from ||v||: removal folds w = g v / ||v||.
  params = {**params, "kernel_g": g * jnp.linspace(0.5, 2.0, g.size).reshape(g.shape)}
  folded = flaxnorm.remove_weight_norm({"params": params})
  chex.assert_trees_all_close(
    make().apply(folded, x), wrapped.apply({"params": params}, x), atol=1e-5, rtol=1e-5
  )


def test_linen_complex_gradients():
  # Flax's Dense takes the output-scaled fast path: its outputs, gradients and
  # state equal the plain layer given the kernel computed by the math module.
  make, shape = LINEN["dense"]
  x = _cnormal(jax.random.key(1), shape)
  sn, wn = flaxnorm.spectral_norm(make()), flaxnorm.weight_norm(make())
  variables = sn.init(jax.random.key(0), x)
  state = variables["spectral"]
  params = wn.init(jax.random.key(0), x)["params"]
  params = {**params, "kernel_g": params["kernel_g"] * jnp.array([[0.5, 1.0, 2.0]])}

  def losses(sn_params, wn_params):
    y, upd = sn.apply({"params": sn_params, "spectral": state}, x, mutable=["spectral"])
    return _loss(y) + _loss(wn.apply({"params": wn_params}, x)), upd["spectral"]

  def plain_losses(sn_params, wn_params):
    w_sn, new = flaxnorm.spectral_normalize(
      sn_params["kernel"], state["kernel_u"], state["kernel_v"]
    )
    w_wn = flaxnorm.weight_norm_compose(wn_params["kernel_g"], wn_params["kernel_v"])
    y_sn = make().apply({"params": {**sn_params, "kernel": w_sn}}, x)
    y_wn = make().apply({"params": {"kernel": w_wn, "bias": wn_params["bias"]}}, x)
    return _loss(y_sn) + _loss(y_wn), new

  args = (variables["params"], params)
  (l1, s1), g1 = jax.jit(jax.value_and_grad(losses, (0, 1), has_aux=True))(*args)
  (l2, s2), g2 = jax.jit(jax.value_and_grad(plain_losses, (0, 1), has_aux=True))(*args)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  chex.assert_trees_all_close(g1, g2, atol=1e-4, rtol=1e-5)
  chex.assert_tree_all_finite(g1)
  assert g1[1]["kernel_g"].dtype == jnp.float32  # a real param gets a real gradient
  chex.assert_trees_all_close(s1["kernel_u"], s2.u, atol=1e-6)
  assert float(jnp.abs(g1[0]["kernel"]).max()) > 0


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
  params = {
    "a": {"kernel": _cnormal(jax.random.key(0), SHAPES["dense"]), "bias": jnp.zeros(3, C64)}
  }
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
