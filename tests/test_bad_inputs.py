"""Every bad input of the docs' table: a clear error, or a documented, tested behaviour.

Each row of ``BAD_INPUTS`` is one row of ``docs/bad-inputs.md``, "Bad inputs and what they get".
"""

import functools

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
X = jnp.ones((2, 4))


def _init(layer, x=X):
  return layer.init(KEY, x)


class IntParam(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x + self.param("table", lambda *_: jnp.zeros((3, 2), jnp.int32)).sum()


def _sn_vars():
  return _init(flaxnorm.spectral_norm(nn.Dense(3)))


# (row id, callable, error type, message pattern): each message must name the
# parameter and the layer path or function, and say what was expected.
BAD_INPUTS = [
  (
    "missing param name",
    lambda: _init(flaxnorm.weight_norm(nn.Dense(3), name="weight")),
    ValueError,
    r"param 'weight' of layer '<top level>' \(Dense\).*Its params are \['bias', 'kernel'\]",
  ),
  (
    "double wrapping",
    lambda: flaxnorm.spectral_norm(flaxnorm.weight_norm(nn.Dense)),
    ValueError,
    r"param 'kernel' of Dense is already wrapped by weight_norm",
  ),
  (
    "same name twice",
    lambda: flaxnorm.weight_norm(nn.Dense, name=["kernel", "kernel"]),
    ValueError,
    r"name lists \['kernel'\] more than once",
  ),
  (
    "SN on a 1-D param",
    lambda: _init(flaxnorm.spectral_norm(nn.Dense(3), name="bias")),
    ValueError,
    r"at least 2 dims at param 'bias' of layer .*shape \(3,\)",
  ),
  (
    "axis out of range",
    lambda: _init(flaxnorm.weight_norm(nn.Dense(3), axis=-3)),
    ValueError,
    r"axis -3 is out of range at param 'kernel'.*must be in \[-2, 1\]",
  ),
  (
    "axis of the wrong type",
    lambda: flaxnorm.weight_norm(nn.Dense, axis=1.0),
    TypeError,
    r"axis must be an int, a non-empty tuple of ints or None at weight_norm",
  ),
  (
    "integer params",
    lambda: _init(flaxnorm.weight_norm(IntParam(), name="table")),
    TypeError,
    r"the param at param 'table' of layer .* must be a floating-point array.*int32",
  ),
  (
    "eps <= 0",
    lambda: flaxnorm.weight_norm(nn.Dense, eps=0),
    ValueError,
    r"eps must be a positive finite float at weight_norm, got 0",
  ),
  (
    "n_power_iterations = 0",
    lambda: flaxnorm.spectral_norm(nn.Dense, n_power_iterations=0),
    ValueError,
    r"n_power_iterations must be >= 1 at spectral_norm, got 0",
  ),
  (
    "n_init_iterations < 0",
    lambda: flaxnorm.spectral_norm(nn.Dense, n_init_iterations=-5),
    ValueError,
    r"n_init_iterations must be >= 0 at spectral_norm, got -5",
  ),
  (
    "state collection missing at apply",
    lambda: flaxnorm.spectral_norm(nn.Dense(3)).apply({"params": _sn_vars()["params"]}, X),
    ValueError,
    r"state of param 'kernel' of layer .* is missing from the 'spectral' collection",
  ),
  (
    "spectral state of the wrong shape",
    lambda: flaxnorm.spectral_norm(nn.Dense(3)).apply(
      {
        "params": _sn_vars()["params"],
        "spectral": _init(flaxnorm.spectral_norm(nn.Dense(3)), jnp.ones((2, 5)))["spectral"],
      },
      X,
    ),
    ValueError,
    r"stored state of param 'kernel'.*expected kernel_u of shape \(3,\) and kernel_v of shape \(4,\).*got \(3,\) and \(5,\)",
  ),
  (
    "a non-Flax object as target",
    lambda: flaxnorm.weight_norm(lambda x: x),
    TypeError,
    r"weight_norm: the module \(first argument\) must be a flax.linen.Module class or instance",
  ),
  (
    "an NNX module as a Linen target",
    lambda: flaxnorm.spectral_norm(nnx.Linear(2, 3, rngs=nnx.Rngs(0))),
    TypeError,
    r"For NNX modules use flaxnorm.nnx.spectral_norm",
  ),
  (
    "a Flax-lifted class as target (wrap first, then lift)",
    lambda: flaxnorm.weight_norm(nn.remat(nn.Dense)),
    TypeError,
    r"CheckpointDense is a Flax-lifted class .*nn.remat\(flaxnorm.weight_norm\(nn.Dense\)\)",
  ),
  (
    "a Flax-lifted instance as target",
    lambda: flaxnorm.spectral_norm(nn.jit(nn.Dense)(3)),
    TypeError,
    r"JitDense is a Flax-lifted class",
  ),
  (
    "unknown spectral mode",
    lambda: flaxnorm.spectral_norm(nn.Dense, mode="max"),
    ValueError,
    r"mode must be one of \('normalize', 'clip'\) at spectral_norm, got 'max'",
  ),
  (
    "spectral collection named 'params'",
    lambda: flaxnorm.spectral_norm(nn.Dense, collection="params"),
    ValueError,
    r"collection must not be 'params'",
  ),
  (
    "remove_spectral_norm without the state",
    lambda: flaxnorm.remove_spectral_norm({"params": _sn_vars()["params"]}),
    ValueError,
    r"need 'params' and 'spectral' collections, found \['params'\]",
  ),
  (
    "remove_spectral_norm with the wrong axis",
    lambda: flaxnorm.remove_spectral_norm(_sn_vars(), axis=0),
    ValueError,
    r"param 'kernel' of shape \(4, 3\) does not fit its state.*pass the axis",
  ),
  (
    "integer kernel to scale_by_sigma",
    lambda: flaxnorm.scale_by_sigma(jnp.array([2, 2]), jnp.array(4.0)),
    TypeError,
    r"w at scale_by_sigma must be a floating-point array .*got int32",
  ),
  (
    "complex vectors to operator_power_iteration",
    lambda: flaxnorm.operator_power_iteration(
      lambda x: x, jnp.ones(2, jnp.complex64), jnp.ones(2), n_steps=1
    ),
    TypeError,
    r"u at operator_power_iteration must be a floating-point array .*complex is not supported",
  ),
  (
    "u of another shape than the map's output",
    lambda: flaxnorm.operator_power_iteration(
      lambda x: x @ jnp.ones((2, 3)), jnp.ones(2), jnp.ones(2), n_steps=1
    ),
    ValueError,
    r"u must have the shape of apply\(v\), \(3,\) for v of shape \(2,\), got \(2,\)",
  ),
  (
    "v of another shape than the map's input",
    lambda: flaxnorm.operator_power_iteration(
      lambda x: x @ jnp.ones((2, 3)), jnp.ones(3), jnp.ones(4), n_steps=1
    ),
    ValueError,
    r"apply fails on v of shape \(4,\) \(float32\); v must be an input apply takes .*dot_general",
  ),
  (
    "an apply that returns a tuple",
    lambda: flaxnorm.operator_power_iteration(
      lambda x: (x, x), jnp.ones(2), jnp.ones(2), n_steps=1
    ),
    TypeError,
    r"apply must return one array \(u's shape\), got tuple",
  ),
  (
    "stored g of another axis's layout",
    lambda: flaxnorm.weight_norm(nn.Dense(3)).apply(
      {
        "params": {"kernel_g": jnp.ones((4, 1)), "kernel_v": jnp.ones((4, 3)), "bias": jnp.zeros(3)}
      },
      X,
    ),
    ValueError,
    r"stored kernel_g of param 'kernel' of layer .* has shape \(4, 1\), expected \(1, 3\)",
  ),
  (
    "data_init on a batch of one example",
    lambda: _init(flaxnorm.weight_norm(nn.Dense(3), data_init=True), jnp.ones((1, 4))),
    ValueError,
    r"data_init=True .* at param 'kernel' of layer .*: the batch gives 1 value\(s\) per feature",
  ),
  (
    "data_init on a batch holding a NaN",
    lambda: _init(
      flaxnorm.weight_norm(nn.Dense(3), data_init=True), jnp.ones((4, 4)).at[1, 2].set(jnp.nan)
    ),
    ValueError,
    r"data_init=True .* at param 'kernel' of layer .*: the layer's output on it is not finite "
    r"\(3 of 12 values",
  ),
  (
    "NNX data_init on a batch holding an inf",
    lambda: flaxnorm.nnx.data_init(
      flaxnorm.nnx.weight_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0))),
      jnp.ones((4, 4)).at[0, 0].set(jnp.inf),
    ),
    ValueError,
    r"flaxnorm\.nnx\.data_init .* at param 'kernel' of Linear: the layer's output on it is not "
    r"finite",
  ),
  (
    "a wrong name on a layer used through another method",
    lambda: flaxnorm.spectral_norm(nn.Embed(10, 4)).init(KEY, X, method="attend"),
    ValueError,
    r"param 'kernel' of layer '<top level>' \(Embed\) does not exist.*name='embedding'",
  ),
  (
    "spectral eps too large to be a floor",
    lambda: flaxnorm.spectral_norm(nn.Dense, eps=0.5),
    ValueError,
    r"eps must be below 0.01 at spectral_norm, got 0.5",
  ),
  (
    "target beyond float32",
    lambda: flaxnorm.spectral_norm(nn.Dense, target=1e39),
    ValueError,
    r"target must be .* at most float32's largest",
  ),
  (
    "an iteration count beyond int32",
    lambda: flaxnorm.spectral_norm(nn.Dense, n_power_iterations=2**31),
    ValueError,
    r"n_power_iterations must be <= 2147483647 \(int32\) at spectral_norm",
  ),
  (
    "collection 'intermediates'",
    lambda: flaxnorm.spectral_norm(nn.Dense, collection="intermediates"),
    ValueError,
    r"collection must not be 'intermediates'",
  ),
  (
    "a sigma vector to scale_by_sigma",
    lambda: flaxnorm.scale_by_sigma(jnp.ones((2, 2)), jnp.ones(2)),
    ValueError,
    r"sigma must be a scalar .* got shape \(2,\)",
  ),
  (
    "a negative eps to scale_by_sigma",
    lambda: flaxnorm.scale_by_sigma(jnp.ones((2, 2)), 2.0, eps=-1.0),
    ValueError,
    r"eps must be a positive finite float at scale_by_sigma",
  ),
  (
    "an int as a PRNG key",
    lambda: flaxnorm.spectral_state_init(0, jnp.ones((3, 2))),
    TypeError,
    r"key at spectral_state_init must be one PRNG key .* got int",
  ),
  (
    "NNX rngs without a params or spectral stream",
    lambda: flaxnorm.nnx.spectral_norm(
      nnx.Linear(3, 2, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(dropout=0)
    ),
    ValueError,
    r"rngs needs a 'spectral', 'params' or default stream",
  ),
  (
    "NNX rngs an array that is not a key",
    lambda: flaxnorm.nnx.spectral_norm(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), rngs=jnp.ones(2)),
    TypeError,
    r"rngs at spectral_norm must be one PRNG key .* got float32 of shape \(2,\)",
  ),
  (
    "NNX operator mode: a conv's input_shape with the batch axis",
    lambda: flaxnorm.nnx.spectral_norm(
      nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)), operator=True, input_shape=(2, 8, 8, 3)
    ),
    ValueError,
    r"takes input_shape=\(\*spatial, features\), 3 dims for its 2 spatial dims, got "
    r"\(2, 8, 8, 3\): one example, without the batch axis",
  ),
  (
    "NNX operator mode: input_shape with the batch axis, then another batch size",
    lambda: flaxnorm.nnx.spectral_norm(
      nnx.Linear(3, 4, rngs=nnx.Rngs(0)), operator=True, input_shape=(5, 3)
    )(jnp.ones((7, 3))),
    ValueError,
    r"input_shape is one example without the batch axis: input_shape=\(3,\), not \(5, 3\)",
  ),
  (
    "Linen weight norm applied to a plain layer's params",
    lambda: flaxnorm.weight_norm(nn.Dense(3)).apply(
      nn.Dense(3).init(KEY, jnp.ones((1, 4))), jnp.ones((1, 4))
    ),
    ValueError,
    r"needs params \['kernel_g', 'kernel_v'\], found \['kernel'\]: these are the plain "
    r"layer's params. Convert them with flaxnorm.tree.weight_norm_init",
  ),
  (
    "Linen weight norm given plain params to create its own beside them (mutable apply)",
    lambda: flaxnorm.weight_norm(nn.Dense(3)).apply(
      nn.Dense(3).init(KEY, jnp.ones((1, 4))), jnp.ones((1, 4)), mutable=True
    ),
    ValueError,
    r"finds a plain 'kernel' param where it keeps \['kernel_g', 'kernel_v'\]",
  ),
  (
    "g that does not fit v",
    lambda: flaxnorm.weight_norm_compose(jnp.ones((1, 4)), jnp.ones((4, 3))),
    ValueError,
    r"g of shape \(1, 4\) does not fit v of shape \(4, 3\)",
  ),
]


