"""lipschitz_bound's certificate: sound for any stored state and dtype, None (not a crash) for
layers Flax runs but no bound covers, and plain or weight-normed models certified too.

References are exact: numpy SVD of each layer's dense Jacobian, built by applying the layer
to every one-hot input, in the layer's own dtype (float64 under ``jax.enable_x64``).
"""

from __future__ import annotations

import functools
import inspect
import math
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, example, given, reject, settings
from hypothesis import strategies as st

import flaxnorm
from flaxnorm import _certify

KEY = jax.random.key(0)


def _jacobian_norm(model, variables, example_shape, dtype=jnp.float32) -> float:
  """sigma_1 of the linear map ``x -> model(x) - model(0)`` on one example, from its Jacobian."""
  size = math.prod(example_shape)
  basis = jnp.eye(size, dtype=dtype).reshape(size, *example_shape)
  zero = model.apply(variables, jnp.zeros((1, *example_shape), dtype))
  out = np.asarray(model.apply(variables, basis) - zero, np.float64).reshape(size, -1)
  return float(np.linalg.svd(out, compute_uv=False)[0])


def _certified(variables, model, x) -> float:
  """``lipschitz_bound(...).certified``, which must be a float here."""
  certified = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,)).certified
  assert certified is not None
  return certified


def _with_state(variables, u, v):
  """``variables`` with the kernel's stored vectors replaced (a hand-made state)."""
  spectral = {**variables["spectral"], "kernel_u": jnp.asarray(u), "kernel_v": jnp.asarray(v)}
  return {**variables, "spectral": spectral}


# ---------------------------------------------------------------- 1. the layer's own sigma


def test_float64_layer_with_a_cancelling_state_is_bounded():
  """sigma = u^T W v with cancellation: a float32 recomputation was short by ~6%."""
  with jax.enable_x64(True):
    dense = nn.Dense(2, use_bias=False, param_dtype=jnp.float64, dtype=jnp.float64)
    layer = flaxnorm.spectral_norm(dense, n_init_iterations=0)
    x = jnp.zeros((1, 2), jnp.float64)
    variables = layer.init(KEY, x)
    variables = {**variables, "params": {"kernel": jnp.eye(2, dtype=jnp.float64)}}
    s = 1 / math.sqrt(2)
    variables = _with_state(variables, [s, s], [s, s * (-1 + 1e-6)])  # sigma ~ 3.5e-7
    exact = _jacobian_norm(layer, variables, (2,), jnp.float64)
    certified = _certified(variables, layer, x)
  assert exact == pytest.approx(2e6, rel=1e-3)
  assert exact <= certified <= exact * (1 + 1e-6)


def test_float64_layers_from_unconverged_states_are_bounded():
  """The review's repro, smaller: orthogonal float64 kernels, power iteration not run."""
  with jax.enable_x64(True):
    dense = nn.Dense(
      64,
      use_bias=False,
      kernel_init=nn.initializers.orthogonal(),
      param_dtype=jnp.float64,
      dtype=jnp.float64,
    )
    layer = flaxnorm.spectral_norm(dense, n_init_iterations=0)
    x = jnp.zeros((1, 64), jnp.float64)
    for seed in range(8):
      variables = layer.init(jax.random.key(seed), x)
      exact = _jacobian_norm(layer, variables, (64,), jnp.float64)
      certified = _certified(variables, layer, x)
      assert exact <= certified <= exact * (1 + 1e-6)


@pytest.mark.parametrize("mode", ["normalize", "clip"])
def test_float32_states_with_a_small_sigma_are_bounded(mode):
  """Hand-made float32 states whose u^T W v is ~1e-3 of |u|^T |W| |v|."""
  layer = flaxnorm.spectral_norm(nn.Dense(48, use_bias=False), mode=mode, target=1e-3)
  x = jnp.zeros((1, 40))
  rng = np.random.default_rng(0)
  for seed in range(12):
    variables = layer.init(jax.random.key(seed), x)
    w = np.asarray(variables["params"]["kernel"], np.float64).T  # (out, in): u^T w v
    u, v = rng.standard_normal(48), rng.standard_normal(40)
    g = w.T @ u
    v = v - (g @ v) / (g @ g) * g + 1e-3 * np.linalg.norm(v) * g / np.linalg.norm(g)
    variables = _with_state(variables, u.astype(np.float32), v.astype(np.float32))
    exact = _jacobian_norm(layer, variables, (40,))
    certified = _certified(variables, layer, x)
    assert exact <= certified <= exact * 1.1


def test_zero_state_leaves_the_kernel_unnormalized_and_is_bounded():
  """A zero u gives sigma 0: the layer uses its kernel as it is (scale 1)."""
  layer = flaxnorm.spectral_norm(nn.Dense(6, use_bias=False, kernel_init=nn.initializers.ones))
  x = jnp.zeros((1, 5))
  variables = layer.init(KEY, x)
  variables = _with_state(variables, jnp.zeros(6), variables["spectral"]["kernel_v"])
  exact = _jacobian_norm(layer, variables, (5,))
  chex.assert_trees_all_close(exact, math.sqrt(30), rtol=1e-6)
  assert exact <= _certified(variables, layer, x) <= exact * 1.01


