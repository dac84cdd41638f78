"""Products of two input-dependent values, bounded by the spans of their factors.

Each certificate is checked against local Jacobian norms at many points, large
inputs included (a lower bound of the constant: a certificate below one is wrong),
and each interval rule against values drawn inside its operands' spans.
"""

from __future__ import annotations

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import flaxnorm
import flaxnorm.nnx as fnnx
from flaxnorm import _reports, _spans

KEY = jax.random.key(0)
_FINITE = st.floats(-1e3, 1e3, allow_nan=False)


def _span(draw_a: float, draw_b: float) -> _spans.Span:
  return (min(draw_a, draw_b), max(draw_a, draw_b))


def _inside(s: _spans.Span, rng: np.random.Generator, n: int = 64) -> np.ndarray:
  """Points of ``s``, its ends included."""
  return np.concatenate([np.array(s), rng.uniform(s[0], s[1], n)])


@settings(max_examples=60, deadline=None)
@given(_FINITE, _FINITE, _FINITE, _FINITE, st.integers(0, 2**16))
def test_interval_rules_hold_every_value_drawn_inside(a0, a1, b0, b1, seed):
  rng = np.random.default_rng(seed)
  a, b = _span(a0, a1), _span(b0, b1)
  x, y = _inside(a, rng), _inside(b, rng)[:, None]
  checks = [
    (_spans.product(a, b), x * y),
    (_spans.total([a, b], [1, -1]), x - y),
    (_spans.total([a, b], [1, 1]), x + y),
    (_spans.times(a, 3.0), 3.0 * x),
    (_spans.monotone(a, math.tanh, -1.0, 1.0), np.tanh(x)),
  ]
  if b[0] > 1e-300 or b[1] < -1e-300:  # (the walk divides by normal numbers only)
    checks.append((_spans.quotient(a, b, min(abs(b[0]), abs(b[1]))), x / y))
  for (lo, hi), values in checks:
    assert lo <= values.min() and values.max() <= hi


@settings(max_examples=30, deadline=None)
@given(_FINITE, _FINITE, st.integers(0, 2**16))
def test_a_dot_with_a_known_matrix_stays_in_its_span(a0, a1, seed):
  rng = np.random.default_rng(seed)
  a = _span(a0, a1)
  c = rng.normal(size=(5, 3))
  lo, hi = _spans.dot(a, c, [0])
  corners = np.array(np.meshgrid(*[a] * 5)).reshape(5, -1).T  # every vertex of the box
  values = corners @ c
  assert lo <= values.min() and values.max() <= hi
  assert values.min() == pytest.approx(lo, rel=1e-9, abs=1e-9)  # and it is exact there


def _lower(f, shape, scales=(0.5, 3.0, 10.0), n=6) -> float:
  """The largest local Jacobian norm of ``f`` over random points at several scales."""
  size = math.prod(shape)
  best = 0.0
  for k, scale in enumerate(scales):
    for p in jax.random.normal(jax.random.key(k), (n, *shape)) * scale:
      jac = jax.jacfwd(lambda z: jnp.ravel(f(z.reshape(shape))))(p.ravel())
      best = max(best, float(np.linalg.norm(np.asarray(jac, np.float64).reshape(-1, size), 2)))
  return best


