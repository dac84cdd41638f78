"""Tests of the NNX transforms: output, gradients, training, train/eval, removal, nesting, errors."""

import copy
import pickle

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flaxnorm
import flaxnorm.nnx as fnx
from flaxnorm.nnx import SpectralStateVar

# (layer factory, input, wrap kwargs): every NNX layer kind the issue names.
LAYERS = {
  "linear": (lambda r: nnx.Linear(4, 3, rngs=r), (2, 4), {}),
  "linear_general": (
    lambda r: nnx.LinearGeneral(4, (2, 3), rngs=r),
    (2, 4),
    {"axis": (-2, -1)},
  ),
  "conv": (lambda r: nnx.Conv(4, 6, (3, 3), feature_group_count=2, rngs=r), (2, 5, 5, 4), {}),
  "conv_transpose": (lambda r: nnx.ConvTranspose(2, 3, (4,), strides=(2,), rngs=r), (2, 5, 2), {}),
  "embed": (lambda r: nnx.Embed(7, 4, rngs=r), None, {"name": "embedding", "axis": 0}),
}


def _layer(kind):
  make, shape, kwargs = LAYERS[kind]
  x = (
    jnp.array([[0, 3, 6], [1, 1, 2]])
    if shape is None
    else jax.random.normal(jax.random.key(1), shape)
  )
  return make, x, kwargs


def _pure(state):
  return nnx.to_pure_dict(state)


class Net(nnx.Module):
  """A user model with nested, listed and shared layers."""

  def __init__(self, rngs):
    self.encoder = nnx.Sequential(
      nnx.Linear(4, 8, rngs=rngs), nnx.relu, nnx.Linear(8, 8, rngs=rngs)
    )
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(8, 2, rngs=rngs)
    self.embed = nnx.Embed(5, 4, rngs=rngs)

  def __call__(self, x, ids):
    h = self.encoder(x + self.embed(ids))
    return self.head(self.dropout(h))


class TwoKernels(nnx.Module):
  """A user module with its own param names, two kernels and its own set_view."""

  def __init__(self, rngs):
    init = nnx.initializers.lecun_normal()
    self.w_in = nnx.Param(init(rngs.params(), (4, 5)))
    self.w_out = nnx.Param(init(rngs.params(), (5, 2)))
    self.deterministic = False

  def __call__(self, x):
    return jnp.tanh(x @ self.w_in[...]) @ self.w_out[...]

  def set_view(self, deterministic: bool | None = None):
    if deterministic is not None:
      self.deterministic = deterministic


def _net_inputs():
  return jax.random.normal(jax.random.key(2), (3, 4)), jnp.array([0, 2, 4])


# --------------------------------------------------------------------------- #
# Weight norm
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("kind", list(LAYERS))
def test_weight_norm_keeps_output_and_layout(kind):
  make, x, kwargs = _layer(kind)
  plain, layer = make(nnx.Rngs(0)), make(nnx.Rngs(0))
  name = kwargs.get("name", "kernel")
  w = vars(layer)[name][...]
  assert fnx.weight_norm(layer, **kwargs) is layer  # in place
  assert isinstance(layer, type(plain)) and type(layer).__name__ == type(plain).__name__
  chex.assert_trees_all_close(layer(x), plain(x), atol=1e-6, rtol=1e-6)
  params = _pure(nnx.state(layer, nnx.Param))
  assert name not in params
  g, v = params[f"{name}_g"], params[f"{name}_v"]
  chex.assert_trees_all_equal(v, w)
  axis = kwargs.get("axis", -1)
  kept = {a % w.ndim for a in (axis if isinstance(axis, tuple) else (axis,))}
  assert g.shape == tuple(n if i in kept else 1 for i, n in enumerate(w.shape))
  chex.assert_trees_all_close(getattr(layer, name), w, atol=1e-6)


def test_weight_norm_kernel_is_never_written_back():
  """google/flax#5576: nnx.WeightNorm overwrites the kernel on every call."""
  layer = fnx.weight_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
  layer.kernel_g[...] = 2.0 * layer.kernel_g[...]
  before = _pure(nnx.state(layer))
  for _ in range(2):
    layer(jnp.ones((1, 4)))
  chex.assert_trees_all_equal(_pure(nnx.state(layer)), before)
  # The computed kernel follows g: every column has norm g.
  np.testing.assert_allclose(
    jnp.linalg.norm(layer.kernel, axis=0), layer.kernel_g[...][0], rtol=1e-6
  )


