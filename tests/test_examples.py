"""Smoke tests of the scripts in examples/: a few steps each, PNGs into a temporary --out.

Each script runs in a subprocess, as a user runs it, with this checkout first on
``sys.path``. The numbers of a 2-step run mean nothing; a script's own checks
that do not depend on training (``remove_weight_norm`` leaves the output as it
was, PyTorch and Flax agree) still make it exit non-zero.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from importlib.util import find_spec

import pytest

ROOT = pathlib.Path(__file__).parents[1]

EXAMPLES = {
  "digits_weight_norm.py": ["learning_curves.png"],
  "lipschitz_classifier.py": ["lipschitz_classifier.png"],
  "sngan_mixture.py": ["samples.png", "sigmas.png"],
  "vocoder_upsampler.py": ["vocoder.png"],
  "nnx_sngan.py": ["nnx_sngan.png"],
  "torch_interop.py": ["torch_interop.png"],
}


def run_example(script: str, out: pathlib.Path, *python_args: str) -> subprocess.CompletedProcess:
  env = {
    **os.environ,
    "MPLBACKEND": "Agg",
    "TQDM_DISABLE": "1",
    # Compile time dominates a 2-step run, so compile faster (the XLA_FLAGS
    # conftest.py sets are inherited); the runs stay the same apart from float
    # rounding and the random streams. JAX's default (partitionable) threefry
    # compiles slowly on CPU for some shapes (a conv net's init: 25 s instead of 7).
    "JAX_THREEFRY_PARTITIONABLE": "0",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
  }
  cmd = [sys.executable, *python_args, str(ROOT / "examples" / script)]
  return subprocess.run(
    [*cmd, "--steps", "2", "--out", str(out)],
    env=env,
    cwd=out,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_every_example_is_tested():
  assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == sorted(EXAMPLES)


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_runs_and_writes_its_pngs(script, tmp_path):
  if script == "torch_interop.py" and find_spec("torch") is None:
    pytest.skip("torch is not installed (test_torch_interop_skips_without_torch covers it)")
  proc = run_example(script, tmp_path)
  assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
  for png in EXAMPLES[script]:
    path = tmp_path / png
    assert path.is_file() and path.stat().st_size > 0, f"{script} did not write {png}"


def test_torch_interop_skips_without_torch(tmp_path):
  # `sys.modules["torch"] = None` makes torch unimportable, as if it were not installed.
  code = (
    "import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
  )
  proc = run_example("torch_interop.py", tmp_path, "-c", code)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "skipped" in proc.stdout
  assert not list(tmp_path.iterdir())
