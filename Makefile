# The two set-up commands of the README: `make run` (one full OSPO round on the shipped testbed model) and
# `make test` (the test suite). Both create the virtual environment themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export HF_DATASETS_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TRL_EXPERIMENTAL_SILENCE := 1

.PHONY: venv run test bench

$(BIN)/ospo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, from the local CPU wheel; a plain `torch` requirement would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,ray]"
	touch $(BIN)/ospo

venv: $(BIN)/ospo

# one OSPO round on the shipped shapes-world testbed model, judged by the model itself; prints held-out accuracy
# before and after (`ospo run --model tiny`: the random tiny model through every stage)
run: venv
	$(BIN)/ospo run --model testbed

test: venv
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/python -m bench
