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

    if _byte_size(model) > EXTERNAL_DATA_BYTES:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data")
    else:
        onnx.save(model, str(path))


def _byte_size(model: Any) -> float:
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
