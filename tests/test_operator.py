"""Operator-mode spectral norm: sigma is the norm of what the layer computes.

References are exact: the largest singular value of the layer's dense Jacobian
(numpy SVD in float64) and, for circular convolutions, of the FFT-domain blocks.
"""

import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxnorm

KEY = jax.random.key(0)


def _jacobian_sigma(f, x1):
  """sigma_max of x -> f(x) - f(0) on one example, from the dense Jacobian."""
  zero = jnp.zeros_like(x1)
  # One compile, where eager jacfwd compiles each op of the layer on its own.
  jac = jax.jit(jax.jacfwd(lambda x: f(x) - f(zero)))(zero)
  out_size = int(np.prod(jax.eval_shape(f, zero).shape))
  return np.linalg.svd(np.asarray(jac, np.float64).reshape(out_size, -1), compute_uv=False)[0]


CASES = {
  "conv3x3_same": (lambda: nn.Conv(4, (3, 3)), (6, 6, 3)),
  "conv3x3_valid": (lambda: nn.Conv(4, (3, 3), padding="VALID"), (6, 6, 3)),
  "conv_stride2": (lambda: nn.Conv(4, (3, 3), strides=2), (6, 6, 3)),
  "conv_dilation2": (lambda: nn.Conv(4, (3, 3), kernel_dilation=2), (6, 6, 3)),
  "conv_grouped": (lambda: nn.Conv(4, (3, 3), feature_group_count=2), (6, 6, 4)),
  "conv_circular": (lambda: nn.Conv(4, (3, 3), padding="CIRCULAR"), (6, 6, 3)),
  "conv_transpose_stride2": (lambda: nn.ConvTranspose(3, (3, 3), strides=(2, 2)), (4, 4, 2)),
  "conv1d": (lambda: nn.Conv(3, (5,)), (10, 2)),
  "conv3d": (lambda: nn.Conv(2, (2, 2, 2)), (3, 3, 3, 2)),
  "conv_local": (lambda: nn.ConvLocal(2, (3, 3)), (5, 5, 2)),
  "dense": (lambda: nn.Dense(5), (7,)),
  "dense_general": (lambda: nn.DenseGeneral((2, 3), axis=(-2, -1)), (4, 3)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sigma_is_the_jacobian_norm(case):
  make, example = CASES[case]
  x = jax.random.normal(jax.random.key(1), (2, *example))
  layer = flaxnorm.spectral_norm(make(), operator=True, n_init_iterations=500)
  variables = layer.init(KEY, x)
  plain = make()
  sigma = _jacobian_sigma(lambda z: plain.apply({"params": variables["params"]}, z), x[:1])
  np.testing.assert_allclose(variables["spectral"]["kernel_sigma"], sigma, rtol=1e-3)
  # After normalization the layer's Jacobian has norm 1.
  normalized = _jacobian_sigma(lambda z: layer.apply(variables, z), x[:1])
  np.testing.assert_allclose(normalized, 1.0, atol=2e-3)
  # The state: one output example and one input example.
  assert variables["spectral"]["kernel_v"].shape == (1, *example)
  assert (
    variables["spectral"]["kernel_u"].shape == jax.eval_shape(layer.apply, variables, x[:1]).shape
  )


def test_circular_sigma_matches_the_fft():
  x = jax.random.normal(jax.random.key(1), (1, 8, 8, 8))
  layer = flaxnorm.spectral_norm(nn.Conv(8, (3, 3), padding="CIRCULAR"), operator=True,
                                 n_init_iterations=1000)  # fmt: skip
  variables = layer.init(KEY, x)
  kernel = np.asarray(variables["params"]["kernel"], np.float64)  # (3, 3, in, out)
  padded = np.zeros((8, 8, 8, 8))
  padded[:3, :3] = kernel
  blocks = np.fft.fft2(padded, axes=(0, 1))  # (8, 8, in, out): one block per frequency
  fft_sigma = np.linalg.svd(blocks, compute_uv=False).max()
  np.testing.assert_allclose(variables["spectral"]["kernel_sigma"], fft_sigma, rtol=1e-3)
  # The reshaped kernel's norm is not the operator norm.
  assert flaxnorm.spectral_norm(nn.Conv(8, (3, 3))).init(KEY, x)["spectral"]["kernel_sigma"] < 0.9 * fft_sigma  # fmt: skip


def test_dense_operator_equals_kernel_mode():
  x = jax.random.normal(jax.random.key(1), (3, 6))
  op = flaxnorm.spectral_norm(nn.Dense(4), operator=True, n_init_iterations=500).init(KEY, x)
  kern = flaxnorm.spectral_norm(nn.Dense(4), n_init_iterations=500).init(KEY, x)
  np.testing.assert_allclose(op["spectral"]["kernel_sigma"], kern["spectral"]["kernel_sigma"], rtol=1e-5)  # fmt: skip


def test_training_updates_evaluation_freezes_and_removal_matches():
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
  layer = flaxnorm.spectral_norm(nn.Conv(4, (3, 3), strides=2), operator=True, n_init_iterations=3)
  variables = layer.init(KEY, x)
  y_eval = layer.apply(variables, x)
  _, updates = layer.apply(variables, x, mutable=["spectral"])
  assert not np.allclose(updates["spectral"]["kernel_u"], variables["spectral"]["kernel_u"])
  y_again, changed = layer.apply(variables, x, mutable=[])  # eval: nothing changes
  chex.assert_trees_all_close(y_again, y_eval)
  assert not changed
  plain = flaxnorm.remove_spectral_norm(variables)
  chex.assert_trees_all_close(nn.Conv(4, (3, 3), strides=2).apply(plain, x), y_eval, atol=1e-6)
  plain = flaxnorm.remove_spectral_norm({**variables, **updates})
  chex.assert_trees_all_close(
    nn.Conv(4, (3, 3), strides=2).apply(plain, x), layer.apply({**variables, **updates}, x),
    atol=1e-6,
  )  # fmt: skip


def test_gradient_is_that_of_w_over_sigma_of_w():
  x = jax.random.normal(jax.random.key(1), (2, 5, 5, 2))
  conv = nn.Conv(3, (3, 3), use_bias=False)
  layer = flaxnorm.spectral_norm(conv, operator=True, n_init_iterations=5)
  variables = layer.init(KEY, x)

  def loss(params):
    y, upd = layer.apply({"params": params, "spectral": variables["spectral"]}, x, mutable=["spectral"])  # fmt: skip
    return jnp.sum(y**2), upd["spectral"]

  (_, state), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
  u, v = state["kernel_u"], state["kernel_v"]

  def reference(params):  # W / sigma(W), sigma = <u, A_W v> for the final u, v held fixed
    w = params["kernel"]
    a_v = conv.apply({"params": {"kernel": w}}, v)
    return jnp.sum(conv.apply({"params": {"kernel": w / jnp.vdot(u, a_v)}}, x) ** 2)

  chex.assert_trees_all_close(grads, jax.grad(reference)(variables["params"]), rtol=1e-4, atol=1e-6)
  # Forward mode: the tangent, and a Hessian-vector product (forward over reverse).
  params = variables["params"]
  t = jax.tree.map(lambda p: jax.random.normal(jax.random.key(2), p.shape), params)
  _, tangent = jax.jvp(lambda p: loss(p)[0], (params,), (t,))
  _, ref_tangent = jax.jvp(reference, (params,), (t,))
  np.testing.assert_allclose(tangent, ref_tangent, rtol=1e-4)
  grad_only = jax.grad(lambda q: loss(q)[0])
  _, hvp = jax.jvp(grad_only, (params,), (t,))
  _, ref_hvp = jax.jvp(jax.grad(reference), (params,), (t,))
  chex.assert_trees_all_close(hvp, ref_hvp, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
@pytest.mark.parametrize(
  ("shape", "dtype"), [((2, 6, 5, 3), jnp.float32), ((3, 7), jnp.bfloat16), ((4,), jnp.float32)]
)
def test_the_initial_vectors_are_jax_random_normal_drawn_flat(shape, dtype, impl):
  """The state's random start is ``jax.random.normal``'s values for the shape, drawn flat
  (a many-axis draw compiles several times slower on XLA:CPU)."""
  from flaxnorm import _operator

  key = jax.random.key(7, impl=impl)
  chex.assert_trees_all_equal(
    _operator._normal(key, shape, dtype), jax.random.normal(key, shape, dtype)
  )


def test_zero_kernel_is_finite():
  x = jnp.ones((1, 4, 4, 2))
  layer = flaxnorm.spectral_norm(
    nn.Conv(2, (3, 3), kernel_init=nn.initializers.zeros), operator=True
  )
  variables = layer.init(KEY, x)

  def loss(params):
    y, _ = layer.apply({**variables, "params": params}, x, mutable=["spectral"])
    return jnp.sum(y)

  grads = jax.grad(loss)(variables["params"])
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  chex.assert_trees_all_close(layer.apply(variables, x), jnp.zeros((1, 4, 4, 2)))


def test_low_precision_state_is_float32_and_sharding_names_kept():
  x = jnp.ones((2, 4, 4, 2), jnp.bfloat16)
  layer = flaxnorm.spectral_norm(
    nn.Conv(2, (3, 3), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16), operator=True
  )
  variables = layer.init(KEY, x)
  assert {x.dtype for x in jax.tree.leaves(variables["spectral"])} == {jnp.dtype(jnp.float32)}
  assert layer.apply(variables, x).dtype == jnp.bfloat16

  init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, None, "in", "out"))
  boxed = flaxnorm.spectral_norm(nn.Conv(2, (3, 3), kernel_init=init), operator=True).init(KEY, x.astype(jnp.float32))  # fmt: skip
  spec = nn.get_partition_spec(boxed)["spectral"]
  assert tuple(spec["kernel_u"]) == (None,) * 4 and tuple(spec["kernel_sigma"]) == ()


class _Tanh(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.tanh(x @ self.param("kernel", nn.initializers.normal(1.0), (x.shape[-1], 3)))


class _Squared(nn.Module):
  """Linear in its input, not in its kernel."""

  @nn.compact
  def __call__(self, x):
    k = self.param("kernel", nn.initializers.normal(1.0), (x.shape[-1], 3))
    return x @ (k * k)


class _Masked(nn.Module):
  @nn.compact
  def __call__(self, x, mask):
    return (x * mask) @ self.param("kernel", nn.initializers.normal(1.0), (x.shape[-1], 3))


def test_errors():
  x = jnp.ones((2, 4))
  with pytest.raises(ValueError, match=r"layer '<top level>' \(_Tanh\).*not linear in its input"):
    flaxnorm.spectral_norm(_Tanh(), operator=True).init(KEY, x)
  with pytest.raises(ValueError, match=r"\(_Squared\).*not linear in its kernel.*operator=False"):
    flaxnorm.spectral_norm(_Squared(), operator=True).init(KEY, x)
  # The checks run on concrete values also when init is traced.
  for bad, what in [(_Tanh(), "input"), (_Squared(), "kernel")]:
    with pytest.raises(ValueError, match=f"not linear in its {what}"):
      jax.jit(flaxnorm.spectral_norm(bad, operator=True).init)(KEY, x)
  masked = flaxnorm.spectral_norm(_Masked(), operator=True)
  masked.init(KEY, x, x)  # concrete: checked
  with pytest.raises(ValueError, match=r"\(_Masked\).*positional argument 1 .*traced.*outside jit"):
    jax.jit(masked.init)(KEY, x, x)
  with pytest.raises(TypeError, match="operator must be a bool at spectral_norm"):
    flaxnorm.spectral_norm(nn.Dense(3), operator=1)
  layer = flaxnorm.spectral_norm(nn.Conv(2, (3, 3)), operator=True)
  variables = layer.init(KEY, jnp.ones((1, 6, 6, 2)))
  with pytest.raises(ValueError, match=r"per-example shape \(6, 6, 2\).*per-example shape \(8, 8, 2\)"):  # fmt: skip
    layer.apply(variables, jnp.ones((1, 8, 8, 2)))
  # Unbatched (Flax convs take them) or with two batch axes: sigma would be for a
  # 1x8 image or a batch of 3; refused, as NNX's input_shape is per example.
  for shape in [(6, 6, 2), (2, 3, 6, 6, 2)]:
    with pytest.raises(ValueError, match=r"\(Conv\) needs inputs with one batch axis, 4 dims"):
      layer.init(KEY, jnp.ones(shape))


# --------------------------------------------------------------------------- #
# NNX: the same, with the input shape given at wrap time.
# --------------------------------------------------------------------------- #


def test_nnx_operator_mode_matches_the_jacobian_and_trains():
  import optax
  from flax import nnx

  import flaxnorm.nnx as fnx

  model = nnx.Sequential(
    nnx.Conv(3, 4, (3, 3), strides=2, rngs=nnx.Rngs(0)),
    nnx.relu,
    nnx.Conv(4, 2, (3, 3), padding="CIRCULAR", rngs=nnx.Rngs(1)),
  )
  fnx.spectral_norm(model.layers[0], operator=True, input_shape=(6, 6, 3), n_init_iterations=500)
  fnx.spectral_norm(model.layers[2], operator=True, input_shape=(3, 3, 4), n_init_iterations=500)
  for layer, example in ((model.layers[0], (1, 6, 6, 3)), (model.layers[2], (1, 3, 3, 4))):
    w = vars(layer)["kernel"][...]
    plain = nnx.Conv(w.shape[2], w.shape[3], (3, 3), strides=layer.strides, padding=layer.padding,
                     rngs=nnx.Rngs(0))  # fmt: skip
    plain.kernel[...] = w
    sigma = _jacobian_sigma(plain, jnp.zeros(example))
    np.testing.assert_allclose(layer.kernel_sigma[...], sigma, rtol=1e-3)
    assert layer.kernel_v[...].shape == example

  x = jax.random.normal(jax.random.key(2), (4, 6, 6, 3))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  # Training iterates and stores: start the first layer from a random u.
  before = jax.random.normal(jax.random.key(3), model.layers[0].kernel_u[...].shape)
  model.layers[0].kernel_u[...] = before
  step(model, optimizer)
  assert not np.allclose(model.layers[0].kernel_u[...], before)
  model.eval()
  y = model(x)
  state = nnx.to_pure_dict(nnx.state(model, fnx.SpectralStateVar))
  chex.assert_trees_all_close(model(x), y)
  chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(model, fnx.SpectralStateVar)), state)
  fnx.remove_spectral_norm(model)
  chex.assert_trees_all_close(model(x), y, atol=1e-6)


