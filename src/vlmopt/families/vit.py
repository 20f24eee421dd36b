"""ViT: image classification (logits) or image features (pooled embeddings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmopt.families.base import Family, PruneLayout, TensorSpec, Tower, image_input


class ClassificationLogits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


class PooledFeatures(nn.Module):
    """The pooler output where the checkpoint has a pooler, else the [CLS] token's hidden state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values)
        if out.pooler_output is not None:
            return out.pooler_output
        return out.last_hidden_state[:, 0]


def is_classifier(config: Any) -> bool:
    return any(arch.endswith("ForImageClassification") for arch in (config.architectures or []))


class VitFamily(Family):
    name = "vit"
    model_types = ("vit",)
    summary = "ViT: vision tower -> logits (image classification checkpoints) or image_embeds (feature extractors)"
    prune_layout = PruneLayout(
        mlp=("mlp.fc1", "mlp.fc2"), attention=("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"), head_dim_in_config=True
    )

    def model_class(self, config: Any) -> Any:
        from transformers import AutoModel, AutoModelForImageClassification

        return AutoModelForImageClassification if is_classifier(config) else AutoModel

    def towers(self, config: Any, hf_dir: Path | None = None, monolith: bool = False, decoder: str = "torch") -> list[Tower]:
        if is_classifier(config):
            output = TensorSpec("logits", ("batch", config.num_labels))
            wrap = ClassificationLogits
        else:
            output = TensorSpec("image_embeds", ("batch", config.hidden_size))
            wrap = PooledFeatures
        return [
            Tower(
                name="vision",
                inputs=(image_input(config),),
                outputs=(output,),
                wrap=wrap,
                num_heads=config.num_attention_heads,
                hidden_size=config.hidden_size,
                # pre-LayerNorm blocks like CLIP's: ORT's CLIP attention fusion fuses every layer (its "vit" type none)
                optimizer_model_type="clip",
            )
        ]
