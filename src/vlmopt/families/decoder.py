"""The torch wrappers of a generative model's embedding and decoder parts. Decoders with a KV cache: the interface generated from a text config, and the wrapper that exports one merged graph.

What Optimum's `OnnxConfigWithPast` does for its exporters, in vlmopt's vocabulary: `KvCacheLayout` holds
the few sizes that decide a decoder's interface (layers, key/value heads, head size, hidden size, vocabulary,
positions) and generates from them the `past_key_values.{i}.key/value` inputs, the `present.{i}.key/value`
outputs, the mask and position inputs with their roles, and the derived axis
`total_sequence = past_sequence + sequence`. A family only says where its language model and head are.

One graph serves prefill (an empty past, `past_sequence` 0) and decode: `CausalLmWithPast` builds a cache from
the flat past tensors and hands the language model a ready 4-D additive mask. transformers passes a prepared
4-D mask through unchanged, so none of its data-dependent mask shortcuts (SDPA's "no mask, is_causal" skip
bakes in "no padding"; packed-sequence detection from position_ids) end up in the traced graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmopt.families.base import CONCAT, TensorSpec, TextVocab, Tower, text_vocab

PAST_KEY, PAST_VALUE = "past_key_values.{i}.key", "past_key_values.{i}.value"
PRESENT_KEY, PRESENT_VALUE = "present.{i}.key", "present.{i}.value"
TOTAL_SEQUENCE = "past_sequence + sequence"


@dataclass(frozen=True)
class KvCacheLayout:
    """The sizes that decide a KV-cache decoder's interface, read from a (text) config."""

    num_layers: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    num_heads: int
    vocab_size: int
    max_positions: int

    @classmethod
    def of(cls, config: Any) -> KvCacheLayout:
        heads = config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            hidden_size=config.hidden_size,
            num_heads=heads,
            vocab_size=config.vocab_size,
            max_positions=config.max_position_embeddings,
        )

    def past_names(self) -> list[str]:
        return [name.format(i=i) for i in range(self.num_layers) for name in (PAST_KEY, PAST_VALUE)]

    def present_names(self) -> list[str]:
        return [name.format(i=i) for i in range(self.num_layers) for name in (PRESENT_KEY, PRESENT_VALUE)]

    def inputs(self, position_ids: bool = True, extra: tuple[TensorSpec, ...] = (), position_axes: int | None = None) -> tuple[TensorSpec, ...]:
        """The decoder's inputs; `extra` (a family's per-position inputs, `GenerativeContract.decoder_inputs`) go
        after the positions and before the pasts. `position_axes`: position_ids [axes, batch, sequence] (M-RoPE's 3)."""
        specs = [
            TensorSpec("inputs_embeds", ("batch", "sequence", self.hidden_size), "float32", "inputs_embeds"),
            TensorSpec("attention_mask", ("batch", "total_sequence"), "int64", "decoder_attention_mask"),
        ]
        if position_ids and position_axes:
            specs.append(TensorSpec("position_ids", (position_axes, "batch", "sequence"), "int64", "position_ids"))
        elif position_ids:
            specs.append(TensorSpec("position_ids", ("batch", "sequence"), "int64", "position_ids"))
        specs += extra
        cache = ("batch", self.kv_heads, "past_sequence", self.head_dim)
        for i in range(self.num_layers):
            specs += [TensorSpec(PAST_KEY.format(i=i), cache, "float32", "past_key"), TensorSpec(PAST_VALUE.format(i=i), cache, "float32", "past_value")]
        return tuple(specs)

    def outputs(self) -> tuple[TensorSpec, ...]:
        specs = [TensorSpec("logits", ("batch", "sequence", self.vocab_size))]
        cache = ("batch", self.kv_heads, "total_sequence", self.head_dim)
        for i in range(self.num_layers):
            specs += [TensorSpec(PRESENT_KEY.format(i=i), cache), TensorSpec(PRESENT_VALUE.format(i=i), cache)]
        return tuple(specs)

    def tower(
        self,
        wrap: Any,
        config: Any,
        meta: dict[str, Any] | None = None,
        contract: str = CONCAT,
        extra: tuple[TensorSpec, ...] = (),
        position_axes: int | None = None,
    ) -> Tower:
        """The `decoder` tower: inputs_embeds + mask (+ positions) + past -> logits + present, in `contract`:
        CONCAT (a graph exported from PyTorch: position_ids, present = past + new) or SHARED (GroupQueryAttention,
        as onnxruntime-genai's builder makes it: rotary positions inside the operator, one past/present buffer)."""
        vocab = text_vocab(config)
        return Tower(
            name="decoder",
            inputs=self.inputs(position_ids=contract == CONCAT, extra=extra, position_axes=position_axes),
            outputs=self.outputs(),
            wrap=wrap,
            vocab=TextVocab(**{**vocab.to_json(), "max_length": self.max_positions}),
            num_heads=self.num_heads,
            hidden_size=self.hidden_size,
            bench_sizes={"batch": 1, "sequence": 32, "past_sequence": 96},
            meta={"kv_cache": {**self.to_json(), "contract": contract}, **(meta or {})},
            derived_axes={"total_sequence": TOTAL_SEQUENCE},
        )

    def to_json(self) -> dict[str, int]:
        return dict(self.__dict__)


