"""Demo Qwen2.5-VL checkpoints, buildable offline: `vlmopt demo-model DIR --family qwen2_5_vl --size tiny|3b|3b-4l`.

  tiny   a 4-layer vision tower (hidden 32, patches of 14 px, 2x2 merge, windows of 112 px; blocks 1 and 3 attend
         over the whole image, 0 and 2 within their window) and a 2-layer Qwen2 text model with 3-axis M-RoPE, a
         byte-level BPE tokenizer trained here with Qwen's ChatML and vision tokens, and an image processor that
         keeps images between 56x56 and 224x224 px (4 to 64 image tokens, so images of different sizes take
         different token counts) (tests)
  3b     Qwen2.5-VL-3B-Instruct's sizes (timing only: 3.75 B parameters, 15 GB of fp32 weights to build and save, so
         never built by tests): a 32-layer tower (hidden 1280, full attention at blocks 7, 15, 23, 31) and a 36-layer
         text model (hidden 2048, 16 heads, 2 key/value heads, tied 151936-row embedding), images up to 448x448 px
  3b-4l  the 3b's widths, vocabulary and images with 4 of its 32 vision blocks (full attention at block 3) and 4 of its
         36 text layers: 0.74 B parameters, 2.9 GB fp32, so PyTorch, ONNX export and the optimum-intel anchor each fit
         in ~8 GB beside other work (`make bench-vlm`'s model q); per layer, each part costs what it costs in the 3B

The weights are random; the architecture and the checkpoint layout are transformers' own
(`Qwen2_5_VLForConditionalGeneration`, the processor's image processor and tokenizer), so `vlmopt export` reads the
folder as it reads Qwen/Qwen2.5-VL-3B-Instruct saved with `save_pretrained`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmopt.errors import VlmoptError

SIZES = ("tiny", "3b", "3b-4l")
#: Qwen2.5-VL's vocabulary (the 3b demo's embedding and head have its size)
QWEN_VOCAB_SIZE = 151936
BOS_PAD, EOS = "<|endoftext|>", "<|im_end|>"
IM_START = "<|im_start|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
#: Qwen2.5-VL's chat template, reduced to what a prompt with images needs: ChatML turns, and each image as
#: <|vision_start|><|image_pad|><|vision_end|> (the processor expands the pad token to the image's token count)
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '" + IM_START + "' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '" + VISION_START + IMAGE_PAD + VISION_END + "' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '" + EOS + "\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '" + IM_START + "assistant\\n' }}{%- endif -%}"
)
_CORPUS = (
    "A photo of a cat sitting on a red chair. The dog runs in the park. Describe the image in one sentence. "
    "What is in this picture? There is a small boat on the river near the mountain at sunset. "
    "The quick brown fox jumps over the lazy dog. Answer briefly, then explain what a color is. user assistant system "
)


def vision_config(size: str, out_hidden_size: int) -> dict[str, Any]:
    common = {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "out_hidden_size": out_hidden_size}
    if size == "tiny":
        return {**common, "depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "fullatt_block_indexes": [1, 3]}
    if size == "3b-4l":
        return {**common, "depth": 4, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "fullatt_block_indexes": [3]}
    return {**common, "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "fullatt_block_indexes": [7, 15, 23, 31]}


def text_config(size: str, vocab_size: int) -> dict[str, Any]:
    if size == "tiny":
        dims = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
        rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}  # head_dim 16: 8 frequencies
        return {**dims, "vocab_size": vocab_size, "max_position_embeddings": 1024, "rope_parameters": rope, "tie_word_embeddings": False}
    layers = 4 if size == "3b-4l" else 36
    dims = {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 2}
    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
    return {**dims, "vocab_size": vocab_size, "max_position_embeddings": 128000, "rope_parameters": rope, "tie_word_embeddings": True}


def tiny_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer with Qwen's specials (ChatML, vision start/end, image and video pads) and its chat template."""
    from vlmopt.demo_llava import byte_level_tokenizer

    extra = {"image_token": IMAGE_PAD, "video_token": VIDEO_PAD, "vision_start": VISION_START, "vision_end": VISION_END, "im_start": IM_START}
    return byte_level_tokenizer(vocab_size, BOS_PAD, EOS, BOS_PAD, extra, CHAT_TEMPLATE, _CORPUS)


def build_qwen2_5_vl(dest: Path, size: str, seed: int = 0) -> dict[str, Any]:
    """Write a qwen2_5_vl Hugging Face folder (safetensors, config, processor) into `dest`; what it holds."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    if size not in SIZES:
        raise VlmoptError(f"unknown qwen2_5_vl demo size '{size}'; choose one of {', '.join(SIZES)}")
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(512 if size == "tiny" else 2048)
    # 3b: the real vocabulary's size (its head is a large part of a decode step), the tokenizer using its first ids
    vocab_size = (len(tokenizer) + 63) // 64 * 64 if size == "tiny" else QWEN_VOCAB_SIZE
    text = text_config(size, vocab_size)
    ids = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in (("image", IMAGE_PAD), ("video", VIDEO_PAD), ("start", VISION_START), ("end", VISION_END))
    }
    config = Qwen2_5_VLConfig(
        vision_config=vision_config(size, text["hidden_size"]),
        text_config={**text, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["start"],
        vision_end_token_id=ids["end"],
        tie_word_embeddings=text["tie_word_embeddings"],
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    generation = model.generation_config
    generation.eos_token_id, generation.pad_token_id, generation.bos_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id
    generation.do_sample = False
    longest = 224 if size == "tiny" else 448
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": longest * longest}, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    # the processor's parts: Qwen2_5_VLProcessor itself cannot be made without torchvision (its video processor), which
    # has no CPU wheel on PyPI for this torch; the family's preprocessor puts the parts together (`vlmopt.families.qwen2_5_vl`)
    image_processor.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return {"image_token_id": config.image_token_id, "max_image_tokens": (longest // 28) ** 2}
