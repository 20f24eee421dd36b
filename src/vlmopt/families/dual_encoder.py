"""Contrastive image-text dual encoders (CLIP, SigLIP): a vision tower, a text tower, or both in one graph."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmopt.families.base import Family, PruneLayout, TensorSpec, Tower, image_input, text_vocab


class ImageEmbeddings(nn.Module):
    """pixel_values -> pooled (and projected, where the model has a projection) image embeddings."""

    def __init__(self, vision_model: nn.Module, projection: nn.Module | None):
        super().__init__()
        self.vision_model = vision_model
        self.projection = projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return pooled if self.projection is None else self.projection(pooled)


class TextEmbeddings(nn.Module):
    """(input_ids, attention_mask) -> pooled, projected text embeddings."""

    def __init__(self, text_model: nn.Module, projection: nn.Module | None):
        super().__init__()
        self.text_model = text_model
        self.projection = projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return pooled if self.projection is None else self.projection(pooled)


class UnmaskedTextEmbeddings(TextEmbeddings):
    """Text towers trained on fixed-length padded text (SigLIP) take no attention mask."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        pooled = self.text_model(input_ids=input_ids).pooler_output
        return pooled if self.projection is None else self.projection(pooled)


class ZeroShotLogits(nn.Module):
    """Both towers and the image-text logits in one graph (`convert --monolith`)."""

    def __init__(self, model: nn.Module, uses_attention_mask: bool):
        super().__init__()
        self.model = model
        self.uses_attention_mask = uses_attention_mask

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        kwargs = {"attention_mask": attention_mask} if self.uses_attention_mask else {}
        out = self.model(pixel_values=pixel_values, input_ids=input_ids, **kwargs)
        return out.image_embeds, out.text_embeds, out.logits_per_image


class DualEncoderFamily(Family):
    supports_monolith = True
    zero_shot = "softmax"
    #: the text tower takes an attention mask
    text_attention_mask: bool = True
    #: attribute names of the projections on the full model, or None where there are none
    visual_projection: str | None = None
    text_projection: str | None = None
    #: ONNX Runtime transformer optimizer model types per tower
    vision_optimizer_type: str = "vit"
    text_optimizer_type: str = "bert"

    # transformers 5 computes CLIP's and SigLIP's head size as hidden_size / heads: heads cannot be removed
    prune_layout = PruneLayout(mlp=("mlp.fc1", "mlp.fc2"), attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"))

    def embedding_dims(self, config: Any) -> tuple[int, int]:
        raise NotImplementedError

    def tower_config(self, config: Any, tower: str) -> Any:
        return config.vision_config if tower == "vision" else config.text_config

    def _text_inputs(self, vocab_batch: str) -> tuple[TensorSpec, ...]:
        ids = TensorSpec("input_ids", (vocab_batch, "sequence"), "int64", "input_ids")
        if not self.text_attention_mask:
            return (ids,)
        return (ids, TensorSpec("attention_mask", (vocab_batch, "sequence"), "int64", "attention_mask"))

    def towers(self, config: Any, hf_dir: Path | None = None, monolith: bool = False, decoder: str = "torch") -> list[Tower]:
        vision_cfg, text_cfg = config.vision_config, config.text_config
        image_dim, text_dim = self.embedding_dims(config)
        vocab = text_vocab(text_cfg)
        if monolith:
            return [
                Tower(
                    name="model",
                    inputs=(image_input(vision_cfg, "image_batch"), *self._text_inputs("text_batch")),
                    outputs=(
                        TensorSpec("image_embeds", ("image_batch", image_dim)),
                        TensorSpec("text_embeds", ("text_batch", text_dim)),
                        TensorSpec("logits_per_image", ("image_batch", "text_batch")),
                    ),
                    wrap=lambda model: ZeroShotLogits(model, self.text_attention_mask),
                    vocab=vocab,
                    bench_sizes={"image_batch": 1, "text_batch": 8, "sequence": vocab.max_length},
                    meta={"embeddings": "normalized"},
                )
            ]
        text_class = TextEmbeddings if self.text_attention_mask else UnmaskedTextEmbeddings
        return [
            Tower(
                name="vision",
                inputs=(image_input(vision_cfg),),
                outputs=(TensorSpec("image_embeds", ("batch", image_dim)),),
                wrap=lambda model: ImageEmbeddings(model.vision_model, self._projection(model, self.visual_projection)),
                num_heads=vision_cfg.num_attention_heads,
                hidden_size=vision_cfg.hidden_size,
                optimizer_model_type=self.vision_optimizer_type,
                meta={"embeddings": "unnormalized"},
            ),
            Tower(
                name="text",
                inputs=self._text_inputs("batch"),
                outputs=(TensorSpec("text_embeds", ("batch", text_dim)),),
                wrap=lambda model: text_class(model.text_model, self._projection(model, self.text_projection)),
                vocab=vocab,
                num_heads=text_cfg.num_attention_heads,
                hidden_size=text_cfg.hidden_size,
                optimizer_model_type=self.text_optimizer_type,
                bench_sizes={"sequence": vocab.max_length},
                meta={"embeddings": "unnormalized"},
            ),
        ]

    @staticmethod
    def _projection(model: nn.Module, attribute: str | None) -> nn.Module | None:
        return getattr(model, attribute) if attribute else None


class ClipFamily(DualEncoderFamily):
    name = "clip"
    model_types = ("clip",)
    summary = "CLIP dual encoder: vision tower -> image_embeds, text tower -> text_embeds"
    visual_projection = "visual_projection"
    text_projection = "text_projection"
    vision_optimizer_type = "clip"
    text_optimizer_type = "clip"

    def model_class(self, config: Any) -> Any:
        from transformers import CLIPModel

        return CLIPModel

    def embedding_dims(self, config: Any) -> tuple[int, int]:
        return config.projection_dim, config.projection_dim


class SiglipFamily(DualEncoderFamily):
    name = "siglip"
    model_types = ("siglip",)
    summary = "SigLIP dual encoder: vision tower (attention-pool head) -> image_embeds, text tower -> text_embeds"
    text_attention_mask = False
    atol = 2e-4
    zero_shot = "sigmoid"
    #: ONNX Runtime's CLIP attention fusion fuses every SigLIP text layer; its BERT one none (tiny model, 2/2 vs 0/2)
    text_optimizer_type = "clip"

    def model_class(self, config: Any) -> Any:
        from transformers import SiglipModel

        return SiglipModel

    def embedding_dims(self, config: Any) -> tuple[int, int]:
        text_cfg = config.text_config
        return config.vision_config.hidden_size, getattr(text_cfg, "projection_size", None) or text_cfg.hidden_size
