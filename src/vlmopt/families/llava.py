"""LLaVA-style vision-language models (`LlavaForConditionalGeneration`) as three parts with a KV cache.

  vision     pixel_values [num_images, C, H, W] -> image_features [num_image_tokens, hidden]
             (vision tower at `vision_feature_layer`, `vision_feature_select_strategy`, projector;
             the rows of all images in order, 2-D: the contract onnxruntime-genai preallocates for)
  embedding  input_ids [batch, sequence] + image_features -> inputs_embeds [batch, sequence, hidden]
             image features are written at the image-token positions inside the graph
  decoder    inputs_embeds, attention_mask, position_ids, past_key_values.{i}.key/value
             -> logits, present.{i}.key/value: one graph for prefill and decode (`KvCacheLayout`)

The generative contract (`vlmopt.families.generative`) holds everything but the vision tower and the image-token
count, which is all LLaVA declares here. onnxruntime-genai has no `llava` model type ("Unsupported model_type in
config.json: llava"); its `phi3v` pipeline's vision state is the plain one (vision -> image_features, embedding,
decoder), so LLaVA's parts run under it as `phi3v` (`vlmopt.runners.genai`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmopt.errors import VlmoptError
from vlmopt.families.base import Tower
from vlmopt.families.generative import GenerativeContract, GenerativeFamily, VlmPreprocessor

IMAGE_TOKEN = "<image>"
#: vision towers whose output layout is known: extra (class) tokens before the patch tokens
VISION_MODELS = {"clip_vision_model": 1, "siglip_vision_model": 0}


def image_token_id(config: Any) -> int:
    """llava-hf configs say `image_token_index`, newer ones `image_token_id`; read either."""
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if value is not None:
            return int(value)
    raise VlmoptError("the llava config names no image token (neither image_token_id nor image_token_index)")


def image_seq_length(config: Any) -> int:
    """Feature rows per image: the patch grid, plus class tokens, minus the one the "default" strategy drops."""
    vision = config.vision_config
    size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    extra = VISION_MODELS[vision.model_type]
    return (size // vision.patch_size) ** 2 + extra - (1 if config.vision_feature_select_strategy == "default" else 0)


class VisionFeatures(nn.Module):
    """pixel_values -> the projected features of every image, as rows [num_images * image_seq_length, hidden]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision_tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.layers = model.config.vision_feature_layer
        self.strategy = model.config.vision_feature_select_strategy

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        layers = [self.layers] if isinstance(self.layers, int) else list(self.layers)
        selected = [hidden[i][:, 1:] if self.strategy == "default" else hidden[i] for i in layers]
        features = self.projector(torch.cat(selected, dim=-1) if len(selected) > 1 else selected[0])
        return features.reshape(-1, features.shape[-1])


class LlavaFamily(GenerativeFamily):
    name = "llava"
    model_types = ("llava",)
    summary = "LLaVA-style VLM (llama, mistral or qwen2 language model): vision -> image_features, embedding -> inputs_embeds, decoder with KV cache -> logits"
    contract = GenerativeContract(genai_model_type="phi3v")
    language_models = ("llama", "mistral", "qwen2")
    #: fp32 logits reach |33| on a real 30-layer model (SmolLM2), where fp32 itself is the noise: on an Intel Xeon
    #: (AVX-512), transformers' own fp32 logits differ from its fp64 ones by 2.1e-3 at 23 positions, more than the ONNX
    #: decoders do (builder 2.2e-4, exported 5.1e-4), and the exported one differs from the fp32 reference by 2.6e-3.
    #: A wrong decoder is off by far more (GroupQueryAttention with left padding: 0.59)
    atol = 5e-3

    def model_class(self, config: Any) -> Any:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def check_config(self, config: Any) -> None:
        super().check_config(config)
        vision_type = getattr(config.vision_config, "model_type", None)
        if vision_type not in VISION_MODELS:
            raise VlmoptError(f"vision tower '{vision_type}' is not supported by llava; supported: {', '.join(VISION_MODELS)}")

    def image_token(self, config: Any) -> int:
        return image_token_id(config)

    def image_tokens_per_image(self, config: Any) -> int:
        return image_seq_length(config)

    def vision_tower(self, config: Any) -> Tower:
        return self.fixed_size_vision_tower(config, VisionFeatures)

    def preprocessor(self, folder: Path) -> LlavaPreprocessor:
        return LlavaPreprocessor(folder, self)


class LlavaPreprocessor(VlmPreprocessor):
    """The checkpoint's own processor; every image takes `image_seq_length` tokens."""

    def __init__(self, folder: Path, family: LlavaFamily | None = None):
        super().__init__(folder, family or LlavaFamily())
        self.image_seq_length = image_seq_length(self.config)

    def expected_image_tokens(self, num_images: int, pixel_values: Any, vision_inputs: dict[str, Any]) -> int:
        return num_images * self.image_seq_length

    def image_token_mismatch(self, found: int, num_images: int, expected: int) -> str:
        return (
            f"the prompt holds {found} image tokens for {num_images} image(s) of {self.image_seq_length} tokens each; "
            f"write {self.image_token} once per image and no image tokens otherwise"
        )
