"""The vocabulary every family declares its architecture in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Axis = int | str


@dataclass(frozen=True)
class TensorSpec:
    """A named graph input or output; string axes are dynamic and named ("batch", "sequence").

    `role` tells the dummy-input generator what to put in an input (`vlmopt.inputs`): "image",
    "input_ids", "attention_mask", "token_type_ids"; for generative parts also "image_input_ids"
    (token ids holding runs of the image token), "image_features", "inputs_embeds",
    "decoder_attention_mask" (left-padded, over past and new positions), "position_ids" ([batch, sequence], or
    M-RoPE's [3, batch, sequence]), "image_grid_thw" (each image the tower's `meta["image_grid"]`), "past_key" and
    "past_value", "feature_rows" and "feature_weights" (a packing gather over image feature rows).
    Outputs carry the role "output".
    """

    name: str
    shape: tuple[Axis, ...]
    dtype: str = "float32"
    role: str = "output"

    @property
    def dynamic_axes(self) -> dict[int, str]:
        """Position -> name of each dynamic axis, as both ONNX exporters take them."""
        return {i: axis for i, axis in enumerate(self.shape) if isinstance(axis, str)}

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "role": self.role}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(data["name"], tuple(data["shape"]), data["dtype"], data["role"])


@dataclass(frozen=True)
class TextVocab:
    """What a tokenizer would put into input_ids, so dummy text looks like real text."""

    vocab_size: int
    max_length: int
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    #: vision-language models: the placeholder token image features replace, and how many each image takes
    image_token_id: int | None = None
    image_seq_length: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None or not k.startswith("image_")}


@dataclass(frozen=True)
class Tower:
    """One exported graph: a wrapper around (part of) the Hugging Face model, its inputs and outputs.

    `wrap` turns the loaded model into the `nn.Module` whose forward takes the inputs by name in
    order and returns the outputs in order. `num_heads`/`hidden_size`/`optimizer_model_type` are
    what ONNX Runtime's transformer optimizer needs to fuse this tower. `derived_axes` names axes
    whose size follows from others ("total_sequence": "past_sequence + sequence"): dummy inputs
    honour them and exporters must not treat them as free.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    wrap: Callable[[Any], Any]
    vocab: TextVocab | None = None
    num_heads: int | None = None
    hidden_size: int | None = None
    optimizer_model_type: str | None = None
    bench_sizes: dict[str, int] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    derived_axes: dict[str, str] = field(default_factory=dict)

    @property
    def axes(self) -> list[str]:
        names: list[str] = []
        for spec in self.inputs:
            names.extend(a for a in spec.shape if isinstance(a, str) and a not in names)
        return names

    def with_static_axes(self, sizes: dict[str, int]) -> Tower:
        """The same tower with every dynamic axis fixed to `sizes`."""

        def fix(specs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(s.name, tuple(sizes[a] if isinstance(a, str) and a in sizes else a for a in s.shape), s.dtype, s.role) for s in specs)

        return Tower(**{**self.__dict__, "inputs": fix(self.inputs), "outputs": fix(self.outputs)})

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> Tower:
        """A tower as recorded in the manifest: enough to feed and describe it, with no `wrap`."""
        vocab = TextVocab(**data["vocab"]) if data.get("vocab") else None
        return cls(
            name=name,
            inputs=tuple(TensorSpec.from_json(s) for s in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(s) for s in data["outputs"]),
            wrap=_not_wrappable,
            vocab=vocab,
            num_heads=data.get("num_heads"),
            hidden_size=data.get("hidden_size"),
            optimizer_model_type=data.get("optimizer_model_type"),
            bench_sizes=data.get("bench_sizes") or {},
            meta=data.get("meta") or {},
            derived_axes=data.get("derived_axes") or {},
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "vocab": self.vocab.to_json() if self.vocab else None,
            "num_heads": self.num_heads,
            "hidden_size": self.hidden_size,
            "optimizer_model_type": self.optimizer_model_type,
            "bench_sizes": self.bench_sizes,
            "meta": self.meta,
            **({"derived_axes": self.derived_axes} if self.derived_axes else {}),
        }


def _not_wrappable(model: Any) -> Any:
    raise TypeError("a tower read from the manifest has no PyTorch wrapper; get it from its family")


@dataclass(frozen=True)
class PruneLayout:
    """Where a family's transformer blocks keep the Linears structured pruning shrinks, relative to each block.

    `mlp` is (up, down): up's output rows and down's input columns are the MLP's hidden neurons.
    `attention` is (q, k, v, o): q/k/v output rows and o's input columns, in head-sized groups.
    `head_dim_in_config`: the modeling code reads `config.head_dim`, so fewer heads of the same size
    still reload with `from_pretrained` (where it computes hidden_size / heads, removing heads cannot).
    """

    mlp: tuple[str, str]
    attention: tuple[str, str, str, str] | None = None
    head_dim_in_config: bool = False