@pytest.mark.filterwarnings("error::FutureWarning")  # no float32 -> bfloat16 scatter
def test_nnx_operator_mode_in_bfloat16():
  """A bfloat16 layer: sigma of what it computes (float32 state), a bfloat16 step, finite grads."""
  from flax import nnx

  import flaxnorm.nnx as fnx

  kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  layer = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0), **kw)
  w = layer.kernel[...]
  fnx.spectral_norm(layer, operator=True, input_shape=(6, 6, 3), n_init_iterations=200)
  assert {a.dtype for a in (layer.kernel_u[...], layer.kernel_v[...], layer.kernel_sigma[...])} == {
    jnp.dtype(jnp.float32)
  }
  plain = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))  # float32, the same bfloat16 values
  plain.kernel[...] = w.astype(jnp.float32)
  sigma = _jacobian_sigma(plain, jnp.zeros((1, 6, 6, 3)))
  np.testing.assert_allclose(layer.kernel_sigma[...], sigma, rtol=2e-2)
  x = jax.random.normal(jax.random.key(2), (2, 6, 6, 3), jnp.bfloat16)
  grads = nnx.grad(lambda m: jnp.sum(m(x).astype(jnp.float32) ** 2))(layer)
  assert layer(x).dtype == jnp.bfloat16
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_operator_power_iteration_of_a_bfloat16_map():
  """A map computing in bfloat16 (its transpose takes a bfloat16 u): sigma as in float32."""
  w = jnp.diag(jnp.array([3.0, 1.0, 0.5])).astype(jnp.bfloat16)
  apply = lambda x: x.astype(jnp.bfloat16) @ w.T
  u, v, sigma = flaxnorm.operator_power_iteration(apply, jnp.ones(3), jnp.ones(3), n_steps=50)
  assert u.dtype == v.dtype == sigma.dtype == jnp.float32
  np.testing.assert_allclose(sigma, 3.0, rtol=1e-2)


