"""onnxruntime-genai's model builder as the maker of a decoder part (`vlmopt convert --decoder builder`).

The builder (`onnxruntime_genai.models.builder`, PyPI `onnxruntime-genai`, checked with 0.18) writes Llama,
Mistral and Qwen2 decoders from Hugging Face weights with ONNX Runtime's fused operators: GroupQueryAttention
(rotary embedding inside, one KV buffer per layer updated in place), SkipSimplifiedLayerNormalization, one
QKV MatMul. With `exclude_embeds=true` it takes `inputs_embeds`: the decoder part of a VLM.

It reads a causal-LM checkpoint folder. vlmopt writes the loaded VLM's language model and head (found where the
family's generative contract says, `vlmopt.families.generative`) into a scratch folder as one (the same tensors, saved in shards), runs the builder in a process of its own (so its memory is
its own; its peak is recorded), and renames the graph to the part's file with vlmopt's axis names. The
builder's command line is fixed here; nothing a user typed reaches it but the checkpoint's own folder.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmopt.errors import VlmoptError
from vlmopt.families import Tower
from vlmopt.versions import package_version

#: the language models the builder makes, and the architecture its checkpoint reader dispatches on
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
#: the builder's axis names -> vlmopt's (`kv_cache_dim`, the head size, becomes its number)
AXES = {"batch_size": "batch", "sequence_length": "sequence", "past_sequence_length": "past_sequence", "total_sequence_length": "total_sequence"}
MODULE = "onnxruntime_genai.models.builder"
#: runs the builder's module as `python -m` would, then reports the process's own peak RSS (VmHWM: its address
#: space's high-water mark; getrusage's maxrss would carry the parent's over from spawning)
_LAUNCHER = """import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
finally:
    peak = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")]
    print("vlmopt-peak-kb", peak[0] if peak else 0, file=sys.stderr)
