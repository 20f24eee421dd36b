"""LLaVA-style vision-language models (`LlavaForConditionalGeneration`) as three parts with a KV cache.

  vision     pixel_values [num_images, C, H, W] -> image_features [num_image_tokens, hidden]
             (vision tower at `vision_feature_layer`, `vision_feature_select_strategy`, projector;
             the rows of all images in order, 2-D: the contract onnxruntime-genai preallocates for)
  embedding  input_ids [batch, sequence] + image_features -> inputs_embeds [batch, sequence, hidden]
             image features are written at the image-token positions inside the graph
  decoder    inputs_embeds, attention_mask, position_ids, past_key_values.{i}.key/value
             -> logits, present.{i}.key/value: one graph for prefill and decode (`KvCacheLayout`)

Why the merge is inside the embedding graph: measured against transformers' `masked_scatter` both ways
give 0.0 difference with 0, 1 and 2 images, and both cost under 0.12 ms a call (noise next to a 25 to
200 ms decoder step); only the inside merge is the contract onnxruntime-genai runs, so the same parts run
under it, under vlmopt's own loop and any ONNX runtime without host-side scatter code. The graph cannot
notice a wrong number of image rows (it clamps), so `LlavaPreprocessor` checks the count before anything runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmopt.errors import VlmoptError
from vlmopt.families.base import CONCAT, SHARED, Family, TensorSpec, TextVocab, Tower, image_input, text_vocab
from vlmopt.families.decoder import CausalLmWithPast, KvCacheLayout
from vlmopt.runners.prompt import Prompt

IMAGE_TOKEN = "<image>"
#: vision towers whose output layout is known: extra (class) tokens before the patch tokens
VISION_MODELS = {"clip_vision_model": 1, "siglip_vision_model": 0}


def image_token_id(config: Any) -> int:
    """llava-hf configs say `image_token_index`, newer ones `image_token_id`; read either."""
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if value is not None:
            return int(value)
    raise VlmoptError("the llava config names no image token (neither image_token_id nor image_token_index)")


def image_seq_length(config: Any) -> int:
    """Feature rows per image: the patch grid, plus class tokens, minus the one the "default" strategy drops."""
    vision = config.vision_config
    size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    extra = VISION_MODELS[vision.model_type]
    return (size // vision.patch_size) ** 2 + extra - (1 if config.vision_feature_select_strategy == "default" else 0)


class VisionFeatures(nn.Module):
    """pixel_values -> the projected features of every image, as rows [num_images * image_seq_length, hidden]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision_tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.layers = model.config.vision_feature_layer
        self.strategy = model.config.vision_feature_select_strategy

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        layers = [self.layers] if isinstance(self.layers, int) else list(self.layers)
        selected = [hidden[i][:, 1:] if self.strategy == "default" else hidden[i] for i in layers]
        features = self.projector(torch.cat(selected, dim=-1) if len(selected) > 1 else selected[0])
        return features.reshape(-1, features.shape[-1])


class MergedEmbedding(nn.Module):
    """input_ids + image_features -> inputs_embeds, image rows written in order at the image-token positions.

    Takes 0 image rows too (decode steps, text-only prompts): a zero row is appended so the gather always
    reads something, and positions that are not image tokens keep their token embedding."""

    def __init__(self, embed_tokens: nn.Module, token: int):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.image_token = token

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        embeds = self.embed_tokens(input_ids)
        is_image = input_ids == self.image_token
        flat = is_image.reshape(-1)
        count = image_features.shape[0]
        index = torch.cumsum(flat.to(torch.int64), dim=0) - 1
        index = torch.where(flat, torch.clamp(index, max=count), torch.full_like(index, count))
        rows = torch.cat([image_features.to(embeds.dtype), image_features.new_zeros((1, image_features.shape[1]))], dim=0)
        return torch.where(is_image.unsqueeze(-1), rows[index].reshape(embeds.shape), embeds)


