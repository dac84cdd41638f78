"""Tests of the Linen transforms: layout, output preservation, training, removal, errors."""

import functools
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import flaxnorm

KEY = jax.random.key(0)

# (layer, input, wrap kwargs): every Flax layer kind the issue names.
LAYERS = {
  "dense": (lambda: nn.Dense(3), (2, 4), {}),
  "dense_general": (lambda: nn.DenseGeneral((2, 3), axis=(-2, -1)), (2, 4, 5), {"axis": (-2, -1)}),
  "conv1d": (lambda: nn.Conv(4, (3,)), (2, 8, 3), {}),
  "conv2d": (lambda: nn.Conv(4, (3, 3), feature_group_count=2), (2, 6, 6, 4), {}),
  "conv_transpose": (lambda: nn.ConvTranspose(3, (4,), strides=(2,)), (2, 5, 2), {}),
  "embed": (lambda: nn.Embed(7, 4), None, {"name": "embedding", "axis": 0}),
}


def _inputs(shape):
  if shape is None:
    return jnp.array([[0, 3, 6], [1, 1, 2]])
  return jax.random.normal(jax.random.key(1), shape)


class TwoKernels(nn.Module):
  """A user module with its own param names and two kernels."""

  @nn.compact
  def __call__(self, x):
    w_in = self.param("w_in", nn.initializers.lecun_normal(), (x.shape[-1], 5))
    w_out = self.param("w_out", nn.initializers.lecun_normal(), (5, 2))
    scale = self.param("scale", nn.initializers.ones, (2,))
    return jnp.tanh(x @ w_in) @ w_out * scale


# --------------------------------------------------------------------------- #
# Weight norm
# --------------------------------------------------------------------------- #


def test_seed_000_pytorch_numbers():
  """Seed 000: torch.nn.utils.parametrizations.weight_norm on Linear(4, 3)."""
  a = jnp.arange(12.0).reshape(3, 4)
  b = jnp.arange(12.0).reshape(3, 4) + 1  # torch weight (out, in)
  layer = flaxnorm.weight_norm(nn.Dense(3, use_bias=False))
  plain = {"params": {"kernel": b.T}}
  variables = {"params": dict(zip(("kernel_g", "kernel_v"), flaxnorm.weight_norm_decompose(b.T)))}
  np.testing.assert_allclose(variables["params"]["kernel_g"], [[5.477, 13.191, 21.119]], atol=1e-3)
  expected = [[20, 44, 68], [60, 148, 236], [100, 252, 404]]
  np.testing.assert_allclose(layer.apply(variables, a), expected, rtol=1e-6)
  np.testing.assert_allclose(nn.Dense(3, use_bias=False).apply(plain, a), expected)
  direction = variables["params"]["kernel_v"] / variables["params"]["kernel_g"]
  np.testing.assert_allclose(jnp.sum(direction**2, axis=0), 1.0, rtol=1e-6)
  # The same through init: wrapping a layer whose init gives b.T.
  layer = flaxnorm.weight_norm(nn.Dense(3, use_bias=False, kernel_init=lambda *_: b.T))
  variables = layer.init(KEY, a)
  np.testing.assert_allclose(variables["params"]["kernel_g"], [[5.477, 13.191, 21.119]], atol=1e-3)
  np.testing.assert_allclose(layer.apply(variables, a), expected, rtol=1e-6)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_weight_norm_preserves_output_and_removes(kind):
  make, shape, kw = LAYERS[kind]
  x = _inputs(shape)
  plain_vars = make().init(KEY, x)
  wrapped = flaxnorm.weight_norm(make(), **kw)
  variables = wrapped.init(KEY, x)
  name = kw.get("name", "kernel")
  params = variables["params"]
  assert name not in params and {f"{name}_g", f"{name}_v"} <= set(params)
  # v starts as the plain layer's weight (same rng), g as its norm.
  chex.assert_trees_all_close(params[f"{name}_v"], plain_vars["params"][name])
  expected = make().apply(plain_vars, x)
  chex.assert_trees_all_close(wrapped.apply(variables, x), expected, rtol=1e-5, atol=1e-6)
  removed = flaxnorm.remove_weight_norm(variables)
  chex.assert_trees_all_close(removed, plain_vars, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(make().apply(removed, x), expected, rtol=1e-5, atol=1e-6)


def test_weight_norm_layouts():
  x = jnp.ones((1, 4))
  shapes = jax.tree.map(jnp.shape, flaxnorm.weight_norm(nn.Dense(3)).init(KEY, x))
  assert shapes == {"params": {"bias": (3,), "kernel_g": (1, 3), "kernel_v": (4, 3)}}
  conv = flaxnorm.weight_norm(nn.Conv(5, (3, 3))).init(KEY, jnp.ones((1, 6, 6, 2)))
  assert conv["params"]["kernel_g"].shape == (1, 1, 1, 5)
  whole = flaxnorm.weight_norm(nn.Dense(3), axis=None).init(KEY, x)
  assert whole["params"]["kernel_g"].shape == ()
  emb = flaxnorm.weight_norm(nn.Embed(7, 4), name="embedding", axis=0).init(KEY, jnp.array([1]))
  assert emb["params"]["embedding_g"].shape == (7, 1)  # PyTorch's per-row norm


def test_user_module_with_several_kernels():
  x = _inputs((3, 4))
  plain = TwoKernels().init(KEY, x)
  wrapped = flaxnorm.weight_norm(TwoKernels, name=("w_in", "w_out"))()
  variables = wrapped.init(KEY, x)
  assert set(variables["params"]) == {"w_in_g", "w_in_v", "w_out_g", "w_out_v", "scale"}
  chex.assert_trees_all_close(wrapped.apply(variables, x), TwoKernels().apply(plain, x), rtol=1e-5)
  chex.assert_trees_all_close(flaxnorm.remove_weight_norm(variables), plain, rtol=1e-6)


def test_gradients_reach_g_and_v():
  layer = flaxnorm.weight_norm(nn.Dense(3))
  x = _inputs((5, 4))
  variables = layer.init(KEY, x)
  grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x) ** 2))(variables["params"])
  for name in ("kernel_g", "kernel_v"):
    assert float(jnp.abs(grads[name]).max()) > 0
  check_grads(
    lambda p: layer.apply({"params": p}, x),
    (variables["params"],),
    order=1,
    modes=("rev",),
    eps=1e-2,
  )


