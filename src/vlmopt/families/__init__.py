"""Architecture knowledge, one declarative class per family. Stages look families up here.

The family classes import torch (their tower wrappers are `nn.Module`s), so they are loaded on first
use: the vocabulary (`Tower`, `TensorSpec`, ...) stays importable without torch.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from vlmopt.errors import VlmoptError
from vlmopt.families.base import Family, TensorSpec, TextVocab, Tower

__all__ = ["Family", "TensorSpec", "TextVocab", "Tower", "all_families", "family_for", "family_named", "generative_families", "supported_model_types"]


@cache
def all_families() -> tuple[Family, ...]:
    from vlmopt.families.backbones import BeitFamily, ConvNextFamily, DeitFamily, Dinov2Family, SwinFamily
    from vlmopt.families.bert import BertStyleFamily, DebertaV2Family, ModernBertFamily, NomicBertFamily
    from vlmopt.families.blip import BlipFamily
    from vlmopt.families.blip_retrieval import BlipRetrievalFamily
    from vlmopt.families.causal_lm import CausalLmFamily
    from vlmopt.families.dual_encoder import ClipFamily, SiglipFamily
    from vlmopt.families.gemma3 import Gemma3Family
    from vlmopt.families.llava import LlavaFamily
    from vlmopt.families.llava_next import LlavaNextFamily, LlavaOnevisionFamily
    from vlmopt.families.qwen2_5_vl import Qwen2_5_VlFamily
    from vlmopt.families.smolvlm import SmolVlmFamily
    from vlmopt.families.vit import VitFamily

    return (
        ClipFamily(),
        SiglipFamily(),
        VitFamily(),
        Dinov2Family(),
        DeitFamily(),
        BeitFamily(),
        SwinFamily(),
        ConvNextFamily(),
        BertStyleFamily(),
        DebertaV2Family(),
        ModernBertFamily(),
        NomicBertFamily(),
        LlavaFamily(),
        SmolVlmFamily(),
        Gemma3Family(),
        LlavaNextFamily(),
        LlavaOnevisionFamily(),
        Qwen2_5_VlFamily(),
        BlipRetrievalFamily(),  # before BlipFamily: the same model_type, told apart by its architectures
        BlipFamily(),
        CausalLmFamily(),
    )


def family_named(name: str | None) -> Family | None:
    """The family recorded under `name` in an artifact's traits, or None."""
    return next((family for family in all_families() if family.name == name), None)


def generative_families() -> list[str]:
    return [family.name for family in all_families() if family.generative]


def supported_model_types() -> list[str]:
    return list(dict.fromkeys(t for family in all_families() for t in family.model_types))


def family_for(config: Any) -> Family:
    """The family that knows `config.model_type`; an unsupported type raises with the supported list."""
    model_type = getattr(config, "model_type", None)
    for family in all_families():
        if family.takes(config):
            family.check_config(config)
            check_config_fields(config)
            return family
    raise VlmoptError(f"unsupported architecture '{model_type}'; vlmopt supports: {', '.join(supported_model_types())}")


def check_config_fields(config: Any, declared: dict[str, Any] | None = None, where: str = "the checkpoint") -> None:
    """Refuse a config that lacks a key its family sizes the towers from (`Family.required_fields`), naming the key.

    `declared` is the config.json as written, where the caller read it: a key absent there is lacking even though
    transformers filled in its class default. Without it, a key that is absent or null on `config` is lacking."""
    family = next((f for f in all_families() if f.takes(config)), None)
    if family is None:
        return
    if declared is not None:
        family.check_declared(declared)
    for field in family.required_fields(config):
        key, *aliases = field.split("|")
        written = declared is None or any(declared.get(name) is not None for name in (key, *aliases))
        if not written or getattr(config, key, None) is None:
            raise VlmoptError(
                f"the config.json of {where} has no '{key}', which the {family.name} family sizes its towers from; "
                f"add it (the value the weights were trained with) or export a complete checkpoint"
            )