def _train(model, steps, *args):
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, *args):
    def loss_fn(model):
      return jnp.mean((model(*args) - 1.0) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, grads

  losses = []
  for _ in range(steps):
    loss, grads = step(model, optimizer, *args)
    losses.append(float(loss))
  return losses, grads, optimizer


def test_weight_norm_gradients_and_optimizer_train_g_and_v():
  """google/flax#5577: nnx.WeightNorm's scales get no gradient and never train."""
  layer = fnx.weight_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
  g0, v0 = layer.kernel_g[...], layer.kernel_v[...]
  losses, grads, optimizer = _train(layer, 3, jnp.ones((2, 4)))
  grads = _pure(grads)
  assert set(grads) == {"bias", "kernel_g", "kernel_v"}
  assert float(jnp.abs(grads["kernel_g"]).sum()) > 0
  assert float(jnp.abs(grads["kernel_v"]).sum()) > 0
  assert float(jnp.abs(layer.kernel_g[...] - g0).min()) > 0
  assert float(jnp.abs(layer.kernel_v[...] - v0).max()) > 0
  assert losses[-1] < losses[0]
  opt_paths = {
    jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(optimizer.opt_state)
  }
  assert any("kernel_g" in p for p in opt_paths) and any("kernel_v" in p for p in opt_paths)


def test_weight_norm_jit_split_merge_and_class_cache():
  a = fnx.weight_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
  b = fnx.weight_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(1)))
  assert type(a) is type(b)  # one cached class: graphdefs compare equal, jit caches
  assert nnx.graphdef(a) == nnx.graphdef(b)
  x = jnp.ones((2, 4))
  chex.assert_trees_all_close(nnx.jit(lambda m, x: m(x))(a, x), a(x), atol=1e-6)
  graphdef, state = nnx.split(a)
  merged = nnx.merge(graphdef, state)
  assert type(merged) is type(a)
  chex.assert_trees_all_close(merged(x), a(x))
  # jax.jit on the pure pieces, and Modules as pytrees.
  y = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
  chex.assert_trees_all_close(y, a(x), atol=1e-6)
  chex.assert_trees_all_close(jax.jit(lambda m, x: m(x))(a, x), a(x), atol=1e-6)


def test_weight_norm_preserves_dtype():
  layer = nnx.Linear(4, 3, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  g, _ = flaxnorm.weight_norm_decompose(layer.kernel[...])
  fnx.weight_norm(layer)
  assert layer.kernel_g[...].dtype == g.dtype  # the core's choice (float32 at least)
  assert layer.kernel_v[...].dtype == jnp.bfloat16
  assert layer.kernel.dtype == jnp.bfloat16
  assert layer(jnp.ones((1, 4), jnp.bfloat16)).dtype == jnp.bfloat16


def test_weight_norm_whole_tensor_and_several_names():
  layer = fnx.weight_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), axis=None)
  assert layer.kernel_g[...].shape == ()
  layer = fnx.weight_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), name=("kernel", "bias"), axis=0)
  assert set(_pure(nnx.state(layer))) == {"kernel_g", "kernel_v", "bias_g", "bias_v"}
  fnx.remove_weight_norm(layer, name="bias")
  assert set(_pure(nnx.state(layer))) == {"kernel_g", "kernel_v", "bias"}


# --------------------------------------------------------------------------- #
# Spectral norm
# --------------------------------------------------------------------------- #


def _top_sigma(w, axis=-1):
  return float(np.linalg.svd(np.asarray(flaxnorm.as_matrix(w, axis)), compute_uv=False)[0])


