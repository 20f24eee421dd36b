"""A demo Gemma 3 checkpoint, buildable offline: `vlmopt demo-model DIR --family gemma3 --size tiny`.

  tiny   SigLIP vision (64 px, patches of 8, 2 layers) pooled to 16 tokens per image + a 2-layer Gemma 3 text model
         (one sliding-window layer of 8 positions, one global layer), a byte-level BPE tokenizer trained here with
         Gemma's turn and image tokens and chat template, and a `Gemma3Processor` with pan-and-scan on (wide or tall
         images are split into crops, so images of different shapes take different numbers of image tokens)

The weights are random; the architecture, the processor and the checkpoint layout are transformers' own, so
`vlmopt export` reads the folder as it reads google/gemma-3-4b-it saved with `save_pretrained`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmopt.errors import VlmoptError

SIZES = ("tiny",)
BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
BOI, EOI, IMAGE_SOFT_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
#: Gemma 3's chat template, reduced to what a prompt with images needs: turns, and `<start_of_image>` where each image goes
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '" + START_OF_TURN + "' + role + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '" + BOI + "' }}{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '" + END_OF_TURN + "\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '" + START_OF_TURN + "model\\n' }}{%- endif -%}"
)
_CORPUS = (
    "A photo of a cat sitting on a red chair. The dog runs in the park. Describe the image in one sentence. "
    "What is in this picture? There is a small boat on the river near the mountain at sunset. "
    "Here is the original image and here are some crops to help you see better. "
    "The quick brown fox jumps over the lazy dog. Answer briefly, then explain what a color is. "
)


def tiny_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer with Gemma's specials (turns, image markers, the image soft token) and its chat template."""
    from vlmopt.demo_llava import byte_level_tokenizer

    extra = {"start_of_turn": START_OF_TURN, "end_of_turn": END_OF_TURN, "boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE_SOFT_TOKEN}
    return byte_level_tokenizer(vocab_size, BOS, EOS, PAD, extra, CHAT_TEMPLATE, _CORPUS)


def build_gemma3(dest: Path, size: str, seed: int = 0) -> dict[str, Any]:
    """Write a gemma3 Hugging Face folder (safetensors, config, processor) into `dest`; what it holds."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor

    if size not in SIZES:
        raise VlmoptError(f"unknown gemma3 demo size '{size}'; choose one of {', '.join(SIZES)}")
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(512)
    vocab_size = (len(tokenizer) + 63) // 64 * 64
    per_image, image_size = 16, 64
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "image_size": image_size,
        "patch_size": 8,
        "vision_use_head": False,
    }
    text = {
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_hidden_layers": 2,
        "vocab_size": vocab_size,
        "max_position_embeddings": 512,
        "query_pre_attn_scalar": 16,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "tie_word_embeddings": True,
    }
    config = Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=per_image,
        boi_token_index=tokenizer.convert_tokens_to_ids(BOI),
        eoi_token_index=tokenizer.convert_tokens_to_ids(EOI),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_SOFT_TOKEN),
    )
    model = Gemma3ForConditionalGeneration(config).eval()
    generation = model.generation_config
    generation.eos_token_id, generation.pad_token_id, generation.bos_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id
    generation.do_sample = False
    image_processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        do_pan_and_scan=True,
        pan_and_scan_min_crop_size=32,
        pan_and_scan_max_num_crops=3,
        pan_and_scan_min_ratio_to_activate=1.2,
    )
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE, image_seq_length=per_image)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    return {"image_tokens": per_image, "image_token_id": config.image_token_id, "language_model": "random (gemma3_text)"}
