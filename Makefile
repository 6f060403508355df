# A newcomer's entry points: `make serve`, `make test`, `make lint`, `make bench`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
REPO ?= examples/model_repository
SOCKET ?= /tmp/kernelport.sock
GRPC_PORT ?= 8001

.PHONY: setup serve test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

setup: $(PY)
	$(PY) -m pip install -q -e ".[test,dev]"

serve: setup
	$(VENV)/bin/kernelport serve --examples --model-repository $(REPO) --socket $(SOCKET) --grpc-port $(GRPC_PORT)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

bench: setup
	$(PY) bench/latency.py

clean:
	rm -rf build $(VENV) src/_kpcore/*.so src/_kpcore/core.c src/kernelport/protocol/*.desc
