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
	$(BIN)/python -m pip install --quiet -e '.[train,test,batch,ray,viz]'
	touch $(STAMP)

## Build the default model if the model repository is empty (fine-tune -> export -> publish).
model: venv
	$(BIN)/cnn-codes bootstrap

## Serve HTTP on $(HOST):$(PORT), building the default model first when needed.
serve: model
	$(BIN)/cnn-codes serve --host $(HOST) --port $(PORT)

## Real nginx and Prometheus from Debian for tests/test_deploy.py (the compose topology on loopback),
## chromium + chromium-driver for tests/test_page.py (the page at / in headless Chromium).
deploy-deps:
	scripts/install-deploy-deps.sh

## Validate docker-compose.yml against the Compose Specification (no Docker engine needed).
compose-check: venv
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

## The whole test suite (what CI runs), tests/test_compose.py included: as root it installs
## docker.io and debootstrap, starts a private dockerd and builds the images (~6 min); under
## CI=true it always runs and a missing prerequisite fails it. Elsewhere
## `make test CNN_CODES_COMPOSE_TESTS=0` leaves it out, and without root it is skipped.
CNN_CODES_COMPOSE_TESTS ?= 1
test: venv deploy-deps
	CNN_CODES_COMPOSE_TESTS=$(CNN_CODES_COMPOSE_TESTS) $(BIN)/python -m pytest -v

clean:
	rm -rf $(VENV) build *.egg-info

## Benchmarks (bench/, not part of the tests): `make bench` (~10 min before Triton, Ray Serve and
## the batch-job row were added), `make bench BENCH_ARGS=--quick`.
BENCH_STAMP := $(VENV)/.bench-stamp
TS_VENV := bench/.venv-torchserve
TRITON_VENV := bench/.venv-triton
RAY_SERVE_VENV := bench/.venv-ray-serve
# What the Triton and Ray Serve replicas import of this repository (models.decode, models.runtime,
# models.postprocess, put on PYTHONPATH by the harness), at the pins of pyproject.toml's
# dependencies.
PEER_DEPS := onnxruntime==1.31.1 pillow==13.0.0 pydantic-settings==2.16.3 orjson==3.13.0
# Ray Serve at the Ray version the batch engine pins (pyproject.toml's `ray` extra).
RAY_VERSION := $(shell sed -n 's/.*"ray\[data\]==\([0-9][0-9.]*\)".*/\1/p' pyproject.toml)
BENCH_ARGS ?=
.PHONY: bench bench-deps bench-torchserve bench-triton bench-ray-serve

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

## Triton Inference Server 2.51 as PyTriton ships it (server binary and Python backend inside the
## wheel; CPU-only here) in its own venv: PyTriton pins numpy < 2, the project has numpy 2.
bench-triton: $(TRITON_VENV)/.installed-stamp

$(TRITON_VENV)/.installed-stamp: $(STAMP)
	test -x $(TRITON_VENV)/bin/python || $(BIN)/python -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TRITON_VENV)/bin/python -m pip install --quiet nvidia-pytriton==0.7.0 $(PEER_DEPS)
	touch $@

## Ray Serve in its own venv: ray[serve] pulls a newer FastAPI, which in .venv would change the
## FastAPI baseline (uvloop and httptools, which it also pulls, are in .venv too since 2026-12-07).
## python-multipart (the bench extra's pin) parses the multipart uploads in the replica.
bench-ray-serve: $(RAY_SERVE_VENV)/.installed-stamp

$(RAY_SERVE_VENV)/.installed-stamp: $(STAMP)
	test -n "$(RAY_VERSION)" || { echo "no ray[data]==X pin in pyproject.toml"; exit 1; }
	test -x $(RAY_SERVE_VENV)/bin/python || $(BIN)/python -m venv $(RAY_SERVE_VENV)
	$(RAY_SERVE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(RAY_SERVE_VENV)/bin/python -m pip install --quiet "ray[serve]==$(RAY_VERSION)" \
	  python-multipart==0.0.34 $(PEER_DEPS)
	touch $@

## A failed TorchServe / Triton / Ray Serve install does not stop the run: the harness records
## why (install logs in bench/.cache).
bench: $(BENCH_STAMP)
	mkdir -p bench/.cache
	$(MAKE) --no-print-directory bench-torchserve > bench/.cache/torchserve-install.log 2>&1 \
	  || echo "TorchServe did not install; see bench/.cache/torchserve-install.log"
	$(MAKE) --no-print-directory bench-triton > bench/.cache/triton-install.log 2>&1 \
	  || echo "Triton (PyTriton) did not install; see bench/.cache/triton-install.log"
	$(MAKE) --no-print-directory bench-ray-serve > bench/.cache/ray-serve-install.log 2>&1 \
	  || echo "Ray Serve did not install; see bench/.cache/ray-serve-install.log"
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
