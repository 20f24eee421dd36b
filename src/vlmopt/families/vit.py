"""ViT: image classification (logits) or image features (pooled embeddings)."""

from __future__ import annotations

from vlmopt.families.base import PruneLayout
from vlmopt.families.vision import VisionBackboneFamily


class VitFamily(VisionBackboneFamily):
    name = "vit"
    model_types = ("vit",)
    summary = "ViT: vision tower -> logits (image classification checkpoints) or image_embeds (feature extractors)"
    prune_layout = PruneLayout(
        mlp=("mlp.fc1", "mlp.fc2"), attention=("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"), head_dim_in_config=True
    )
    # pre-LayerNorm blocks like CLIP's: ORT's CLIP attention fusion fuses every layer (its "vit" type none)
    optimizer_model_type = "clip"
