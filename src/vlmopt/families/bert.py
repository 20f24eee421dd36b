"""BERT-style text encoders exported as sentence-embedding models.

The pooling is the checkpoint's own: a sentence-transformers checkpoint declares it in
`modules.json` and its Pooling module's `config.json` (and whether embeddings are normalized);
a plain checkpoint gets mean pooling over the attention mask, the common default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmopt.errors import VlmoptError
from vlmopt.families.base import Family, PruneLayout, TensorSpec, Tower, text_vocab

POOLING_MODES = ("mean", "cls", "max", "lasttoken")
_POOLING_KEYS = (
    ("pooling_mode_cls_token", "cls"),
    ("pooling_mode_max_tokens", "max"),
    ("pooling_mode_lasttoken", "lasttoken"),
    ("pooling_mode_mean_tokens", "mean"),
)
#: files a sentence-transformers checkpoint keeps beside the Hugging Face ones
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


class SentenceEmbedding(nn.Module):
    def __init__(self, model: nn.Module, pooling: str, normalize: bool, token_type_ids: bool):
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.normalize = normalize
        self.token_type_ids = token_type_ids

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None):
        kwargs = {"token_type_ids": token_type_ids} if self.token_type_ids else {}
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "max":
            pooled = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
        elif self.pooling == "lasttoken":
            last = attention_mask.sum(dim=1) - 1
            pooled = hidden[torch.arange(hidden.shape[0]), last]
        else:
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled


def _pooling_mode(config: dict[str, Any]) -> str:
    for key, mode in _POOLING_KEYS:
        if config.get(key):
            return mode
    enabled = sorted(k for k, v in config.items() if k.startswith("pooling_mode") and v)
    raise VlmoptError(f"unsupported sentence-transformers pooling {enabled}; supported: {', '.join(POOLING_MODES)}")


def sentence_transformers_pooling(hf_dir: Path | None) -> tuple[str, bool, str]:
    """(pooling mode, normalize, where it came from) for the checkpoint in `hf_dir`."""
    modules_file = hf_dir / "modules.json" if hf_dir else None
    if modules_file is None or not modules_file.is_file():
        return "mean", False, "default (no sentence-transformers modules.json)"
    try:
        modules = json.loads(modules_file.read_text())
        pooling, normalize = "mean", False
        for module in modules:
            kind = module.get("type", "")
            if kind.endswith("Pooling"):
                config = json.loads((hf_dir / module["path"] / "config.json").read_text())
                pooling = _pooling_mode(config)
            elif kind.endswith("Normalize"):
                normalize = True
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VlmoptError(f"cannot read the sentence-transformers pooling config in {hf_dir}: {exc}") from exc
    return pooling, normalize, "sentence-transformers modules.json"


class SentenceEncoderFamily(Family):
    """A text encoder exported as a sentence-embedding model (its checkpoint's pooling). Subclasses declare."""

    #: model types and whether their forward takes token_type_ids
    token_types: dict[str, bool] = {}
    #: model types whose position ids start after the padding index (RoBERTa-style), so fewer positions are usable
    offset_positions: tuple[str, ...] = ()
    #: ONNX Runtime optimizer model type (its attention fusion matches BERT's blocks)
    optimizer_model_type: str = "bert"
    #: config.json keys the tower is sized from
    config_fields: tuple[str, ...] = ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "max_position_embeddings")
    atol = 2e-4

    def required_fields(self, config: Any) -> tuple[str, ...]:
        return self.config_fields

    def takes_token_types(self, config: Any) -> bool:
        return self.token_types[config.model_type]

    def towers(self, config: Any, hf_dir: Path | None = None, monolith: bool = False, decoder: str = "torch") -> list[Tower]:
        pooling, normalize, source = sentence_transformers_pooling(hf_dir)
        with_token_types = self.takes_token_types(config)
        inputs = [
            TensorSpec("input_ids", ("batch", "sequence"), "int64", "input_ids"),
            TensorSpec("attention_mask", ("batch", "sequence"), "int64", "attention_mask"),
        ]
        if with_token_types:
            inputs.append(TensorSpec("token_type_ids", ("batch", "sequence"), "int64", "token_type_ids"))
        vocab = text_vocab(config)
        offset = (config.pad_token_id or 0) + 1 if config.model_type in self.offset_positions else 0
        vocab = type(vocab)(**{**vocab.to_json(), "max_length": config.max_position_embeddings - offset})
        return [
            Tower(
                name="text",
                inputs=tuple(inputs),
                outputs=(TensorSpec("sentence_embedding", ("batch", config.hidden_size)),),
                wrap=lambda model: SentenceEmbedding(model, pooling, normalize, with_token_types),
                vocab=vocab,
                num_heads=config.num_attention_heads,
                hidden_size=config.hidden_size,
                optimizer_model_type=self.optimizer_model_type,
                bench_sizes={"sequence": min(128, vocab.max_length)},
                meta={"pooling": pooling, "normalize": normalize, "pooling_source": source},
            )
        ]


class BertStyleFamily(SentenceEncoderFamily):
    name = "bert"
    token_types = {"bert": True, "roberta": False, "xlm-roberta": False, "distilbert": False, "mpnet": False, "electra": True}
    model_types = tuple(token_types)
    offset_positions = ("roberta", "xlm-roberta", "mpnet")
    summary = "BERT-style text encoders (bert, roberta, xlm-roberta, distilbert, mpnet, electra): text tower -> sentence_embedding"
    #: BERT's block layout (bert, roberta, xlm-roberta, electra); distilbert and mpnet name theirs differently
    prune_layout = PruneLayout(
        mlp=("intermediate.dense", "output.dense"), attention=("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
    )

    def required_fields(self, config: Any) -> tuple[str, ...]:
        # DistilBERT's config.json names them its own way (transformers maps them)
        return ("vocab_size", "dim", "n_heads", "n_layers", "max_position_embeddings") if config.model_type == "distilbert" else self.config_fields

    def pruning(self, config: Any) -> PruneLayout | None:
        return self.prune_layout if config.model_type in ("bert", "roberta", "xlm-roberta", "electra") else None


class DebertaV2Family(SentenceEncoderFamily):
    name = "deberta-v2"
    model_types = ("deberta-v2",)
    summary = "DeBERTa-v2/v3 text encoders (disentangled relative-position attention): text tower -> sentence_embedding"
    # DeBERTa's attention adds content-to-position and position-to-content scores: no ORT fusion matches it

    def takes_token_types(self, config: Any) -> bool:
        return bool(getattr(config, "type_vocab_size", 0))  # v3 checkpoints have no token type embeddings


class ModernBertFamily(SentenceEncoderFamily):
    name = "modernbert"
    model_types = ("modernbert",)
    summary = "ModernBERT text encoders (rotary positions, alternating local/global attention, GeGLU): text tower -> sentence_embedding"
    token_types = {"modernbert": False}


class NomicBertFamily(SentenceEncoderFamily):
    name = "nomic-bert"
    model_types = ("nomic_bert",)
    summary = "Nomic-BERT rotary text encoders (nomic-embed-text): text tower -> sentence_embedding"
    token_types = {"nomic_bert": True}
    # the original checkpoints' config.json names the sizes GPT-2's way; transformers reads either
    config_fields = ("vocab_size", "hidden_size|n_embd", "num_attention_heads|n_head", "num_hidden_layers|n_layer", "max_position_embeddings|n_positions")
