"""onnxruntime-genai (PyPI `onnxruntime-genai`, tested with 0.18) as a generation backend for three-part artifacts.

`genai_config.json` declares the model type the family's generative contract names (`genai_model_type`; a family
genai runs none of gets no config). Its multimodal pipeline is generic for the types whose vision state is the
plain one, `phi3v` and `gemma3`: vision (pixel_values) -> image_features, embedding (input_ids, image_features)
-> inputs_embeds, then the decoder. What is type-specific there is the *processor* (phi3v's HD crops, gemma3's
256 `<image_soft_token>`), which cannot serve llava, whose contract declares `phi3v` (genai has no `llava`). So
the runner does not use genai's processor: it feeds the ids (image tokens already expanded by the model's own
processor) and the pixels through `generator.set_inputs`, with `num_image_tokens` (the prompt's image tokens),
without which the pipeline silently runs no vision part.
Its multimodal pipeline generates one sequence at a time. This leans on genai internals (the generic vision
state of phi3v, that extra input), so the artifact records the genai version it was checked with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vlmopt.errors import VlmoptError
from vlmopt.families.generative import ATTENTION_MASK, IMAGE_FEATURES, INPUT_IDS, INPUTS_EMBEDS, LOGITS, PIXEL_VALUES, POSITION_IDS
from vlmopt.runners.generate import GenerateRequest, GenerateResult, GenerateRunner, OnToken, Steps
from vlmopt.versions import package_version

CONFIG_NAME = "genai_config.json"


def genai_version() -> str | None:
    return package_version("onnxruntime-genai")


def write_genai_config(folder: Path, towers: dict[str, Any], preprocessor: Any) -> dict[str, Any] | None:
    """genai_config.json for the artifact in `folder` (the towers of the family's contract, sections named after its
    parts); what it declares. None, and no file, where onnxruntime-genai runs no model type of the family.

    The decoder's contract is read from its interface: with position_ids it is a Concat-KV graph (torch export,
    past and present separate), without it onnxruntime-genai's own GroupQueryAttention graph (one shared buffer)."""
    contract = preprocessor.contract
    model_type = contract.genai_model_type
    if model_type is None:
        return None
    decoder = towers[contract.decoder.name]
    interface = decoder.tower
    layout = interface.meta.get("kv_cache") or {}
    inputs = {spec.name for spec in interface.inputs}
    position_ids = POSITION_IDS in inputs
    # threads: ONNX Runtime's default (the runner overlays --threads); string entries are session config entries:
    # threads that spin between runs slow whatever else runs on shared cores
    session = {"log_id": "vlmopt", "session.intra_op.allow_spinning": "0"}
    decoder_inputs = {
        "inputs_embeds": INPUTS_EMBEDS,
        "attention_mask": ATTENTION_MASK,
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
        **({"position_ids": POSITION_IDS} if position_ids else {}),
    }
    vocab = interface.vocab
    eos = preprocessor.eos_token_ids
    entries = preprocessor.family.genai_entries(preprocessor.config)
    config = {
        "model": {
            "type": model_type,
            "bos_token_id": vocab.bos_token_id if vocab and vocab.bos_token_id is not None else preprocessor.pad_token_id,
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": preprocessor.pad_token_id,
            "vocab_size": layout["vocab_size"],
            "context_length": layout["max_positions"],
            **entries.get("model", {}),
            contract.decoder.name: {
                "filename": decoder.file,
                "session_options": session,
                "head_size": layout["head_dim"],
                "hidden_size": layout["hidden_size"],
                "num_attention_heads": layout["num_heads"],
                "num_hidden_layers": layout["num_layers"],
                "num_key_value_heads": layout["kv_heads"],
                "inputs": decoder_inputs,
                "outputs": {"logits": LOGITS, "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
            },
            contract.embedding.name: {
                "filename": towers[contract.embedding.name].file,
                "session_options": session,
                "inputs": {"input_ids": INPUT_IDS, "image_features": IMAGE_FEATURES},
                "outputs": {"inputs_embeds": INPUTS_EMBEDS},
            },
            **(
                {
                    contract.vision.name: {
                        "filename": towers[contract.vision.name].file,
                        "session_options": session,
                        "inputs": {"pixel_values": PIXEL_VALUES, **{name: name for name in contract.vision_inputs}},
                        "outputs": {"image_features": IMAGE_FEATURES},
                        **entries.get(contract.vision.name, {}),
                    }
                }
                if contract.vision is not None
                else {}
            ),
        },
        "search": {
            "do_sample": False,
            "max_length": layout["max_positions"],
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": not position_ids,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return {"file": CONFIG_NAME, "model_type": model_type, "past_present_share_buffer": not position_ids, "written_with_genai": genai_version()}


def write_runtime_files(preprocessor: Any, folder: Path, towers: dict[str, Any]) -> dict[str, Any]:
    """Beside the parts: the processor's files (tokenizer, chat template, image processor) and genai_config.json."""
    return {"processor_files": preprocessor.save(folder), "genai_config": write_genai_config(folder, towers, preprocessor)}


def unfed_decoder_inputs(folder: Path) -> list[str]:
    """The decoder graph's inputs that genai_config.json does not name (so onnxruntime-genai would not feed them),
    other than the optional `logits_to_keep`."""
    import onnx

    from vlmopt.graph import LOGITS_TO_KEEP

    sections = json.loads((folder / CONFIG_NAME).read_text())["model"].values()
    section = next(part for part in sections if isinstance(part, dict) and "past_key_names" in part.get("inputs", {}))
    named = [str(name) for name in section.get("inputs", {}).values()]
    graph = onnx.load(str(folder / section["filename"]), load_external_data=False).graph
    initializers = {tensor.name for tensor in graph.initializer}

    def fed(name: str) -> bool:
        return any(name == pattern or ("%d" in pattern and name.startswith(pattern.split("%d")[0])) for pattern in named)

    return [i.name for i in graph.input if i.name != LOGITS_TO_KEEP and i.name not in initializers and not fed(i.name)]


class GenaiGenerateRunner(GenerateRunner):
    """onnxruntime-genai's multimodal pipeline over the artifact's parts, one sequence at a time."""

    backend = "onnxruntime-genai"
    max_batch = 1

    def __init__(self, folder: Path, image_token_id: int, threads: int | None = None):
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise VlmoptError("the onnxruntime-genai backend needs the onnxruntime-genai package: pip install onnxruntime-genai") from None
        if not (folder / CONFIG_NAME).is_file():
            raise VlmoptError(f"{folder} has no {CONFIG_NAME}; re-make it with `vlmopt convert` to run it under onnxruntime-genai")
        self.og = og
        self.image_token_id = image_token_id
        unfed = unfed_decoder_inputs(folder)
        if unfed:
            raise VlmoptError(
                f"onnxruntime-genai {genai_version()} feeds the decoder no {', '.join(unfed)}, which this model's decoder takes; "
                "generate with --backend onnxruntime (vlmopt's own loop)"
            )
        try:
            config = og.Config(str(folder))
            if threads:
                options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
                sections = json.loads((folder / CONFIG_NAME).read_text())["model"]
                parts = {part: {"session_options": options} for part, value in sections.items() if isinstance(value, dict) and "filename" in value}
                config.overlay(json.dumps({"model": parts}))
            self.model = og.Model(config)
        except Exception as exc:
            raise VlmoptError(f"onnxruntime-genai {genai_version()} cannot load {folder}: {(str(exc).splitlines() or [''])[0][:300]}") from exc

    def generate_impl(self, request: GenerateRequest, on_token: OnToken | None) -> GenerateResult:
        og, prompt = self.og, request.prompt
        length = int(prompt.input_ids.shape[1])
        params = og.GeneratorParams(self.model)
        search: dict[str, Any] = {"max_length": length + request.max_new_tokens, "min_length": length + request.min_new_tokens}
        if request.sampling.greedy:
            search.update(do_sample=False, top_k=1)
        else:
            search.update(do_sample=True, temperature=request.sampling.temperature, top_p=request.sampling.top_p, top_k=0, random_seed=request.sampling.seed)
        params.set_search_options(**search)
        generator = og.Generator(self.model, params)
        inputs = og.NamedTensors()
        inputs[INPUT_IDS] = prompt.input_ids.astype(np.int32)
        if prompt.pixel_values is not None:
            inputs[PIXEL_VALUES] = prompt.pixel_values.astype(np.float32)
            for name, value in prompt.vision_inputs.items():
                inputs[name] = value
            inputs["num_image_tokens"] = np.array([int((prompt.input_ids == self.image_token_id).sum())], dtype=np.int64)
        steps = Steps(request, on_token)
        generator.set_inputs(inputs)  # vision, embedding and the decoder's prefill
        while not generator.is_done():
            generator.generate_next_token()
            steps.add(np.asarray(generator.get_next_tokens(), dtype=np.int64).reshape(1))
            if steps.finished:
                break
        return steps.result()

    def close(self) -> None:
        self.model = None