@pytest.mark.parametrize("row, call, error, match", BAD_INPUTS, ids=[r[0] for r in BAD_INPUTS])
def test_bad_input_raises_clear_error(row, call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_numpy_bools_are_bools():
  layer = flaxnorm.spectral_norm(nn.Dense(3), operator=np.bool_(False))
  chex.assert_trees_all_close(_init(layer), _sn_vars())


def test_numpy_and_jax_scalars_are_numbers():
  layer = flaxnorm.spectral_norm(nn.Dense(3), target=np.float32(0.5), eps=jnp.float32(1e-6))
  variables = _init(layer)
  sigma = np.linalg.svd(np.asarray(variables["params"]["kernel"]), compute_uv=False)[0]
  y = layer.apply(variables, X)
  kernel = variables["params"]["kernel"] * 0.5 / sigma
  chex.assert_trees_all_close(y, X @ kernel + variables["params"]["bias"], rtol=1e-5)
  with pytest.raises(TypeError, match=r"target must be a positive float .*got np\.True_"):
    flaxnorm.spectral_norm(nn.Dense(3), target=np.bool_(True))


def test_numpy_integers_are_ints():
  """np.int64 axes and counts work as Python ints, in every face and the math functions."""
  layer = flaxnorm.spectral_norm(nn.Dense(3), axis=np.int64(-1), n_power_iterations=np.int32(2))
  expected = flaxnorm.spectral_norm(nn.Dense(3), axis=-1, n_power_iterations=2)
  chex.assert_trees_all_equal(layer.apply(_init(layer), X), expected.apply(_init(expected), X))
  wn = flaxnorm.weight_norm(nn.Dense(3), axis=(np.int64(0),))
  assert _init(wn)["params"]["kernel_g"].shape == (4, 1)
  lin = flaxnorm.nnx.spectral_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), axis=np.int64(-1))
  assert lin(X).shape == (2, 3)
  w = jnp.diag(jnp.array([3.0, 1.0]))
  chex.assert_trees_all_close(
    flaxnorm.power_iteration(w, jnp.ones(2), n_steps=np.int64(30))[2], jnp.float32(3.0)
  )
  assert flaxnorm.as_matrix(jnp.ones((2, 3)), axis=np.int64(0)).shape == (2, 3)
  with pytest.raises(TypeError, match=r"axis must be an int.*got np\.True_"):
    flaxnorm.spectral_norm(nn.Dense(3), axis=np.bool_(True))


