"""LLaVA-NeXT and LLaVA-OneVision (`LlavaNextForConditionalGeneration`, `LlavaOnevisionForConditionalGeneration`) as
three parts with a KV cache.

  vision     pixel_values [num_tiles, C, S, S] (the tiles of every image in order: the whole image resized to S, then
             its any-resolution grid of S x S tiles), image_rows [num_image_tokens, 4] int64, image_weights
             [num_image_tokens, 4] -> image_features [num_image_tokens, hidden]
  embedding  and decoder: the generative contract's (`vlmopt.families.generative`), over a Llama, Mistral or Qwen2

Any-resolution packing depends on each image's size: the tiles' feature grid is cut back to the picture's aspect
(unpadded), OneVision shrinks a grid over `anyres_max_N` tiles bilinearly, and every row of the grid ends in the
learned `image_newline`. Those sizes are known before anything runs, so the preprocessor turns them into a gather:
each packed row is a weighted sum of at most 4 rows of the tiles' projected features (or the `image_newline` row,
which the graph appends after them), the 4 bilinear taps where OneVision interpolates, one tap of weight 1
elsewhere. The graph does no shape arithmetic of its own (a data-dependent unpad would not export to one graph), the
packing runs inside the ONNX part (the `image_newline` weight travels with it) and the same index rule is checked
against transformers' `pack_image_features` at image sizes with different grids, unpads and interpolations.
onnxruntime-genai 0.18 has no llava_next or llava_onevision model type: vlmopt's loop is the only ONNX backend.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmopt.errors import VlmoptError
from vlmopt.families.base import TensorSpec, Tower, image_input
from vlmopt.families.generative import (
    IMAGE_FEATURES,
    PIXEL_VALUES,
    VISION,
    GenerativeContract,
    GenerativeFamily,
    Part,
    VlmPreprocessor,
)
from vlmopt.families.llava import VISION_MODELS, VisionFeatures, image_token_id

#: the vision part's packing inputs: per packed row, the feature rows it sums and their weights
IMAGE_ROWS, IMAGE_WEIGHTS = "image_rows", "image_weights"
#: reference-only inputs (transformers' `get_image_features` takes them; the ONNX part does not)
IMAGE_SIZES, BATCH_NUM_IMAGES = "image_sizes", "batch_num_images"
#: taps per packed row: the 4 corners of a bilinear sample
TAPS = 4


def tile_grid(image_size: tuple[int, int], config: Any) -> tuple[int, int]:
    """The any-resolution grid (tiles down, tiles across) transformers picks for an image of (height, width)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    return get_anyres_image_grid_shape(list(image_size), config.image_grid_pinpoints, config.vision_config.image_size)