class _Gated(nn.Module):
  """WaveNet's gated unit, ``tanh(conv(x)) ⊙ σ(conv(x))``, with a 1x1 projection."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Conv(4, (3,), name="f")(x)) * nn.sigmoid(nn.Conv(4, (3,), name="g")(x))
    return nn.Conv(2, (1,), name="out")(h)


def test_a_gated_unit_is_certified_by_its_factors_spans():
  """L ≤ max|tanh| L(σ part) + max|σ| L(tanh part): each factor's bound times the other's span."""
  model, x = _Gated(), jnp.ones((1, 6, 3))
  variables = model.init(KEY, x)
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,))
  assert bound.reasons == {}
  f, g, out = (bound.layers[f"{k}/kernel"][1] for k in ("f", "g", "out"))
  assert bound.certified == pytest.approx(out * (f + g / 4), rel=1e-6)
  assert bound.certified >= _lower(lambda z: model.apply(variables, z), x.shape)


def _linen_cells():
  return {
    "lstm": nn.LSTMCell(3),
    "optimized_lstm": nn.OptimizedLSTMCell(3),
    "gru": nn.GRUCell(3),
    "mgu": nn.MGUCell(3),
    "spectral_gru": flaxnorm.spectral_norm(nn.GRUCell(3), recursive=True),
    "weight_normed_lstm": flaxnorm.weight_norm(nn.LSTMCell(3), recursive=True),
  }


@pytest.mark.parametrize("name", list(_linen_cells()))
def test_gated_linen_rnns_are_certified_above_their_local_norms(name):
  """Their gates (in [0, 1]) multiply values of known spans: tanh's, and a certified
  layer's output (its kernel's ∞-norm times its input's span, plus its bias)."""
  model, x = nn.RNN(_linen_cells()[name]), jnp.ones((1, 3, 2))
  variables = model.init(KEY, x)
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,))
  assert bound.reasons == {} and math.isfinite(bound.certified)
  assert bound.certified >= _lower(lambda z: model.apply(variables, z), x.shape)


@pytest.mark.parametrize("cell", [nnx.LSTMCell, nnx.GRUCell, nnx.OptimizedLSTMCell])
def test_gated_nnx_rnns_are_certified_above_their_local_norms(cell):
  model, x = nnx.RNN(cell(2, 3, rngs=nnx.Rngs(0))), jnp.ones((1, 3, 2))
  bound = fnnx.lipschitz_bound(model, (x,))
  assert bound.reasons == {} and math.isfinite(bound.certified)
  carry = model.cell.initialize_carry((1, 2), nnx.Rngs(0))  # zeros
  graph, state = nnx.split(model.cell)

  def unrolled(z):  # the RNN step by step (nnx.RNN's scan does not run under jacfwd here)
    cell, c, ys = nnx.merge(graph, state), carry, []
    for t in range(z.shape[1]):
      c, y = cell(c, z[:, t])
      ys.append(y)
    return jnp.stack(ys, 1)

  chex.assert_trees_all_close(unrolled(x), model(x), rtol=1e-6)
  assert bound.certified >= _lower(unrolled, x.shape)


class _BiasGate(nn.Module):
  """``tanh(x) ⊙ d(tanh(x))``: ``d``'s bias sets its output's span."""

  @nn.compact
  def __call__(self, x):
    t = jnp.tanh(x)
    return t * nn.Dense(3, name="d")(t)


def test_a_certified_layers_output_span_counts_its_bias():
  """At x = 0 the Jacobian is d(0) = its bias, 100: a span without it certified 2."""
  model, x = _BiasGate(), jnp.zeros((1, 3))
  variables = {"params": {"d": {"kernel": jnp.eye(3), "bias": jnp.full(3, 100.0)}}}
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,))
  lower = _lower(lambda z: model.apply(variables, z), x.shape, scales=(0.0, 0.5, 3.0))
  assert lower >= 99.0
  assert bound.reasons == {} and bound.certified >= lower


@pytest.mark.parametrize(
  "layer",
  [nn.Dense(3), nn.DenseGeneral((2, 2)), nn.Conv(2, (3,)), nn.Conv(3, (2, 2), strides=2)],
  ids=["dense", "dense_general", "conv", "conv_2d"],
)
def test_a_layers_gain_is_its_largest_output_over_the_unit_box(layer):
  """A linear map's largest |output| over inputs in [-1, 1] is at a vertex: all of them."""
  shape = (1, 4, 2) if isinstance(layer, nn.Conv) and len(layer.kernel_size) == 1 else (1, 4)
  shape = (1, 2, 2, 2) if isinstance(layer, nn.Conv) and len(layer.kernel_size) == 2 else shape
  variables = layer.init(KEY, jnp.ones(shape))
  kernel = variables["params"]["kernel"]
  size = math.prod(shape)
  vertices = np.array(np.meshgrid(*[[-1.0, 1.0]] * size)).reshape(size, -1).T
  apply = jax.vmap(
    lambda v: (
      layer.apply(variables, v.reshape(shape)) - layer.apply(variables, 0 * v.reshape(shape))
    )
  )
  most = float(np.abs(np.asarray(apply(jnp.asarray(vertices, jnp.float32)), np.float64)).max())
  n_out = len(layer.features) if isinstance(layer, nn.DenseGeneral) else 1
  gain = _reports._gain(np.asarray(kernel, np.float64), n_out)
  assert most <= gain * (1 + 1e-6) and gain <= most * (1 + 1e-6)  # (float32 sums)


