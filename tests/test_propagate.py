"""The certificate carried through what the model computes between its layers.

Every bound here is checked against the exact Lipschitz constant (a dense Jacobian's
largest singular value, on linear models) or against local Jacobian norms at many
points (a lower bound of the constant, on nonlinear ones): a certificate below
either is wrong.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import flaxnorm

KEY = jax.random.key(0)


def _local_norm(model, variables, x) -> float:
  """The largest local Jacobian norm of ``model`` over the examples around ``x``'s rows."""
  shape = x.shape[1:]

  def f(z):
    return model.apply(variables, z.reshape(1, *shape)).ravel()

  norms = [np.linalg.norm(np.asarray(jax.jacfwd(f)(row.ravel()), np.float64), 2) for row in x]
  return max(norms)


def _bound(model, variables, x):
  return flaxnorm.lipschitz_bound(variables, model=model, inputs=(x,))


def _scaled_eye(n: int, b: float) -> dict:
  return {"kernel": b * jnp.eye(n)}


class _Residual(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x + nn.Dense(3, use_bias=False, name="d")(x)


def test_a_residual_block_gets_one_plus_its_bound():
  """x + d(x) with d = 0.5 I has norm 1.5; the product of layer bounds certified 0.5."""
  variables = {"params": {"d": _scaled_eye(3, 0.5)}}
  x = jnp.ones((1, 3))
  bound = _bound(_Residual(), variables, x)
  assert _local_norm(_Residual(), variables, x) == pytest.approx(1.5)
  assert bound.reasons == {} and 1.5 <= bound.certified <= 1.5 * 1.001


class _Branches(nn.Module):
  how: str = "concat"

  @nn.compact
  def __call__(self, x):
    a, b = nn.Dense(3, name="a")(x), nn.Dense(3, name="b")(x)
    if self.how == "concat":
      return jnp.concatenate([a, b], -1)
    if self.how == "max":
      return jnp.maximum(a, b)
    return a * b


def test_parallel_branches_side_by_side():
  """concat(a(x), b(x)) with a = b = I: norm √2, where a product of layers gave 1."""
  variables = {"params": {k: {**_scaled_eye(3, 1.0), "bias": jnp.zeros(3)} for k in "ab"}}
  x = jnp.ones((1, 3))
  for how in ("concat", "max"):
    bound = _bound(_Branches(how), variables, x)
    assert bound.reasons == {}
    assert bound.certified == pytest.approx(np.sqrt(2.0), rel=1e-6)
    assert bound.certified >= _local_norm(_Branches(how), variables, x) - 1e-6


def test_a_product_of_two_branches_gets_a_reason():
  model, x = _Branches("product"), jnp.ones((1, 3))
  bound = _bound(model, model.init(KEY, x), x)
  assert bound.certified is None
  assert "mul of two values that depend on the inputs" in bound.reasons["<top level>"]


@pytest.mark.parametrize(
  ("between", "factor"),
  [
    (lambda h: 2.0 * h, 2.0),
    (lambda h: h / 4.0, 0.25),
    (lambda h: -h, 1.0),
    (lambda h: h * np.array([1.0, -3.0, 0.5], np.float32), 3.0),  # a traced constant
    (nn.relu, 1.0),
    (nn.leaky_relu, 1.0),  # a select of x and 0.01 x: slope 1, not √(1 + 0.01²)
    (lambda h: jnp.maximum(h, 0.2 * h), 1.0),  # the same, as a max
    (nn.sigmoid, 0.25),
    (nn.silu, 1.0999),
    (nn.softplus, 1.0),
    (lambda h: jnp.sort(h, axis=-1), 1.0),  # GroupSort (one group): sorting is 1-Lipschitz
    (nn.gelu, 1.13),  # inlined by JAX: found by its program
    (lambda h: nn.gelu(h, approximate=False), 1.13),
    (nn.softmax, 0.5),
    (lambda h: jax.nn.softmax(h[:, :, None] * np.ones(2, np.float32), axis=1).mean(-1), 0.5),
    (nn.log_softmax, math.sqrt(3.0)),  # jitted by JAX: found by its program inside the jit
    (
      lambda h: jax.nn.log_softmax(h[:, :, None] * np.ones(2, np.float32), axis=1).mean(-1),
      math.sqrt(3.0),
    ),
  ],
  ids=[
    "times2",
    "div4",
    "neg",
    "const",
    "relu",
    "leaky",
    "leaky-max",
    "sigmoid",
    "silu",
    "softplus",
    "groupsort",
    "gelu",
    "gelu-erf",
    "softmax",
    "softmax-axis",
    "log-softmax",
    "log-softmax-axis",
  ],
)
def test_what_the_model_computes_between_layers_counts(between, factor):
  """Scalings and activations between two identity layers give their own factor."""
  model = nn.Sequential([nn.Dense(3, use_bias=False), between, nn.Dense(3, use_bias=False)])
  variables = {"params": {f"layers_{i}": _scaled_eye(3, 1.0) for i in (0, 2)}}
  x = jnp.ones((1, 3))
  bound = _bound(model, variables, x)
  assert bound.reasons == {}
  assert bound.certified == pytest.approx(factor, rel=1e-5)
  points = jax.random.normal(KEY, (64, 3)) * 3.0
  assert bound.certified >= _local_norm(model, variables, points) - 1e-6


@pytest.mark.parametrize("name", ["silu", "selu", "hard_silu", "soft_sign", "log_sigmoid", "elu"])
def test_the_activation_table_bounds_each_slope(name):
  """Each slope in the table is at least the activation's largest derivative on a fine grid."""
  from flaxnorm import _propagate

  f = getattr(jax.nn, name)
  grid = jnp.linspace(-12.0, 12.0, 200_001)
  slopes = jnp.abs(jax.vmap(jax.grad(f))(grid))
  assert float(slopes.max()) <= _propagate._ACTIVATIONS[name]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("approximate", [True, False])
def test_the_gelu_slope_bounds_both_forms_with_their_rounded_constants(approximate, dtype):
  """GELU's slope on a fine grid (float64), computed with the constants its program holds
  in ``dtype`` (bfloat16 rounds the tanh form's: its peak rises to 1.129032)."""
  from flaxnorm import _inline

  x = jax.ShapeDtypeStruct((3,), dtype)
  program = jax.make_jaxpr(lambda h: jax.nn.gelu(h, approximate=approximate))(x).jaxpr
  literals = [float(v.val) for e in program.eqns for v in e.invars if hasattr(v, "val")]
  assert _inline.found(program)
  t = np.linspace(-12.0, 12.0, 2_400_001)
  if approximate:  # 0.5·x·(1 + tanh(c·(x + a·x³)))
    a, c, half = (v for v in literals if v != 1.0)
    u = np.tanh(c * (t + a * t**3))
    slope = half * (1 + u) + half * t * (1 - u**2) * c * (1 + 3 * a * t**2)
  else:  # 0.5·x·erfc(−k·x)
    half, k = literals
    erfc = np.vectorize(math.erfc)(-k * t)
    slope = half * erfc + half * t * (2 * k / math.sqrt(math.pi)) * np.exp(-((k * t) ** 2))
  assert 1.1289 < np.abs(slope).max() <= _inline._GELU_SLOPE


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 6), st.floats(0.1, 30.0), st.integers(0, 2**16))
def test_softmax_jacobians_are_within_one_half(n, scale, seed):
  """``diag(p) − p pᵀ``: at most 1/2 (reached when two probabilities are 1/2)."""
  x = scale * jax.random.normal(jax.random.key(seed), (n,))
  jac = np.asarray(jax.jacfwd(jax.nn.softmax)(x), np.float64)
  assert np.linalg.norm(jac, 2) <= 0.5 + 1e-6
  half = jnp.array([0.0, 0.0] + [-50.0] * (n - 2))
  assert np.linalg.norm(np.asarray(jax.jacfwd(jax.nn.softmax)(half)), 2) == pytest.approx(0.5)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.floats(0.1, 30.0), st.integers(0, 2**16))