def unpadded(grid: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """`grid` [rows, cols] cut back to the image's aspect, by transformers' own `unpad_image`."""
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    return unpad_image(torch.from_numpy(grid)[None], list(image_size))[0].numpy()


def bilinear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output index the two source indices and their weights, as `torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False)` computes them for an output size (its scale is in / out, in float32)."""
    scale = np.float32(size_in) / np.float32(size_out)
    source = np.maximum(scale * (np.arange(size_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    low = np.floor(source).astype(np.int64)
    high = np.minimum(low + 1, size_in - 1)
    weight_high = source - low.astype(np.float32)
    return low, high, np.stack([np.float32(1) - weight_high, weight_high], axis=-1)


def max_tiles(vision_aspect_ratio: str | None) -> int | None:
    """OneVision's `anyres_max_N`: N, the tiles' worth of features a grid is shrunk to; None where nothing shrinks."""
    if vision_aspect_ratio is None:
        return None
    return int(vision_aspect_ratio.removeprefix("anyres_max_"))


def packing(
    image_size: tuple[int, int], num_tiles: int, first_tile: int, newline_row: int, config: Any, shrink_to: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """The gather that packs one image's tile features as transformers' `pack_image_features` does: rows [n, TAPS]
    into the flat feature rows (row `newline_row` is `image_newline`) and their weights [n, TAPS].

    The whole-image tile comes first; then, if the image was split, the grid of its other tiles, unpadded, shrunk
    bilinearly where it holds more than `shrink_to` tiles' worth (by over 1.1x on a side), each grid row followed by
    the newline; an unsplit image's tile is followed by one newline."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    per_tile = side * side
    first = first_tile * per_tile
    single = [np.arange(first, first + per_tile)]
    if num_tiles == 1:
        taps = _one_tap(np.concatenate([*single, [newline_row]]))
        return taps
    down, across = tile_grid(image_size, config)
    if down * across != num_tiles - 1:
        raise VlmoptError(f"an image of {image_size[0]}x{image_size[1]} takes {down}x{across} tiles plus the whole image, but {num_tiles} tiles were given")
    y, x = np.meshgrid(np.arange(down * side), np.arange(across * side), indexing="ij")
    tile = (y // side) * across + x // side
    grid = first + (1 + tile) * per_tile + (y % side) * side + x % side
    grid = unpadded(grid, image_size)
    height, width = grid.shape
    ratio = math.sqrt(height * width / (shrink_to * side * side)) if shrink_to else 0.0
    base_rows, base_weights = _one_tap(single[0])
    if ratio > 1.1:
        out_h, out_w = int(height // ratio), int(width // ratio)
        y0, y1, wy = bilinear_taps(height, out_h)
        x0, x1, wx = bilinear_taps(width, out_w)
        corners = [grid[np.ix_(ys, xs)] for ys in (y0, y1) for xs in (x0, x1)]
        rows = np.stack(corners, axis=-1)  # [out_h, out_w, 4]
        weights = (wy[:, None, :, None] * wx[None, :, None, :]).reshape(out_h, out_w, TAPS).astype(np.float32)
    else:
        rows, weights = _one_tap(grid.reshape(-1))
        rows, weights = rows.reshape(height, width, TAPS), weights.reshape(height, width, TAPS)
    newline_rows, newline_weights = _one_tap(np.full(rows.shape[0], newline_row))
    rows = np.concatenate([rows, newline_rows[:, None]], axis=1).reshape(-1, TAPS)
    weights = np.concatenate([weights, newline_weights[:, None]], axis=1).reshape(-1, TAPS)
    return np.concatenate([base_rows, rows]), np.concatenate([base_weights, weights])


def _one_tap(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows taken as they are: the row itself with weight 1, and three taps of weight 0."""
    taps = np.zeros((len(rows), TAPS), np.int64)
    taps[:, 0] = rows
    weights = np.zeros((len(rows), TAPS), np.float32)
    weights[:, 0] = 1
    return taps, weights


class PackedVisionFeatures(VisionFeatures):
    """(tiles, image_rows, image_weights) -> packed image features: LLaVA's tower and projector over the tiles
    (`vlmopt.families.llava.VisionFeatures`), `image_newline` appended as the last row, and each packed row the
    weighted sum of the rows it names."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.image_newline = model.model.image_newline

    def forward(self, pixel_values: torch.Tensor, image_rows: torch.Tensor, image_weights: torch.Tensor) -> torch.Tensor:
        features = super().forward(pixel_values)
        rows = torch.cat([features, self.image_newline[None].to(features.dtype)], dim=0)
        return (rows[image_rows] * image_weights.unsqueeze(-1)).sum(dim=1)


class LlavaNextFamily(GenerativeFamily):
    name = "llava_next"
    model_types = ("llava_next",)
    summary = (
        "LLaVA-NeXT (any-resolution tiles, image newlines; llama, mistral or qwen2 language model): tiles -> vision "
        "(packed inside the graph) -> image_features, embedding, decoder with KV cache"
    )
    contract = GenerativeContract(
        vision=Part(VISION, (PIXEL_VALUES, IMAGE_ROWS, IMAGE_WEIGHTS), (IMAGE_FEATURES,)),
        vision_inputs=(IMAGE_ROWS, IMAGE_WEIGHTS),
        reference_inputs=(IMAGE_SIZES, BATCH_NUM_IMAGES),
    )
    vision_wrapper = PackedVisionFeatures
    language_models = ("llama", "mistral", "qwen2")
    #: as LLaVA's: fp32 noise of a deep decoder's logits (`LlavaFamily.atol`)
    atol = 5e-3
    #: OneVision shrinks big grids (`anyres_max_N`); LLaVA-NeXT never does
    shrinks = False

    def model_class(self, config: Any) -> Any:
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration

    def check_config(self, config: Any) -> None:
        super().check_config(config)
        vision = config.vision_config
        vision_type = getattr(vision, "model_type", None)
        if vision_type not in VISION_MODELS:
            raise VlmoptError(f"vision tower '{vision_type}' is not supported by {self.name}; supported: {', '.join(VISION_MODELS)}")
        extra = VISION_MODELS[vision_type] - (1 if config.vision_feature_select_strategy == "default" else 0)
        if extra:
            raise VlmoptError(
                f"the {self.name} config's vision_feature_select_strategy '{config.vision_feature_select_strategy}' leaves {extra} class token(s) "
                f"beside the {vision_type} patch grid, which any-resolution packing cannot lay out; the vision config and the strategy disagree"
            )
        pinpoints = config.image_grid_pinpoints
        if not pinpoints or any(h % vision.image_size or w % vision.image_size for h, w in pinpoints):
            raise VlmoptError(
                f"the {self.name} config's image_grid_pinpoints {pinpoints} are not multiples of the vision tower's image_size {vision.image_size}"
            )

    def image_token(self, config: Any) -> int:
        return image_token_id(config)

    def image_tokens_per_image(self, config: Any) -> int:
        """Feature rows per tile (a packed image takes about that many per tile, plus newlines)."""
        side = config.vision_config.image_size // config.vision_config.patch_size
        return side * side

    def shrink_to(self, config: Any) -> int | None:
        return max_tiles(getattr(config, "vision_aspect_ratio", None)) if self.shrinks else None

    def vision_tower(self, config: Any) -> Tower:
        per_tile = self.image_tokens_per_image(config)
        hidden = self.text_config(config).hidden_size
        tower = super().vision_tower(config)
        return Tower(
            **{
                **tower.__dict__,
                "inputs": (
                    image_input(config.vision_config, "num_images"),
                    TensorSpec(IMAGE_ROWS, ("num_image_tokens", TAPS), "int64", "feature_rows"),
                    TensorSpec(IMAGE_WEIGHTS, ("num_image_tokens", TAPS), "float32", "feature_weights"),
                ),
                "outputs": (TensorSpec(IMAGE_FEATURES, ("num_image_tokens", hidden)),),
                # the packed rows of the dummy feed: as many as the tiles' rows plus a newline per tile row
                "derived_axes": {"num_image_tokens": f"num_images * {per_tile + config.vision_config.image_size // config.vision_config.patch_size}"},
                "meta": {**tower.meta, "feature_rows_per_tile": per_tile},
            }
        )

    def image_features(self, model: Any, pixel_values: Any, vision_inputs: dict[str, Any], reference_inputs: dict[str, Any]) -> Any:
        """transformers' packed features (`get_image_features` -> `pack_image_features`) for the flat tiles: it takes
        the image sizes (the reference inputs), not the packing gather the vision part takes."""
        return super().image_features(model, pixel_values, reference_inputs, {})

    def generate_inputs(self, pixel_values: Any, vision_inputs: dict[str, Any]) -> dict[str, Any]:
        return {PIXEL_VALUES: pixel_values}

    def preprocessor(self, folder: Path) -> AnyResPreprocessor:
        return AnyResPreprocessor(folder, self)


class LlavaOnevisionFamily(LlavaNextFamily):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    summary = (
        "LLaVA-OneVision (any-resolution tiles shrunk to anyres_max_N, image newlines; qwen2, llama or mistral language model): "
        "tiles -> vision (packed inside the graph) -> image_features, embedding, decoder with KV cache"
    )
    shrinks = True

    def model_class(self, config: Any) -> Any:
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration

    def check_config(self, config: Any) -> None:
        super().check_config(config)
        ratio = getattr(config, "vision_aspect_ratio", None)
        if not str(ratio).startswith("anyres_max_") or not str(ratio)[len("anyres_max_") :].isdigit():
            raise VlmoptError(f"the llava_onevision config's vision_aspect_ratio '{ratio}' is not anyres_max_N")


class AnyResPreprocessor(VlmPreprocessor):
    """The checkpoint's processor; the vision part gets the real tiles of every image (flat) and the packing gather.

    OneVision's processor lays a prompt of several images out as one whole-image tile each (`batch_num_images`), and
    its model drops those images' other tiles: so does the preprocessor."""

    def __init__(self, folder: Path, family: LlavaNextFamily | None = None):
        super().__init__(folder, family or LlavaNextFamily())
        family = self.family
        #: OneVision's processor takes a batch's images one list per prompt (how it tells a multi-image prompt)
        self.nested_images = family.shrinks
        config = self.config
        tile = int(config.vision_config.image_size)
        self.tile = tile
        image_processor = self.processor.image_processor
        pinpoints = getattr(image_processor, "image_grid_pinpoints", None)
        if pinpoints is not None and [list(p) for p in pinpoints] != [list(p) for p in config.image_grid_pinpoints]:
            raise VlmoptError(
                f"the image processor in {folder} tiles images by image_grid_pinpoints {pinpoints} but the model's config packs them by "
                f"{config.image_grid_pinpoints}; the checkpoint's processor and config disagree"
            )
        if family.shrinks:
            ratio = getattr(self.processor, "vision_aspect_ratio", None)
            if ratio is not None and ratio != config.vision_aspect_ratio:
                raise VlmoptError(
                    f"the processor in {folder} counts image tokens for vision_aspect_ratio '{ratio}' but the model's config packs "
                    f"'{config.vision_aspect_ratio}'; the checkpoint's processor and config disagree"
                )
        strategy = getattr(self.processor, "vision_feature_select_strategy", None)
        if strategy is not None and strategy != config.vision_feature_select_strategy:
            raise VlmoptError(
                f"the processor in {folder} counts image tokens for vision_feature_select_strategy '{strategy}' but the model's config selects "
                f"'{config.vision_feature_select_strategy}'; the checkpoint's processor and config disagree"
            )

    def load_processor(self, folder: Path) -> Any:
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        except (ImportError, AttributeError, OSError):  # no torchvision for its video processor, or none saved
            if not self.family.shrinks:
                raise
            return onevision_processor_class().from_pretrained(str(folder), local_files_only=True)

    def image_inputs(self, encoded: Any) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """The real tiles of every image in order (flat), the packing gather over them (vision inputs), and the image
        sizes and images per prompt (reference inputs: transformers packs by them)."""
        pixels = encoded.get(PIXEL_VALUES)
        if pixels is None:
            return None, {}
        pixels = np.asarray(pixels, np.float32)
        if pixels.ndim != 5 or pixels.shape[-2:] != (self.tile, self.tile):
            raise VlmoptError(
                f"the image processor gave pixels of shape {pixels.shape}, not tiles of {self.tile}x{self.tile}; its crop size must be the vision config's image_size"
            )
        sizes = np.asarray(encoded[IMAGE_SIZES], np.int64).reshape(-1, 2)
        counts = encoded.get(BATCH_NUM_IMAGES) if self.family.shrinks else None
        split = [True] * len(sizes) if counts is None else [int(n) == 1 for n in counts for _ in range(int(n))]
        shrink_to = self.family.shrink_to(self.config)
        tiles_of = [_tiles(size, self.config) if whole else 1 for size, whole in zip(sizes, split, strict=True)]
        total = sum(tiles_of)
        newline_row = total * self.image_seq_length
        tiles, rows, weights, first = [], [], [], 0
        for image, (size, count) in enumerate(zip(sizes, tiles_of, strict=True)):
            tiles.append(pixels[image, :count])
            image_rows, image_weights = packing((int(size[0]), int(size[1])), count, first, newline_row, self.config, shrink_to)
            rows.append(image_rows)
            weights.append(image_weights)
            first += count
        extra = {IMAGE_ROWS: np.concatenate(rows), IMAGE_WEIGHTS: np.concatenate(weights), IMAGE_SIZES: sizes}
        if counts is not None:
            extra[BATCH_NUM_IMAGES] = np.asarray(counts, np.int64).reshape(-1)
        return np.ascontiguousarray(np.concatenate(tiles)), extra

    def images(self, images: list[Any]) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Images alone, each as a prompt's only image (split into its any-resolution tiles)."""
        encoded = dict(self.processor.image_processor(images, return_tensors="np"))
        if self.family.shrinks:
            encoded[BATCH_NUM_IMAGES] = np.ones(len(images), np.int64)
        pixels, extra = self.image_inputs(encoded)
        assert pixels is not None
        return (pixels, *self.split_inputs(extra))

    def expected_image_tokens(self, num_images: int, pixel_values: np.ndarray | None, vision_inputs: dict[str, np.ndarray]) -> int:
        return 0 if pixel_values is None else len(vision_inputs[IMAGE_ROWS])

    def image_token_mismatch(self, found: int, num_images: int, expected: int) -> str:
        return (
            f"the prompt holds {found} image tokens where {num_images} image(s) packed from their tiles take {expected}; "
            f"write {self.image_token} once per image and no image tokens otherwise"
        )


def onevision_processor_class() -> Any:
    """LLaVA-OneVision's processor without its video processor: transformers' video processors need torchvision, which
    vlmopt does not install, and images need none. It makes the same image prompts and pixels, and saves as the real one."""
    from transformers import LlavaOnevisionProcessor

    class LlavaOnevisionImageProcessor(LlavaOnevisionProcessor):
        def __init__(
            self,
            image_processor: Any = None,
            tokenizer: Any = None,
            num_image_tokens: int | None = None,
            vision_feature_select_strategy: str | None = None,
            chat_template: str | None = None,
            image_token: str = "<image>",
            video_token: str = "<video>",
            vision_aspect_ratio: str = "anyres_max_9",
            **kwargs: Any,
        ):
            super().__init__(
                image_processor=image_processor,
                tokenizer=tokenizer,
                video_processor=None,
                num_image_tokens=num_image_tokens,
                vision_feature_select_strategy=vision_feature_select_strategy,
                chat_template=chat_template,
                image_token=image_token,
                video_token=video_token,
                vision_aspect_ratio=vision_aspect_ratio,
            )

    LlavaOnevisionImageProcessor.__name__ = "LlavaOnevisionProcessor"
    return LlavaOnevisionImageProcessor


def _tiles(image_size: np.ndarray, config: Any) -> int:
    down, across = tile_grid((int(image_size[0]), int(image_size[1])), config)
    return down * across + 1
