"""A target sigma in every face, the layer positional-only, and the sigma / Lipschitz reports."""

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

KEY = jax.random.key(0)
X = jax.random.normal(jax.random.key(1), (3, 4))


def _top_sigma(w):
  return float(np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)[0])


def _effective_kernel(layer, variables):
  """The kernel the wrapped Dense uses in eval: recovered from its outputs (linear + bias)."""
  eye = jnp.eye(4)
  return layer.apply(variables, eye) - layer.apply(variables, jnp.zeros((1, 4)))


@pytest.mark.parametrize("target", [0.5, 1.0, 3.0])
def test_linen_normalize_to_target(target):
  layer = flaxnorm.spectral_norm(nn.Dense(5), target=target, n_init_iterations=500)
  variables = layer.init(KEY, X)
  np.testing.assert_allclose(_top_sigma(_effective_kernel(layer, variables)), target, rtol=1e-4)
  plain = flaxnorm.remove_spectral_norm(variables, target=target)
  chex.assert_trees_all_close(nn.Dense(5).apply(plain, X), layer.apply(variables, X), atol=1e-6)


@pytest.mark.parametrize("scale, target", [(3.0, 2.0), (0.5, 2.0)])
def test_clip_shrinks_only_above_target(scale, target):
  w = jnp.diag(jnp.array([scale, scale / 4, 0.1]))  # sigma = scale
  st = flaxnorm.spectral_state_init(KEY, w, n_steps=100)
  w_sn, _ = flaxnorm.spectral_normalize(w, st.u, st.v, n_steps=1, mode="clip", target=target)
  np.testing.assert_allclose(_top_sigma(w_sn), min(scale, target), rtol=1e-5)
  # Gradients are right on either side of the clip's kink (away from it).
  f = lambda w: flaxnorm.spectral_normalize(w, st.u, st.v, n_steps=0, mode="clip", target=target)[0]
  check_grads(f, (w,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
  jac = jax.jacrev(lambda w: f(w)[0, 0])(w)
  # Below the target f(W) = W; above it W00 * target / sigma(W) with sigma = W00
  # and d sigma / dW = e0 e0^T, whose derivative is 0 everywhere.
  want = jnp.zeros((3, 3)).at[0, 0].set(1.0 if scale <= target else 0.0)
  chex.assert_trees_all_close(jac, want, atol=1e-5)


def test_target_in_every_face_agrees():
  w = jax.random.normal(KEY, (4, 3))
  layer = flaxnorm.spectral_norm(nn.Dense(3, use_bias=False), target=2.5, mode="clip")
  variables = layer.init(KEY, X)
  variables = {"params": {"kernel": w}, "spectral": variables["spectral"]}
  y_linen, _ = layer.apply(variables, X, mutable=["spectral"])

  state = variables["spectral"]
  sn_params, _ = ft.spectral_norm(target=2.5, mode="clip").apply({"kernel": w}, state, update=True)
  chex.assert_trees_all_close(X @ sn_params["kernel"], y_linen, atol=1e-5)

  linear = nnx.Linear(4, 3, use_bias=False, rngs=nnx.Rngs(0))
  linear.kernel[...] = w
  fnx.spectral_norm(linear, target=2.5, mode="clip")
  for attr in ("kernel_u", "kernel_v", "kernel_sigma"):
    getattr(linear, attr)[...] = state[attr]
  chex.assert_trees_all_close(linear(X), y_linen, atol=1e-5)


def test_layer_is_positional_only_and_target_a_keyword():
  cls = flaxnorm.spectral_norm(nn.Dense, target=2.0)
  assert cls is flaxnorm.spectral_norm(nn.Dense, target=2.0)
  with pytest.raises(TypeError):
    flaxnorm.spectral_norm(module=nn.Dense)  # type: ignore[call-arg]
  with pytest.raises(TypeError):
    fnx.weight_norm(module=nnx.Linear(2, 2, rngs=nnx.Rngs(0)))  # type: ignore[call-arg]


@pytest.mark.parametrize("bad, error", [(0.0, ValueError), (-1.0, ValueError),
                                        (float("nan"), ValueError), (float("inf"), ValueError),
                                        ("2", TypeError), (True, TypeError)])  # fmt: skip
def test_bad_target(bad, error):
  for call in (
    lambda: flaxnorm.spectral_norm(nn.Dense, target=bad),
    lambda: fnx.spectral_norm(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), target=bad),
    lambda: ft.spectral_norm(target=bad),
    lambda: flaxnorm.remove_spectral_norm({"params": {}, "spectral": {}}, target=bad),
    lambda: flaxnorm.scale_by_sigma(jnp.ones(2), jnp.array(2.0), target=bad),
  ):
    with pytest.raises(error, match="target must be a positive"):
      call()


def test_spectral_sigmas_linen_and_nnx():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = flaxnorm.spectral_norm(nn.Dense(6))(x)
      return flaxnorm.spectral_norm(nn.Dense(2, name="head"))(nn.relu(x))

  variables = Net().init(KEY, X)
  sigmas = flaxnorm.spectral_sigmas(variables)
  assert list(sigmas) == ["Dense_0/kernel", "head/kernel"]
  for path, sigma in sigmas.items():
    layer, name = path.split("/")
    np.testing.assert_allclose(sigma, _top_sigma(variables["params"][layer][name]), rtol=1e-3)

  model = nnx.Sequential(nnx.Linear(4, 6, rngs=nnx.Rngs(0)), nnx.Linear(6, 2, rngs=nnx.Rngs(1)))
  fnx.wrap_modules(model, fnx.spectral_norm, where=nnx.Linear)
  for i, (path, sigma) in enumerate(fnx.spectral_sigmas(model).items()):
    assert path == f"layers/{i}/kernel"
    np.testing.assert_allclose(sigma, _top_sigma(vars(model.layers[i])["kernel"][...]), rtol=1e-3)


def test_lipschitz_estimate():
  model = nn.Sequential([flaxnorm.spectral_norm(nn.Dense(6), mode="clip", target=2.0), nn.relu,
                         flaxnorm.spectral_norm(nn.Dense(2), mode="clip", target=2.0)])  # fmt: skip
  variables = model.init(KEY, X)
  sigmas = flaxnorm.spectral_sigmas(variables)
  bound = flaxnorm.lipschitz_bound(variables, mode="clip", target=2.0)
  want = np.prod([min(float(s), 2.0) for s in sigmas.values()])
  np.testing.assert_allclose(bound.estimate, want, rtol=1e-6)
  assert bound.certified is None and list(bound.layers) == list(sigmas)
  with pytest.raises(ValueError, match="mode must be one of"):
    flaxnorm.lipschitz_bound(variables, mode="x")


class _ConvNet(nn.Module):
  operator: bool = False

  @nn.compact
  def __call__(self, x):
    sn = lambda layer: flaxnorm.spectral_norm(layer, operator=self.operator, n_init_iterations=50)
    x = nn.relu(sn(nn.Conv(4, (3, 3), padding="CIRCULAR", name="conv"))(x))
    return sn(nn.Dense(2, name="head"))(x.reshape(x.shape[0], -1))


def _layer_norm(fn, example):
  """sigma_max of a linear-plus-bias map on one example, from its dense Jacobian."""
  zero = jnp.zeros(example)
  jac = jax.jacfwd(lambda x: fn(x) - fn(zero))(zero).reshape(-1, int(np.prod(example)))
  return np.linalg.svd(np.asarray(jac, np.float64), compute_uv=False)[0]


@pytest.mark.parametrize("operator", [False, True])
def test_certified_bound_holds_per_layer_and_for_the_chain(operator):
  x = jax.random.normal(jax.random.key(2), (2, 6, 6, 3))
  model = _ConvNet(operator)
  variables = model.init(KEY, x)
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,))
  # The true norm of each wrapped layer in evaluation, from its dense Jacobian.
  conv = flaxnorm.spectral_norm(nn.Conv(4, (3, 3), padding="CIRCULAR"), operator=operator)
  conv_vars = {c: variables[c]["conv"] for c in ("params", "spectral")}
  true_conv = _layer_norm(lambda z: conv.apply(conv_vars, z[None])[0], (6, 6, 3))
  head = flaxnorm.spectral_norm(nn.Dense(2), operator=operator)
  head_vars = {c: variables[c]["head"] for c in ("params", "spectral")}
  true_head = _layer_norm(lambda z: head.apply(head_vars, z[None])[0], (144,))
  certified = {path: c for path, (_, c) in bound.layers.items()}
  assert certified["conv/kernel"] >= true_conv and certified["head/kernel"] >= true_head
  assert certified["head/kernel"] <= 1.01 * true_head
  assert bound.certified == pytest.approx(certified["conv/kernel"] * certified["head/kernel"])
  assert certified["conv/kernel"] <= 1.01 * true_conv  # circular: Gram iteration is tight
  if operator:  # the operator-mode layer really is normalized
    np.testing.assert_allclose(true_conv, 1.0, atol=2e-3)
  else:  # kernel mode divides by the reshaped norm: the conv's true norm is above 1
    assert true_conv > 1.05