def test_float64_state_keeps_its_dtype():
  """float64 params: the state is float64 from init on (it was float32, then its sigma float64)."""
  from flax import nnx

  import flaxnorm.nnx as fnnx

  with jax.enable_x64(True), warnings.catch_warnings():
    warnings.simplefilter("error")  # NNX wrote float64 into float32 state: a FutureWarning
    x = jnp.ones((2, 4), jnp.float64)
    layer = flaxnorm.spectral_norm(nn.Dense(3, param_dtype=jnp.float64), operator=True)
    variables = layer.init(KEY, x)
    _, new = layer.apply(variables, x, mutable=["spectral"])
    for state in (variables["spectral"], new["spectral"]):
      assert {str(a.dtype) for a in state.values()} == {"float64"}, state
    linear = nnx.Linear(4, 3, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    wrapped = fnnx.spectral_norm(linear, operator=True, input_shape=(4,))
    wrapped(x)
    state = nnx.state(wrapped, nnx.Not(nnx.Param))
    assert {str(a.dtype) for a in jax.tree.leaves(state)} == {"float64"}, state
    kernel = np.asarray(variables["params"]["kernel"])
    sigma = np.linalg.svd(kernel, compute_uv=False)[0]
    np.testing.assert_allclose(float(new["spectral"]["kernel_sigma"]), sigma, rtol=1e-6)


def test_nnx_operator_errors():
  from flax import nnx

  import flaxnorm.nnx as fnx

  conv = lambda: nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"needs input_shape=\.\.\..*input_shape=\(32, 32, 3\)"):
    fnx.spectral_norm(conv(), operator=True)
  with pytest.raises(ValueError, match=r"cannot take input_shape=\(6, 6, 5\)"):
    fnx.spectral_norm(conv(), operator=True, input_shape=(6, 6, 5))
  with pytest.raises(TypeError, match="input_shape must be a tuple of positive ints"):
    fnx.spectral_norm(conv(), operator=True, input_shape=6)
  with pytest.raises(ValueError, match=r"input_shape must be a tuple of positive ints.*-6"):
    fnx.spectral_norm(conv(), operator=True, input_shape=(6, -6, 3))
  layer = fnx.spectral_norm(conv(), operator=True, input_shape=(6, 6, 3))
  with pytest.raises(ValueError, match=r"per-example shape \(6, 6, 3\).*per-example shape \(8, 8, 3\)"):  # fmt: skip
    layer(jnp.ones((1, 8, 8, 3)))
  layer.eval()  # evaluation too: its stored sigma is the norm at 6x6 only
  with pytest.raises(ValueError, match=r"per-example shape \(6, 6, 3\).*per-example shape \(8, 8, 3\)"):  # fmt: skip
    layer(jnp.ones((1, 8, 8, 3)))
  assert layer(jnp.ones((2, 6, 6, 3))).shape == (2, 6, 6, 4)

  class Tanh(nnx.Module):
    def __init__(self):
      self.kernel = nnx.Param(jnp.ones((3, 2)))

    def __call__(self, x):
      return jnp.tanh(x @ self.kernel[...])

  with pytest.raises(ValueError, match=r"param 'kernel' of Tanh: the layer is not linear"):
    fnx.spectral_norm(Tanh(), operator=True, input_shape=(3,))

  class Squared(Tanh):
    def __call__(self, x):
      return x @ (self.kernel[...] ** 2)

  with pytest.raises(ValueError, match=r"param 'kernel' of Squared: .*not linear in its kernel"):
    fnx.spectral_norm(Squared(), operator=True, input_shape=(3,))


