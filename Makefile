# `make demo` and `make test` each create .venv (Python >= 3.12) on first use.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test lint benchmark

$(VENV)/.installed: pyproject.toml scripts/bootstrap-venv.sh
	bash scripts/bootstrap-venv.sh

venv: $(VENV)/.installed

demo: venv
	$(PY) scripts/demo.py --output outputs/demo_latents.h5ad

lint: venv
	$(PY) -m ruff check src tests benchmarks scripts tutorials
	$(PY) -m ruff format --check src tests benchmarks scripts tutorials

test: lint
	$(PY) -m pytest

benchmark: venv
	$(PY) benchmarks/benchmark_core.py
