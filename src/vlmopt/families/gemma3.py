"""Gemma 3 (`Gemma3ForConditionalGeneration`) as three parts with a KV cache.

  vision     pixel_values [num_images, C, H, W] -> image_features [num_image_tokens, hidden]
             (SigLIP's last hidden state, average-pooled to `mm_tokens_per_image` per image, RMS-normed and projected;
             with pan-and-scan every crop is an image of its own)
  embedding  input_ids + image_features -> inputs_embeds (Gemma's embedding scales by sqrt(hidden); the image rows
             are written unscaled, as transformers writes them)
  decoder    inputs_embeds, attention_mask, position_ids, token_type_ids, past_key_values.{i}.key/value
             -> logits, present.{i}.key/value

What Gemma 3 adds to the generative contract is its attention pattern:
  * sliding-window layers beside global ones (`layer_types`, `sliding_window`): the graph keeps every layer's whole
    past (one cache layout for all layers) and each layer type gets its own mask, the sliding one limited to the
    window, as transformers' masks are (by cache index);
  * at prefill the tokens of each image attend to each other both ways (`token_type_ids`, 1 on image tokens, which
    transformers' generate passes at its first step only): a per-position decoder input
    (`GenerativeContract.decoder_inputs`), 0 on every generated token.
onnxruntime-genai's builder writes Gemma 3 decoders with GroupQueryAttention, which is causal only, so the decoder
is exported from PyTorch (`decoder_makers`). genai_config.json declares the `gemma3` model type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmopt.errors import VlmoptError
from vlmopt.families.decoder import CausalLmWithPast
from vlmopt.families.generative import (
    ATTENTION_MASK,
    DECODER,
    INPUTS_EMBEDS,
    LOGITS,
    POSITION_IDS,
    TOKEN_TYPE_IDS,
    GenerativeContract,
    GenerativeFamily,
    Part,
    VlmPreprocessor,
)

SLIDING, FULL = "sliding_attention", "full_attention"
#: the image processor's pan-and-scan settings (crops of wide or tall images, each an image of its own)
PAN_AND_SCAN = ("do_pan_and_scan", "pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops", "pan_and_scan_min_ratio_to_activate")


def image_blocks(token_type_ids: torch.Tensor) -> torch.Tensor:
    """Per position the index of the image it belongs to (0, 1, ... along the row), -1 for text."""
    is_image = token_type_ids == 1
    previous = torch.nn.functional.pad(is_image, (1, 0), value=False)[:, :-1]
    group = torch.cumsum((is_image & ~previous).to(torch.int64), dim=1) - 1
    return torch.where(is_image, group, torch.full_like(group, -1))


def layer_masks(attention_mask: Any, token_type_ids: Any, past_length: Any, dtype: Any, sliding_window: int | None) -> dict[str, Any]:
    """One additive mask [batch, 1, query, past + query] per layer type: causal, or inside the same image block
    (new positions only), not padding; the sliding one also within `sliding_window` positions (transformers'
    AND(sliding window, OR(causal, image block)))."""
    query = token_type_ids.shape[1]
    total = attention_mask.shape[1]
    query_positions = torch.arange(query, device=attention_mask.device) + past_length
    key_positions = torch.arange(total, device=attention_mask.device)
    causal = key_positions.unsqueeze(0) <= query_positions.unsqueeze(1)
    blocks = image_blocks(token_type_ids)
    key_blocks = torch.cat([torch.full((blocks.shape[0], total - query), -1, dtype=blocks.dtype, device=blocks.device), blocks], dim=1)
    same_image = (blocks.unsqueeze(2) == key_blocks.unsqueeze(1)) & (blocks.unsqueeze(2) >= 0)
    allowed = (causal.unsqueeze(0) | same_image) & attention_mask.bool().unsqueeze(1)
    zero = torch.zeros((), dtype=dtype)
    lowest = torch.full((), torch.finfo(dtype).min, dtype=dtype)
    masks = {FULL: torch.where(allowed.unsqueeze(1), zero, lowest)}
    if sliding_window is not None:
        window = (query_positions.unsqueeze(1) - key_positions.unsqueeze(0)) < sliding_window
        masks[SLIDING] = torch.where((allowed & window.unsqueeze(0)).unsqueeze(1), zero, lowest)
    else:
        masks[SLIDING] = masks[FULL]
    return masks


class Gemma3LmWithPast(CausalLmWithPast):
    """(inputs_embeds, attention_mask, position_ids, token_type_ids, *past) -> (logits, *present).

    The cache keeps every layer's whole past (transformers' own cache keeps a sliding layer's last window only, which
    would give the graph presents of two lengths); the masks say what each layer type sees (`layer_masks`)."""

    def forward(self, inputs_embeds: Any, attention_mask: Any, position_ids: Any, token_type_ids: Any, *past: Any) -> tuple[Any, ...]:
        from transformers import DynamicCache

        masks = layer_masks(attention_mask, token_type_ids, past[0].shape[2], inputs_embeds.dtype, self.text_config.sliding_window)
        return self.run(inputs_embeds, masks, position_ids, DynamicCache(), past)


class Gemma3VisionFeatures(nn.Module):
    """pixel_values -> the pooled, projected features of every image, as rows [num_images * mm_tokens_per_image, hidden]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision_tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision_tower(pixel_values=pixel_values, return_dict=True).last_hidden_state
        features = self.projector(hidden)
        return features.reshape(-1, features.shape[-1])


