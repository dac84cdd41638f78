"""Tests of the pytree API with a Linen apply, a hand-written jnp MLP and equinox."""

from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import FrozenDict, freeze

import flaxnorm
import flaxnorm.tree as ft

X = jax.random.normal(jax.random.key(1), (2, 4))


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(5)(x))
    return nn.Dense(3)(x)


def _linen():
  model = MLP()
  return model, model.init(jax.random.key(0), X)["params"]


def _jnp_mlp():
  """A hand-written MLP: a list of layers, weights named 'w', PyTorch layout (out, in)."""
  k1, k2 = jax.random.split(jax.random.key(3))
  params = [
    {"w": jax.random.normal(k1, (5, 4)), "b": jnp.zeros(5)},
    {"w": jax.random.normal(k2, (3, 5)), "b": jnp.zeros(3)},
  ]

  def apply(params, x):
    for i, layer in enumerate(params):
      x = x @ layer["w"].T + layer["b"]
      x = jax.nn.relu(x) if i == 0 else x
    return x

  return params, apply


def _top_sigma(w, axis=-1):
  return float(np.linalg.svd(np.asarray(flaxnorm.as_matrix(w, axis)), compute_uv=False)[0])


def _loops(fn, *args):
  text = str(jax.make_jaxpr(fn)(*args))
  return "scan[" in text or "while[" in text


# --------------------------------------------------------------------------- #
# Weight norm
# --------------------------------------------------------------------------- #


def test_weight_norm_linen_apply_layout_output_grads_training():
  model, params = _linen()
  wn = ft.weight_norm_init(params)
  layer = flaxnorm.weight_norm(nn.Dense(3)).init(jax.random.key(0), jnp.ones((1, 5)))["params"]
  assert jax.tree.map(jnp.shape, wn["Dense_1"]) == jax.tree.map(jnp.shape, layer)
  chex.assert_trees_all_equal(wn["Dense_0"]["kernel_v"], params["Dense_0"]["kernel"])
  chex.assert_trees_all_close(
    model.apply({"params": ft.weight_norm_apply(wn)}, X),
    model.apply({"params": params}, X),
    atol=1e-6,
  )
  # Folding with the Linen face's remover gives the same tree.
  chex.assert_trees_all_close(flaxnorm.remove_weight_norm(wn), ft.weight_norm_apply(wn))

  def loss_fn(wn):
    return jnp.mean((model.apply({"params": ft.weight_norm_apply(wn)}, X) - 1.0) ** 2)

  grads = jax.grad(loss_fn)(wn)
  for layer in grads.values():
    assert float(jnp.abs(layer["kernel_g"]).sum()) > 0
    assert float(jnp.abs(layer["kernel_v"]).sum()) > 0
  tx = optax.adam(1e-2)
  opt_state = tx.init(wn)

  @jax.jit
  def step(wn, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(wn)
    updates, opt_state = tx.update(grads, opt_state, wn)
    return optax.apply_updates(wn, updates), opt_state, loss

  new, opt_state, loss0 = step(wn, opt_state)
  for _ in range(3):
    new, opt_state, loss = step(new, opt_state)
  assert float(loss) < float(loss0)
  assert float(jnp.abs(new["Dense_0"]["kernel_g"] - wn["Dense_0"]["kernel_g"]).min()) > 0


def test_weight_norm_hand_written_mlp_with_predicate():
  params, apply = _jnp_mlp()
  wn = ft.weight_norm_init(params, names=lambda path, x: x.ndim == 2, axis=0)
  assert jax.tree.map(jnp.shape, wn) == [
    {"b": (5,), "w_g": (5, 1), "w_v": (5, 4)},
    {"b": (3,), "w_g": (3, 1), "w_v": (3, 5)},
  ]
  chex.assert_trees_all_close(apply(ft.weight_norm_apply(wn), X), apply(params, X), atol=1e-5)
  grads = jax.grad(lambda wn: jnp.sum(apply(ft.weight_norm_apply(wn), X) ** 2))(wn)
  assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))
  # Leaves with no dict parent become WeightNormParam nodes.
  weights = [layer["w"] for layer in params]
  wn_list = ft.weight_norm_init(weights, names=lambda path, x: True, axis=0)
  assert all(isinstance(x, ft.WeightNormParam) for x in wn_list)
  chex.assert_trees_all_close(ft.weight_norm_apply(wn_list), weights, atol=1e-6)


