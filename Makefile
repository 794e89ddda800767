# `make demo` and `make test` each create .venv (Python >= 3.12) on first use.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test lint benchmark docs

$(VENV)/.installed: pyproject.toml scripts/bootstrap-venv.sh
	bash scripts/bootstrap-venv.sh

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/pertpy-contrastive demo --output outputs/demo_latents.h5ad --overwrite

# The hooks of .pre-commit-config.yaml (ruff, ruff-format, pyproject-fmt, the standard hooks),
# run from the venv on every tracked file.
lint: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/pre-commit run --all-files --show-diff-on-failure

test: lint
	$(PY) -m pytest

# Rewrites docs/benchmarks.md from benchmarks/results/*.json. The benchmark scripts themselves
# run by hand (minutes to hours each); each one's docstring gives its command.
benchmark: venv
	$(PY) benchmarks/report.py

# The HTML documentation (Sphinx, docs/conf.py); warnings are errors, as on Read the Docs.
docs: venv
	$(PY) -m sphinx -W -b html docs docs/_build/html
