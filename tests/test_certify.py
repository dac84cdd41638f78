"""Certified spectral-norm bounds by Gram iteration (flaxnorm._certify).

References are exact up to float64 rounding: Dense against numpy's SVD of the
float64 matrix; Conv against the SVD of the layer's dense matrix (its
Jacobian), built by applying ``flax.linen.Conv`` in float64 (``jax.enable_x64``)
to every one-hot input. The bound's floating-point margin (>= 70 ulps) is far
above the reference's error (a few ulps), so ``bound >= reference`` is asserted
with no tolerance.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import flaxnorm
from flaxnorm import _certify
from flaxnorm._certify import DEFAULT_GRAM_STEPS, conv_norm_bound, matrix_norm_bound
from flaxnorm._power import as_matrix


def _sigma(mat) -> float:
  return float(np.linalg.svd(np.asarray(mat, np.float64), compute_uv=False)[0])


@functools.cache
def _conv_fn(features, window, spatial, cin, strides, padding, groups, dilation):
  conv = nn.Conv(
    features,
    window,
    strides=strides,
    padding=padding,
    feature_group_count=groups,
    kernel_dilation=dilation,
    use_bias=False,
    dtype=jnp.float64,
    param_dtype=jnp.float64,
  )
  n_in = int(np.prod(spatial)) * cin
  basis = np.eye(n_in).reshape(n_in, *spatial, cin)  # one example per input entry
  return lambda kernel: conv.apply({"params": {"kernel": kernel}}, jnp.asarray(basis))


def _layer_norm(kernel, spatial, *, strides=1, padding="SAME", groups=1, dilation=1) -> float:
  """Operator norm of flax.linen.Conv with ``kernel`` on one input of shape ``(*spatial, in)``."""
  kernel = np.asarray(kernel, np.float64)
  cin = kernel.shape[-2] * groups
  d = len(spatial)
  fn = _conv_fn(
    kernel.shape[-1],
    kernel.shape[:d],
    tuple(spatial),
    cin,
    strides,
    padding,
    groups,
    dilation,
  )
  with jax.enable_x64(True):
    out = np.asarray(fn(jnp.asarray(kernel, jnp.float64)))
  assert out.dtype == np.float64
  return _sigma(out.reshape(out.shape[0], -1))  # (inputs, outputs): same sigma_1


def _gaussian(seed, shape, scale=1.0):
  return np.random.default_rng(seed).standard_normal(shape) * scale


# ---------------------------------------------------------------- dense


@settings(max_examples=150, deadline=None)
@given(
  m=st.integers(1, 64),
  n=st.integers(1, 64),
  scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30]),
  seed=st.integers(0, 2**32 - 1),
)
def test_matrix_bound_is_above_svd_and_within_one_percent(m, n, scale, seed):
  w = _gaussian(seed, (m, n), scale)
  sigma = _sigma(w)
  bound = matrix_norm_bound(w)
  assert bound >= sigma
  assert bound <= 1.01 * sigma


@pytest.mark.parametrize(
  ("shape", "axis"),
  [
    ((3, 3, 4, 8), -1),
    ((3, 3, 4, 8), (0, 3)),
    ((2, 5, 7), 1),
    ((2, 5, 7), (0, 2)),
    ((4, 3, 2, 5), 0),
  ],
)
def test_matrix_bound_rank_3_and_4_kernels_follow_as_matrix(shape, axis):
  w = _gaussian(sum(shape), shape).astype(np.float32)
  sigma = _sigma(as_matrix(jnp.asarray(w), axis))
  bound = matrix_norm_bound(w, axis=axis)
  assert sigma <= bound <= 1.01 * sigma


def test_matrix_bound_axis_does_not_change_a_2d_matrix():
  w = _gaussian(0, (5, 9))
  assert matrix_norm_bound(w, axis=0) == pytest.approx(matrix_norm_bound(w, axis=1), rel=1e-12)


@pytest.mark.parametrize("shape", [(6, 4), (3, 9), (5, 5)])
def test_matrix_bound_matches_the_unscaled_gram_recurrence(shape):
  # G_0 = W, G_{t+1} = G_t G_t^T (no rescaling, small T): sigma_1 <= min over t <= T of
  # min(||G_t||_F, sqrt(||G_t||_1 ||G_t||_inf))^(1 / 2^t).
  w = _gaussian(1, shape)
  g, best = w, np.inf
  for steps in range(5):
    if steps:
      g = g @ g.T if g.shape[0] <= g.shape[1] else g.T @ g
    schur = np.sqrt(np.abs(g).sum(axis=0).max() * np.abs(g).sum(axis=1).max())
    best = min(best, min(np.linalg.norm(g), schur) ** (1.0 / 2**steps))
    if steps:
      assert matrix_norm_bound(w, n_steps=steps) == pytest.approx(best, rel=1e-12)


def test_matrix_bound_tightens_with_steps():
  w = _gaussian(2, (40, 30))
  bounds = [matrix_norm_bound(w, n_steps=t) for t in range(1, 12)]
  assert all(a >= b for a, b in itertools.pairwise(bounds))
  assert bounds[-1] == pytest.approx(_sigma(w), rel=1e-9)


def test_matrix_bound_exact_cases_and_dtypes():
  assert matrix_norm_bound(np.zeros((3, 4))) == 0.0
  assert matrix_norm_bound(np.array([[-2.5]])) >= 2.5
  # equal singular values: orthogonal is exact (row sums of G_1 = I), a rank-r
  # projector near the Frobenius worst case r^(1 / 2^(T + 1)).
  assert 1.0 <= matrix_norm_bound(np.eye(8)) <= 1.0 + 1e-12
  q, _ = np.linalg.qr(_gaussian(4, (32, 32)))
  assert 1.0 <= matrix_norm_bound(q) <= 1.0 + 1e-9
  projector = q[:, :16] @ q[:, :16].T
  worst = 16 ** (1 / 2 ** (DEFAULT_GRAM_STEPS + 1))
  assert 1.0 <= matrix_norm_bound(projector) <= worst
  w = _gaussian(3, (16, 8))
  ref = matrix_norm_bound(w.astype(np.float32))
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    x = jnp.asarray(w, dtype)
    assert matrix_norm_bound(x) >= _sigma(np.asarray(x, np.float64))
  assert matrix_norm_bound(jnp.asarray(w, jnp.float32)) == ref
  # huge and tiny entries together do not overflow or underflow the bound
  w2 = np.array([[1e300, 0.0], [0.0, 1e-300]])
  assert 1e300 <= matrix_norm_bound(w2) <= 1.0000001e300


# ---------------------------------------------------------------- conv

_CONV_CASES = {
  "3x3 SAME": dict(window=(3, 3), spatial=(8, 8), cin=4, cout=6),
  "3x3 VALID": dict(window=(3, 3), spatial=(8, 8), cin=4, cout=6, padding="VALID"),
  "3x3 stride 2 SAME": dict(window=(3, 3), spatial=(8, 8), cin=4, cout=6, strides=2),
  "3x3 stride (2, 1) VALID": dict(
    window=(3, 3), spatial=(7, 8), cin=3, cout=5, strides=(2, 1), padding="VALID"
  ),
  "grouped 2": dict(window=(3, 3), spatial=(6, 6), cin=8, cout=6, groups=2),
  "grouped 4 circular": dict(
    window=(3, 3), spatial=(6, 6), cin=8, cout=8, groups=4, padding="CIRCULAR"
  ),
  "circular 3x3 8->8": dict(window=(3, 3), spatial=(8, 8), cin=8, cout=8, padding="CIRCULAR"),
  "circular stride 2": dict(
    window=(3, 3), spatial=(8, 8), cin=4, cout=4, padding="CIRCULAR", strides=2
  ),
  "1-D SAME": dict(window=(5,), spatial=(16,), cin=3, cout=4),
  "1-D CAUSAL": dict(window=(3,), spatial=(12,), cin=3, cout=4, padding="CAUSAL"),
  "1-D dilated 2": dict(window=(3,), spatial=(12,), cin=2, cout=3, dilation=2),
  "dilated circular": dict(
    window=(2, 2), spatial=(6, 6), cin=2, cout=3, dilation=2, padding="CIRCULAR"
  ),
  "SAME_LOWER stride 2": dict(
    window=(4, 4), spatial=(7, 7), cin=2, cout=3, strides=2, padding="SAME_LOWER"
  ),
  "explicit pads": dict(window=(3, 3), spatial=(6, 6), cin=2, cout=3, padding=((2, 0), 1)),
  "int pad": dict(window=(3, 3), spatial=(5, 5), cin=2, cout=2, padding=3),
  "3-D SAME": dict(window=(3, 3, 3), spatial=(4, 4, 4), cin=2, cout=3),
  "window larger than circular input": dict(
    window=(5, 5), spatial=(3, 3), cin=2, cout=2, padding="CIRCULAR"
  ),
}


@pytest.mark.parametrize("name", sorted(_CONV_CASES))
def test_conv_bound_is_above_the_layer_norm(name):
  case = dict(_CONV_CASES[name])
  window, spatial, cin, cout = (case.pop(k) for k in ("window", "spatial", "cin", "cout"))
  groups = case.get("groups", 1)
  kernel = _gaussian(len(name), (*window, cin // groups, cout))
  kwargs = dict(
    strides=case.get("strides", 1),
    padding=case.get("padding", "SAME"),
    feature_group_count=groups,
    kernel_dilation=case.get("dilation", 1),
  )
  true = _layer_norm(
    kernel,
    spatial,
    strides=kwargs["strides"],
    padding=kwargs["padding"],
    groups=groups,
    dilation=kwargs["kernel_dilation"],
  )
  bound = conv_norm_bound(kernel, spatial, **kwargs)
  assert bound >= true
  if kwargs["padding"] == "CIRCULAR":  # strided: n % s == 0 here
    assert bound <= 1.01 * true  # the same operator: only Gram's slack
  else:
    assert bound <= 2.5 * true


def test_circular_bound_matches_the_dft_blocks():
  # Sedghi et al.: a circular conv's singular values are those of the FFT blocks.
  kernel = _gaussian(7, (3, 3, 8, 8))
  blocks = np.fft.fft2(kernel, s=(8, 8), axes=(0, 1))  # (8, 8, in, out)
  dft_sigma = float(np.linalg.svd(blocks, compute_uv=False).max())
  assert _layer_norm(kernel, (8, 8), padding="CIRCULAR") == pytest.approx(dft_sigma, rel=1e-12)
  bound = conv_norm_bound(kernel, (8, 8), padding="CIRCULAR")
  assert dft_sigma <= bound <= 1.01 * dft_sigma


def test_zero_padding_bound_is_the_circular_norm_at_the_argued_size():
  # SAME at stride 1 on n embeds in the circular conv on n + k // 2; VALID on n in the one on n.
  kernel = _gaussian(8, (3, 3, 3, 4))
  for padding, size in (("SAME", 9), ("VALID", 8)):
    assert conv_norm_bound(kernel, (8, 8), padding=padding) == conv_norm_bound(
      kernel, (size, size), padding="CIRCULAR"
    )
  k1 = _gaussian(9, (3, 2, 2))
  assert conv_norm_bound(k1, (10,), padding="CAUSAL") == conv_norm_bound(
    k1, (12,), padding="CIRCULAR"
  )


@pytest.mark.parametrize(
  ("window", "spatial", "strides", "padding", "dilation", "tight"),
  [
    ((3, 3), (8, 8), 2, "CIRCULAR", 1, 1e-4),  # the same operator: Gram's slack only
    ((3, 3), (8, 9), (2, 3), "CIRCULAR", 1, 1e-4),
    ((3,), (12,), 3, "CIRCULAR", 2, 1e-4),
    ((2, 2, 2), (4, 4, 4), 2, "CIRCULAR", 1, 1e-4),
    ((3, 3), (16, 16), 2, "SAME", 1, 0.05),  # the discriminator's layer: was 1.2 to 1.4
    ((4,), (15,), 2, "VALID", 1, 0.1),
  ],
)
def test_strided_conv_bound_reads_the_input_phases(
  window, spatial, strides, padding, dilation, tight
):
  """A stride-s circular conv is a stride-1 one on N / s over the input's s phases: its
  norm, not the stride-1 conv's (which the strided outputs only select rows of)."""
  kernel = _gaussian(len(spatial) + sum(spatial), (*window, 3, 4))
  kwargs = dict(strides=strides, padding=padding, dilation=dilation)
  true = _layer_norm(kernel, spatial, **kwargs)
  bound = conv_norm_bound(
    kernel, spatial, strides=strides, padding=padding, kernel_dilation=dilation
  )
  assert true <= bound <= (1 + tight) * true