"""
PEAK_MARK = "vlmopt-peak-kb"


def builder_version() -> str | None:
    return package_version("onnxruntime-genai")


def unsupported(text_config: Any) -> str | None:
    """Why the builder cannot make this language model's decoder here, or None."""
    import importlib.util

    model_type = getattr(text_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        return f"onnxruntime-genai's model builder does not build '{model_type}' language models (vlmopt uses it for {', '.join(ARCHITECTURES)})"
    if builder_version() is None or importlib.util.find_spec("onnxruntime_genai") is None:
        return "onnxruntime-genai's model builder is not installed (pip install onnxruntime-genai, or the llava extra)"
    return None


def write_language_model(family: Any, model: Any, tokenizer: Any, folder: Path) -> None:
    """The VLM's language model and head (where `family` says they are) as a causal-LM checkpoint folder (config,
    safetensors shards, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(family.text_config(model.config))
    config.architectures = [ARCHITECTURES[config.model_type]]
    with torch.device("meta"):
        causal = AutoModelForCausalLM.from_config(config)
    setattr(causal, causal.base_model_prefix, family.language_model(model))
    causal.set_output_embeddings(family.lm_head(model))
    # shards bound the bytes serialised at once (safetensors copies a shard's tensors to write it)
    causal.save_pretrained(str(folder), max_shard_size="200MB")
    tokenizer.save_pretrained(str(folder))


def run_builder(source: Path, output: Path, cache: Path, debug: bool = False) -> tuple[float, float | None]:
    """The builder on `source` (fp32, CPU, embeddings excluded) into `output`; its seconds and peak RSS (MB; None
    where /proc does not tell)."""
    command = [sys.executable, "-c", _LAUNCHER, MODULE, "-i", str(source), "-o", str(output), "-p", "fp32", "-e", "cpu", "-c", str(cache)]
    command += ["--extra_options", "exclude_embeds=true"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if debug:
        sys.stderr.write(done.stdout + done.stderr)
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    peaks = [line.split()[1] for line in lines if line.startswith(PEAK_MARK)]
    if done.returncode != 0:
        errors = [line for line in lines if not line.startswith(PEAK_MARK)]
        raise VlmoptError(
            f"onnxruntime-genai's model builder failed (exit {done.returncode}): {(errors or ['see --debug'])[-1][:300]}; "
            "`vlmopt convert --decoder torch` exports the decoder from PyTorch instead"
        )
    peak_kb = int(peaks[-1]) if peaks and peaks[-1].isdigit() else 0
    return seconds, (peak_kb / 1024 if peak_kb else None)


def adopt_graph(built: Path, path: Path, tower: Tower) -> dict[str, int]:
    """The builder's `model.onnx` (+ `.data`) as `path` (+ `path.data`), its interface checked against `tower` and its
    axes renamed; the operator counts."""
    import onnx

    model = onnx.load(str(built / "model.onnx"), load_external_data=False)
    names = ([v.name for v in model.graph.input], [v.name for v in model.graph.output])
    expected = ([s.name for s in tower.inputs], [s.name for s in tower.outputs])
    if sorted(names[0]) != sorted(expected[0]) or sorted(names[1]) != sorted(expected[1]):
        raise VlmoptError(
            f"onnxruntime-genai {builder_version()}'s decoder has inputs {names[0][:4]}... and outputs {names[1][:3]}...; "
            f"vlmopt expects {expected[0][:4]}... and {expected[1][:3]}...; use --decoder torch"
        )
    data = f"{path.name}.data"
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = data
    specs = {spec.name: spec for spec in (*tower.inputs, *tower.outputs)}
    for value in (*model.graph.input, *model.graph.output):
        for dim, axis in zip(value.type.tensor_type.shape.dim, specs[value.name].shape, strict=True):
            if isinstance(axis, str):
                dim.Clear()
                dim.dim_param = axis
            elif dim.HasField("dim_param"):
                if dim.dim_param in AXES:
                    raise VlmoptError(f"the builder's {value.name} has axis '{dim.dim_param}' where vlmopt expects {axis}")
                dim.Clear()
                dim.dim_value = axis
    for values, order in ((model.graph.input, expected[0]), (model.graph.output, expected[1])):
        ordered = sorted(values, key=lambda v: order.index(v.name))  # the tower's order: runners feed and read by it
        copies = [type(v)() for v in ordered]
        for copy_, value in zip(copies, ordered, strict=True):
            copy_.CopyFrom(value)
        del values[:]
        values.extend(copies)
    del model.graph.value_info[:]
    if (built / "model.onnx.data").exists():
        shutil.move(str(built / "model.onnx.data"), str(path.with_name(data)))
    onnx.save(model, str(path))
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def build_decoder(family: Any, model: Any, tokenizer: Any, tower: Tower, path: Path, say: Callable[[str], None], debug: bool = False) -> dict[str, Any]:
    """The decoder part at `path`, made by onnxruntime-genai's builder from `model`'s language model (`family`'s
    generative contract says where it is); what it did."""
    scratch = path.parent / ".builder"
    scratch.mkdir()
    try:
        say("writing the language model as a causal-LM checkpoint for onnxruntime-genai's builder")
        write_language_model(family, model, tokenizer, scratch / "checkpoint")
        say(f"building the decoder with onnxruntime-genai {builder_version()}'s model builder (fp32, GroupQueryAttention)")
        seconds, peak_mb = run_builder(scratch / "checkpoint", scratch / "built", scratch / "cache", debug)
        search = json.loads((scratch / "built" / "genai_config.json").read_text()).get("search", {})
        counts = adopt_graph(scratch / "built", path, tower)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not counts.get("GroupQueryAttention"):
        raise VlmoptError("onnxruntime-genai's builder made a decoder without GroupQueryAttention; use --decoder torch")
    return {
        "maker": "onnxruntime-genai model builder",
        "version": builder_version(),
        "options": {"precision": "fp32", "execution_provider": "cpu", "exclude_embeds": True},
        "build_seconds": round(seconds, 2),
        "builder_peak_rss_mb": None if peak_mb is None else round(peak_mb, 1),
        "past_present_share_buffer": bool(search.get("past_present_share_buffer", True)),
        "fused_operators": {
            op: n for op, n in sorted(counts.items()) if op in ("GroupQueryAttention", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization")
        },
    }
