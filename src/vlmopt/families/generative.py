"""The generative contract: what a text-generating family declares, and everything the generation code reads from it.

A generative family is a `GenerativeFamily` whose class fills in a `GenerativeContract` (its parts and what
each takes and gives, the position scheme, the extra vision inputs, the cache layout, the onnxruntime-genai
model type) and overrides the few reference methods where its Hugging Face model differs from the common
layout (`model.model.get_image_features`, `model.model.language_model`, `model.lm_head`), as
onnxruntime-genai's builder gives each model a class that overrides a few methods and optimum's
`NormalizedConfig` reads any config under one name. The generation loop (`vlmopt.runners.generate`), its
verification (`vlmopt.verification.generation`), `genai_config.json` (`vlmopt.runners.genai`), the builder
(`vlmopt.genai_builder`) and `convert` read this declaration; they name no part and no Hugging Face attribute.

A decoder-only VLM whose language model is one of `KvCacheLayout`'s is then one family file: its vision part's
wrapper (`vision_wrapper`), the image tokens per image (`image_tokens_per_image`), its preprocessor's image-token
count (`VlmPreprocessor.expected_image_tokens`), a registration line and a demo model (`vlmopt.families.smolvlm`).

The embedding part merges the image rows inside its graph (`MergedEmbedding`): measured against transformers'
`masked_scatter` both ways give 0.0 difference with 0, 1 and 2 images, and both cost under 0.12 ms a call (noise
next to a 25 to 200 ms decoder step); only the inside merge is the contract onnxruntime-genai runs, so the same
parts run under it, under vlmopt's own loop and any ONNX runtime without host-side scatter code. The graph cannot
notice a wrong number of image rows (image tokens past the last row keep their token embedding, as a generated
image token must), so the preprocessor checks the count before anything runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmopt.errors import VlmoptError
from vlmopt.families.base import CONCAT, SHARED, Family, TensorSpec, TextVocab, Tower, image_input, text_vocab

#: the parts' names: also onnxruntime-genai's names for the sections of `genai_config.json`
VISION, EMBEDDING, DECODER = "vision", "embedding", "decoder"
#: the tensors that pass between the parts
PIXEL_VALUES, IMAGE_FEATURES, INPUT_IDS, INPUTS_EMBEDS, ATTENTION_MASK, POSITION_IDS, LOGITS = (
    "pixel_values",
    "image_features",
    "input_ids",
    "inputs_embeds",
    "attention_mask",
    "position_ids",
    "logits",
)
#: a decoder input per prompt position: 1 on image tokens, 0 elsewhere (Gemma 3: each image attends to itself both ways)
TOKEN_TYPE_IDS = "token_type_ids"
#: position schemes: one position per token (1-D, from the mask), or Qwen2-VL's three axes (temporal, height, width)
POSITIONS_1D, POSITIONS_MROPE = "1d", "mrope"
#: cache layouts: the decoder's self-attention only, or also a cross-attention cache over the image (encoder-decoder
#: captioners such as BLIP, whose text decoder attends to the image features at every step)
SELF_ATTENTION, SELF_AND_CROSS_ATTENTION = "self-attention", "self-and-cross-attention"


@dataclass(frozen=True)
class Part:
    """One ONNX graph of a generative model: its name, the tensors it takes and the tensors it gives."""

    name: str
    takes: tuple[str, ...]
    gives: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "takes": list(self.takes), "gives": list(self.gives)}


@dataclass(frozen=True)
class GenerativeContract:
    """What a generative family's parts are and how they are run.

    `vision_inputs`: what the vision part takes beside `pixel_values` (Qwen2.5-VL's `image_grid_thw`, a patch
    attention mask); the preprocessor puts them in `Prompt.vision_inputs` under these names.
    `decoder_inputs`: int64 inputs of the decoder beside its embeddings, one value per position ([batch, sequence]):
    the processor's values over the prompt, 0 for every generated token (Gemma 3's `token_type_ids`, which make each
    image's tokens attend to each other both ways at prefill, as transformers' generate passes them at its first step
    only); the preprocessor puts them in `Prompt.decoder_inputs` under these names.
    `reference_inputs`: what only transformers' reference takes (`generate`, and its image features where they are
    image-side) from the processor's output beside the ids, mask and vision inputs, and vlmopt's parts do not
    (Qwen2.5-VL's `mm_token_type_ids`, from which it finds the image runs for M-RoPE; LLaVA-NeXT's `image_sizes`);
    the preprocessor puts them in `Prompt.reference_inputs`, never in `Prompt.vision_inputs`.
    `positions`: POSITIONS_1D (the decoder's position_ids [batch, sequence] follow from the mask) or POSITIONS_MROPE
    (position_ids [3, batch, sequence]: the family computes the prompt's, `GenerativeFamily.prompt_positions`, and a
    decode step's are the mask's 1-D positions shifted by each row's offset at prefill, as transformers' rope_deltas).
    `genai_model_type`: the model type `genai_config.json` declares, None where onnxruntime-genai runs none of
    this family (vlmopt's loop is then its only ONNX generation backend).
    `vision` is None for a family that takes no images (a bare language model, `vlmopt.families.causal_lm`): its
    embedding part then takes `input_ids` alone."""

    vision: Part | None = Part(VISION, (PIXEL_VALUES,), (IMAGE_FEATURES,))
    embedding: Part = Part(EMBEDDING, (INPUT_IDS, IMAGE_FEATURES), (INPUTS_EMBEDS,))
    decoder: Part = Part(DECODER, (INPUTS_EMBEDS, ATTENTION_MASK, POSITION_IDS, "past_key_values.*"), (LOGITS, "present.*"))
    positions: str = POSITIONS_1D
    vision_inputs: tuple[str, ...] = ()
    decoder_inputs: tuple[str, ...] = ()
    reference_inputs: tuple[str, ...] = ()
    cache: str = SELF_ATTENTION
    genai_model_type: str | None = None

    @property
    def parts(self) -> tuple[Part, ...]:
        """The parts in the order they run: a family without a vision part (a bare language model) has two."""
        return tuple(part for part in (self.vision, self.embedding, self.decoder) if part is not None)

    @property
    def takes_images(self) -> bool:
        return self.vision is not None

    @property
    def part_names(self) -> tuple[str, ...]:
        return tuple(part.name for part in self.parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "parts": [part.to_json() for part in self.parts],
            "positions": self.positions,
            "vision_inputs": list(self.vision_inputs),
            "decoder_inputs": list(self.decoder_inputs),
            "reference_inputs": list(self.reference_inputs),
            "cache": self.cache,
            "genai_model_type": self.genai_model_type,
        }


@dataclass
class Prompt:
    """Token ids with the image tokens expanded, the attention mask (left padding), the pixels, the vision part's
    other inputs (`GenerativeContract.vision_inputs`) and the decoder's per-position ones over the prompt
    (`GenerativeContract.decoder_inputs`), the decoder's positions over the prompt where the contract's scheme needs more
    than the mask (M-RoPE: [3, batch, sequence], else None) and what only transformers' reference takes
    (`GenerativeContract.reference_inputs`): identical for every backend."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    pixel_values: np.ndarray | None
    text: list[str]
    num_images: int
    vision_inputs: dict[str, np.ndarray] = field(default_factory=dict)
    decoder_inputs: dict[str, np.ndarray] = field(default_factory=dict)
    position_ids: np.ndarray | None = None
    reference_inputs: dict[str, np.ndarray] = field(default_factory=dict)


class GenerativeFamily(Family):
    """A family whose parts generate text: the contract, the reference's Hugging Face paths, the towers and the preprocessor.

    A subclass declares `contract`, `language_models`, `vision_wrapper`, `image_tokens_per_image` and its
    `preprocessor_class`; it overrides a reference method only where its model is not laid out as transformers' LLaVA is."""

    contract: GenerativeContract = GenerativeContract()
    #: what turns prompts and images into a `Prompt` (a `VlmPreprocessor` subclass, made with the folder and the family)
    preprocessor_class: Any = None
    #: the vision part's torch wrapper, made from the loaded model: pixel_values -> image_features rows
    vision_wrapper: Any = None
    exporters = ("dynamo",)
    #: who can make the decoder part (`convert --decoder`), preferred first
    decoder_makers = ("builder", "torch")
    #: the language models whose decoder (and its cache) vlmopt's wrapper and verification cover
    language_models: tuple[str, ...] = ("llama", "mistral", "qwen2")
    #: image processor settings for the checks that compare parts (convert's vision and embedding parts at two
    #: shapes; a quantized variant's greedy pairs against its fp32 parent), where the processor's own make them
    #: needlessly costly; convert's generation checks against transformers keep the processor's settings
    part_check_image_processor: dict[str, Any] = {}

    # -- the reference (transformers' model), read by verification, the builder and the wrappers -----------
    def text_config(self, config: Any) -> Any:
        """The language model's config inside the checkpoint's."""
        return config.text_config

    def language_model(self, model: Any) -> Any:
        """The decoder stack (no head): called with inputs_embeds, a mask, positions and a cache."""
        return model.model.language_model

    def lm_head(self, model: Any) -> Any:
        return model.lm_head

    def input_embeddings(self, model: Any) -> Any:
        return model.get_input_embeddings()

    def image_features(self, model: Any, pixel_values: Any, vision_inputs: dict[str, Any], reference_inputs: dict[str, Any]) -> Any:
        """transformers' own image features for `pixel_values` (torch tensors, as the prompt holds them, by the
        contract's vision and reference input names), as the vision part gives them: rows [tokens, hidden]."""
        import torch

        found = model.model.get_image_features(pixel_values=pixel_values, **vision_inputs)
        rows = found.pooler_output if hasattr(found, "pooler_output") else found
        return torch.cat(list(rows), 0) if isinstance(rows, tuple | list) else rows.reshape(-1, rows.shape[-1])

    def reference_generate(self, model: Any, kwargs: dict[str, Any]) -> Any:
        """transformers' `generate` on the prompt's torch inputs (a family whose model's generate takes them otherwise overrides it)."""
        return model.generate(**kwargs)

    def generate_inputs(self, pixel_values: Any, vision_inputs: dict[str, Any]) -> dict[str, Any]:
        """What transformers' `generate` takes for the vision part's inputs (torch tensors, as the prompt holds them);
        the contract's reference inputs go to `generate` as they are, beside these."""
        return {PIXEL_VALUES: pixel_values, **vision_inputs}

    def prompt_positions(
        self, config: Any, encoded: Any, input_ids: np.ndarray, attention_mask: np.ndarray, vision_inputs: dict[str, np.ndarray]
    ) -> np.ndarray | None:
        """The decoder's position_ids over the prompt where the contract's position scheme needs more than the mask
        (POSITIONS_MROPE: [3, batch, sequence], from the reference's own code); None: 1-D, from the mask."""
        return None

    def genai_entries(self, config: Any) -> dict[str, dict[str, Any]]:
        """What `genai_config.json` declares beside the parts' files and tensors for this checkpoint: entries of the
        "model" section and of each part's section (by part name), as onnxruntime-genai's model type reads them."""
        return {}

    # -- the towers --------------------------------------------------------------------------------------------
    def check_config(self, config: Any) -> None:
        text = self.text_config(config)
        text_type = getattr(text, "model_type", None)
        if text_type not in self.language_models:
            raise VlmoptError(f"language model '{text_type}' is not supported by {self.name}; supported: {', '.join(self.language_models)}")
        token = self.image_token(config)
        if not 0 <= token < text.vocab_size:
            raise VlmoptError(
                f"the config's image token id {token} is outside its text model's vocabulary of {text.vocab_size}; the vision and text configs disagree"
            )

    def image_token(self, config: Any) -> int:
        """The id of the placeholder token the image rows replace."""
        return int(config.image_token_id)

    def vision_tower(self, config: Any) -> Tower:
        """The vision part's tower: pixel_values [num_images, C, H, W] -> image_features [num_images * tokens per image, hidden]
        through `vision_wrapper`. A family whose vision part takes more (`contract.vision_inputs`) overrides it."""
        vision, per_image = config.vision_config, self.image_tokens_per_image(config)
        return Tower(
            name=self.contract.vision.name,
            inputs=(image_input(vision, "num_images"),),
            outputs=(TensorSpec(IMAGE_FEATURES, ("num_image_tokens", self.text_config(config).hidden_size)),),
            wrap=self.vision_wrapper,
            num_heads=vision.num_attention_heads,
            hidden_size=vision.hidden_size,
            optimizer_model_type="clip",
            bench_sizes={"num_images": 1},
            meta={"part": self.contract.vision.name, "image_seq_length": per_image, "quantize": {"fp16": "fp16", "int8": "int8-dynamic"}},
            derived_axes={"num_image_tokens": f"num_images * {per_image}"},
        )

    def image_tokens_per_image(self, config: Any) -> int:
        """Image rows per image (or per tile, for families that split images): what dummy inputs put in the prompt."""
        raise NotImplementedError

    def towers(self, config: Any, hf_dir: Path | None = None, monolith: bool = False, decoder: str = "torch") -> list[Tower]:
        """The three parts; `decoder` says who makes the decoder: "torch" (exported, CONCAT cache) or "builder"
        (onnxruntime-genai's model builder, `vlmopt.genai_builder`: GroupQueryAttention, SHARED cache)."""
        self.check_config(config)
        return [self.vision_tower(config), self.embedding_tower(config), self.decoder_tower(config, decoder)]

    def embedding_tower(self, config: Any) -> Tower:
        from vlmopt.families.decoder import MergedEmbedding

        text = self.text_config(config)
        token, per_image = self.image_token(config), self.image_tokens_per_image(config)
        vocab = TextVocab(**{**text_vocab(text).to_json(), "image_token_id": token, "image_seq_length": per_image})
        hidden = text.hidden_size
        return Tower(
            name=self.contract.embedding.name,
            inputs=(
                TensorSpec(INPUT_IDS, ("batch", "sequence"), "int64", "image_input_ids"),
                TensorSpec(IMAGE_FEATURES, ("num_image_tokens", hidden), "float32", "image_features"),
            ),
            outputs=(TensorSpec(INPUTS_EMBEDS, ("batch", "sequence", hidden)),),
            wrap=lambda model: MergedEmbedding(self.input_embeddings(model), token),
            vocab=vocab,
            bench_sizes={"batch": 1, "num_images": 1, "sequence": per_image + 32},
            meta={
                "part": self.contract.embedding.name,
                "merge": "inside",
                "similarity_gated": False,
                "quantize": {"int8": "gather-int8", "int4": "gather-int4"},
            },
            derived_axes={"num_image_tokens": f"num_images * {per_image}"},
        )

    def decoder_tower(self, config: Any, maker: str) -> Tower:
        from vlmopt.families.decoder import KvCacheLayout

        text = self.text_config(config)
        # the contract's per-position inputs: their dummy values are 0 (the token_type_ids role), as on a decode step
        extra = tuple(TensorSpec(name, ("batch", "sequence"), "int64", "token_type_ids") for name in self.contract.decoder_inputs)
        return KvCacheLayout.of(text).tower(
            lambda model: self.decoder_module(model, maker),
            text,
            meta={
                "part": self.contract.decoder.name,
                "language_model": text.model_type,
                "maker": maker,
                "similarity_gated": False,
                "quantize": {"int8": "int8-weights", "int4": "int4"},
            },
            contract=SHARED if maker == "builder" else CONCAT,
            extra=extra,
            position_axes=3 if self.contract.positions == POSITIONS_MROPE else None,
        )

    def decoder_module(self, model: Any, maker: str) -> Any:
        """The torch module the decoder tower wraps (`CausalLmWithPast`); a family whose decoder takes more than
        embeddings, mask, positions and pasts (`contract.decoder_inputs`) returns its own."""
        from vlmopt.families.decoder import CausalLmWithPast

        return CausalLmWithPast(self.language_model(model), self.lm_head(model), self.text_config(model.config), takes_positions=maker == "torch")

    def tower_config(self, config: Any, tower: str) -> Any:
        return self.text_config(config) if tower == self.contract.decoder.name else config

    def preprocessor(self, folder: Path) -> VlmPreprocessor:
        return self.preprocessor_class(folder, self)


class VlmPreprocessor:
    """The checkpoint's own processor (chat template, image-token expansion, image preprocessing), run once before any
    backend. A family's subclass says how many image tokens its images take (`expected_image_tokens`)."""

    #: the marker a user writes where an image goes, where the processor names none
    default_image_token = "<image>"
    #: the processor takes a batch's images as one list per prompt
    nested_images = False

    def __init__(self, folder: Path, family: GenerativeFamily):
        from transformers import AutoConfig

        self.family = family
        try:
            self.processor = self.load_processor(folder)
            config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise VlmoptError(f"cannot load the processor saved in {folder}: {(str(exc).splitlines() or [''])[0][:200]}") from exc
        if not hasattr(self.processor, "image_processor") or not hasattr(self.processor, "tokenizer"):
            raise VlmoptError(f"{folder} has no image processor and tokenizer (a {family.name} processor); export the checkpoint with its processor")
        self.config = config
        self.tokenizer = self.processor.tokenizer
        self.image_token = getattr(self.processor, "image_token", None) or self.default_image_token
        self.image_token_id = family.image_token(config)
        #: image tokens per image (per tile, for families that split images)
        self.image_seq_length = family.image_tokens_per_image(config)
        text = family.text_config(config)
        self.max_positions = int(text.max_position_embeddings)
        self.eos_token_ids = _token_ids(getattr(text, "eos_token_id", None)) or _token_ids(self.tokenizer.eos_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)

    def load_processor(self, folder: Path) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(str(folder), local_files_only=True)

    @property
    def contract(self) -> GenerativeContract:
        return self.family.contract

    @contextmanager
    def image_processor_settings(self, settings: dict[str, Any]) -> Iterator[None]:
        """The image processor with `settings` (its attributes) inside the block, its own again after it (none to set:
        nothing touched, so a bare language model's tokenizer-only processor passes through)."""
        if not settings:
            yield
            return
        image_processor = self.processor.image_processor
        saved = {name: getattr(image_processor, name) for name in settings}
        try:
            for name, value in settings.items():
                setattr(image_processor, name, value)
            yield
        finally:
            for name, value in saved.items():
                setattr(image_processor, name, value)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None))

    def render(self, prompt: str, num_images: int, chat: bool = True) -> str:
        """The prompt as the model reads it: the chat template applied (one image part per image, where the
        prompt's image markers say or else first), or the raw text, whose image markers must match the images."""
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

    def image_inputs(self, encoded: Any) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """The image side's inputs from the processor's output: pixels as the vision part takes them, and the
        contract's other vision inputs (and any image-side reference inputs) by name."""
        pixels = encoded.get(PIXEL_VALUES)
        extra = {name: np.asarray(encoded[name]) for name in self.contract.vision_inputs if encoded.get(name) is not None}
        return (None if pixels is None else np.asarray(pixels).astype(np.float32)), extra

    def images(self, images: list[Any]) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Images alone through the image processor (no text): pixels, the vision part's other inputs and the
        reference's image-side inputs."""
        pixels, extra = self.image_inputs(self.processor.image_processor(images, return_tensors="np"))
        assert pixels is not None
        return (pixels, *self.split_inputs(extra))

    def split_inputs(self, found: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """`found` by the contract: what the vision part takes, and what only the reference takes."""
        vision = {name: found[name] for name in self.contract.vision_inputs if name in found}
        reference = {name: found[name] for name in self.contract.reference_inputs if name in found}
        return vision, reference

    def expected_image_tokens(self, num_images: int, pixel_values: np.ndarray | None, vision_inputs: dict[str, np.ndarray]) -> int:
        """How many image tokens the prompt must hold for these images (the rows the vision part gives)."""
        raise NotImplementedError

    def image_token_mismatch(self, found: int, num_images: int, expected: int) -> str:
        return f"the prompt holds {found} image tokens where {num_images} image(s) take {expected}; write {self.image_token} once per image and no image tokens otherwise"

    def __call__(self, prompts: list[str] | str, images: list[Any] | None = None, chat: bool = True, images_per_prompt: list[int] | None = None) -> Prompt:
        """Ids, mask (left padding), pixels and other vision inputs for one prompt (or a batch: `images_per_prompt`
        says how the images split)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        images = list(images or [])
        counts = images_per_prompt or ([len(images)] if len(prompts) == 1 else [len(images) // len(prompts)] * len(prompts))
        texts = [self.render(p, n, chat) for p, n in zip(prompts, counts, strict=True)]
        encoded = self.processor(
            images=self._nested(images, counts) if images else None, text=texts, return_tensors="np", padding=True, padding_side="left", **self.call_options()
        )
        ids = encoded[INPUT_IDS].astype(np.int64)
        pixels, image_side = self.image_inputs(encoded) if images else (None, {})
        extra, image_reference = self.split_inputs(image_side)
        found = int((ids == self.image_token_id).sum())
        expected = self.expected_image_tokens(len(images), pixels, extra) if images else 0
        if found != expected:
            raise VlmoptError(self.image_token_mismatch(found, len(images), expected))
        mask = encoded[ATTENTION_MASK].astype(np.int64)
        positions = self.family.prompt_positions(self.config, encoded, ids, mask, extra) if self.contract.positions == POSITIONS_MROPE else None
        reference = {name: np.asarray(encoded[name]) for name in self.contract.reference_inputs if encoded.get(name) is not None}
        reference.update(image_reference)
        return Prompt(ids, mask, pixels, texts, len(images), extra, self.decoder_inputs(encoded, ids), positions, reference)

    def decoder_inputs(self, encoded: Any, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        """The contract's per-position decoder inputs over the prompt, from the processor's output."""
        found = {}
        for name in self.contract.decoder_inputs:
            value = encoded.get(name)
            if value is None or np.shape(value) != input_ids.shape:
                raise VlmoptError(
                    f"the {self.family.name} processor gave no {name} for the prompt; its decoder needs them (re-export the checkpoint with its own processor)"
                )
            found[name] = np.asarray(value).astype(np.int64)
        return found

    def call_options(self) -> dict[str, Any]:
        """Options the processor call needs beside the text and images (a family's processor may default an option
        over the one its checkpoint saved)."""
        return {}

    def _nested(self, images: list[Any], counts: list[int]) -> list[Any]:
        """The images as the processor takes them for a batch of prompts: a flat list (LLaVA's), or one list per
        prompt where `nested_images` says so (Idefics3's, Gemma 3's)."""
        if not self.nested_images:
            return images
        nested, start = [], 0
        for count in counts:
            nested.append(images[start : start + count])
            start += count
        return nested

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
