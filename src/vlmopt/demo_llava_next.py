"""Demo LLaVA-NeXT and LLaVA-OneVision checkpoints, buildable offline: `vlmopt demo-model DIR --family llava_next|llava_onevision --size tiny`.

  llava_next       a 2-layer CLIP tower at 32 px tiles (patch 8: 16 feature rows a tile, the class token dropped),
                   images tiled on grids up to 2x2 or 1x3, and the tiny llava demo's 2-layer Llama
  llava_onevision  a 2-layer SigLIP tower at 32 px tiles (patch 8: 16 rows a tile), OneVision's grids of 1x1 to 6x6
                   tiles with `anyres_max_9` (a grid over 9 tiles' worth is shrunk bilinearly, as in the real
                   checkpoints), and a 2-layer Qwen2

Random weights, transformers' real classes, the tiny byte-level tokenizer with `<image>` and a chat template that
takes image parts (`vlmopt.demo_llava`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmopt.errors import VlmoptError

SIZES = ("tiny",)
TILE, PATCH = 32, 8


def build_llava_next(dest: Path, size: str, seed: int = 0, model_type: str = "llava_next") -> dict[str, Any]:
    """Write a LLaVA-NeXT (or LLaVA-OneVision) Hugging Face folder (safetensors, config, processor) into `dest`; what it holds."""
    import torch
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
    )

    from vlmopt.demo_llava import _pad, text_config, tiny_tokenizer, vision_config
    from vlmopt.families.llava import IMAGE_TOKEN
    from vlmopt.families.llava_next import LlavaNextFamily, onevision_processor_class

    if size not in SIZES:
        raise VlmoptError(f"unknown {model_type} demo size '{size}'; choose one of {', '.join(SIZES)}")
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(512)
    onevision = model_type == "llava_onevision"
    if onevision:  # its processor counts video tokens in every text: the token must exist
        tokenizer.add_tokens(["<video>"], special_tokens=True)
    text = {**text_config("tiny", _pad(len(tokenizer))), "max_position_embeddings": 1024}
    if onevision:
        text = {**text, "model_type": "qwen2", "use_sliding_window": False}
        vision = {**vision_config("tiny"), "model_type": "siglip_vision_model", "vision_use_head": False}
        strategy, layer = "full", -1
        pinpoints = [[TILE * down, TILE * across] for down in range(1, 7) for across in range(1, 7)]
    else:
        vision = vision_config("tiny")
        strategy, layer = "default", -2
        pinpoints = [[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE], [TILE, 3 * TILE], [3 * TILE, TILE]]
    token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    per_tile = (TILE // PATCH) ** 2
    common = {
        "vision_config": vision,
        "text_config": text,
        "image_token_index": token,
        "vision_feature_select_strategy": strategy,
        "vision_feature_layer": layer,
        "image_grid_pinpoints": pinpoints,
        "tie_word_embeddings": False,
    }
    config = LlavaOnevisionConfig(**common, vision_aspect_ratio="anyres_max_9") if onevision else LlavaNextConfig(**common, image_seq_length=per_tile)
    family = LlavaNextFamily()
    for name in ("pad", "eos", "bos"):
        setattr(family.text_config(config), f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
    model = (LlavaOnevisionForConditionalGeneration if onevision else LlavaNextForConditionalGeneration)(config).eval()
    generation = model.generation_config
    generation.eos_token_id, generation.pad_token_id, generation.bos_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id
    generation.do_sample = False
    if onevision:
        image_processor = LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE}, image_grid_pinpoints=pinpoints)
        processor = onevision_processor_class()(
            image_processor=image_processor,
            tokenizer=tokenizer,
            num_image_tokens=per_tile,
            vision_feature_select_strategy=strategy,
            vision_aspect_ratio="anyres_max_9",
            chat_template=tokenizer.chat_template,
        )
    else:
        image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, image_grid_pinpoints=pinpoints)
        processor = LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=PATCH,
            vision_feature_select_strategy=strategy,
            chat_template=tokenizer.chat_template,
            num_additional_image_tokens=1,
        )
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    return {"image_rows_per_tile": per_tile, "image_token_id": token}