def test_class_transform_inside_compact_and_setup():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = flaxnorm.weight_norm(nn.Dense)(6)(x)
      x = flaxnorm.spectral_norm(nn.Dense(5, name="fc"))(x)
      return Block()(x)

  class Block(nn.Module):
    def setup(self):
      self.conv = flaxnorm.weight_norm(nn.Conv(2, (3,)))
      self.out = flaxnorm.spectral_norm(nn.Dense)(1)

    def __call__(self, x):
      return self.out(self.conv(x[..., None]).reshape(x.shape[0], -1))

  variables = Model().init(KEY, jnp.ones((2, 4)))
  shapes = jax.tree.map(jnp.shape, variables)
  assert shapes["params"]["Dense_0"] == {"bias": (6,), "kernel_g": (1, 6), "kernel_v": (4, 6)}
  assert shapes["params"]["fc"] == {"bias": (5,), "kernel": (6, 5)}
  assert shapes["params"]["Block_0"]["conv"]["kernel_v"] == (3, 1, 2)
  assert shapes["spectral"] == {
    "fc": {"kernel_sigma": (), "kernel_u": (5,), "kernel_v": (6,)},
    "Block_0": {"out": {"kernel_sigma": (), "kernel_u": (1,), "kernel_v": (10,)}},
  }
  y, updates = Model().apply(variables, jnp.ones((2, 4)), mutable=["spectral"])
  assert y.shape == (2, 1) and set(updates) == {"spectral"}


# --------------------------------------------------------------------------- #
# Spectral norm
# --------------------------------------------------------------------------- #


def _svd_top(w, axis=-1):
  w = np.moveaxis(np.asarray(w, np.float64), axis, 0)
  return np.linalg.svd(w.reshape(w.shape[0], -1), compute_uv=False)[0]


def test_spectral_sigma_accurate_right_after_init():
  layer = flaxnorm.spectral_norm(nn.Dense(1024, kernel_init=nn.initializers.normal(1.0)))
  variables = jax.jit(layer.init)(KEY, jnp.ones((1, 1024)))
  sigma = float(variables["spectral"]["kernel_sigma"])
  np.testing.assert_allclose(sigma, _svd_top(variables["params"]["kernel"]), rtol=1e-2)


@pytest.mark.parametrize("rngs", ["params", "params+spectral"])
def test_spectral_norm_leaves_the_layers_other_params_as_plain(rngs):
  # The random start came from make_rng('params') until 2026-12-06: it advanced
  # the layer's params stream, so a bias with a random init changed on wrapping.
  init = nn.initializers.normal(1.0)
  plain = nn.Conv(3, (2,), kernel_init=init, bias_init=init)
  keys = {"params": KEY} if rngs == "params" else {"params": KEY, "spectral": jax.random.key(7)}
  want = plain.init(keys, jnp.ones((2, 5, 4)))["params"]
  variables = flaxnorm.spectral_norm(plain).init(keys, jnp.ones((2, 5, 4)))
  chex.assert_trees_all_equal(variables["params"], want)
  assert float(variables["spectral"]["kernel_sigma"]) > 0


def test_spectral_converges_in_training_to_svd():
  layer = flaxnorm.spectral_norm(
    nn.Dense(256, kernel_init=nn.initializers.normal(1.0)), n_init_iterations=0
  )
  x = jnp.ones((1, 256))
  variables = layer.init(KEY, x)

  @jax.jit
  def train_apply(variables):
    _, updates = layer.apply(variables, x, mutable=["spectral"])
    return {**variables, **updates}

  for _ in range(200):
    variables = train_apply(variables)
  sigma = float(variables["spectral"]["kernel_sigma"])
  np.testing.assert_allclose(sigma, _svd_top(variables["params"]["kernel"]), rtol=1e-4)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_spectral_train_eval_and_remove(kind):
  make, shape, kw = LAYERS[kind]
  x = _inputs(shape)
  layer = flaxnorm.spectral_norm(make(), **kw)
  variables = layer.init(KEY, x)
  name = kw.get("name", "kernel")
  state = variables["spectral"]
  w = variables["params"][name]
  # Eval: no iteration, sigma = u^T W v from the stored vectors.
  axis = kw.get("axis", -1)
  mat = np.asarray(flaxnorm.as_matrix(w, axis))
  sigma = state[f"{name}_u"] @ mat @ state[f"{name}_v"]
  plain = make()
  expected = plain.apply({"params": {**variables["params"], name: w / sigma}}, x)
  chex.assert_trees_all_close(layer.apply(variables, x), expected, rtol=1e-5, atol=1e-6)
  # Training: one iteration from the stored state, stored and used.
  y, updates = layer.apply(variables, x, mutable=["spectral"])
  u, v, s = flaxnorm.power_iteration(mat, state[f"{name}_u"], v=state[f"{name}_v"], n_steps=1)
  new = updates["spectral"]
  chex.assert_trees_all_close(
    (new[f"{name}_u"], new[f"{name}_v"], new[f"{name}_sigma"]), (u, v, s), rtol=1e-5, atol=1e-6
  )
  expected = plain.apply({"params": {**variables["params"], name: w / s}}, x)
  chex.assert_trees_all_close(y, expected, rtol=1e-5, atol=1e-6)
  # Removal gives the eval output with the plain layer.
  removed = flaxnorm.remove_spectral_norm(variables, axis=axis)
  assert set(removed) == {"params"}
  chex.assert_trees_all_close(
    plain.apply(removed, x), layer.apply(variables, x), rtol=1e-5, atol=1e-6
  )


def test_spectral_eval_changes_nothing_and_sigma_is_one():
  layer = flaxnorm.spectral_norm(nn.Dense(8), n_power_iterations=5)
  x = _inputs((2, 8))
  variables = layer.init(KEY, x)
  out = layer.apply(variables, x)  # eval: returns no state, raises nothing
  assert isinstance(out, jax.Array)
  _, state = layer.apply(variables, x, mutable=["spectral"])
  # The kernel the layer uses has spectral norm 1.
  w = variables["params"]["kernel"] / state["spectral"]["kernel_sigma"]
  np.testing.assert_allclose(_svd_top(w), 1.0, rtol=1e-4)


