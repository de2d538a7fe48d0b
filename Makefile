# s3vos: two commands set everything up on a fresh machine.
#   make demo   install into .venv, then run the whole pipeline on the embedded defaults
#   make test   install, then run every test (slow ones included; CI runs this)
# TORCH=cpu (default) installs the CPU build of torch 2.13.0; TORCH=cuda the CUDA build for GPU machines.

PYTHON ?= python3
TORCH ?= cpu
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := constraints/$(TORCH).txt
TORCH_SPEC_cpu := torch==2.13.0+cpu
TORCH_SPEC_cuda := torch==2.13.0
STAMP := $(VENV)/.installed-$(TORCH)
OPS_STAMP := $(VENV)/.ops-$(TORCH)
DEMO_DIR ?= demo_out
PYTEST_ARGS ?=
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
export DS_ACCELERATOR := $(if $(filter cpu,$(TORCH)),cpu,cuda)
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo test test-fast lint bench mutation clean

install: $(STAMP) $(OPS_STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" setuptools wheel

# torch first, alone, held by the constraints file; then the project. pip leaves a satisfied torch alone,
# so a second install reinstalls nothing.
$(STAMP): $(VENV)/bin/python pyproject.toml $(CONSTRAINTS)
	$(PIP) install -q -c $(CONSTRAINTS) "$(TORCH_SPEC_$(TORCH))"
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[dev]'
	$(PIP) check
	$(PY) -c "import torch; print('torch', torch.__version__)"
	touch $@

# DeepSpeed's one JIT-compiled op for CPU ranks (1-2 min of C++), built once into .venv/torch_extensions, where the
# trainer looks (training/ds_ops.py); a no-op for CUDA.
$(OPS_STAMP): $(STAMP)
	$(PY) -m training.ds_ops
	touch $@

demo: install
	DEMO_DIR=$(DEMO_DIR) $(PY) -m training.demo

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow and not fault" $(PYTEST_ARGS)

# Mutation testing (mutmut; not part of `make test`: tens of minutes). Mutates the modules listed in pyproject.toml
# ([tool.mutmut]) in a copy under mutants/ and runs the tests that reach each mutated function; prints the mutants
# that no test killed. MUTANTS narrows it, e.g. make mutation MUTANTS='training.checkpoint.*'. Run it before
# resolving an issue that touches those modules; report the survivors.
MUTANTS ?= training.metrics.* training.checkpoint.* data_pipeline.sampling.* data_pipeline.loader.*level_at* \
	data_pipeline.loader.*state_dict* model.convert.*
mutation: install
	$(VENV)/bin/mutmut run --max-children 2 $(foreach m,$(MUTANTS),'$(m)')
	$(VENV)/bin/mutmut results

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) benchmarks/bench_shard.py
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_eval.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) bench_out .pytest_cache