class LlavaFamily(Family):
    name = "llava"
    model_types = ("llava",)
    summary = "LLaVA-style VLM (llama, mistral or qwen2 language model): vision -> image_features, embedding -> inputs_embeds, decoder with KV cache -> logits"
    generative = True
    exporters = ("dynamo",)
    #: the language models whose decoder (and its cache) vlmopt's wrapper and verification cover
    language_models = ("llama", "mistral", "qwen2")
    #: who can make the decoder part (`convert --decoder`), preferred first
    decoder_makers = ("builder", "torch")
    #: fp32 logits reach |33| on a real 30-layer model (SmolLM2), where fp32 itself is the noise: on an Intel Xeon
    #: (AVX-512), transformers' own fp32 logits differ from its fp64 ones by 2.1e-3 at 23 positions, more than the ONNX
    #: decoders do (builder 2.2e-4, exported 5.1e-4), and the exported one differs from the fp32 reference by 2.6e-3.
    #: A wrong decoder is off by far more (GroupQueryAttention with left padding: 0.59)
    atol = 5e-3

    def model_class(self, config: Any) -> Any:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def check_config(self, config: Any) -> None:
        text_type = getattr(config.text_config, "model_type", None)
        if text_type not in self.language_models:
            raise VlmoptError(f"language model '{text_type}' is not supported by llava; supported: {', '.join(self.language_models)}")
        vision_type = getattr(config.vision_config, "model_type", None)
        if vision_type not in VISION_MODELS:
            raise VlmoptError(f"vision tower '{vision_type}' is not supported by llava; supported: {', '.join(VISION_MODELS)}")

    def towers(self, config: Any, hf_dir: Path | None = None, monolith: bool = False, decoder: str = "torch") -> list[Tower]:
        """The three parts; `decoder` says who makes the decoder: "torch" (exported, CONCAT cache) or "builder"
        (onnxruntime-genai's model builder, `vlmopt.genai_builder`: GroupQueryAttention, SHARED cache)."""
        self.check_config(config)
        text, vision = config.text_config, config.vision_config
        token, per_image = image_token_id(config), image_seq_length(config)
        vocab = TextVocab(**{**text_vocab(text).to_json(), "image_token_id": token, "image_seq_length": per_image})
        hidden = text.hidden_size
        layout = KvCacheLayout.of(text)
        return [
            Tower(
                name="vision",
                inputs=(image_input(vision, "num_images"),),
                outputs=(TensorSpec("image_features", ("num_image_tokens", hidden)),),
                wrap=VisionFeatures,
                num_heads=vision.num_attention_heads,
                hidden_size=vision.hidden_size,
                optimizer_model_type="clip",
                bench_sizes={"num_images": 1},
                meta={"part": "vision", "image_seq_length": per_image, "quantize": {"fp16": "fp16", "int8": "int8-dynamic"}},
                derived_axes={"num_image_tokens": f"num_images * {per_image}"},
            ),
            Tower(
                name="embedding",
                inputs=(
                    TensorSpec("input_ids", ("batch", "sequence"), "int64", "image_input_ids"),
                    TensorSpec("image_features", ("num_image_tokens", hidden), "float32", "image_features"),
                ),
                outputs=(TensorSpec("inputs_embeds", ("batch", "sequence", hidden)),),
                wrap=lambda model: MergedEmbedding(model.get_input_embeddings(), token),
                vocab=vocab,
                bench_sizes={"batch": 1, "num_images": 1, "sequence": per_image + 32},
                meta={"part": "embedding", "merge": "inside", "similarity_gated": False, "quantize": {"int8": "gather-int8", "int4": "gather-int4"}},
                derived_axes={"num_image_tokens": f"num_images * {per_image}"},
            ),
            layout.tower(
                lambda model: CausalLmWithPast(model.model.language_model, model.lm_head, model.config.text_config, takes_positions=decoder == "torch"),
                text,
                meta={
                    "part": "decoder",
                    "language_model": text.model_type,
                    "maker": decoder,
                    "similarity_gated": False,
                    "quantize": {"int8": "int8-weights", "int4": "int4"},
                },
                contract=SHARED if decoder == "builder" else CONCAT,
            ),
        ]

    def preprocessor(self, folder: Path) -> LlavaPreprocessor:
        return LlavaPreprocessor(folder)


