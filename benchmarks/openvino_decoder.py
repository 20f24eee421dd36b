"""`make bench-int4-ov`: a decoder's int4 on the two back ends, ONNX Runtime (`quantize --part decoder=int4`) against
OpenVINO + NNCF (`openvino --part decoder=int4`), on the same model in one run.

For each artifact named (default: the fp32 `onnx`, quantize's `decoder-int4`, and `openvino-onnx-torch-decoder-int4`)
it prints the token figures its own stage recorded against its fp32 parent (teacher-forced top-1 agreement and
perplexity increase on the first 2048 tokens of the built-in text, windows of 256) and its decode speed: 32 tokens
after a 32-token prompt at batch 1 through vlmopt's generation loop on the artifact's back end, the artifacts taking
turns round after round (interleaved), the median per artifact, and its ratio to the first artifact (the baseline)
and to the second. A benchmark reports; it does not gate.

  python benchmarks/openvino_decoder.py --model-dir build/smol-lm [--artifacts onnx,decoder-int4,openvino-onnx-torch-decoder-int4]
      [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TOKEN_AGREEMENT = "teacher-forced next-token top-1 agreement"
PPL_INCREASE = "perplexity increase"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--artifacts", default="onnx,decoder-int4,openvino-onnx-torch-decoder-int4")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    from vlmopt.families import family_named
    from vlmopt.runners.generate import GenerateRequest
    from vlmopt.runners.loops import loop_runner
    from vlmopt.workspace import ModelDir

    directory = ModelDir(args.model_dir)
    records = directory.load()
    names = args.artifacts.split(",")
    missing = [n for n in names if n not in records]
    if missing:
        raise SystemExit(f"{args.model_dir} has no artifact {', '.join(missing)}; make it first (see the README's OpenVINO path for decoders)")
    first = records[names[0]]
    preprocessor = family_named(first.traits.family).preprocessor(directory.checkpoint_folder(first))
    prompt_ids = preprocessor.tokenizer("The quick brown fox jumps over the lazy dog. " * 8, add_special_tokens=False)["input_ids"][:32]
    prompt = preprocessor([preprocessor.tokenizer.decode(prompt_ids)], [])
    request = GenerateRequest(prompt, args.new_tokens, preprocessor.eos_token_ids, preprocessor.pad_token_id, min_new_tokens=args.new_tokens)

    figures: dict[str, dict[str, float | None]] = {}
    for name in names:
        verification = records[name].verification
        metrics = {m.name: m.value for m in verification.metrics} if verification is not None else {}
        figures[name] = {"top1_agreement": metrics.get(TOKEN_AGREEMENT), "ppl_increase": metrics.get(PPL_INCREASE)}

    print(f"load average at start {os.getloadavg()}", flush=True)
    runners = {}
    for name in names:
        record = records[name]
        files = {part: tower.file or "" for part, tower in record.towers.items()}
        engines = {part: tower.engine for part, tower in record.towers.items()}
        runners[name] = loop_runner(directory.artifact_path(name), files, args.threads, preprocessor.contract, engines)
    speeds: dict[str, list[float]] = {name: [] for name in names}
    tokens: dict[str, list[int]] = {}
    for name, runner in runners.items():  # one untimed warm-up each
        tokens[name] = runner.generate(request).tokens[0]
    for _ in range(args.rounds):
        for name, runner in runners.items():
            speeds[name].append(runner.generate(request).decode_tokens_per_s)
    for runner in runners.values():
        runner.close()
    print(f"load average at end {os.getloadavg()}", flush=True)

    base, second = statistics.median(speeds[names[0]]), statistics.median(speeds[names[min(1, len(names) - 1)]])
    print(
        f"\n| artifact | back end | top-1 agreement | perplexity increase | decode tok/s, batch 1 (median of {args.rounds}) | x {names[0]} | x {names[min(1, len(names) - 1)]} |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in names:
        speed = statistics.median(speeds[name])
        agreement, ppl = figures[name]["top1_agreement"], figures[name]["ppl_increase"]
        print(
            f"| `{name}` | {runners[name].backend} | {'1 (reference)' if agreement is None else f'{agreement:.4f}'} | "
            f"{'' if ppl is None else f'{ppl:+.1%}'} | {speed:.1f} | {speed / base:.2f}x | {speed / second:.2f}x |"
        )
    if args.json:
        args.json.write_text(json.dumps({"figures": figures, "speeds": speeds, "tokens": tokens}, indent=2))


if __name__ == "__main__":
    main()