@pytest.mark.parametrize("kind", list(LAYERS))
def test_spectral_norm_layout_and_sigma(kind):
  make, x, kwargs = _layer(kind)
  layer = make(nnx.Rngs(0))
  name, axis = kwargs.get("name", "kernel"), kwargs.get("axis", -1)
  w = vars(layer)[name][...]
  assert fnx.spectral_norm(layer, **kwargs) is layer
  state = _pure(nnx.state(layer, SpectralStateVar))
  m = flaxnorm.as_matrix(w, axis).shape
  assert jax.tree.map(jnp.shape, state) == {
    f"{name}_u": (m[0],),
    f"{name}_v": (m[1],),
    f"{name}_sigma": (),
  }
  assert set(_pure(nnx.state(layer, nnx.Param))) == set(
    _pure(nnx.state(make(nnx.Rngs(0)), nnx.Param))
  )
  layer.eval()
  w_sn = getattr(layer, name)
  np.testing.assert_allclose(_top_sigma(w_sn, axis), 1.0, rtol=1e-4)
  np.testing.assert_allclose(state[f"{name}_sigma"], _top_sigma(w, axis), rtol=1e-4)
  # The layer runs on exactly that kernel: compare with a plain layer holding it.
  plain = make(nnx.Rngs(0))
  vars(plain)[name][...] = w_sn
  chex.assert_trees_all_close(layer(x), plain(x), atol=1e-6)


def _power_iterated(w, u, v, n):
  _, state = flaxnorm.spectral_normalize(w, u, v, n_steps=n)
  return state


def test_spectral_norm_train_updates_eval_freezes():
  layer = fnx.spectral_norm(
    nnx.Linear(4, 3, rngs=nnx.Rngs(0)), n_init_iterations=0, n_power_iterations=2
  )
  x = jnp.ones((2, 4))
  w = layer.__dict__["kernel"][...]
  s0 = _pure(nnx.state(layer, SpectralStateVar))
  assert layer.use_running_average is False  # starts in training mode
  layer(x)
  s1 = _pure(nnx.state(layer, SpectralStateVar))
  want = _power_iterated(w, s0["kernel_u"], s0["kernel_v"], 2)
  chex.assert_trees_all_close(
    (s1["kernel_u"], s1["kernel_v"], s1["kernel_sigma"]), tuple(want), atol=1e-6
  )
  assert float(jnp.abs(s1["kernel_u"] - s0["kernel_u"]).max()) > 1e-3

  layer.eval()
  assert layer.use_running_average is True
  y_eval = layer(x)
  chex.assert_trees_all_equal(_pure(nnx.state(layer, SpectralStateVar)), s1)
  sigma = s1["kernel_u"] @ w.T @ s1["kernel_v"]  # matrix view: (out, in)
  chex.assert_trees_all_close(y_eval, x @ (w / sigma) + layer.bias[...], atol=1e-6)

  layer.train()
  layer(x)
  s2 = _pure(nnx.state(layer, SpectralStateVar))
  want = _power_iterated(w, s1["kernel_u"], s1["kernel_v"], 2)
  chex.assert_trees_all_close(s2["kernel_u"], want.u, atol=1e-6)
  assert float(jnp.abs(s2["kernel_u"] - s1["kernel_u"]).max()) > 0

  # nnx.view gives an eval copy without touching the original's mode.
  frozen = nnx.view(layer, use_running_average=True)
  frozen(x)
  chex.assert_trees_all_equal(_pure(nnx.state(layer, SpectralStateVar)), s2)
  assert layer.use_running_average is False


def _has_loop(jaxpr):
  # fori_loop with a static trip count lowers to scan; a dynamic one to while.
  text = str(jaxpr)
  return "scan[" in text or "while[" in text


def test_spectral_norm_uses_fori_loop_in_training_only():
  layer = fnx.spectral_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), n_power_iterations=5)

  def jaxpr_of_call():
    graphdef, state = nnx.split(layer)
    # A fresh function each time: make_jaxpr caches traces by function.
    return jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.ones((1, 4)))

  jaxpr = jaxpr_of_call()
  assert _has_loop(jaxpr) and "length=5" in str(jaxpr)
  layer.eval()
  assert not _has_loop(jaxpr_of_call())


def test_spectral_norm_grads_optimizer_and_state_outside_params():
  model = Net(nnx.Rngs(0))
  fnx.wrap_modules(model, fnx.spectral_norm, where=nnx.Linear, n_init_iterations=0)
  raw0 = model.head.__dict__["kernel"][...]
  u0 = model.head.kernel_u[...]
  assert "kernel_u" not in _pure(nnx.state(model, nnx.Param))["head"]
  assert set(_pure(nnx.state(model, SpectralStateVar))) == {"encoder", "head"}
  model.dropout.eval()  # deterministic dropout; the spectral layers stay in training
  losses, grads, optimizer = _train(model, 3, *_net_inputs())
  grads = _pure(grads)
  assert set(grads["head"]) == {"bias", "kernel"}  # no gradient entry for the state
  assert float(jnp.abs(grads["head"]["kernel"]).sum()) > 0
  opt_paths = {
    jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(optimizer.opt_state)
  }
  assert not any("kernel_u" in p or "kernel_sigma" in p for p in opt_paths)
  assert float(jnp.abs(model.head.__dict__["kernel"][...] - raw0).max()) > 0  # trained
  assert float(jnp.abs(model.head.kernel_u[...] - u0).max()) > 0  # iterated under jit+grad
  assert losses[-1] < losses[0]