def test_axis_map_none_under_spectral_norm_is_refused_at_wrap_time():
  with pytest.raises(
    TypeError,
    match=r"axis must be an int, a non-empty tuple of ints at spectral_norm: axis\['query'\]",
  ):
    flaxnorm.spectral_norm(nn.MultiHeadDotProductAttention(2), recursive=True, axis={"query": None})


def test_nnx_container_wrapped_directly_points_at_its_layers():
  model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), nnx.relu)
  with pytest.raises(
    ValueError,
    match=r"Sequential holds no params itself, its submodules \(Linear\) do.*wrap_modules\("
    r"model, flaxnorm\.nnx\.spectral_norm, where=nnx\.Linear\)",
  ):
    flaxnorm.nnx.spectral_norm(model)


def test_math_and_tree_messages_name_the_argument():
  with pytest.raises(TypeError, match=r"u at power_iteration must be a floating-point array.*list"):
    flaxnorm.power_iteration(jnp.eye(4), [1.0, 1.0, 1.0, 1.0])
  with pytest.raises(ValueError, match=r"w must have at least 1 dim, got a scalar"):
    flaxnorm.weight_norm_decompose(jnp.ones(()))
  with pytest.raises(ValueError, match=r"params is a single array; put it in a dict"):
    flaxnorm.tree.weight_norm_init(jnp.ones((3, 3)))
  state = flaxnorm.tree.spectral_norm_init({"kernel": jnp.ones((3, 3))}, KEY)
  boxed = {"kernel": nn.Partitioned(jnp.ones((3, 3)), ("a", "b"))}
  with pytest.raises(TypeError, match=r"is a Partitioned, not an array\. Unbox it first"):
    flaxnorm.tree.spectral_norm_apply(boxed, state, update=False)


