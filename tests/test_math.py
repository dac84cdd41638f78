"""Tests of the pure math core (flaxnorm._math), against numpy and closed forms."""

import functools

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import flaxnorm

pytestmark = pytest.mark.usefixtures("strict_promotion")


def _np_wn(w, axis):
  """Reference weight norm with numpy: g keeps dims on the kept axes."""
  w = np.asarray(w, np.float64)
  if axis is None:
    return np.sqrt((w**2).sum())
  kept = {a % w.ndim for a in np.atleast_1d(axis)}
  red = tuple(a for a in range(w.ndim) if a not in kept)
  return np.sqrt((w**2).sum(axis=red, keepdims=True))


class MathVariantsTest(parameterized.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_decompose_compose_round_trip(self):
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))
    g, v = self.variant(flaxnorm.weight_norm_decompose, static_argnums=1)(w, -1)
    chex.assert_shape(g, (1, 1, 1, 5))
    chex.assert_trees_all_close(g, _np_wn(w, -1), rtol=1e-6)
    chex.assert_trees_all_close(self.variant(flaxnorm.weight_norm_compose)(g, v), w, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_l2_normalize(self):
    x = jnp.array([[3.0, 4.0], [0.0, 0.0]])
    out = self.variant(lambda x: flaxnorm.l2_normalize(x, axis=1))(x)
    chex.assert_trees_all_close(out, jnp.array([[0.6, 0.8], [0.0, 0.0]]))
    whole = self.variant(flaxnorm.l2_normalize)(x)
    chex.assert_trees_all_close(whole, x / 5.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_power_iteration_matches_svd(self):
    w = jax.random.normal(jax.random.key(2), (6, 9))
    u0 = flaxnorm.l2_normalize(jax.random.normal(jax.random.key(3), (6,)))
    u, v, sigma = self.variant(lambda w, u: flaxnorm.power_iteration(w, u, n_steps=500))(w, u0)
    uu, s, vt = np.linalg.svd(np.asarray(w))
    np.testing.assert_allclose(sigma, s[0], rtol=1e-5)
    np.testing.assert_allclose(abs(np.dot(u, uu[:, 0])), 1.0, rtol=1e-5)
    np.testing.assert_allclose(abs(np.dot(v, vt[0])), 1.0, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_spectral_normalize_eval_uses_stored_vectors(self):
    w = jax.random.normal(jax.random.key(4), (3, 4, 5))
    st = flaxnorm.spectral_state_init(jax.random.key(5), w, n_steps=3)
    w_sn, new = self.variant(lambda w, u, v: flaxnorm.spectral_normalize(w, u, v, n_steps=0))(
      w, st.u, st.v
    )
    mat = np.moveaxis(np.asarray(w), -1, 0).reshape(5, -1)
    sigma = st.u @ mat @ st.v
    chex.assert_trees_all_close(new.u, st.u)
    chex.assert_trees_all_close(new.v, st.v)
    chex.assert_trees_all_close(new.sigma, sigma, rtol=1e-6)
    chex.assert_trees_all_close(w_sn, w / sigma, rtol=1e-6)


def test_decompose_axis_options():
  w = jax.random.normal(jax.random.key(0), (4, 5, 6))
  for axis, shape in [(0, (4, 1, 1)), ((0, 2), (4, 1, 6)), (-2, (1, 5, 1)), (None, ())]:
    g, v = flaxnorm.weight_norm_decompose(w, axis)
    assert g.shape == shape, (axis, g.shape)
    chex.assert_trees_all_close(g, _np_wn(w, axis).reshape(shape), rtol=1e-6)
    chex.assert_trees_all_close(flaxnorm.weight_norm_compose(g, v), w, rtol=1e-5)


def test_as_matrix_is_pytorch_view():
  w = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
  np.testing.assert_array_equal(
    flaxnorm.as_matrix(jnp.asarray(w)), np.moveaxis(w, -1, 0).reshape(5, -1)
  )
  np.testing.assert_array_equal(
    flaxnorm.as_matrix(jnp.asarray(w), 1), np.moveaxis(w, 1, 0).reshape(3, -1)
  )


def test_weight_norm_gradients_closed_form():
  """Salimans & Kingma: grad_g = grad_w . v/||v||, grad_v = g/||v|| (grad_w - grad_g v/||v||)."""
  kv, kx = jax.random.split(jax.random.key(0))
  v = jax.random.normal(kv, (4, 3))
  g = jnp.array([[0.5, 2.0, 1.5]])
  gw = jax.random.normal(kx, (4, 3))  # an arbitrary upstream gradient dL/dw

  grad_g, grad_v = jax.grad(lambda g, v: jnp.sum(flaxnorm.weight_norm_compose(g, v) * gw), (0, 1))(
    g, v
  )
  norm = jnp.linalg.norm(v, axis=0, keepdims=True)
  expected_g = jnp.sum(gw * v / norm, axis=0, keepdims=True)
  expected_v = g / norm * (gw - expected_g * v / norm)
  chex.assert_trees_all_close(grad_g, expected_g, rtol=1e-5)
  chex.assert_trees_all_close(grad_v, expected_v, rtol=1e-5, atol=1e-6)


def test_weight_norm_check_grads():
  v = jax.random.normal(jax.random.key(0), (3, 4))
  g = jnp.array([[1.0, 2.0, 0.5, 3.0]])
  check_grads(
    flaxnorm.weight_norm_compose,
    (g, v),
    order=2,
    modes=("fwd", "rev"),
    eps=1e-2,
    atol=5e-2,
    rtol=5e-2,
  )


def test_spectral_normalize_check_grads_and_closed_form():
  """d sigma / dW = u v^T with u, v held fixed (Miyato et al., 2018)."""
  w = jax.random.normal(jax.random.key(0), (4, 3))
  st = flaxnorm.spectral_state_init(jax.random.key(1), w, axis=0, n_steps=50)

  def sigma_of(w):
    return flaxnorm.power_iteration(w, st.u, v=st.v, n_steps=0)[2]

  chex.assert_trees_all_close(jax.grad(sigma_of)(w), jnp.outer(st.u, st.v), rtol=1e-5)
  check_grads(
    lambda w: flaxnorm.spectral_normalize(w, st.u, st.v, axis=0, n_steps=2)[0],
    (w,),
    order=1,
    modes=("rev",),
    eps=1e-2,
    atol=5e-2,
    rtol=5e-2,
  )


@pytest.mark.parametrize(
  "shape, axis",
  [((3, 3, 4, 5), -1), ((4, 3, 5), (-2, -1)), ((6, 5), -1), ((3, 4, 5), 0), ((3, 4, 5), 1)],
)
def test_spectral_scale_matches_the_matrix_view(shape, axis):
  """Kept axes last read W^T as a free reshape: same state, sigma and gradient as as_matrix."""
  w = jax.random.normal(jax.random.key(0), shape)
  st = flaxnorm.spectral_state_init(jax.random.key(1), w, axis=axis, n_steps=3)
  mat = flaxnorm.as_matrix(w, axis)
  u, v, _ = flaxnorm.power_iteration(mat, st.u, v=st.v, n_steps=2)

  def loss(w):
    w_sn, state = flaxnorm.spectral_normalize(w, st.u, st.v, axis=axis, n_steps=2)
    return jnp.sum(jnp.sin(w_sn)), state

  def reference(w):  # w / (u^T W v), u and v from the as_matrix iteration held fixed
    return jnp.sum(jnp.sin(w / (u @ flaxnorm.as_matrix(w, axis) @ v)))

  (value, state), grad = jax.value_and_grad(loss, has_aux=True)(w)
  chex.assert_trees_all_close((state.u, state.v), (u, v), rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(value, reference(w), rtol=1e-5)
  chex.assert_trees_all_close(grad, jax.grad(reference)(w), rtol=1e-4, atol=1e-6)


def test_non_finite_products_keep_the_state():
  """A NaN or inf weight, or one whose products overflow, leaves u, v and sigma as they were."""
  w = jax.random.normal(jax.random.key(0), (4, 3))
  st = flaxnorm.spectral_state_init(jax.random.key(1), w)
  for bad in (w.at[0, 0].set(jnp.nan), w.at[1, 2].set(jnp.inf)):
    w_sn, new = flaxnorm.spectral_normalize(bad, st.u, st.v, sigma=st.sigma, n_steps=2)
    chex.assert_trees_all_close(tuple(new), tuple(st))
    assert bool(jnp.any(jnp.isnan(w_sn)))  # loudly in the output
  # Products whose norms overflow float32 keep u and v; sigma, finite, follows the weight.
  _, new = flaxnorm.spectral_normalize(w * 1e30, st.u, st.v, sigma=st.sigma, n_steps=2)
  chex.assert_trees_all_close((new.u, new.v), (st.u, st.v))
  np.testing.assert_allclose(new.sigma, st.sigma * 1e30, rtol=1e-3)
  # A finite weight afterwards resumes from there.
  _, new = flaxnorm.spectral_normalize(w, st.u, st.v, sigma=st.sigma, n_steps=2)
  np.testing.assert_allclose(
    new.sigma, np.linalg.svd(np.asarray(w), compute_uv=False)[0], rtol=1e-3
  )


def test_power_iteration_vectors_carry_no_gradient():
  w = jax.random.normal(jax.random.key(0), (4, 3))
  u0 = flaxnorm.l2_normalize(jnp.ones((4,)))
  grad = jax.grad(lambda w: jnp.sum(flaxnorm.power_iteration(w, u0, n_steps=3)[0]))(w)
  chex.assert_trees_all_close(grad, jnp.zeros_like(w))


def test_zero_weight_is_finite():
  z = jnp.zeros((4, 3))
  g, v = flaxnorm.weight_norm_decompose(z)
  w, (dg, dv) = jax.value_and_grad(
    lambda g, v: jnp.sum(flaxnorm.weight_norm_compose(g, v)), (0, 1)
  )(g, v)
  assert w == 0.0
  chex.assert_tree_all_finite((dg, dv))
  chex.assert_trees_all_close(flaxnorm.weight_norm_compose(g, v), z)
  chex.assert_tree_all_finite(jax.grad(lambda x: jnp.sum(flaxnorm.l2_normalize(x)))(jnp.zeros(3)))

  st = flaxnorm.spectral_state_init(jax.random.key(0), z)
  out, grad = jax.value_and_grad(
    lambda w: jnp.sum(flaxnorm.spectral_normalize(w, st.u, st.v, n_steps=2)[0])
  )(z)
  assert out == 0.0
  chex.assert_tree_all_finite(grad)
  # The vectors keep their random start instead of collapsing to 0, so the
  # iteration resumes once the weight becomes nonzero.
  _, new = flaxnorm.spectral_normalize(z, st.u, st.v, n_steps=2)
  chex.assert_trees_all_close(new.u, st.u)
  w = jax.random.normal(jax.random.key(1), (4, 3))
  _, new = flaxnorm.spectral_normalize(w, new.u, new.v, n_steps=300)
  np.testing.assert_allclose(
    new.sigma, np.linalg.svd(np.asarray(w), compute_uv=False)[0], rtol=1e-4
  )


def test_low_precision_accumulates_in_float32():
  # 1000 entries of 3000 in float16: the sum of squares (9e9) overflows float16
  # (PyTorch's weight norm gives inf here), the result must not.
  w = jnp.full((1000, 2), 3000.0, jnp.float16)
  g, v = flaxnorm.weight_norm_decompose(w)
  assert g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g)))
  np.testing.assert_allclose(np.asarray(g, np.float32), np.sqrt(1000) * 3000, rtol=1e-3)
  out = flaxnorm.weight_norm_compose(g, v)
  assert out.dtype == jnp.float16
  np.testing.assert_allclose(np.asarray(out, np.float32), 3000.0, rtol=1e-3)
  for dtype in (jnp.float16, jnp.bfloat16):
    w = jax.random.normal(jax.random.key(0), (8, 6)).astype(dtype) * 300
    st = flaxnorm.spectral_state_init(jax.random.key(1), w)
    assert st.u.dtype == jnp.float32
    w_sn, _ = flaxnorm.spectral_normalize(w, st.u, st.v)
    assert w_sn.dtype == dtype and bool(jnp.all(jnp.isfinite(w_sn)))


@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(
  ("x_shape", "scale_shape"),
  [((6, 5), (5,)), ((3, 4, 5), (1, 1, 5)), ((2, 3, 4), (3, 1)), ((4, 5), ()), ((2, 4, 5), (5,))],
)
def test_widened_product_gradients_are_autodiffs(x_dtype, x_shape, scale_shape):
  """The rematerialized ``x * scale`` (float32, narrow ``x``) has autodiff's value and VJP."""
  from flaxnorm import _math

  x = jax.random.normal(jax.random.key(0), x_shape).astype(x_dtype)
  scale = jax.random.normal(jax.random.key(1), scale_shape)
  ct = jax.random.normal(jax.random.key(2), x_shape).astype(x_dtype)

  def reference(x, scale):
    return (x.astype(jnp.float32) * scale).astype(x_dtype)

  for out_dtype, ct_ in ((x_dtype, ct), (None, ct.astype(jnp.float32))):
    fn = lambda x, s, o=out_dtype: _math.widened_product(x, s, jnp.float32, o)
    ref = reference if out_dtype else lambda x, s: x.astype(jnp.float32) * s
    out, vjp = jax.vjp(fn, x, scale)
    want, want_vjp = jax.vjp(ref, x, scale)
    chex.assert_trees_all_equal(out, want)
    chex.assert_trees_all_equal_dtypes(vjp(ct_), want_vjp(ct_))
    chex.assert_trees_all_close(vjp(ct_), want_vjp(ct_), rtol=1e-6, atol=1e-6)
  zero = jax.grad(lambda s: jnp.sum(fn(jnp.zeros_like(x), s)))(scale)
  assert bool(jnp.all(zero == 0))


@pytest.mark.parametrize("narrow", [False, True])
def test_widened_product_remat_cotangent_width(narrow):
  """The narrow cotangent is widened before the rematerialized backward (default).

  Cast inside ``jax.checkpoint``, the bfloat16 cotangent crosses the remat's
  barrier and XLA rounds the float32 gradient to bfloat16 and back (one
  kernel-sized pass more per layer): what ``narrow_cotangent=True`` asks for.
  """
  from flaxnorm import _math

  x = jnp.ones((3, 8, 16), jnp.bfloat16)

  def backward(x, scale, ct):
    fn = lambda x, s: _math.widened_product(
      x, s, jnp.float32, jnp.bfloat16, narrow_cotangent=narrow
    )
    return jax.vjp(fn, x, scale)[1](ct)

  jaxpr = jax.make_jaxpr(backward)(x, jnp.ones((16,)), x)
  remats = [e for e in jaxpr.eqns if e.primitive.name.startswith(("remat", "checkpoint"))]
  assert len(remats) == 1
  dtypes = sorted(str(v.aval.dtype) for v in remats[0].invars if v.aval.shape == x.shape)
  assert dtypes == ["bfloat16", "bfloat16" if narrow else "float32"]  # x and the cotangent
  grads = backward(x, jnp.full((16,), 0.5), x)
  chex.assert_trees_all_close(grads, (x * 0.5, jnp.full((16,), 24.0)))


def test_compile_size_does_not_grow_with_steps():
  w = jnp.ones((8, 8))
  u = jnp.ones((8,)) / jnp.sqrt(8.0)

  def n_eqns(n):
    jaxpr = jax.make_jaxpr(lambda w, u: flaxnorm.power_iteration(w, u, n_steps=n))(w, u)
    return len(jaxpr.eqns), len(str(jaxpr).splitlines())

  def hlo_lines(n):
    lowered = jax.jit(lambda w, u: flaxnorm.power_iteration(w, u, n_steps=n)).lower(w, u)
    return len(lowered.as_text().splitlines())

  assert n_eqns(2) == n_eqns(1000)
  assert hlo_lines(2) == hlo_lines(1000)


@pytest.mark.parametrize(
  "call, error, match",
  [
    (lambda: flaxnorm.l2_normalize(jnp.ones(3), eps=0.0), ValueError, "eps must be a positive"),
    (
      lambda: flaxnorm.weight_norm_decompose(jnp.ones((2, 3)), axis=2),
      ValueError,
      "axis 2 is out of range",
    ),
    (
      lambda: flaxnorm.weight_norm_decompose(jnp.ones((2, 3), jnp.int32)),
      TypeError,
      "floating-point",
    ),
    (
      lambda: flaxnorm.weight_norm_compose(jnp.ones((1, 4)), jnp.ones((2, 3))),
      ValueError,
      "does not fit",
    ),
    (
      lambda: flaxnorm.power_iteration(jnp.ones((2, 3)), jnp.ones(3)),
      ValueError,
      r"u must have shape \(2,\)",
    ),
    (
      lambda: flaxnorm.power_iteration(jnp.ones((2, 3)), jnp.ones(2), n_steps=-1),
      ValueError,
      "n_steps must be >= 0",
    ),
    (lambda: flaxnorm.as_matrix(jnp.ones(3)), ValueError, "at least 2 dims"),
  ],
)
def test_math_errors(call, error, match):
  with pytest.raises(error, match=match):
    call()


@functools.partial(jax.jit, static_argnums=1)
def _round_trip(w, axis):
  return flaxnorm.weight_norm_compose(*flaxnorm.weight_norm_decompose(w, axis))


_WN_SHAPES = [(1,), (7,), (3, 1), (2, 5), (4, 4), (2, 3, 4), (1, 2, 1, 3)]


@settings(max_examples=200, deadline=None)
@given(
  data=st.data(), shape=st.sampled_from(_WN_SHAPES), dtype=st.sampled_from([np.float32, np.float16])
)
def test_property_compose_decompose_identity(data, shape, dtype):
  w = data.draw(hnp.arrays(dtype, shape, elements=st.floats(-100, 100, width=16)))
  axis = data.draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1)))
  out = np.asarray(_round_trip(jnp.asarray(w), axis), np.float32)
  assert np.all(np.isfinite(out))
  tol = 1e-5 if dtype == np.float32 else 4e-3
  np.testing.assert_allclose(
    out, w.astype(np.float32), rtol=tol, atol=tol * np.abs(w).max(initial=0)
  )


