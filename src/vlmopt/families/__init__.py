"""Architecture knowledge, one declarative class per family. Stages look families up here."""

from __future__ import annotations

from typing import Any

from vlmopt.errors import VlmoptError
from vlmopt.families.base import Family, TensorSpec, TextVocab, Tower
from vlmopt.families.bert import BertStyleFamily
from vlmopt.families.dual_encoder import ClipFamily, SiglipFamily
from vlmopt.families.vit import VitFamily

FAMILIES: tuple[Family, ...] = (ClipFamily(), SiglipFamily(), VitFamily(), BertStyleFamily())

__all__ = ["FAMILIES", "Family", "TensorSpec", "TextVocab", "Tower", "family_for", "supported_model_types"]


def supported_model_types() -> list[str]:
    return [t for family in FAMILIES for t in family.model_types]


def family_for(config: Any) -> Family:
    """The family that knows `config.model_type`; an unsupported type raises with the supported list."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise VlmoptError(f"unsupported architecture '{model_type}'; vlmopt supports: {', '.join(supported_model_types())}")