def test_log_softmax_jacobians_are_within_root_n(n, scale, seed):
  """``I − 1 pᵀ``: at most ``√n``, approached as ``p`` nears a one-hot vector."""
  from flaxnorm import _inline

  x = scale * jax.random.normal(jax.random.key(seed), (n,))
  jac = np.asarray(jax.jacfwd(jax.nn.log_softmax)(x), np.float64)
  assert np.linalg.norm(jac, 2) <= _inline._root_up(n) * (1 + 1e-6)
  if n > 1:
    one_hot = jnp.array([60.0] + [0.0] * (n - 1))
    jac = np.asarray(jax.jacfwd(jax.nn.log_softmax)(one_hot), np.float64)
    assert np.linalg.norm(jac, 2) == pytest.approx(math.sqrt(n), rel=1e-6)


@pytest.mark.parametrize(
  "fn",
  [
    lambda h: 0.5 * h * (1 + jnp.tanh(0.8 * (h + 0.044715 * h**3))),  # not jax.nn's constants
    lambda h: h * jax.nn.sigmoid(1.702 * h),  # GELU's sigmoid form: a product
    lambda h: jax.nn.softmax(h, where=jnp.array([True, True, False])),
    lambda h: jax.nn.softmax(2.0 * jax.nn.gelu(h)) * jax.nn.gelu(h),
    lambda h: jax.nn.log_softmax(h, where=jnp.array([True, True, False])),
    lambda h: h - jnp.log(jnp.sum(jnp.exp(h), axis=-1, keepdims=True)),  # by hand: exp, log
  ],
  ids=[
    "tanh-other-constants",
    "sigmoid-form",
    "softmax-where",
    "product-of-found",
    "log-softmax-where",
    "log-softmax-by-hand",
  ],
)
def test_only_jax_nn_programs_are_taken_for_gelu_and_softmax(fn):
  """Near misses are followed primitive by primitive, and refused there."""
  model = nn.Sequential([nn.Dense(3, use_bias=False), fn])
  bound = _bound(model, {"params": {"layers_0": _scaled_eye(3, 1.0)}}, jnp.ones((1, 3)))
  assert bound.certified is None
  assert bound.reasons["<top level>"].startswith(
    ("mul of two", "div by a value", "no Lipschitz rule for log", "no Lipschitz rule for exp")
  )


def test_a_jit_named_like_an_activation_is_not_trusted():
  """Only jax.nn's own program counts as that activation: another named 'silu' is followed."""

  @jax.jit
  def silu(h):  # not jax.nn.silu: slope 5
    return 5.0 * h

  model = nn.Sequential([nn.Dense(3, use_bias=False), silu])
  variables = {"params": {"layers_0": _scaled_eye(3, 1.0)}}
  assert _bound(model, variables, jnp.ones((1, 3))).certified == pytest.approx(5.0)


@pytest.mark.parametrize(
  ("pool", "factor"),
  [
    (lambda h: nn.avg_pool(h, (2, 2), (2, 2)), 0.5),  # disjoint windows of 4: 1/2
    (lambda h: nn.max_pool(h, (2, 2), (2, 2)), 1.0),
    (lambda h: nn.max_pool(h, (3, 3), (1, 1), "SAME"), 3.0),  # an element in 9 windows
    (lambda h: nn.avg_pool(h, (3, 3), (1, 1), "SAME"), 1.0),
  ],
  ids=["avg2", "max2", "max3-overlap", "avg3-overlap"],
)
def test_pools(pool, factor):
  """Overlapping max pools are not 1-Lipschitz: a spike moves every window it is in."""
  model = nn.Sequential([nn.Conv(1, (1, 1), use_bias=False), pool])
  variables = {"params": {"layers_0": {"kernel": jnp.ones((1, 1, 1, 1))}}}
  x = jnp.zeros((1, 6, 6, 1)).at[0, 2, 2, 0].set(1.0)  # the spike
  bound = _bound(model, variables, x)
  assert bound.reasons == {}
  assert bound.certified == pytest.approx(factor, rel=1e-5)
  points = jnp.concatenate([x, jax.random.normal(KEY, (8, 6, 6, 1))])
  assert bound.certified >= _local_norm(model, variables, points) - 1e-6


class _Rnn(nn.Module):
  """nn.RNN over the whole sequence: h' = tanh(W_i x + W_h h + b), every step returned."""

  @nn.compact
  def __call__(self, x):
    return nn.RNN(nn.SimpleCell(3), name="rnn")(x)


def test_an_rnn_returning_its_sequence_is_certified():
  """Each step adds its input's layer to its state's: a sum the product never bounded."""
  model, x = _Rnn(), jnp.ones((1, 4, 2))
  variables = model.init(KEY, x)
  bound = _bound(model, variables, x)
  assert bound.reasons == {} and bound.certified is not None
  points = jax.random.normal(KEY, (8, 4, 2))
  assert bound.certified >= _local_norm(model, variables, points)


@pytest.mark.parametrize(
  ("between", "why"),
  [
    (lambda h: h / jnp.linalg.norm(h), "div by a value that depends"),
    (lambda h: jnp.exp(h), "no Lipschitz rule for exp"),
    (lambda h: h**2, "no Lipschitz rule for integer_pow"),
    (lambda h: jnp.take_along_axis(h, jnp.argsort(h), -1), "gather at indices"),
    (lambda h: jax.lax.sort((h, 2.0 * h), num_keys=1)[1], "sort that moves values"),
    (lambda h: h * jnp.sum(jnp.ones(3) * 2.0) ** 3, None),  # a constant, folded: 216
    (lambda h: (h > 0).astype(h.dtype), "jumps"),
  ],
  ids=["normalize", "exp", "square", "argsort", "sort-carried", "folded", "step"],
)
def test_what_no_rule_bounds_gets_a_reason(between, why):
  model = nn.Sequential([nn.Dense(3, use_bias=False), between])
  x = jnp.ones((1, 3))
  bound = _bound(model, {"params": {"layers_0": _scaled_eye(3, 1.0)}}, x)
  if why is None:
    assert bound.certified == pytest.approx(216.0)
  else:
    assert bound.certified is None and why in bound.reasons["<top level>"]


class _Noisy(nn.Module):
  @nn.compact
  def __call__(self, x, key):
    return nn.Dense(3)(x) * jax.random.uniform(key, (), minval=0.0, maxval=4.0)


def test_a_scale_the_model_computes_gets_a_reason():
  """A scale drawn from a key (held fixed, but unknown here) could be anything."""
  model, x = _Noisy(), jnp.ones((1, 3))
  variables = model.init(KEY, x, KEY)
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x, KEY))
  assert bound.certified is None
  assert "multiplies by a value it computes" in bound.reasons["<top level>"]


class _CountedLoop(nn.Module):
  """``factor`` times the input, ``n`` times: a while loop on a counter."""

  factor: float

  @nn.compact
  def __call__(self, x, n):
    h = nn.Dense(3, use_bias=False, name="d")(x)
    body = lambda c: (c[0] * self.factor, c[1] + 1)
    return jax.lax.while_loop(lambda c: c[1] < n, body, (h, 0))[0]


