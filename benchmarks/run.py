"""`make bench`: base-size CLIP (ViT-B/32 architecture, random weights): PyTorch eager vs every vlmopt variant.

Measures in one run on this machine:
  1. conversion cost: `vlmopt convert` of both towers, verification included, in wall time and
     peak RSS (a child process, so its peak is its own);
  2. the variants: `optimize` (fused fp32), `quantize` int8-dynamic, int8-static (CPU and TensorRT
     forms, synthetic calibration), int4 and fp16, each verified against fp32 when it is made; plus
     `int8-dynamic-conv`, the same dynamic quantization with the patch-embedding Conv quantized too
     (what a default `quantize_dynamic`, and Optimum's avx512_vnni preset, do), to show what that costs;
  3. `vlmopt bench` of every artifact, both towers, batch 1 and 8, interleaved on the same inputs.
Prints the ratios to PyTorch and whether the targets are reached: best int8 >= 3.5x on the vision
tower at batch 8 with cosine >= 0.99, optimized fp32 >= 1.3x. A benchmark reports; it does not gate.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import vlmopt  # noqa: E402
from vlmopt.demo import build_demo_model  # noqa: E402
from vlmopt.errors import CheckFailed  # noqa: E402
from vlmopt.stages.bench import REFERENCE, markdown_table  # noqa: E402

INT8_TARGET, OPTIMIZED_TARGET, MIN_COSINE = 3.5, 1.3, 0.99
#: (artifact name, quantize options); int4 runs with a lower gate so its numbers are shown even where it misses 0.99
VARIANTS = [
    ("int8-dynamic", {"mode": "int8-dynamic"}),
    # the recipe before issue 10 (one weight scale per tensor): the per-channel default must not be more than 5% slower
    ("int8-dynamic-per-tensor", {"mode": "int8-dynamic", "per_channel": False, "name": "int8-dynamic-per-tensor"}),
    ("int8-dynamic-conv", {"mode": "int8-dynamic", "op_types": ["MatMul", "Conv"], "name": "int8-dynamic-conv"}),
    ("int8-static", {"mode": "int8-static"}),
    ("int8-static-trt", {"mode": "int8-static", "target": "tensorrt"}),
    ("int4", {"mode": "int4", "min_cosine": 0.9}),
    ("fp16", {"mode": "fp16"}),
]


def convert_cost(model_dir: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of a fresh `vlmopt convert --force` in its own process."""
    command = [sys.executable, "-m", "vlmopt", "convert", str(model_dir), "--force", "--json"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"convert failed ({done.returncode}): {done.stderr.strip()}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, peak_kb / 1024


def make_variants(model_dir: Path) -> None:
    started = time.perf_counter()
    optimized = vlmopt.optimize(model_dir).artifact
    fused = {t: f"attention {r['fused'].get('Attention', 0)}/{r['attention_layers']}" for t, r in optimized.record["towers"].items()}
    print(f"optimize: {time.perf_counter() - started:.1f} s; fused {fused}")
    for name, options in VARIANTS:
        started = time.perf_counter()
        try:
            artifact = vlmopt.quantize(model_dir, **options).artifact
        except CheckFailed as failed:
            # verified on the built-in real photos and sentences: a variant that misses its gate is reported, not benched
            print(f"quantize {name}: gate missed (exit 1 for a user), not benched: {failed.message[:300]}")
            continue
        cosines = {t: round(min(o.cosine_min for c in checks for o in c.outputs.values()), 6) for t, checks in artifact.verification.towers.items()}
        sizes = {t: f"{artifact.record['towers'][t]['parent_size'] / 2**20:.0f} -> {r.size / 2**20:.0f} MB" for t, r in artifact.towers.items()}
        zero_shot = artifact.verification.metric("zero-shot top-1 agreement")
        agreement = zero_shot.value if zero_shot else None
        print(f"quantize {name}: {time.perf_counter() - started:.1f} s; cosine min vs fp32 {cosines}; zero-shot agreement {agreement}; {sizes}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="build/bench", help="where the demo model and its model directory live")
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()

    workdir = Path(args.workdir)
    source = workdir / "clip-base-src"
    if not (source / "config.json").exists():
        print(f"building base CLIP (ViT-B/32 architecture, random weights) in {source}")
        build_demo_model(source, "clip", "base")
    model_dir = workdir / "clip-base"
    vlmopt.export(source, model_dir)

    seconds, peak_mb = convert_cost(model_dir)
    print(f"\nconvert (both towers, verification included): {seconds:.1f} s wall, {peak_mb:.0f} MB peak RSS")
    print(
        "  anchor, same machine and model (2026-11-21): `optimum-cli export onnx --task zero-shot-image-classification`"
        " (optimum-onnx 0.1.0, transformers 4.57, which it requires) took 11.9-13.2 s and 2.73 GB peak RSS"
    )
    make_variants(model_dir)

    report = vlmopt.bench(model_dir, batch=[1, 8], iterations=args.iterations, warmup=3, force=True).report
    print("\n" + markdown_table(report["rows"]))
    print(f"threads: {report['machine']['threads']}; reports: {model_dir / 'reports'}")
    print("PyTorch eager = the `hf` rows (SDPA attention, torch's fastest eager path); speed-ups are against it, same run, same inputs.")
    summarize(report["rows"])
    return 0


def summarize(rows: list[dict]) -> None:
    def row(artifact: str, tower: str, batch: int) -> dict | None:
        return next((r for r in rows if r["artifact"] == artifact and r["tower"] == tower and r["batch"] == batch), None)

    print("\nratios to PyTorch eager:")
    for artifact in dict.fromkeys(r["artifact"] for r in rows if r["artifact"] != REFERENCE):
        cells = []
        for tower in ("vision", "text"):
            for batch in (1, 8):
                r = row(artifact, tower, batch)
                if r is not None:
                    cells.append(f"{tower} b{batch} {r['speedup']:.2f}x (cos {r['cosine_min']:.4f})")
        print(f"  {artifact:>18}: " + "; ".join(cells))
    for tower in ("vision", "text"):
        channel, tensor = row("int8-dynamic", tower, 8), row("int8-dynamic-per-tensor", tower, 8)
        if channel is not None and tensor is not None:
            change = tensor["speedup"] / channel["speedup"] - 1
            verdict = "met" if change <= 0.05 else "MISSED"
            print(f"int8-dynamic per-channel (default) vs per-tensor (the old recipe), {tower} batch 8: {100 * change:+.1f} % slower; target <= 5 %: {verdict}")
    int8 = [r for r in rows if r["artifact"].startswith("int8") and r["tower"] == "vision" and r["batch"] == 8 and r["cosine_min"] >= MIN_COSINE]
    best = max(int8, key=lambda r: r["speedup"], default=None)
    if best is not None:
        verdict = "met" if best["speedup"] >= INT8_TARGET else "MISSED"
        print(f"best int8, vision batch 8: {best['artifact']} {best['speedup']:.2f}x, cosine {best['cosine_min']:.4f}; target >= {INT8_TARGET}x: {verdict}")
    for batch in (1, 8):
        r = row("onnx-opt", "vision", batch)
        if r is not None:
            verdict = "met" if r["speedup"] >= OPTIMIZED_TARGET else "MISSED"
            print(f"optimized fp32, vision batch {batch}: {r['speedup']:.2f}x; target >= {OPTIMIZED_TARGET}x: {verdict}")


if __name__ == "__main__":
    sys.exit(main())