def test_conv_bound_tightens_with_steps_and_stays_valid():
  kernel = _gaussian(10, (3, 3, 6, 6))
  true = _layer_norm(kernel, (6, 6), padding="CIRCULAR")
  bounds = [conv_norm_bound(kernel, (6, 6), padding="CIRCULAR", n_steps=t) for t in range(1, 10)]
  assert all(a >= b >= true for a, b in itertools.pairwise(bounds))
  assert bounds[-1] == pytest.approx(true, rel=1e-6)


def test_conv_bound_of_copy_and_orthogonal_kernels_is_one():
  kernel = np.zeros((3, 3, 4, 4))
  kernel[1, 1] = np.linalg.qr(_gaussian(11, (4, 4)))[0]  # an orthogonal 1x1 conv, padded to 3x3
  for padding in ("SAME", "VALID", "CIRCULAR"):
    for strides in (1, 2):
      bound = conv_norm_bound(kernel, (5, 5), padding=padding, strides=strides)
      assert 1.0 <= bound <= 1.0 + 1e-9
  assert conv_norm_bound(np.zeros((3, 3, 2, 2)), (5, 5)) == 0.0


_PADDING_CHOICES = ["SAME", "VALID", "CIRCULAR", "SAME_LOWER", 1, ((0, 2), (1, 0))]