def test_nnx_operator_mode_builds_abstractly_and_under_jit():
  """``nnx.eval_shape`` (the step before a checkpoint restore) and ``nnx.jit`` build it.

  The linearity checks run on concrete stand-ins of the traced params, so they
  still refuse a nonlinear layer there.
  """
  from flax import nnx

  import flaxnorm.nnx as fnx

  def make():
    conv = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))
    return fnx.spectral_norm(conv, operator=True, input_shape=(6, 6, 3))

  eager = make()
  abstract = nnx.eval_shape(make)
  shapes = lambda m: jax.tree.map(lambda a: (a.shape, a.dtype), nnx.to_pure_dict(nnx.state(m)))
  assert shapes(abstract) == shapes(eager)
  jitted = nnx.jit(make)()
  chex.assert_trees_all_close(
    nnx.to_pure_dict(nnx.state(jitted)), nnx.to_pure_dict(nnx.state(eager)), atol=1e-6
  )
  restored = nnx.merge(nnx.graphdef(abstract), nnx.state(eager))
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
  restored.eval(), eager.eval()
  chex.assert_trees_all_close(restored(x), eager(x))

  class Tanh(nnx.Module):
    def __init__(self):
      self.kernel = nnx.Param(jnp.ones((3, 2)))

    def __call__(self, x):
      return jnp.tanh(x @ self.kernel[...])

  with pytest.raises(ValueError, match=r"param 'kernel' of Tanh: the layer is not linear"):
    nnx.eval_shape(lambda: fnx.spectral_norm(Tanh(), operator=True, input_shape=(3,)))


