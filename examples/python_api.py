"""vlmopt from Python: a recipe, a single stage, a report and a comparison, with the CLI's names and results.

    python examples/python_api.py build/example

It builds a tiny random-weight CLIP offline (demo:clip-tiny), so it runs in about a minute on two
cores; a second run finds every step up to date. Exits with the recipe run's exit code.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import vlmopt

root = Path(sys.argv[1] if len(sys.argv) > 1 else "build/example")
root.mkdir(parents=True, exist_ok=True)
data = os.path.relpath(Path(__file__).resolve().parent / "data", root.resolve())

# 1. A recipe, as `vlmopt run` runs it: checked whole first (a VlmoptError names file:line), then each
#    step through its stage, skipped when its inputs, options and tool versions are unchanged.
recipe = root / "recipe.yaml"
recipe.write_text(
    f"""\
source: demo:clip-tiny
model_dir: clip
steps:
  - convert: {{}}
  - quantize: {{mode: int8-static, calib_images: {data}/images, calib_text: {data}/prompts.txt}}
  - bench: {{artifacts: [onnx, int8-static], batch: [1, 4], iterations: 5}}
gates:
  min_cosine: {{int8-static: 0.99}}
"""
)
run = vlmopt.run(recipe)
for outcome in run.steps:
    print(f"{outcome.step.id:>12}  {outcome.status:<10}  {outcome.reason or ''}")
for gate in run.gates:
    print(f"gate {gate.reason}: {'passed' if gate.passed else 'FAILED'}")

# 2. One stage by itself, as `vlmopt quantize build/example/clip --mode int8-dynamic --min-cosine 0.99`.
model_dir = root / "clip"
int8 = vlmopt.quantize(model_dir, mode="int8-dynamic", min_cosine=0.99).artifact
print(f"{int8.name}: worst cosine against fp32 {int8.verification.worst_cosine():.6f}, {int8.size / 2**20:.2f} MB")

# 3. What a CI job posts (`vlmopt report`), and the regression check (`vlmopt compare`) of a run against a baseline.
report = vlmopt.report(model_dir)
print(f"report: {', '.join(report.files)}")
comparison = vlmopt.compare(model_dir, model_dir, max_slowdown="10%")
print(f"compare: {len(comparison.rows)} rows, regressions: {comparison.regressions or 'none'}")
sys.exit(run.exit_code)
