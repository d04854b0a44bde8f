# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-torch install bench inspect clean gpu-check gpu-check-dry gpu-render

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/finetune.py $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check memcompile tests examples
	TRITON_INTERPRET=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# The tests that depend most on torch's internals, against another supported torch (2.11 to 2.14): its own
# environment, the other pins kept. make test-torch TORCH=2.11.0 TRITON=3.6.0 [PYTEST_ARGS=...]
TORCH ?= 2.11.0
TRITON ?= 3.6.0
TORCH_VENV := .venv-torch$(TORCH)
TORCH_TESTS ?= tests/test_regional.py tests/test_robustness.py tests/test_trainers.py
$(TORCH_VENV)/.installed: pyproject.toml constraints.txt
	test -x $(TORCH_VENV)/bin/python || python3 -m venv $(TORCH_VENV)
	grep -v -i -E '^(torch|triton)==' constraints.txt > $(TORCH_VENV)/constraints.txt
	printf 'torch==$(TORCH)\ntriton==$(TRITON)\n' >> $(TORCH_VENV)/constraints.txt
	$(TORCH_VENV)/bin/python -m pip install -q -c $(TORCH_VENV)/constraints.txt -e '.[test]'
	touch $@

test-torch: $(TORCH_VENV)/.installed
	TRITON_INTERPRET=1 $(TORCH_VENV)/bin/python -m pytest -q $(or $(PYTEST_ARGS),$(TORCH_TESTS))

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
