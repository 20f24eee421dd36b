"""`make bench` (second part): structured pruning's speed gain, measured against the unpruned artifact of the same precision.

1. base-size CLIP (ViT-B/32 architecture, random weights), vision tower: 30% of the MLP neurons removed,
   converted to ONNX fp32 and int8-dynamic; benched against the unpruned fp32 and int8 artifacts in one run.
   (25% of the heads cannot be removed from CLIP: transformers computes its head size as hidden_size /
   heads, so such a checkpoint would not reload with from_pretrained; see `vlmopt prune --help`.)
2. base-size ViT (ViT-B/16), where the config carries head_dim: 30% of the MLP neurons and 25% of the
   heads removed, fp32, benched against the unpruned fp32 in one run.
Pruning is without fine-tuning: the cosine column shows the accuracy cost. A benchmark reports; it does not gate.
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
from vlmopt.stages.bench import markdown_table  # noqa: E402

TARGET = 1.3


def prepared(workdir: Path, family: str) -> Path:
    source = workdir / f"{family}-base-src"
    if not (source / "config.json").exists():
        print(f"building base {family} (random weights) in {source}")
        build_demo_model(source, family, "base")
    model_dir = workdir / f"{family}-base"
    vlmopt.export(source, model_dir)
    vlmopt.convert(model_dir)
    return model_dir


def pruned(model_dir: Path, options: dict, int8: bool) -> list[str]:
    started = time.perf_counter()
    artifact = vlmopt.prune(model_dir, **options).artifact
    for tower, r in artifact.record["towers"].items():
        cosine = min(o.cosine_min for c in artifact.verification.towers[tower] for o in c.outputs.values())
        print(
            f"prune {model_dir.name} {tower}: MLP {r.get('mlp')}, heads {r.get('heads')}, parameters {r['parameters_before']:,} -> "
            f"{r['parameters_after']:,}, FLOPs/item {r['flops_before'] / 1e9:.2f} G -> {r['flops_after'] / 1e9:.2f} G, "
            f"cosine min vs unpruned {cosine:.4f} ({time.perf_counter() - started:.1f} s)"
        )
    vlmopt.convert(model_dir, source="hf-pruned", name="onnx-pruned")
    names = ["onnx", "onnx-pruned"]
    if int8:
        vlmopt.quantize(model_dir, mode="int8-dynamic")
        vlmopt.quantize(model_dir, mode="int8-dynamic", source="onnx-pruned", name="int8-pruned")
        names += ["int8-dynamic", "int8-pruned"]
    return names


def report(model_dir: Path, names: list[str], iterations: int) -> None:
    result = vlmopt.bench(model_dir, artifacts=names, tower=["vision"], batch=[1, 8], iterations=iterations, warmup=3, force=True).report
    print("\n" + markdown_table(result["rows"]))
    rows = {(r["artifact"], r["batch"]): r for r in result["rows"]}
    for pruned_name, dense in (("onnx-pruned", "onnx"), ("int8-pruned", "int8-dynamic")):
        for batch in (1, 8):
            if (pruned_name, batch) in rows:
                ratio = rows[(dense, batch)]["latency_ms"]["mean"] / rows[(pruned_name, batch)]["latency_ms"]["mean"]
                verdict = "met" if ratio >= TARGET or dense != "onnx" else "MISSED"
                target = f"; target >= {TARGET}x: {verdict}" if dense == "onnx" else ""
                print(f"{model_dir.name} vision batch {batch}: {pruned_name} is {ratio:.2f}x {dense}{target}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="build/bench")
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    workdir = Path(args.workdir)

    clip = prepared(workdir, "clip")
    report(clip, pruned(clip, {"mlp_ratio": 0.3, "tower": ["vision"]}, int8=True), args.iterations)
    vit = prepared(workdir, "vit")
    report(vit, pruned(vit, {"mlp_ratio": 0.3, "head_ratio": 0.25}, int8=False), args.iterations)
    return 0


if __name__ == "__main__":
    sys.exit(main())
