# The README's two commands: `make demo` and `make test`. Each creates .venv
# with the interpreter in $(PYTHON) (Python 3.11 by default) if it is missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch for the PyTorch parity tests; the tests skip if it is missing.
	$(BIN)/python -m pip install -q "torch==2.13.0" || echo "torch not installed: PyTorch parity tests will be skipped"
	$(BIN)/python -m pip install -q -e ".[test,examples]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/digits_weight_norm.py

test: $(STAMP)
	$(BIN)/ruff check flaxnorm tests examples benchmarks
	$(BIN)/ruff format --check flaxnorm tests examples benchmarks
	$(BIN)/python -m pytest -n 2 -m "not slow and not multidevice" flaxnorm tests
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -m multidevice tests

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_train_step.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
