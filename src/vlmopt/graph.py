"""Small facts about ONNX graphs that several stages need: loading, saving, op counts, portability."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from vlmopt.errors import VlmoptError

#: above this a graph is saved with external data (protobuf cannot hold 2 GB)
EXTERNAL_DATA_BYTES = 1_800_000_000
#: ONNX Runtime's own operators (Attention, SkipLayerNormalization, MatMulNBits, ...): TensorRT parses none of them
ORT_DOMAIN = "com.microsoft"


def load(path: Path) -> Any:
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise VlmoptError(f"cannot read ONNX file {path}: {(str(exc).splitlines() or [type(exc).__name__])[0][:200]}") from exc


def load_structure(path: Path) -> Any:
    """The graph without its weights (operators, inputs, outputs): cheap for any size."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise VlmoptError(f"cannot read ONNX file {path}: {(str(exc).splitlines() or [type(exc).__name__])[0][:200]}") from exc


def save(model: Any, path: Path) -> None:
    """Save `model`, with its weights in `<name>.data` when they are too large for one protobuf."""
    import onnx

    if byte_size(model) > EXTERNAL_DATA_BYTES:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data")
    else:
        onnx.save(model, str(path))


def byte_size(model: Any) -> float:
    """The serialized size, computed once; infinite where protobuf refuses to size a message beyond 2 GB."""
    try:
        return model.ByteSize()
    except Exception:
        return float("inf")


def op_counts(model: Any) -> dict[str, int]:
    """Operator type -> how often it occurs in the main graph."""
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


def custom_domains(model: Any) -> list[str]:
    """Operator domains beyond standard ONNX, e.g. ['com.microsoft'] for ORT-fused or ORT-quantized graphs."""
    return sorted({node.domain for node in model.graph.node if node.domain not in ("", "ai.onnx")})


def tower_files(folder: Path, file: str) -> list[Path]:
    """A tower's graph file and its external-data file, if any."""
    return [p for p in (folder / file, folder / f"{file}.data") if p.exists()]


def weight_bytes(folder: Path, file: str) -> int:
    return sum(p.stat().st_size for p in tower_files(folder, file))


#: the decoder's optional input: how many of the last positions get logits (0, its default: every position)
LOGITS_TO_KEEP = "logits_to_keep"


def add_logits_to_keep(path: Path) -> bool:
    """Give a decoder graph transformers' `logits_to_keep`: an optional int64 input (default 0: every position, so a
    runtime that does not know it, onnxruntime-genai, gets what it got before) that slices the hidden states to the
    last k positions in front of the language-model head. A prefill needs only its last position's logits; the
    head over every position is a quarter of a 0.5 B model's prefill (Qwen2: 151936 x 896) and its output hundreds
    of MB. The graph's weights are not touched (external data stays as it is). False where the graph's `logits`
    are not a MatMul (or MatMulNBits) of the hidden states or it already has the input."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = load_structure(path)
    graph = model.graph
    if any(i.name == LOGITS_TO_KEEP for i in graph.input):
        return False
    head = next((n for n in graph.node if "logits" in n.output), None)
    if head is None or head.op_type not in ("MatMul", "MatMulNBits"):
        return False
    hidden, sliced = head.input[0], f"{head.input[0]}/last_positions"
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, []))
    graph.initializer.append(numpy_helper.from_array(np.array(0, np.int64), LOGITS_TO_KEEP))
    constants = {"/logits_to_keep/zero": [0], "/logits_to_keep/axes": [1], "/logits_to_keep/ends": [np.iinfo(np.int64).max]}
    graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), k) for k, v in constants.items())
    nodes = [
        helper.make_node("Neg", [LOGITS_TO_KEEP], ["/logits_to_keep/negated"], name="/logits_to_keep/Neg"),
        helper.make_node("Unsqueeze", ["/logits_to_keep/negated", "/logits_to_keep/zero"], ["/logits_to_keep/starts"], name="/logits_to_keep/Unsqueeze"),
        helper.make_node("Slice", [hidden, "/logits_to_keep/starts", "/logits_to_keep/ends", "/logits_to_keep/axes"], [sliced], name="/logits_to_keep/Slice"),
    ]
    head.input[0] = sliced
    at = list(graph.node).index(head)
    for offset, node in enumerate(nodes):
        graph.node.insert(at + offset, node)
    onnx.save(model, str(path))
    return True