def additive_mask(attention_mask: Any, query_length: Any, past_length: Any, dtype: Any) -> Any:
    """[batch, 1, query, past + query]: 0 where a query position may attend (causal and not padding), dtype-min elsewhere."""
    import torch

    total = attention_mask.shape[1]
    query_positions = torch.arange(query_length, device=attention_mask.device) + past_length
    key_positions = torch.arange(total, device=attention_mask.device)
    causal = (key_positions.unsqueeze(0) <= query_positions.unsqueeze(1)).unsqueeze(0).unsqueeze(0)
    allowed = causal & attention_mask.bool().unsqueeze(1).unsqueeze(2)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device))


class CausalLmWithPast(nn.Module):
    """(inputs_embeds, attention_mask, [position_ids,] *past) -> (logits, *present), with a DynamicCache inside.

    `language_model` is the decoder stack (no head), `lm_head` the projection to the vocabulary. Without
    `takes_positions` (the SHARED contract's interface) positions follow from the mask, as GroupQueryAttention
    derives them: the reference for a builder's decoder on unpadded rows."""

    def __init__(self, language_model: Any, lm_head: Any, text_config: Any, takes_positions: bool = True):
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head
        self.text_config = text_config
        self.num_layers = text_config.num_hidden_layers
        self.takes_positions = takes_positions

    def forward(self, inputs_embeds: Any, attention_mask: Any, *rest: Any) -> tuple[Any, ...]:
        import torch
        from transformers import DynamicCache

        if self.takes_positions:
            position_ids, past = rest[0], rest[1:]
        else:
            past = rest
            position_ids = (torch.cumsum(attention_mask, 1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1] :]
        cache = DynamicCache(config=self.text_config)
        mask = additive_mask(attention_mask, inputs_embeds.shape[1], past[0].shape[2], inputs_embeds.dtype)
        return self.run(inputs_embeds, mask, position_ids, cache, past)

    def run(self, inputs_embeds: Any, mask: Any, position_ids: Any, cache: Any, past: tuple[Any, ...]) -> tuple[Any, ...]:
        """The language model and head on a ready mask (a 4-D additive mask, or one per layer type) with `cache`
        filled from the flat pasts; (logits, *present)."""
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids, past_key_values=cache, use_cache=True)
        present: list[Any] = []
        for layer in cache.layers:
            present += [layer.keys, layer.values]
        return (self.lm_head(out.last_hidden_state), *present)


class MergedEmbedding(nn.Module):
    """input_ids + image_features -> inputs_embeds, image rows written in order at the image-token positions.

    Takes 0 image rows too (decode steps, text-only prompts): a zero row is appended so the gather always
    reads something, and positions that are not image tokens keep their token embedding, as do image tokens past
    the last row (an image token the model generated: transformers embeds it as a token)."""

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
        has_row = flat & (index < count)
        index = torch.where(has_row, index, torch.full_like(index, count))
        rows = torch.cat([image_features.to(embeds.dtype), image_features.new_zeros((1, image_features.shape[1]))], dim=0)
        return torch.where(has_row.reshape(is_image.shape).unsqueeze(-1), rows[index].reshape(embeds.shape), embeds)
