"""`make bench-vlm`: LLaVA-style generation on CPU, PyTorch against vlmopt's ONNX fp32, int8 and int4 variants.

Models (built offline by `vlmopt demo-model`, then `export`, `convert` and `quantize --part`, each verified):
  a  CLIP ViT-B/32 vision (random) + the real SmolLM2-135M-Instruct (`--size base --language-model smollm2`)
  b  LLaVA-OneVision-0.5B's sizes, random weights: SigLIP-so400m/14 at 384 px + Qwen2-0.5B (`--size small`)
Contenders: `hf` (transformers `generate`, SDPA, its KV cache: the reference), `onnx` (fp32 parts through
vlmopt's ORT loop, the decoder from onnxruntime-genai's model builder: GroupQueryAttention, KV cache in place),
`onnx-torch` (the same with the decoder exported from PyTorch), `int8` (decoder weight-only int8 MatMulNBits +
vision int8), `int4` (decoder int4 MatMulNBits + vision int8), `int4-prefill` (the same with an int8-dynamic
prompt decoder beside it, `quantize --prefill int8-dynamic`) and `int4-torch` (int4 of the PyTorch-exported decoder). The variants are made with the fidelity gates off so their speed is shown; their agreement and
perplexity on the real text are printed from the manifest beside them. `llama.cpp` is an anchor outside vlmopt, for
model a at batch 1 where `llama-cpp-python` is installed: the same SmolLM2 GGUF (Q4_1), text only, on a prompt as
long as the VLM's prefill.

Per contender and batch (1 and 4): image encode latency (the vision part alone), time to first token for one
image per sequence and a 32-token prompt (chat template included), decode tokens/s per sequence over the steps
after the first, and the process's peak RSS, each after one 2-token warm-up generation in the same process. Every measurement runs in its own process (the 0.9 B model's
contenders do not fit in memory together) and the contenders take turns, round after round (interleaved), so
a change in the machine's load hits all of them; the medians are reported. The machine's memory bandwidth is
measured in the same run, and decode at batch 1 is reported as achieved bytes/s (decoder weight bytes read per
token x tokens/s) and as a fraction of it. A benchmark reports; it does not gate.

  python benchmarks/vlm.py [--models a,b] [--root build/bench-vlm] [--rounds 2] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# torch's OpenMP threads spin after each op by default; on shared cores that slows whatever runs next
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

MODELS = {
    "a": ("CLIP ViT-B/32 + real SmolLM2-135M", ["--family", "llava", "--size", "base", "--language-model", "smollm2"]),
    "b": ("LLaVA-OneVision-0.5B sizes (SigLIP-so400m + Qwen2-0.5B), random", ["--family", "llava", "--size", "small"]),
    "s": (
        "SmolVLM-256M-Instruct sizes (SigLIP-B/16 at 512 px tiles + SmolLM2-135M), one 512 px tile per image, random",
        ["--family", "smolvlm", "--size", "256m"],
    ),
    "q": (
        "Qwen2.5-VL-3B widths and vocabulary, 4 of 32 vision blocks and 4 of 36 text layers (0.74 B params), random",
        ["--family", "qwen2_5_vl", "--size", "3b-4l"],
    ),
}
#: the sample image's side (px) per model: Qwen2.5-VL takes images at their own size (448 px: 256 image tokens)
IMAGE_SIDE = {"q": 448}
#: image processor settings per model: SmolVLM's processor splits an image into up to 4x4 tiles of 512 px plus the
#: whole (17 ViT-B/16 passes of 1024 patches, over a minute of vision alone on 2 loaded cores); its own
#: `do_image_splitting=False` setting sends the one 512 px tile (64 image tokens), which is what is timed here
IMAGE_PROCESSOR = {"s": {"do_image_splitting": False}}
#: artifact name -> convert flags: `onnx` is convert's default (the decoder from onnxruntime-genai's model builder),
#: `onnx-torch` the decoder exported from PyTorch, for the comparison of the two makers
CONVERSIONS = {"onnx": [], "onnx-torch": ["--decoder", "torch", "--name", "onnx-torch"]}
#: the fidelity gates are off for every variant: a benchmark reports, and model b's random language model makes
#: agreement meaningless (its weight-only int8 decoder agrees on 0.895 of the positions, below the 0.90 default)
_GATES_OFF = ["--min-token-agreement", "off", "--max-ppl-increase", "off"]
_INT4 = ["--part", "decoder=int4", "--part", "vision=int8", *_GATES_OFF]
#: artifact name -> (parent, quantize flags) (parts not named stay fp32)
VARIANTS = {
    "int8": ("onnx", ["--part", "decoder=int8", "--part", "vision=int8", *_GATES_OFF]),
    "int4": ("onnx", _INT4),
    "int4-torch": ("onnx-torch", _INT4),
    # MatMulNBits' compute at accuracy level 1 (fp32 activations) instead of the default 4 (int8 activations)
    "int4-acc1": ("onnx", [*_INT4, "--accuracy-level", "1"]),
    # int4 decode steps beside an int8-dynamic (MatMulInteger) prompt decoder: `quantize --prefill`, the product's path
    "int4-prefill": ("onnx", [*_INT4, "--prefill", "int8-dynamic"]),
}
#: contender -> (artifact, artifact whose decoder runs the prompt): the int4 decode decoder beside another prefill decoder
PREFILL_SPLITS = {"int4+int8-prefill": ("int4", "int8"), "int4+fp32-prefill": ("int4", "onnx")}
#: optimum-intel's OpenVINO export of the same checkpoint (`optimum-cli export openvino --weight-format ...`), timed
#: by `vlm_openvino_anchor.py` under optimum-intel's own environment's python (`--optimum-intel`)
#: int4 in blocks of 32, as vlmopt's (optimum-intel's default 128 does not divide SmolLM2's 576 channels)
OPENVINO_ANCHORS = {"ov-int4": ["--weight-format", "int4", "--group-size", "32"], "ov-fp32": ["--weight-format", "fp32"]}
CONTENDERS = ("hf", "onnx", "onnx-torch", "int8", "int4", "int4-torch", "int4-acc1", "int4-prefill", *PREFILL_SPLITS, *OPENVINO_ANCHORS, "llama.cpp")
#: the contenders when --contenders is not given: LLaVA's as before; SmolVLM's and Qwen's with the prefill levers and
#: the optimum-intel anchor (Qwen's `onnx` decoder is already PyTorch's: it has no builder decoder, M-RoPE)
DEFAULT_CONTENDERS = {
    "a": ("hf", "onnx", "onnx-torch", "int8", "int4", "int4-torch", "llama.cpp"),
    "b": ("hf", "onnx", "onnx-torch", "int8", "int4", "int4-torch"),
    "s": ("hf", "onnx", "int8", "int4", "int4-acc1", "int4-prefill", *PREFILL_SPLITS, *OPENVINO_ANCHORS),
    "q": ("hf", "onnx", "int8", "int4", "int4-acc1", "int4-prefill", *PREFILL_SPLITS, *OPENVINO_ANCHORS),
}
#: the anchor outside vlmopt: llama.cpp (`llama-cpp-python`, built from source by pip, about 15 minutes here, so
#: `make install` does not install it) running the same SmolLM2 GGUF, text only, on a prompt of the same length
ANCHOR = "llama.cpp"
DECODE_TARGET, TTFT_TARGET = 3.0, 1.5
PROMPT = "Look at this picture carefully and describe everything you can see in it, including the colors, the shapes, and anything unusual about them. "


def vlmopt(*args: object) -> None:
    command = [sys.executable, "-m", "vlmopt", *map(str, args)]
    print("$ vlmopt " + " ".join(map(str, args)), flush=True)
    subprocess.run(command, check=True)


def prepare(model: str, root: Path, threads: int, contenders: tuple[str, ...] = CONTENDERS, optimum_intel: Path | None = None) -> Path:
    """The model directory with hf, onnx and the variants (and the OpenVINO anchors' folders beside it); steps
    already done are kept (vlmopt skips them too)."""
    source, model_dir = root / f"{model}-src", root / model
    if not (source / "config.json").is_file():
        vlmopt("demo-model", source, *MODELS[model][1])
    artifacts = json.loads((model_dir / "vlmopt.json").read_text())["artifacts"] if (model_dir / "vlmopt.json").is_file() else {}
    if "hf" not in artifacts:
        vlmopt("export", source, "-o", model_dir)
    splits = {a for c in contenders if c in PREFILL_SPLITS for a in PREFILL_SPLITS[c]}
    variants = (set(contenders) | splits) & set(VARIANTS)
    needed = set(contenders) | splits | {VARIANTS[c][0] for c in variants}
    for name, flags in CONVERSIONS.items():
        if name not in artifacts and name in needed:
            vlmopt("convert", model_dir, *flags, "--threads", threads)
    for name, (parent, flags) in VARIANTS.items():
        if name not in artifacts and name in variants:
            vlmopt("quantize", model_dir, "--from", parent, *flags, "--name", name, "--threads", threads)
    for name in (c for c in contenders if c in OPENVINO_ANCHORS and optimum_intel is not None):
        openvino_export(source, root / f"{model}-{name}", OPENVINO_ANCHORS[name], optimum_intel)
    return model_dir


def openvino_export(source: Path, out: Path, flags: list[str], optimum_intel: Path) -> None:
    """optimum-intel's export of the demo checkpoint, written to a temporary folder and moved into place when done.
    It reads the checkpoint with transformers 4.x (its pins), so it gets the config in 4.x's layout (`legacy_checkpoint`)."""
    if (out / "openvino_language_model.xml").is_file():
        return
    legacy = legacy_checkpoint(source, out.parent / f"{source.name}-4x")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    command = [str(optimum_intel.parent / "optimum-cli"), "export", "openvino", "--model", str(legacy), "--task", "image-text-to-text"]
    command += [*flags, str(partial)]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    partial.rename(out)


def legacy_checkpoint(source: Path, dest: Path) -> Path:
    """`source` as transformers 4.x reads it (links to its files; the config's `rope_parameters` also written as 4.x's
    `rope_theta` and `rope_scaling`, and the text config's fields at the top level too, as the Hub's Qwen2.5-VL configs hold them)."""
    if (dest / "config.json").is_file():
        return dest
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for path in source.iterdir():
        if path.name != "config.json":
            (partial / path.name).symlink_to(path.resolve())
    config = json.loads((source / "config.json").read_text())
    text = config.get("text_config") or {}
    rope = text.get("rope_parameters") or {}
    if rope:
        text["rope_theta"] = rope.get("rope_theta", 10000.0)
        if "mrope_section" in rope:
            text["rope_scaling"] = {"type": "mrope", "rope_type": "default", "mrope_section": rope["mrope_section"]}
    if config.get("model_type") == "qwen2_5_vl":
        config.update({k: v for k, v in text.items() if k not in config and k not in ("model_type", "architectures")})
    (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    partial.rename(dest)
    return dest


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB): /proc's VmHWM, which starts again at exec. getrusage's ru_maxrss does
    not: a child inherits the parent's resident size at fork as its floor (every row read 1248 MB, the parent's)."""
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- memory bandwidth ------------------------------------------------------------------------------
def bandwidth(mib: int = 1024, repeats: int = 5) -> dict[str, float]:
    """Read bandwidth (GB/s, best of `repeats`): a sum over an array far larger than the caches, numpy on one
    thread and torch on one and two; `peak` is the best of them, the ceiling decode can approach."""
    import torch

    def best(fn: Any) -> float:
        fn()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times)

    array = np.ones(mib * 2**20 // 4, np.float32)
    tensor = torch.from_numpy(array)
    found = {"numpy_1t": array.nbytes / best(array.sum) / 1e9}
    saved = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        found[f"torch_{threads}t"] = array.nbytes / best(tensor.sum) / 1e9
    torch.set_num_threads(saved)
    found["peak"] = max(found.values())
    return {k: round(v, 2) for k, v in found.items()}


# -- one contender, in its own process -------------------------------------------------------------
def anchor(prompt_tokens: int, batch: int, new_tokens: int, threads: int) -> dict[str, Any]:
    """llama.cpp on SmolLM2's own Q4_1 GGUF: greedy, a prompt of `prompt_tokens` tokens (the VLM's prefill length:
    image tokens and chat template included), time to first token and decode tokens/s over the steps after it."""
    import llama_cpp

    from vlmopt.demo_llava import smollm2_gguf

    if batch != 1:
        raise SystemExit("llama.cpp's Python binding generates one sequence at a time")
    path = smollm2_gguf()
    llm = llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
    ids = llm.tokenize((PROMPT * 20).encode(), add_bos=False)[:prompt_tokens]
    llama_cpp_generate(llm, ids, 2)  # the warm-up every contender gets
    timed = llama_cpp_generate(llm, ids, new_tokens)
    return {
        "image_encode_s": None,
        **timed,
        "prompt_tokens": len(ids),
        "peak_rss_mb": peak_rss_mb(),
        "decoder_bytes_per_token": path.stat().st_size,
        "text": f"llama.cpp {llama_cpp.__version__}, {path.name}, text only",
    }


def llama_cpp_generate(llm: Any, ids: list[int], new_tokens: int) -> dict[str, Any]:
    """Greedy generation of up to `new_tokens` tokens after the prompt `ids` by a loaded `llama_cpp.Llama`, streamed:
    time to first token, decode tokens/s over the steps after it, and how many it made (fewer where it ended the text;
    no logit bias bans that: llama-cpp-python applies one through a per-token Python sampler, which would slow it)."""
    started = time.perf_counter()
    stamps = []
    llm.reset()  # a fresh cache: the prompt's prefill is timed, never a prefix match with the last run
    for _ in llm.create_completion(ids, max_tokens=new_tokens, temperature=0.0, stream=True):
        stamps.append(time.perf_counter())
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
    return {"ttft_s": stamps[0] - started, "decode_tokens_per_s": decode, "new_tokens": len(stamps)}


def child(model_dir: Path, artifact: str, batch: int, new_tokens: int, threads: int) -> dict[str, Any]:
    from vlmopt.generation import Generator
    from vlmopt.runners.generate import GenerateRequest
    from vlmopt.workspace import ModelDir

    directory = ModelDir.open(model_dir)
    decode, prefill = PREFILL_SPLITS.get(artifact, (artifact, None))
    record = directory.artifact("hf" if artifact == ANCHOR else decode)
    backend = "transformers" if record.kind == "hf" else "onnxruntime"
    generator = Generator(model_dir, record.name, backend, threads)
    preprocessor = generator.preprocessor
    prompt = bench_prompt(preprocessor, model_dir.name, batch)
    if artifact == ANCHOR:
        return anchor(int(prompt.input_ids.shape[1]), batch, new_tokens, threads)
    request = GenerateRequest(prompt, new_tokens, preprocessor.eos_token_ids, preprocessor.pad_token_id, min_new_tokens=new_tokens)
    if prefill is not None:  # the decode artifact's parts, and the prefill artifact's decoder for the prompt
        from vlmopt.runners.generate import OrtGenerateRunner, prefill_part

        files = {name: tower.file or "" for name, tower in record.towers.items()}
        other = directory.artifact(prefill)
        decoder = preprocessor.contract.decoder.name
        files[prefill_part(preprocessor.contract)] = str((directory.artifact_path(prefill) / (other.towers[decoder].file or "")).resolve())
        generator.runner = OrtGenerateRunner(directory.artifact_path(record.name), files, threads, preprocessor.contract)
    with generator.load():
        runner = generator.runner
        encode = []
        for _ in range(3 if batch == 1 else 0):
            started = time.perf_counter()
            runner.encode_images(prompt.pixel_values, prompt.vision_inputs, prompt.reference_inputs)  # batch 1: the one image's tiles/patches
            encode.append(time.perf_counter() - started)
        # one short warm-up generation first (every contender, the anchor too): ONNX Runtime's and PyTorch's first run of
        # a part allocates its arenas and picks kernels, which is start-up, not the time to a first token
        runner.generate(GenerateRequest(prompt, 2, preprocessor.eos_token_ids, preprocessor.pad_token_id, min_new_tokens=2))
        result = runner.generate(request)
        weights = decoder_bytes(runner, directory, record, preprocessor.family)
    return {
        "image_encode_s": statistics.median(encode) if encode else None,
        "ttft_s": result.ttft_s,
        "decode_tokens_per_s": result.decode_tokens_per_s,
        "prompt_tokens": int(prompt.input_ids.shape[1]),
        "new_tokens": len(result.tokens[0]),
        "peak_rss_mb": peak_rss_mb(),
        "decoder_bytes_per_token": weights,
        "text": preprocessor.decode(result.tokens[0])[:120],
    }


def bench_prompt(preprocessor: Any, model: str, batch: int) -> Any:
    """The timed prompt: one sample image per sequence and 32 words of text, through the model's own processor and chat template."""
    from vlmopt.samples import sample_image

    words = preprocessor.tokenizer(PROMPT * 3, add_special_tokens=False)["input_ids"][:32]
    text = preprocessor.tokenizer.decode(words)
    side = IMAGE_SIDE.get(model, 256)
    for name, value in IMAGE_PROCESSOR.get(model, {}).items():
        setattr(preprocessor.processor.image_processor, name, value)
    return preprocessor([text] * batch, [sample_image(7 + i, side) for i in range(batch)])