@pytest.mark.parametrize("offset", [0.0, 10.0])
def test_a_branch_keeps_the_span_of_every_branch(offset):
  """A branch picked by a param: the product after it holds for the branch it picks."""

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      pick = self.param("pick", nn.initializers.ones, ())
      h = jax.lax.cond(pick > 0, lambda: jnp.tanh(x) + offset, lambda: jnp.tanh(x))
      return h * nn.sigmoid(x)

  model, x = Model(), jnp.ones((1, 3))
  variables = model.init(KEY, x)
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,))
  assert bound.reasons == {}
  assert bound.certified >= _lower(lambda z: model.apply(variables, z), x.shape)


@pytest.mark.parametrize("grow", [False, True])
def test_a_loop_of_unknown_trip_count_gives_up_a_growing_span(grow):
  """``h ← h + 1`` keeps h's bound but not its span: a product with it is refused after
  the loop (the initial span would certify 1.25 where 100 steps give about 25)."""

  def step(h):
    return h + 1.0 if grow else 0.5 * jnp.tanh(h)

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x, n):
      h = jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, step(c[1])), (0, jnp.tanh(x)))
      return h[1] * nn.sigmoid(x)

  model, x = Model(), jnp.ones((1, 3))
  n = jax.ShapeDtypeStruct((), jnp.int32)  # a trip count the walk cannot know
  bound = flaxnorm.lipschitz_bound({"params": {}}, model=model, inputs=(x, n))
  if grow:
    assert bound.certified is None and "bounded interval" in bound.reasons["<top level>"]
  else:
    assert bound.certified == pytest.approx(1.25, rel=1e-6)
    for trips in (0, 1, 100):
      local = _lower(lambda z, t=trips: model.apply({}, z, t), x.shape)
      assert bound.certified >= local


@pytest.mark.parametrize("gate", ["sigmoid", "tanh"])
def test_a_convex_combination_stays_in_its_hull(gate):
  """``(1 − z) a + z b`` with ``z = σ(·)`` is in ``[−1, 1]`` for tanh's ``a``, ``b`` (the
  product after it: ``1 · L``, not ``2 · L``); with ``z = tanh(·)`` it is not a convex
  combination, and the rule must not apply (a local norm above it would show it)."""

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      a, b = jnp.tanh(2.0 * x), jnp.tanh(-3.0 * x)
      z = nn.sigmoid(x) if gate == "sigmoid" else jnp.tanh(4.0 * x)
      return ((1.0 - z) * a + z * b) * jnp.tanh(x)

  model, x = Model(), jnp.ones((1, 3))
  bound = flaxnorm.lipschitz_bound({"params": {}}, model=model, inputs=(x,))
  assert bound.reasons == {}
  assert bound.certified >= _lower(
    lambda z: model.apply({}, z), x.shape, scales=(0.2, 0.5, 1.0, 3.0)
  )
  if gate == "sigmoid":  # √(2² + 3²) + max|b − a| · ¼ = 3.61 + 0.5; then times max|tanh x| = 1, + 1
    assert bound.certified == pytest.approx(math.sqrt(13.0) + 0.5 + 1.0, rel=1e-6)


def test_a_product_of_unbounded_values_still_gets_a_reason():
  """Attention's scores, a GLU's linear half: not Lipschitz, however the spans go."""

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name="a")(x) * nn.sigmoid(nn.Dense(3, name="b")(x))

  model, x = Model(), jnp.ones((1, 3))
  bound = flaxnorm.lipschitz_bound(model.init(KEY, x), model=model, inputs=(x,))
  assert bound.certified is None
  assert "not known to stay in a bounded interval" in bound.reasons["<top level>"]