@settings(max_examples=50, deadline=None)  # each draw compiles its own float64 conv
@given(
  d=st.sampled_from([1, 2]),
  k=st.integers(1, 3),
  cin_g=st.sampled_from([1, 2, 4]),
  cout_g=st.sampled_from([1, 3, 4]),
  groups=st.sampled_from([1, 1, 2]),
  stride=st.sampled_from([1, 1, 2, 3]),
  padding=st.sampled_from(_PADDING_CHOICES),
  dilation=st.sampled_from([1, 1, 2]),
  seed=st.integers(0, 2**32 - 1),
)
def test_property_conv_bound_is_above_the_layer_norm(
  d, k, cin_g, cout_g, groups, stride, padding, dilation, seed
):
  spatial = (7,) * d if d == 2 else (11,)
  if padding == ((0, 2), (1, 0)):
    padding = padding[:d]
  kernel = _gaussian(seed, (k,) * d + (cin_g, cout_g * groups))
  true = _layer_norm(
    kernel, spatial, strides=stride, padding=padding, groups=groups, dilation=dilation
  )
  bound = conv_norm_bound(
    kernel,
    spatial,
    strides=stride,
    padding=padding,
    feature_group_count=groups,
    kernel_dilation=dilation,
  )
  assert bound >= true
  if padding == "CIRCULAR" and stride == 1:
    assert bound <= 1.01 * true


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    (dict(w=np.ones((3, 3), np.int32)), TypeError, "w at matrix_norm_bound must be a floating"),
    (dict(w=np.ones((3, 3), np.complex64)), TypeError, "floating"),
    (dict(w=[[1.0, 2.0]]), TypeError, "floating"),
    (dict(w=np.ones(3)), ValueError, "at least 2 dims"),
    (dict(w=np.array([[1.0, np.nan]])), ValueError, "finite"),
    (dict(w=np.ones((3, 3)), axis=None), ValueError, "axis"),
    (dict(w=np.ones((3, 3)), axis=2), ValueError, "axis 2 is out of range"),
    (dict(w=np.ones((3, 3)), n_steps=0), ValueError, "n_steps must be >= 1"),
    (dict(w=np.ones((3, 3)), n_steps=2.0), TypeError, "n_steps must be an int"),
    (dict(w=np.ones((3, 3)), n_steps=41), ValueError, "n_steps must be <= 40"),
  ],
)
def test_matrix_bound_bad_inputs(kwargs, error, match):
  with pytest.raises(error, match=match):
    matrix_norm_bound(kwargs.pop("w"), **kwargs)