def test_scale_bound_covers_the_eps_branch_and_clip():
  f32 = np.float32
  # normalize: |sigma| <= eps gives 1; above, target / sigma, largest at the smallest |sigma|
  assert _certify.scale_bound(-1e-13, 1e-13, f32, eps=1e-12, mode="normalize", target=1.0) == 1.0
  got = _certify.scale_bound(-1e-13, 1e-11, f32, eps=1e-12, mode="normalize", target=1.0)
  assert got >= 1e12
  got = _certify.scale_bound(0.5, 2.0, f32, eps=1e-12, mode="normalize", target=3.0)
  assert 6.0 <= got <= 6.0 * (1 + 1e-6)
  got = _certify.scale_bound(-2.0, -0.5, f32, eps=1e-12, mode="normalize", target=1.0)
  assert 2.0 <= got <= 2.0 * (1 + 1e-6)
  # clip: target / max(sigma, target), at most ~1
  assert 1.0 <= _certify.scale_bound(0.1, 0.2, f32, eps=1e-12, mode="clip", target=1.0) < 1 + 1e-6
  assert 0.5 <= _certify.scale_bound(2.0, 3.0, f32, eps=1e-12, mode="clip", target=1.0) < 0.5001
  with pytest.raises(_certify.UnsupportedError, match="not finite"):
    _certify.scale_bound(math.nan, 1.0, f32, eps=1e-12, mode="clip", target=1.0)


# ---------------------------------------------------------------- 2. convs Flax runs, no bound


@pytest.mark.parametrize(
  ("conv", "shape", "match"),
  [
    (nn.Conv(4, (3, 3), padding="REFLECT"), (1, 6, 6, 2), "REFLECT padding is not supported"),
    (nn.Conv(4, (3, 3), padding=((-1, 2), (1, 1))), (1, 6, 6, 2), "negative padding"),
    (nn.Conv(4, (3, 3), padding="VALID"), (1, 2, 2, 2), "the layer's output is empty"),
  ],
)
def test_convs_without_a_bound_give_a_reason_not_an_error(conv, shape, match):
  x = jnp.ones(shape)
  model = nn.Sequential([flaxnorm.spectral_norm(conv), nn.relu])
  variables = model.init(KEY, x)
  model.apply(variables, x)  # Flax runs it
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,))
  assert bound.certified is None and bound.layers["layers_0/kernel"][1] is None
  assert list(bound.reasons) == ["layers_0/kernel"]
  assert re.search(match, bound.reasons["layers_0/kernel"])


def test_input_dilation_of_ones_is_no_dilation():
  conv = nn.Conv(3, (3, 3), input_dilation=(1, 1), padding="CIRCULAR", use_bias=False)
  layer = flaxnorm.spectral_norm(conv)
  x = jnp.ones((1, 5, 5, 2))
  variables = layer.init(KEY, x)
  exact = _jacobian_norm(layer, variables, (5, 5, 2))
  assert exact <= _certified(variables, layer, x) <= exact * 1.01
  dilated = flaxnorm.spectral_norm(nn.Conv(3, (3, 3), input_dilation=(1, 2), padding=1))
  bound = flaxnorm.lipschitz_bound(dilated.init(KEY, x), model=dilated, inputs=(x,))
  assert bound.reasons == {"kernel": "nn.Conv with input_dilation=(1, 2) is not certified"}


# ---------------------------------------------------------------- 3. overflow is inf, never NaN


def test_conv_bound_overflow_is_inf_and_a_near_overflow_kernel_stays_finite():
  assert conv_norm_bound_of(np.full((3, 3, 1, 1), 1e308)) == math.inf  # was NaN
  ones = np.ones((3, 3, 1, 1))
  big = conv_norm_bound_of(ones * 2.0**1020)  # norm 9 * 2^1020 = 1.0e308: in range
  assert big == math.ldexp(conv_norm_bound_of(ones), 1020)  # was inf
  assert 9 * 2.0**1020 <= big < math.inf


def conv_norm_bound_of(kernel):
  return flaxnorm.conv_norm_bound(kernel, (4, 4))


# ---------------------------------------------------------------- 4. no spectral layer


