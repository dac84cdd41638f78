"""Weight norm's data-dependent init (Salimans & Kingma, 2016, §3.3), Linen and NNX.

Every weight-normed layer's output on the init batch must have mean 0 and std
``init_scale`` per output feature, layer by layer; ``g`` and the bias must be
the paper's ``init_scale / s`` and ``-mu * init_scale / s`` of the unit-norm
pre-activation (a numpy reference), and ``apply`` must reproduce the init output.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxnorm
import flaxnorm.nnx

KEY = jax.random.key(0)
TOL = 1e-4


def _normal(shape, seed=1, scale=1.0, shift=0.0):
  # numpy, not jax.random: on CPU each new shape of a (partitionable) threefry
  # draw compiles for seconds, which would dominate these tests.
  return jnp.asarray(np.random.default_rng(seed).normal(shift, scale, shape), jnp.float32)


def _kernel_init(key, shape, dtype=jnp.float32):
  """A random kernel from numpy (see _normal); its scale does not matter to data init."""
  del key
  return _normal(shape, seed=int(np.prod(shape)), scale=0.3).astype(dtype)


K = {"kernel_init": _kernel_init}


def _check_stats(y, feature_axes, init_scale, mean=True):
  """Mean 0 (if ``mean``) and std ``init_scale`` of each feature over the other axes."""
  y = np.asarray(y, np.float64)
  reduced = tuple(i for i in range(y.ndim) if i - y.ndim not in feature_axes)
  if mean:
    np.testing.assert_allclose(y.mean(reduced), 0.0, atol=TOL)
  np.testing.assert_allclose(y.std(reduced), init_scale, atol=TOL)


def _reference(t, feature_axes, init_scale):
  """The paper's rule in numpy: (init_scale / s, -mu * init_scale / s), features kept."""
  t = np.asarray(t, np.float64)
  reduced = tuple(i for i in range(t.ndim) if i - t.ndim not in feature_axes)
  mu, s = t.mean(reduced, keepdims=True), t.std(reduced, keepdims=True)
  return init_scale / s, -mu * init_scale / s


def _intermediates(model, variables, x):
  """Each submodule's ``__call__`` output, by name (in call order)."""
  _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
  calls = state["intermediates"]
  return {k: v["__call__"][0] for k, v in calls.items() if k != "__call__"}


# --------------------------------------------------------------------------- #
# Linen.
# --------------------------------------------------------------------------- #


class MLP(nn.Module):
  init_scale: float = 1.0

  @nn.compact
  def __call__(self, x):
    dense = flaxnorm.weight_norm(nn.Dense, data_init=True, init_scale=self.init_scale)
    x = nn.relu(dense(16, name="d0", **K)(x))
    x = nn.tanh(dense(8, name="d1", **K)(x))
    return dense(3, name="d2", **K)(x)


class ConvNet(nn.Module):
  init_scale: float = 1.0

  @nn.compact
  def __call__(self, x):
    wn = dict(data_init=True, init_scale=self.init_scale)
    x = nn.relu(flaxnorm.weight_norm(nn.Conv(6, (3, 3), **K), **wn)(x))
    x = nn.relu(flaxnorm.weight_norm(nn.Conv(8, (3, 3), strides=2, **K), **wn)(x))
    return flaxnorm.weight_norm(nn.ConvTranspose(4, (3, 3), strides=(2, 2), **K), **wn)(x)


@pytest.mark.parametrize(
  ("model", "shape", "init_scale"),
  [(MLP, (64, 5), 1.0), (MLP, (64, 5), 2.5), (ConvNet, (8, 8, 8, 3), 0.5)],
  ids=["mlp", "mlp-scale2.5", "convnet-scale0.5"],
)
def test_linen_every_layer_normalized_on_the_init_batch(model, shape, init_scale):
  x = _normal(shape, scale=3.0, shift=1.0)  # far from mean 0, std 1
  net = model(init_scale=init_scale)
  y, variables = net.init_with_output(KEY, x)
  outs = _intermediates(net, variables, x)  # from apply: the stored g and bias
  assert len(outs) == 3
  for out in outs.values():
    _check_stats(out, (-1,), init_scale)
  chex.assert_trees_all_close(y, list(outs.values())[-1], atol=1e-5)