@pytest.mark.parametrize("jit", [False, True])
def test_nnx_call_time_errors_name_the_path_wrap_modules_found(jit):
  model = nnx.Sequential(*[nnx.Linear(4, 4, rngs=nnx.Rngs(i)) for i in range(3)])
  flaxnorm.nnx.wrap_modules(model, flaxnorm.nnx.weight_norm, where=nnx.Linear)
  model.layers[1].kernel_g = nnx.Param(jnp.ones((4, 1)))
  call = nnx.jit(lambda m, x: m(x)) if jit else (lambda m, x: m(x))
  with pytest.raises(
    ValueError, match=r"kernel_g of param 'kernel' of layer 'layers/1' \(Linear\)"
  ):
    call(model, jnp.ones((2, 4)))


def test_nnx_layer_path_is_hidden_and_goes_with_the_wrapper():
  model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
  flaxnorm.nnx.wrap_modules(model, flaxnorm.nnx.spectral_norm, where=nnx.Linear)
  assert "flaxnorm" not in repr(model)
  flaxnorm.nnx.remove_spectral_norm(model)
  assert vars(model.layers[0]).keys() == vars(nnx.Linear(4, 4, rngs=nnx.Rngs(0))).keys()


def test_nnx_input_shape_needs_operator_mode():
  with pytest.raises(
    ValueError, match=r"input_shape=\(4,\) is for operator mode: pass operator=True"
  ):
    flaxnorm.nnx.spectral_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), input_shape=(4,))
  model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"is for operator mode"):
    flaxnorm.nnx.wrap_modules(model, flaxnorm.nnx.spectral_norm, where=nnx.Linear, input_shape=(4,))


