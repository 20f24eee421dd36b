"""`make bench-gpu`: base-size CLIP on an NVIDIA GPU: PyTorch eager fp32 and fp16 against TensorRT engines.

Builds strongly typed engines from the fp32 export, the fp16 variant and the TensorRT-form int8
variant (`quantize --target tensorrt`), then benches everything on the GPU in one interleaved run
(GPU-synchronised latency, throughput, GPU memory, cosine against PyTorch fp32). On a machine without
TensorRT or a GPU it says what is missing (as `vlmopt doctor` does) and exits 0: a benchmark reports.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import vlmopt  # noqa: E402
from vlmopt.demo import build_demo_model  # noqa: E402
from vlmopt.errors import VlmoptError  # noqa: E402
from vlmopt.machine import require_tensorrt_gpu  # noqa: E402
from vlmopt.stages.bench import markdown_table  # noqa: E402

ENGINES = (("onnx", "trt-onnx"), ("fp16", "trt-fp16"), ("int8-static-trt", "trt-int8"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="build/bench-gpu")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--batch", default="1,8,32")
    args = parser.parse_args()
    try:
        version, gpu = require_tensorrt_gpu("the GPU benchmark")
    except VlmoptError as exc:
        print(f"skipped: {exc.message}")
        return 0
    print(f"TensorRT {version} on {gpu.name} (compute capability {gpu.compute_capability[0]}.{gpu.compute_capability[1]})")

    workdir = Path(args.workdir)
    source = workdir / "clip-base-src"
    if not (source / "config.json").exists():
        build_demo_model(source, "clip", "base")
    model_dir = workdir / "clip-base"
    vlmopt.export(source, model_dir)
    vlmopt.convert(model_dir)
    vlmopt.quantize(model_dir, mode="fp16")
    vlmopt.quantize(model_dir, mode="int8-static", target="tensorrt")
    batches = [int(b) for b in args.batch.split(",")]
    for source_name, engine_name in ENGINES:
        started = time.perf_counter()
        artifact = vlmopt.build(model_dir, source=source_name, name=engine_name, opt_batch=8, max_batch=max(batches)).artifact
        cosines = {t: round(min(o.cosine_min for c in checks for o in c.outputs.values()), 5) for t, checks in artifact.verification.towers.items()}
        print(f"build {engine_name}: {time.perf_counter() - started:.1f} s; cosine vs ONNX Runtime {cosines}")
    artifacts = ["hf", *(e for _, e in ENGINES)]
    report = vlmopt.bench(model_dir, artifacts=artifacts, batch=batches, iterations=args.iterations, warmup=10, device="cuda", force=True).report
    print("\n" + markdown_table(report["rows"]))
    print("speed-ups are against PyTorch fp32 eager on the same GPU, same run, same inputs; hf-fp16 is PyTorch at half precision")
    return 0


if __name__ == "__main__":
    sys.exit(main())
