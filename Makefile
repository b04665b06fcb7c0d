# cnn-codes: every install step lives here, so a fresh machine needs only `make serve` / `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 3000

# Neither library may reach the internet (usage tracking / telemetry).
export BENTOML_DO_NOT_TRACK := true
export ORT_DISABLE_TELEMETRY := 1

.PHONY: venv serve test model clean deploy-deps compose-check

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train,test,batch,ray]'
	touch $(STAMP)

## Build the default model if the model repository is empty (fine-tune -> export -> publish).
model: venv
	$(BIN)/cnn-codes bootstrap

## Serve HTTP on $(HOST):$(PORT), building the default model first when needed.
serve: model
	$(BIN)/cnn-codes serve --host $(HOST) --port $(PORT)

## Real nginx and Prometheus from Debian for tests/test_deploy.py (the compose topology on loopback).
deploy-deps:
	scripts/install-deploy-deps.sh

## Validate docker-compose.yml against the Compose Specification (no Docker engine needed).
compose-check: venv
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

## The whole test suite (what CI runs).
test: venv deploy-deps
	$(BIN)/python -m pytest -v

clean:
	rm -rf $(VENV) build *.egg-info

## Benchmarks (bench/, not part of the tests): `make bench` (~10 min), `make bench BENCH_ARGS=--quick`.
BENCH_STAMP := $(VENV)/.bench-stamp
TS_VENV := bench/.venv-torchserve
BENCH_ARGS ?=
.PHONY: bench bench-deps bench-torchserve

bench-deps: $(BENCH_STAMP)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[train,test,bench]'
	touch $(BENCH_STAMP)

## TorchServe in its own venv; it reuses .venv's torch/torchvision through a .pth file.
bench-torchserve: $(TS_VENV)/.installed-stamp

$(TS_VENV)/.installed-stamp: $(STAMP)
	test -x $(TS_VENV)/bin/python || $(BIN)/python -m venv $(TS_VENV)
	$(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
	  "$$($(TS_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_cnn_codes_main_venv.pth"
	$(TS_VENV)/bin/python -m pip install --quiet torchserve==0.12.0 torch-model-archiver==0.12.0 captum==0.9.0
	touch $@

## A failed TorchServe install does not stop the run: the harness records why (install log).
bench: $(BENCH_STAMP)
	mkdir -p bench/.cache
	$(MAKE) --no-print-directory bench-torchserve > bench/.cache/torchserve-install.log 2>&1 \
	  || echo "TorchServe did not install; see bench/.cache/torchserve-install.log"
	$(BIN)/python -m bench.run $(BENCH_ARGS)

## Precision benchmark (bench/precision.py, not a test): fp32 vs int8 onnxruntime CPU throughput
## and agreement for mobilenet_v3_large and vgg16 at batch 1/8/32 (~10 min on 2 cores);
## `make bench-precision PRECISION_ARGS=--quick` for a smoke run.
PRECISION_ARGS ?=
.PHONY: bench-precision
bench-precision: venv
	$(BIN)/python -m bench.precision $(PRECISION_ARGS)

## docker-compose.yml for real (scripts/compose-offline.sh): a private Docker daemon, the images
## built here (Debian bookworm base by debootstrap, the service by `bentoml containerize`, nginx
## and Prometheus from Debian), CNN_CODES_REPLICAS (2) replicas of the default model's
## `production` alias serving on the published ports until `make compose-down`, which removes
## the containers, the daemon and all its data. `make test-compose` runs tests/test_compose.py.
.PHONY: compose-up compose-down test-compose
compose-up: model
	scripts/compose-offline.sh up

compose-down:
	scripts/compose-offline.sh down

test-compose: venv
	CNN_CODES_COMPOSE_TESTS=1 $(BIN)/python -m pytest -v tests/test_compose.py

## Search benchmark (bench/search.py, not a test): exact / IVF-PQ / HNSW vs numpy brute force at
## 10^4 and 10^5 vectors of D = 1280 (clustered: the default model's codes of the sample photos
## plus noise), then the near-duplicate threshold sweep on constructed duplicates; writes
## bench/results/search.json. Needs the default model (`make model`).
## `make bench-search SEARCH_ARGS="ann --sizes 10000,100000,1000000"` adds 10^6 (~5 GB RAM).
SEARCH_ARGS ?=
.PHONY: bench-search
bench-search: model
	$(BIN)/python -m bench.search $(SEARCH_ARGS)
