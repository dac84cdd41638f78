"""One core, three faces: Linen, NNX and pytree give the same outputs, gradients and state.

Each test starts the three faces from the same weights and the same
(unconverged) power-iteration vectors, runs one training and one evaluation
call, and compares outputs, gradients and state updates to 1e-6 (absolute and
relative: Linen's Dense and Conv scale their output rather than their kernel,
which rounds in a different order).
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import flaxnorm
import flaxnorm.nnx as fnx
import flaxnorm.tree as ft

# float32 rounding: a conv's weight gradient sums over every position, so two
# rounding orders differ by more than a Dense's (the paths agree to 1e-13 in
# float64: test_linen.py::test_output_scaling_is_exact).
TOL = {"dense": {"atol": 1e-6, "rtol": 1e-6}, "conv": {"atol": 1e-5, "rtol": 2e-5}}

# (Linen layer, NNX layer, input shape)
LAYERS = {
  "dense": (lambda: nn.Dense(3), lambda: nnx.Linear(4, 3, rngs=nnx.Rngs(9)), (2, 4)),
  "conv": (
    lambda: nn.Conv(4, (3, 3)),
    lambda: nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(9)),
    (2, 5, 5, 3),
  ),
}


def _setup(kind):
  linen, make_nnx, shape = LAYERS[kind]
  x = jax.random.normal(jax.random.key(1), shape)
  # A weighted loss so that every output entry matters differently.
  c = jax.random.normal(jax.random.key(2), (shape[0], *[1] * (len(shape) - 2), 1))
  return linen, make_nnx, x, lambda y: jnp.sum(c * y**2)


def _load(layer, values):
  """Writes a dict of arrays into the NNX layer's variables of the same names."""
  for name, value in values.items():
    vars(layer)[name][...] = value


@pytest.mark.parametrize("kind", list(LAYERS))
def test_weight_norm_faces_agree(kind):
  linen, make_nnx, x, loss = _setup(kind)
  wrapped = flaxnorm.weight_norm(linen())
  params = wrapped.init(jax.random.key(0), x)["params"]
  # Move g away from ||v|| so that g and v both matter.
  params = {**params, "kernel_g": params["kernel_g"] * (1.5 + jnp.arange(params["kernel_g"].size))}

  def linen_loss(p):
    y = wrapped.apply({"params": p}, x)
    return loss(y), y

  (_, y_linen), g_linen = jax.value_and_grad(linen_loss, has_aux=True)(params)

  layer = fnx.weight_norm(make_nnx())
  _load(layer, params)

  def nnx_loss(layer):
    y = layer(x)
    return loss(y), y

  (_, y_nnx), g_nnx = nnx.value_and_grad(nnx_loss, has_aux=True)(layer)

  plain = linen()

  def tree_loss(p):
    y = plain.apply({"params": ft.weight_norm_apply(p)}, x)
    return loss(y), y

  (_, y_tree), g_tree = jax.value_and_grad(tree_loss, has_aux=True)(params)

  chex.assert_trees_all_close(y_nnx, y_linen, **TOL[kind])
  chex.assert_trees_all_close(y_tree, y_linen, **TOL[kind])
  assert float(jnp.abs(g_linen["kernel_g"]).sum()) > 0
  chex.assert_trees_all_close(nnx.to_pure_dict(g_nnx), g_linen, **TOL[kind])
  chex.assert_trees_all_close(g_tree, g_linen, **TOL[kind])
  # Removal agrees too.
  folded = flaxnorm.remove_weight_norm({"params": params})["params"]
  fnx.remove_weight_norm(layer)
  chex.assert_trees_all_close(nnx.to_pure_dict(nnx.state(layer, nnx.Param)), folded, **TOL[kind])
  chex.assert_trees_all_close(ft.weight_norm_apply(params), folded, **TOL[kind])