def test_certificate_is_none_for_layers_it_cannot_bound():
  x = jnp.ones((1, 4, 4, 2))
  model = flaxnorm.spectral_norm(nn.ConvTranspose(2, (3, 3)))
  variables = model.init(KEY, x)
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,))
  assert bound.certified is None and bound.layers["kernel"][1] is None
  assert bound.reasons == {"kernel": "ConvTranspose is not certified: only nn.Dense, "
                                     "nn.DenseGeneral and nn.Conv are"}  # fmt: skip
  assert float(bound.estimate) == pytest.approx(1.0)


class _Mixed(nn.Module):
  """A spectrally normalized Dense, then a plain (or weight-normed) layer of norm 40."""

  second: str = "plain"

  @nn.compact
  def __call__(self, x):
    x = flaxnorm.spectral_norm(nn.Dense(4), n_init_iterations=50)(x)
    if self.second == "conv":
      x = nn.Conv(2, (3,), kernel_init=nn.initializers.constant(10.0))(x[..., None])
      return x.reshape(x.shape[0], -1)
    dense = nn.Dense(4, kernel_init=nn.initializers.constant(10.0))
    return (dense if self.second == "plain" else flaxnorm.weight_norm(dense))(x)


@pytest.mark.parametrize("second", ["plain", "weight_norm", "conv"])
def test_certificate_bounds_plain_and_weight_normed_layers_too(second):
  """A certificate multiplies every linear layer's bound, not only the spectral ones'."""
  model, x = _Mixed(second), jnp.ones((2, 4))
  variables = model.init(KEY, x)
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,))
  true = _layer_norm(lambda z: model.apply(variables, z[None])[0], (4,))
  assert true > 10.0 and bound.reasons == {}
  assert bound.certified >= true  # was 1.000001: the plain layer was left out
  head = "Conv_0/kernel" if second == "conv" else "Dense_1/kernel"
  estimate, certified = bound.layers[head]
  plain = jax.tree.leaves(flaxnorm.remove_weight_norm(variables)["params"][head.split("/")[0]])
  norm = max(_top_sigma(k.reshape(-1, k.shape[-1])) for k in plain if k.ndim >= 2)
  assert norm <= certified <= 1.01 * norm if second != "conv" else norm <= certified
  assert float(estimate) == pytest.approx(certified, rel=1e-6)
  assert bound.certified == pytest.approx(bound.layers["Dense_0/kernel"][1] * certified)


