# A CI job in an ML repo: rebuild the deployment artifacts when the checkpoint changes and
# fail the build when the export drifts from PyTorch or ONNX Runtime stops being faster.
# Reruns are cheap: a stage whose inputs and options are unchanged is skipped.
#   make -f examples/ci.mk MODEL=path/to/hf-checkpoint
MODEL ?= build/demo-src
OUT ?= build/deploy

deploy-artifacts:
	vlmopt export $(MODEL) -o $(OUT)
	vlmopt convert $(OUT) --atol 1e-4            # exit 1: export differs from PyTorch
	vlmopt bench $(OUT) --batch 8 --min-speedup 1.0 --json > bench.json   # exit 1: slower than PyTorch
