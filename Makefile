# The two commands of the README: `make demo` and `make test`. Each creates .venv and installs
# what it needs. PyTorch is installed first, on its own, so pip never swaps in another build:
# here `torch==2.13.0` is the CPU build; on a CUDA machine set TORCH_SPEC / TORCH_INDEX, e.g.
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cu124
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test lint bench install install-test clean

demo: $(VENV)/.worker
	$(VENV)/bin/renderfarm demo

# The suite runs in 2 processes (pytest-xdist), a test file on one process (--dist loadfile):
# each process has its own redis-server, S3 endpoint and farm (tests/conftest.py). Files are
# handed out in the order collected (--no-loadscope-reorder): the slowest first
# (SLOWEST_FILES in tests/conftest.py). `make test PYTEST_ARGS=-n0` runs it in one process.
PYTEST_ARGS ?= -n auto --maxprocesses=2 --dist loadfile --no-loadscope-reorder
test: $(VENV)/.test
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .

install: $(VENV)/.worker
install-test: $(VENV)/.test

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	touch $@

$(VENV)/.torch: $(VENV)/.created
	$(PY) -c "import torch" 2>/dev/null || \
		$(PIP) "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	touch $@

$(VENV)/.worker: $(VENV)/.torch pyproject.toml
	$(PIP) -e ".[worker]"
	touch $@

$(VENV)/.test: $(VENV)/.worker pyproject.toml
	$(PIP) -e ".[worker,test]"
	touch $@

clean:
	rm -rf $(VENV) renderfarm-data test-artifacts