@pytest.mark.parametrize("eps", [1e-12, 1e-13, 1e-20, 1e-40])
def test_zero_weights_give_finite_zeros_whatever_eps(eps):
  """A tiny ``eps`` used to give NaN: its square's rsqrt has an inf derivative (below 1.4e-13
  in float32) or flushes to 0 (below 1.1e-19); the clamp's 0 times that inf is NaN."""
  chex.assert_trees_all_equal(flaxnorm.l2_normalize(jnp.zeros(3), eps=eps), jnp.zeros(3))
  layer = flaxnorm.weight_norm(nn.Dense(3, kernel_init=nn.initializers.zeros), eps=eps)
  variables = _init(layer)
  chex.assert_trees_all_close(layer.apply(variables, X), jnp.zeros((2, 3)))
  grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, X)))(variables["params"])
  chex.assert_tree_all_finite(grads)
  g = jnp.ones((1, 3))
  compose = functools.partial(flaxnorm.weight_norm_compose, g, eps=eps)
  chex.assert_tree_all_finite(jax.jacrev(compose)(jnp.zeros((4, 3))))
  chex.assert_tree_all_finite(jax.jacfwd(compose)(jnp.zeros((4, 3))))


def test_zero_weights_give_finite_zeros():
  for wrap in (flaxnorm.weight_norm, flaxnorm.spectral_norm):
    layer = wrap(nn.Dense(3, kernel_init=nn.initializers.zeros, use_bias=False))
    variables = _init(layer)
    y, _ = layer.apply(variables, X, mutable=["spectral"])
    chex.assert_trees_all_close(y, jnp.zeros((2, 3)))
    grads = jax.grad(lambda p: jnp.sum(layer.apply({**variables, "params": p}, X)))(
      variables["params"]
    )
    chex.assert_tree_all_finite(grads)


