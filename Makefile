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

.PHONY: venv serve test model clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train,test]'
	touch $(STAMP)

## Build the default model if the model repository is empty (fine-tune -> export -> publish).
model: venv
	$(BIN)/cnn-codes bootstrap

## Serve HTTP on $(HOST):$(PORT), building the default model first when needed.
serve: model
	$(BIN)/cnn-codes serve --host $(HOST) --port $(PORT)

## The whole test suite (what CI runs).
test: venv
	$(BIN)/python -m pytest -v

clean:
	rm -rf $(VENV) build *.egg-info