_EXPONENTS = st.sampled_from([-3, -2, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4])


@settings(max_examples=80, deadline=None)
@given(st.floats(-20, 20), st.floats(-20, 20), _EXPONENTS, st.integers(0, 2**16))
def test_power_exp_and_log_spans_and_slopes_hold_inside(a0, a1, n, seed):
  """Each value drawn inside the span maps inside the returned span, and each secant
  slope between two of them is at most the returned slope."""
  rng = np.random.default_rng(seed)
  s = _span(a0, a1)
  y = np.sort(_inside(s, rng))
  with np.errstate(all="ignore"):
    cases = [
      (_spans.power(s, n), np.power(y, n)),
      (_spans.exp(s), np.exp(y)),
      (_spans.log(s), np.log(y)),
    ]
  for found, values in cases:
    if found is None:  # refused: only where the slope is unbounded or the value not real
      continue
    slope, (lo, hi) = found
    assert np.all(np.isfinite(values))
    assert lo <= values.min() and values.max() <= hi
    apart = np.diff(y) > 1e-5 * (1 + np.abs(y[1:]))  # (closer points: rounding, not slope)
    secants = np.abs(np.diff(values)[apart] / np.diff(y)[apart])
    assert secants.max(initial=0.0) <= slope * (1 + 1e-9)


def _snake(x, alpha):
  """BigVGAN's Snake: ``x + sin²(αx) / α``, per channel."""
  return x + (1.0 / (alpha + 1e-9)) * jnp.sin(x * alpha) ** 2


class _LinenSnake(nn.Module):
  @nn.compact
  def __call__(self, x):
    alpha = self.param("alpha", lambda k, s: jax.random.uniform(k, s, minval=0.5, maxval=2.0), (4,))
    return nn.Conv(2, (3,), name="out")(_snake(nn.Conv(4, (3,), name="conv")(x), alpha))


class _NNXSnake(nnx.Module):
  def __init__(self, rngs):
    self.conv, self.out = nnx.Conv(3, 4, (3,), rngs=rngs), nnx.Conv(4, 2, (3,), rngs=rngs)
    self.alpha = nnx.Param(jax.random.uniform(rngs.params(), (4,), minval=0.5, maxval=2.0))

  def __call__(self, x):
    return self.out(_snake(self.conv(x), self.alpha[...]))


def test_snake_is_certified_in_both_faces():
  """Snake's slope ``1 + sin(2αx)`` is at most 2; the certificate takes sin²'s slope over
  sin's span, ``2 · 1``, times ``α · 1/α`` per channel (slopes per element, so the
  largest ``α`` and the largest ``1/α`` are not taken together), plus 1: 3."""
  x = jnp.ones((1, 6, 3))
  model = _LinenSnake()
  variables = model.init(KEY, x)
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,))
  alpha = np.asarray(variables["params"]["alpha"], np.float64)
  conv, out = (bound.layers[f"{k}/kernel"][1] for k in ("conv", "out"))
  assert alpha.max() / alpha.min() > 2  # (taken together, they gave 1 + 2 · that)
  assert bound.reasons == {} and bound.certified == pytest.approx(conv * 3 * out, rel=1e-5)
  assert bound.certified >= _lower(lambda z: model.apply(variables, z), x.shape)
  nnx_model = _NNXSnake(nnx.Rngs(0))
  nnx_bound = fnnx.lipschitz_bound(nnx_model, (x,))
  graph, state = nnx.split(nnx_model)
  assert nnx_bound.reasons == {} and math.isfinite(nnx_bound.certified)
  assert nnx_bound.certified >= _lower(lambda z: nnx.merge(graph, state)(z), x.shape)