@functools.partial(jax.jit, static_argnums=1)
def _converged_sn(w, axis):
  state = flaxnorm.spectral_state_init(jax.random.key(0), w, axis=axis, n_steps=1000)
  return flaxnorm.spectral_normalize(w, state.u, state.v, axis=axis, n_steps=0)


# A few shapes, so that jit's cache keeps the 200 examples fast.
_SN_SHAPES = [(1, 1), (2, 3), (5, 5), (4, 1), (3, 2, 4), (2, 2, 2)]


@settings(max_examples=200, deadline=None)
@given(data=st.data(), shape=st.sampled_from(_SN_SHAPES))
def test_property_spectral_norm_at_most_one(data, shape):
  w = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(-10, 10, width=32)))
  axis = data.draw(st.integers(-len(shape), len(shape) - 1)) % len(shape)
  w_sn, state = _converged_sn(jnp.asarray(w), axis)
  mat = np.moveaxis(w, axis, 0).reshape(shape[axis], -1).astype(np.float64)
  svals = np.linalg.svd(mat, compute_uv=False)
  top = np.linalg.svd(
    np.moveaxis(np.asarray(w_sn), axis, 0).reshape(shape[axis], -1), compute_uv=False
  )[0]
  assert np.all(np.isfinite(np.asarray(w_sn)))
  if svals[0] <= 1e-13:  # a (near-)zero matrix (sigma <= eps) is left as it is
    np.testing.assert_allclose(np.asarray(w_sn), w, atol=1e-30)  # XLA flushes subnormals
  elif svals[0] < 1e-9:  # float32 squares of such values lose precision
    pass
  elif len(svals) < 2 or svals[1] < 0.9 * svals[0]:  # a clear gap: power iteration has converged
    np.testing.assert_allclose(top, 1.0, rtol=1e-3)
  else:  # sigma never exceeds the top singular value, and lies above the second
    assert float(state.sigma) <= svals[0] * (1 + 1e-5) and float(state.sigma) >= svals[1] * (
      1 - 1e-5
    )