def test_seed_003_sigma_and_vectors_approach_svd():
  """Seed 003: sigma = u^T W v, and the u/v cosine error vs the SVD falls with iterations."""
  w = jax.random.uniform(jax.random.key(3), (3, 3), minval=-0.6, maxval=0.6)
  uu, _, vt = np.linalg.svd(np.asarray(w))
  errors = []
  for n in (1, 3, 30):
    layer = flaxnorm.spectral_norm(nn.Dense(3, kernel_init=lambda *_: w), n_init_iterations=n)
    state = layer.init(KEY, jnp.ones((1, 3)))["spectral"]
    u, v = state["kernel_u"], state["kernel_v"]
    np.testing.assert_allclose(state["kernel_sigma"], u @ np.asarray(w).T @ v, rtol=1e-6)
    # The Flax kernel is torch's weight transposed: u pairs with torch's u.
    errors.append((1 - abs(u @ vt[0]), 1 - abs(v @ uu[:, 0])))
  assert errors[0] >= errors[1] >= errors[2] and max(errors[2]) < 1e-5


def test_spectral_compile_once_and_flat_in_iterations():
  x = _inputs((4, 16))
  target = jnp.zeros((4, 8))
  opt = optax.adam(1e-2)

  def make_step(n):
    layer = flaxnorm.spectral_norm(nn.Dense(8), n_power_iterations=n)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, spectral, opt_state):
      def loss_fn(params):
        y, updates = layer.apply({"params": params, "spectral": spectral}, x, mutable=["spectral"])
        return jnp.mean((y - target) ** 2), updates["spectral"]

      (loss, spectral), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = opt.update(grads, opt_state)
      return optax.apply_updates(params, updates), spectral, opt_state, loss

    return layer, step

  layer, step = make_step(1)
  variables = layer.init(KEY, x)
  params, spectral = variables["params"], variables["spectral"]
  opt_state = opt.init(params)
  losses = []
  for _ in range(5):
    params, spectral, opt_state, loss = step(params, spectral, opt_state)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  sizes = []
  for n in (2, 1000):
    chex.clear_trace_counter()  # each step here is a new function on purpose
    _, step = make_step(n)
    lowered = step.lower(params, spectral, opt_state)
    sizes.append(len(lowered.as_text().splitlines()))
  assert sizes[0] == sizes[1]


def test_zero_weight_is_finite_in_layers():
  x = _inputs((2, 4))
  for wrap in (flaxnorm.weight_norm, flaxnorm.spectral_norm):
    layer = wrap(nn.Dense(3, kernel_init=nn.initializers.zeros))
    variables = layer.init(KEY, x)

    def loss(params):
      y, _ = layer.apply({**variables, "params": params}, x, mutable=["spectral"])
      return jnp.sum(y**2) + jnp.sum(y)

    value, grads = jax.value_and_grad(loss)(variables["params"])
    assert np.isfinite(value)
    chex.assert_tree_all_finite(grads)
    chex.assert_tree_all_finite(layer.apply(variables, x))


# --------------------------------------------------------------------------- #
# Transforms: jit, grad, vmap, scan, remat
# --------------------------------------------------------------------------- #