def test_spectral_norm_kernel_is_never_written_back():
  """google/flax#5576: nnx.SpectralNorm overwrites the kernel on every call."""
  layer = fnx.spectral_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
  w0 = layer.__dict__["kernel"][...]
  for _ in range(3):
    layer(jnp.ones((1, 4)))
  chex.assert_trees_all_equal(layer.__dict__["kernel"][...], w0)


def test_spectral_norm_rngs_and_determinism():
  a = fnx.spectral_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), n_init_iterations=0, rngs=1)
  b = fnx.spectral_norm(
    nnx.Linear(4, 3, rngs=nnx.Rngs(0)), n_init_iterations=0, rngs=jax.random.key(1)
  )
  c = fnx.spectral_norm(
    nnx.Linear(4, 3, rngs=nnx.Rngs(0)), n_init_iterations=0, rngs=nnx.Rngs(spectral=5)
  )
  chex.assert_trees_all_equal(a.kernel_u[...], b.kernel_u[...])
  assert float(jnp.abs(a.kernel_u[...] - c.kernel_u[...]).max()) > 0
  # wrap_modules gives each layer its own key, even for identical layers.
  twins = nnx.List([nnx.Linear(4, 3, rngs=nnx.Rngs(0)), nnx.Linear(4, 3, rngs=nnx.Rngs(0))])
  fnx.wrap_modules(twins, fnx.spectral_norm, where=nnx.Linear, n_init_iterations=0, rngs=1)
  assert float(jnp.abs(twins[0].kernel_u[...] - twins[1].kernel_u[...]).max()) > 0


def test_user_module_both_transforms_and_set_view():
  module = TwoKernels(nnx.Rngs(0))
  x = jnp.ones((2, 4))
  y0 = module(x)
  fnx.weight_norm(module, name="w_in")
  fnx.spectral_norm(module, name="w_out")
  assert set(_pure(nnx.state(module, nnx.Param))) == {"w_in_g", "w_in_v", "w_out"}
  assert set(_pure(nnx.state(module, SpectralStateVar))) == {"w_out_u", "w_out_v", "w_out_sigma"}
  view = nnx.view(module, deterministic=True, use_running_average=True)
  assert view.deterministic is True and view.use_running_average is True
  assert module.deterministic is False and module.use_running_average is False
  with pytest.raises(ValueError, match=r"Unused keys"):
    nnx.view(module, not_an_attribute=True)
  chex.assert_trees_all_close(module.w_in, vars(TwoKernels(nnx.Rngs(0)))["w_in"][...], atol=1e-6)
  module.eval()
  y_eval = module(x)
  assert float(jnp.abs(y_eval - y0).max()) > 1e-3  # w_out is divided by sigma
  fnx.remove_spectral_norm(module)
  assert not hasattr(module, "use_running_average")
  fnx.remove_weight_norm(module)
  assert type(module) is TwoKernels
  chex.assert_trees_all_close(module(x), y_eval, atol=1e-6)


# --------------------------------------------------------------------------- #
# Removal, nesting, copies
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("method", ["weight_norm", "spectral_norm"])
def test_remove_round_trip(method):
  make, x, _ = _layer("conv")
  plain = make(nnx.Rngs(0))
  layer = getattr(fnx, method)(make(nnx.Rngs(0)))
  if method == "spectral_norm":
    layer(x)  # one training step
    layer.eval()
  y = layer(x)
  getattr(fnx, f"remove_{method}")(layer)
  assert type(layer) is nnx.Conv
  assert nnx.graphdef(layer) == nnx.graphdef(plain)  # no leftover attribute
  assert isinstance(layer.kernel, nnx.Param)
  chex.assert_trees_all_close(layer(x), y, atol=1e-6)
  getattr(fnx, method)(layer)  # can be wrapped again


