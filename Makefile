# The two commands a user needs: `make serve` and `make test`. Each sets everything up first and
# skips what is already done.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= gemma-3-270m
PYTEST_ARGS ?=

.PHONY: install model tiny serve test lint format bench clean

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $(STAMP)

install: $(STAMP)

model: $(STAMP)
	$(PY) -m quant fetch $(MODEL)

tiny: $(STAMP)
	$(PY) scripts/build_tiny_checkpoints.py

serve: model
	$(PY) -m serve --model $(MODEL) --host $(HOST) --port $(PORT)

test: model tiny
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