class _Scaled(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = flaxnorm.spectral_norm(nn.Dense(4))(x)
    return nn.LayerNorm()(self.param("scale", nn.initializers.constant(5.0), ()) * x)


class _ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return nn.relu(nn.Dense(4)(h)), None


class _Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = flaxnorm.spectral_norm(nn.Dense(4))(x)
    lift = {"variable_axes": {"params": 0}, "split_rngs": {"params": True}, "length": 3}
    return nn.scan(_ScanBlock, **lift)()(x, None)[0]


def test_certificate_is_none_with_a_reason_for_layers_without_a_bound():
  x = jnp.ones((2, 4))
  bound = flaxnorm.lipschitz_bound(_Scaled().init(KEY, x), model=_Scaled(), inputs=(x,))
  # The model's own scale is known (followed, not refused); LayerNorm divides by a statistic
  # of its input: the reason names it.
  assert bound.certified is None and bound.reasons == {
    "LayerNorm_0": "mul of two values that depend on the inputs, one of them not known to stay "
    "in a bounded interval (a product is bounded where both factors are, as a sigmoid's or "
    "tanh's output: not Lipschitz in general)"
  }
  # A layer stack under nn.scan after a spectral layer: followed, each step its own slice.
  bound = flaxnorm.lipschitz_bound(_Scanned().init(KEY, x), model=_Scanned(), inputs=(x,))
  assert bound.reasons == {} and bound.certified is not None
  assert sorted(bound.layers) == ["Dense_0/kernel", "Scan_ScanBlock_0/Dense_0/kernel"]


class _Tripled(nn.Dense):
  def __call__(self, x):
    return 3.0 * super().__call__(x)


def _scaled_dot(*args, **kwargs):
  return 3.0 * jax.lax.dot_general(*args, **kwargs)


@pytest.mark.parametrize("layer", [_Tripled(4), nn.Dense(4, dot_general=_scaled_dot)])
def test_no_certificate_for_layers_not_run_by_flax_own_code(layer):
  """A subclass or a custom dot_general computes what the kernel's norm does not bound."""
  model = flaxnorm.spectral_norm(layer)
  x = jnp.ones((1, 4))
  bound = flaxnorm.lipschitz_bound(model.init(KEY, x), model=model, inputs=(x,))
  assert bound.certified is None


def test_certificate_of_a_masked_conv_bounds_the_masked_kernel():
  mask = np.ones((1, 1, 2, 2), np.float32)
  mask[0, 0, 1, 1] = 0.0  # [[1, 1], [1, -1]] has norm sqrt(2); masked, 1.618
  kernel = jnp.asarray([[1.0, 1.0], [1.0, -1.0]]).reshape(1, 1, 2, 2)
  conv = nn.Conv(2, (1, 1), mask=jnp.asarray(mask), use_bias=False, kernel_init=lambda *_: kernel)
  model = flaxnorm.spectral_norm(conv)
  x = jnp.ones((1, 3, 3, 2))
  variables = model.init(KEY, x)
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,))
  assert bound.certified >= _layer_norm(lambda z: model.apply(variables, z[None])[0], (3, 3, 2))