class _Lipschitz(nn.Module):
  """Weight norm only, and a plain conv: no spectral collection at all."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3,), padding="CIRCULAR", use_bias=False)(x))
    x = flaxnorm.weight_norm(nn.Dense(5))(x.reshape(x.shape[0], -1))
    return nn.Dense(2)(nn.relu(x))


def test_a_model_without_spectral_layers_is_certified():
  x = jnp.ones((1, 6, 2))
  model = _Lipschitz()
  variables = model.init(KEY, x)
  assert "spectral" not in variables
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,))
  assert bound.reasons == {} and bound.certified is not None
  plain = flaxnorm.remove_weight_norm(variables)["params"]
  conv = nn.Conv(3, (3,), padding="CIRCULAR", use_bias=False)
  norms = {"Conv_0/kernel": _jacobian_norm(conv, {"params": plain["Conv_0"]}, (6, 2))}
  for name in ("Dense_0", "Dense_1"):
    norms[f"{name}/kernel"] = np.linalg.svd(plain[name]["kernel"], compute_uv=False)[0]
  assert sorted(bound.layers) == sorted(norms)
  product = 1.0
  for path, norm in norms.items():
    estimate, certified = bound.layers[path]
    assert certified is not None and norm <= certified <= 1.01 * norm
    chex.assert_trees_all_close(float(estimate), certified, rtol=1e-6)
    product *= certified
  chex.assert_trees_all_close(bound.certified, product)


def test_model_variables_need_params_and_a_misspelled_collection_still_fails():
  x = jnp.ones((1, 6, 2))
  with pytest.raises(ValueError, match=r"variables must be the model's variables with a 'params'"):
    flaxnorm.lipschitz_bound({"batch_stats": {}}, model=_Lipschitz(), inputs=(x,))
  layer = flaxnorm.spectral_norm(nn.Dense(3))
  variables = layer.init(KEY, jnp.ones((1, 4)))
  with pytest.raises(ValueError, match=r"collection 'spectrl' is not in the variables"):
    flaxnorm.lipschitz_bound(variables, "spectrl", model=layer, inputs=(jnp.ones((1, 4)),))
  with pytest.raises(ValueError, match=r"with them, lipschitz_bound certifies plain"):
    flaxnorm.lipschitz_bound(_Lipschitz().init(KEY, x))  # without model: nothing to multiply


# ---------------------------------------------------------------- 6, 7. documentation


def test_operator_power_iteration_warns_that_apply_must_be_linear():
  doc = flaxnorm.operator_power_iteration.__doc__ or ""
  assert "bias" in doc and "f(x) - f(0)" in doc


def test_default_gram_steps_figure_is_what_300_draws_measure():
  """The documented worst bound / sigma_1 over 300 Gaussian draws (sides 1..64), seed 0."""
  source = inspect.getsource(_certify)
  doc = source[source.index("DEFAULT_GRAM_STEPS = ") :]
  found = re.search(r"at most\s+(\d\.\d+)", doc)
  assert found is not None
  documented = float(found.group(1))
  rng = np.random.default_rng(0)
  worst = 0.0
  for _ in range(300):
    w = rng.standard_normal(tuple(int(k) for k in rng.integers(1, 65, 2)))
    worst = max(worst, _certify.matrix_norm_bound(w) / np.linalg.svd(w, compute_uv=False)[0])
  assert 1.0 <= worst <= documented


@pytest.mark.parametrize("exponent", [-1074, -1070, -1060, -1040])
def test_bounds_stay_above_the_norm_for_subnormal_weights(exponent):
  """Scaled back into the subnormal range, a bound rounds to 2^-1074 steps: it must round up."""
  rng = np.random.default_rng(-exponent)
  for _ in range(20):
    w = np.ldexp(rng.integers(1, 4, size=(2, 3)).astype(np.float64), exponent)
    true = np.linalg.svd(np.ldexp(w, -exponent), compute_uv=False)[0]  # exact scale
    # Compared at scale 2^0 (scaling a subnormal up is exact, down would round).
    assert np.ldexp(flaxnorm.matrix_norm_bound(w), -exponent) >= true
    k = w.T[None]  # a 1x1 conv: the same matrix on every position
    assert np.ldexp(flaxnorm.conv_norm_bound(k, (4,)), -exponent) >= true


# ---------------------------------------------------------------- 4. loops and lifted layers


class _Step(nn.Module):
  @nn.compact
  def __call__(self, c, _):
    layer = flaxnorm.spectral_norm(nn.Dense(4, use_bias=False, name="d"), target=2.0)
    return layer(c), None


class _Scanned(nn.Module):
  length: int = 4

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(
      _Step,
      variable_broadcast=["params", "spectral"],
      split_rngs={"params": False, "spectral": False},
      length=self.length,
    )
    return scan(name="s")(x, None)[0]


def test_a_layer_scan_runs_length_times_counts_length_times():
  """The trace sees the body fewer times than it runs: it was certified 4 (2^2) where the
  chain of 4 layers of norm 2 has norm 16."""
  model, x = _Scanned(), jnp.ones((1, 4))
  variables = model.init(KEY, x)
  variables = {**variables, "params": {"s": {"d": {"kernel": jnp.diag(jnp.array([3.0, 1, 1, 1]))}}}}
  for _ in range(10):  # converge the state for the new kernel
    variables = {**variables, **model.apply(variables, x, mutable=["spectral"])[1]}
  true = _jacobian_norm(model, variables, (4,))
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,))
  assert true == pytest.approx(16.0, rel=1e-4)
  assert true <= bound.certified <= true * 1.001
  assert float(bound.estimate) == pytest.approx(16.0, rel=1e-5)


class _WhileDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    d = nn.Dense(4, use_bias=False, name="d")
    if self.is_initializing():
      d(x)  # params are made outside the loop
    return nn.while_loop(lambda _, c: c[0] < 3, lambda _, c: (c[0] + 1, d(c[1])), self, (0, x))[1]


def test_a_layer_in_a_while_loop_on_a_counter_is_certified_step_by_step():
  """Three runs of the layer, the trip count found by the walk from the known counter:
  ``b³`` (a reason until 2026-12-07). Its row is to the power of its most runs, which
  the call counts do not know in a while loop: inf for ``b > 1``."""
  model, x = _WhileDense(), jnp.ones((1, 4))
  variables = model.init(KEY, x)
  variables = jax.tree.map(lambda a: 2 * a, variables)  # b > 1: a growing carry
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,))
  norm = np.linalg.norm(np.asarray(variables["params"]["d"]["kernel"], np.float64), 2)
  assert norm > 1 and bound.reasons == {}
  assert _jacobian_norm(model, variables, (4,)) <= bound.certified <= (norm * 1.01) ** 3
  assert bound.layers["d/kernel"][1] == float("inf")


class _WhileDenseUpTo(nn.Module):
  @nn.compact
  def __call__(self, x, n):
    d = nn.Dense(4, use_bias=False, name="d")
    if self.is_initializing():
      d(x)
    return nn.while_loop(lambda _, c: c[0] < n, lambda _, c: (c[0] + 1, d(c[1])), self, (0, x))[1]


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_a_layer_in_a_while_loop_of_unknown_trip_count(scale):
  """The limit an integer input without a value: with a layer of norm ``b <= 1`` the loop
  is certified 1 (zero steps: the identity) and the layer's row is ``b``, whatever the
  trip count; ``b > 1`` grows: a reason."""
  model, x = _WhileDenseUpTo(), jnp.ones((1, 4))
  variables = model.init(KEY, x, 3)
  kernel = variables["params"]["d"]["kernel"]
  kernel = scale * kernel / np.linalg.norm(np.asarray(kernel, np.float64), 2)
  variables = {"params": {"d": {"kernel": kernel}}}
  n = jax.ShapeDtypeStruct((), jnp.int32)
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x, n))
  if scale < 1:
    assert bound.reasons == {} and bound.certified == pytest.approx(1.0)
    norm = np.linalg.norm(np.asarray(kernel, np.float64), 2)
    assert norm <= bound.layers["d/kernel"][1] <= norm * 1.01
  else:
    assert bound.certified is None and "grows" in bound.reasons["<top level>"]


class _MaskedInside(nn.Module):
  @nn.compact
  def __call__(self, x):
    mask = jnp.ones((3, 3, 2, 2)).at[2:].set(0.0)  # traced: no value in a shape-only trace
    return nn.Conv(2, (3, 3), mask=mask, name="c")(x)


def test_a_mask_computed_inside_the_model_is_followed():
  """The layer bound has no value for a traced mask; the layer is followed, the mask
  folded from constants and the masked kernel bounded (it was a reason: 'build the mask
  with numpy')."""
  model, x = _MaskedInside(), jnp.ones((1, 5, 5, 2))
  variables = model.init(KEY, x)
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,))
  exact = _jacobian_norm(model, variables, (5, 5, 2))
  assert bound.reasons == {} and exact <= bound.certified <= 1.3 * exact