def test_weight_norm_frozen_dict_and_whole_tensor():
  _, params = _linen()
  wn = ft.weight_norm_init(params, axis=None)
  assert wn["Dense_0"]["kernel_g"].shape == ()
  frozen = ft.weight_norm_init(freeze(params))
  assert isinstance(frozen, FrozenDict) and isinstance(frozen["Dense_0"], FrozenDict)
  assert isinstance(ft.weight_norm_apply(frozen), FrozenDict)


def test_equinox_partitioned_model():
  eqx = pytest.importorskip("equinox")
  model = eqx.nn.MLP(4, 3, 5, 1, key=jax.random.key(0))
  params, static = eqx.partition(model, eqx.is_array)
  x = X[0]
  # equinox's Linear weight is (out, in): keep axis 0.
  wn = ft.weight_norm_init(params, names="weight", axis=0)
  assert isinstance(wn.layers[0].weight, ft.WeightNormParam)
  assert wn.layers[0].weight.g.shape == (5, 1)
  rebuilt = eqx.combine(ft.weight_norm_apply(wn), static)
  chex.assert_trees_all_close(rebuilt(x), model(x), atol=1e-6)
  grads = jax.grad(lambda wn: jnp.sum(eqx.combine(ft.weight_norm_apply(wn), static)(x)))(wn)
  assert float(jnp.abs(grads.layers[0].weight.g).sum()) > 0

  state = ft.spectral_norm_init(params, jax.random.key(1), names="weight", axis=0)
  assert jax.tree.map(jnp.shape, state) == {
    "layers": {
      "0": {"weight_sigma": (), "weight_u": (5,), "weight_v": (4,)},
      "1": {"weight_sigma": (), "weight_u": (3,), "weight_v": (5,)},
    }
  }
  sn, state = ft.spectral_norm_apply(params, state, update=True, axis=0)
  np.testing.assert_allclose(_top_sigma(sn.layers[1].weight, 0), 1.0, rtol=1e-4)
  assert eqx.combine(sn, static)(x).shape == (3,)


# --------------------------------------------------------------------------- #
# Spectral norm
# --------------------------------------------------------------------------- #


def test_spectral_norm_layout_matches_linen_and_sigma_is_one():
  model, params = _linen()
  state = ft.spectral_norm_init(params, jax.random.key(0))
  linen = flaxnorm.spectral_norm(nn.Dense(3)).init(jax.random.key(0), jnp.ones((1, 5)))
  assert jax.tree.map(jnp.shape, state["Dense_1"]) == jax.tree.map(jnp.shape, linen["spectral"])
  sn, _ = ft.spectral_norm_apply(params, state, update=True)
  for name in ("Dense_0", "Dense_1"):
    np.testing.assert_allclose(_top_sigma(sn[name]["kernel"]), 1.0, rtol=1e-4)
    chex.assert_trees_all_equal(sn[name]["bias"], params[name]["bias"])
  assert model.apply({"params": sn}, X).shape == (2, 3)
  # The Linen remover folds the same layout to the eval params.
  folded = flaxnorm.remove_spectral_norm({"params": params, "spectral": state})
  eval_params, _ = ft.spectral_norm_apply(params, state, update=False)
  chex.assert_trees_all_close(folded["params"], eval_params, atol=1e-6)


def test_spectral_norm_update_false_changes_nothing_and_runs_no_iteration():
  _, params = _linen()
  # One iteration: u^T W v of a random (u, v) can be negative; after one it is ||W v||.
  state = ft.spectral_norm_init(params, jax.random.key(0), n_init_iterations=1)
  sn, same = ft.spectral_norm_apply(params, state, update=False)
  assert same is state
  w, s = params["Dense_0"]["kernel"], state["Dense_0"]
  sigma = s["kernel_u"] @ w.T @ s["kernel_v"]
  chex.assert_trees_all_close(sn["Dense_0"]["kernel"], w / sigma, atol=1e-6)
  assert not _loops(lambda p, s: ft.spectral_norm_apply(p, s, update=False), params, state)
  assert _loops(lambda p, s: ft.spectral_norm_apply(p, s, update=True), params, state)


