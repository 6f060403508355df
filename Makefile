# A newcomer's entry points: `make serve`, `make test`, `make lint`, `make bench`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
REPO ?= examples/model_repository
SOCKET ?= /tmp/kernelport.sock
GRPC_PORT ?= 8001

.PHONY: setup serve test test-grpc-engines lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

setup: $(PY)
	$(PY) -m pip install -q -e ".[test,dev]"

serve: setup
	$(VENV)/bin/kernelport serve --examples --model-repository $(REPO) --socket $(SOCKET) --grpc-port $(GRPC_PORT)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

# The gRPC surface against each engine (servers started by the tests inherit the variable).
GRPC_TESTS := $(wildcard tests/test_grpc*.py tests/test_security*.py tests/test_http_security.py tests/test_fuzz*.py \
	tests/test_scheduling.py tests/test_bench_cli.py tests/test_shm_binding.py tests/test_overload.py)
test-grpc-engines: setup
	KERNELPORT_GRPC_ENGINE=native $(PY) -m pytest -q -p no:cacheprovider $(GRPC_TESTS)
	KERNELPORT_GRPC_ENGINE=grpcio $(PY) -m pytest -q -p no:cacheprovider $(GRPC_TESTS)

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

bench: setup
	$(PY) bench/latency.py

clean:
	rm -rf build $(VENV) src/_kpcore/*.so src/_kpcore/core.c src/_kpcore/h2.c src/kernelport/protocol/*.desc