def test_recursive_spectral_norm_is_certified():
  """The root of a recursive wrap has no kernel of its own: it said its state was missing."""
  model = flaxnorm.spectral_norm(nn.Sequential([nn.Dense(5), nn.relu, nn.Dense(3)]), recursive=True)
  x = jnp.ones((1, 4))
  variables = model.init(KEY, x)
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,))
  assert bound.reasons == {}
  assert set(bound.layers) == {"layers_0/kernel", "layers_2/kernel"}
  assert 1.0 <= bound.certified < 1.01**2


def test_a_float64_numpy_kernel_is_bounded_as_the_layer_rounds_it():
  """Without x64 the layer computes with the kernel rounded to float32; it bounded the
  float64 values, 5e-8 below."""
  model, x = nn.Dense(1, use_bias=False), jnp.ones((1, 64))
  variables = {"params": {"kernel": np.full((64, 1), 1 + 0.6 * 2**-23)}}
  true = _jacobian_norm(model, variables, (64,))
  assert _certified(variables, model, x) >= true


class _LiftedOnTheLayer(nn.Module):
  """Lifted transforms given the layer itself: Flax runs the function as the layer's method."""

  kind: str = "scan"

  @nn.compact
  def __call__(self, x):
    d = nn.Dense(3, use_bias=False)
    y = d(x)
    if self.kind == "scan":
      scan = nn.scan(
        lambda m, c, _: (m(c), None),
        variable_broadcast="params",
        split_rngs={"params": False},
        length=4,
      )
      return scan(d, y, None)[0]
    if self.kind == "remat":
      return nn.remat(lambda m, z: m(m(z)))(d, y)
    return nn.while_loop(lambda m, c: c[1] < 3, lambda m, c: (m(c[0]), c[1] + 1), d, (y, 0))[0]


@pytest.mark.parametrize("kind", ["scan", "remat", "while"])
def test_a_lifted_transform_on_the_layer_counts_its_runs(kind):
  """The calls inside ran as nested calls of the layer and were not counted: certified 2.9
  where the norm was 20.6 (scan), 4.2 (remat), 10.2 (while, not refused; then refused,
  until the walk followed a while loop on a known counter)."""
  model, x = _LiftedOnTheLayer(kind), jnp.ones((1, 3))
  variables = jax.tree.map(lambda a: 2 * a, model.init(KEY, x))
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,))
  assert bound.reasons == {} and bound.certified >= _jacobian_norm(model, variables, (3,))


class _Branches(nn.Module):
  n: int = 2

  def setup(self):
    self.d = nn.Dense(3, use_bias=False)

  def __call__(self, x):
    branches = [lambda m, z: m.d(z)] * self.n
    return nn.switch(jnp.asarray(0), branches, self, x)


@pytest.mark.parametrize("scale", [0.3, 1.0])
def test_branches_count_the_runs_of_one_branch(scale):
  """A layer in both branches runs once: summed over branches, a kernel of norm < 1 was
  certified at its square, below the true norm."""
  model, x = _Branches(3), jnp.ones((1, 3))
  variables = jax.tree.map(lambda a: scale * a, model.init(KEY, x))
  true = _jacobian_norm(model, variables, (3,))
  assert true <= _certified(variables, model, x) <= true * 1.001


class _ScanMap(nn.Module):
  """nn.scan as a map: the layer on each slice, side by side (no carry)."""

  @nn.compact
  def __call__(self, xs):
    scan = nn.scan(
      lambda m, c, x: (c, m(x)),
      variable_broadcast="params",
      split_rngs={"params": False},
      in_axes=1,
      out_axes=1,
    )
    return scan(nn.Dense(3, use_bias=False), None, xs)[1]


