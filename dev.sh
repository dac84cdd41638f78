#!/usr/bin/env bash
# The README's commands: `./dev.sh demo` runs the main example, `./dev.sh test`
# runs lint, the docs build and the whole test suite (`./dev.sh docs` builds the
# docs into site/). Each creates .venv (Python 3.11) on first use and reinstalls
# when pyproject.toml changes; nothing needs installing by hand.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=.venv
BIN=$VENV/bin

setup() {
  if [[ ! -x $BIN/python ]]; then
    "$PYTHON" -m venv "$VENV"
  fi
  if [[ ! -f $VENV/.installed || pyproject.toml -nt $VENV/.installed ]]; then
    "$BIN/python" -m pip install -q --upgrade pip
    # CPU torch for the PyTorch parity tests (skipped if it cannot be installed).
    "$BIN/python" -m pip install -q "torch==2.13.0" ||
      echo "torch not installed: the PyTorch parity tests will be skipped" >&2
    "$BIN/python" -m pip install -q -e ".[test,examples,docs]"
    touch "$VENV/.installed"
  fi
}

case "${1:-}" in
  demo)
    setup
    "$BIN/python" examples/sngan_mixture.py
    ;;
  test)
    setup
    "$BIN/ruff" check flaxnorm tests examples benchmarks
    "$BIN/ruff" format --check flaxnorm tests examples benchmarks
    # Type check (standard mode; configuration in pyproject.toml).
    "$BIN/basedpyright"
    # The docs site, warnings as errors (bad docstrings, broken links).
    docs_tmp=$(mktemp -d) && trap 'rm -rf "$docs_tmp"' EXIT
    NO_MKDOCS_2_WARNING=1 "$BIN/mkdocs" build --strict --quiet --site-dir "$docs_tmp"
    "$BIN/python" -m pytest -n 2 -m "not slow and not multidevice" flaxnorm tests
    # Multi-device SPMD tests need 8 simulated CPU devices, set before JAX starts.
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      "$BIN/python" -m pytest -n 2 -m multidevice tests
    ;;
  docs)
    setup
    NO_MKDOCS_2_WARNING=1 "$BIN/mkdocs" build --strict --site-dir site
    echo "docs built: open site/index.html (or: $BIN/mkdocs serve)"
    ;;
  bench)
    setup
    # The suite (peers not installed are skipped: pip install -e ".[bench]").
    "$BIN/python" benchmarks/bench_suite.py "${@:2}"
    ;;
  *)
    echo "usage: ./dev.sh demo | test | docs | bench" >&2
    exit 2
    ;;
esac