def decoder_bytes(runner: Any, directory: Any, record: Any, family: Any) -> int:
    """Weight bytes a decode step reads: the decoder part's file(s) (the decode decoder's, where prefill has its own);
    for PyTorch the language model without its token table (one row per step) plus the head (read whole every step,
    tied or not)."""
    if record.kind == "hf":
        model = runner.model
        table = family.input_embeddings(model).weight
        head = family.lm_head(model).weight
        body = sum(p.numel() * p.element_size() for p in family.language_model(model).parameters() if p is not table)
        return body + head.numel() * head.element_size()
    from vlmopt import graph

    return graph.weight_bytes(directory.artifact_path(record.name), record.towers["decoder"].file)


def anchor_prompt(model_dir: Path, batch: int) -> Path:
    """The timed prompt as transformers' `generate` takes it (vlmopt's preprocessor, the family's `generate_inputs`),
    saved for the OpenVINO anchor's process; with the eos and pad ids the request uses."""
    import torch

    from vlmopt.generation import Generator

    path = model_dir.parent / f"{model_dir.name}-prompt-{batch}.npz"
    if path.is_file():
        return path
    preprocessor = Generator(model_dir, "hf", "transformers").preprocessor
    prompt = bench_prompt(preprocessor, model_dir.name, batch)
    inputs: dict[str, Any] = {"input_ids": prompt.input_ids, "attention_mask": prompt.attention_mask}
    if prompt.pixel_values is not None:
        vision = {name: torch.from_numpy(value) for name, value in prompt.vision_inputs.items()}
        inputs.update({k: v.numpy() for k, v in preprocessor.family.generate_inputs(torch.from_numpy(prompt.pixel_values), vision).items()})
    inputs.update(prompt.decoder_inputs)
    inputs.update(prompt.reference_inputs)
    inputs.update(eos_token_id=np.array(preprocessor.eos_token_ids, np.int64), pad_token_id=np.array(preprocessor.pad_token_id, np.int64))
    np.savez(path, **inputs)
    return path