def test_vmap_ensemble():
  layer = flaxnorm.spectral_norm(flaxnorm.weight_norm(nn.Dense(3), name="bias", axis=None))
  x = _inputs((2, 4))
  keys = jax.random.split(KEY, 4)
  ensemble = jax.vmap(layer.init, in_axes=(0, None))(keys, x)
  assert ensemble["params"]["kernel"].shape == (4, 4, 3)
  assert ensemble["spectral"]["kernel_u"].shape == (4, 3)
  ys, updates = jax.vmap(lambda v: layer.apply(v, x, mutable=["spectral"]))(ensemble)
  for i in range(4):
    member = jax.tree.map(lambda a, i=i: a[i], ensemble)
    y, upd = layer.apply(member, x, mutable=["spectral"])
    chex.assert_trees_all_close(ys[i], y, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(
      jax.tree.map(lambda a, i=i: a[i], updates), upd, rtol=1e-5, atol=1e-6
    )


def test_nn_vmap_scan_remat():
  x = _inputs((3, 4))

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.vmap(
        flaxnorm.weight_norm(nn.Dense),
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=None,
        axis_size=2,
      )(4)(x).sum(0)
      x = nn.remat(flaxnorm.spectral_norm(nn.Dense))(4)(x)

      class Cell(nn.Module):
        @nn.compact
        def __call__(self, c, _):
          return jnp.tanh(flaxnorm.weight_norm(nn.Dense(4))(c)), None

      x, _ = nn.scan(Cell, variable_broadcast="params", split_rngs={"params": False}, length=3)()(
        x, None
      )
      return x

  variables = Stack().init(KEY, x)
  shapes = jax.tree.map(jnp.shape, variables)
  assert shapes["params"]["VmapDense_0"]["kernel_g"] == (2, 1, 4)
  assert shapes["params"]["ScanCell_0"]["Dense_0"]["kernel_v"] == (4, 4)
  assert shapes["spectral"]["CheckpointDense_0"]["kernel_u"] == (4,)
  y, updates = jax.jit(lambda v: Stack().apply(v, x, mutable=["spectral"]))(variables)
  chex.assert_tree_all_finite(y)
  assert jax.tree.structure(updates["spectral"]) == jax.tree.structure(variables["spectral"])
  grads = jax.grad(lambda p: jnp.sum(Stack().apply({**variables, "params": p}, x)))(
    variables["params"]
  )
  chex.assert_tree_all_finite(grads)


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #


class IntParam(nn.Module):
  @nn.compact
  def __call__(self, x):
    table = self.param("table", lambda *_: jnp.zeros((3, 2), jnp.int32))
    return x + table.sum()


@pytest.mark.parametrize(
  "build, error, match",
  [
    (
      lambda: flaxnorm.weight_norm(nn.Dense(3), name="weight"),
      ValueError,
      r"'weight'.*Its params are \['bias', 'kernel'\]",
    ),
    (
      lambda: flaxnorm.spectral_norm(nn.Dense(3), name="weight"),
      ValueError,
      r"layer '<top level>' \(Dense\).*never",
    ),
    (
      lambda: flaxnorm.spectral_norm(nn.Dense(3), name="bias"),
      ValueError,
      r"at least 2 dims.*'bias'.*shape \(3,\)",
    ),
    (
      lambda: flaxnorm.weight_norm(nn.Dense(3), axis=2),
      ValueError,
      r"axis 2 is out of range.*'kernel'.*2 dims",
    ),
    (
      lambda: flaxnorm.spectral_norm(nn.Conv(3, (3,)), axis=-4),
      ValueError,
      "axis -4 is out of range",
    ),
    (
      lambda: flaxnorm.weight_norm(IntParam(), name="table"),
      TypeError,
      r"'table'.*floating-point.*int32",
    ),
    (
      lambda: flaxnorm.spectral_norm(IntParam(), name="table"),
      TypeError,
      r"'table'.*floating-point",
    ),
  ],
)
def test_errors_at_init(build, error, match):
  with pytest.raises(error, match=match):
    build().init(KEY, jnp.ones((1, 4, 1)) if "Conv" in str(build()) else jnp.ones((1, 4)))


@pytest.mark.parametrize(
  "build, error, match",
  [
    (
      lambda: flaxnorm.spectral_norm(nn.Dense, n_power_iterations=0),
      ValueError,
      "n_power_iterations must be >= 1",
    ),
    (
      lambda: flaxnorm.spectral_norm(nn.Dense, n_init_iterations=-1),
      ValueError,
      "n_init_iterations must be >= 0",
    ),
    (
      lambda: flaxnorm.spectral_norm(nn.Dense, n_power_iterations=1.5),
      TypeError,
      "n_power_iterations must be an int",
    ),
    (lambda: flaxnorm.weight_norm(nn.Dense, eps=0.0), ValueError, "eps must be a positive"),
    (lambda: flaxnorm.spectral_norm(nn.Dense, eps=-1e-3), ValueError, "eps must be a positive"),
    (lambda: flaxnorm.weight_norm(nn.Dense, axis="x"), TypeError, "axis must be"),
    (lambda: flaxnorm.spectral_norm(nn.Dense, axis=None), TypeError, "axis must be"),
    (
      lambda: flaxnorm.weight_norm(nn.Dense, name=("kernel", "kernel")),
      ValueError,
      "more than once",
    ),
    (
      lambda: flaxnorm.weight_norm(flaxnorm.weight_norm(nn.Dense)),
      ValueError,
      "already wrapped by weight_norm",
    ),
    (
      lambda: flaxnorm.spectral_norm(flaxnorm.weight_norm(nn.Dense(3))),
      ValueError,
      "already wrapped",
    ),
    (
      lambda: flaxnorm.weight_norm(lambda x: x),
      TypeError,
      "must be a flax.linen.Module class or instance",
    ),
    (
      lambda: flaxnorm.spectral_norm(nn.Dense, collection="params"),
      ValueError,
      "must not be 'params'",
    ),
  ],
)
def test_errors_at_wrap_time(build, error, match):
  with pytest.raises(error, match=match):
    build()


def test_seed_004_double_wrap_missing_name_and_removal():
  """Seed 004 (Jittor's WeightNorm): double registration and a missing name are errors."""
  layer = flaxnorm.weight_norm(nn.Dense(4))
  with pytest.raises(ValueError, match="already wrapped"):
    flaxnorm.weight_norm(layer)
  with pytest.raises(ValueError, match="'weight'"):
    flaxnorm.weight_norm(nn.Dense(4), name="weight").init(KEY, jnp.ones((1, 3)))
  variables = layer.init(KEY, jnp.ones((1, 3)))
  assert "kernel_g" in variables["params"]
  removed = flaxnorm.remove_weight_norm(variables)
  assert set(removed["params"]) == {"kernel", "bias"}


def test_spectral_state_missing_or_mismatched_at_apply():
  layer = flaxnorm.spectral_norm(nn.Dense(3))
  x = jnp.ones((1, 4))
  variables = layer.init(KEY, x)
  with pytest.raises(ValueError, match=r"state of param 'kernel'.*missing from the 'spectral'"):
    layer.apply({"params": variables["params"]}, x)
  with pytest.raises(ValueError, match=r"missing"):
    layer.apply({"params": variables["params"]}, x, mutable=["spectral"])
  other = flaxnorm.spectral_norm(nn.Dense(3)).init(KEY, jnp.ones((1, 5)))
  with pytest.raises(
    ValueError, match=r"expected kernel_u of shape \(3,\) and kernel_v of shape \(4,\)"
  ):
    layer.apply({"params": variables["params"], "spectral": other["spectral"]}, x)


def test_removal_errors():
  layer = flaxnorm.spectral_norm(nn.Conv(3, (2,)))
  variables = layer.init(KEY, jnp.ones((1, 4, 3)))
  with pytest.raises(ValueError, match="need 'params' and 'spectral'"):
    flaxnorm.remove_spectral_norm({"params": variables["params"]})
  with pytest.raises(ValueError, match=r"param 'kernel' of shape \(2, 3, 3\) does not fit"):
    flaxnorm.remove_spectral_norm(variables, axis=0)


def test_remove_spectral_norm_with_per_layer_axes():
  class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = flaxnorm.spectral_norm(nn.Dense(3), axis=0)(x)
      return flaxnorm.spectral_norm(nn.Dense(2))(x)

  x = _inputs((2, 5))
  variables = Two().init(KEY, x)
  removed = flaxnorm.remove_spectral_norm(variables, axis={"Dense_0": 0})
  plain = nn.Sequential([nn.Dense(3), nn.Dense(2)])
  renamed = {
    "params": {"layers_0": removed["params"]["Dense_0"], "layers_1": removed["params"]["Dense_1"]}
  }
  chex.assert_trees_all_close(
    plain.apply(renamed, x), Two().apply(variables, x), rtol=1e-5, atol=1e-6
  )
  # A path that names no spectral layer (a typo) is refused, not ignored.
  with pytest.raises(
    ValueError, match=r"axis names layers \['Dense0'\] .* \['Dense_0', 'Dense_1'\]"
  ):
    flaxnorm.remove_spectral_norm(variables, axis={"Dense0": 0})


@pytest.mark.parametrize(
  "make, shape",
  [
    (lambda: nn.ConvTranspose(4, (3, 3), transpose_kernel=True), (2, 6, 6, 4)),  # kept -2
    (lambda: nn.ConvTranspose(5, (3, 3), transpose_kernel=True), (2, 6, 6, 4)),
    (lambda: nn.Einsum((2, 2, 3), "bd,hdk->bhk"), (4, 2)),  # kept (0, 2)
    (lambda: nn.DenseGeneral(3, batch_dims=(0,)), (2, 5, 3)),  # kept (0, 2)
  ],
  ids=["conv_transpose_square", "conv_transpose", "einsum_middle", "dense_general_batch"],
)
def test_remove_spectral_norm_reads_kept_axes_anywhere_in_the_kernel(make, shape):
  """axis="auto" removal finds kept axes that are neither leading nor trailing."""
  x = _inputs(shape)
  layer = flaxnorm.spectral_norm(make())
  variables = layer.init(KEY, x)
  removed = flaxnorm.remove_spectral_norm(variables)
  chex.assert_trees_all_close(
    make().apply(removed, x), layer.apply(variables, x), rtol=1e-5, atol=1e-6
  )


def test_remove_spectral_norm_traces_when_the_shapes_tell_the_axis():
  """It read every kernel's values first (TracerArrayConversionError under jit and
  eval_shape; a whole sharded kernel copied to the host), needed only for a square view."""
  x = _inputs((2, 4))
  layer = flaxnorm.spectral_norm(nn.Dense(3))
  variables = layer.init(KEY, x)
  eager = flaxnorm.remove_spectral_norm(variables)
  chex.assert_trees_all_close(jax.jit(flaxnorm.remove_spectral_norm)(variables), eager)
  shapes = jax.eval_shape(flaxnorm.remove_spectral_norm, variables)
  assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, eager)
  square = flaxnorm.spectral_norm(nn.Dense(4))
  variables = square.init(KEY, x)
  with pytest.raises(ValueError, match=r"under jit or eval_shape .* pass axis=\.\.\."):
    jax.jit(flaxnorm.remove_spectral_norm)(variables)
  jax.jit(functools.partial(flaxnorm.remove_spectral_norm, axis=-1))(variables)