@pytest.mark.parametrize(
  ("fn", "certified"),
  [
    (lambda h: jnp.exp(jnp.tanh(h)), math.e),  # exp's slope at tanh's largest value
    (lambda h: jnp.sqrt(1.5 + jnp.sin(h)), 0.5 / math.sqrt(0.5)),
    (lambda h: jnp.log(2.0 + jnp.tanh(h)), 1.0),
    (lambda h: jnp.power(jnp.tanh(h), 3), 3.0),
    (lambda h: jnp.power(jax.nn.sigmoid(h), 2.0), 0.5),  # pow by a float: 2 · 1 · 1/4
    (lambda h: jnp.tanh(h) / (2.0 + jnp.sin(h)), 2.0),  # L(a)/m + max|a| L(b)/m², m = 1
    (lambda h: 1.0 / (1.5 + jax.nn.sigmoid(h)), 0.25 / 1.5**2),
  ],
)
def test_smooth_functions_of_bounded_values_get_their_slope_over_the_span(fn, certified):
  x = jnp.ones((1, 3))
  bound = _bound_of(fn, x)
  assert bound.reasons == {} and bound.certified == pytest.approx(certified, rel=1e-6)
  assert bound.certified >= _lower(fn, x.shape, scales=(0.3, 1.0, 3.0))


def _bound_of(fn, x):
  """The certificate of a model without variables that computes ``fn``."""

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return fn(x)

  return flaxnorm.lipschitz_bound({"params": {}}, model=Model(), inputs=(x,))


@pytest.mark.parametrize(
  "fn",
  [
    jnp.exp,
    jnp.sqrt,
    lambda h: h**2,
    lambda h: jnp.log(jnp.tanh(h)),
    lambda h: 1.0 / jnp.tanh(h),  # a divisor that reaches 0
    lambda h: h / (2.0 + jnp.sin(h)),  # a numerator not bounded
  ],
)
def test_smooth_functions_without_a_bounding_span_get_a_reason(fn):
  bound = _bound_of(fn, jnp.ones((1, 3)))
  assert bound.certified is None
  assert bound.reasons["<top level>"].endswith(
    ("not known to stay in an interval where its slope is bounded", "not Lipschitz in general")
  )


def test_an_empty_value_that_depends_on_the_inputs_adds_nothing():
  """An empty slice scaled and shifted (its span rules see no element): the bound is 1."""
  bound = _bound_of(lambda h: jnp.concatenate([h, h[:, :0] * 2.0 + 1.0], -1), jnp.ones((1, 3)))
  assert bound.reasons == {} and bound.certified == pytest.approx(1.0)


@pytest.mark.parametrize("axis", [-1, 0])
def test_a_split_of_a_fused_product_bounds_each_part_by_its_block(axis):
  """``x @ [10 I, 0.1 I] + b`` split in two along the kernel's output axis: the second part
  is ``x @ 0.1 I`` (norm 0.1, where the fused kernel's is 10); split along the rows of
  ``x`` instead, each part has the fused kernel's norm."""
  fused = np.concatenate([10.0 * np.eye(3), 0.1 * np.eye(3)], axis=1).astype(np.float32)
  bias = np.arange(6, dtype=np.float32)

  def fn(h):
    return jnp.split(h @ fused + bias, 2, axis=axis)[1]

  x = jnp.ones((2, 3))
  bound = _bound_of(fn, x)
  assert bound.reasons == {}
  assert bound.certified >= _lower(fn, x.shape, scales=(1.0,))
  exact = 0.1 if axis == -1 else float(np.linalg.norm(fused.astype(np.float64), 2))
  assert bound.certified == pytest.approx(exact, rel=1e-4)


def test_a_fused_lstm_gets_the_bound_of_its_separate_gates():
  """nn.OptimizedLSTMCell computes LSTMCell's gates with one fused kernel, split after: the
  same params give the same certificate."""
  x = jnp.ones((1, 3, 2))
  plain, fused = nn.RNN(nn.LSTMCell(3)), nn.RNN(nn.OptimizedLSTMCell(3))
  variables = plain.init(KEY, x)
  chex.assert_trees_all_equal_shapes(variables, fused.init(KEY, x))
  bounds = [flaxnorm.lipschitz_bound(variables, model=m, inputs=(x,)) for m in (plain, fused)]
  assert bounds[1].certified == pytest.approx(bounds[0].certified, rel=1e-9)