def test_linen_g_and_bias_follow_the_paper():
  x = _normal((32, 4), seed=1, shift=2.0)
  layer = flaxnorm.weight_norm(nn.Dense(3, **K), data_init=True, init_scale=1.5)
  params = layer.init(KEY, x)["params"]
  v = np.asarray(params["kernel_v"], np.float64)
  t = np.asarray(x, np.float64) @ (v / np.linalg.norm(v, axis=0))
  g, b = _reference(t, (-1,), 1.5)
  np.testing.assert_allclose(params["kernel_g"], g, rtol=1e-5)
  np.testing.assert_allclose(params["bias"], b[0], rtol=1e-5, atol=1e-6)
  # apply does not re-initialize: on another batch it is the plain formula.
  x2 = _normal((5, 4), seed=2)
  expected = np.asarray(x2, np.float64) @ (v / np.linalg.norm(v, axis=0) * g) + b[0]
  np.testing.assert_allclose(layer.apply({"params": params}, x2), expected, rtol=1e-5, atol=1e-5)


def test_linen_recursive_wraps_each_dense():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4, **K)(nn.relu(nn.Dense(6, **K)(x)))

  x = _normal((40, 3), seed=1)
  net = flaxnorm.weight_norm(Block, recursive=True, data_init=True)()
  variables = net.init(KEY, x)
  for out in _intermediates(net, variables, x).values():
    _check_stats(out, (-1,), 1.0)


def test_linen_shared_layer_is_set_at_its_first_call():
  class Twice(nn.Module):
    def setup(self):
      self.dense = flaxnorm.weight_norm(nn.Dense(4, **K), data_init=True)

    def __call__(self, x):
      first = self.dense(x)
      return first, self.dense(2.0 * first)

  x = _normal((32, 4), shift=1.0)
  (first, second), variables = Twice().init_with_output(KEY, x)
  _check_stats(first, (-1,), 1.0)
  chex.assert_trees_all_close(Twice().apply(variables, x), (first, second), atol=1e-5)


def test_data_init_false_is_unchanged():
  x = _normal((16, 4), seed=1, shift=2.0)
  plain = nn.Dense(3, **K).init(KEY, x)["params"]
  for kwargs in ({}, {"data_init": False}):
    params = flaxnorm.weight_norm(nn.Dense(3, **K), **kwargs).init(KEY, x)["params"]
    np.testing.assert_allclose(
      params["kernel_g"], np.linalg.norm(params["kernel_v"], axis=0, keepdims=True), rtol=1e-6
    )
    chex.assert_trees_all_close(params["kernel_v"], plain["kernel"])
    chex.assert_trees_all_close(params["bias"], plain["bias"])


@pytest.mark.parametrize(
  ("layer", "shape", "axis", "features"),
  [
    (lambda: nn.DenseGeneral((2, 3), **K), (20, 4), (-2, -1), (-2, -1)),
    (lambda: nn.DenseGeneral((2, 3), axis=(-2, -1), **K), (20, 3, 5), -1, (-1,)),
    (lambda: nn.ConvTranspose(3, (3,), strides=(2,), **K), (6, 5, 2), -1, (-1,)),
    (lambda: nn.ConvTranspose(3, (3,), transpose_kernel=True, **K), (6, 5, 2), -2, (-1,)),
  ],
  ids=["dense_general-both", "dense_general-last", "conv_transpose", "conv_transpose-transposed"],
)
def test_linen_layers_with_other_feature_axes(layer, shape, axis, features):
  x = _normal(shape, seed=1, scale=2.0, shift=-1.0)
  wrapped = flaxnorm.weight_norm(layer(), axis=axis, data_init=True, init_scale=0.7)
  y, variables = wrapped.init_with_output(KEY, x)
  _check_stats(y, features, 0.7)
  chex.assert_trees_all_close(wrapped.apply(variables, x), y, atol=1e-5)


