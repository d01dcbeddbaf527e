# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch; on a GPU cluster use `make install TORCH_SPEC=torch==X.Y.Z`
# after choosing the CUDA build, or install torch yourself first.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast slurm-up slurm-down clean-demo

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: install
	$(PY) -m kitsjobs.launch

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow and not slurm"

slurm-up:
	bash tests/cluster/up.sh

slurm-down:
	bash tests/cluster/down.sh