def test_spectral_norm_update_true_iterates_from_stored_state():
  params, apply = _jnp_mlp()
  state = ft.spectral_norm_init(params, jax.random.key(0), names="w", axis=0, n_init_iterations=0)
  step = jax.jit(
    lambda p, s: ft.spectral_norm_apply(p, s, update=True, n_power_iterations=3, axis=0)
  )
  sn, new = step(params, state)
  s0 = state["1"]
  want_w, want = flaxnorm.spectral_normalize(
    params[1]["w"], s0["w_u"], s0["w_v"], axis=0, n_steps=3
  )
  chex.assert_trees_all_close(
    (new["1"]["w_u"], new["1"]["w_v"], new["1"]["w_sigma"]), tuple(want), atol=1e-6
  )
  chex.assert_trees_all_close(sn[1]["w"], want_w, atol=1e-6)
  assert float(jnp.abs(new["1"]["w_u"] - s0["w_u"]).max()) > 1e-3
  # Gradient flows to w (through sigma too), never to the state.
  grads = jax.grad(
    lambda p, s: jnp.sum(apply(ft.spectral_norm_apply(p, s, update=True, axis=0)[0], X)),
    argnums=(0, 1),
  )(params, state)
  assert float(jnp.abs(grads[0][0]["w"]).sum()) > 0
  assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree.leaves(grads[1]))


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #


def test_error_unmatched_names_list_the_paths():
  _, params = _linen()
  with pytest.raises(ValueError, match=r"names \['weight'\] matched no array leaf.*'Dense_0/bias'"):
    ft.weight_norm_init(params, names=("kernel", "weight"))
  with pytest.raises(ValueError, match=r"the path predicate matched no array leaf.*Dense_1/kernel"):
    ft.spectral_norm_init(params, jax.random.key(0), names=lambda p, x: False)
  wn = ft.weight_norm_init(params)
  with pytest.raises(ValueError, match=r"was weight_norm_init applied already"):
    ft.weight_norm_init(wn)
  with pytest.raises(ValueError, match=r"already has a 'kernel_g'"):
    ft.weight_norm_init({**wn, "x": {"kernel": jnp.ones((2, 2)), "kernel_g": jnp.ones((1, 2))}})
  with pytest.raises(ValueError, match=r"found no \{x\}_g/\{x\}_v pair"):
    ft.weight_norm_apply(params)


def test_error_leaf_types_and_shapes():
  with pytest.raises(TypeError, match=r"'a/kernel' must be a floating-point array"):
    ft.weight_norm_init({"a": {"kernel": jnp.ones((2, 2), jnp.int32)}})
  boxed = {"a": {"kernel": nn.Partitioned(jnp.ones((2, 2)), names=("x", "y"))}}
  with pytest.raises(TypeError, match=r"'a/kernel' is a Partitioned.*unbox"):
    ft.weight_norm_init(boxed)
  with pytest.raises(ValueError, match=r"unbox it first"):
    ft.spectral_norm_init(boxed, jax.random.key(0), names=lambda p, x: True)
  with pytest.raises(ValueError, match=r"at least 2 dims at tree path 'a/kernel'"):
    ft.spectral_norm_init({"a": {"kernel": jnp.ones(3)}}, jax.random.key(0))
  with pytest.raises(ValueError, match=r"axis 2 is out of range at tree path 'a/kernel'"):
    ft.weight_norm_init({"a": {"kernel": jnp.ones((2, 2))}}, axis=2)
  with pytest.raises(ValueError, match=r"tree path 'a/kernel' is a scalar \(0 dims\)"):
    ft.weight_norm_init({"a": {"kernel": jnp.ones(())}})
  with pytest.raises(ValueError, match=r"single array"):
    ft.weight_norm_init(jnp.ones((2, 2)), names=lambda p, x: True)
  with pytest.raises(TypeError, match=r"key at spectral_norm_init must be one PRNG key"):
    ft.spectral_norm_init({"kernel": jnp.ones((2, 2))}, 0)