def test_linen_layer_without_bias_sets_only_g():
  x = _normal((32, 4), seed=1, shift=2.0)
  layer = flaxnorm.weight_norm(nn.Dense(3, use_bias=False, **K), data_init=True)
  y, variables = layer.init_with_output(KEY, x)
  assert set(variables["params"]) == {"kernel_g", "kernel_v"}
  _check_stats(y, (-1,), 1.0, mean=False)
  v = np.asarray(variables["params"]["kernel_v"], np.float64)
  t = np.asarray(x, np.float64) @ (v / np.linalg.norm(v, axis=0))
  g, _ = _reference(t, (-1,), 1.0)
  np.testing.assert_allclose(variables["params"]["kernel_g"], g, rtol=1e-5)
  # No bias to remove the mean: it stays mu * g.
  np.testing.assert_allclose(np.asarray(y).mean(0), g[0] * t.mean(0), rtol=1e-4, atol=1e-5)
  assert np.max(np.abs(t.mean(0))) > 0.1  # so the check above can fail


@pytest.mark.parametrize(("x_scale", "init_scale"), [(1.0, 1e-7), (1e-7, 1.0)])
def test_small_features_are_normalized_not_taken_as_constant(x_scale, init_scale):
  """The constant-feature test was absolute (std <= 1e-6): tiny data, or a tiny init_scale
  upstream, came out unnormalized."""
  x = _normal((64, 5), scale=x_scale)
  net = MLP(init_scale=init_scale)
  _, variables = net.init_with_output(KEY, x)
  for out in _intermediates(net, variables, x).values():
    y = np.asarray(out, np.float64)
    np.testing.assert_allclose(y.std(0), init_scale, rtol=1e-3)
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-3 * init_scale)


def test_constant_feature_gives_finite_g():
  x = jnp.ones((8, 4))  # every feature constant over the batch
  layer = flaxnorm.weight_norm(nn.Dense(3, **K), data_init=True, init_scale=2.0)
  y, variables = layer.init_with_output(KEY, x)
  params = variables["params"]
  np.testing.assert_allclose(params["kernel_g"], 2.0)  # s = 1
  np.testing.assert_allclose(y, 0.0, atol=1e-5)
  assert np.all(np.isfinite(layer.apply(variables, _normal((2, 4), seed=0))))


@pytest.mark.parametrize("init_scale", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_init_scale(init_scale):
  with pytest.raises(ValueError, match="init_scale"):
    flaxnorm.weight_norm(nn.Dense(3, **K), data_init=True, init_scale=init_scale)
  model = nnx.Linear(2, 2, **K, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="init_scale"):
    flaxnorm.nnx.data_init(flaxnorm.nnx.weight_norm(model), jnp.ones((2, 2)), init_scale=init_scale)


def test_data_init_must_be_bool():
  with pytest.raises(TypeError, match="data_init"):
    flaxnorm.weight_norm(nn.Dense(3, **K), data_init=1)  # type: ignore[arg-type]


def test_linen_unsupported_layer_names_its_path():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, ids):
      embed = flaxnorm.weight_norm(
        nn.Embed(7, 4, embedding_init=_kernel_init), name="embedding", axis=0, data_init=True
      )
      return nn.Dense(2, name="head", **K)(embed(ids))

  with pytest.raises(ValueError, match=r"data_init=True supports.*'Embed_0'.*Embed"):
    Model().init(KEY, jnp.array([[0, 3]]))


def test_linen_kept_axis_not_a_feature_axis():
  layer = flaxnorm.weight_norm(nn.Dense(3, **K), axis=0, data_init=True)
  with pytest.raises(ValueError, match=r"output-feature axes.*kernel axes \[0\]"):
    layer.init(KEY, jnp.ones((4, 2)))


# --------------------------------------------------------------------------- #
# NNX.
# --------------------------------------------------------------------------- #


def _nnx_mlp():
  rngs = nnx.Rngs(0)
  layers = [
    nnx.Linear(5, 16, **K, rngs=rngs),
    nnx.Linear(16, 8, **K, rngs=rngs),
    nnx.Linear(8, 3, **K, rngs=rngs),
  ]
  model = nnx.Sequential(layers[0], nnx.relu, layers[1], nnx.tanh, layers[2])
  return flaxnorm.nnx.wrap_modules(model, flaxnorm.nnx.weight_norm, where=nnx.Linear), layers