class Family:
    """Architecture knowledge for one model family. Subclasses fill in the declarations."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    #: where one model_type holds several heads (BLIP: captioning, retrieval): the config `architectures` this family
    #: takes; () takes every checkpoint of its model types that no family naming its architecture took first
    architectures: tuple[str, ...] = ()
    summary: str = ""
    #: verification tolerance (max abs diff) between PyTorch and the fp32 export
    atol: float = 1e-4
    supports_monolith: bool = False
    #: a generative family's contract (`vlmopt.families.generative.GenerativeContract`); None for an encoder family
    contract: Any = None
    #: the ONNX exporters its towers can go through (a decoder with a KV cache needs the dynamo exporter)
    exporters: tuple[str, ...] = ("dynamo", "torchscript")
    #: who can make its decoder part (`convert --decoder`), preferred first; () for a family without one
    decoder_makers: tuple[str, ...] = ()
    #: zero-shot scores from the two towers' normalized embeddings (`vlmopt serve`): "softmax" over the labels
    #: (CLIP) or "sigmoid" per label (SigLIP), scaled by the checkpoint's exp(`logit_scale`) (plus `logit_bias`);
    #: None for a family without an image and a text tower
    zero_shot: str | None = None

    def takes(self, config: Any) -> bool:
        """Whether a checkpoint of this config belongs to this family."""
        if getattr(config, "model_type", None) not in self.model_types:
            return False
        return not self.architectures or bool(set(getattr(config, "architectures", None) or ()) & set(self.architectures))

    def model_class(self, config: Any) -> Any:
        from transformers import AutoModel

        return AutoModel

    #: where structured pruning finds MLPs and attention heads (None: the family cannot be pruned)
    prune_layout: PruneLayout | None = None

    @property
    def generative(self) -> bool:
        """Its parts generate text (`vlmopt generate`); an encoder family's do not."""
        return self.contract is not None

    def towers(self, config: Any, hf_dir: Path | None = None, monolith: bool = False, decoder: str = "torch") -> list[Tower]:
        """The towers of this checkpoint; `decoder` says who makes a generative family's decoder (`decoder_makers`)."""
        raise NotImplementedError

    def pruning(self, config: Any) -> PruneLayout | None:
        """The layout structured pruning follows for this checkpoint, or None where it has none."""
        return self.prune_layout

    def tower_config(self, config: Any, tower: str) -> Any:
        """The (sub-)config holding a tower's sizes: `intermediate_size`, `num_attention_heads`."""
        return config

    def check_config(self, config: Any) -> None:
        """Refuse (VlmoptError) a checkpoint of this family that vlmopt cannot convert, saying what it supports."""

    def check_declared(self, declared: dict[str, Any]) -> None:
        """Refuse a config.json as written that its config class would quietly repair (a value it overwrites from
        another, where the weights follow the written one). Most families need no check."""

    def required_fields(self, config: Any) -> tuple[str, ...]:
        """The config.json keys this family sizes its towers from. A checkpoint whose config lacks one is refused,
        naming it: transformers would fill in its class default, and the weights would not fit or the graph be misshapen."""
        return ()

    # -- generative families --------------------------------------------------------------------
    def preprocessor(self, folder: Path) -> Any:
        """What turns a prompt and images into the ids, mask and pixels every generation backend takes
        (the checkpoint's own processor in `folder`); `vlmopt.verification.generation` checks a generative
        family's artifacts through it and the three-part contract, so a family declares and never verifies."""
        from vlmopt.errors import VlmoptError

        raise VlmoptError(f"{self.name} is an encoder family: it has no text generation")

    def __repr__(self) -> str:
        return f"<family {self.name}>"


def image_input(config: Any, batch_axis: str = "batch") -> TensorSpec:
    size = config.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return TensorSpec("pixel_values", (batch_axis, config.num_channels, height, width), "float32", "image")


def text_vocab(config: Any, max_length: int | None = None) -> TextVocab:
    return TextVocab(
        vocab_size=config.vocab_size,
        max_length=max_length or config.max_position_embeddings,
        bos_token_id=getattr(config, "bos_token_id", None),
        eos_token_id=getattr(config, "eos_token_id", None),
        pad_token_id=getattr(config, "pad_token_id", None),
    )


#: KV-cache contracts (`KvCacheLayout.tower`, `vlmopt.runners.generate.KvCache`)
CONCAT, SHARED = "concat", "shared"


def kv_contract(tower: Tower) -> str | None:
    """A decoder tower's KV-cache contract (None: not a decoder); decoders recorded before contracts were named are CONCAT."""
    layout = tower.meta.get("kv_cache")
    return None if layout is None else layout.get("contract", CONCAT)