_K = np.ones((3, 3, 2, 4), np.float32)


@pytest.mark.parametrize(
  ("kernel", "shape", "kwargs", "error", "match"),
  [
    (_K.astype(np.int32), (8, 8), {}, TypeError, "kernel at conv_norm_bound must be a floating"),
    (_K, (8,), {}, ValueError, "input_shape .* must be 2 positive ints"),
    (_K, (8, 8, 8), {}, ValueError, "input_shape .* must be 2 positive ints"),
    (_K, (8, 0), {}, ValueError, "input_shape"),
    (_K, 8, {}, TypeError, "input_shape .* must be a sequence"),
    (_K, (2, 8), dict(padding="VALID"), ValueError, "smaller than the window along spatial axis 0"),
    (_K, (8, 8), dict(padding="VALID", kernel_dilation=4), ValueError, "dilated window 9"),
    (_K, (8, 8), dict(n_steps=0), ValueError, "n_steps must be >= 1"),
    (_K, (8, 8), dict(padding="FULL"), ValueError, "padding at conv_norm_bound must be one of"),
    (_K, (8, 8), dict(padding="REFLECT"), ValueError, "REFLECT padding is not supported"),
    (_K, (8, 8), dict(padding=((1, 1),)), ValueError, "padding"),
    (_K, (8, 8), dict(padding=-1), ValueError, "non-negative"),
    (_K, (8, 8), dict(padding=((True, 1), (1, 1))), ValueError, "padding at conv_norm_bound"),
    (_K, (8, 8), dict(padding=(1, False)), ValueError, "padding at conv_norm_bound"),
    (_K, (8, 8), dict(padding=True), ValueError, "padding at conv_norm_bound"),
    (_K, (8, 8), dict(strides=(1, True)), ValueError, "strides"),
    (
      _K,
      (10**6, 10**6),
      {},
      ValueError,
      r"input_shape .* too large: \(1000000, 1000000\) .* "
      r"needs 2.98e\+04 GiB; the limit is 2 GiB .* up to about 8192 x 8192",
    ),
    (_K, (8193, 8193), {}, ValueError, "input_shape at conv_norm_bound is too large"),
    (_K, (8, 8), dict(padding="CAUSAL"), ValueError, "CAUSAL.* needs a 1-D conv"),
    (_K, (8, 8), dict(strides=0), ValueError, "strides"),
    (_K, (8, 8), dict(strides=(1, 1, 1)), ValueError, "strides"),
    (_K, (8, 8), dict(kernel_dilation=(1, 0)), ValueError, "kernel_dilation"),
    (_K, (8, 8), dict(feature_group_count=3), ValueError, "feature_group_count=3 .* divide"),
    (_K, (8, 8), dict(feature_group_count=0), ValueError, "feature_group_count must be >= 1"),
    (np.ones((3, 3)), (8,), {}, ValueError, "1 to 3 spatial dims"),
    (_K * np.inf, (8, 8), {}, ValueError, "finite"),
  ],
)
def test_conv_bound_bad_inputs(kernel, shape, kwargs, error, match):
  with pytest.raises(error, match=match):
    conv_norm_bound(kernel, shape, **kwargs)


