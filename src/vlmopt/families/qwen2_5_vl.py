"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) as three parts with a KV cache.

  vision     pixel_values [num_patches, C * T * P * P] (the processor's flattened patches of every image, in order)
             + image_grid_thw [num_images, 3] -> image_features [num_patches / 4, hidden]: a variable number of
             merged image tokens per image (its patch grid, merged 2x2)
  embedding  the generative contract's (`vlmopt.families.generative`)
  decoder    inputs_embeds, attention_mask, position_ids [3, batch, sequence] (M-RoPE: temporal, height, width),
             past_key_values.{i}.key/value -> logits, present.{i}.key/value

The vision tower's window index and cu_seqlens come from the values of image_grid_thw through Python loops and
`.tolist()` (transformers' `vision_utils`), and its eager attention splits the patches into windows by those
lengths: the dynamo exporter cannot trace either with dynamic shapes. `VisionFeatures` computes the same thing
from tensors only: each patch's (row, column) for the rotary embedding, and which patches share an image frame
(the full-attention blocks) or a window of `window_size` pixels (the other blocks), as attention masks. transformers
permutes the patches into window order, attends within each window and permutes back; attending in the original
order under the window mask is the same computation (attention does not see order beyond the rotary positions,
which travel with their patches), so no permutation is exported. The masks are [num_patches, num_patches]: the cost
of full attention in every block, where windows would be cheaper on large images.

M-RoPE positions at prefill come from transformers' own `get_rope_index`, called without the model (it reads only the
config); decode positions follow from the prompt's (`vlmopt.runners.generate.KvCache`), as transformers' `rope_deltas`.

transformers' `Qwen2_5_VLProcessor` cannot be made without torchvision (its video processor), which has no CPU wheel
on PyPI for the torch vlmopt pins: where it cannot load, the preprocessor makes it from the checkpoint's image
processor and tokenizer with no video processor (images only, as vlmopt generates from images).
onnxruntime-genai 0.18's `qwen2_5_vl` pipeline runs the same three parts (`genai_config.json` declares the type, the
vision part's image_grid_thw and the token ids it finds images by: `genai_entries`); it computes the M-RoPE positions
itself. The decoder is exported from PyTorch: genai's builder (`qwen2_5_vl_text`) makes GroupQueryAttention, whose
shared-buffer cache vlmopt's loop runs with 1-D positions only.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmopt.errors import VlmoptError
from vlmopt.families.base import TensorSpec, Tower
from vlmopt.families.generative import (
    IMAGE_FEATURES,
    PIXEL_VALUES,
    POSITIONS_MROPE,
    VISION,
    GenerativeContract,
    GenerativeFamily,
    Part,
    VlmPreprocessor,
)

IMAGE_GRID_THW, MM_TOKEN_TYPE_IDS = "image_grid_thw", "mm_token_type_ids"
#: the patch grid of each image in dummy inputs (export, part checks): 6x8 merged tokens, so windows of 4x4 are cut
DUMMY_GRID = (1, 12, 16)
#: the image processor refuses images longer than this many times their width (or wider than their height)
MAX_ASPECT_RATIO = 200


def _allowed(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype)
    return torch.where(mask, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype))[None, None]


