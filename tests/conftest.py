"""Test configuration shared by every test file."""

import os

# Compiling dominates this suite (tiny shapes, many distinct functions), and
# LLVM's -O0 halves XLA's CPU compile time; the code it makes is slower, which
# tiny shapes do not notice. Set before JAX creates its backend; a level given
# in XLA_FLAGS wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(
    filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"])
  )

import jax
import pytest


@pytest.fixture
def strict_promotion():
  """Catches accidental dtype promotion, as equinox's suite does.

  Not global: optax and Flax layers themselves rely on standard promotion.
  """
  with jax.numpy_dtype_promotion("strict"):
    yield


@pytest.fixture
def output_side(monkeypatch):
  """Flax's linear layers scale their output whatever its size (the per-call side choice off).

  For tests of the output path itself on shapes where the choice would take the
  kernel side (``tests/test_output_side.py`` tests the choice).
  """
  from flaxnorm import _output_scale

  monkeypatch.setattr(_output_scale, "KERNEL_SIDE_RATIO", float("inf"))
  monkeypatch.setattr(_output_scale, "CONV_KERNEL_SIDE_RATIO", float("inf"))
