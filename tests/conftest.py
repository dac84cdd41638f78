"""Test configuration shared by every test file."""

import jax
import pytest


@pytest.fixture
def strict_promotion():
  """Catches accidental dtype promotion, as equinox's suite does.

  Not global: optax and Flax layers themselves rely on standard promotion.
  """
  with jax.numpy_dtype_promotion("strict"):
    yield