def test_a_while_loop_on_a_known_counter_is_walked_for_its_trip_count():
  """The condition reads only known values: each step is walked (halving 3 times: 1/8;
  doubling: 8, where a loop of unknown trip count that grows gets a reason)."""
  variables = {"params": {"d": _scaled_eye(3, 1.0)}}
  x = jnp.ones((1, 3))
  for factor, true in ((0.5, 0.125), (2.0, 8.0)):
    bound = flaxnorm.lipschitz_bound(variables, model=_CountedLoop(factor), inputs=(x, 3))
    assert bound.reasons == {} and bound.certified == pytest.approx(true)


def test_a_while_loop_of_unknown_trip_count_is_bounded_when_it_does_not_grow():
  """The counter's limit an integer input without a value: at most the identity whatever
  the trip count when halving; a doubling loop gets a reason."""
  variables = {"params": {"d": _scaled_eye(3, 1.0)}}
  x, n = jnp.ones((1, 3)), jax.ShapeDtypeStruct((), jnp.int32)
  halves = flaxnorm.lipschitz_bound(variables, model=_CountedLoop(0.5), inputs=(x, n))
  assert halves.certified == pytest.approx(1.0)
  grows = flaxnorm.lipschitz_bound(variables, model=_CountedLoop(2.0), inputs=(x, n))
  assert grows.certified is None and "grows" in grows.reasons["<top level>"]


_STAIRS = np.stack([np.diag([4.0, 1.0]), np.diag([0.25, 1.0]), 2 * np.eye(2)]).astype(np.float32)


class _WhileStack(nn.Module):
  """A while loop indexing a known stack with its counter."""

  @nn.compact
  def __call__(self, x):
    stack = jnp.asarray(_STAIRS)
    body = lambda c: (c[0] + 1, c[1] @ stack[c[0]])
    return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]


def test_a_while_loop_indexing_a_known_stack_reads_each_steps_matrix():
  """4 · 1 · 2 (the product of the steps' norms); the matrices were unknown before."""
  x = jnp.ones((1, 2))
  bound = _bound(_WhileStack(), {}, x)
  assert bound.reasons == {} and 8.0 <= bound.certified <= 8.0 * 1.0001
  assert bound.certified >= _local_norm(_WhileStack(), {}, x)


_BLOCKS = st.lists(
  st.sampled_from(
    [
      "dense",
      "residual",
      "concat",
      "double",
      "relu",
      "tanh",
      "pool",
      "leaky",
      "log_softmax",
      "fori_stack",
      "gated",
      "mix",
      "snake",
      "ratio",
    ]
  ),
  min_size=1,
  max_size=4,
)


class _Random(nn.Module):
  """A small model made of random blocks (for the fuzz below)."""

  blocks: tuple[str, ...]

  @nn.compact
  def __call__(self, x):
    for k, b in enumerate(self.blocks):
      n = x.shape[-1]
      if b == "dense":
        x = nn.Dense(n)(x)
      elif b == "residual":
        x = x + nn.Dense(n)(nn.relu(nn.Dense(n)(x)))
      elif b == "concat":
        x = jnp.concatenate([nn.Dense(2)(x), nn.Dense(2)(x)], -1)
      elif b == "double":
        x = 2.0 * x
      elif b == "pool":
        x = nn.max_pool(x[..., None], (2,), (1,), "SAME")[..., 0]
      elif b == "log_softmax":
        x = nn.log_softmax(x)
      elif b == "gated":  # a product of two bounded values (test_spans.py)
        x = jnp.tanh(nn.Dense(n)(x)) * nn.sigmoid(nn.Dense(n)(x))
      elif b == "ratio":  # a division by a value kept away from 0
        x = jnp.tanh(x) / (2.0 + jnp.sin(x))
      elif b == "snake":  # BigVGAN's activation: a power of a bounded value
        x = x + jnp.sin(1.5 * x) ** 2 / 1.5
      elif b == "mix":  # a GRU's convex update
        z = nn.sigmoid(nn.Dense(n)(x))
        x = (1.0 - z) * jnp.tanh(nn.Dense(n)(x)) + z * jnp.tanh(x)
      elif b == "fori_stack":  # a counter indexing a stack of params
        stack = self.param(f"stack_{k}", nn.initializers.normal(1.0), (2, n, n))
        x = jax.lax.fori_loop(0, 2, lambda i, h: jnp.tanh(h @ stack[i]), x)
      else:
        x = {"relu": nn.relu, "tanh": jnp.tanh, "leaky": nn.leaky_relu}[b](x)
    return nn.Dense(2)(x)


@settings(max_examples=12, deadline=None)
@given(_BLOCKS, st.integers(0, 2**16))
def test_random_models_are_never_certified_below_a_local_norm(blocks, seed):
  model, x = _Random(tuple(blocks)), jnp.ones((1, 4))
  variables = model.init(jax.random.key(seed), x)
  bound = _bound(model, variables, x)
  assert bound.reasons == {}
  points = jax.random.normal(jax.random.key(seed + 1), (16, 4)) * 2.0
  assert bound.certified >= _local_norm(model, variables, points) - 1e-5


def _between(fn, n: int = 4):
  """An identity layer, then ``fn``: the certificate bounds ``fn``'s constant."""

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return fn(nn.Dense(n, use_bias=False, name="d")(x))

  return Model(), {"params": {"d": _scaled_eye(n, 1.0)}}, jnp.ones((1, n))


def _lower(model, variables, x, extra=()) -> float:
  """The largest local Jacobian norm (real and imaginary parts as outputs) at x,
  random points and ``extra`` points."""

  def f(z):
    outs = jax.tree.leaves(model.apply(variables, z.reshape(x.shape)))
    return jnp.concatenate([jnp.ravel(part(o)) for o in outs for part in (jnp.real, jnp.imag)])

  points = [x.ravel(), *jax.random.normal(KEY, (8, x.size)), *extra]
  try:
    return max(float(np.linalg.norm(np.asarray(jax.jacfwd(f)(p)), 2)) for p in points)
  except (NotImplementedError, ValueError):  # no JVP (reduce_window, scatter-apply): linear
    basis = np.eye(x.size, dtype=np.float32)
    columns = [np.asarray(f(jnp.asarray(e)) - f(jnp.zeros(x.size))) for e in basis]
    return float(np.linalg.norm(np.stack(columns, 1), 2))


_MASK = jnp.array([[True, False, False, False]])
_GATHER = jax.lax.GatherDimensionNumbers(
  offset_dims=(1,), collapsed_slice_dims=(), start_index_map=(0,)
)


def _cond_in_scan(h):
  def body(c, t):
    a, b, s = t
    return c, jax.lax.cond(s == 0, lambda: a, lambda: b)  # y = [x0, x2, x2, x0]

  return jax.lax.scan(body, 0.0, (h[0], h[0][::-1], jnp.array([0, 1, 0, 1])))[1]


def _while_in_scan(h):
  def body(c, t):
    swap = lambda s: (s[1], s[0], s[2] - 1)
    return c, jax.lax.while_loop(lambda s: s[2] > 0, swap, t)[0]

  return jax.lax.scan(body, 0.0, (h[0], h[0][::-1], jnp.array([0, 1, 0, 1])))[1]


