"""SmolVLM and Idefics3 (`SmolVLMForConditionalGeneration`, `Idefics3ForConditionalGeneration`) as three parts with a KV cache.

  vision     pixel_values [num_images, C, S, S]: the tiles of every image in order (each image split into tiles of the
             vision tower's size S, then the whole image resized to S, as the image processor does it)
             -> image_features [num_images * image_seq_len, hidden] (SigLIP-style tower, pixel-shuffle connector)
  embedding  and decoder: the generative contract's (`vlmopt.families.generative`), over a Llama text model

The image processor pads a batch to the most tiles of any image with all-zero tiles, and transformers drops those
before the vision tower; every real tile is S x S (the processor resizes to multiples of S), so its patch mask is
all ones. The preprocessor hands the vision part the real tiles only, flattened: the part needs no mask input.
onnxruntime-genai 0.18 has no smolvlm or idefics3 model type: vlmopt's loop is the only ONNX generation backend.
SmolVLM's own processor needs torchvision (for its video processor); where it cannot load, the preprocessor builds
Idefics3's processor, which makes the same image prompt strings and tiles, from the same folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from vlmopt.errors import VlmoptError
from vlmopt.families.generative import PIXEL_VALUES, GenerativeContract, GenerativeFamily, VlmPreprocessor


def image_seq_len(config: Any) -> int:
    """Image tokens per tile: the patch grid shrunk by the pixel shuffle (`scale_factor` on each side)."""
    vision = config.vision_config
    return int((vision.image_size // vision.patch_size) ** 2 / (config.scale_factor**2))


class VisionFeatures(nn.Module):
    """pixel_values (real tiles) -> the projected features of every tile, as rows [num_tiles * image_seq_len, hidden]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision_model = model.model.vision_model
        self.connector = model.model.connector

    def forward(self, pixel_values: Any) -> Any:
        features = self.connector(self.vision_model(pixel_values=pixel_values).last_hidden_state)
        return features.reshape(-1, features.shape[-1])


class SmolVlmPreprocessor(VlmPreprocessor):
    """The checkpoint's processor; an image takes `image_seq_len` tokens per tile, its tiles counted from the pixels."""

    nested_images = True

    def __init__(self, folder: Path, family: SmolVlmFamily | None = None):
        super().__init__(folder, family or SmolVlmFamily())
        self.tile = int(self.config.vision_config.image_size)

    def load_processor(self, folder: Path) -> Any:
        from transformers import AutoProcessor, Idefics3Processor

        try:
            return AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        except ImportError:  # SmolVLMProcessor's video processor needs torchvision; Idefics3's makes the same image prompts
            return Idefics3Processor.from_pretrained(str(folder), local_files_only=True)

    def image_inputs(self, encoded: Any) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """The real tiles of every image, in order, as one flat batch (the all-zero padding tiles dropped, as transformers drops them)."""
        pixels = encoded.get(PIXEL_VALUES)
        if pixels is None:
            return None, {}
        pixels = np.asarray(pixels, np.float32)
        tiles = pixels.reshape(-1, *pixels.shape[-3:])
        tiles = tiles[np.any(tiles != 0, axis=(1, 2, 3))]
        if tiles.shape[-2:] != (self.tile, self.tile):
            raise VlmoptError(
                f"the image processor makes {tiles.shape[-2]}x{tiles.shape[-1]} tiles but the vision tower takes {self.tile}x{self.tile}; "
                "its max_image_size must be the vision config's image_size"
            )
        return np.ascontiguousarray(tiles), {}

    def expected_image_tokens(self, num_images: int, pixel_values: np.ndarray | None, vision_inputs: dict[str, np.ndarray]) -> int:
        return 0 if pixel_values is None else len(pixel_values) * self.image_seq_length

    def image_token_mismatch(self, found: int, num_images: int, expected: int) -> str:
        return (
            f"the prompt holds {found} image tokens where {num_images} image(s) split into {expected // self.image_seq_length} tiles take {expected}; "
            f"write {self.image_token} once per image and no image tokens otherwise"
        )


class SmolVlmFamily(GenerativeFamily):
    name = "smolvlm"
    model_types = ("smolvlm", "idefics3")
    summary = "SmolVLM / Idefics3 (llama language model): image tiles -> vision (pixel-shuffle connector) -> image_features, embedding, decoder with KV cache"
    contract = GenerativeContract()
    vision_wrapper = VisionFeatures
    preprocessor_class = SmolVlmPreprocessor
    language_models = ("llama",)
    #: the checks that compare parts on one tile per image: the processor resizes every image to 2048 px and splits it
    #: into 16 tiles plus the whole (SmolVLM-256M's settings), so convert's 8 drawn images were 136 vision passes of
    #: 1024 patches in transformers and as many in ONNX Runtime (and a variant's 6 greedy pairs 204 a side); the
    #: vision part takes tiles as a batch either way, and convert's generation checks against transformers keep the
    #: splitting (images of different sizes, so different tile counts)
    part_check_image_processor = {"do_image_splitting": False}
    #: as LLaVA's: fp32 noise of a deep decoder's logits (`LlavaFamily.atol`)
    atol = 5e-3

    def model_class(self, config: Any) -> Any:
        from transformers import Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration

        return Idefics3ForConditionalGeneration if config.model_type == "idefics3" else SmolVLMForConditionalGeneration

    def check_config(self, config: Any) -> None:
        super().check_config(config)
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        if side % config.scale_factor:
            raise VlmoptError(f"the vision tower's {side}x{side} patch grid does not divide by the pixel shuffle's scale_factor {config.scale_factor}")

    def language_model(self, model: Any) -> Any:
        return model.model.text_model

    def image_features(self, model: Any, pixel_values: Any, vision_inputs: dict[str, Any], reference_inputs: dict[str, Any]) -> Any:
        """transformers takes [batch, tiles, C, S, S]: the flat tiles are one row of tiles."""
        return super().image_features(model, pixel_values[None], vision_inputs, reference_inputs)

    def generate_inputs(self, pixel_values: Any, vision_inputs: dict[str, Any]) -> dict[str, Any]:
        return {PIXEL_VALUES: pixel_values[None], **vision_inputs}

    def image_tokens_per_image(self, config: Any) -> int:
        return image_seq_len(config)