@pytest.mark.parametrize("axis", [None, -1])
def test_remove_weight_norm_of_stacked_layers(axis):
  """Stacked by jax.vmap of init (as nn.vmap/nn.scan stack): each member folds on its own."""
  x = _inputs((2, 6))
  layer = flaxnorm.weight_norm(nn.Dense(4), axis=axis)
  stacked = jax.vmap(lambda key: layer.init(key, x))(jax.random.split(KEY, 3))
  stacked = jax.tree.map(lambda a: a * jnp.linspace(0.5, 1.5, a.size).reshape(a.shape), stacked)
  removed = flaxnorm.remove_weight_norm(stacked)
  chex.assert_trees_all_close(
    jax.vmap(lambda v: nn.Dense(4).apply(v, x))(removed),
    jax.vmap(lambda v: layer.apply(v, x))(stacked),
    rtol=1e-5,
    atol=1e-6,
  )


@pytest.mark.parametrize("scale", [0.1, 10.0])
def test_spectral_clip_mode(scale):
  """mode="clip": w / max(sigma, 1), the same in the Linen, NNX and tree faces."""
  from flax import nnx

  w = jax.random.normal(jax.random.key(2), (4, 3))
  w = w * scale / _svd_top(w)  # spectral norm exactly `scale`
  x = _inputs((2, 4))
  layer = flaxnorm.spectral_norm(nn.Dense(3, kernel_init=lambda *_: w), mode="clip")
  variables = layer.init(KEY, x)
  y = layer.apply(variables, x)
  expected = nn.Dense(3).apply(
    {"params": {**variables["params"], "kernel": w / max(scale, 1.0)}}, x
  )
  chex.assert_trees_all_close(y, expected, rtol=1e-4, atol=1e-6)
  removed = flaxnorm.remove_spectral_norm(variables, mode="clip")
  chex.assert_trees_all_close(nn.Dense(3).apply(removed, x), y, rtol=1e-5, atol=1e-6)

  lin = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  lin.kernel[...] = w
  lin.bias[...] = variables["params"]["bias"]
  lin = flaxnorm.nnx.spectral_norm(lin, mode="clip")
  lin.eval()
  chex.assert_trees_all_close(lin(x), expected, rtol=1e-4, atol=1e-6)

  sn_params, _ = flaxnorm.tree.spectral_norm_apply(
    variables["params"], variables["spectral"], update=False, mode="clip"
  )
  chex.assert_trees_all_close(sn_params["kernel"], w / max(scale, 1.0), rtol=1e-4)


def test_recursive_reaches_cells_and_submodules():
  """recursive=True: the kernels that nn.LSTMCell's child Dense layers create."""
  x = _inputs((2, 3))
  cell = nn.LSTMCell(4)
  carry = cell.initialize_carry(jax.random.key(1), x.shape)
  plain = cell.init(KEY, carry, x)
  wrapped = flaxnorm.weight_norm(nn.LSTMCell(4), recursive=True)
  variables = wrapped.init(KEY, carry, x)
  shapes = jax.tree.map(jnp.shape, variables)["params"]
  assert set(shapes) == set(plain["params"])  # same child paths
  assert shapes["hi"] == {"bias": (4,), "kernel_g": (1, 4), "kernel_v": (4, 4)}
  assert shapes["ii"] == {"kernel_g": (1, 4), "kernel_v": (3, 4)}
  chex.assert_trees_all_close(
    wrapped.apply(variables, carry, x), cell.apply(plain, carry, x), rtol=1e-6
  )
  chex.assert_trees_all_close(flaxnorm.remove_weight_norm(variables), plain, rtol=1e-6)
  with pytest.raises(ValueError, match="never asked for it"):
    flaxnorm.weight_norm(nn.LSTMCell(4), name="weight", recursive=True).init(KEY, carry, x)
  # Without recursive, the cell's own params are searched only, and the error says so.
  with pytest.raises(ValueError, match=r"submodules \['hf', .*hold their own params"):
    flaxnorm.weight_norm(nn.LSTMCell(4)).init(KEY, carry, x)