def _nnx_convnet():
  rngs = nnx.Rngs(0)
  layers = [
    nnx.Conv(3, 6, (3, 3), **K, rngs=rngs),
    nnx.Conv(6, 8, (3, 3), strides=2, **K, rngs=rngs),
    nnx.ConvTranspose(8, 4, (3, 3), strides=(2, 2), **K, rngs=rngs),
  ]
  model = nnx.Sequential(layers[0], nnx.relu, layers[1], nnx.relu, layers[2])
  where = (nnx.Conv, nnx.ConvTranspose)
  return flaxnorm.nnx.wrap_modules(model, flaxnorm.nnx.weight_norm, where=where), layers


@pytest.mark.parametrize(
  ("build", "shape", "init_scale"),
  [(_nnx_mlp, (64, 5), 1.0), (_nnx_mlp, (64, 5), 2.5), (_nnx_convnet, (8, 8, 8, 3), 0.5)],
  ids=["mlp", "mlp-scale2.5", "convnet-scale0.5"],
)
def test_nnx_every_layer_normalized_on_the_init_batch(build, shape, init_scale):
  model, layers = build()
  x = _normal(shape, scale=3.0, shift=1.0)
  y = flaxnorm.nnx.data_init(model, x, init_scale=init_scale)
  h = x  # rerun layer by layer with the stored g and bias
  for i, layer in enumerate(model.layers):
    h = layer(h)
    if i % 2 == 0:
      _check_stats(h, (-1,), init_scale)
  chex.assert_trees_all_close(y, h, atol=1e-5)
  assert len(layers) == 3


