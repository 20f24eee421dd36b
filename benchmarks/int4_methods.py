"""`make bench-int4`: a real decoder's int4 by each method, scored and timed in one run.

On a converted LLaVA-style model directory (model a: CLIP ViT-B/32 random + the real SmolLM2-135M; see the README),
or a bare language model's (`demo-model --family llama --language-model smollm2`: the same decoder, no image),
the fp32 decoder is quantized by each of `vlmopt.quantization.int4`'s methods (rtn, gptq, hqq, awq) and, for
reference, as 8-bit MatMulNBits (rtn); `grid` keeps each matrix of a dequantized GGUF on its own grid (4-bit or 8-bit). Each is scored as `quantize`'s gate scores it (teacher-forced top-1
agreement and perplexity increase against the fp32 decoder on the first 2048 tokens of the built-in text, windows
of 256; calibration on the text's second half), then every variant decodes 32 tokens after a 32-token prompt
through vlmopt's ONNX Runtime loop, the variants taking turns round after round (interleaved). Also printed: the
per-matrix sensitivity of RTN's int4 (relative error of each matrix's output when only it is int4), the measure
`--fallback` ranks by. A benchmark reports; it does not gate.

  python benchmarks/int4_methods.py --model-dir build/smol [--methods rtn,gptq,hqq,awq] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402


def decoder_runner(where: Path, folder: Path, files: dict[str, str], decoder: Any | None, threads: int, contract: Any) -> Any:
    """vlmopt's ONNX Runtime generation loop over the artifact in `folder` with `decoder` (an ONNX model; None: the
    artifact's own fp32 decoder, copied) in place of its decoder part, the other parts linked from `folder` into `where`."""
    import onnx

    from vlmopt import graph
    from vlmopt.runners.generate import OrtGenerateRunner

    where.mkdir(parents=True)
    for part in (name for name in files if name != "decoder"):
        for path in graph.tower_files(folder, files[part]):
            os.symlink(path.resolve(), where / path.name)
    if decoder is None:
        for path in graph.tower_files(folder, files["decoder"]):
            shutil.copyfile(path, where / path.name)
    else:
        onnx.save(decoder, str(where / files["decoder"]))
    return OrtGenerateRunner(where, files, threads, contract)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--artifact", default="onnx")
    parser.add_argument("--methods", default="rtn,gptq,hqq,awq")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--asymmetric", action="store_true", help="int4 blocks with a zero point each (default: symmetric, quantize's default)")
    parser.add_argument("--no-speed", action="store_true", help="score only; no decode timing")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    from vlmopt import graph
    from vlmopt.families import family_named
    from vlmopt.quantization import fallback, int4
    from vlmopt.runners.generate import GenerateRequest, ort_session
    from vlmopt.samples import sample_image, text_tokens
    from vlmopt.verification.generation import TEXT_TOKENS, WINDOW
    from vlmopt.workspace import ModelDir

    directory = ModelDir(args.model_dir)
    record = directory.load()[args.artifact]
    folder = directory.artifact_path(args.artifact)
    files = {name: tower.file for name, tower in record.towers.items()}
    preprocessor = family_named(record.traits.family).preprocessor(directory.checkpoint_folder(record))
    threads = args.threads
    print(f"load average {os.getloadavg()}", flush=True)

    fp32 = graph.load(folder / files["decoder"])
    del fp32.graph.value_info[:]
    embedding = ort_session(folder / files["embedding"], threads)
    reference = ort_session(folder / files["decoder"], threads)
    ids, _ = text_tokens(preprocessor.tokenizer, TEXT_TOKENS)
    scorer = int4.TokenScorer(embedding, reference, ids, min(WINDOW, preprocessor.max_positions, len(ids)), threads)
    calib = int4.calibration_text(preprocessor.tokenizer, None, args.calib_windows)
    feeds = int4.decoder_feeds(embedding, reference, calib.windows)
    del reference
    settings = int4.Settings(block_size=32, symmetric=not args.asymmetric, accuracy_level=4, threads=threads)

    variants: dict[str, Any] = {}
    results: dict[str, dict[str, Any]] = {}
    for method in args.methods.split(","):
        started = time.perf_counter()
        try:
            variants[method] = int4.quantize(method, fp32, settings, feeds)
        except Exception as exc:  # a benchmark reports what failed and goes on
            results[method] = {"error": str(exc).splitlines()[0][:300]}
            print(f"{method}: {results[method]['error']}", flush=True)
            continue
        seconds = time.perf_counter() - started
        results[method] = {**scorer(variants[method]), "quantize_s": round(seconds, 1)}
        print(f"{method}: {results[method]}", flush=True)
    variants["int8 (rtn)"] = int4.rtn(fp32, settings, bits=8)
    results["int8 (rtn)"] = scorer(variants["int8 (rtn)"])
    print(f"int8 (rtn): {results['int8 (rtn)']}", flush=True)

    splicer = fallback.Splicer(fp32, variants["rtn"]) if "rtn" in variants else None
    sensitivity = fallback.sensitivity(splicer, scorer.feeds[:2], threads)[:15] if splicer else []

    # decode speed, interleaved: each variant's decoder beside the fp32 vision and embedding parts
    prompt_ids = preprocessor.tokenizer("The quick brown fox jumps over the lazy dog. " * 8, add_special_tokens=False)["input_ids"][:32]
    images = [sample_image(7)] if preprocessor.contract.takes_images else []
    prompt = preprocessor([preprocessor.tokenizer.decode(prompt_ids)], images)
    request = GenerateRequest(prompt, args.new_tokens, preprocessor.eos_token_ids, preprocessor.pad_token_id, min_new_tokens=args.new_tokens)
    speeds: dict[str, list[float]] = {name: [] for name in ["fp32", *variants]}
    if args.no_speed:
        speeds = {name: [float("nan")] for name in speeds}
    with tempfile.TemporaryDirectory(prefix="bench-int4-") as scratch:
        runners = {}
        for name in [] if args.no_speed else speeds:
            where = Path(scratch) / name.replace(" ", "_").replace("(", "").replace(")", "")
            runners[name] = decoder_runner(where, folder, files, variants.get(name), threads, preprocessor.contract)
        for _ in range(0 if args.no_speed else args.rounds):
            for name, runner in runners.items():
                speeds[name].append(runner.generate(request).decode_tokens_per_s)
        for runner in runners.values():
            runner.close()
    print(f"load average {os.getloadavg()}", flush=True)

    print("\n| decoder | top-1 agreement | perplexity increase | decode tok/s (median) | x fp32 | quantize s |")
    print("|---|---:|---:|---:|---:|---:|")
    base = statistics.median(speeds["fp32"])
    print(f"| fp32 | 1 | +0.0 % | {base:.1f} | 1.00x | |")
    for name, result in results.items():
        if "error" in result:
            print(f"| {name} | not run: {result['error'][:120]} | | | | |")
            continue
        speed = statistics.median(speeds[name])
        print(
            f"| {name} | {result['top1_agreement']:.4f} | {result['ppl_increase']:+.1%} | {speed:.1f} | {speed / base:.2f}x | {result.get('quantize_s', '')} |"
        )
    if sensitivity:
        print("\nmost sensitive matrices under RTN int4 (relative output error when only it is int4):")
        for node, score in sensitivity:
            print(f"  {int4.readable(splicer.f_nodes[node])}: {score:.4f}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "speeds": speeds, "sensitivity": sensitivity}, indent=2, default=float))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