def test_recursive_spectral_norm_in_rnn_and_setup_children():
  x = _inputs((2, 3))
  cell = flaxnorm.spectral_norm(nn.GRUCell(4), recursive=True)
  carry = jnp.zeros((2, 4))
  variables = cell.init(KEY, carry, x)
  assert set(variables["spectral"]) == {"hn", "hr", "hz", "in", "ir", "iz"}
  _, updates = cell.apply(variables, carry, x, mutable=["spectral"])
  for child in variables["spectral"]:  # every child's state took one iteration
    expected = flaxnorm.power_iteration(
      variables["params"][child]["kernel"].T,
      variables["spectral"][child]["kernel_u"],
      v=variables["spectral"][child]["kernel_v"],
    )[0]
    chex.assert_trees_all_close(
      updates["spectral"][child]["kernel_u"], expected, rtol=1e-5, atol=1e-6
    )
  # Weight norm inside nn.RNN (a scan over time, params broadcast).
  xs = _inputs((2, 5, 3))
  rnn = nn.RNN(flaxnorm.weight_norm(nn.LSTMCell(4), recursive=True))
  rnn_vars = rnn.init(KEY, xs)
  assert rnn_vars["params"]["cell"]["ii"]["kernel_g"].shape == (1, 4)
  plain_rnn = nn.RNN(nn.LSTMCell(4))
  chex.assert_trees_all_close(
    rnn.apply(rnn_vars, xs), plain_rnn.apply(flaxnorm.remove_weight_norm(rnn_vars), xs), rtol=1e-5
  )

  class WithSetup(nn.Module):
    def setup(self):
      self.embed = nn.Embed(7, 4)
      self.out = nn.Dense(2)

    def __call__(self, ids):
      return self.out(self.embed(ids))

  ids = jnp.array([[1, 2], [3, 4]])
  plain = WithSetup().init(KEY, ids)
  wrapped = flaxnorm.weight_norm(WithSetup(), name=("embedding", "kernel"), axis=-1, recursive=True)
  variables = wrapped.init(KEY, ids)
  assert set(variables["params"]["embed"]) == {"embedding_g", "embedding_v"}
  assert set(variables["params"]["out"]) == {"bias", "kernel_g", "kernel_v"}
  chex.assert_trees_all_close(
    wrapped.apply(variables, ids), WithSetup().apply(plain, ids), rtol=1e-5, atol=1e-6
  )


# --------------------------------------------------------------------------- #
# Output scaling: Flax's linear layers get the bare kernel and scale their
# output; every other layer gets the normalized kernel.
# --------------------------------------------------------------------------- #


class SubDense(nn.Dense):
  """A subclass may override __call__: it always gets the normalized kernel."""


class SubConv(nn.Conv):
  pass


class SubConvTranspose(nn.ConvTranspose):
  pass


class SubDenseGeneral(nn.DenseGeneral):
  pass


class SubConvLocal(nn.ConvLocal):
  pass


# (fast class, kernel-scaling twin, fields, input shape)
SCALED = {
  "dense": (nn.Dense, SubDense, {"features": 5}, (3, 4)),
  "dense_general": (
    nn.DenseGeneral,
    SubDenseGeneral,
    {"features": (2, 5), "axis": (-2, -1)},
    (3, 4, 6),
  ),
  "conv2d": (nn.Conv, SubConv, {"features": 4, "kernel_size": (3, 3)}, (2, 5, 5, 3)),
  "conv1d_groups_circular": (
    nn.Conv,
    SubConv,
    {"features": 4, "kernel_size": (3,), "feature_group_count": 2, "padding": "CIRCULAR"},
    (2, 7, 4),
  ),
  "conv_local": (nn.ConvLocal, SubConvLocal, {"features": 4, "kernel_size": (3,)}, (2, 6, 3)),
  "dense_no_bias": (nn.Dense, SubDense, {"features": 5, "use_bias": False}, (3, 4)),
  "conv_masked": (
    nn.Conv,
    SubConv,
    {"features": 4, "kernel_size": (3,), "mask": jnp.tril(jnp.ones((3, 3, 4)))},
    (2, 6, 3),
  ),
  "conv_transpose": (
    nn.ConvTranspose,
    SubConvTranspose,
    {"features": 4, "kernel_size": (3,), "strides": (2,)},
    (2, 5, 3),
  ),
  "conv_transpose_kernel": (
    nn.ConvTranspose,
    SubConvTranspose,
    {"features": 4, "kernel_size": (3, 3), "transpose_kernel": True},
    (2, 5, 5, 3),
  ),
}
WRAPS = {
  "wn": lambda m: flaxnorm.weight_norm(m),
  "wn_whole": lambda m: flaxnorm.weight_norm(m, axis=None),
  "wn_axis0": lambda m: flaxnorm.weight_norm(m, axis=0),
  "sn": lambda m: flaxnorm.spectral_norm(m, n_power_iterations=2, n_init_iterations=3),
  "sn_clip": lambda m: flaxnorm.spectral_norm(m, mode="clip", n_init_iterations=3),
}


def _kernel_sized_muls(layer, variables, x):
  """Multiplications in a train apply whose result has the kernel's shape."""
  params = variables["params"]
  shape = (params["kernel_v"] if "kernel_v" in params else params["kernel"]).shape
  jaxpr = jax.make_jaxpr(lambda v: layer.apply(v, x, mutable=True))(variables)
  return [e for e in jaxpr.eqns if e.primitive.name == "mul" and e.outvars[0].aval.shape == shape]