@pytest.mark.parametrize(
  ("fn", "true"),
  [
    (lambda h: h * (0.001 + 10j), 10.0),  # |c| of a complex constant, not its real part
    (lambda h: jax.lax.reduce(h, 0.0, jnp.add, (1,)), 2.0),  # a reducer is no call
    (lambda h: jax.lax.reduce_window(h, 0.0, jnp.add, (1, 4), (1, 1), "SAME"), 3.14),
    (lambda h: h.at[:, 0].apply(lambda t: 100 * t), 100.0),  # a scatter with a combiner
    (  # a cond's output is not tanh(y) because one branch is
      lambda h: jnp.where(
        _MASK,
        jax.lax.switch(jnp.array(1), [jnp.tanh, lambda z: z[:, ::-1]], jnp.tanh(h)),
        jnp.tanh(jnp.tanh(h)),
      ),
      1.23,
    ),
    (_cond_in_scan, 1.414),  # branches chosen per step: no one step's map
    (_while_in_scan, 1.414),
    (
      lambda h: jax.lax.gather(h[0], jnp.array([[0], [1]]), _GATHER, (3,), unique_indices=True),
      1.414,
    ),
  ],
  ids=[
    "complex",
    "reduce",
    "reduce-window",
    "scatter-apply",
    "cond-origin",
    "cond-in-scan",
    "while-in-scan",
    "gather-overlap",
  ],
)
def test_certificates_a_review_found_below_the_constant(fn, true):
  """Each was certified 1.0 (0.001 for the complex scale), below its true constant; now it
  is bounded soundly or refused."""
  model, variables, x = _between(fn)
  bound = _bound(model, variables, x)
  assert _lower(model, variables, x, [jnp.zeros(4)]) >= true - 0.01
  if bound.certified is None:
    assert bound.reasons
  else:
    assert bound.certified >= _lower(model, variables, x, [jnp.zeros(4)])


def test_a_complex_slope_is_refused():
  """tanh, sin and the table's slopes hold on the real line only: sin(3i h) has slope
  3 cosh(3h), unbounded; it was certified 3."""
  model, variables, x = _between(lambda h: jnp.sin(3j * h))
  bound = _bound(model, variables, x)
  assert bound.certified is None and "complex" in bound.reasons["<top level>"]


@pytest.mark.parametrize(
  ("fn", "true"),
  [
    (lambda h: nn.leaky_relu(h, negative_slope=0.2), 1.0),  # a slope passed into the jit
    (lambda h: nn.elu(h, 1.0), 1.0),
    (lambda h: nn.elu(h, 3.0), 3.0),  # its slope below 0 approaches alpha
    (lambda h: nn.celu(h, 0.5), 1.0),
    (lambda h: jax.lax.scan(lambda c, t: (c, t * np.float32([1, -2, 0.5, 3])), 0.0, h)[1], 3.0),
    (lambda h: jnp.split(h, 2, axis=-1)[1], 1.0),  # split
    (lambda h: h[:, jnp.array([2, 0, 1, 3])], 1.0),  # a permutation with constant indices
    (lambda h: h[:, jnp.array([0, 0, 1])], 1.414),  # one element twice: √2
    (lambda h: jnp.pad(h, ((0, 0), (4, 4))), 1.0),  # zeros around: unchanged
    (lambda h: jax.lax.stop_gradient(h), 1.0),
    (jax.nn.mish, 1.089),
  ],
  ids=[
    "leaky-slope",
    "elu-1",
    "elu-3",
    "celu",
    "scan-constant",
    "split",
    "permutation",
    "repeat",
    "pad",
    "stop-gradient",
    "mish",
  ],
)
def test_what_a_review_found_refused_or_loose_is_bounded(fn, true):
  """Refused before (a constant passed into a jit or scan was unknown there; split and a
  gather with known indices had no rule) or loose (padding grew the operand: √3)."""
  model, variables, x = _between(fn)
  bound = _bound(model, variables, x)
  assert bound.reasons == {}
  assert bound.certified == pytest.approx(true, rel=1e-3)
  assert bound.certified >= _lower(model, variables, x) - 1e-6


def test_a_model_without_params_is_certified():
  """model.init gives {} for a model without params: it raised 'needs params'."""
  model, x = nn.Sequential([nn.relu, lambda h: nn.max_pool(h, (2,), (2,))]), jnp.ones((1, 4, 1))
  bound = flaxnorm.lipschitz_bound(model.init(KEY, x), model=model, inputs=(x,))
  assert bound.reasons == {} and bound.certified == 1.0


class _SharedScope(nn.Module):
  """A normalized Dense sharing its container's scope: their calls share one path."""

  def setup(self):
    self.d = flaxnorm.spectral_norm(nn.Dense(4))
    nn.share_scope(self, self.d)

  def __call__(self, x):
    return 10.0 * self.d(x)


def test_a_layer_sharing_its_containers_scope_does_not_bound_the_container():
  """The container's output took the Dense's bound: 10 d(x) was certified at ||d|| = 1."""
  model, x = _SharedScope(), jnp.ones((1, 4))
  variables = model.init(KEY, x)
  bound = _bound(model, variables, x)
  lower = _lower(model, variables, x)
  assert lower > 9.0
  assert bound.certified is None or bound.certified >= lower


class _TwoBatches(nn.Module):
  @nn.compact
  def __call__(self, x):
    d = nn.Dense(4, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None,)))
    c = nn.Conv(2, (3,), padding="SAME")
    return c(d(x)[:, :, None]).sum(axis=(1, 2)), c(jnp.concatenate([d(x), d(x)], 0)[:, :, None])


def test_layers_on_two_batch_sizes_and_partitioned_kernels_are_certified():
  """A Dense on batches 1 and 2, a Conv on two batch sizes of one spatial size: it raised
  'a certificate covers one size per layer'; a with_partitioning kernel got a
  stacked-params reason."""
  model, x = _TwoBatches(), jnp.ones((1, 4))
  variables = model.init(KEY, x)
  bound = _bound(model, variables, x)
  assert bound.reasons == {}
  assert bound.certified >= _lower(model, variables, x)


@pytest.mark.parametrize(
  ("fn", "true"),
  [
    (lambda h: jnp.stack([h, 2.0 * h]), np.sqrt(5.0)),
    (lambda h: jnp.unstack(h, axis=1)[0], 1.0),
    (lambda h: jnp.tile(h, (1, 3)), np.sqrt(3.0)),
    (lambda h: h @ np.float32([[3.0, 0], [0, 1], [0, 0], [0, 0]]), 3.0),  # a constant matrix
    (lambda h: jax.image.resize(h, (1, 8), "bilinear"), 1.45),  # an interpolation matrix
  ],
  ids=["stack", "unstack", "tile", "matmul-constant", "resize"],
)
def test_stacks_tiles_and_constant_matrices(fn, true):
  model, variables, x = _between(fn)
  bound = _bound(model, variables, x)
  assert bound.reasons == {}
  assert bound.certified >= _lower(model, variables, x) - 1e-6
  assert bound.certified == pytest.approx(true, rel=0.05)


class _Reversed(nn.Module):
  @nn.compact
  def __call__(self, xs, lengths):
    return nn.RNN(nn.SimpleCell(3), reverse=True, keep_order=True)(xs, seq_lengths=lengths)


def test_an_integer_input_is_a_known_value():
  """seq_lengths pick the elements to reverse: a gather at indices from an integer input,
  which is held fixed, so known (it was refused: indices not known)."""
  model, xs, lengths = _Reversed(), jax.random.normal(KEY, (1, 5, 3)), jnp.array([3])
  variables = model.init(KEY, xs, lengths)
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(xs, lengths))
  assert bound.reasons == {}

  def f(z):
    return model.apply(variables, z.reshape(xs.shape), lengths).ravel()

  points = [xs.ravel(), *jax.random.normal(KEY, (8, xs.size))]
  assert bound.certified >= max(np.linalg.norm(np.asarray(jax.jacfwd(f)(p)), 2) for p in points)