def test_wrap_modules_by_filter_and_remove_all():
  model = Net(nnx.Rngs(0))
  model.shared = model.head  # the same layer at two paths is wrapped once
  x, ids = _net_inputs()
  model.eval()
  y0 = model(x, ids)
  fnx.wrap_modules(model, fnx.weight_norm, where=nnx.Linear)
  params = _pure(nnx.state(model, nnx.Param))
  for layer in (params["encoder"]["layers"][0], params["encoder"]["layers"][2], params["head"]):
    assert set(layer) == {"bias", "kernel_g", "kernel_v"}
  assert set(params["embed"]) == {"embedding"}
  assert model.shared is model.head
  chex.assert_trees_all_close(model(x, ids), y0, atol=1e-6)

  fnx.wrap_modules(
    model, fnx.spectral_norm, where=nnx.PathContains("embed"), name="embedding", axis=0
  )
  assert set(_pure(nnx.state(model, SpectralStateVar))) == {"embed"}
  model.eval()
  y1 = model(x, ids)
  fnx.remove_weight_norm(model)
  fnx.remove_spectral_norm(model)
  assert not any(hasattr(type(m), "_flaxnorm_specs") for _, m in nnx.iter_modules(model))
  assert type(model.head) is nnx.Linear and type(model.embed) is nnx.Embed
  chex.assert_trees_all_close(model(x, ids), y1, atol=1e-6)


def test_wrap_modules_is_atomic_and_names_the_path():
  model = Net(nnx.Rngs(0))
  before = nnx.graphdef(model)
  # The Embed has no 'kernel': nothing at all may be wrapped.
  with pytest.raises(ValueError, match=r"'kernel' of layer 'embed' \(Embed\).*\['embedding'\]"):
    fnx.wrap_modules(model, fnx.weight_norm, where=(nnx.Linear, nnx.Embed))
  assert nnx.graphdef(model) == before
  with pytest.raises(ValueError, match=r"no submodule matches.*encoder/layers/0 \(Linear\)"):
    fnx.wrap_modules(model, fnx.weight_norm, where=nnx.Conv)
  fnx.wrap_modules(model, fnx.weight_norm, where=nnx.Linear)
  with pytest.raises(ValueError, match=r"'kernel' of layer 'head' \(Linear\) is already wrapped"):
    fnx.wrap_modules(model, fnx.spectral_norm, where=nnx.PathContains("head"))


def test_copies_and_pickle():
  for method in (fnx.weight_norm, fnx.spectral_norm):
    layer = method(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    layer.eval()
    x = jnp.ones((1, 4))
    for other in (copy.deepcopy(layer), nnx.clone(layer), pickle.loads(pickle.dumps(layer))):
      assert type(other) is type(layer)
      chex.assert_trees_all_close(other(x), layer(x))


def test_update_from_state_keeps_variables():
  layer = fnx.spectral_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
  raw = layer.__dict__["kernel"]
  state = nnx.state(layer)
  state["kernel"][...] = jnp.zeros((4, 3))
  nnx.update(layer, state)
  assert layer.__dict__["kernel"] is raw
  chex.assert_trees_all_equal(raw[...], jnp.zeros((4, 3)))
  chex.assert_trees_all_equal(layer.kernel, jnp.zeros((4, 3)))  # zero kernel stays zero


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #


def test_error_not_an_nnx_module():
  with pytest.raises(
    TypeError, match=r"flax.nnx.Module.*For Linen modules use flaxnorm.weight_norm"
  ):
    fnx.weight_norm(nn.Dense(3))
  with pytest.raises(TypeError, match=r"flaxnorm.tree"):
    fnx.spectral_norm({"kernel": jnp.ones((2, 2))})
  with pytest.raises(TypeError, match=r"remove_weight_norm: module must be"):
    fnx.remove_weight_norm(nn.Dense(3))


def test_error_missing_name():
  with pytest.raises(
    ValueError, match=r"param 'kernel' of Embed does not exist.*\['embedding'\].*name='embedding'"
  ):
    fnx.weight_norm(nnx.Embed(5, 4, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"Flax's own wrapper"):
    fnx.spectral_norm(nnx.SpectralNorm(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0)))


def test_error_double_wrapping():
  layer = fnx.weight_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"'kernel' of Linear is already wrapped by weight_norm"):
    fnx.weight_norm(layer)
  with pytest.raises(ValueError, match=r"already wrapped by weight_norm"):
    fnx.spectral_norm(layer)
  layer = fnx.spectral_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"already wrapped by spectral_norm"):
    fnx.weight_norm(layer)
  with pytest.raises(ValueError, match=r"more than once"):
    fnx.weight_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), name=("kernel", "kernel"))