class VisionFeatures(nn.Module):
    """(pixel_values, image_grid_thw) -> the merged features of every image, rows [num_patches / merge^2, hidden].

    The vision tower's own modules (patch embedding, rotary embedding, blocks, merger) run as transformers runs them;
    only the window bookkeeping and the attention's split into windows are written here, as masks (module docstring)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.visual = model.model.visual
        config = self.visual.config
        self.merge = int(config.spatial_merge_size)
        self.window = int(config.window_size) // self.merge // int(config.patch_size)  # merged tokens per window side
        self.full_blocks = {int(i) for i in config.fullatt_block_indexes}
        # the patch embedding's Conv3d kernel as a [patch values, hidden] matrix, a weight of its own so that the export
        # holds it as a constant (a reshape of the kernel in the graph would leave the MatMul's B computed, unquantized)
        kernel = self.visual.patch_embed.proj.weight
        self.patch_weight = nn.Parameter(kernel.detach().reshape(kernel.shape[0], -1).t().contiguous(), requires_grad=False)

    def patch_layout(self, image_grid_thw: torch.Tensor, num_patches: Any) -> tuple[torch.Tensor, ...]:
        """Per patch: its image, frame, row and column, in the processor's order (frames, then 2x2 merge blocks row by row)."""
        grid = image_grid_thw.to(torch.int64)
        patch = torch.arange(num_patches, dtype=torch.int64)
        counts = grid[:, 0] * grid[:, 1] * grid[:, 2]
        ends = torch.cumsum(counts, 0)
        image = (patch[:, None] >= ends[None, :]).to(torch.int64).sum(-1)
        height, width = grid[:, 1][image], grid[:, 2][image]
        offset = patch - (ends - counts)[image]
        frame, within = offset // (height * width), offset % (height * width)
        m = self.merge
        block = within // (m * m)
        block_row, block_col = block // (width // m), block % (width // m)
        row = block_row * m + (within // m) % m
        col = block_col * m + within % m
        return image, frame, row, col

    def embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """transformers' patch embedding, a Conv3d whose kernel is its stride over patches the processor has already
        flattened ([num_patches, channels x frames x patch x patch]), as the MatMul it is: quantize's int8-dynamic
        quantizes MatMuls and leaves a Conv fp32 (87 ms of Qwen2.5-VL-3B's int8 vision at 448 px, its 1024 patches)."""
        hidden = pixel_values.to(self.patch_weight.dtype) @ self.patch_weight
        bias = self.visual.patch_embed.proj.bias
        return hidden if bias is None else hidden + bias

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision, eager_attention_forward

        visual = self.visual
        image, frame, row, col = self.patch_layout(image_grid_thw, pixel_values.shape[0])
        hidden = self.embed_patches(pixel_values)
        cos, sin = visual.rotary_pos_emb(hidden, torch.stack([row, col], dim=-1))
        same_frame = (image[:, None] == image[None, :]) & (frame[:, None] == frame[None, :])
        window_row, window_col = row // (self.merge * self.window), col // (self.merge * self.window)
        same_window = same_frame & (window_row[:, None] == window_row[None, :]) & (window_col[:, None] == window_col[None, :])
        masks = {True: _allowed(same_frame, hidden.dtype), False: _allowed(same_window, hidden.dtype)}
        for index, block in enumerate(visual.blocks):
            attn, x = block.attn, block.norm1(hidden)
            length = x.shape[0]
            q, k, v = attn.qkv(x).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            out, _ = eager_attention_forward(attn, q, k, v, masks[index in self.full_blocks], scaling=attn.scaling)
            hidden = hidden + attn.proj(out.reshape(length, -1))
            hidden = hidden + block.mlp(block.norm2(hidden))
        return visual.merger(hidden)


def image_only_processor_class() -> Any:
    """`Qwen2_5_VLProcessor` that takes no video processor (transformers' needs torchvision)."""
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyProcessor


class Qwen2_5_VlPreprocessor(VlmPreprocessor):
    """The checkpoint's processor: an image takes one token per 2x2 block of its patch grid (`image_grid_thw`), so
    images of different sizes take different token counts. The image processor resizes every image to multiples of
    28 px (the merge unit) within its pixel limits: a smaller image is scaled up, not refused; one over 200 times as
    long as it is wide is refused (the processor cannot take it)."""

    default_image_token = "<|image_pad|>"

    def __init__(self, folder: Path, family: Qwen2_5_VlFamily | None = None):
        super().__init__(folder, family or Qwen2_5_VlFamily())
        self.merge = int(self.config.vision_config.spatial_merge_size)
        tokenizer_token = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if tokenizer_token != self.image_token_id:
            raise VlmoptError(
                f"the tokenizer in {folder} writes {self.image_token} as token {tokenizer_token} but the model's config reads "
                f"image_token_id={self.image_token_id}; the checkpoint's tokenizer and config disagree"
            )

    def load_processor(self, folder: Path) -> Any:
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

        try:
            processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
            if hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
                return processor
        except (ImportError, AttributeError, TypeError, ValueError, OSError):  # no torchvision for its video processor
            pass
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        image_processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        return image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)

    def save(self, folder: Path) -> list[str]:
        """The processor's files; an image-only processor (no video processor) saves its image processor and tokenizer."""
        if getattr(self.processor, "video_processor", None) is not None:
            return super().save(folder)
        before = {p.name for p in folder.iterdir()}
        self.processor.image_processor.save_pretrained(str(folder))
        self.processor.tokenizer.save_pretrained(str(folder))
        return sorted(p.name for p in folder.iterdir() if p.name not in before)

    def check_images(self, images: list[Any]) -> None:
        for image in images:
            width, height = image.size
            if max(width, height) > MAX_ASPECT_RATIO * max(min(width, height), 1):
                raise VlmoptError(
                    f"an image of {width}x{height} px is more than {MAX_ASPECT_RATIO} times as long as it is wide, which the "
                    f"{self.family.name} image processor cannot take; crop it"
                )

    def images(self, images: list[Any]) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
        self.check_images(images)
        return super().images(images)

    def __call__(self, prompts: list[str] | str, images: list[Any] | None = None, chat: bool = True, images_per_prompt: list[int] | None = None) -> Any:
        self.check_images(list(images or []))
        return super().__call__(prompts, images, chat, images_per_prompt)

    def expected_image_tokens(self, num_images: int, pixel_values: np.ndarray | None, vision_inputs: dict[str, np.ndarray]) -> int:
        grid = vision_inputs.get(IMAGE_GRID_THW)
        return 0 if grid is None else int(np.prod(grid, axis=-1).sum()) // self.merge**2

    def image_token_mismatch(self, found: int, num_images: int, expected: int) -> str:
        return (
            f"the prompt holds {found} image tokens where {num_images} image(s) take {expected} (one per 2x2 block of each image's patches); "
            f"write {self.image_token} once per image and no image tokens otherwise"
        )


