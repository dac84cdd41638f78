"""Property tests over shapes, axes and dtypes: remove(wrap(layer)) gives the wrapped layer's output.

(compose∘decompose = identity and sigma(W / sigma) <= 1 are in test_math.py.)
Shapes come from small sets so that jit's cache keeps 200 examples per property fast.
"""

import functools

import flax.linen as nn
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import flaxnorm

_LAYERS = {
  "dense": (lambda f, dtype: nn.Dense(f, param_dtype=dtype, dtype=dtype), (2, 3)),
  "conv1d": (lambda f, dtype: nn.Conv(f, (2,), param_dtype=dtype, dtype=dtype), (2, 4, 3)),
  "conv2d": (lambda f, dtype: nn.Conv(f, (2, 2), param_dtype=dtype, dtype=dtype), (1, 3, 3, 2)),
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@functools.cache
def _pair(kind, features, dtype, method, axis):
  """Jitted (init, wrapped apply, plain apply after removal) for one configuration."""
  make, x_shape = _LAYERS[kind]
  dtype = _DTYPES[dtype]
  wrap = flaxnorm.weight_norm if method == "weight_norm" else flaxnorm.spectral_norm
  layer = wrap(make(features, dtype), axis=axis)
  x = jnp.ones(x_shape, dtype)

  @jax.jit
  def run(key, x):
    variables = layer.init(key, x)
    if method == "weight_norm":
      plain_vars = flaxnorm.remove_weight_norm(variables)
    else:
      plain_vars = flaxnorm.remove_spectral_norm(variables, axis=axis)
    return layer.apply(variables, x), make(features, dtype).apply(plain_vars, x)

  return run, x.shape


@settings(max_examples=100, deadline=None)
@given(
  kind=st.sampled_from(sorted(_LAYERS)),
  features=st.sampled_from([1, 3]),
  dtype=st.sampled_from(sorted(_DTYPES)),
  method=st.sampled_from(["weight_norm", "spectral_norm"]),
  axis_choice=st.sampled_from(["out", "in", "none"]),
  seed=st.integers(0, 2**16),
  data=st.data(),
)
def test_property_remove_after_wrap_preserves_outputs(
  kind, features, dtype, method, axis_choice, seed, data
):
  axis = {"out": -1, "in": -2, "none": None}[axis_choice]
  if method == "spectral_norm" and axis is None:
    axis = -1  # spectral norm needs a kept axis
  run, x_shape = _pair(kind, features, dtype, method, axis)
  x = data.draw(hnp.arrays(np.float32, x_shape, elements=st.floats(-3, 3, width=32)))
  wrapped, plain = run(jax.random.key(seed), jnp.asarray(x, _DTYPES[dtype]))
  wrapped, plain = np.asarray(wrapped, np.float32), np.asarray(plain, np.float32)
  assert np.all(np.isfinite(wrapped))
  tol = 1e-5 if dtype == "float32" else 3e-2
  np.testing.assert_allclose(plain, wrapped, rtol=tol, atol=tol * max(1.0, np.abs(wrapped).max()))
