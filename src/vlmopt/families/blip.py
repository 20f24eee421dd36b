"""BLIP captioning (`BlipForConditionalGeneration`): an encoder-decoder captioner as three parts, with a self-attention
cache and a cross-attention cache.

  vision   pixel_values [num_images, C, S, S] -> image_embeds [num_images, rows, vision_hidden]
           (BLIP's vision model; every image is resized to S by the processor, so rows are fixed)
  cross    image_embeds -> cross.{i}.key / cross.{i}.value [num_images, heads, rows, head_dim]: every decoder layer's
           cross-attention keys and values, computed once per generation (the cross-attention cache)
  decoder  input_ids, attention_mask, position_ids, cross.{i}.key/value, past_key_values.{i}.key/value
           -> logits, present.{i}.key/value: BLIP's text decoder (BERT-style, word + position embeddings inside)

Cross-attention keys and values are computed once and fed to every step rather than recomputed from image_embeds:
transformers' own generate does the same (`EncoderDecoderCache.is_updated`), and recomputing costs two
[rows x vision_hidden] x [vision_hidden x hidden] MatMuls per layer and step (BLIP-base: 577 rows, 12 layers: about
16 GFLOP a step, against about 0.2 GFLOP for the rest of a one-token step). `make bench-blip-cross` (BLIP-base's text
decoder in PyTorch, random weights, interleaved): a recomputing step took 2.0x and 3.1x the cached one in two runs
on 2 loaded cores (load average about 9), with identical logits.

The prompt is transformers' (`BlipForConditionalGeneration.generate`): the processor's ids with the first replaced by
the decoder's bos (`[DEC]`, `text_config.bos_token_id`) and the last ([SEP], or the padding of a shorter prompt in a
right-padded batch) dropped, with its mask; end of sequence is [SEP] (`text_config.sep_token_id`).
onnxruntime-genai has no BLIP model type: vlmopt's loop is the only ONNX generation backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmopt.errors import VlmoptError
from vlmopt.families.base import CONCAT, TensorSpec, TextVocab, Tower, text_vocab
from vlmopt.families.generative import (
    ATTENTION_MASK,
    DECODER,
    INPUT_IDS,
    LOGITS,
    PIXEL_VALUES,
    POSITION_IDS,
    SELF_AND_CROSS_ATTENTION,
    VISION,
    GenerativeContract,
    GenerativeFamily,
    Part,
    Prompt,
    VlmPreprocessor,
)

IMAGE_EMBEDS, CROSS = "image_embeds", "cross"
CROSS_KEY, CROSS_VALUE = "cross.{i}.key", "cross.{i}.value"


def cross_names(layers: int) -> list[str]:
    return [name.format(i=i) for i in range(layers) for name in (CROSS_KEY, CROSS_VALUE)]


def check_image_width(wide: Any, hidden: Any) -> None:
    """Refuse a BLIP text model that cross-attends to image rows of another width than the vision model gives."""
    if int(wide) != int(hidden):
        raise VlmoptError(
            f"the text model cross-attends to {wide}-wide image rows (text_config.encoder_hidden_size) but the vision model "
            f"gives {hidden} (vision_config.hidden_size); the vision and text configs disagree"
        )


def image_rows(config: Any) -> int:
    """Rows per image: the patch grid and the class token."""
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + 1


class VisionEmbeds(nn.Module):
    """pixel_values -> BLIP's image_embeds (the vision model's last hidden state, as its generate takes it)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision_model = model.vision_model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values=pixel_values).last_hidden_state


class CrossKeyValues(nn.Module):
    """image_embeds -> every decoder layer's cross-attention keys and values, [batch, heads, rows, head_dim] each."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.attentions = nn.ModuleList(layer.crossattention.self for layer in model.text_decoder.bert.encoder.layer)

    def forward(self, image_embeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out: list[torch.Tensor] = []
        for attention in self.attentions:
            shape = (*image_embeds.shape[:-1], -1, attention.attention_head_size)
            out += [attention.key(image_embeds).view(shape).transpose(1, 2), attention.value(image_embeds).view(shape).transpose(1, 2)]
        return tuple(out)


class TextDecoderWithPast(nn.Module):
    """(input_ids, attention_mask, position_ids, *cross, *past) -> (logits, *present): BLIP's text decoder with its
    cross-attention keys and values given (an `EncoderDecoderCache` whose cross half is marked computed, as transformers'
    generate holds it after its first step) and a ready 4-D causal mask over past and new positions."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.bert = model.text_decoder.bert
        self.head = model.text_decoder.cls
        self.num_layers = model.config.text_config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache, EncoderDecoderCache

        from vlmopt.families.decoder import additive_mask

        layers = self.num_layers
        cross, past = rest[: 2 * layers], rest[2 * layers :]
        own, image = DynamicCache(), DynamicCache()
        for i in range(layers):
            own.update(past[2 * i], past[2 * i + 1], i)
            image.update(cross[2 * i], cross[2 * i + 1], i)
        cache = EncoderDecoderCache(own, image)
        cache.is_updated = dict.fromkeys(range(layers), True)
        mask = additive_mask(attention_mask, input_ids.shape[1], past[0].shape[2], torch.float32)
        # encoder_hidden_states only switches the layers' cross-attention on; its keys and values come from the cache
        out = self.bert(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            encoder_hidden_states=cross[0],
            cache=cache,
            use_cache=True,
            is_decoder=True,
        )
        present: list[torch.Tensor] = []
        for layer in own.layers:
            present += [layer.keys, layer.values]
        return (self.head(out.last_hidden_state), *present)