def test_error_unsupported_param():
  bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=r"'mean' of BatchNorm must be an nnx.Param, got BatchStat"):
    fnx.weight_norm(bn, name="mean")
  with pytest.raises(ValueError, match=r"at least 2 dims at param 'bias' of Linear"):
    fnx.spectral_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), name="bias")
  layer = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  layer.kernel = nnx.Param(jnp.ones((4, 3), jnp.int32))
  with pytest.raises(TypeError, match=r"param 'kernel' of Linear must be a floating-point array"):
    fnx.weight_norm(layer)


def test_error_bad_arguments():
  make = lambda: nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"axis 2 is out of range at param 'kernel' of Linear"):
    fnx.weight_norm(make(), axis=2)
  with pytest.raises(ValueError, match=r"eps must be a positive"):
    fnx.weight_norm(make(), eps=0.0)
  with pytest.raises(ValueError, match=r"n_power_iterations must be >= 1"):
    fnx.spectral_norm(make(), n_power_iterations=0)
  with pytest.raises(TypeError, match=r"n_init_iterations must be an int"):
    fnx.spectral_norm(make(), n_init_iterations=1.5)
  with pytest.raises(TypeError, match=r"axis must be an int"):
    fnx.spectral_norm(make(), axis=None)
  with pytest.raises(TypeError, match=r"rngs must be"):
    fnx.spectral_norm(make(), rngs="seed")
  with pytest.raises(TypeError, match=r"transform must be"):
    fnx.wrap_modules(make(), flaxnorm.weight_norm, where=nnx.Linear)
  with pytest.raises(TypeError, match=r"bad arguments for weight_norm"):
    fnx.wrap_modules(make(), fnx.weight_norm, where=nnx.Linear, n_power_iterations=2)


def test_error_assign_computed_and_remove_unwrapped():
  layer = fnx.weight_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
  with pytest.raises(AttributeError, match=r"computed from 'kernel_g' and 'kernel_v'"):
    layer.kernel = nnx.Param(jnp.ones((4, 3)))
  with pytest.raises(
    ValueError, match=r"no param of Linear or its submodules is wrapped by spectral_norm"
  ):
    fnx.remove_spectral_norm(layer)
  with pytest.raises(
    ValueError, match=r"named \['bias'\].*Wrapped by it: \['<top level>:kernel'\]"
  ):
    fnx.remove_weight_norm(layer, name="bias")
  nnx.pop(layer, nnx.Param)
  with pytest.raises(ValueError, match=r"needs the variable 'kernel_[gv]'"):
    layer(jnp.ones((1, 4)))


# --------------------------------------------------------------------------- #
# Output scaling: NNX's linear layers read the bare kernel and a zero bias;
# __call__ scales their output and adds the bias.
# --------------------------------------------------------------------------- #


class SubLinear(nnx.Linear):
  """A subclass may override __call__: it always reads the normalized kernel."""


class SubLinearGeneral(nnx.LinearGeneral):
  pass


class SubConv(nnx.Conv):
  pass


class SubConvTranspose(nnx.ConvTranspose):
  pass


# (fast class, kernel-scaling twin, args, kwargs, input shape)
SCALED = {
  "linear": (nnx.Linear, SubLinear, (4, 5), {}, (3, 4)),
  "linear_general": (nnx.LinearGeneral, SubLinearGeneral, (4, (2, 5)), {}, (3, 4)),
  "conv": (nnx.Conv, SubConv, (4, 6, (3,)), {"feature_group_count": 2}, (2, 7, 4)),
  "conv_transpose": (
    nnx.ConvTranspose,
    SubConvTranspose,
    (3, 4, (3,)),
    {"strides": (2,)},
    (2, 5, 3),
  ),
  "conv_transpose_kernel": (
    nnx.ConvTranspose,
    SubConvTranspose,
    (3, 4, (3, 3)),
    {"transpose_kernel": True},
    (2, 5, 5, 3),
  ),
}
SCALED_WRAPS = {
  "wn": lambda m: fnx.weight_norm(m),
  "wn_axis0": lambda m: fnx.weight_norm(m, axis=0),
  "sn": lambda m: fnx.spectral_norm(m, n_power_iterations=2, rngs=0),
  "sn_clip": lambda m: fnx.spectral_norm(m, mode="clip", rngs=0),
}