class Gemma3Family(GenerativeFamily):
    name = "gemma3"
    model_types = ("gemma3",)
    summary = "Gemma 3 VLM (SigLIP + pooling projector, sliding-window and global layers): vision -> image_features, embedding -> inputs_embeds, decoder with KV cache and image-block attention -> logits"
    contract = GenerativeContract(
        decoder=Part(DECODER, (INPUTS_EMBEDS, ATTENTION_MASK, POSITION_IDS, TOKEN_TYPE_IDS, "past_key_values.*"), (LOGITS, "present.*")),
        decoder_inputs=(TOKEN_TYPE_IDS,),
        genai_model_type="gemma3",
    )
    #: onnxruntime-genai's builder makes causal-only GroupQueryAttention: it cannot attend within an image both ways
    decoder_makers = ("torch",)
    language_models = ("gemma3_text",)
    vision_wrapper = Gemma3VisionFeatures
    atol = 5e-3

    def model_class(self, config: Any) -> Any:
        from transformers import Gemma3ForConditionalGeneration

        return Gemma3ForConditionalGeneration

    def check_config(self, config: Any) -> None:
        super().check_config(config)
        vision, text = config.vision_config, self.text_config(config)
        if getattr(vision, "model_type", None) != "siglip_vision_model":
            raise VlmoptError(f"vision tower '{getattr(vision, 'model_type', None)}' is not supported by gemma3; supported: siglip_vision_model")
        if getattr(text, "use_bidirectional_attention", False):
            raise VlmoptError("this gemma3 checkpoint's text model attends both ways (use_bidirectional_attention): an encoder, not a text generator")
        per_image = int(config.mm_tokens_per_image)
        side, patches = round(per_image**0.5), vision.image_size // vision.patch_size
        if side * side != per_image or patches % side:
            raise VlmoptError(
                f"the gemma3 config disagrees with itself: mm_tokens_per_image {per_image} is not a square grid that divides "
                f"the vision tower's {patches}x{patches} patches (image_size {vision.image_size}, patch_size {vision.patch_size})"
            )
        token = self.image_token(config)
        if not 0 <= token < text.vocab_size:
            raise VlmoptError(f"the gemma3 config's image token {token} is outside the text model's vocabulary of {text.vocab_size}")

    def image_tokens_per_image(self, config: Any) -> int:
        return int(config.mm_tokens_per_image)

    def decoder_module(self, model: Any, maker: str) -> Any:
        return Gemma3LmWithPast(self.language_model(model), self.lm_head(model), self.text_config(model.config))

    def preprocessor(self, folder: Path) -> Gemma3Preprocessor:
        return Gemma3Preprocessor(folder, self)


class Gemma3Preprocessor(VlmPreprocessor):
    """The checkpoint's `Gemma3Processor`: the user marks an image with `<start_of_image>`, which it expands to
    `mm_tokens_per_image` image tokens; with pan-and-scan an image is the whole picture and its crops, each that many."""

    nested_images = True

    def __init__(self, folder: Path, family: Gemma3Family | None = None):
        super().__init__(folder, family or Gemma3Family())
        per_image = int(self.config.mm_tokens_per_image)
        self.image_seq_length = per_image
        processor_length = getattr(self.processor, "image_seq_length", None)
        if processor_length is not None and int(processor_length) != per_image:
            raise VlmoptError(
                f"the processor in {folder} expands an image to {processor_length} tokens but the model's config takes "
                f"mm_tokens_per_image={per_image}; the checkpoint's processor and config disagree"
            )
        tokenizer_token = getattr(self.tokenizer, "image_token_id", None)
        if tokenizer_token is not None and int(tokenizer_token) != self.image_token_id:
            raise VlmoptError(
                f"the tokenizer in {folder} writes image token {tokenizer_token} but the model's config reads "
                f"image_token_id={self.image_token_id}; the checkpoint's tokenizer and config disagree"
            )

    def expected_image_tokens(self, num_images: int, pixel_values: np.ndarray | None, vision_inputs: dict[str, np.ndarray]) -> int:
        return (0 if pixel_values is None else len(pixel_values)) * self.image_seq_length

    def image_token_mismatch(self, found: int, num_images: int, expected: int) -> str:
        return (
            f"the prompt holds {found} image tokens where {num_images} image(s) take {expected} ({self.image_seq_length} per image or crop); "
            f"write {self.image_token} once per image and no image tokens otherwise"
        )

    def call_options(self) -> dict[str, Any]:
        """Pan-and-scan as the checkpoint's image processor saved it: Gemma3Processor's call puts its own defaults (off,
        crops of at least 256 px) over the checkpoint's, while the image processor alone (`images`) follows the checkpoint."""
        image_processor = self.processor.image_processor
        saved = {name: getattr(image_processor, name, None) for name in PAN_AND_SCAN}
        return {name: value for name, value in saved.items() if value is not None}