class _Permuted(nn.Module):
  """Two elementwise functions of g, each moved by a broadcast_in_dim that permutes axes."""

  @nn.compact
  def __call__(self, g):
    g = g[0]
    a = jax.lax.broadcast_in_dim(jnp.tanh(g), (3, 2, 3), (1, 0, 2))  # a[i,j,k] = tanh g[j,i,k]
    b = jax.lax.broadcast_in_dim(2.0 * g, (3, 2, 3), (1, 2, 0))  # b[i,j,k] = 2 g[j,k,i]
    return jnp.maximum(a, b)


def test_a_permuting_broadcast_is_no_elementwise_function():
  """The max took the larger slope, 2, as for functions of one value elementwise: one
  element of g feeds two outputs, √(1 + 4)."""
  model, x = _Permuted(), jnp.zeros((1, 2, 3, 3))
  bound = flaxnorm.lipschitz_bound({}, model=model, inputs=(x,))
  assert bound.certified >= _lower(model, {}, x) - 1e-6
  assert bound.certified == pytest.approx(np.sqrt(5.0))


def test_a_long_scan_is_bounded_by_a_step_once_its_bound_stops_growing():
  """10,000 steps of 0.9999 h: followed one by one for 4096 steps, then bounded by the
  step that grew nothing (0.9999^4097, above the true 0.9999^10000)."""
  model, variables, x = _between(
    lambda h: jax.lax.scan(lambda c, _: (0.9999 * c, None), h, length=10_000)[0]
  )
  bound = _bound(model, variables, x)
  assert 0.9999**10_000 <= bound.certified == pytest.approx(0.9999**4097, rel=1e-3)


_NWC = ("NWC", "WIO", "NWC")
_BLUR = np.float32([1, 3, 3, 1]).reshape(4, 1, 1) / 8


@pytest.mark.parametrize(
  ("fn", "true"),
  [
    (lambda h: jax.lax.conv_general_dilated(h[..., None], _BLUR, (1,), "SAME", dimension_numbers=_NWC), 0.955),
    (lambda h: jax.lax.conv_general_dilated(h[..., None], _BLUR, (2,), "SAME", dimension_numbers=_NWC), 0.678),
    (lambda h: jax.lax.conv_transpose(h[..., None], np.float32([1, 2, 1])[:, None, None], (2,), "SAME", dimension_numbers=_NWC), 2.804),
    (lambda h: jnp.convolve(h[0], jnp.ones(3)), 2.89),  # a kernel folded from constants
    (lambda h: jax.lax.conv_general_dilated(h[:, None], np.ones((1, 1, 3), np.float32), (1,), ((-1, 0),)), 2.767),
    (lambda h: jax.lax.conv_general_dilated(h.reshape(1, 4, 2), np.ones((2, 1, 2), np.float32), (1,), "SAME", dimension_numbers=_NWC, feature_group_count=2), 1.879),
  ],
  ids=["blur", "blur-stride-2", "upsample", "convolve", "crop", "depthwise"],
)  # fmt: skip
def test_convolutions_with_known_kernels_are_bounded(fn, true):
  """A blur, an anti-aliased downsampling, a transposed conv (bounded through its phases:
  4 on the dilated input), jnp.convolve, negative padding, groups: each within 10% of
  the exact norm, never below it; they were refused as convolutions outside the layers."""
  model, variables, x = _between(fn, 8)
  bound = _bound(model, variables, x)
  exact = _lower(model, variables, x)
  assert bound.reasons == {} and exact == pytest.approx(true, rel=1e-3)
  assert exact - 1e-6 <= bound.certified <= 1.1 * exact


@pytest.mark.parametrize(
  ("fn", "true"),
  [
    (lambda h: jnp.cumsum(h, -1), 5.419),  # 1 / (2 sin(π / 34)): exact
    (lambda h: jax.lax.cumsum(h, 1, reverse=True), 5.419),
    (lambda h: jax.lax.cummax(h, 1), 2.829),  # √8: x0 the largest moves all 8
    (lambda h: jax.lax.cumlogsumexp(h, 1), 2.829),
    (lambda h: jax.ops.segment_sum(h[0], jnp.array([0, 0, 0, 1, 1, 2, 2, 2]), 3), 1.732),
    (lambda h: h.at[:, jnp.array([0, 0, 1])].add(h[:, :3]), 2.415),  # 1 + √2
    (lambda h: h.at[:, jnp.array([0, 0, 1])].add(-h[:, :3], mode="clip"), 2.415),
    (lambda h: jax.ops.segment_max(h[0], jnp.array([0, 0, 0, 1, 1, 2, 2, 2]), 3), 1.0),
    (lambda h: h.at[:, jnp.array([1, 2])].max(3.0 * h[:, 6:]), 3.163),  # √(1 + 3²)
  ],
  ids=["cumsum", "cumsum-reverse", "cummax", "cumlogsumexp", "segment-sum", "add-at", "add-clip", "segment-max", "max-at"],
)  # fmt: skip
def test_running_sums_and_scatters_at_known_indices_are_bounded(fn, true):
  """Running sums (the ones matrix's exact norm), running maxima, segment sums and
  ``.at[].add`` / ``.max`` at known indices: they had no rule."""
  model, variables, x = _between(fn, 8)
  bound = _bound(model, variables, x)
  assert bound.reasons == {}
  assert bound.certified == pytest.approx(true, rel=1e-3)
  assert bound.certified >= _lower(model, variables, x) - 1e-6


@pytest.mark.parametrize(
  ("fn", "why"),
  [
    (lambda h: jax.lax.conv_general_dilated(h[:, None], h[:, None, :3], (1,), "VALID"), "kernel that depends"),
    (lambda h: jnp.zeros(3).at[jnp.argmax(h)].add(h[0, 0]), "indices computed from the inputs"),
    (lambda h: jax.lax.conv_general_dilated(h[:, None], np.full((1, 1, 2), np.inf, np.float32), (1,), "VALID"), "finite"),
  ],
  ids=["kernel-from-inputs", "add-at-argmax", "inf-kernel"],
)  # fmt: skip
def test_convolutions_and_scatters_that_no_rule_bounds_get_a_reason(fn, why):
  model, variables, x = _between(fn, 8)
  bound = _bound(model, variables, x)
  assert bound.certified is None and why in bound.reasons["<top level>"]


class _AntiAliased(nn.Module):
  """Conv, blur, stride-2 subsampling, residual, a transposed conv back up."""

  @nn.compact
  def __call__(self, x):
    h = nn.leaky_relu(nn.Conv(4, (3,), name="c")(x), 0.1)
    blur = jnp.tile(_BLUR, (1, 1, 4))
    down = jax.lax.conv_general_dilated(
      h, blur, (2,), "SAME", dimension_numbers=_NWC, feature_group_count=4
    )
    up = jax.lax.conv_transpose(down, jnp.ones((2, 4, 4)) / 4, (2,), "SAME", dimension_numbers=_NWC)
    return x + nn.Conv(1, (3,), name="out")(up)


def test_an_anti_aliased_model_is_certified():
  model, x = _AntiAliased(), jax.random.normal(KEY, (2, 8, 1))
  variables = model.init(KEY, x)
  bound = _bound(model, variables, x)
  assert bound.reasons == {}
  assert bound.certified >= _lower(model, variables, x[:1]) - 1e-6


