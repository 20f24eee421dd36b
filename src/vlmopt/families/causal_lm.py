"""Bare causal language models (`AutoModelForCausalLM`: Llama, Mistral, Qwen2, Gemma 3 text) as two parts with a KV cache.

  embedding  input_ids [batch, sequence] -> inputs_embeds [batch, sequence, hidden] (the token table; Gemma's scaled)
  decoder    inputs_embeds, attention_mask, position_ids, past_key_values.{i}.key/value
             -> logits, present.{i}.key/value: the same decoder part a VLM's language model makes (`KvCacheLayout`)

The generative contract (`vlmopt.families.generative`) with no vision part: the generation loop, its verification,
`convert` (either decoder maker), `quantize --part decoder=...`, `generate` (a prompt, no image) and `bench` read it
as they read a VLM's, so a plain language model takes the same path as LLaVA's decoder, and is compared on the same
prompts with runtimes that take only text models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmopt.errors import VlmoptError
from vlmopt.families.base import TensorSpec, Tower, text_vocab
from vlmopt.families.gemma3 import SLIDING, Gemma3LmWithPast
from vlmopt.families.generative import (
    ATTENTION_MASK,
    EMBEDDING,
    INPUT_IDS,
    INPUTS_EMBEDS,
    GenerativeContract,
    GenerativeFamily,
    Part,
    Prompt,
    VlmPreprocessor,
)


class TokenEmbedding(nn.Module):
    """input_ids -> inputs_embeds through the model's own input embeddings (Gemma's scale included)."""

    def __init__(self, embed_tokens: nn.Module):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class SlidingLmWithPast(Gemma3LmWithPast):
    """A text model with sliding-window layers beside global ones (Gemma 3 text): one mask per layer type, the
    sliding one limited to the window, and no image blocks (every position is text)."""

    def forward(self, inputs_embeds: Any, attention_mask: Any, position_ids: Any, *past: Any) -> tuple[Any, ...]:
        text = torch.zeros(inputs_embeds.shape[:2], dtype=torch.int64, device=inputs_embeds.device)
        return super().forward(inputs_embeds, attention_mask, position_ids, text, *past)


def _sliding_layers(config: Any) -> bool:
    return SLIDING in (getattr(config, "layer_types", None) or ())


class CausalLmFamily(GenerativeFamily):
    name = "causal-lm"
    model_types = ("llama", "mistral", "qwen2", "gemma3_text")
    summary = "Causal language model (llama, mistral, qwen2, gemma3_text): embedding -> inputs_embeds, decoder with KV cache -> logits"
    contract = GenerativeContract(vision=None, embedding=Part(EMBEDDING, (INPUT_IDS,), (INPUTS_EMBEDS,)))
    language_models = model_types
    #: as LLaVA's decoder: fp32 logits of a real 30-layer model (SmolLM2) reach |33|, where fp32 itself is the noise
    atol = 5e-3

    def model_class(self, config: Any) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    # -- the reference: the model is its own language model ---------------------------------------------------
    def text_config(self, config: Any) -> Any:
        return config

    def language_model(self, model: Any) -> Any:
        return model.get_decoder()

    def lm_head(self, model: Any) -> Any:
        return model.get_output_embeddings()

    def image_token(self, config: Any) -> int:
        raise VlmoptError(f"a {self.name} model takes no images")

    def check_config(self, config: Any) -> None:
        model_type = getattr(config, "model_type", None)
        if model_type not in self.language_models:
            raise VlmoptError(f"language model '{model_type}' is not supported by {self.name}; supported: {', '.join(self.language_models)}")
        if getattr(config, "use_bidirectional_attention", False):
            raise VlmoptError(f"this {model_type} checkpoint attends both ways (use_bidirectional_attention): an encoder, not a text generator")
        window = getattr(config, "sliding_window", None)
        uses_window = getattr(config, "use_sliding_window", True) and window is not None
        # only Gemma 3's per-layer-type masks are written here; a window over every layer (Mistral v0.1, Qwen2 with
        # use_sliding_window) would be silently ignored by the 4-D mask the decoder part hands the model
        if uses_window and not _sliding_layers(config) and int(window) < int(config.max_position_embeddings):
            raise VlmoptError(
                f"this {model_type} checkpoint attends through a sliding window of {window} positions on every layer, which vlmopt's decoder part "
                f"does not reproduce; set sliding_window to null in its config.json where it never reads past {window} positions"
            )

    # -- the parts ----------------------------------------------------------------------------------------------
    def towers(self, config: Any, hf_dir: Path | None = None, monolith: bool = False, decoder: str = "torch") -> list[Tower]:
        self.check_config(config)
        return [self.embedding_tower(config), self.decoder_tower(config, decoder)]

    def embedding_tower(self, config: Any) -> Tower:
        hidden = config.hidden_size
        return Tower(
            name=self.contract.embedding.name,
            inputs=(TensorSpec(INPUT_IDS, ("batch", "sequence"), "int64", "input_ids"),),
            outputs=(TensorSpec(INPUTS_EMBEDS, ("batch", "sequence", hidden)),),
            wrap=lambda model: TokenEmbedding(self.input_embeddings(model)),
            vocab=text_vocab(config),
            bench_sizes={"batch": 1, "sequence": 32},
            meta={"part": self.contract.embedding.name, "similarity_gated": False, "quantize": {"int8": "gather-int8", "int4": "gather-int4"}},
        )

    def decoder_module(self, model: Any, maker: str) -> Any:
        if _sliding_layers(model.config):
            return SlidingLmWithPast(self.language_model(model), self.lm_head(model), model.config)
        return super().decoder_module(model, maker)

    def preprocessor(self, folder: Path) -> TextPreprocessor:
        return TextPreprocessor(folder, self)


class TextPreprocessor(VlmPreprocessor):
    """The checkpoint's own tokenizer and chat template: prompts to ids and a left-padded mask; no images."""

    def __init__(self, folder: Path, family: CausalLmFamily | None = None):
        from transformers import AutoConfig

        self.family = family = family or CausalLmFamily()
        try:
            self.processor = self.load_processor(folder)
            config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise VlmoptError(f"cannot load the tokenizer saved in {folder}: {(str(exc).splitlines() or [''])[0][:200]}") from exc
        self.config = config
        self.tokenizer = self.processor
        self.image_token = None
        self.image_token_id = None
        self.image_seq_length = 0
        self.max_positions = int(config.max_position_embeddings)
        self.eos_token_ids = _ids(getattr(config, "eos_token_id", None)) or _ids(self.tokenizer.eos_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)
        if pad is None:
            self.tokenizer.pad_token_id = self.pad_token_id  # batches are padded (left) with it; this copy only

    def load_processor(self, folder: Path) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)

    def render(self, prompt: str, num_images: int, chat: bool = True) -> str:
        if num_images:
            raise VlmoptError(f"a {self.family.name} model ({self.config.model_type}) takes no images; drop --image")
        if not chat:
            return prompt
        if not self.has_chat_template:
            raise VlmoptError("this model has no chat template; pass --raw-prompt with the prompt exactly as the model expects it")
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)

    def images(self, images: list[Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        raise VlmoptError(f"a {self.family.name} model takes no images")

    def __call__(self, prompts: list[str] | str, images: list[Any] | None = None, chat: bool = True, images_per_prompt: list[int] | None = None) -> Prompt:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        texts = [self.render(p, len(images or []), chat) for p in prompts]
        # a rendered chat template already holds the model's special tokens (as apply_chat_template(tokenize=True) adds none)
        encoded = self.tokenizer(texts, return_tensors="np", padding=True, padding_side="left", add_special_tokens=not chat)
        return Prompt(encoded[INPUT_IDS].astype(np.int64), encoded[ATTENTION_MASK].astype(np.int64), None, texts, 0)

    def save(self, folder: Path) -> list[str]:
        before = {p.name for p in folder.iterdir()}
        self.tokenizer.save_pretrained(str(folder))
        return sorted(p.name for p in folder.iterdir() if p.name not in before)


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]