def test_a_scan_over_slices_is_bounded_for_small_kernels():
  """Counted ``length`` times, a kernel of norm < 1 gave its 4th power: below the norm."""
  model, x = _ScanMap(), jnp.ones((1, 4, 3))
  variables = jax.tree.map(lambda a: 0.5 * a, model.init(KEY, x))
  assert _certified(variables, model, x) >= _jacobian_norm(model, variables, (4, 3))


class _DictInput(nn.Module):
  @nn.compact
  def __call__(self, x):
    return _Head()({"z": x, "a": jnp.concatenate([x, x], -1)})


class _Head(nn.Module):
  @nn.compact
  def __call__(self, feats):
    return nn.Dense(3)(next(iter(feats.values())))  # the dict's first entry


def test_marking_a_call_keeps_its_arguments_as_they_are():
  """The mark rebuilt the arguments' pytree, which sorts a dict: the Dense saw 'a'."""
  model, x = _DictInput(), jnp.ones((1, 3))
  variables = model.init(KEY, x)
  assert _certified(variables, model, x) >= _jacobian_norm(model, variables, (3,))


def test_a_scan_of_length_zero_runs_nothing():
  model, x = _Scanned(length=0), jnp.ones((1, 4))
  bound = flaxnorm.lipschitz_bound(_Scanned().init(KEY, x), model=model, inputs=(x,))
  assert bound.reasons == {} and bound.certified == 1.0


# ---------------------------------------------------------------- 5. what depends on the inputs


class _PickedBranch(nn.Module):
  """Two 1-Lipschitz branches, picked by the input's sign: the output jumps at 0."""

  steer: str = "inputs"

  @nn.compact
  def __call__(self, x):
    d1, d2 = nn.Dense(1, name="d1"), nn.Dense(1, name="d2")
    pick = x.sum() > 0 if self.steer == "inputs" else d1.variables["params"]["bias"][0] > 0
    return nn.cond(pick, lambda m, z: d1(z), lambda m, z: d2(z), self, x)


def test_a_branch_picked_from_the_inputs_gets_a_reason():
  """It was certified 1.0, where two inputs 2e-3 apart give outputs 10 apart."""
  model, x = _PickedBranch(), jnp.ones((1, 2))
  kernel = jnp.array([[0.5], [0.0]])  # d1(z) = z_0 / 2, d2(z) = z_0 / 2 + 10
  d1, d2 = {"kernel": kernel, "bias": jnp.zeros(1)}, {"kernel": kernel, "bias": jnp.full(1, 10.0)}
  variables = {"params": {"d1": d1, "d2": d2}}
  jump = model.apply(variables, -1e-3 * x) - model.apply(variables, 1e-3 * x)
  assert float(jump[0, 0]) > 9.0  # inputs 3e-3 apart: a Lipschitz constant > 3000
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,))
  assert bound.certified is None and list(bound.reasons) == ["<top level>"]
  assert "picks a branch" in bound.reasons["<top level>"]
  steered = _PickedBranch(steer="params")  # the same branch for every input: a layer
  assert _certified(variables, steered, x) >= _jacobian_norm(steered, variables, (2,))


class _TripCount(nn.Module):
  """Adds 1 until the sum reaches 5: each step is 1-Lipschitz, the trip count is not."""

  @nn.compact
  def __call__(self, x):
    x = nn.while_loop(lambda m, z: z.sum() < 5.0, lambda m, z: z + 1.0, self, x)
    return nn.Dense(1, name="d")(x)


def test_a_trip_count_from_the_inputs_gets_a_reason():
  model, x = _TripCount(), jnp.ones((1, 2))
  bound = flaxnorm.lipschitz_bound(model.init(KEY, x), model=model, inputs=(x,))
  assert bound.certified is None and "loop's trip count" in bound.reasons["<top level>"]


class _CalledOnAConstant(nn.Module):
  @nn.compact
  def __call__(self, x):
    d = nn.Dense(2, use_bias=False, name="d")
    return d(x) + d(jnp.ones((1, 2)))  # the second call adds a constant: no factor


def test_a_call_on_a_constant_adds_no_factor():
  """Counted as a second run, a kernel of norm 0.5 was certified 0.25: below its norm."""
  model, x = _CalledOnAConstant(), jnp.ones((1, 2))
  variables = {"params": {"d": {"kernel": 0.5 * jnp.eye(2)}}}
  true = _jacobian_norm(model, variables, (2,))
  assert true == pytest.approx(0.5)
  assert true <= _certified(variables, model, x) <= true * 1.001


def test_inputs_may_be_shape_dtype_structs():
  model = nn.Sequential([nn.Conv(3, (3, 3)), nn.relu, flaxnorm.spectral_norm(nn.Dense(2))])
  x = jnp.ones((1, 6, 6, 2))
  variables = model.init(KEY, x)
  spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
  assert _certified(variables, model, spec) == _certified(variables, model, x)


class _Steps(nn.Module):
  """A linear RNN: the carry goes through one layer per step."""

  out: str = "steps"

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(
      lambda m, c, _: (m(c), m(c)),
      variable_broadcast="params",
      split_rngs={"params": False},
      length=4,
    )
    last, steps = scan(nn.Dense(3, use_bias=False, name="d"), x, None)
    return steps if self.out == "steps" else last


