# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-with test-torch install bench inspect clean gpu-check gpu-check-dry gpu-render

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/finetune.py $(ARGS)

# Two test processes (pytest-xdist): a fresh clone's suite on two cores took 25 to 31 minutes, in one process
# it was four fifths through at 35.
# TEST_WORKERS=0 runs it in this process (a debugger, -x on the first failure in order).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m ruff check memcompile tests examples
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

# Against other supported versions of the dependencies: an environment of their own, the other pins kept.
#   make test-with PINS="transformers==5.17.0" [PYTEST_ARGS=tests]
#   make test-torch TORCH=2.11.0 TRITON=3.6.0   (the same, for torch and Triton)
# Without PYTEST_ARGS: the tests that depend most on torch's and transformers' internals.
TORCH ?= 2.11.0
TRITON ?= 3.6.0
PINS ?= torch==$(TORCH) triton==$(TRITON)
empty :=
space := $(empty) $(empty)
PINS_VENV := .venv-with-$(subst $(space),-,$(subst ==,,$(strip $(PINS))))
PINNED := $(subst $(space),|,$(foreach p,$(PINS),$(firstword $(subst ==, ,$(p)))))
PINS_TESTS ?= tests/test_regional.py tests/test_robustness.py tests/test_trainers.py
$(PINS_VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PINS_VENV)/bin/python || python3 -m venv $(PINS_VENV)
	grep -v -i -E '^($(PINNED))==' constraints.txt > $(PINS_VENV)/constraints.txt
	printf '%s\n' $(PINS) >> $(PINS_VENV)/constraints.txt
	$(PINS_VENV)/bin/python -m pip install -q -c $(PINS_VENV)/constraints.txt -e '.[test]'
	touch $@

test-with: $(PINS_VENV)/.installed
	TRITON_INTERPRET=1 $(PINS_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) $(or $(PYTEST_ARGS),$(PINS_TESTS))

test-torch: test-with

bench: $(STAMP)
	$(PY) -m memcompile.bench $(ARGS)

inspect: $(STAMP)
	$(PY) -m memcompile.inspect $(ARGS)

# On a GPU machine, from the repository root, with nothing installed: the bitsandbytes wheel in .whl/
# (docs/gpu-check.md) goes to /tmp/site and the project runs from the tree. GPU_PY: that machine's Python.
GPU_PY ?= python3
GPU_SITE ?= /tmp/site
gpu-check:
	@if ls .whl/*.whl >/dev/null 2>&1; then \
		$(GPU_PY) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $(GPU_SITE) .whl/*.whl; \
	fi
	PYTHONPATH=$(GPU_SITE):$(CURDIR) $(GPU_PY) -m memcompile.bench gpu $(ARGS)

# The same steps on CPU (tiny model, Triton interpreter): checks the plumbing without a GPU.
gpu-check-dry: $(STAMP)
	$(PY) -m memcompile.bench gpu --dry-run $(ARGS)

# docs/gpu/ and the README's GPU section from a run's folder: make gpu-render RUN=runs/gpu-...
gpu-render: $(STAMP)
	$(PY) -m memcompile.bench render-gpu $(RUN)

clean:
	rm -rf $(VENV) .venv-torch* build *.egg-info