class _Tied(nn.Module):
  @nn.compact
  def __call__(self, x):
    layer = flaxnorm.spectral_norm(nn.Dense(4, use_bias=False), target=2.0)
    return layer(nn.relu(layer(x)))


def test_a_layer_called_twice_counts_twice_and_other_input_sizes_are_refused():
  x = jnp.ones((1, 4))
  variables = _Tied().init(KEY, x)
  bound = flaxnorm.lipschitz_bound(variables, model=_Tied(), inputs=(x,))
  assert 4.0 <= bound.certified < 4.0 * 1.01**2 and float(bound.estimate) == pytest.approx(4.0)

  class TwoSizes(nn.Module):
    @nn.compact
    def __call__(self, x):
      conv = flaxnorm.spectral_norm(nn.Conv(2, (3, 3)))
      return conv(x), conv(x[:, :4, :4])

  x = jnp.ones((1, 6, 6, 2))
  variables = TwoSizes().init(KEY, x)
  with pytest.raises(ValueError, match=r"calls 'Conv_0/kernel' on inputs of shapes"):
    flaxnorm.lipschitz_bound(variables, model=TwoSizes(), inputs=(x,))


class _Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return nn.relu(flaxnorm.spectral_norm(nn.Dense(4))(h)), None


def test_stacked_layers_without_a_model_and_bad_inputs_are_refused():
  lift = {"variable_axes": {"params": 0, "spectral": 0}, "split_rngs": {"params": True}}
  stack = nn.scan(_Block, length=3, **lift)()
  x = jnp.ones((2, 4))
  variables = stack.init(KEY, x, None)
  with pytest.raises(ValueError, match=r"'Dense_0/kernel' holds \(3,\) sigmas.*Pass model="):
    flaxnorm.lipschitz_bound(variables)
  bound = flaxnorm.lipschitz_bound(variables, model=stack, inputs=(x, None))
  assert bound.reasons == {} and bound.certified is not None
  model = flaxnorm.spectral_norm(nn.Dense(4))
  with pytest.raises(TypeError, match=r"inputs must be a tuple"):
    flaxnorm.lipschitz_bound(model.init(KEY, x), model=model, inputs=x)


def test_lipschitz_bound_bad_model_arguments():
  model, x = flaxnorm.spectral_norm(nn.Dense(3)), jnp.ones((2, 4))
  variables = model.init(KEY, x)
  with pytest.raises(
    TypeError, match=r"model must be the flax.linen Module .* got Linear \(a flax.nnx"
  ):
    flaxnorm.lipschitz_bound(variables, model=nnx.Linear(4, 3, rngs=nnx.Rngs(0)), inputs=(x,))
  with pytest.raises(ValueError, match=r"model needs example inputs .* inputs=\(x,\), got \(\)"):
    flaxnorm.lipschitz_bound(variables, model=model)
  with pytest.raises(ValueError, match=r"inputs are given without model"):
    flaxnorm.lipschitz_bound(variables, inputs=(x,))
  with pytest.raises(TypeError, match=r"n_gram_steps must be an int >= 1 at lipschitz_bound"):
    flaxnorm.lipschitz_bound(variables, n_gram_steps="x")
  with pytest.raises(ValueError, match=r"n_gram_steps must be <= 40 at lipschitz_bound"):
    flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,), n_gram_steps=41)


class _Upsampler(nn.Module):
  """A transposed conv (followed primitive by primitive, its kernel bounded by the walk),
  keyword-only arguments: the input, a fixed scale and a flag."""

  @nn.compact
  def __call__(self, *, x, scale, skip):
    y = nn.ConvTranspose(2, (3,), strides=(2,))(x * scale)
    return y if skip else 2 * y


