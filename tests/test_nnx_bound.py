"""flaxnorm.nnx.lipschitz_bound: the certificate of an NNX model, every layer followed.

Each certificate is checked against the exact constant (the largest singular value
of a linear model's dense Jacobian) or local Jacobian norms at several points (a
lower bound of the constant): a certificate below either is wrong.
"""

from __future__ import annotations

import concurrent.futures
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxnorm
import flaxnorm.nnx as fnx


def _functional(model: nnx.Module):
  """``model``'s call as a pure function of its input (the model is not changed)."""
  graphdef, state = nnx.split(model)
  return lambda x: nnx.merge(graphdef, state)(x)


def _local_norm(model: nnx.Module, x: jax.Array) -> float:
  """The largest local Jacobian norm of ``model`` at ``x``'s rows."""
  f = _functional(model)
  jacobian = jax.jit(jax.jacfwd(lambda z: f(z.reshape(1, *x.shape[1:])).ravel()))
  return max(np.linalg.norm(np.asarray(jacobian(row.ravel()), np.float64), 2) for row in x)


def _linear_norm(model: nnx.Module, shape: tuple[int, ...]) -> float:
  """The exact norm of a model linear in its input, from its columns ``f(e_i) - f(0)``."""
  f = _functional(model)
  zero = np.asarray(f(jnp.zeros(shape)), np.float64).ravel()
  eye = np.eye(int(np.prod(shape)), dtype=np.float32)
  cols = [np.asarray(f(jnp.asarray(e).reshape(shape)), np.float64).ravel() - zero for e in eye]
  return float(np.linalg.norm(np.stack(cols, axis=1), 2))


def _numpy(x: jax.Array) -> np.ndarray:
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return np.asarray(jax.random.key_data(x))
  return np.asarray(x)


class _Vocoderish(nnx.Module):
  """Spectral and plain convs, a residual branch, a weight-normed transposed conv and
  dense layer, BatchNorm and Dropout (in evaluation)."""

  def __init__(self, rngs: nnx.Rngs) -> None:
    self.c1 = fnx.spectral_norm(nnx.Conv(3, 8, (3, 3), rngs=rngs), n_init_iterations=50)
    self.c2 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
    self.up = fnx.weight_norm(nnx.ConvTranspose(8, 4, (3, 3), strides=(2, 2), rngs=rngs))
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.out = fnx.weight_norm(nnx.Linear(8 * 8 * 4, 3, rngs=rngs))

  def __call__(self, x: jax.Array) -> jax.Array:
    h = nnx.relu(self.c1(x))
    h = self.bn(h + nnx.leaky_relu(self.c2(h), 0.2))
    h = self.drop(self.up(h))
    return self.out(h.reshape(h.shape[0], -1))


@functools.cache
def _built_vocoderish() -> tuple[_Vocoderish, jax.Array]:
  model = _Vocoderish(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (3, 4, 4, 3))
  model(x)  # training: moves the batch statistics and the spectral state
  model.eval()
  return model, x


def _vocoderish() -> tuple[_Vocoderish, jax.Array]:
  """A fresh copy of the model (built once: eager NNX takes seconds)."""
  model, x = _built_vocoderish()
  return nnx.clone(model), x


def test_a_conv_model_is_certified_above_its_local_norms():
  model, x = _vocoderish()
  bound = fnx.lipschitz_bound(model, (x[:1],))
  assert bound.reasons == {}
  assert bound.certified >= _local_norm(model, x)
  assert sorted(bound.layers) == ["c1/kernel", "c2/kernel", "out/kernel", "up/kernel"]
  estimate, certified = bound.layers["c1/kernel"]
  assert float(estimate) == pytest.approx(1.0, abs=1e-6)  # target / sigma times sigma
  assert certified is not None and certified > 1.0  # the conv's operator norm, not the matrix's
  assert float(bound.estimate) == pytest.approx(
    np.prod([float(e) for e, _ in bound.layers.values()]), rel=1e-6
  )