class BlipPreprocessor(VlmPreprocessor):
    """BLIP's processor (fixed-size images, a BERT tokenizer); the ids as `BlipForConditionalGeneration.generate` makes them.

    A BLIP prompt is a caption prefix (empty: caption from scratch), one image per prompt, no chat template."""

    default_image_token = ""

    def __init__(self, folder: Path, family: BlipFamily | None = None):
        super().__init__(folder, family or BlipFamily())
        text = self.config.text_config
        self.bos_token_id = int(text.bos_token_id)
        self.eos_token_ids = [int(text.sep_token_id)]
        self.pad_token_id = int(text.pad_token_id)

    @property
    def has_chat_template(self) -> bool:
        return False

    def __call__(self, prompts: list[str] | str, images: list[Any] | None = None, chat: bool = True, images_per_prompt: list[int] | None = None) -> Prompt:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        images = list(images or [])
        counts = images_per_prompt or [len(images) // max(len(prompts), 1)] * len(prompts)
        if len(images) != len(prompts) or any(n != 1 for n in counts):
            raise VlmoptError(f"BLIP captions one image per prompt: {len(prompts)} prompt(s) were given with {len(images)} image(s)")
        encoded = self.processor(images=images, text=prompts, return_tensors="np", padding=True)
        ids = np.asarray(encoded[INPUT_IDS], np.int64).copy()
        mask = np.asarray(encoded[ATTENTION_MASK], np.int64)
        # BlipForConditionalGeneration.generate: the first id becomes [DEC], the last column is dropped
        ids[:, 0] = self.bos_token_id
        pixels = np.asarray(encoded[PIXEL_VALUES], np.float32)
        return Prompt(ids[:, :-1], mask[:, :-1].copy(), pixels, prompts, len(images))

    def expected_image_tokens(self, num_images: int, pixel_values: Any, vision_inputs: dict[str, Any]) -> int:
        return 0


class BlipFamily(GenerativeFamily):
    name = "blip"
    model_types = ("blip",)
    summary = (
        "BLIP captioning (encoder-decoder): vision -> image_embeds, cross -> cross-attention keys/values once, text decoder with a self-attention KV cache"
    )
    contract = GenerativeContract(
        vision=Part(VISION, (PIXEL_VALUES,), (IMAGE_EMBEDS,)),
        embedding=Part(CROSS, (IMAGE_EMBEDS,), ("cross.*",)),
        decoder=Part(DECODER, (INPUT_IDS, ATTENTION_MASK, POSITION_IDS, "cross.*", "past_key_values.*"), (LOGITS, "present.*")),
        cache=SELF_AND_CROSS_ATTENTION,
    )
    vision_wrapper = VisionEmbeds
    preprocessor_class = BlipPreprocessor
    decoder_makers = ()
    language_models = ("blip_text_model",)
    atol = 1e-3

    def model_class(self, config: Any) -> Any:
        from transformers import BlipForConditionalGeneration

        return BlipForConditionalGeneration

    def check_config(self, config: Any) -> None:
        vision, text = config.vision_config, config.text_config
        other = [a for a in getattr(config, "architectures", None) or () if a != "BlipForConditionalGeneration"]
        if other:
            raise VlmoptError(
                f"this BLIP checkpoint is a {other[0]}; vlmopt takes BlipForConditionalGeneration (captioning) and "
                "BlipForImageTextRetrieval (retrieval and matching)"
            )
        check_image_width(text.encoder_hidden_size, vision.hidden_size)
        for key in ("bos_token_id", "sep_token_id", "pad_token_id"):
            value = getattr(text, key, None)
            if value is None or not 0 <= int(value) < text.vocab_size:
                raise VlmoptError(f"text_config.{key} is {value}, not a token of the text decoder's vocabulary of {text.vocab_size}")

    def check_declared(self, declared: dict[str, Any]) -> None:
        """BlipConfig overwrites text_config.encoder_hidden_size with the vision hidden size, so a disagreeing
        config.json loads as if it agreed and then fails on the weights: refuse it by the written values."""
        wide = (declared.get("text_config") or {}).get("encoder_hidden_size")
        hidden = (declared.get("vision_config") or {}).get("hidden_size")
        if wide is not None and hidden is not None:
            check_image_width(wide, hidden)

    def image_token(self, config: Any) -> int:
        return -1

    def image_tokens_per_image(self, config: Any) -> int:
        return image_rows(config)

    def language_model(self, model: Any) -> Any:
        return model.text_decoder.bert

    def lm_head(self, model: Any) -> Any:
        return model.text_decoder.cls

    def input_embeddings(self, model: Any) -> Any:
        return model.text_decoder.get_input_embeddings()

    def image_features(self, model: Any, pixel_values: Any, *inputs: Any, **named: Any) -> Any:
        """BLIP's image_embeds [images, rows, hidden]; its vision part takes pixels only, so other inputs are ignored
        (whichever way the caller passes them)."""
        return model.vision_model(pixel_values=pixel_values).last_hidden_state

    def towers(self, config: Any, hf_dir: Path | None = None, monolith: bool = False, decoder: str = "torch") -> list[Tower]:
        self.check_config(config)
        vision, text = config.vision_config, config.text_config
        rows, heads = image_rows(config), text.num_attention_heads
        head_dim = text.hidden_size // heads
        kv = ("batch", heads, rows, head_dim)
        vision_tower = Tower(
            name=VISION,
            inputs=(TensorSpec(PIXEL_VALUES, ("batch", 3, vision.image_size, vision.image_size), "float32", "image"),),
            outputs=(TensorSpec(IMAGE_EMBEDS, ("batch", rows, vision.hidden_size)),),
            wrap=VisionEmbeds,
            num_heads=vision.num_attention_heads,
            hidden_size=vision.hidden_size,
            optimizer_model_type="clip",
            bench_sizes={"batch": 1},
            meta={"part": VISION, "quantize": {"fp16": "fp16", "int8": "int8-dynamic"}},
        )
        layers = text.num_hidden_layers
        cross_tower = Tower(
            name=CROSS,
            inputs=(TensorSpec(IMAGE_EMBEDS, ("batch", rows, vision.hidden_size), "float32", "image_features"),),
            outputs=tuple(TensorSpec(name, kv) for name in cross_names(layers)),
            wrap=CrossKeyValues,
            bench_sizes={"batch": 1},
            meta={"part": CROSS, "quantize": {"int8": "int8-dynamic"}},
        )
        cache = ("batch", heads, "past_sequence", head_dim)
        inputs = [
            TensorSpec(INPUT_IDS, ("batch", "sequence"), "int64", "input_ids"),
            TensorSpec(ATTENTION_MASK, ("batch", "total_sequence"), "int64", "decoder_attention_mask"),
            TensorSpec(POSITION_IDS, ("batch", "sequence"), "int64", "position_ids"),
            *(TensorSpec(name, kv, "float32", "image_features") for name in cross_names(layers)),
        ]
        outputs = [TensorSpec(LOGITS, ("batch", "sequence", text.vocab_size))]
        for i in range(layers):
            inputs += [
                TensorSpec(f"past_key_values.{i}.key", cache, "float32", "past_key"),
                TensorSpec(f"past_key_values.{i}.value", cache, "float32", "past_value"),
            ]
            outputs += [
                TensorSpec(f"present.{i}.key", ("batch", heads, "total_sequence", head_dim)),
                TensorSpec(f"present.{i}.value", ("batch", heads, "total_sequence", head_dim)),
            ]
        layout = {"num_layers": layers, "kv_heads": heads, "head_dim": head_dim, "hidden_size": text.hidden_size, "num_heads": heads,
                  "vocab_size": text.vocab_size, "max_positions": text.max_position_embeddings, "contract": CONCAT}  # fmt: skip
        decoder_tower = Tower(
            name=DECODER,
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            wrap=TextDecoderWithPast,
            vocab=TextVocab(**{**text_vocab(text).to_json(), "max_length": text.max_position_embeddings}),
            num_heads=heads,
            hidden_size=text.hidden_size,
            bench_sizes={"batch": 1, "sequence": 8, "past_sequence": 24},
            meta={
                "part": DECODER,
                "kv_cache": layout,
                "cross_cache": {"rows": rows},
                "similarity_gated": False,
                "quantize": {"int8": "int8-weights", "int4": "int4"},
            },
            derived_axes={"total_sequence": "past_sequence + sequence"},
        )
        return [vision_tower, cross_tower, decoder_tower]

    def tower_config(self, config: Any, tower: str) -> Any:
        return config.text_config if tower == DECODER else config

    def reference_generate(self, model: Any, kwargs: dict[str, Any]) -> Any:
        """`BlipForConditionalGeneration.generate` on the processor's ids (the column the prompt dropped put back: it
        drops it again) and no eos or pad of the caller's: it passes its config's [SEP] and [PAD] itself."""
        ids, mask = kwargs.pop("input_ids"), kwargs.pop("attention_mask")
        eos, pad = kwargs.pop("eos_token_id", None), kwargs.pop("pad_token_id", None)
        text = model.config.text_config
        if (eos not in (None, [text.sep_token_id], text.sep_token_id)) or (pad not in (None, text.pad_token_id)):
            raise VlmoptError(f"BLIP's generate ends on [SEP] ({text.sep_token_id}) and pads with {text.pad_token_id}; the request asked for {eos} and {pad}")
        column = torch.full((len(ids), 1), int(text.sep_token_id), dtype=ids.dtype)
        return model.generate(input_ids=torch.cat([ids, column], 1), attention_mask=torch.cat([mask, torch.ones_like(column)], 1), **kwargs)