def _lowpass(k: int = 12, cutoff: float = 0.25) -> np.ndarray:
  """A Kaiser-windowed sinc low-pass filter (BigVGAN's anti-aliasing), taps summing to 1."""
  t = np.arange(k) - (k - 1) / 2
  taps = 2 * cutoff * np.sinc(2 * cutoff * t) * np.kaiser(k, 5.0)
  return (taps / taps.sum()).astype(np.float32)


class _AntiAliasedSnake(nn.Module):
  """BigVGAN's activation: replicate padding, 2x upsampling and a low-pass filter,
  Snake, a low-pass filter and 2x downsampling, the padding cropped."""

  @nn.compact
  def __call__(self, x):
    c, taps = x.shape[-1], _lowpass()
    k, pad = len(taps), len(taps) // 4
    alpha = self.param(
      "alpha", lambda key, s: jax.random.uniform(key, s, minval=0.5, maxval=2), (c,)
    )
    kernel, dn = jnp.asarray(np.tile(taps[:, None, None], (1, 1, c))), ("NWC", "WIO", "NWC")
    x = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)), mode="edge")
    up = jax.lax.conv_general_dilated(
      x, 2.0 * kernel, (1,), [(k // 2, k // 2)], (2,), None, dn, feature_group_count=c
    )
    down = jax.lax.conv_general_dilated(
      _snake(up, alpha), kernel, (2,), "SAME", None, None, dn, feature_group_count=c
    )
    return down[:, pad:-pad]


class _AMPBlock(nn.Module):
  """BigVGAN's residual block: anti-aliased Snake and weight-normed dilated convs."""

  @nn.compact
  def __call__(self, x):
    for d in (1, 3):
      h = flaxnorm.weight_norm(nn.Conv(x.shape[-1], (3,), kernel_dilation=d))(
        _AntiAliasedSnake()(x)
      )
      x = x + flaxnorm.weight_norm(nn.Conv(x.shape[-1], (3,)))(_AntiAliasedSnake()(h))
    return x


def test_a_bigvgan_amp_block_is_certified():
  """Filters and padding are known constants, Snake a power of a bounded value: the whole
  block gets a certificate, above its local norms."""
  model, x = _AMPBlock(), jnp.ones((1, 16, 4))
  variables = model.init(KEY, x)
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,))
  assert bound.reasons == {} and math.isfinite(bound.certified)
  assert bound.certified >= _lower(lambda z: model.apply(variables, z), x.shape, n=3)


def test_a_split_of_a_fused_product_with_the_matrix_first_or_batched():
  """``C @ x`` split along ``C``'s rows, and a batched product split along its output axis:
  each part is bounded by its own block (the largest over the batch)."""
  fused = np.concatenate([10.0 * np.eye(3), 0.1 * np.eye(3)], axis=1).astype(np.float32)
  batched = np.stack([fused, np.concatenate([np.eye(3), 0.5 * np.eye(3)], axis=1)])

  def first(h):
    return jnp.split(fused.T @ h.T, 2, axis=0)[1]

  def per_batch(h):
    return jnp.split(jnp.einsum("bij,bjk->bik", h.reshape(2, 1, 3), batched), 2, axis=-1)[1]

  for fn, exact in ((first, 0.1), (per_batch, 0.5)):
    x = jnp.ones((2, 3))
    bound = _bound_of(fn, x)
    assert bound.reasons == {}
    assert bound.certified >= _lower(fn, x.shape, scales=(1.0,))
    assert bound.certified == pytest.approx(exact, rel=1e-4)


def test_a_layer_called_on_a_key_held_fixed_is_not_a_span():
  """A layer's known input gives its span; a PRNG key has none (and is no error)."""

  class Noisy(nn.Module):
    @nn.compact
    def __call__(self, key):
      return jax.random.normal(key, (3,))

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x, key):
      return jnp.tanh(x) * Noisy()(key)

  x = jnp.ones((1, 3))
  bound = flaxnorm.lipschitz_bound({"params": {}}, model=Model(), inputs=(x, jax.random.key(0)))
  assert bound.certified is None and bound.reasons  # a scale by noise not known here
  assert _spans.of_array(jax.random.key(0)) == _spans.ANY