@pytest.mark.parametrize("out", ["steps", "last"])
def test_a_scan_returning_every_step_is_bounded_by_all_its_steps(out):
  """Its steps b, b^2, b^3, b^4 stand side by side: certified 1.0 (the last step's) where
  the norm is 2.0 (kernels of norm 1 stacked 4 times), then refused; now each step's
  bound is carried and the stack gets √Σ L(y_t)², 2.0 here."""
  model, x = _Steps(out), jnp.ones((1, 3))
  variables = {"params": {"d": {"kernel": jnp.eye(3)}}}
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,))
  true = _jacobian_norm(model, variables, (3,))
  assert true == pytest.approx(2.0 if out == "steps" else 1.0)
  assert bound.reasons == {} and true <= bound.certified <= true * 1.001


class _Flagged(nn.Module):
  @nn.compact
  def __call__(self, x, flag):
    return nn.Dense(3, name="d")(x) if flag else x  # reads the flag in Python


@pytest.mark.parametrize("flag", [np.array(True), jnp.array(True)], ids=["numpy", "jax"])
def test_an_input_read_in_python_is_held_fixed(flag):
  """Arrays in inputs are traced; a flag the model reads in Python raised
  TracerBoolConversionError, and is now held fixed (traced again with only float arrays)."""
  model, x = _Flagged(), jnp.ones((1, 3))
  variables = model.init(KEY, x, flag)
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x, flag))
  assert bound.reasons == {}
  assert bound.certified >= _jacobian_norm(nn.Dense(3), {"params": variables["params"]["d"]}, (3,))


@pytest.mark.parametrize(
  "value", [0.5, [0.5], np.float32(0.5)], ids=["float", "list", "np.float32"]
)
def test_inputs_that_cannot_be_traced_get_a_reason(value):
  """A Python scalar is held fixed, so a branch picked from it was not seen: certified 1.0
  where the output jumps by 10. numpy scalars are traced."""

  class Scalar(nn.Module):
    @nn.compact
    def __call__(self, s):
      x = jnp.reshape(jnp.asarray(s, jnp.float32), (1, 1))
      d1, d2 = nn.Dense(1, name="d1"), nn.Dense(1, name="d2")
      return nn.cond(x.sum() > 0, lambda m, z: d1(z), lambda m, z: d2(z), self, x)

  d1 = {"kernel": jnp.ones((1, 1)), "bias": jnp.zeros(1)}
  variables = {"params": {"d1": d1, "d2": {**d1, "bias": jnp.full(1, 10.0)}}}
  bound = flaxnorm.lipschitz_bound(variables, model=Scalar(), inputs=(value,))
  assert bound.certified is None
  expect = "picks a branch" if isinstance(value, np.generic) else "no input is a floating-point"
  assert expect in bound.reasons["<top level>"]


class _CarriedSteps(nn.Module):
  """A chain through the carry that also keeps its steps in the carry."""

  keep: str = "buffer"

  @nn.compact
  def __call__(self, x):
    def step(m, c, _):
      h, kept, i = c
      h = m(h)
      kept = (
        kept.at[i].set(h) if self.keep == "buffer" else kept + h if self.keep == "sum" else kept
      )
      return (h, kept, i + 1), None

    scan = nn.scan(step, variable_broadcast="params", split_rngs={"params": False}, length=4)
    init = (x, jnp.zeros((4, *x.shape)), 0) if self.keep == "buffer" else (x, jnp.zeros_like(x), 0)
    h, kept, _ = scan(nn.Dense(3, use_bias=False, name="d"), init, None)[0]
    return (
      kept.reshape(x.shape[0], -1) if self.keep == "buffer" else kept if self.keep == "sum" else h
    )


@pytest.mark.parametrize("keep", ["buffer", "sum", "none"])
def test_a_carry_that_takes_in_two_dependent_values_is_bounded(keep):
  """Steps kept in the carry stand side by side: certified 1.0 where the norm was 2.0 (a
  buffer) or 4.0 (a sum), then refused; now the buffer's elements are side by side
  (√Σ) and the sum adds its terms' bounds, both tight here."""
  model, x = _CarriedSteps(keep), jnp.ones((1, 3))
  variables = {"params": {"d": {"kernel": jnp.eye(3)}}}
  true = _jacobian_norm(model, variables, (3,))
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,))
  assert true == pytest.approx({"buffer": 2.0, "sum": 4.0, "none": 1.0}[keep])
  assert bound.reasons == {} and true <= bound.certified <= true * 1.001


class _HeldFixed(nn.Module):
  """A chain with what the bound is not over: a dead accumulator, noise from a key and a
  branch picked by a flag, both given in inputs."""

  @nn.compact
  def __call__(self, x, key, flag):
    def step(m, c, _):
      h, acc, k = c
      k, sub = jax.random.split(k)
      h = m(h) + 0.01 * jax.random.normal(sub, h.shape)
      return (h, acc + jnp.mean(h**2), k), None  # acc is never read

    scan = nn.scan(step, variable_broadcast="params", split_rngs={"params": False}, length=3)
    h = scan(nn.Dense(3, use_bias=False, name="d"), (x, 0.0, key), None)[0][0]
    return nn.cond(flag, lambda m, z: z, lambda m, z: jnp.tanh(z), self, h)


def test_what_the_bound_is_not_over_does_not_unchain_it():
  """Each of these gave a 'no chain' reason in review: a dead accumulator counted as a carry
  taking in two values; a key and a flag in inputs counted as data."""
  model, x = _HeldFixed(), jnp.ones((1, 3))
  variables = {"params": {"d": {"kernel": 0.5 * jnp.eye(3)}}}
  for flag in (jnp.array(True), np.array(False)):
    bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x, jax.random.key(1), flag))
    assert bound.reasons == {}
    assert bound.certified == pytest.approx(0.5**3)  # three steps of the kernel