def test_nnx_operator_mode_takes_any_number_of_batch_axes():
  # Until 2026-12-06 the example was the input less exactly one axis: an
  # unbatched call (as under a per-example nnx.vmap) or two batch axes were
  # refused with a wrong per-example shape.
  from flax import nnx

  import flaxnorm.nnx as fnx

  layer = fnx.spectral_norm(
    nnx.Conv(2, 3, (3, 3), padding="CIRCULAR", rngs=nnx.Rngs(0)),
    operator=True,
    input_shape=(5, 5, 2),
  )
  x = jax.random.normal(KEY, (2, 3, 5, 5, 2))
  layer.eval()
  y = layer(x)  # two batch axes
  chex.assert_trees_all_close(layer(x[0, 1]), y[0, 1], atol=1e-6)  # none
  chex.assert_trees_all_close(layer(x.reshape(6, 5, 5, 2)), y.reshape(6, 5, 5, 3), atol=1e-6)
  layer.train()
  batched = nnx.clone(layer)
  layer(x[0, 0])  # a training call without a batch axis iterates as a batched one does
  batched(x[0, :1])
  chex.assert_trees_all_close(nnx.state(layer), nnx.state(batched), atol=1e-6)
  with pytest.raises(ValueError, match=r"per-example shape \(5, 5, 2\).*per-example shape \(4, 5, 2\)"):  # fmt: skip
    layer(jnp.ones((4, 5, 2)))