def test_nan_weights_give_nan_outputs_and_leave_the_state_alone():
  """Documented: NaN in a kernel reaches the output (loudly) and never the spectral state."""
  layer = flaxnorm.spectral_norm(nn.Dense(3))
  variables = _init(layer)
  bad = {
    **variables,
    "params": {
      **variables["params"],
      "kernel": variables["params"]["kernel"].at[0, 0].set(jnp.nan),
    },
  }
  y, updates = layer.apply(bad, X, mutable=["spectral"])
  assert bool(jnp.all(jnp.isnan(y)))
  chex.assert_trees_all_equal(updates["spectral"], variables["spectral"])  # no partial update
  wn = flaxnorm.weight_norm(nn.Dense(3))
  wv = _init(wn)
  bad = {"params": {**wv["params"], "kernel_v": wv["params"]["kernel_v"].at[0, 0].set(jnp.nan)}}
  y = wn.apply(bad, X)
  # Only the output feature whose column holds the NaN is NaN, as in the plain layer.
  np.testing.assert_array_equal(
    np.isnan(y), np.isnan(nn.Dense(3).apply(flaxnorm.remove_weight_norm(bad), X))
  )
  assert bool(jnp.all(jnp.isnan(y[:, 0]))) and bool(jnp.all(jnp.isfinite(y[:, 1:])))


@pytest.mark.parametrize("wrap", [flaxnorm.weight_norm, flaxnorm.spectral_norm])
@pytest.mark.parametrize(
  "param_dtype, x_dtype",
  [(jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.float32), (jnp.float16, jnp.float16)],
)
def test_input_dtype_differs_from_params(wrap, param_dtype, x_dtype):
  """Documented: the wrapped layer computes in the dtype the plain layer would."""
  plain = nn.Dense(3, param_dtype=param_dtype)
  layer = wrap(nn.Dense(3, param_dtype=param_dtype))
  x = jnp.ones((2, 4), x_dtype)
  variables = layer.init(KEY, x)
  y = layer.apply(variables, x)
  assert y.dtype == plain.apply(plain.init(KEY, x), x).dtype
  chex.assert_tree_all_finite(y)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_layers_stay_finite(dtype):
  """Rows of 1000 x 3000.0 in float16 overflow PyTorch's weight norm; not here."""
  big = nn.initializers.constant(3000.0)
  x = jnp.full((2, 1000), 1e-5, dtype)
  plain = nn.Dense(2, kernel_init=big, param_dtype=dtype, dtype=dtype)
  expected = plain.apply(plain.init(KEY, x), x)
  for wrap in (flaxnorm.weight_norm, flaxnorm.spectral_norm):
    layer = wrap(nn.Dense(2, kernel_init=big, param_dtype=dtype, dtype=dtype))
    variables = layer.init(KEY, x)
    y, _ = layer.apply(variables, x, mutable=["spectral"])
    assert y.dtype == dtype
    chex.assert_tree_all_finite(y)
    if wrap is flaxnorm.weight_norm:
      np.testing.assert_allclose(
        np.asarray(y, np.float32), np.asarray(expected, np.float32), rtol=1e-2
      )
    else:  # every column is the same, so sigma = sqrt(2 * 1000) * 3000
      np.testing.assert_allclose(
        np.asarray(y, np.float32),
        np.asarray(expected, np.float32) / (np.sqrt(2000) * 3000),
        rtol=2e-2,
      )
      assert variables["spectral"]["kernel_u"].dtype == jnp.float32