def test_error_state_does_not_fit_params():
  params = {"a": {"kernel": jnp.ones((4, 3))}, "b": {"kernel": jnp.ones((3, 3))}}
  state = ft.spectral_norm_init(params, jax.random.key(0))
  with pytest.raises(ValueError, match=r"params have no leaf 'b/kernel'.*\['a/kernel'\]"):
    ft.spectral_norm_apply({"a": params["a"]}, state, update=True)
  with pytest.raises(
    ValueError, match=r"'a/kernel' of shape \(4, 3\) does not fit its state.*axis=0"
  ):
    ft.spectral_norm_apply(params, state, update=True, axis=0)
  with pytest.raises(ValueError, match=r"unexpected state entry 'a/extra'"):
    ft.spectral_norm_apply(params, {**state, "a": {**state["a"], "extra": 1.0}}, update=True)
  with pytest.raises(ValueError, match=r"lacks \['kernel_sigma'\]"):
    partial = {k: x for k, x in state["a"].items() if k != "kernel_sigma"}
    ft.spectral_norm_apply(params, {"a": partial}, update=True)
  with pytest.raises(TypeError, match=r"update must be a (Python )?bool"):
    ft.spectral_norm_apply(params, state, update=jnp.array(True))
  # An empty state (the wrong collection, or variables.get("spectral", {})) normalized nothing.
  for empty in ({}, {"a": {}}):
    with pytest.raises(ValueError, match=r"the state holds no \{x\}_u/\{x\}_v/\{x\}_sigma"):
      ft.spectral_norm_apply(params, empty, update=True)
  ints = jax.tree.map(lambda a: a.astype(jnp.int32), state)
  with pytest.raises(TypeError, match=r"stored kernel_u at .*'a/kernel' must be a floating"):
    ft.spectral_norm_apply(params, ints, update=False)
  with pytest.raises(ValueError, match=r"n_power_iterations must be >= 1"):
    ft.spectral_norm_apply(params, state, update=True, n_power_iterations=0)


class _Layer(NamedTuple):
  weight: Any


def test_error_normalizing_twice_is_refused():
  """A leaf flaxnorm made (a g/v pair, a WeightNormParam, spectral state) is never split again."""
  params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
  matrices = lambda path, x: x.ndim >= 2
  wn = ft.weight_norm_init(params, name=matrices)
  with pytest.raises(
    ValueError, match=r"tree path 'dense/kernel_g' is part of the weight-norm pair"
  ):
    ft.weight_norm_init(wn, name=matrices)
  with pytest.raises(ValueError, match=r"'dense/kernel_v' is part of .*weight-normalized already"):
    ft.weight_norm_init(wn, name="kernel_v")
  with pytest.raises(ValueError, match=r"spectral_norm_init: .*'dense/kernel_g' is part of"):
    ft.spectral_norm_init(wn, jax.random.key(0), name=matrices)
  listed = ft.weight_norm_init([jnp.ones((4, 3))], name=matrices)
  with pytest.raises(ValueError, match=r"tree path '0/g' is part of a WeightNormParam"):
    ft.weight_norm_init(listed, name=matrices)
  named = ft.weight_norm_init([_Layer(jnp.ones((4, 3)))], name="weight")  # equinox-style field
  with pytest.raises(ValueError, match=r"'0/weight' is a WeightNormParam: .*already"):
    ft.weight_norm_init(named, name="weight")
  state = ft.spectral_norm_init(params, jax.random.key(0))
  with pytest.raises(
    ValueError, match=r"'spectral/dense/kernel_sigma' is part of the spectral state"
  ):
    ft.weight_norm_init({"params": params, "spectral": state}, name=lambda p, x: p[0] != "params")
  # Other leaves of the same tree still can be selected.
  mixed = {**wn, "head": {"kernel": jnp.ones((3, 2))}}
  assert set(ft.weight_norm_init(mixed, name="kernel")["head"]) == {"kernel_g", "kernel_v"}


@pytest.mark.parametrize("init", ["weight_norm_init", "spectral_norm_init"])
def test_error_name_and_names_both_given(init):
  p = {"d": {"kernel": jnp.ones((4, 3)), "weight": jnp.ones((4, 3))}}
  run = {
    "weight_norm_init": lambda **kw: ft.weight_norm_init(p, **kw),
    "spectral_norm_init": lambda **kw: ft.spectral_norm_init(p, jax.random.key(0), **kw),
  }[init]
  for name in ("kernel", "weight"):  # "kernel" is the default, still an explicit choice
    with pytest.raises(TypeError, match=rf"{init}: pass name= or names="):
      run(name=name, names="weight")

  def wrapped(out):
    return {k[:-2] for k in out["d"] if k.endswith(("_g", "_u"))}

  assert wrapped(run(names="weight")) == {"weight"} and wrapped(run()) == {"kernel"}


@pytest.mark.parametrize("name", [3, None])
def test_error_name_of_the_wrong_type(name):
  with pytest.raises(TypeError) as info:
    ft.weight_norm_init({"kernel": jnp.ones((4, 3))}, name=name)
  assert "name must be" in str(info.value)