@pytest.mark.parametrize("wrap", list(WRAPS))
@pytest.mark.parametrize("case", list(SCALED))
def test_output_scaling_is_exact(case, wrap, output_side):
  """Same outputs, gradients and state as scaling the kernel, to float64 rounding."""
  fast_cls, slow_cls, fields, shape = SCALED[case]
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(1), shape, jnp.float64)
    fast = WRAPS[wrap](fast_cls(**fields, param_dtype=jnp.float64))
    slow = WRAPS[wrap](slow_cls(**fields, param_dtype=jnp.float64))
    variables = fast.init(KEY, x)
    # Away from init (g != ||v||, u not converged), nonzero bias.
    variables = jax.tree.map(lambda a: a * 1.3 + 0.1, variables)

    def loss(params, layer):
      y, updates = layer.apply({**variables, "params": params}, x, mutable=True)
      return jnp.sum(jnp.sin(y)), (y, updates)

    grad = jax.grad(loss, has_aux=True)
    g_fast, aux_fast = grad(variables["params"], fast)
    g_slow, aux_slow = grad(variables["params"], slow)
    chex.assert_trees_all_close((g_fast, aux_fast), (g_slow, aux_slow), atol=1e-12, rtol=1e-12)
    assert float(jnp.abs(aux_fast[0]).max()) > 0.1

    # The twin really scales its kernel, and the Flax layer does not (except
    # where its kernel's last axis is not the output's: WN per output
    # channel of a transposed ConvTranspose kernel, WN over axis 0). A mask
    # is the layer's own kernel-sized product, in both.
    n_slow = len(_kernel_sized_muls(slow, variables, x))
    kernel_path = wrap == "wn_axis0" or (case == "conv_transpose_kernel" and wrap == "wn")
    assert n_slow >= 1
    assert len(_kernel_sized_muls(fast, variables, x)) == n_slow - (not kernel_path)


def test_output_scaling_only_for_plain_linear_ops():
  """A custom dot_general (e.g. quantized) may not be linear: the kernel is scaled."""
  x = jnp.ones((2, 4))
  plain = flaxnorm.weight_norm(nn.Dense(3))
  custom = flaxnorm.weight_norm(nn.Dense(3, dot_general=jax.lax.dot_general))
  variables = plain.init(KEY, x)
  assert not _kernel_sized_muls(plain, variables, x)
  assert _kernel_sized_muls(custom, variables, x)
  chex.assert_trees_all_close(plain.apply(variables, x), custom.apply(variables, x), atol=1e-6)


def test_output_scaling_low_precision():
  """bfloat16 compute: the scale and bias are applied in float32, then rounded once."""
  x = jax.random.normal(KEY, (4, 16))
  fast = flaxnorm.weight_norm(nn.Dense(8, dtype=jnp.bfloat16))
  slow = flaxnorm.weight_norm(SubDense(8, dtype=jnp.bfloat16))
  variables = fast.init(KEY, x)
  variables = jax.tree.map(lambda a: a * 1.3 + 0.1, variables)
  y_fast, y_slow = fast.apply(variables, x), slow.apply(variables, x)
  assert y_fast.dtype == y_slow.dtype == jnp.bfloat16
  y_true = SubDense(8, param_dtype=jnp.float32).apply(flaxnorm.remove_weight_norm(variables), x)
  # Both within bfloat16 rounding of the float32 result.
  for y in (y_fast, y_slow):
    np.testing.assert_allclose(np.asarray(y, np.float32), y_true, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
  "wrap", [flaxnorm.weight_norm, lambda m: flaxnorm.spectral_norm(m, n_init_iterations=50)]
)
def test_output_scaling_float16_takes_kernel_path(wrap):
  """float16 compute: the unscaled x @ v would overflow; the output must not depend on ||v||."""
  x = jnp.full((1, 64), 30.0)
  layer = wrap(nn.Dense(2, dtype=jnp.float16))
  variables = layer.init(KEY, x)
  y = layer.apply(variables, x)
  name = "kernel_v" if "kernel_v" in variables["params"] else "kernel"
  # Scaling v leaves weight norm unchanged; scaling W with its stored u, v
  # leaves spectral norm's eval output unchanged.
  big = {**variables, "params": {**variables["params"], name: variables["params"][name] * 1e4}}
  y_big = layer.apply(big, x)
  assert bool(jnp.all(jnp.isfinite(y_big)))
  np.testing.assert_allclose(np.asarray(y_big, np.float32), np.asarray(y, np.float32), rtol=2e-3)


def test_output_scaling_intercepted_once():
  """capture_intermediates and interceptors see one __call__, with the final output."""
  x = jnp.ones((1, 4))
  layer = flaxnorm.weight_norm(nn.Dense(2))
  variables = jax.tree.map(lambda a: a * 1.3 + 0.5, layer.init(KEY, x))
  y, state = layer.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
  (captured,) = state["intermediates"]["__call__"]
  chex.assert_trees_all_close(captured, y)
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    seen.append(out)
    return out

  with nn.intercept_methods(interceptor):
    layer.apply(variables, x)
  assert len(seen) == 1
  chex.assert_trees_all_close(seen[0], y)


@pytest.mark.usefixtures("strict_promotion")
@pytest.mark.parametrize("wrap", [flaxnorm.weight_norm, flaxnorm.spectral_norm])
def test_output_scaling_wider_compute_dtype(wrap):
  """A float64 layer over float32 params: the scale is cast, even under strict promotion."""
  with jax.enable_x64(True):
    x = jnp.ones((2, 4), jnp.float64)
    layer = wrap(nn.Dense(3, dtype=jnp.float64, param_dtype=jnp.float32))
    y = layer.apply(layer.init(KEY, x), x)
    assert y.dtype == jnp.float64


def test_recursive_on_the_rnn_itself():
  """weight_norm(nn.RNN(cell), recursive=True) is nn.RNN(weight_norm(cell, recursive=True))."""
  x = jax.random.normal(KEY, (2, 3, 4))
  outer = flaxnorm.weight_norm(nn.RNN(nn.LSTMCell(5)), recursive=True)
  inner = nn.RNN(flaxnorm.weight_norm(nn.LSTMCell(5), recursive=True))
  v_outer, v_inner = outer.init(KEY, x), inner.init(KEY, x)
  assert set(v_outer["params"]["cell"]["ii"]) == {"kernel_g", "kernel_v"}
  chex.assert_trees_all_close(v_outer, v_inner)
  chex.assert_trees_all_close(outer.apply(v_outer, x), inner.apply(v_inner, x))