def test_zero_state_restarts_in_training():
  """A zeroed state (hand-made, or a bad checkpoint) restarts; before, it stayed 0 forever
  and the kernel was never normalized."""
  w = jax.random.normal(jax.random.key(0), (5, 3))
  zeros = (jnp.zeros(3), jnp.zeros(5))  # axis=-1: u along the kept axis (3)
  _, state = flaxnorm.spectral_normalize(w, *zeros, n_steps=100)
  np.testing.assert_allclose(state.sigma, np.linalg.svd(np.asarray(w))[1][0], rtol=1e-4)
  chex.assert_trees_all_close(jnp.linalg.norm(state.u), 1.0, rtol=1e-6)
  for u, v in [(jnp.zeros(5), None), (jnp.zeros(5), jnp.zeros(3))]:
    u, _, sigma = flaxnorm.power_iteration(w, u, v=v, n_steps=100)
    np.testing.assert_allclose(sigma, np.linalg.svd(np.asarray(w))[1][0], rtol=1e-4)
  # The operator form too (the map x -> w x on (3,) vectors).
  _, _, sigma = flaxnorm.operator_power_iteration(lambda x: x @ w, *zeros, n_steps=100)
  np.testing.assert_allclose(sigma, np.linalg.svd(np.asarray(w))[1][0], rtol=1e-4)
  # Evaluation (no iteration) with a zero state: sigma 0, the kernel as it is, finite.
  w_eval, state = flaxnorm.spectral_normalize(w, *zeros, n_steps=0)
  assert float(state.sigma) == 0.0
  chex.assert_trees_all_close(w_eval, w)