def test_conv_bound_takes_numpy_ints():
  kernel = _gaussian(14, (3, 3, 2, 4))
  want = conv_norm_bound(kernel, (8, 8), padding=1, strides=2)
  i = np.int64
  for padding in (i(1), (i(1), 1), ((i(1), i(1)), (1, 1))):
    assert conv_norm_bound(kernel, (i(8), 8), padding=padding, strides=i(2)) == want


def test_dft_batches_count_the_kernel_taps(monkeypatch):
  """A long 1-D window with one channel: the DFT's (frequencies, taps) arrays stay in a batch."""
  kernel = _gaussian(15, (9, 1, 1))
  want = conv_norm_bound(kernel, (64,))
  monkeypatch.setattr(_certify, "_CHUNK_BYTES", 16 * (1 + 2 * 9) * 4)  # 4 frequencies a batch
  sizes = []
  dft = _certify._dft_blocks

  def recorded(kmat, taps, freqs, n):
    sizes.append(freqs.shape[0] * taps.shape[0])
    return dft(kmat, taps, freqs, n)

  monkeypatch.setattr(_certify, "_dft_blocks", recorded)
  assert conv_norm_bound(kernel, (64,)) == pytest.approx(want, rel=1e-12)
  assert max(sizes) == 4 * 9