class LlavaPreprocessor:
    """The checkpoint's own processor (chat template, `<image>` expansion, image preprocessing), run once before any backend."""

    def __init__(self, folder: Path):
        from transformers import AutoConfig, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
            config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise VlmoptError(f"cannot load the processor saved in {folder}: {(str(exc).splitlines() or [''])[0][:200]}") from exc
        if not hasattr(self.processor, "image_processor") or not hasattr(self.processor, "tokenizer"):
            raise VlmoptError(f"{folder} has no image processor and tokenizer (a llava processor); export the checkpoint with its processor")
        self.tokenizer = self.processor.tokenizer
        self.image_token = getattr(self.processor, "image_token", IMAGE_TOKEN)
        self.image_token_id = image_token_id(config)
        self.image_seq_length = image_seq_length(config)
        self.max_positions = int(config.text_config.max_position_embeddings)
        self.eos_token_ids = _token_ids(getattr(config.text_config, "eos_token_id", None)) or _token_ids(self.tokenizer.eos_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None))

    def render(self, prompt: str, num_images: int, chat: bool = True) -> str:
        """The prompt as the model reads it: the chat template applied (one image part per image, where the
        prompt's `<image>` markers say or else first), or the raw text, whose `<image>` markers must match the images."""
        markers = prompt.count(self.image_token)
        if markers and markers != num_images:
            raise VlmoptError(
                f"the prompt has {markers} {self.image_token} marker(s) but {num_images} image(s) were given; write one {self.image_token} per --image"
            )
        if not chat:
            if markers != num_images:
                raise VlmoptError(
                    f"the raw prompt has no {self.image_token} marker but {num_images} image(s) were given; "
                    f"write {self.image_token} where each image goes, or drop --raw-prompt to let the chat template place them"
                )
            return prompt
        if not self.has_chat_template:
            raise VlmoptError("this model has no chat template; pass --raw-prompt with the prompt exactly as the model expects it")
        if markers:
            pieces = prompt.split(self.image_token)
            content: list[dict[str, Any]] = []
            for i, piece in enumerate(pieces):
                if piece:
                    content.append({"type": "text", "text": piece})
                if i < len(pieces) - 1:
                    content.append({"type": "image"})
        else:
            content = [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)

    def __call__(self, prompts: list[str] | str, images: list[Any] | None = None, chat: bool = True, images_per_prompt: list[int] | None = None) -> Prompt:
        """Ids, mask (left padding) and pixels for one prompt (or a batch: `images_per_prompt` says how the images split)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        images = list(images or [])
        counts = images_per_prompt or ([len(images)] if len(prompts) == 1 else [len(images) // len(prompts)] * len(prompts))
        texts = [self.render(p, n, chat) for p, n in zip(prompts, counts, strict=True)]
        encoded = self.processor(images=images or None, text=texts, return_tensors="np", padding=True, padding_side="left")
        ids = encoded["input_ids"].astype(np.int64)
        found = int((ids == self.image_token_id).sum())
        if found != len(images) * self.image_seq_length:
            raise VlmoptError(
                f"the prompt holds {found} image tokens for {len(images)} image(s) of {self.image_seq_length} tokens each; "
                f"write {self.image_token} once per image and no image tokens otherwise"
            )
        pixels = encoded.get("pixel_values")
        return Prompt(ids, encoded["attention_mask"].astype(np.int64), None if pixels is None else pixels.astype(np.float32), texts, len(images))

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def save(self, folder: Path) -> list[str]:
        """The processor files (tokenizer, chat template, image processor) into an artifact folder."""
        before = {p.name for p in folder.iterdir()}
        self.processor.save_pretrained(str(folder))
        return sorted(p.name for p in folder.iterdir() if p.name not in before)


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]