def test_zero_weight_returns_unit_vectors_and_finite_decompose_gradients():
  """A zero W keeps the vectors it was given (bit for bit, as a NaN W does); a missing v
  is the unit restart vector (it was returned as zeros)."""
  z = jnp.zeros((4, 3))
  u0 = jnp.full(4, 0.5)
  u, v_out, sigma = flaxnorm.power_iteration(z, u0, n_steps=3)
  chex.assert_trees_all_equal(u, u0)
  chex.assert_trees_all_close(jnp.linalg.norm(v_out), 1.0, rtol=1e-6)
  assert float(sigma) == 0.0
  # d g / d w at a zero slice: zero, not NaN (sqrt's slope at 0).
  for axis in (-1, None):
    grad = jax.grad(lambda w: flaxnorm.weight_norm_decompose(w, axis=axis)[0].sum())(z)
    chex.assert_trees_all_equal(grad, z)
  with pytest.raises(ValueError, match=r"sigma must be a scalar .* got shape \(3,\)"):
    flaxnorm.spectral_normalize(z, jnp.ones(3), jnp.ones(4), sigma=jnp.ones(3), axis=0)
  w = jnp.array([[3.0, 0.0], [4.0, 0.0]])
  grad = jax.grad(lambda w: flaxnorm.weight_norm_decompose(w)[0].sum())(w)
  chex.assert_trees_all_close(grad, jnp.array([[0.6, 0.0], [0.8, 0.0]]))


def test_evaluation_normalizes_the_stored_vectors():
  """sigma = u^T W v / (||u|| ||v||): stored vectors that are not unit give the same sigma."""
  w = jax.random.normal(jax.random.key(0), (5, 3))
  st = flaxnorm.spectral_state_init(jax.random.key(1), w)
  _, unit = flaxnorm.spectral_normalize(w, st.u, st.v, n_steps=0)
  w_sn, scaled = flaxnorm.spectral_normalize(w, 3.0 * st.u, 0.5 * st.v, n_steps=0)
  np.testing.assert_allclose(scaled.sigma, unit.sigma, rtol=1e-6)
  np.testing.assert_allclose(unit.sigma, st.u @ w.T @ st.v, rtol=1e-6)
  chex.assert_trees_all_close(w_sn, w / unit.sigma, rtol=1e-6)