def test_the_model_is_left_as_it_was():
  """Tracing a copy in training mode changes neither the model's state nor its classes."""
  model, x = _vocoderish()
  model.train()
  before = jax.tree.map(_numpy, nnx.state(model))
  classes = [type(m) for _, m in nnx.iter_modules(model)]
  fnx.lipschitz_bound(model, (x[:1],))
  after = jax.tree.map(_numpy, nnx.state(model))
  jax.tree.map(np.testing.assert_array_equal, before, after)
  assert [type(m) for _, m in nnx.iter_modules(model)] == classes
  assert model.c1(x).shape == (3, 4, 4, 8)  # and it still runs


def test_training_mode_gets_reasons_naming_the_modules():
  model, x = _vocoderish()
  model.train()
  bound = fnx.lipschitz_bound(model, (x[:1],))
  assert bound.certified is None and list(bound.reasons) == ["bn"]
  assert "mul of two values that depend on the inputs" in bound.reasons["bn"]
  model.bn.eval()  # dropout in training: 1 / (1 - rate), whatever mask it draws
  bound = fnx.lipschitz_bound(model, (x[:1],))
  assert bound.reasons == {} and bound.certified is not None
  model.drop.eval()
  assert bound.certified >= 2.0 * fnx.lipschitz_bound(model, (x[:1],)).certified * (1 - 1e-6)


