# A CI job in an ML repo, as single commands: rebuild the deployment artifacts when the checkpoint
# changes and fail the build when the export drifts from PyTorch, the int8 model drifts from fp32,
# or the artifacts stop being faster. Reruns are cheap: a stage whose inputs and options are
# unchanged is skipped.
#   vlmopt demo-model build/demo-src && make -f examples/ci.mk MODEL=build/demo-src
# The same job as one reviewed file is a recipe: `vlmopt run examples/recipes/clip-cpu.yaml`
# (see examples/github-actions.yml for a workflow around it).
MODEL ?= build/demo-src
OUT ?= build/deploy

deploy-artifacts:
	vlmopt export $(MODEL) -o $(OUT)
	vlmopt convert $(OUT) --atol 1e-4            # exit 1: export differs from PyTorch
	vlmopt quantize $(OUT) --mode int8-dynamic --min-cosine 0.99   # exit 1: int8 drifted from fp32
	vlmopt bench $(OUT) onnx int8-dynamic --batch 8 --min-speedup 1.0 --json > bench.json   # exit 1: slower than PyTorch
	vlmopt info $(OUT) --verify                  # exit 1: an artifact's files changed since they were recorded
