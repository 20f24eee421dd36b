"""Which of vlmopt's ONNX Runtime generation loops runs a contract: the decoder-only loop (`vlmopt.runners.generate`)
or the encoder-decoder one (`vlmopt.runners.cross_attention`). It sits above both, so neither imports the other back."""

from __future__ import annotations

from pathlib import Path

from vlmopt.families.generative import SELF_AND_CROSS_ATTENTION, GenerativeContract
from vlmopt.runners.cross_attention import CrossAttentionGenerateRunner
from vlmopt.runners.generate import GenerateRunner, OrtGenerateRunner


def ort_runner(folder: Path, files: dict[str, str], threads: int | None = None, contract: GenerativeContract | None = None) -> GenerateRunner:
    """vlmopt's ONNX Runtime loop for the contract's cache layout: `OrtGenerateRunner` (self-attention), or
    `CrossAttentionGenerateRunner` for a self-and-cross-attention cache."""
    if contract is not None and contract.cache == SELF_AND_CROSS_ATTENTION:
        return CrossAttentionGenerateRunner(folder, files, threads, contract)
    return OrtGenerateRunner(folder, files, threads, contract)