def test_a_gather_at_indices_from_the_inputs_gets_a_reason():
  """jnp.interp picks its segment by searchsorted on the inputs: a gather at computed
  indices, which no rule bounds (a step unless the pieces meet)."""
  model = nn.Sequential([nn.Dense(3), lambda h: jnp.interp(h, jnp.arange(3.0), jnp.zeros(3))])
  x = jnp.ones((1, 3))
  bound = flaxnorm.lipschitz_bound(model.init(KEY, x), model=model, inputs=(x,))
  assert bound.certified is None and "gather at indices" in bound.reasons["<top level>"]


def test_numpy_data_beside_a_flag_read_in_python_is_traced():
  """The second trace keeps the float numpy data: it held every numpy input fixed."""
  model, x, flag = _Flagged(), np.ones((1, 3), np.float32), np.bool_(True)
  variables = model.init(KEY, x, flag)
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x, flag))
  assert bound.reasons == {} and bound.certified is not None


@settings(max_examples=40, deadline=None)
@given(
  dims=st.integers(1, 2),
  groups=st.sampled_from([1, 2]),
  window=st.integers(1, 4),
  size=st.integers(1, 6),
  input_dilation=st.integers(1, 3),
  kernel_dilation=st.integers(1, 2),
  stride=st.integers(1, 2),
  pad=st.tuples(st.integers(-2, 4), st.integers(-2, 4)),
  seed=st.integers(0, 2**16),
)
@example(
  dims=2, groups=2, window=3, size=5, input_dilation=1, kernel_dilation=1, stride=2,
  pad=(-2, 3), seed=97,
)  # fmt: skip
def test_dilated_conv_bound_holds_for_any_conv_general_dilated(
  dims, groups, window, size, input_dilation, kernel_dilation, stride, pad, seed
):
  """Negative padding, input dilation (a transposed conv), kernel dilation, strides and
  groups: never below sigma_1 of lax.conv_general_dilated's dense Jacobian."""
  rng = np.random.default_rng(seed)
  k = rng.normal(size=(*(window,) * dims, 2, 2 * groups)).astype(np.float32)
  spatial = "HW"[:dims]
  numbers = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
  x = jnp.zeros((1, *(size,) * dims, 2 * groups))

  def conv(z):  # its definition: the input dilated and padded (lax.pad), then a VALID conv
    # (XLA:CPU's own 2-D conv with padding (-2, 3) at stride 2 computes wrong values: jaxlib 0.10.2)
    config = [(0, 0, 0), *[(*pad, input_dilation - 1)] * dims, (0, 0, 0)]
    padded = jax.lax.pad(z.reshape(x.shape), jnp.zeros((), x.dtype), config)
    return jax.lax.conv_general_dilated(
      padded, k, (stride,) * dims, "VALID", None, (kernel_dilation,) * dims, numbers,
      feature_group_count=groups,
    )  # fmt: skip

  try:
    out = jax.eval_shape(conv, x).shape
  except ValueError:  # a crop larger than the input: JAX refuses it
    reject()
  assume(0 not in out)
  jacobian = np.asarray(jax.jacfwd(lambda z: conv(z).ravel())(x.ravel()), np.float64)
  bound = _certify.dilated_conv_norm_bound(
    k,
    x.shape[1:-1],
    out[1:-1],
    strides=(stride,) * dims,
    padding=(pad,) * dims,
    input_dilation=(input_dilation,) * dims,
    kernel_dilation=(kernel_dilation,) * dims,
    feature_group_count=groups,
  )
  assert bound >= np.linalg.norm(jacobian, 2) * (1 - 1e-9)


def test_a_transposed_conv_is_bounded_through_its_phases():
  """Upsampling by 4 with a kernel of ones copies each input 4 times: norm 2 (√4); the
  dilated input's bound is the kernel's sum, 4."""
  k = np.ones((4, 1, 1), np.float32)
  x = jnp.zeros((1, 16, 1))
  conv = functools.partial(
    jax.lax.conv_transpose,
    rhs=k,
    strides=(4,),
    padding="VALID",
    dimension_numbers=("NWC", "WIO", "NWC"),
  )
  out = jax.eval_shape(conv, x).shape
  jacobian = np.asarray(jax.jacfwd(lambda z: conv(z.reshape(x.shape)).ravel())(x.ravel()))
  assert np.linalg.norm(jacobian, 2) == pytest.approx(2.0)
  (eqn,) = jax.make_jaxpr(conv)(x).jaxpr.eqns
  p = eqn.params
  bound = _certify.dilated_conv_norm_bound(
    k,
    (16,),
    out[1:-1],
    strides=p["window_strides"],
    padding=p["padding"],
    input_dilation=p["lhs_dilation"],
    kernel_dilation=p["rhs_dilation"],
    feature_group_count=1,
  )
  assert 2.0 <= bound <= 2.0 * (1 + 1e-9)


class _StackBlock(nn.Module):
  wrap: str = "plain"

  @nn.compact
  def __call__(self, h, _):
    wrap = {
      "plain": lambda m: m,
      "weight": flaxnorm.weight_norm,
      "spectral": flaxnorm.spectral_norm,
    }
    return wrap[self.wrap](nn.Dense(4))(h), None  # pyright: ignore[reportCallIssue]


