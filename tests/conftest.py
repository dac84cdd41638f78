"""Test configuration shared by every test file."""

import jax
import pytest

# Catch accidental dtype promotion (e.g. float16 params silently computed in
# float32 and returned as float32) the way equinox's suite does.
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def key():
  return jax.random.key(0)