def measure(model_dir: Path, artifact: str, batch: int, new_tokens: int, threads: int, optimum_intel: Path | None = None) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", str(model_dir), artifact, str(batch), str(new_tokens), "--threads", str(threads)]
    if artifact in OPENVINO_ANCHORS:
        if optimum_intel is None:
            return {"error": "no optimum-intel environment (--optimum-intel PYTHON)"}
        folder = model_dir.parent / f"{model_dir.name}-{artifact}"
        script = Path(__file__).with_name("vlm_openvino_anchor.py")
        command = [str(optimum_intel), str(script), str(folder), str(anchor_prompt(model_dir, batch)), str(new_tokens), str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {done.returncode}: {last[:200]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def quality(model_dir: Path, artifact: str) -> str:
    found = json.loads((model_dir / "vlmopt.json").read_text())["artifacts"].get(artifact) or {}
    metrics = {m["name"]: m["value"] for m in (found.get("verification") or {}).get("metrics", [])}
    agreement, ppl = metrics.get("teacher-forced next-token top-1 agreement"), metrics.get("perplexity increase")
    prompt = metrics.get("prompt decoder: teacher-forced next-token top-1 agreement"), metrics.get("prompt decoder: perplexity increase")
    shown = "" if agreement is None else f"top-1 {agreement:.3f}, ppl {ppl:+.1%}"
    return shown + (f"; prompt decoder top-1 {prompt[0]:.3f}, ppl {prompt[1]:+.1%}" if prompt[0] is not None else "")


def table(model: str, model_dir: Path, runs: dict[tuple[str, int], list[dict[str, Any]]], peak: float, contenders: tuple[str, ...] = CONTENDERS) -> str:
    def median(name: str, batch: int, key: str) -> float | None:
        values = [r[key] for r in runs.get((name, batch), []) if "error" not in r and r.get(key) is not None]
        return statistics.median(values) if values else None

    def rest(name: str, batch: int) -> float | None:
        """The median over runs of TTFT minus that run's image encode (timed apart, before the generation)."""
        values = [r["ttft_s"] - r["image_encode_s"] for r in runs.get((name, batch), []) if "error" not in r and r.get("image_encode_s") is not None]
        return statistics.median(values) if values else None

    lines = [
        f"\n### model {model}: {MODELS[model][0]}",
        "| batch | contender | image encode s | TTFT s | TTFT - encode s (the encode timed apart: rough) | decode tok/s | decode x PyTorch | TTFT x PyTorch | peak RSS MB | decoder MB/token | GB/s achieved (fraction of "
        f"{peak:.1f}) | quality vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for batch in sorted({b for _, b in runs}):
        base_rate, base_ttft = median("hf", batch, "decode_tokens_per_s"), median("hf", batch, "ttft_s")
        for name in contenders:
            if (name, batch) not in runs:
                continue
            errors = [r["error"] for r in runs.get((name, batch), []) if "error" in r]
            rate, ttft = median(name, batch, "decode_tokens_per_s"), median(name, batch, "ttft_s")
            if rate is None:
                lines.append(f"| {batch} | {name} | failed: {errors[0] if errors else 'no run'} |")
                continue
            encode, rss, weights = median(name, batch, "image_encode_s"), median(name, batch, "peak_rss_mb"), median(name, batch, "decoder_bytes_per_token")
            achieved = weights * rate / 1e9 if weights and batch == 1 else None
            lines.append(
                f"| {batch} | {name} | {'' if encode is None else f'{encode:.3f}'} | {ttft:.2f} | {'' if encode is None else f'{rest(name, batch):.2f}'} | {rate:.1f} | "
                f"{rate / base_rate if base_rate else float('nan'):.2f}x | {base_ttft / ttft if base_ttft else float('nan'):.2f}x | {rss:.0f} | "
                f"{weights / 2**20:.0f} | {'' if achieved is None else f'{achieved:.2f} ({achieved / peak:.0%})'} | {quality(model_dir, name)} |"
            )
    base = (median("hf", 1, "decode_tokens_per_s"), median("hf", 1, "ttft_s"))
    for ours in ("int4", "int4-prefill", *PREFILL_SPLITS):
        found = (median(ours, 1, "decode_tokens_per_s"), median(ours, 1, "ttft_s"))
        if not (all(found) and all(base)):
            continue
        decode, ttft = found[0] / base[0], base[1] / found[1]
        lines.append(
            f"\n{ours} at batch 1: decode {decode:.2f}x PyTorch (target {DECODE_TARGET:g}x: {'reached' if decode >= DECODE_TARGET else 'NOT reached'}), "
            f"time to first token {ttft:.2f}x (target {TTFT_TARGET:g}x: {'reached' if ttft >= TTFT_TARGET else 'NOT reached'})"
        )
        for anchor_name in OPENVINO_ANCHORS:
            other = (median(anchor_name, 1, "decode_tokens_per_s"), median(anchor_name, 1, "ttft_s"))
            if all(other):
                lines.append(
                    f"  against optimum-intel {anchor_name}: decode {found[0] / other[0]:.2f}x, time to first token {other[1] / found[1]:.2f}x (above 1: ours ahead)"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="a,b", help="comma-separated: " + ",".join(MODELS))
    parser.add_argument("--root", type=Path, default=Path("build/bench-vlm"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--contenders", default=None, help="a subset of " + ",".join(CONTENDERS) + " (hf is the reference); default: each model's own list")
    parser.add_argument(
        "--optimum-intel",
        type=Path,
        default=Path(os.environ.get("VLM_OPTIMUM_INTEL", "build/optimum-intel/bin/python")),
        help="the python of optimum-intel's own environment (`make optimum-intel-env`), for the ov-* anchors",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--child", nargs=4, metavar=("MODEL_DIR", "ARTIFACT", "BATCH", "NEW_TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model_dir, artifact, batch, new_tokens = args.child
        print(json.dumps(child(Path(model_dir), artifact, int(batch), int(new_tokens), args.threads)))
        return
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    batches = [int(b) for b in args.batches.split(",")]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    chosen = {m: tuple(c for c in CONTENDERS if c in (args.contenders.split(",") if args.contenders else DEFAULT_CONTENDERS[m])) for m in models}
    optimum_intel = args.optimum_intel if args.optimum_intel.is_file() else None
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    directories = {model: prepare(model, args.root, args.threads, chosen[model], optimum_intel) for model in models}
    measured = bandwidth()
    print(f"\nmemory read bandwidth (GB/s, best of 5 over 1 GiB): {measured}", flush=True)
    results: dict[str, Any] = {"started": started, "bandwidth_gbs": measured, "load_before": os.getloadavg(), "models": {}}
    report = []
    for model in models:
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        contenders = chosen[model]
        for round_ in range(args.rounds):
            for batch in batches:
                for name in contenders:
                    if name == ANCHOR and (model != "a" or batch != 1):
                        continue  # the anchor runs SmolLM2, model a's language model, one sequence at a time
                    if name == ANCHOR and importlib.util.find_spec("llama_cpp") is None:
                        runs[(name, batch)] = [{"error": "llama-cpp-python is not installed (pip builds llama.cpp from source, ~15 min)"}]
                        continue
                    run = measure(directories[model], name, batch, args.new_tokens, args.threads, optimum_intel)
                    run["load"] = os.getloadavg()[0]
                    runs.setdefault((name, batch), []).append(run)
                    shown = run.get("error") or f"TTFT {run['ttft_s']:.2f} s, {run['decode_tokens_per_s'] or 0:.1f} tok/s, RSS {run['peak_rss_mb']:.0f} MB"
                    print(f"[{model} round {round_ + 1} batch {batch}] {name}: {shown} (load {run['load']:.1f})", flush=True)
        report.append(table(model, directories[model], runs, measured["peak"], contenders))
        results["models"][model] = {f"{name}@{batch}": value for (name, batch), value in runs.items()}
    results["load_after"] = os.getloadavg()
    print("\n".join(report))
    print(f"\nload average before/after: {results['load_before'][0]:.1f} / {results['load_after'][0]:.1f} on {os.cpu_count()} cores")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
