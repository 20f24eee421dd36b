"""Demo SmolVLM / Idefics3 checkpoints, buildable offline: `vlmopt demo-model DIR --family smolvlm|idefics3 --size tiny|256m`.

  tiny   a 2-layer SigLIP-style tower at 32 px tiles (patch 8, pixel shuffle 2: 4 image tokens a tile), images split
         into at most 3x3 tiles plus the whole image, and a 2-layer Llama with the tiny byte-level tokenizer (tests)
  256m   SmolVLM-256M-Instruct's sizes (timing): a 12-layer tower at 512 px tiles (patch 16, pixel shuffle 4:
         64 tokens a tile), images up to 2048 px (4x4 tiles), and a 30-layer Llama with SmolLM2-135M's sizes

The processor is Idefics3's (SmolVLM's own needs torchvision for its video processor; both make the same image
prompts and tiles), with the tokenizer's chat template taught to take image parts (`vlmopt.demo_llava`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmopt.errors import VlmoptError

SIZES = ("tiny", "256m")
#: the tokens Idefics3's processor writes around each tile (single tokens, as in the real tokenizer)
IMAGE_SPECIALS = ("<fake_token_around_image>", "<global-img>")


def vision_config(size: str) -> dict[str, Any]:
    if size == "tiny":
        return {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "image_size": 32, "patch_size": 8}
    return {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12, "image_size": 512, "patch_size": 16}


def text_config(size: str, vocab_size: int) -> dict[str, Any]:
    """The tiny llava demo's Llama with room for the tiles' tokens, or SmolVLM-256M-Instruct's (SmolLM2-135M's sizes)."""
    from vlmopt.demo_llava import text_config as llava_text_config

    if size == "tiny":
        return {**llava_text_config("tiny", vocab_size), "max_position_embeddings": 1024}
    return {**llava_text_config("base", 49280), "tie_word_embeddings": False}


def build_smolvlm(dest: Path, size: str, seed: int = 0, model_type: str = "smolvlm") -> dict[str, Any]:
    """Write a SmolVLM (or Idefics3) Hugging Face folder (safetensors, config, processor) into `dest`; what it holds."""
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessorPil,
    )

    from vlmopt.demo_llava import _pad, tiny_tokenizer
    from vlmopt.families.llava import IMAGE_TOKEN
    from vlmopt.families.smolvlm import SmolVlmFamily

    if size not in SIZES:
        raise VlmoptError(f"unknown {model_type} demo size '{size}'; choose one of {', '.join(SIZES)}")
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(512 if size == "tiny" else 2048)
    tokenizer.add_tokens(list(IMAGE_SPECIALS), special_tokens=True)
    vision = vision_config(size)
    scale = 2 if size == "tiny" else 4
    text = text_config(size, _pad(len(tokenizer)))
    token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config_class, model_class = (
        (Idefics3Config, Idefics3ForConditionalGeneration) if model_type == "idefics3" else (SmolVLMConfig, SmolVLMForConditionalGeneration)
    )
    config = config_class(vision_config=vision, text_config=text, scale_factor=scale, image_token_id=token, tie_word_embeddings=False)
    family = SmolVlmFamily()
    for name in ("pad", "eos", "bos"):
        setattr(family.text_config(config), f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
    model = model_class(config).eval()
    generation = model.generation_config
    generation.eos_token_id, generation.pad_token_id, generation.bos_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id
    generation.do_sample = False
    tile = vision["image_size"]
    per_tile = (tile // vision["patch_size"]) ** 2 // scale**2
    image_processor = SmolVLMImageProcessorPil(size={"longest_edge": (3 if size == "tiny" else 4) * tile}, max_image_size={"longest_edge": tile})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=per_tile, chat_template=tokenizer.chat_template)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    return {"image_tokens_per_tile": per_tile, "image_token_id": token}