def test_error_weight_norm_apply_names_the_tree_path():
  v = jnp.ones((4, 3))

  def trees(g):
    return {
      "layers/0": {"layers": [ft.WeightNormParam(g, v)]},
      "d/kernel": {"d": {"kernel_g": g, "kernel_v": v}},
    }

  for path, tree in trees(jnp.ones((1, 5))).items():
    with pytest.raises(ValueError, match=rf"g of tree path '{path}' has shape \(1, 5\)") as info:
      ft.weight_norm_apply(tree)
    assert "weight_norm_compose" not in str(info.value)
  for path, tree in trees(jnp.ones((1, 3), jnp.int32)).items():
    with pytest.raises(TypeError, match=rf"g at tree path '{path}' must be a floating") as info:
      ft.weight_norm_apply(tree)
    assert "weight_norm_compose" not in str(info.value)
  # A scalar g and a g with every axis reduced still compose.
  for g in (jnp.ones(()), jnp.ones((1, 1))):
    assert ft.weight_norm_apply({"kernel_g": g, "kernel_v": v})["kernel"].shape == (4, 3)


def test_error_spectral_key_not_a_key():
  params = {"dense": {"kernel": jnp.ones((4, 3))}}
  for key in (jnp.array(0), jnp.zeros(3, jnp.uint32), jax.random.split(jax.random.key(0))):
    with pytest.raises(TypeError, match=r"key at spectral_norm_init must be one PRNG key"):
      ft.spectral_norm_init(params, key)
    with pytest.raises(TypeError, match=r"key at flaxnorm.tree.spectral_norm must be one PRNG"):
      ft.spectral_norm().init(params, key)
  assert ft.spectral_norm_init(params, jax.random.PRNGKey(0))["dense"]["kernel_u"].shape == (3,)


def test_error_nnx_state_points_at_the_nnx_face():
  """An nnx.State holds Variables, not arrays: the message says where to go."""
  from flax import nnx

  state = nnx.state(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
  with pytest.raises(TypeError, match=r"weight_norm_init: params holds nnx.Variable.*flaxnorm.nnx"):
    ft.weight_norm_init(state)
  with pytest.raises(
    TypeError, match=r"spectral_norm_init: params holds nnx.Variable.*to_pure_dict"
  ):
    ft.spectral_norm_init(state, jax.random.key(0))
  assert set(ft.weight_norm_init(nnx.to_pure_dict(state))) == {"kernel_g", "kernel_v", "bias"}
  arrays = nnx.State(nnx.to_pure_dict(state))  # a State of arrays is a tree of arrays
  assert set(ft.weight_norm_init(arrays)) == {"kernel_g", "kernel_v", "bias"}


def test_frozen_state_keeps_its_type_so_it_can_be_a_scan_carry():
  params = {"d": {"kernel": jax.random.normal(jax.random.key(0), (4, 3))}}
  state = freeze(ft.spectral_norm_init(params, jax.random.key(1)))
  _, new = ft.spectral_norm_apply(params, state, update=True)
  assert isinstance(new, FrozenDict)

  def step(s, _):
    return ft.spectral_norm_apply(params, s, update=True)[1], None

  out, _ = jax.lax.scan(step, state, None, length=2)
  chex.assert_trees_all_close(out["d"]["kernel_sigma"], state["d"]["kernel_sigma"], rtol=1e-5)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_state_of_a_non_finite_weight_keeps_finite_vectors_and_a_loud_sigma(bad):
  """The vectors keep their start; sigma is not finite (operator-mode evaluation divides by it:
  0 there would give the unnormalized kernel, silently); training replaces it."""
  w = jax.random.normal(jax.random.key(0), (4, 3)).at[0, 0].set(bad)
  state = ft.spectral_norm_init({"d": {"kernel": w}}, jax.random.key(1))
  assert not bool(jnp.isfinite(state["d"]["kernel_sigma"]))
  assert all(bool(jnp.isfinite(state["d"][k]).all()) for k in ("kernel_u", "kernel_v"))
  params = {"d": {"kernel": jnp.nan_to_num(w)}}  # real weights arrive
  _, state = ft.spectral_norm_apply(params, state, update=True)
  assert bool(jnp.isfinite(state["d"]["kernel_sigma"]))


def test_error_g_of_another_rank_says_what_g_must_be():
  """It said 'expected (4, 1)', a shape guessed from the bad g."""
  with pytest.raises(
    ValueError, match=r"kernel_g at tree path 'd/kernel' has shape \(3,\): it must have"
  ):
    ft.weight_norm_apply({"d": {"kernel_g": jnp.ones(3), "kernel_v": jnp.ones((4, 3))}})
