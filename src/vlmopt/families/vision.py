"""Image encoders (ViT and the backbones people embed images with): one vision tower, declared per family.

A checkpoint whose `architectures` names an image classifier exports `logits`; any other exports the
pooled `image_embeds` (the model's own pooler: [CLS] after the final norm for DINOv2, mean of the patch
tokens for BEiT, average pooling for Swin and ConvNeXt), and where the family declares dense features
also its `last_hidden_state`. A family is a handful of declarations on `VisionBackboneFamily`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmopt.families.base import Family, TensorSpec, Tower


class ClassificationLogits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


class PooledFeatures(nn.Module):
    """The pooler output where the checkpoint has a pooler, else the [CLS] token's hidden state; with `dense`,
    the last hidden state (patch features) too."""

    def __init__(self, model: nn.Module, dense: bool = False):
        super().__init__()
        self.model = model
        self.dense = dense

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values=pixel_values)
        pooled = out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0]
        return (pooled, out.last_hidden_state) if self.dense else pooled


def _processor_size(hf_dir: Path | None) -> tuple[int, int] | None:
    """(height, width) the saved image processor makes, where it says so (center crop, else resize to a fixed size)."""
    file = hf_dir / "preprocessor_config.json" if hf_dir is not None else None
    if file is None or not file.is_file():
        return None
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    for key, enabled in (("crop_size", config.get("do_center_crop", True)), ("size", True)):
        size = config.get(key)
        if not enabled or size is None:
            continue
        if isinstance(size, int):
            return size, size
        if isinstance(size, dict) and "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
    return None


class VisionBackboneFamily(Family):
    """An image encoder: pixel_values -> logits (classifier checkpoints) or image_embeds. Subclasses declare."""

    #: ONNX Runtime optimizer model type whose attention fusion matches this backbone's blocks
    optimizer_model_type: str = "clip"
    #: `architectures` entries ending so make a checkpoint a classifier
    classifier_suffixes: tuple[str, ...] = ("ForImageClassification",)
    #: config.json keys the tower is sized from
    config_fields: tuple[str, ...] = ("hidden_size", "num_attention_heads", "num_hidden_layers", "image_size", "patch_size")
    #: the input size comes from the saved image processor (the model interpolates its position embeddings to it)
    input_size_from_processor: bool = False
    #: feature extractors also export `last_hidden_state` (per-token features for dense tasks)
    dense_output: bool = False

    def required_fields(self, config: Any) -> tuple[str, ...]:
        return self.config_fields

    def classifier_architecture(self, config: Any) -> str | None:
        return next((arch for arch in (config.architectures or []) if arch.endswith(self.classifier_suffixes)), None)

    def model_class(self, config: Any) -> Any:
        import transformers

        architecture = self.classifier_architecture(config)
        if architecture is None:
            return transformers.AutoModel
        return getattr(transformers, architecture, None) or transformers.AutoModelForImageClassification

    def embedding_dim(self, config: Any) -> int:
        return config.hidden_size

    def attention_dims(self, config: Any) -> tuple[int | None, int | None]:
        """(heads, hidden size) for ONNX Runtime's optimizer; None where they vary or there is no attention."""
        return config.num_attention_heads, config.hidden_size

    def image_size(self, config: Any, hf_dir: Path | None) -> tuple[int, int]:
        from_processor = _processor_size(hf_dir) if self.input_size_from_processor else None
        if from_processor is not None:
            return from_processor
        size = config.image_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def towers(self, config: Any, hf_dir: Path | None = None, monolith: bool = False, decoder: str = "torch") -> list[Tower]:
        height, width = self.image_size(config, hf_dir)
        classifier = self.classifier_architecture(config) is not None
        if classifier:
            outputs: tuple[TensorSpec, ...] = (TensorSpec("logits", ("batch", config.num_labels)),)
        else:
            outputs = (TensorSpec("image_embeds", ("batch", self.embedding_dim(config))),)
            if self.dense_output:
                outputs += (TensorSpec("last_hidden_state", ("batch", *self.dense_shape(config, height, width))),)

        def wrap(model: Any) -> nn.Module:
            self.prepare(model, height, width)
            return ClassificationLogits(model) if classifier else PooledFeatures(model, self.dense_output)

        heads, hidden = self.attention_dims(config)
        return [
            Tower(
                name="vision",
                inputs=(TensorSpec("pixel_values", ("batch", config.num_channels, height, width), "float32", "image"),),
                outputs=outputs,
                wrap=wrap,
                num_heads=heads,
                hidden_size=hidden,
                optimizer_model_type=self.optimizer_model_type,
            )
        ]

    def prepare(self, model: Any, height: int, width: int) -> None:
        """Make the loaded model ready for inputs of this size, computing the same outputs (default: nothing to do)."""

    def dense_shape(self, config: Any, height: int, width: int) -> tuple[int, int]:
        """(tokens, hidden) of `last_hidden_state` at this input size."""
        raise NotImplementedError
