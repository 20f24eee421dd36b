"""BLIP image-text retrieval and matching (`BlipForImageTextRetrieval`): three encoder towers, the way BLIP ranks
and then re-ranks.

  vision  pixel_values -> image_feat [batch, D] (vision_proj of the class row, L2-normalized: the retrieval embedding)
          and image_embeds [batch, rows, vision_hidden] (every row, what the matching head cross-attends to)
  text    input_ids, attention_mask -> text_feat [batch, D] (the text encoder without cross-attention, text_proj of
          [CLS], L2-normalized): `use_itm_head=False` scores are image_feat @ text_feat.T
  itm     input_ids, attention_mask, image_embeds -> itm_logits [batch, 2] (the text encoder cross-attending to the
          image rows, itm_head of [CLS]: `use_itm_head=True`; softmax column 1 is "the text matches the image")

A search ranks a gallery by the cheap cosine of the two feature towers and re-ranks its top few through `itm`, which
takes the image rows the vision tower already gave: no image is encoded twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.functional import normalize

from vlmopt.errors import VlmoptError
from vlmopt.families.base import Family, TensorSpec, Tower, text_vocab
from vlmopt.families.blip import BlipFamily, check_image_width, image_rows

IMAGE_FEAT, TEXT_FEAT, IMAGE_EMBEDS, ITM_LOGITS = "image_feat", "text_feat", "image_embeds", "itm_logits"


class RetrievalImageTower(nn.Module):
    """pixel_values -> (image_feat, image_embeds)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision_model = model.vision_model
        self.vision_proj = model.vision_proj

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.vision_model(pixel_values=pixel_values).last_hidden_state
        return normalize(self.vision_proj(rows[:, 0, :]), dim=-1), rows


class RetrievalTextTower(nn.Module):
    """(input_ids, attention_mask) -> text_feat: the text encoder with no image to attend to."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.text_encoder = model.text_encoder
        self.text_proj = model.text_proj

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return normalize(self.text_proj(hidden[:, 0, :]), dim=-1)


class MatchingTower(nn.Module):
    """(input_ids, attention_mask, image_embeds) -> itm_logits: text i against image i, through cross-attention."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.text_encoder = model.text_encoder
        self.itm_head = model.itm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        # every image row is attended to (transformers passes an all-ones image mask, the same as none)
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds).last_hidden_state
        return self.itm_head(hidden[:, 0, :])


class BlipRetrievalFamily(Family):
    name = "blip-retrieval"
    model_types = ("blip",)
    architectures = ("BlipForImageTextRetrieval",)
    summary = "BLIP retrieval and matching: vision -> image_feat + image_embeds, text -> text_feat, itm -> itm_logits"
    #: softmax over the features' cosine: the checkpoint has no logit_scale (BLIP's retrieval head keeps no temperature)
    zero_shot = "softmax"
    atol = 2e-4

    def model_class(self, config: Any) -> Any:
        from transformers import BlipForImageTextRetrieval

        return BlipForImageTextRetrieval

    def check_config(self, config: Any) -> None:
        check_image_width(config.text_config.encoder_hidden_size, config.vision_config.hidden_size)

    def check_declared(self, declared: dict[str, Any]) -> None:
        BlipFamily().check_declared(declared)

    def tower_config(self, config: Any, tower: str) -> Any:
        return config.vision_config if tower == "vision" else config.text_config

    def towers(self, config: Any, hf_dir: Path | None = None, monolith: bool = False, decoder: str = "torch") -> list[Tower]:
        if monolith:
            raise VlmoptError("BLIP retrieval exports as its vision, text and itm towers; drop --monolith")
        self.check_config(config)
        vision, text = config.vision_config, config.text_config
        width, rows = config.image_text_hidden_size, image_rows(config)
        vocab = text_vocab(text)
        ids = (
            TensorSpec("input_ids", ("batch", "sequence"), "int64", "input_ids"),
            TensorSpec("attention_mask", ("batch", "sequence"), "int64", "attention_mask"),
        )
        text_sizes = {"num_heads": text.num_attention_heads, "hidden_size": text.hidden_size, "optimizer_model_type": "bert"}
        return [
            Tower(
                name="vision",
                inputs=(TensorSpec("pixel_values", ("batch", 3, vision.image_size, vision.image_size), "float32", "image"),),
                outputs=(TensorSpec(IMAGE_FEAT, ("batch", width)), TensorSpec(IMAGE_EMBEDS, ("batch", rows, vision.hidden_size))),
                wrap=RetrievalImageTower,
                num_heads=vision.num_attention_heads,
                hidden_size=vision.hidden_size,
                optimizer_model_type="clip",
                meta={"embeddings": "normalized"},
            ),
            Tower(
                name="text",
                inputs=ids,
                outputs=(TensorSpec(TEXT_FEAT, ("batch", width)),),
                wrap=RetrievalTextTower,
                vocab=vocab,
                bench_sizes={"sequence": min(35, vocab.max_length)},
                meta={"embeddings": "normalized"},
                **text_sizes,
            ),
            Tower(
                name="itm",
                inputs=(*ids, TensorSpec(IMAGE_EMBEDS, ("batch", rows, vision.hidden_size), "float32", "image_features")),
                outputs=(TensorSpec(ITM_LOGITS, ("batch", 2)),),
                wrap=MatchingTower,
                vocab=vocab,
                bench_sizes={"batch": 8, "sequence": min(35, vocab.max_length)},
                **text_sizes,
            ),
        ]