def test_nnx_matches_linen():
  x = _normal((32, 4), seed=1, shift=2.0)
  linen = flaxnorm.weight_norm(nn.Dense(3, **K), data_init=True, init_scale=1.5)
  params = linen.init(KEY, x)["params"]
  layer = flaxnorm.nnx.weight_norm(nnx.Linear(4, 3, **K, rngs=nnx.Rngs(0)))
  layer.kernel_v[...] = linen.init(KEY, x)["params"]["kernel_v"]  # the same direction
  flaxnorm.nnx.data_init(layer, x, init_scale=1.5)
  chex.assert_trees_all_close(layer.kernel_g[...], params["kernel_g"], rtol=1e-5)
  chex.assert_trees_all_close(layer.bias[...], params["bias"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  ("layer", "shape", "axis", "features"),
  [
    (lambda r: nnx.LinearGeneral(4, (2, 3), **K, rngs=r), (20, 4), (-2, -1), (-2, -1)),
    (lambda r: nnx.LinearGeneral(4, (2, 3), **K, rngs=r), (20, 4), -1, (-1,)),
    (
      lambda r: nnx.ConvTranspose(2, 3, (3,), transpose_kernel=True, **K, rngs=r),
      (6, 5, 2),
      -2,
      (-1,),
    ),
    (lambda r: nnx.Linear(4, 3, use_bias=False, **K, rngs=r), (20, 4), -1, (-1,)),
  ],
  ids=["linear_general-both", "linear_general-last", "conv_transpose-transposed", "no-bias"],
)
def test_nnx_layers_with_other_feature_axes(layer, shape, axis, features):
  module = flaxnorm.nnx.weight_norm(layer(nnx.Rngs(0)), axis=axis)
  x = _normal(shape, seed=1, scale=2.0, shift=-1.0)
  y = flaxnorm.nnx.data_init(module, x, init_scale=0.7)
  _check_stats(y, features, 0.7, mean=module.bias is not None)
  chex.assert_trees_all_close(module(x), y, atol=1e-5)


def test_nnx_no_weight_normed_layer():
  model = nnx.Sequential(nnx.Linear(2, 3, **K, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"no layer wrapped by flaxnorm.nnx.weight_norm.*Linear"):
    flaxnorm.nnx.data_init(model, jnp.ones((4, 2)))


def test_nnx_unsupported_layer_names_its_path():
  rngs = nnx.Rngs(0)
  model = nnx.Sequential(
    nnx.Embed(7, 4, embedding_init=_kernel_init, rngs=rngs), nnx.Linear(4, 2, **K, rngs=rngs)
  )
  flaxnorm.nnx.weight_norm(model.layers[0], name="embedding", axis=0)
  with pytest.raises(ValueError, match=r"layer 'layers/0' \(Embed\)"):
    flaxnorm.nnx.data_init(model, jnp.array([[0, 3]]))


def test_nnx_kept_axis_not_a_feature_axis():
  layer = flaxnorm.nnx.weight_norm(nnx.Linear(2, 3, **K, rngs=nnx.Rngs(0)), axis=0)
  with pytest.raises(ValueError, match=r"output-feature axes.*kernel axes \[0\]"):
    flaxnorm.nnx.data_init(layer, jnp.ones((4, 2)))


def test_nnx_error_in_the_call_restores_the_model():
  class Failing(nnx.Module):
    def __init__(self):
      self.linear = flaxnorm.nnx.weight_norm(nnx.Linear(2, 3, **K, rngs=nnx.Rngs(0)))

    def __call__(self, x):
      self.linear(x)
      raise RuntimeError("boom")

  model = Failing()
  g = model.linear.kernel_g[...]
  with pytest.raises(RuntimeError, match="boom"):
    flaxnorm.nnx.data_init(model, _normal((8, 2), seed=0, shift=3.0))
  chex.assert_trees_all_equal(model.linear.kernel_g[...], g)


def _remat_model():
  class Remat(nnx.Module):
    def __init__(self):
      self.linear = flaxnorm.nnx.weight_norm(nnx.Linear(2, 3, **K, rngs=nnx.Rngs(0)))

    def __call__(self, x):
      return nnx.remat(lambda layer, x: layer(x))(self.linear, x)

  return Remat()


def _rnn_model():
  rnn = nnx.RNN(nnx.SimpleCell(2, 3, rngs=nnx.Rngs(0)))
  return flaxnorm.nnx.wrap_modules(rnn, flaxnorm.nnx.weight_norm, where=nnx.Linear)


@pytest.mark.parametrize(
  "build, shape", [(_remat_model, (8, 2)), (_rnn_model, (4, 5, 2))], ids=["remat", "rnn"]
)
def test_nnx_layer_called_through_a_transform_is_refused(build, shape):
  """A lifted transform calls a copy: data_init cannot set its g, and says so (was silent)."""
  model = build()
  before = nnx.to_pure_dict(nnx.state(model))
  with pytest.raises(
    ValueError,
    match=r"data_init: param 'kernel' of (layer '[^']*' \(Linear\)|Linear) was called through",
  ):
    flaxnorm.nnx.data_init(model, _normal(shape, seed=0, shift=3.0))
  chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(model)), before)


def test_nnx_errors_speak_nnx():
  layer = flaxnorm.nnx.weight_norm(nnx.Linear(2, 3, **K, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"^flaxnorm.nnx.data_init takes each output feature's std"):
    flaxnorm.nnx.data_init(layer, jnp.ones((1, 2)))
  layer = flaxnorm.nnx.weight_norm(nnx.Linear(2, 3, **K, rngs=nnx.Rngs(0)), axis=0)
  with pytest.raises(
    ValueError, match=r"^flaxnorm.nnx.data_init needs .*leave it out of data_init"
  ):
    flaxnorm.nnx.data_init(layer, jnp.ones((4, 2)))


@pytest.mark.parametrize(
  "build",
  [
    lambda: nn.RNN(flaxnorm.weight_norm(nn.SimpleCell(3), recursive=True, data_init=True)),
    lambda: flaxnorm.weight_norm(nn.RNN(nn.SimpleCell(3)), recursive=True, data_init=True),
  ],
  ids=["cell", "rnn"],
)
def test_linen_data_init_over_time_is_refused(build):
  """An nn.RNN broadcasts its params: Flax's own error named neither the layer nor data_init."""
  with pytest.raises(
    ValueError, match=r"data_init=True on (SimpleCell|RNN).*broadcasts its params"
  ):
    build().init(jax.random.key(0), _normal((4, 5, 2), seed=0, shift=3.0))
