"""Calling the stages from Python: the same stages, option names and results as the CLI.

python examples/python_api.py build/example
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import vlmopt
from vlmopt.demo import build_demo_model
from vlmopt.stages.bench import markdown_table

root = Path(sys.argv[1] if len(sys.argv) > 1 else "build/example")
source = root / "src"
if not source.exists():
    build_demo_model(source, "clip", "tiny")

model_dir = root / "model"
vlmopt.export(source, model_dir)
result = vlmopt.convert(model_dir)
print(f"{result.name}: towers {list(result.artifact.towers)}, skipped={result.skipped}")
int8 = vlmopt.quantize(model_dir, mode="int8-dynamic", min_cosine=0.99).artifact
print(f"{int8.name}: worst cosine vs fp32 {int8.verification.worst_cosine():.6f}, precision {int8.traits.precision}")
report = vlmopt.bench(model_dir, batch=[1, 4], iterations=5).report
print(markdown_table(report["rows"]))