class _InParent(nn.Module):
  """A container made in a compact method, its layers passed in: Flax makes them its siblings."""

  transform: Any
  outer: bool  # wrap the container (recursive), else each layer

  @nn.compact
  def __call__(self, x):
    if self.container == "rnn":
      cell = nn.SimpleCell(5)
      inner = cell if self.outer else self.transform(cell, recursive=True)
      made = nn.RNN(inner)
    else:
      layers = [nn.Dense(5), nn.tanh, nn.Dense(3)]
      if not self.outer:
        layers = [self.transform(m) if isinstance(m, nn.Dense) else m for m in layers]
      made = nn.Sequential(layers)
    return (self.transform(made, recursive=True) if self.outer else made)(x)

  container: str = "rnn"


@pytest.mark.parametrize("transform", [flaxnorm.weight_norm, flaxnorm.spectral_norm])
@pytest.mark.parametrize("container", ["rnn", "sequential"])
def test_recursive_reaches_layers_made_in_the_parent(transform, container):
  # nn.RNN(cell) or nn.Sequential(layers) in a compact method: Flax makes the
  # passed layers the parent's children, beside the container. Until
  # 2026-12-06 wrapping the container with recursive=True said its params did
  # not exist; now it reaches them, the same as wrapping each layer.
  x = jax.random.normal(KEY, (2, 3, 4))
  outer = _InParent(transform, True, container)
  inner = _InParent(transform, False, container)
  v_outer = outer.init(KEY, x)
  v_inner = inner.init(KEY, x)
  flat = lambda v: sorted(jax.tree_util.tree_flatten_with_path(v)[0], key=lambda kv: str(kv[0]))
  assert [a.shape for _, a in flat(v_outer)] == [a.shape for _, a in flat(v_inner)]
  if container == "rnn":  # the cell beside the RNN, not in it
    assert {"SimpleCell_0"} == set(v_outer["params"])
  kernel = "kernel_g" if transform is flaxnorm.weight_norm else "kernel"
  leaves = [jax.tree_util.keystr(k) for k, _ in flat(v_outer["params"])]
  assert sum(kernel in k for k in leaves) == 2

  # The same numbers as the layers wrapped one by one: outputs, gradients, new state.
  mutable = ["spectral"] if transform is flaxnorm.spectral_norm else False
  params = jax.tree.map(lambda a: a + 0.5 * jnp.cos(3.0 * a), v_inner["params"])

  def loss(model, v, p):
    out = model.apply({**v, "params": p}, x, mutable=mutable)
    y, new = out if mutable else (out, {})
    return jnp.sum(jnp.sin(y)), (y, new)

  # Each layer wrapped on its own is adopted by the container, as Flax does when
  # the layer has no name yet (flaxnorm.linen._transform); the outer wrap keeps
  # the plain model's layout.
  if container == "rnn":
    relabel = lambda t: {"SimpleCell_0": t["RNN_0"]["cell"]}
  else:
    relabel = lambda t: {
      "Dense_0": t["Sequential_0"]["layers_0"],
      "Dense_1": t["Sequential_0"]["layers_2"],
    }
  v_outer = {k: relabel(v) for k, v in v_inner.items()}
  ref = jax.value_and_grad(loss, argnums=2, has_aux=True)(inner, v_inner, params)
  got = jax.value_and_grad(loss, argnums=2, has_aux=True)(outer, v_outer, relabel(params))
  chex.assert_trees_all_close(got[0][1][0], ref[0][1][0], atol=1e-5)
  chex.assert_trees_all_close(got[1], relabel(ref[1]), atol=1e-5)
  ref_state = {k: relabel(v) for k, v in ref[0][1][1].items()}
  chex.assert_trees_all_close(got[0][1][1], ref_state, atol=1e-5)


class _SharedInstance(nn.Module):
  """One Dense instance called plain and wrapped, in the order given."""

  order: tuple[str, ...]
  method: str = "spectral_norm"

  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(3)
    wrap = getattr(flaxnorm, self.method)
    return [dense(x) if how == "plain" else wrap(dense)(x) for how in self.order]


@pytest.mark.parametrize(
  "order", [("plain", "wrapped"), ("wrapped", "plain"), ("wrapped", "wrapped")]
)
def test_instance_wrapped_in_a_compact_method_shares_the_layers_params(order):
  """The layer and its spectral-norm wrapper share one kernel, called in either order."""
  x = jax.random.normal(KEY, (2, 4))
  model = _SharedInstance(order)
  variables = model.init(KEY, x)
  kernel = variables["params"]["Dense_0"]["kernel"]
  assert set(variables["params"]) == {"Dense_0"}
  outs, _ = model.apply(variables, x, mutable=["spectral"])
  sigma = np.linalg.svd(np.asarray(kernel), compute_uv=False)[0]
  bias = variables["params"]["Dense_0"]["bias"]
  for how, out in zip(order, outs, strict=True):
    expected = x @ kernel + bias if how == "plain" else x @ kernel / sigma + bias
    chex.assert_trees_all_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("order", [("plain", "wrapped"), ("wrapped", "plain")])
def test_instance_called_plain_and_weight_normed_raises(order):
  """Weight norm replaces the kernel: the same instance cannot also run plain."""
  x = jnp.ones((2, 4))
  model = _SharedInstance(order, "weight_norm")
  with pytest.raises(ValueError, match=r"finds a plain 'kernel' param .* wrap the instance once"):
    model.apply(model.init(KEY, x), x)  # init itself raises when the plain call comes first


def test_remove_spectral_norm_refuses_an_empty_state():
  """An empty collection gave the params back unnormalized, silently."""
  variables = flaxnorm.spectral_norm(nn.Dense(3)).init(jax.random.key(0), jnp.ones((1, 4)))
  with pytest.raises(ValueError, match=r"the 'spectral' collection holds no \{x\}_u"):
    flaxnorm.remove_spectral_norm({"params": variables["params"], "spectral": {}})