def _positional(call):
  """``_Upsampler`` called with ``x`` positional, the rest of ``call`` fixed."""
  rest = {k: v for k, v in call.items() if k != "x"}

  class Positional(nn.Module):
    @nn.compact
    def __call__(self, x):
      return _Upsampler(name="inner")(x=x, **rest)

  return Positional()


def test_lipschitz_bound_passes_keyword_arguments():
  model, x = _Upsampler(), jnp.ones((1, 4, 6))
  call = {"x": x, "scale": 3.0, "skip": True}
  variables = model.init(KEY, **call)
  bound = flaxnorm.lipschitz_bound(variables, model=model, kwargs=call)
  positional = flaxnorm.lipschitz_bound(
    {"params": {"inner": variables["params"]}}, model=_positional(call), inputs=(x,)
  )
  assert bound.reasons == {} and bound.certified == positional.certified
  doubled = flaxnorm.lipschitz_bound(variables, model=model, kwargs={**call, "skip": False})
  np.testing.assert_allclose(doubled.certified, 2 * bound.certified, rtol=1e-6)
  with pytest.raises(ValueError, match=r"kwargs are given without model"):
    flaxnorm.lipschitz_bound(variables, kwargs=call)
  with pytest.raises(TypeError, match=r"kwargs must be a mapping .* got tuple"):
    flaxnorm.lipschitz_bound(variables, model=model, kwargs=(x,))  # type: ignore[arg-type]


class _Coder(nn.Module):
  def setup(self):
    self.a = nn.Dense(4, use_bias=False)
    self.b = nn.Dense(4, use_bias=False)

  def __call__(self, x):
    return self.b(self.a(x))

  def encode(self, x):
    return 3.0 * self.a(x)


def test_kwargs_reach_model_apply_itself_a_method_say():
  """``kwargs`` are ``model.apply``'s: ``method=`` bounds another method (its layers only)."""
  model, x = _Coder(), jnp.ones((1, 4))
  variables = model.init(KEY, x)
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,), kwargs={"method": "encode"})
  norm = _top_sigma(variables["params"]["a"]["kernel"])
  assert bound.reasons == {} and list(bound.layers) == ["a/kernel"]
  assert 3.0 * norm <= bound.certified <= 3.0 * norm * (1 + 1e-6)


def test_n_gram_steps_reaches_the_kernels_the_walk_follows():
  """The transposed conv is bounded by the walk: fewer Gram steps, a looser bound, all
  above the exact norm of the (linear) model."""
  model, x = _Upsampler(), jnp.ones((1, 4, 6))
  call = {"x": x, "scale": 1.0, "skip": True}
  variables = model.init(KEY, **call)
  size = x.size
  basis = jnp.eye(size).reshape(size, *x.shape[1:])
  zero = model.apply(variables, **{**call, "x": jnp.zeros_like(x)})
  jac = np.asarray(model.apply(variables, **{**call, "x": basis}) - zero, np.float64)
  exact = _top_sigma(jac.reshape(size, -1))
  certified = {
    n: flaxnorm.lipschitz_bound(variables, model=model, kwargs=call, n_gram_steps=n).certified
    for n in (1, 6, 12)
  }
  assert exact <= certified[12] <= certified[6] < certified[1]


def test_reports_name_a_missing_collection():
  x = jnp.ones((2, 4))
  plain = nn.Dense(3).init(KEY, x)
  weight_normed = flaxnorm.weight_norm(nn.Dense(3)).init(KEY, x)
  spectral = flaxnorm.spectral_norm(nn.Dense(3)).init(KEY, x)
  missing = r"collection '{}' is not in the variables, which hold the collections {}"
  for report in (flaxnorm.spectral_sigmas, flaxnorm.lipschitz_bound):
    for variables in (plain, weight_normed):
      with pytest.raises(ValueError, match=missing.format("spectral", r"\['params'\]")):
        report(variables)
    with pytest.raises(ValueError, match=missing.format("spectrl", r"\['params', 'spectral'\]")):
      report(spectral, "spectrl")
  assert list(flaxnorm.spectral_sigmas(spectral["spectral"])) == ["kernel"]  # the bare collection


def test_certificate_of_an_unbatched_conv():
  """Flax convs take unbatched inputs: the spatial axes are the ones before the features."""
  conv = flaxnorm.spectral_norm(nn.Conv(3, (3, 3), padding="CIRCULAR"))
  x = jnp.ones((6, 6, 2))
  variables = conv.init(KEY, x)
  bound = flaxnorm.lipschitz_bound(variables, model=conv, inputs=(x,))
  true = _layer_norm(lambda z: conv.apply(variables, z), (6, 6, 2))
  assert true <= bound.certified <= 1.01 * true
