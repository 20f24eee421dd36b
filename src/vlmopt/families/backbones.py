"""Vision backbones beyond ViT, each a few declarations on `VisionBackboneFamily`.

Where ONNX Runtime's transformer optimizer has no model type whose attention fusion matches a
backbone's blocks, the family still declares the type whose LayerNorm and Gelu fusions apply, and
`optimize` records the attention it fused (0) beside the attention layers it found.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlmopt.families.vision import VisionBackboneFamily


class Dinov2Family(VisionBackboneFamily):
    name = "dinov2"
    model_types = ("dinov2", "dinov2_with_registers")
    summary = "DINOv2 (with or without registers): vision tower -> image_embeds ([CLS]) and last_hidden_state, or logits"
    # DINOv2 interpolates its position embeddings (trained at 518 px) to the size its processor crops (224 px)
    input_size_from_processor = True
    dense_output = True

    def required_fields(self, config: Any) -> tuple[str, ...]:
        registers = ("num_register_tokens",) if config.model_type == "dinov2_with_registers" else ()
        return self.config_fields + registers

    def prepare(self, model: Any, height: int, width: int) -> None:
        """Interpolate the position embeddings to the input size once, with the model's own `interpolate_pos_encoding`,
        instead of at every call. The outputs are the same; the graph holds no bicubic resize, which a traced export
        keeps even where the sizes match, and which DINOv2 with registers does with antialiasing (no ONNX exporter
        takes that)."""
        embeddings = model.base_model.embeddings
        if height != width:
            return  # transformers interpolates non-square inputs at every call; so does the graph
        patches = (height // model.config.patch_size) * (width // model.config.patch_size)
        with torch.no_grad():
            probe = torch.zeros(1, patches + 1, model.config.hidden_size, dtype=embeddings.position_embeddings.dtype)
            resized = embeddings.interpolate_pos_encoding(probe, height, width).detach().clone()
        embeddings.position_embeddings = nn.Parameter(resized, requires_grad=False)
        embeddings.interpolate_pos_encoding = lambda *_: embeddings.position_embeddings

    def dense_shape(self, config: Any, height: int, width: int) -> tuple[int, int]:
        patches = (height // config.patch_size) * (width // config.patch_size)
        return 1 + getattr(config, "num_register_tokens", 0) + patches, config.hidden_size


class DeitFamily(VisionBackboneFamily):
    name = "deit"
    model_types = ("deit",)
    summary = "DeiT: vision tower -> logits (classifiers, distilled ones averaging both heads) or image_embeds (pooler)"
    classifier_suffixes = ("ForImageClassification", "ForImageClassificationWithTeacher")


class BeitFamily(VisionBackboneFamily):
    name = "beit"
    model_types = ("beit",)
    summary = "BEiT: vision tower -> logits or image_embeds (mean of the patch tokens, normalized)"


class SwinFamily(VisionBackboneFamily):
    name = "swin"
    model_types = ("swin",)
    summary = "Swin Transformer: vision tower -> logits or image_embeds (average pool of the last stage)"
    config_fields = ("embed_dim", "depths", "num_heads", "window_size", "image_size", "patch_size")

    def attention_dims(self, config: Any) -> tuple[int | None, int | None]:
        return None, None  # heads and width double at every stage


class ConvNextFamily(VisionBackboneFamily):
    name = "convnext"
    model_types = ("convnext",)
    summary = "ConvNeXt: vision tower -> logits or image_embeds (average pool, normalized); no attention"
    config_fields = ("hidden_sizes", "depths", "image_size")
    # no attention to fuse: the BERT optimizer type for its LayerNormalization and Gelu fusions
    optimizer_model_type = "bert"

    def embedding_dim(self, config: Any) -> int:
        return config.hidden_sizes[-1]

    def attention_dims(self, config: Any) -> tuple[int | None, int | None]:
        return None, None
