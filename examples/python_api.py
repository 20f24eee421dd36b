"""Calling the stages from Python: the same functions the CLI is a thin layer over.

python examples/python_api.py build/example
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from vlmopt.demo import build_demo_model
from vlmopt.stages import bench, convert, export, quantize
from vlmopt.workspace import ModelDir

root = Path(sys.argv[1] if len(sys.argv) > 1 else "build/example")
source = root / "src"
if not source.exists():
    build_demo_model(source, "clip", "tiny")

model_dir = ModelDir.create(root / "model")
with model_dir.lock():
    export.run(model_dir, export.ExportOptions(str(source)))
    result = convert.run(model_dir, convert.ConvertOptions())
    print(f"{result.artifact.name}: towers {list(result.artifact.towers)}, skipped={result.skipped}")
    int8 = quantize.run(model_dir, quantize.QuantizeOptions(mode="int8-dynamic")).artifact
    cosine = {t: r["outputs"][next(iter(r["outputs"]))]["cosine_min"] for t, r in int8.verification["towers"].items()}
    print(f"{int8.name}: cosine min vs fp32 {cosine}")
    report = bench.run(model_dir, bench.BenchOptions(batches=[1, 4], iterations=5))
print(bench.markdown_table(report["rows"]))