def test_conv_bound_does_not_depend_on_chunking_or_pruning(monkeypatch):
  # Pruning and batching change which blocks run every step, never the max: compare with
  # every block iterated to the end on its own (no floor, no early stop).
  kernel = _gaussian(12, (3, 3, 3, 4))
  blocks = np.fft.fft2(kernel, s=(9, 9), axes=(0, 1)).reshape(-1, 3, 4)
  full = max(_certify._block_bounds(b[None], DEFAULT_GRAM_STEPS)[0][0] for b in blocks)
  bound = conv_norm_bound(kernel, (8, 8))
  assert bound >= full  # + the DFT's rounding term
  assert bound == pytest.approx(full, rel=1e-12)
  monkeypatch.setattr(_certify, "_CHUNK_BYTES", 16 * (3 * 4 + 2 * 9) * 5)  # 5 frequencies a batch
  assert conv_norm_bound(kernel, (8, 8)) == pytest.approx(bound, rel=1e-12)
  # groups: block-diagonal, the max over groups (group i: out features [2i, 2i + 2))
  by_group = max(conv_norm_bound(kernel[..., :2], (8, 8)), conv_norm_bound(kernel[..., 2:], (8, 8)))
  grouped = conv_norm_bound(kernel, (8, 8), feature_group_count=2)
  assert grouped == pytest.approx(by_group, rel=1e-12)


def test_large_blocks_take_the_herk_path_and_stay_valid():
  # 20 x 20 complex blocks use BLAS zherk (conjugated Gram matrices): same bound.
  kernel = _gaussian(13, (3, 3, 20, 20))
  blocks = np.fft.fft2(kernel, s=(4, 4), axes=(0, 1)).reshape(-1, 20, 20)
  true = float(np.linalg.svd(blocks, compute_uv=False).max())
  assert _layer_norm(kernel, (4, 4), padding="CIRCULAR") == pytest.approx(true, rel=1e-12)
  bound = conv_norm_bound(kernel, (4, 4), padding="CIRCULAR")
  assert true <= bound <= 1.01 * true
  assert _certify._gram(blocks[:2]) == pytest.approx(
    np.conj(blocks[:2] @ np.conj(np.swapaxes(blocks[:2], 1, 2))), rel=1e-12
  )


def test_estimate_is_nonnegative_for_a_negative_stored_sigma():
  """A state not iterated yet can hold sigma < 0; w / sigma has norm ||w|| / |sigma|."""
  x = jnp.ones((1, 6))
  layer = flaxnorm.spectral_norm(nn.Dense(5), n_init_iterations=0)
  variables = layer.init(jax.random.key(0), x)
  variables["spectral"]["kernel_sigma"] = -jnp.abs(variables["spectral"]["kernel_sigma"])
  assert float(flaxnorm.lipschitz_bound(variables).estimate) == pytest.approx(1.0)


def test_bounds_refuse_traced_kernels_and_stay_quiet_at_overflow():
  """Under jit it was JAX's TracerArrayConversionError; near 1e308 numpy warned."""
  with pytest.raises(TypeError, match=r"w at matrix_norm_bound is traced .*outside"):
    jax.jit(flaxnorm.matrix_norm_bound)(jnp.ones((2, 2)))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert flaxnorm.matrix_norm_bound(np.full((4, 4), 1e308)) == math.inf
