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

# As root, the local Slurm cluster of tests/cluster/ is started for the Slurm tests, and
# stopped afterwards unless it was already running. Without root those tests skip.
test: install
	@if [ "$$(id -u)" -ne 0 ]; then \
		echo "not root: the Slurm tests will skip (run make slurm-up as root to start the cluster)"; \
		$(PY) -m pytest; exit $$?; \
	fi; \
	was_up=0; sinfo >/dev/null 2>&1 && was_up=1; \
	bash tests/cluster/up.sh || exit $$?; \
	status=0; $(PY) -m pytest || status=$$?; \
	if [ "$$was_up" -eq 0 ]; then bash tests/cluster/down.sh; fi; \
	exit $$status

test-fast: install
	$(PY) -m pytest -m "not slow and not slurm"

slurm-up:
	bash tests/cluster/up.sh

slurm-down:
	bash tests/cluster/down.sh