class _Upsampler(nn.Module):
  """HiFi-GAN's shape, small: weight-normed Conv and ConvTranspose (x2, x3), dilated
  residual blocks, leaky ReLU, tanh."""

  @nn.compact
  def __call__(self, x):
    conv = flaxnorm.weight_norm(nn.Conv)
    x = conv(4, (5,))(x)
    for r in (2, 3):
      up = flaxnorm.weight_norm(nn.ConvTranspose, axis=-2)(4, (2 * r,), strides=(r,))
      x = up(nn.leaky_relu(x, 0.1))
      for d in (1, 3):
        x = x + conv(4, (3,), kernel_dilation=(d,))(nn.leaky_relu(x, 0.1))
    return jnp.tanh(conv(1, (5,))(x))


def test_a_vocoder_with_weight_normed_transposed_convs_is_certified():
  """ConvTranspose has no certificate of its own: it is followed, its kernel g·v/‖v‖
  computed from the params. It gave the reason 'ConvTranspose holds [...], which no
  certificate covers'."""
  model, x = _Upsampler(), jax.random.normal(KEY, (1, 6, 2))
  variables = model.init(KEY, x)
  bound = _bound(model, variables, x)
  assert bound.reasons == {}
  assert bound.certified >= _lower(model, variables, x) - 1e-6


@pytest.mark.parametrize("padding", ["SAME", "VALID", ((1, 2),)])
@pytest.mark.parametrize("stride", [2, 3])
def test_a_transposed_conv_layer_is_certified_within_one_percent(padding, stride):
  model, x = nn.ConvTranspose(3, (4,), strides=(stride,), padding=padding), jnp.ones((1, 8, 2))
  variables = model.init(KEY, x)
  bound = _bound(model, variables, x)
  exact = _lower(model, variables, x)
  assert bound.reasons == {} and exact - 1e-6 <= bound.certified <= 1.01 * exact


class _Followed(nn.Module):
  """A learned scale, BatchNorm in evaluation, an embedding added at fixed ids."""

  @nn.compact
  def __call__(self, x, ids):
    h = nn.Dense(4, name="d")(x)
    h = nn.BatchNorm(use_running_average=True, name="bn")(h)
    alpha = self.param("alpha", nn.initializers.constant(-3.0), ())
    return alpha * h + nn.Embed(5, 4, name="e")(ids)


def test_modules_without_a_certificate_are_followed_with_their_variables():
  """BatchNorm's running statistics and the model's own scale are known: the bound is
  |α| · max|γ / √(var + ε)| · ‖d‖; they gave 'holds [...], which no certificate covers'."""
  model, x, ids = _Followed(), jnp.ones((1, 3)), jnp.array([2])
  variables = model.init(KEY, x, ids)
  stats = {"mean": jnp.arange(4.0), "var": jnp.array([0.25, 1.0, 4.0, 1.0])}
  variables = {**variables, "batch_stats": {"bn": stats}}
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x, ids))
  assert bound.reasons == {}
  d = bound.layers["d/kernel"][1]
  assert bound.certified == pytest.approx(3.0 * d / np.sqrt(0.25 + 1e-5), rel=1e-6)

  def f(z):
    return model.apply(variables, z.reshape(x.shape), ids).ravel()

  jacobian = np.asarray(jax.jacfwd(f)(x.ravel()), np.float64)
  assert bound.certified >= np.linalg.norm(jacobian, 2)


class _Exp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.exp(x)


class _Normalized(nn.Module):
  how: str

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(4)(x)
    h = nn.LayerNorm(name="ln")(h) if self.how == "ln" else _Exp(name="exp")(h)
    return nn.Dense(2)(h)


@pytest.mark.parametrize(
  ("how", "why"), [("ln", "mul of two values"), ("exp", "no Lipschitz rule for exp")]
)
def test_a_reason_names_the_module_running_where_it_arose(how, why):
  """Under '<top level>' before, for a module without variables."""
  model, x = _Normalized(how), jnp.ones((1, 3))
  bound = _bound(model, model.init(KEY, x), x)
  assert bound.certified is None and list(bound.reasons) == [how]
  assert why in bound.reasons[how]


class _Doubled(nn.Dense):
  def __call__(self, x):
    return 2.0 * super().__call__(x)


@pytest.mark.parametrize(
  ("layer", "shape"),
  [
    (nn.Conv(3, (3,), input_dilation=(2,), padding=1), (1, 6, 2)),
    (nn.Conv(3, (3,), padding="REFLECT"), (1, 6, 2)),
    (nn.Conv(3, (3,), padding=((-1, 2),)), (1, 6, 2)),
    (_Doubled(3), (1, 4)),
    (nn.DenseGeneral(3, batch_dims=(0,), axis=-1), (2, 4)),
    (flaxnorm.weight_norm(nn.Conv(3, (3,), input_dilation=(2,), padding=1)), (1, 6, 2)),
  ],
  ids=["input-dilation", "reflect", "crop", "subclass", "batch-dims", "weight-normed"],
)
def test_layers_whose_options_no_layer_bound_covers_are_followed(layer, shape):
  """A plain or weight-normed layer the layer bound refuses (an option, a subclass) is
  followed with its kernel known; it gave a reason ('is not certified', 'not supported',
  'does not run Flax's own code')."""
  x = jax.random.normal(KEY, shape)
  variables = layer.init(KEY, x)
  bound = _bound(layer, variables, x)
  assert bound.reasons == {}
  assert bound.certified >= _lower(layer, variables, x) - 1e-6


class _FlaxWrapped(nn.Module):
  how: str

  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(4, use_bias=False)
    if self.how == "weight":
      return nn.WeightNorm(dense)(x)
    if self.how == "spectral":
      return nn.SpectralNorm(dense)(x, update_stats=False)
    times_10 = nn.map_variables(
      nn.Dense, "params", trans_in_fn=lambda t: jax.tree.map(lambda a: 10.0 * a, t), init=True
    )
    return times_10(4, use_bias=False)(x)


@pytest.mark.parametrize("how", ["weight", "spectral", "map"])
def test_a_layer_computing_with_changed_params_is_refused(how):
  """Flax's WeightNorm and SpectralNorm run the Dense through nn.map_variables: its
  stored kernel (x 0.01 here) is not the one it computes with. Certified 0.013 and 0.017
  where the norm is 6.6 and 1.7 (the wrapper holding variables had hidden it); a
  map_variables(x 10) Dense 15.7 where it is 157."""
  model, x = _FlaxWrapped(how), jnp.ones((1, 4))
  variables = model.init(KEY, x)
  params = dict(variables["params"])
  params["Dense_0" if how != "map" else "Map_variablesDense_0"] = {
    "kernel": 0.01 * jax.random.normal(KEY, (4, 4))
  }
  if how == "weight":
    params["WeightNorm_0"] = {"Dense_0/kernel/scale": jnp.full((4,), 5.0)}
  variables = {**variables, "params": params}
  bound = _bound(model, variables, x)
  assert bound.certified is None, (bound.certified, _lower(model, variables, x))
  assert "changed from the stored variable" in next(iter(bound.reasons.values()))


def _complex(h):
  return h[:, :4] + 1j * h[:, 4:]


@pytest.mark.parametrize(
  "fn",
  [
    lambda h: jax.lax.cummax(_complex(h), 1),
    lambda h: jax.lax.cumlogsumexp(_complex(h), 1),
    lambda h: jnp.zeros(2, jnp.complex64).at[jnp.array([0, 0, 1, 1])].max(_complex(h)[0]),
    lambda h: jax.ops.segment_max(_complex(h)[0], jnp.array([0, 0, 1, 1]), 2),
    lambda h: jnp.max(_complex(h)),
    lambda h: jnp.maximum(_complex(h), 0.0),
  ],
  ids=["cummax", "cumlogsumexp", "max-at", "segment-max", "reduce-max", "maximum"],
)
def test_orders_of_complex_values_are_refused(fn):
  """A max of complex values orders them lexicographically: it jumps (secant 1e4 at
  inputs 2e-4 apart); they were certified 2 to 2.83."""
  model, variables, x = _between(fn, 8)
  bound = _bound(model, variables, x)
  assert bound.certified is None and "ordered lexicographically" in bound.reasons["<top level>"]


