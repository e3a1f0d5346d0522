# sglang-dsde: `make env`, `make test`, `make demo`. Everything installs from this repo's files.
SHELL := /bin/bash
PYTHON_BOOT ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ENV_STAMP := $(VENV)/.env-stamp
PYTEST_ARGS ?=

.PHONY: env test test-unit test-integration test-e2e demo lock clean-env
.PHONY: bench bench-quick sim wheel

env: $(ENV_STAMP)

# Lean CPU install: CPU torch plus sglang==0.5.23 and exactly the packages it imports,
# all pinned in requirements/cpu.lock and installed with --no-deps (SGLang's own
# dependency list would pull CUDA torch and ~8 GB of CUDA kernels nobody can run here).
$(ENV_STAMP): requirements/cpu.lock setup.cfg setup.py pyproject.toml sglang_dsde-early.pth
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PIP) install -q --no-deps -r requirements/cpu.lock
	$(PIP) install -q --no-deps -e .
	@# An editable install does not carry the wheel's root .pth file (setup.py adds it
	@# to built wheels); copy it so spawned SGLang processes get the early hooks too.
	cp sglang_dsde-early.pth "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
	$(PY) -c 'import torch, torchvision, sglang.srt.server_args, sglang_dsde.plugin'
	@touch $@

test: env
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-unit: env
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: env
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

test-e2e: env
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

demo: env
	$(PY) -m tools.demo

# Real-engine comparison (bench/compare.py): every contender on a fresh CPU
# server through sglang.bench_serving. bench-quick: mix, C 1/4, T 0 (~10 min on 2 cores).
# Extra flags through ARGS, e.g. ARGS="--validate-trace TRACE".
bench: env
	$(PY) bench/compare.py $(ARGS)

bench-quick: env
	$(PY) bench/compare.py --quick $(ARGS)

sim: env
	$(PY) bench/simulate.py

# The package a user installs (dist/sglang_dsde-*.whl); tests/integration/test_wheel_install.py
# installs one built from a clean clone into a fresh venv and resolves DSDE there.
wheel: env
	$(PIP) wheel -q --no-deps --no-build-isolation . -w dist

# Re-pin after editing requirements/cpu.in (run in a scratch venv made from cpu.in).
lock: env
	$(PIP) freeze --all --exclude-editable | grep -v '^pip==' | sed 's|^torchvision @ .*|torchvision==0.28.0|' > requirements/cpu.lock.new
	@echo "review and move requirements/cpu.lock.new to requirements/cpu.lock"

clean-env:
	rm -rf $(VENV)