def _kernel_sized_muls(layer, x, kernel_shape):
  graphdef, state = nnx.split(layer)
  jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(x))(state)
  return [
    e for e in jaxpr.eqns if e.primitive.name == "mul" and e.outvars[0].aval.shape == kernel_shape
  ]


@pytest.mark.parametrize("wrap", list(SCALED_WRAPS))
@pytest.mark.parametrize("case", list(SCALED))
def test_output_scaling_is_exact(case, wrap, output_side):
  """Same outputs, gradients and state as reading the normalized kernel (float64)."""
  fast_cls, slow_cls, args, kwargs, shape = SCALED[case]
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(1), shape, jnp.float64)
    layers = []
    for cls in (fast_cls, slow_cls):
      layer = cls(*args, **kwargs, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
      layer.bias[...] = jnp.linspace(-1.0, 1.0, layer.bias.size).reshape(layer.bias.shape)
      layers.append(SCALED_WRAPS[wrap](layer))
    kernel_shape = layers[0].kernel.shape

    def loss(layer):
      return jnp.sum(jnp.sin(layer(x)))

    grads = [nnx.grad(loss)(layer) for layer in layers]  # also updates the SN state
    chex.assert_trees_all_close(
      nnx.to_pure_dict(grads[0]), nnx.to_pure_dict(grads[1]), atol=1e-12, rtol=1e-12
    )
    chex.assert_trees_all_close(
      nnx.to_pure_dict(nnx.state(layers[0])), nnx.to_pure_dict(nnx.state(layers[1])), atol=1e-12
    )
    chex.assert_trees_all_close(layers[0](x), layers[1](x), atol=1e-12)
    assert _kernel_sized_muls(layers[1], x, kernel_shape)
    kernel_path = wrap == "wn_axis0" or (case == "conv_transpose_kernel" and wrap == "wn")
    assert bool(_kernel_sized_muls(layers[0], x, kernel_shape)) == kernel_path


def test_output_scaling_keeps_bias_a_param():
  """Outside a call, ``bias`` is the layer's Param; without one, None; custom dots opt out."""
  layer = fnx.weight_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
  assert isinstance(layer.bias, nnx.Param)
  assert "bias" in nnx.to_pure_dict(nnx.state(layer, nnx.Param))
  layer.bias = nnx.Param(jnp.ones(3))  # assignment reaches the instance
  assert float(layer.bias[...].sum()) == 3.0
  x = jnp.ones((2, 4))
  no_bias = fnx.weight_norm(nnx.Linear(4, 3, use_bias=False, rngs=nnx.Rngs(0)))
  assert no_bias.bias is None and no_bias(x).shape == (2, 3)
  custom = fnx.weight_norm(
    nnx.Linear(4, 3, dot_general=lambda *a, **k: jax.lax.dot_general(*a, **k), rngs=nnx.Rngs(0))
  )
  assert _kernel_sized_muls(custom, x, (4, 3))
  assert not _kernel_sized_muls(layer, x, (4, 3))


def test_graph_functions_inside_the_call():
  """NNX graph functions may run on the layer during its own call (no call state in it)."""

  class Peek(nnx.Module):
    def __init__(self):
      self.kernel = nnx.Param(jax.random.normal(jax.random.key(0), (4, 3)))

    def __call__(self, x):
      state = nnx.state(self)  # e.g. what a lifted transform does
      assert "kernel" in nnx.to_pure_dict(state)
      return x @ self.kernel[...]

  layer = fnx.spectral_norm(Peek(), rngs=0)
  y = nnx.jit(lambda m, x: m(x))(layer, jnp.ones((2, 4)))
  assert y.shape == (2, 3) and bool(jnp.all(jnp.isfinite(y)))
  linear = fnx.weight_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(linear)
  assert "_flaxnorm" not in repr(graphdef)


def test_output_scaling_float16_and_wider_dtypes(strict_promotion):
  """float16 compute takes the kernel path (no overflow); float64 over float32 params works."""
  del strict_promotion
  x = jnp.full((1, 64), 30.0, jnp.float16)
  layer = fnx.weight_norm(nnx.Linear(64, 2, dtype=jnp.float16, rngs=nnx.Rngs(0)))
  y = layer(x)
  layer.kernel_v[...] = layer.kernel_v[...] * 1e4  # weight norm ignores ||v||
  y_big = layer(x)
  assert bool(jnp.all(jnp.isfinite(y_big)))
  np.testing.assert_allclose(np.asarray(y_big, np.float32), np.asarray(y, np.float32), rtol=2e-3)
  with jax.enable_x64(True):
    x64 = jnp.ones((2, 4), jnp.float64)
    for wrap in (fnx.weight_norm, lambda m: fnx.spectral_norm(m, rngs=0)):
      wide = wrap(nnx.Linear(4, 3, dtype=jnp.float64, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
      assert wide(x64).dtype == jnp.float64


class _TwoKernels(nnx.Module):
  def __init__(self, seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    self.w1 = nnx.Param(jax.random.normal(k1, (3, 3)))
    self.w2 = nnx.Param(jax.random.normal(k2, (3, 3)))

  def __call__(self, x):
    return x @ self.w1[...] @ self.w2[...]


class _TwoBlocks(nnx.Module):
  def __init__(self):
    self.a = _TwoKernels(0)
    self.b = _TwoKernels(1)

  def __call__(self, x):
    return self.b(self.a(x))


def test_wrap_modules_gives_every_param_its_own_key():
  """Modules picking different numbers of params: keys were offset by index x own count."""
  model = _TwoBlocks()
  fnx.wrap_modules(
    model,
    fnx.spectral_norm,
    where=_TwoKernels,
    rngs=0,
    n_init_iterations=0,
    name=lambda path, p: path[0] == "a" or path[-1] == "w1",  # a: w1, w2; b: w1
  )
  state = nnx.to_pure_dict(nnx.state(model, fnx.SpectralStateVar))
  starts = [state["a"]["w1_u"], state["a"]["w2_u"], state["b"]["w1_u"]]
  assert len({tuple(np.asarray(u).tolist()) for u in starts}) == 3


def test_a_param_flaxnorm_made_cannot_be_normalized_again():
  layer = fnx.weight_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
  for transform, name in [(fnx.weight_norm, "kernel_v"), (fnx.spectral_norm, "kernel_g")]:
    with pytest.raises(ValueError, match=rf"'{name}'.*belongs to weight_norm of param 'kernel'"):
      transform(layer, name=name)
  assert layer(jnp.ones((2, 4))).shape == (2, 3)  # still whole


def test_new_variables_carry_the_kernels_sharding_names():
  """g and u take the kept axis's name, the rest is replicated (as Linen's boxes)."""
  init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("in", "out"))
  conv_init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, None, "in", "out"))
  names = lambda m: {k[-1]: v.get_metadata().get("out_sharding") for k, v in nnx.state(m).flat_state()}  # fmt: skip
  with nnx.use_eager_sharding(False):
    wn = fnx.weight_norm(nnx.Linear(4, 3, kernel_init=init, rngs=nnx.Rngs(0)))
    sn = fnx.spectral_norm(nnx.Linear(4, 3, kernel_init=init, rngs=nnx.Rngs(0)))
    op = fnx.spectral_norm(
      nnx.Conv(2, 3, (3, 3), kernel_init=conv_init, rngs=nnx.Rngs(0)),
      operator=True,
      input_shape=(5, 5, 2),
    )

    @nnx.split_rngs(splits=2)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "members"})
    def make(rngs):
      return nnx.Linear(4, 3, kernel_init=init, rngs=rngs)

    stacked = fnx.spectral_norm(make(nnx.Rngs(0)), ensemble_axis=0)
  assert names(wn) == {"bias": None, "kernel_g": (None, "out"), "kernel_v": ("in", "out")}
  assert names(sn) | {"bias": None} == {
    "bias": None,
    "kernel": ("in", "out"),
    "kernel_u": ("out",),
    "kernel_v": (None,),
    "kernel_sigma": (),
  }
  assert names(op)["kernel_u"] == (None,) * 4 and names(op)["kernel_v"] == (None,) * 4
  assert names(stacked)["kernel"] == ("members", "in", "out")
  assert names(stacked)["kernel_u"] == ("members", "out")
  assert names(stacked)["kernel_v"] == ("members", None)
  assert names(stacked)["kernel_sigma"] == ("members",)