class _Stat(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.BatchNorm(use_running_average=True, epsilon=0.0)(nn.Dense(4)(x))


@pytest.mark.parametrize(
  ("case", "why"),
  [
    ("rng", "not known"),
    ("subnormal", "subnormal"),
    ("zero-variance", "inf or NaN"),
    ("overflow", "overflows"),
  ],
)
def test_draws_subnormals_non_finite_scales_and_overflow_get_a_reason(case, why):
  """rng_uniform was folded to one draw (certified 14.7, slopes up to 48 over runs); a
  divisor 1e-40 (flushed to 0: the output is inf) certified 1e40; BatchNorm with a zero
  variance certified inf without a reason, with a negative one NaN."""
  x = jnp.ones((1, 4))
  if case == "rng":
    model, variables, x = _between(lambda h: h / jax.lax.rng_uniform(0.01, 1.0, (4,)))
  elif case == "subnormal":
    model, variables, x = _between(lambda h: h / np.float32(1e-40))
  elif case == "zero-variance":
    model = _Stat()
    variables = model.init(KEY, x)
    variables = {
      **variables,
      "batch_stats": {"BatchNorm_0": {"mean": jnp.zeros(4), "var": jnp.zeros(4)}},
    }
  else:
    model, variables, x = _between(lambda h: jax.lax.fori_loop(0, 400, lambda _, c: 10.0 * c, h))
  bound = _bound(model, variables, x)
  assert bound.certified is None and why in next(iter(bound.reasons.values()))


class _Constant(nn.Module):
  @nn.compact
  def __call__(self, n):
    return jnp.full((4,), n, jnp.float32)


class _OwnScale(nn.Module):
  @nn.compact
  def __call__(self):
    return self.param("s", nn.initializers.constant(-2.0), (4,))


class _ThroughMarks(nn.Module):
  @nn.compact
  def __call__(self, x, ids):
    return x * _Constant()(4) + x * _OwnScale()() + nn.Embed(5, 4)(ids)


def test_known_values_pass_through_module_calls():
  """A module returning a constant or its own param, an Embed at integer inputs: each
  call's marks lost the value (refused as 'not known')."""
  model, x, ids = _ThroughMarks(), jnp.ones((1, 4)), jnp.array([1])
  variables = model.init(KEY, x, ids)
  bound = flaxnorm.lipschitz_bound(variables, model=model, inputs=(x, ids))
  assert bound.reasons == {} and bound.certified == pytest.approx(6.0)


class _TakesTwo(nn.Module):
  @nn.compact
  def __call__(self, x, n):
    return x + n


def test_a_discrete_value_is_named_where_it_is_made():
  """It was named after the module that first used it ('m')."""

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return _TakesTwo(name="m")(x, (3.0 * x).astype(jnp.int32))

  model, x = Model(), jnp.ones((1, 4))
  bound = _bound(model, model.init(KEY, x), x)
  assert bound.certified is None and list(bound.reasons) == ["<top level>"]
  assert "makes a discrete value" in bound.reasons["<top level>"]


class _Viewed(nn.Module):
  """A Dense named with the tags' separator, or computing with a numpy kernel."""

  how: str

  @nn.compact
  def __call__(self, x):
    if self.how == "numpy":
      view = lambda t: {"params": {**t["params"], "kernel": np.full((4, 4), 10.0, np.float32)}}
    else:
      view = lambda t: jax.tree.map(lambda a: 10.0 * a, t)
    dense = nn.map_variables(nn.Dense, "params", trans_in_fn=view, init=True)
    return dense(4, use_bias=False, name="d|1" if self.how == "bar" else "d")(x)


@pytest.mark.parametrize("how", ["bar", "numpy"])
def test_a_changed_variable_is_caught_whatever_its_name_or_type(how):
  """A '|' in the layer's name split its marks wrongly, and a numpy array in the layer's
  view had no mark: certified 12.1 and 0.36 where the norms are 121 and 40."""
  model, x = _Viewed(how), jnp.ones((1, 4))
  variables = model.init(KEY, x)
  bound = _bound(model, variables, x)
  assert _lower(model, variables, x) > 10.0
  assert bound.certified is None and "changed from the stored" in next(iter(bound.reasons.values()))


class _Slashed(nn.Module):
  @nn.compact
  def __call__(self, x):
    class Inner(nn.Module):
      @nn.compact
      def __call__(self, h):
        return nn.Dense(4, name="b")(h)

    return nn.Dense(4, name="a/b")(x) + Inner(name="a")(x)


def test_module_names_holding_a_slash_are_refused():
  """'a/b' and a → b share one path: the certificate bounded one layer's kernel twice
  (3.4 where the norm, with 'a/b''s kernel x 100, is 134)."""
  model, x = _Slashed(), jnp.ones((1, 4))
  variables = model.init(KEY, x)
  params = {
    **variables["params"],
    "a/b": {"kernel": 100.0 * variables["params"]["a/b"]["kernel"], "bias": jnp.zeros(4)},
  }
  variables = {"params": params}
  bound = _bound(model, variables, x)
  assert bound.certified is None and "hold '/'" in bound.reasons["<top level>"]


class _KnownStack(nn.Module):
  """A scan over a stack of known matrices: each step its own."""

  @nn.compact
  def __call__(self, x):
    stack = np.stack([np.diag([4.0, 1.0]), np.diag([0.25, 1.0]), np.eye(2)]).astype(np.float32)
    h, _ = jax.lax.scan(lambda h, w: (h @ w, None), x, jnp.asarray(stack))
    return h


def test_a_scan_over_known_slices_bounds_each_step_by_its_own_slice():
  """diag(4, 1) · diag(1/4, 1) · I = I: exact 1; one bound for every step would give 64,
  and before each step read its slice the matrices were unknown (refused)."""
  x = jnp.ones((1, 2))
  bound = _bound(_KnownStack(), {}, x)
  assert _local_norm(_KnownStack(), {}, x) == pytest.approx(1.0)
  # ‖diag(4, 1)‖ · ‖diag(1/4, 1)‖ · 1
  assert bound.reasons == {} and 4.0 <= bound.certified <= 4.0 * 1.001


class _ReluScale(nn.Module):
  """A learned scale passed through a custom-JVP function (jax.nn.relu) before it scales."""

  @nn.compact
  def __call__(self, x):
    return (
      jax.nn.relu(self.param("alpha", lambda _: jnp.array(-3.0))) * x
      + jax.nn.relu(self.param("beta", lambda _: jnp.array(2.0))) * x
    )


def test_known_values_through_a_custom_jvp_function_are_computed():
  x = jnp.ones((1, 3))
  variables = _ReluScale().init(KEY, x)
  bound = _bound(_ReluScale(), variables, x)
  assert bound.reasons == {} and bound.certified == pytest.approx(2.0)


def test_a_loops_kernel_is_bounded_once_per_value(monkeypatch):
  """An RNN over 50 steps: each kernel's certified norm is computed once, not per step."""
  import flax.nnx as nnx

  import flaxnorm.nnx as fnx
  from flaxnorm import _certify

  calls = []
  real = _certify.matrix_norm_bound
  monkeypatch.setattr(
    _certify, "matrix_norm_bound", lambda *a, **k: calls.append(1) or real(*a, **k)
  )
  rnn = nnx.RNN(nnx.SimpleCell(3, 4, rngs=nnx.Rngs(0)))
  bound = fnx.lipschitz_bound(rnn, (jnp.ones((1, 50, 3)),))
  assert bound.reasons == {} and len(calls) <= 4  # the input and the hidden kernels


class _LateCarry(nn.Module):
  """A scan whose first known slice is 0: its first step carries nothing from the inputs,
  its later steps do (the carry sums x_1 + x_2)."""

  @nn.compact
  def __call__(self, x):
    scales = jnp.asarray(np.array([0.0, 1.0, 1.0], np.float32))

    def step(c, xs):
      row, s = xs
      return c + s * row, None

    c, _ = jax.lax.scan(step, jnp.zeros(x.shape[1:]), (x, scales))
    return c


def test_a_scan_whose_later_steps_carry_the_inputs_is_followed_step_by_step():
  x = jnp.ones((3, 2))
  bound = _bound(_LateCarry(), {}, x)
  f = lambda z: _LateCarry().apply({}, z.reshape(3, 2))
  exact = np.linalg.norm(np.asarray(jax.jacfwd(f)(x.ravel()), np.float64), 2)
  assert exact == pytest.approx(np.sqrt(2.0))
  assert bound.reasons == {} and exact <= bound.certified <= 2.0 * 1.0001


class _MaskedRNN(nn.Module):
  """A linear RNN reading a known mask per step: all ones after its first three steps."""

  @nn.compact
  def __call__(self, x):
    mask = np.ones((x.shape[1], 1), np.float32)
    mask[:3] = 0.5

    def step(h, xs):
      row, m = xs
      return 0.5 * h + m * row, None

    h0 = jnp.zeros((x.shape[0], x.shape[2]))
    h, _ = jax.lax.scan(step, h0, (jnp.swapaxes(x, 0, 1), jnp.asarray(mask)))
    return h


def test_a_scan_over_slices_that_stop_changing_stops_walking_at_its_fixed_point(monkeypatch):
  """5,000 steps: the slices settle after step 3, the carry's bound converges (to 2),
  so the walk stops there instead of walking every step."""
  from flaxnorm import _propagate

  steps = []
  real = _propagate._scan_step
  monkeypatch.setattr(_propagate, "_scan_step", lambda *a, **k: steps.append(1) or real(*a, **k))
  bound = _bound(_MaskedRNN(), {}, jnp.ones((1, 5000, 2)))
  assert bound.reasons == {} and 1.9 <= bound.certified <= 2.0 * 1.0001
  assert len(steps) < 200


class _SignedZeros(nn.Module):
  """Known slices that differ in the sign of zero only: atan2(∓0, -1) + π is 0 or 2π."""

  @nn.compact
  def __call__(self, x):
    signs = jnp.asarray(np.array([-0.0, -0.0, 0.0, 0.0], np.float32))

    def step(h, xs):
      s, row = xs
      return h + (jnp.arctan2(s, -1.0) + jnp.pi) * row, None

    return jax.lax.scan(step, x[:, 0], (signs, jnp.swapaxes(x[:, 1:], 0, 1)))[0]


def test_slices_differing_in_the_sign_of_zero_are_different_steps():
  x = jnp.ones((1, 5))
  bound = _bound(_SignedZeros(), {}, x)
  assert _local_norm(_SignedZeros(), {}, x) == pytest.approx(np.sqrt(1 + 2 * (2 * np.pi) ** 2))
  assert bound.reasons == {} and bound.certified >= _local_norm(_SignedZeros(), {}, x)


_STACK = np.stack([np.diag([4.0, 1.0]), np.diag([0.25, 1.0]), np.eye(2)]).astype(np.float32)


class _ForiStack(nn.Module):
  """``_KnownStack`` as a ``fori_loop`` over a param: each step indexes the stack with the
  loop's counter, a carry known at every step."""

  @nn.compact
  def __call__(self, x):
    stack = self.param("stack", lambda _: jnp.asarray(_STACK))
    return jax.lax.fori_loop(0, 3, lambda i, h: h @ stack[i], x)


def test_a_fori_loop_indexing_a_known_stack_reads_each_steps_slice():
  """Before the walk followed known carries, the counter was unknown, so each step's
  matrix was (refused)."""
  x = jnp.ones((1, 2))
  variables = _ForiStack().init(KEY, x)
  bound = _bound(_ForiStack(), variables, x)
  assert _local_norm(_ForiStack(), variables, x) == pytest.approx(1.0)
  assert bound.reasons == {} and 4.0 <= bound.certified <= 4.0 * 1.001  # 4 · 1/… · 1 per step


class _CountedRows(nn.Module):
  """Each row mapped alone by the matrix a counter carry picks: side by side, the largest."""

  @nn.compact
  def __call__(self, x):
    stack = jnp.asarray(_STACK * np.array([1.0, 8.0, 2.0], np.float32)[:, None, None])
    _, ys = jax.lax.scan(lambda i, row: (i + 1, row @ stack[i]), 0, x)
    return ys


def test_a_scan_mapping_each_slice_by_a_counter_picked_matrix_is_the_largest_step():
  x = jnp.ones((3, 2))
  bound = _bound(_CountedRows(), {}, x)
  f = lambda z: _CountedRows().apply({}, z.reshape(3, 2)).ravel()
  exact = np.linalg.norm(np.asarray(jax.jacfwd(f)(x.ravel()), np.float64), 2)
  assert exact == pytest.approx(8.0)  # ‖diag(2, 8)‖
  assert bound.reasons == {} and 8.0 <= bound.certified <= 8.0 * 1.0001


class _SaturatingCounter(nn.Module):
  """A linear RNN whose input matrix a counter picks, the counter stopping at 2."""

  @nn.compact
  def __call__(self, x):
    stack = jnp.asarray(_STACK)

    def step(carry, row):
      i, h = carry
      return (jnp.minimum(i + 1, 2), 0.5 * h + row @ stack[i]), None

    (_, h), _ = jax.lax.scan(step, (0, jnp.zeros(x.shape[1:])), x)
    return h


def test_known_carries_that_stop_changing_let_the_walk_stop_at_its_fixed_point(monkeypatch):
  """4,000 steps: the counter settles at step 2 and the carry's bound converges (to
  2 · ‖I‖), so the walk stops there instead of walking every step."""
  from flaxnorm import _propagate

  steps = []
  real = _propagate._scan_step
  monkeypatch.setattr(_propagate, "_scan_step", lambda *a, **k: steps.append(1) or real(*a, **k))
  bound = _bound(_SaturatingCounter(), {}, jnp.ones((4000, 2)))
  assert bound.reasons == {} and 2.0 <= bound.certified <= 2.0 * 1.0001 + 4.0 * 0.5**4000
  assert len(steps) < 200


def test_known_carries_of_a_scan_longer_than_the_exact_steps_are_not_followed():
  """Past ``_EXACT_STEPS`` steps the counter is left unknown: a reason, not a long walk."""
  from flaxnorm import _propagate

  class Long(nn.Module):
    @nn.compact
    def __call__(self, x):
      n = _propagate._EXACT_STEPS + 1
      return jax.lax.fori_loop(0, n, lambda i, h: h @ jnp.asarray(_STACK)[i % 3], x)

  bound = _bound(Long(), {}, jnp.ones((1, 2)))
  assert bound.certified is None and "operand not known here" in bound.reasons["<top level>"]