@pytest.mark.parametrize("kind", list(LAYERS))
def test_spectral_norm_faces_agree(kind):
  linen, make_nnx, x, loss = _setup(kind)
  n_iter = 2
  wrapped = flaxnorm.spectral_norm(linen(), n_power_iterations=n_iter)
  variables = wrapped.init(jax.random.key(0), x)
  params = variables["params"]
  # The same unconverged start for every face, so the iteration visibly moves.
  spectral = variables["spectral"]
  ku, kv = jax.random.split(jax.random.key(3))
  u0 = flaxnorm.l2_normalize(jax.random.normal(ku, spectral["kernel_u"].shape))
  v0 = flaxnorm.l2_normalize(jax.random.normal(kv, spectral["kernel_v"].shape))
  state = {"kernel_u": u0, "kernel_v": v0, "kernel_sigma": jnp.zeros(())}

  # --- training: iterate, store, differentiate -------------------------------
  def linen_loss(p):
    y, updates = wrapped.apply({"params": p, "spectral": state}, x, mutable=["spectral"])
    return loss(y), (y, updates["spectral"])

  (_, (y_linen, s_linen)), g_linen = jax.value_and_grad(linen_loss, has_aux=True)(params)

  layer = fnx.spectral_norm(make_nnx(), n_power_iterations=n_iter)
  _load(layer, {**params, **state})

  def nnx_loss(layer):
    y = layer(x)
    return loss(y), y

  (_, y_nnx), g_nnx = nnx.value_and_grad(nnx_loss, has_aux=True)(layer)
  s_nnx = nnx.to_pure_dict(nnx.state(layer, fnx.SpectralStateVar))

  plain = linen()

  def tree_loss(p, update):
    sn, s = ft.spectral_norm_apply(p, state, update=update, n_power_iterations=n_iter)
    return loss(plain.apply({"params": sn}, x)), (plain.apply({"params": sn}, x), s)

  (_, (y_tree, s_tree)), g_tree = jax.value_and_grad(tree_loss, has_aux=True)(params, True)

  assert float(jnp.abs(s_linen["kernel_u"] - u0).max()) > 1e-3  # the state moved
  chex.assert_trees_all_close(y_nnx, y_linen, **TOL[kind])
  chex.assert_trees_all_close(y_tree, y_linen, **TOL[kind])
  chex.assert_trees_all_close(nnx.to_pure_dict(g_nnx), g_linen, **TOL[kind])
  chex.assert_trees_all_close(g_tree, g_linen, **TOL[kind])
  chex.assert_trees_all_close(s_nnx, s_linen, **TOL[kind])
  chex.assert_trees_all_close(s_tree, s_linen, **TOL[kind])

  # --- evaluation from the updated state: nothing moves -----------------------
  def linen_eval(p):
    return loss(y := wrapped.apply({"params": p, "spectral": s_linen}, x)), y

  (_, y_linen), g_linen = jax.value_and_grad(linen_eval, has_aux=True)(params)
  layer.eval()
  (_, y_nnx), g_nnx = nnx.value_and_grad(nnx_loss, has_aux=True)(layer)
  state = s_tree
  (_, (y_tree, s_same)), g_tree = jax.value_and_grad(tree_loss, has_aux=True)(params, False)

  chex.assert_trees_all_close(y_nnx, y_linen, **TOL[kind])
  chex.assert_trees_all_close(y_tree, y_linen, **TOL[kind])
  chex.assert_trees_all_close(nnx.to_pure_dict(g_nnx), g_linen, **TOL[kind])
  chex.assert_trees_all_close(g_tree, g_linen, **TOL[kind])
  chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(layer, fnx.SpectralStateVar)), s_nnx)
  chex.assert_trees_all_equal(s_same, s_tree)

  # --- removal: every face folds to the same plain kernel ---------------------
  folded = flaxnorm.remove_spectral_norm({"params": params, "spectral": s_linen})["params"]
  fnx.remove_spectral_norm(layer)
  chex.assert_trees_all_close(nnx.to_pure_dict(nnx.state(layer, nnx.Param)), folded, **TOL[kind])
  chex.assert_trees_all_close(
    ft.spectral_norm_apply(params, s_tree, update=False)[0], folded, **TOL[kind]
  )


def test_nnx_sequential_state_through_the_tree_face_and_removal():
  """nnx.Sequential's state has int keys: the tree face and remove_* read it like str keys."""
  model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
  fnx.wrap_modules(model, fnx.spectral_norm, where=nnx.Linear)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  state = nnx.to_pure_dict(nnx.state(model, fnx.SpectralStateVar))
  assert 0 in params["layers"]
  x = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
  y_train = model(x)  # one power iteration per layer, as update=True below
  out, new_state = flaxnorm.tree.spectral_norm_apply(params, state, update=True)
  chex.assert_trees_all_close(new_state, nnx.to_pure_dict(nnx.state(model, fnx.SpectralStateVar)))
  h = x  # nnx.Sequential chains the layers, no activation between
  for i in (0, 1):
    h = h @ out["layers"][i]["kernel"] + out["layers"][i]["bias"]
  chex.assert_trees_all_close(h, y_train, rtol=1e-6, atol=1e-6)
  model.eval()
  folded = flaxnorm.remove_spectral_norm({"params": params, "spectral": new_state})
  assert sorted(folded) == ["params"] and 1 in folded["params"]["layers"]
  evaluated, same = flaxnorm.tree.spectral_norm_apply(params, new_state, update=False)
  assert same is new_state
  chex.assert_trees_all_close(folded["params"], evaluated, rtol=1e-6)
  fnx.remove_spectral_norm(model)
  chex.assert_trees_all_close(nnx.to_pure_dict(nnx.state(model, nnx.Param)), folded["params"])
