"""Which of vlmopt's generation loops runs a contract: the decoder-only loop (`vlmopt.runners.generate`), the
encoder-decoder one (`vlmopt.runners.cross_attention`), or the decoder-only loop over OpenVINO IR parts
(`vlmopt.runners.openvino_runner`). It sits above them, so none imports another back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmopt.families.generative import SELF_AND_CROSS_ATTENTION, GenerativeContract
from vlmopt.runners.cross_attention import CrossAttentionGenerateRunner
from vlmopt.runners.generate import GenerateRunner, OrtGenerateRunner


def ort_runner(folder: Path, files: dict[str, str], threads: int | None = None, contract: GenerativeContract | None = None) -> GenerateRunner:
    """vlmopt's ONNX Runtime loop for the contract's cache layout: `OrtGenerateRunner` (self-attention), or
    `CrossAttentionGenerateRunner` for a self-and-cross-attention cache."""
    if contract is not None and contract.cache == SELF_AND_CROSS_ATTENTION:
        return CrossAttentionGenerateRunner(folder, files, threads, contract)
    return OrtGenerateRunner(folder, files, threads, contract)


def loop_runner(
    folder: Path, files: dict[str, str], threads: int | None = None, contract: GenerativeContract | None = None, engines: dict[str, Any] | None = None
) -> GenerateRunner:
    """vlmopt's loop for an artifact's back end: over OpenVINO where its parts are IR (`.xml`; `engines`: each part's
    recorded OpenVINO settings), else ONNX Runtime's (`ort_runner`)."""
    if any(file.endswith(".xml") for file in files.values()):
        from vlmopt.runners.openvino_runner import OpenVINOGenerateRunner

        return OpenVINOGenerateRunner(folder, files, threads, contract, engines)
    return ort_runner(folder, files, threads, contract)
