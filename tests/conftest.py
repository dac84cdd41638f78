"""Test configuration shared by every test file."""

import os
import shutil
import subprocess
import sys
import tempfile

# Compiling dominates this suite (tiny shapes, many distinct functions, many
# eager ops), so XLA:CPU compiles for speed: LLVM's -O0, and the older
# emitters instead of the fusion emitters (together a third to a half of the
# compile time; the code they make is slower, which tiny shapes do not notice).
# Set before JAX creates its backend, each only if this jaxlib knows it; a flag
# already in XLA_FLAGS wins, and subprocesses (the example smoke runs, xdist
# workers) inherit them.
_FAST_COMPILE = {"xla_backend_optimization_level": "0", "xla_cpu_use_fusion_emitters": "false"}


def _known(flags: list[str]) -> list[str]:
  """The ``flags`` this jaxlib's XLA knows, tried in a subprocess (XLA aborts at start-up
  on an unknown flag, naming it; a later jaxlib may drop a test-only flag)."""
  while flags:
    env = {**os.environ, "XLA_FLAGS": " ".join([os.environ.get("XLA_FLAGS", ""), *flags])}
    probe = [sys.executable, "-c", "import jax; jax.devices('cpu')"]
    err = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=300).stderr
    named = next((line.split() for line in err.splitlines() if "Unknown flag" in line), [])
    unknown = [f for f in flags if f in named]
    if not unknown:
      return flags
    flags = [f for f in flags if f not in unknown]
  return flags


_NEW = [f"--{k}={v}" for k, v in _FAST_COMPILE.items() if k not in os.environ.get("XLA_FLAGS", "")]
if _NEW and not os.environ.get("FLAXNORM_TESTS_XLA_FLAGS_SET"):  # (workers: set by the controller)
  os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_known(_NEW)]).strip()
  os.environ["FLAXNORM_TESTS_XLA_FLAGS_SET"] = "1"

# Many tests compile the same program from different closures (the same layer
# on the same shapes), which JAX's in-memory cache, keyed on the function,
# misses; its persistent cache is keyed on the program. One directory per run,
# shared by the xdist workers (they inherit the controller's environment) and
# removed at the end; a directory given in JAX_COMPILATION_CACHE_DIR is kept.
if "PYTEST_XDIST_WORKER" not in os.environ and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="flaxnorm-jax-cache-")
  os.environ["FLAXNORM_TESTS_OWN_JAX_CACHE"] = "1"
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402 (after the environment it reads)
import pytest  # noqa: E402


def pytest_unconfigure(config):
  """Removes the run's own compilation cache (in the controller, after the workers)."""
  if os.environ.get("FLAXNORM_TESTS_OWN_JAX_CACHE") and not hasattr(config, "workerinput"):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


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