def test_a_spectrally_normalized_mlp_is_certified_at_its_norm():
  model = nnx.Sequential(
    nnx.Linear(5, 16, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(16, 16, rngs=nnx.Rngs(1))
  )
  model = fnx.wrap_modules(model, fnx.spectral_norm, where=nnx.Linear, n_init_iterations=300)
  model.eval()
  x = jax.random.normal(jax.random.key(2), (4, 5))
  bound = fnx.lipschitz_bound(model, (x,))
  assert _local_norm(model, x) <= bound.certified <= 1.01
  for path in ("layers/0/kernel", "layers/2/kernel"):
    estimate, certified = bound.layers[path]
    assert float(estimate) == pytest.approx(1.0, abs=1e-6)
    assert 1.0 - 1e-4 <= certified <= 1.01


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gelu_and_softmax_between_spectral_layers_are_bounded(dtype):
  """JAX inlines both: they are found by their programs (GELU 1.13, softmax 1/2)."""
  rngs = nnx.Rngs(0)
  model = nnx.Sequential(
    nnx.Linear(5, 8, rngs=rngs, param_dtype=dtype, dtype=dtype),
    nnx.gelu,
    nnx.Linear(8, 4, rngs=rngs, param_dtype=dtype, dtype=dtype),
    nnx.softmax,
  )
  model = fnx.wrap_modules(model, fnx.spectral_norm, where=nnx.Linear, n_init_iterations=300)
  model.eval()
  x = 2.0 * jax.random.normal(jax.random.key(2), (4, 5), dtype)
  bound = fnx.lipschitz_bound(model, (x,))
  assert bound.reasons == {}
  assert 1.13 * 0.5 * (1 - 1e-3) <= bound.certified <= 1.13 * 0.5 * 1.01
  if dtype == jnp.float32:
    assert _local_norm(model, x) <= bound.certified


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_log_softmax_after_a_spectral_layer_is_bounded_by_root_n(dtype):
  """JAX jits log-softmax: its program is found inside the jit (√4 along 4 classes)."""
  linear = nnx.Linear(5, 4, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype)
  model = nnx.Sequential(fnx.spectral_norm(linear, n_init_iterations=300), nnx.log_softmax)
  model.eval()
  x = 3.0 * jax.random.normal(jax.random.key(2), (4, 5), dtype)
  bound = fnx.lipschitz_bound(model, (x,))
  assert bound.reasons == {}
  assert 2.0 * (1 - 1e-3) <= bound.certified <= 2.0 * 1.01
  if dtype == jnp.float32:
    assert _local_norm(model, x) <= bound.certified


def test_a_plain_layer_row_is_its_kernels_certified_norm_to_its_runs():
  """A layer run twice: its certified norm squared (the Gram bound of its kernel)."""

  class Twice(nnx.Module):
    def __init__(self) -> None:
      self.d = nnx.Linear(6, 6, use_bias=False, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return self.d(self.d(x))

  model = Twice()
  bound = fnx.lipschitz_bound(model, (jnp.ones((1, 6)),))
  kernel = np.asarray(model.d.kernel[...], np.float64)
  exact = np.linalg.norm(kernel, 2)
  estimate, certified = bound.layers["d/kernel"]
  assert exact**2 <= certified <= (exact * 1.01) ** 2 and float(estimate) == pytest.approx(
    certified
  )
  assert _linear_norm(model, (1, 6)) <= bound.certified <= certified * 1.0001


def test_an_nnx_vmap_ensemble_is_certified_as_one_map():
  """Four spectrally normalized members on one input: the norm of the stacked map (its
  traces scale each member's kernel: with its output scaled after one product with the
  stacked raw kernels the bound was that product's norm times the largest scale, 1.89
  where the map's norm is 1.67)."""

  @nnx.vmap(in_axes=0, out_axes=0)
  def members(key):
    return fnx.spectral_norm(nnx.Linear(3, 5, rngs=nnx.Rngs(key)), n_init_iterations=100)

  class Ensemble(nnx.Module):
    def __init__(self) -> None:
      self.members = members(jax.random.split(jax.random.key(0), 4))

    def __call__(self, x):
      return nnx.vmap(lambda m, x: m(x), in_axes=(0, None))(self.members, x)

  model = Ensemble()
  model.eval()
  bound = fnx.lipschitz_bound(model, (jnp.ones((1, 3)),))
  exact = _linear_norm(model, (1, 3))
  assert bound.reasons == {} and exact <= bound.certified <= exact * 1.01
  estimate, certified = bound.layers["members/kernel"]
  assert float(estimate) == pytest.approx(1.0, abs=1e-5)  # the largest member's
  assert certified == pytest.approx(bound.certified)


def test_a_scan_over_stacked_layers_bounds_each_step_with_its_own_params():
  class Stack(nnx.Module):
    def __init__(self) -> None:
      @nnx.split_rngs(splits=3)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def layers(rngs):
        return nnx.Linear(4, 4, use_bias=False, rngs=rngs)

      self.layers = layers(nnx.Rngs(0))

    def __call__(self, x):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def step(h, layer):
        return layer(h)

      return step(x, self.layers)

  model = Stack()
  bound = fnx.lipschitz_bound(model, (jnp.ones((1, 4)),))
  kernels = np.asarray(model.layers.kernel[...], np.float64)
  product = np.prod([np.linalg.norm(k, 2) for k in kernels])
  assert _linear_norm(model, (1, 4)) <= bound.certified <= product * 1.01
  assert product <= bound.certified * 1.0001  # each step's own kernel, not one shared bound


def test_a_branch_picked_from_the_inputs_is_refused():
  class Pick(nnx.Module):
    def __init__(self) -> None:
      self.d = nnx.Linear(2, 2, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return jax.lax.cond(x.sum() > 0, lambda x: self.d(x), lambda x: -x, x)

  bound = fnx.lipschitz_bound(Pick(), (jnp.ones((1, 2)),))
  assert bound.certified is None and "picks a branch" in bound.reasons["<top level>"]


def test_integer_inputs_are_held_fixed():
  class Lookup(nnx.Module):
    def __init__(self) -> None:
      self.embed = nnx.Embed(10, 4, rngs=nnx.Rngs(0))
      self.d = nnx.Linear(4, 2, rngs=nnx.Rngs(1))

    def __call__(self, ids, x):
      return self.d(self.embed(ids) + x)

  model = Lookup()
  bound = fnx.lipschitz_bound(model, (jnp.array([[1, 2]]), jnp.ones((1, 2, 4))))
  exact = np.linalg.norm(np.asarray(model.d.kernel[...], np.float64), 2)
  assert bound.reasons == {} and exact <= bound.certified <= exact * 1.01
  only_ids = fnx.lipschitz_bound(model.embed, (jnp.array([[1, 2]]),))
  assert only_ids.certified is None and "no input is a floating-point array" in str(
    only_ids.reasons
  )


def test_attention_is_refused_with_the_module_named():
  model = nnx.MultiHeadAttention(2, 4, qkv_features=4, decode=False, rngs=nnx.Rngs(0))
  bound = fnx.lipschitz_bound(model, (jnp.ones((1, 3, 4)),))
  assert bound.certified is None and list(bound.reasons) == ["<top level>"]
  assert "dot_general of two values that depend on the inputs" in bound.reasons["<top level>"]


def test_bad_arguments_say_what_to_pass():
  dense = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=r"lipschitz_bound: model must be a flax.nnx.Module.*Linen"):
    fnx.lipschitz_bound(nn.Dense(2), (jnp.ones((1, 2)),))  # type: ignore[arg-type]
  with pytest.raises(TypeError, match=r"lipschitz_bound: inputs must be a tuple.*got ArrayImpl"):
    fnx.lipschitz_bound(dense, jnp.ones((1, 2)))  # type: ignore[arg-type]
  with pytest.raises(ValueError, match=r"lipschitz_bound: .*inputs=\(x,\), got \(\)"):
    fnx.lipschitz_bound(dense, ())
  with pytest.raises(TypeError, match=r"flaxnorm.nnx.lipschitz_bound\(model, inputs"):
    flaxnorm.lipschitz_bound({"params": {}}, model=dense, inputs=(jnp.ones((1, 2)),))  # type: ignore[arg-type]


class _Gated(nnx.Module):
  """Keyword-only arguments: a float array the bound is over, a fixed scale and a flag."""

  def __init__(self) -> None:
    self.d = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
    self.up = nnx.ConvTranspose(5, 2, (3,), strides=(2,), rngs=nnx.Rngs(1))

  def __call__(self, *, x: jax.Array, scale: float, skip: bool) -> jax.Array:
    y = self.up(self.d(x) * scale)
    return y if skip else 2 * y


def test_keyword_arguments_are_passed_and_held_fixed_or_bounded_over():
  model, x = _Gated(), jnp.ones((1, 4, 6))
  call = {"x": x, "scale": 3.0, "skip": True}
  bound = fnx.lipschitz_bound(model, (), kwargs=call)
  positional = fnx.lipschitz_bound(_keywords(model, call), (x,))
  assert bound.reasons == {} and bound.certified == positional.certified
  assert _linear_norm(_keywords(model, call), x.shape) <= bound.certified
  chex.assert_trees_all_equal({f"inner/{k}": v for k, v in bound.layers.items()}, positional.layers)
  doubled = fnx.lipschitz_bound(model, (), kwargs={**call, "skip": False}).certified
  np.testing.assert_allclose(doubled, 2 * bound.certified, rtol=1e-6)


def _keywords(model: nnx.Module, call: dict) -> nnx.Module:
  """``model`` called as ``model(x=x, **rest)`` from a positional ``x``."""
  rest = {k: v for k, v in call.items() if k != "x"}

  class Positional(nnx.Module):
    def __init__(self) -> None:
      self.inner = model

    def __call__(self, x: jax.Array) -> jax.Array:
      return self.inner(x=x, **rest)

  return Positional()


def test_n_gram_steps_reaches_every_kernel_and_is_checked():
  """Fewer Gram steps: a looser bound, still above the exact norm (a transposed conv and a
  dense layer, both bounded by the walk)."""
  model, x = _Gated(), jnp.ones((1, 4, 6))
  call = {"x": x, "scale": 1.0, "skip": True}
  exact = _linear_norm(_keywords(model, call), x.shape)
  loose = fnx.lipschitz_bound(model, (), kwargs=call, n_gram_steps=1).certified
  tight = fnx.lipschitz_bound(model, (), kwargs=call, n_gram_steps=12).certified
  default = fnx.lipschitz_bound(model, (), kwargs=call).certified
  assert exact <= tight <= default < loose
  rows = fnx.lipschitz_bound(model, (), kwargs=call, n_gram_steps=12).layers
  svd = np.linalg.norm(np.asarray(model.d.kernel[...], np.float64), 2)
  assert svd <= rows["d/kernel"][1] < svd * (1 + 1e-5)
  with pytest.raises(ValueError, match=r"n_gram_steps must be <= 40 at lipschitz_bound"):
    fnx.lipschitz_bound(model, (), kwargs=call, n_gram_steps=41)
  with pytest.raises(TypeError, match=r"n_gram_steps must be an int"):
    fnx.lipschitz_bound(model, (), kwargs=call, n_gram_steps=2.0)  # type: ignore[arg-type]
  with pytest.raises(TypeError, match=r"lipschitz_bound: kwargs must be a mapping .* got list"):
    fnx.lipschitz_bound(model, (x,), kwargs=[1.0])  # type: ignore[arg-type]
  with pytest.raises(TypeError, match=r"kwargs must be a mapping .* with keys \[0\]"):
    fnx.lipschitz_bound(model, (x,), kwargs={0: 1.0})  # type: ignore[dict-item]


def test_python_scalar_variables_and_pytree_false_modules():
  """A Param holding a Python float; a ``pytree=False`` module running an NNX transform on
  itself (a subclass standing in for its class would be flattened as a pytree)."""

  class Scaled(nnx.Module, pytree=False):
    def __init__(self) -> None:
      self.d = nnx.Linear(3, 3, use_bias=False, rngs=nnx.Rngs(0))
      self.scale = nnx.Param(2.0)
      self.count = nnx.BatchStat(0)

    def __call__(self, x):
      return nnx.jit(lambda m, x: m.scale[...] * m.d(x))(self, x)

  model = Scaled()
  bound = fnx.lipschitz_bound(model, (jnp.ones((1, 3)),))
  exact = 2.0 * np.linalg.norm(np.asarray(model.d.kernel[...], np.float64), 2)
  assert bound.reasons == {} and exact <= bound.certified <= exact * 1.01


def test_the_users_classes_are_not_subclassed():
  """A registry filled by ``__init_subclass__`` sees no new class; ``__call__`` is the
  class's own again afterwards."""
  registry: dict[str, type] = {}

  class Registered(nnx.Module):
    def __init_subclass__(cls, **kwargs):
      super().__init_subclass__(**kwargs)
      registry[cls.__name__] = cls

  class Block(Registered):
    def __init__(self) -> None:
      self.d = nnx.Linear(3, 3, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return self.d(x)

  call, linear_call = Block.__call__, nnx.Linear.__call__
  assert fnx.lipschitz_bound(Block(), (jnp.ones((1, 3)),)).reasons == {}
  assert registry == {"Block": Block}
  assert Block.__call__ is call and nnx.Linear.__call__ is linear_call
  assert "__call__" not in vars(nnx.Linear) or vars(nnx.Linear)["__call__"] is linear_call


def test_a_complex_input_is_refused_with_its_reason():
  bound = fnx.lipschitz_bound(
    nnx.Linear(3, 3, rngs=nnx.Rngs(0)), (jnp.ones((1, 3), jnp.complex64),)
  )
  assert bound.certified is None
  assert "known operand that is complex" in bound.reasons["<top level>"]


def test_bounds_in_two_threads_leave_the_classes_as_they_were():
  model, x = _vocoderish()
  calls = {cls: vars(cls).get("__call__") for cls in (nnx.Conv, nnx.Linear, type(model))}
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    bounds = list(pool.map(lambda _: fnx.lipschitz_bound(model, (x[:1],)).certified, range(2)))
  assert bounds[0] == bounds[1] and bounds[0] is not None
  assert {cls: vars(cls).get("__call__") for cls in calls} == calls


def test_a_stacked_member_that_reads_only_a_constant_gets_no_row_below_its_norm():
  """An nnx.scan with one member of an nnx.vmap stack per step, from a zero carry: step
  0's member only reads a constant, so the walk never measures it (its row left it out);
  a cell shared by every step keeps its row."""

  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return nnx.Linear(4, 4, rngs=nnx.Rngs(key))

  class PerStep(nnx.Module):
    def __init__(self, shared: bool) -> None:
      self.layers = make(jax.random.split(jax.random.key(0), 3))
      self.cell = nnx.Linear(4, 4, rngs=nnx.Rngs(1))
      self.shared = shared

    def __call__(self, xs):
      @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
      def step(c, layer, xt):
        c = (self.cell(c) if self.shared else layer(c)) + xt
        return c, c

      return step(jnp.zeros((4,)), self.layers, xs)[1]

  x = jnp.ones((3, 4))
  model = PerStep(shared=False)
  model.layers.kernel[...] = model.layers.kernel[...].at[0].multiply(100.0)
  bound = fnx.lipschitz_bound(model, (x,))
  assert bound.reasons == {} and _linear_norm(model, (3, 4)) <= bound.certified
  assert "layers/kernel" not in bound.layers
  model = PerStep(shared=True)
  bound = fnx.lipschitz_bound(model, (x,))
  norm = np.linalg.norm(np.asarray(model.cell.kernel[...], np.float64), 2)
  _, certified = bound.layers["cell/kernel"]
  assert norm**3 <= certified <= (norm * 1.01) ** 3
