# Set-up is automatic: `make demo` and `make test` create .venv on first use.
# TORCH selects the torch build: on this CPU machine torch==2.13.0 is the local CPU wheel; on a
# GPU machine the same pin from PyPI is the normal CUDA build (override: make TORCH='torch==X').
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin

.PHONY: demo test figures bench bench-gpu clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/dit-probe demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest

figures: $(VENV)/.installed
	$(BIN)/dit-probe figures

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_recorder.py

# on a machine with a CUDA GPU: the recorder's GPU tests, then the full-denoiser true-width table
bench-gpu: $(VENV)/.installed
	$(BIN)/python -m pytest -p no:cacheprovider -rs tests/test_recorder_scale.py
	$(BIN)/python benchmarks/bench_true_width.py --gpu

clean:
	rm -rf $(VENV) outputs