class _Stacked(nn.Module):
  """Three members of one layer, stacked: an ``nn.scan`` over them, or an ``nn.vmap``
  ensemble returning every member's output."""

  wrap: str = "plain"
  how: str = "scan"

  @nn.compact
  def __call__(self, x):
    axes = {"variable_axes": {"params": 0, "spectral": 0}, "split_rngs": {"params": True}}
    if self.how == "scan":
      return nn.scan(_StackBlock, length=3, **axes)(self.wrap)(x, None)[0]
    ensemble = nn.vmap(_StackBlock, in_axes=(None, None), axis_size=3, **axes)
    return ensemble(self.wrap)(x, None)[0]


@pytest.mark.parametrize("how", ["scan", "vmap"])
@pytest.mark.parametrize("wrap", ["plain", "weight", "spectral"])
def test_stacked_layers_are_certified_with_each_members_own_params(wrap, how):
  """nn.scan over stacked layers and nn.vmap ensembles: followed, each step or member with
  its own slice known. Refused before (plain, weight-normed: a reason; spectral: a
  ValueError), where NNX certified them."""
  model, x = _Stacked(wrap, how), jnp.ones((2, 4))
  variables = model.init(KEY, x)
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,))
  assert bound.reasons == {} and bound.certified is not None
  exact = _jacobian_norm(model, variables, (4,))
  norms = [np.linalg.norm(w, 2) for w in _member_kernels(model, variables)]
  (row,) = bound.layers.values()
  if how == "scan":  # each step its own member: the product of their norms
    assert exact <= bound.certified <= np.prod(norms) * 1.01
    assert max(norms) ** 3 * (1 - 1e-6) <= row[1] <= (max(norms) * 1.01) ** 3
  else:  # the members side by side: the stacked kernels' norm (each W / sigma for
    # spectral norm: the raw kernels' product then the largest 1/sigma, before the
    # bound's traces took the kernel side)
    stacked = np.linalg.norm(np.concatenate(_member_kernels(model, variables), axis=1), 2)
    assert exact <= bound.certified <= stacked * 1.01 and row[1] == pytest.approx(bound.certified)
  if wrap == "spectral":
    assert float(row[0]) == pytest.approx(1.0, abs=1e-6)  # target / sigma times sigma


def _member_kernels(model, variables) -> list[np.ndarray]:
  """Each member's kernel as the layer computes with it (``W / sigma`` for spectral norm)."""
  (block,) = variables["params"].values()
  params = block["Dense_0"]
  if model.wrap == "plain":
    stack = params["kernel"]
  elif model.wrap == "weight":
    v, g = params["kernel_v"], params["kernel_g"]
    stack = g.reshape(3, 1, -1) * v / jnp.linalg.norm(v, axis=1, keepdims=True)
  else:
    (state,) = variables["spectral"].values()
    stack = params["kernel"] / state["Dense_0"]["kernel_sigma"][:, None, None]
  return [np.asarray(w, np.float64) for w in stack]


class _StepCell(nn.Module):
  @nn.compact
  def __call__(self, c, xt):
    c = nn.Dense(4)(c) + xt
    return c, c


class _PerStepRNN(nn.Module):
  """An RNN with its own layer per step, from a zero carry: step 0's layer reads a constant."""

  @nn.compact
  def __call__(self, xs):
    axes = {"variable_axes": {"params": 0}, "split_rngs": {"params": True}}
    return nn.scan(_StepCell, length=3, **axes)()(jnp.zeros((4,)), xs)[1]


def test_a_stacked_member_that_reads_only_a_constant_gets_no_row_below_its_norm():
  """Step 0's member (100x the others) only reads the zero carry: the walk never measures
  it, so its row was the other members' norm (6.0 where the largest member's is 190³);
  now there is no row. The certificate stays sound."""
  model, x = _PerStepRNN(), jnp.ones((3, 4))
  variables = model.init(KEY, x)
  kernel = variables["params"]["Scan_StepCell_0"]["Dense_0"]["kernel"]
  variables["params"]["Scan_StepCell_0"]["Dense_0"]["kernel"] = kernel.at[0].multiply(100.0)
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,))
  f = lambda z: model.apply(variables, z.reshape(3, 4)).ravel()  # linear: the exact norm
  exact = np.linalg.norm(np.asarray(jax.jacfwd(f)(x.ravel()), np.float64), 2)
  assert bound.reasons == {} and exact <= bound.certified
  assert bound.layers == {}


class _SharedStateEnsemble(nn.Module):
  state_axis: int | None = 0

  @nn.compact
  def __call__(self, x):
    block = nn.vmap(
      lambda m, h: m(h),
      in_axes=None,
      axis_size=3,
      split_rngs={"params": True, "spectral": True},
      variable_axes={"params": 0, "spectral": self.state_axis},
    )
    return block(flaxnorm.spectral_norm(nn.Dense(4), operator=True), x)


def test_stacked_params_with_one_spectral_state_are_followed():
  """Members' kernels stacked, one (unstacked) operator-mode sigma for all: the layer
  bound read the stored (3, 4, 4) kernel as one matrix, the members' inputs side by side
  (1.447 where the norm is 1.505). Now the stack is followed."""
  x = jnp.ones((1, 4))
  full = _SharedStateEnsemble(0).init(KEY, x)
  model = _SharedStateEnsemble(None)
  variables = {**full, "spectral": jax.tree.map(lambda a: a[0], full["spectral"])}
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,))
  exact = _jacobian_norm(model, variables, (4,))
  assert bound.reasons == {} and exact * (1 - 1e-6) <= bound.certified <= exact * 1.01