class Qwen2_5_VlFamily(GenerativeFamily):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    summary = "Qwen2.5-VL (windowed vision tower, M-RoPE Qwen2 text model): patches + image_grid_thw -> vision -> image_features, embedding, decoder with 3-axis positions and KV cache"
    contract = GenerativeContract(
        vision=Part(VISION, (PIXEL_VALUES, IMAGE_GRID_THW), (IMAGE_FEATURES,)),
        positions=POSITIONS_MROPE,
        vision_inputs=(IMAGE_GRID_THW,),
        reference_inputs=(MM_TOKEN_TYPE_IDS,),
        genai_model_type="qwen2_5_vl",
    )
    #: onnxruntime-genai's builder makes 1-D rotary GroupQueryAttention: the decoder is exported from PyTorch
    decoder_makers = ("torch",)
    language_models = ("qwen2_5_vl_text",)
    vision_wrapper = VisionFeatures
    preprocessor_class = Qwen2_5_VlPreprocessor
    atol = 5e-3

    def model_class(self, config: Any) -> Any:
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def check_config(self, config: Any) -> None:
        super().check_config(config)
        vision, text = config.vision_config, self.text_config(config)
        if int(vision.out_hidden_size) != int(text.hidden_size):
            raise VlmoptError(
                f"the qwen2_5_vl config disagrees with itself: the vision tower gives rows of out_hidden_size {vision.out_hidden_size} "
                f"but the text model's hidden_size is {text.hidden_size}"
            )
        unit = int(vision.patch_size) * int(vision.spatial_merge_size)
        if int(vision.window_size) % unit:
            raise VlmoptError(
                f"the qwen2_5_vl vision window_size {vision.window_size} is not a multiple of its {unit} px merge unit (patch_size x spatial_merge_size)"
            )
        sections = (getattr(text, "rope_parameters", None) or {}).get("mrope_section")
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if sections is None or 2 * sum(sections) != head_dim:
            raise VlmoptError(f"the qwen2_5_vl text config's mrope_section {sections} does not split its head size {head_dim} (sum x 2 must equal it)")

    def genai_entries(self, config: Any) -> dict[str, dict[str, Any]]:
        """onnxruntime-genai's qwen2_5_vl pipeline computes the M-RoPE positions itself: it finds each image by the
        vision start token and sizes it by image_grid_thw; without these ids it reads Qwen's own (151652, ...)."""
        vision = config.vision_config
        tokens = {"image_token_id": config.image_token_id, "video_token_id": config.video_token_id, "vision_start_token_id": config.vision_start_token_id}
        merge = {"spatial_merge_size": int(vision.spatial_merge_size), "tokens_per_second": float(vision.tokens_per_second)}
        return {"model": {name: int(value) for name, value in tokens.items()}, self.contract.vision.name: merge}

    def image_tokens_per_image(self, config: Any) -> int:
        """The dummy image's token count (`DUMMY_GRID`); a real image's count follows from its grid."""
        t, h, w = DUMMY_GRID
        return t * h * w // config.vision_config.spatial_merge_size**2

    def vision_tower(self, config: Any) -> Tower:
        vision = config.vision_config
        t, h, w = DUMMY_GRID
        patch_values = int(vision.in_channels) * int(vision.temporal_patch_size) * int(vision.patch_size) ** 2
        per_image = self.image_tokens_per_image(config)
        return Tower(
            name=self.contract.vision.name,
            inputs=(
                TensorSpec(PIXEL_VALUES, ("num_patches", patch_values), "float32", "image"),
                TensorSpec(IMAGE_GRID_THW, ("num_images", 3), "int64", "image_grid_thw"),
            ),
            outputs=(TensorSpec(IMAGE_FEATURES, ("num_image_tokens", self.text_config(config).hidden_size)),),
            wrap=self.vision_wrapper,
            num_heads=vision.num_heads,
            hidden_size=vision.hidden_size,
            bench_sizes={"num_images": 1},
            meta={"part": self.contract.vision.name, "image_grid": list(DUMMY_GRID), "quantize": {"fp16": "fp16", "int8": "int8-dynamic"}},
            derived_axes={"num_patches": f"num_images * {t * h * w}", "num_image_tokens": f"num_images * {per_image}"},
        )

    def prompt_positions(
        self, config: Any, encoded: Any, input_ids: np.ndarray, attention_mask: np.ndarray, vision_inputs: dict[str, np.ndarray]
    ) -> np.ndarray:
        """[3, batch, sequence] M-RoPE positions over the prompt, from transformers' own `Qwen2_5_VLModel.get_rope_index`
        (it reads only the config, so it runs on a stand-in for the model: no weights are loaded)."""
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

        kinds = encoded.get(MM_TOKEN_TYPE_IDS)
        if kinds is None:
            kinds = (input_ids == self.image_token(config)).astype(np.int64)
        stand_in = types.SimpleNamespace(config=config)
        stand_in.get_vision_position_ids = types.MethodType(Qwen2_5_VLModel.get_vision_position_ids, stand_in)
        grid = vision_inputs.get(IMAGE_GRID_THW)
        positions, _ = Qwen2_5_VLModel.get_rope_index(
            stand_in,
            torch.from_numpy(input_ids),
            mm_token_type_ids=torch.from_numpy(np.asarray(kinds)),
            image_grid_thw=None if grid is None else torch.from_numpy(grid),
            attention_mask=torch.from_numpy(attention_mask),
        )
        return positions.numpy().astype(np.int64)
