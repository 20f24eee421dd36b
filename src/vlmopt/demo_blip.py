"""Demo BLIP checkpoints, buildable offline: `vlmopt demo-model DIR --family blip --size tiny` (captioning,
`BlipForConditionalGeneration`) or `--family blip-retrieval` (image-text retrieval and matching, `BlipForImageTextRetrieval`).

  tiny   a 2-layer BLIP vision tower at 32 px (patch 8: 17 image rows with the class token) and a 2-layer BLIP text
         decoder (BERT-style, cross-attention to the image rows in every layer) over a small WordPiece vocabulary

The processor is BLIP's own (`BlipProcessor`: `BlipImageProcessor` resizes every image to the tower's fixed size,
and a `BertTokenizer` whose vocabulary holds BLIP's `[DEC]` token, the decoder's bos).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmopt.errors import VlmoptError

SIZES = ("tiny",)
#: BERT's specials, then BLIP's decoder start token (`bos_token_id` of the text config)
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")


def build_blip(dest: Path, size: str, seed: int = 0, retrieval: bool = False) -> dict[str, Any]:
    """Write a BLIP Hugging Face folder (safetensors, config, processor) into `dest`, a captioner or (`retrieval`) an
    image-text retrieval and matching model with the same towers; what it holds."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipImageProcessor, BlipProcessor

    from vlmopt.demo_sizes import CORPUS as _CORPUS
    from vlmopt.demo_sizes import TINY as _TINY
    from vlmopt.demo_sizes import TINY_IMAGE as _TINY_IMAGE

    if size not in SIZES:
        raise VlmoptError(f"unknown blip demo size '{size}'; choose one of {', '.join(SIZES)}")
    torch.manual_seed(seed)
    dest.mkdir(parents=True, exist_ok=True)
    words = list(dict.fromkeys([*SPECIALS, *(w.lower() for w in _CORPUS), *".,?!'-:", *"abcdefghijklmnopqrstuvwxyz"]))
    vocab_file = dest / "vocab.txt"
    vocab_file.write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(vocab_file), do_lower_case=True, bos_token="[DEC]")
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    vocab_file.unlink()  # the tokenizer saves its own copy with the processor
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIALS}
    # BlipVisionConfig draws weights with std 1e-10 by default: the tower would be its embeddings and a LayerNorm
    vision = {**_TINY, **_TINY_IMAGE, "initializer_range": 0.02}
    text = {
        **_TINY,
        "vocab_size": len(words) + (-len(words)) % 8,
        "encoder_hidden_size": vision["hidden_size"],
        "max_position_embeddings": 128,
        "bos_token_id": ids["[DEC]"],
        "sep_token_id": ids["[SEP]"],
        "eos_token_id": ids["[SEP]"],
        "pad_token_id": ids["[PAD]"],
    }
    config = BlipConfig(vision_config=vision, text_config=text, projection_dim=32, image_text_hidden_size=32)
    model = (BlipForImageTextRetrieval if retrieval else BlipForConditionalGeneration)(config).eval()
    if not retrieval:
        generation = model.generation_config
        generation.eos_token_id, generation.pad_token_id, generation.bos_token_id = ids["[SEP]"], ids["[PAD]"], ids["[DEC]"]
    size_px = vision["image_size"]
    image_processor = BlipImageProcessor(size={"height": size_px, "width": size_px})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    return {"image_rows": (size_px // vision["patch_size"]) ** 2 + 1, "bos_token_id": ids["[DEC]"]}
