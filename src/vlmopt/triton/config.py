"""Triton model configurations (`config.pbtxt`), built and checked against Triton's own schema.

A configuration is written as a plain mapping, turned into Triton's `ModelConfig` message (the protobuf
`tritonclient` ships, `model_config_pb2`: a misspelt field or a wrong type is refused there), printed in
protobuf text format, and that text parsed back with `google.protobuf.text_format` before anything is
written. Nothing here writes files.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmopt.errors import VlmoptError
from vlmopt.versions import package_version

#: the Triton release the configurations are written for: the container `FROM` line and the README name it.
#: Its server is 2.51, the one `nvidia-pytriton` 0.7 bundles (the tests serve the python flavour on it).
TRITON_RELEASE = "24.10"
TRITON_SERVER_VERSION = "2.51.0"
TRITON_IMAGE = f"nvcr.io/nvidia/tritonserver:{TRITON_RELEASE}-py3"

#: numpy dtype names (as towers record them) -> Triton's data types
DATA_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "float64": "TYPE_FP64",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "int16": "TYPE_INT16",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
    "bytes": "TYPE_STRING",
}

#: how each serving backend is named in a configuration: a platform, or a backend
PLATFORMS = {
    "onnxruntime": {"platform": "onnxruntime_onnx"},
    "openvino": {"backend": "openvino"},
    "tensorrt": {"platform": "tensorrt_plan"},
    "python": {"backend": "python"},
}
#: the model file under `1/` for each artifact kind (Triton's OpenVINO backend reads ONNX files too)
MODEL_FILES = {"onnx": "model.onnx", "openvino": "model.xml", "tensorrt": "model.plan"}


@functools.cache
def model_config_pb2() -> Any:
    """Triton's `ModelConfig` schema, as `tritonclient` ships it (`tritonclient/grpc/model_config_pb2.py`).

    `tritonclient.grpc` imports grpcio, and its `grpc` extra pins protobuf below 7, which would take this
    stack's protobuf back a major version: without grpcio, the generated module is loaded from its file."""
    try:
        from tritonclient.grpc import model_config_pb2 as schema

        return schema
    except (ImportError, RuntimeError):  # tritonclient without its grpc extra raises RuntimeError
        pass
    try:
        import tritonclient
    except ImportError:
        raise VlmoptError("package needs Triton's model-configuration schema from tritonclient: pip install 'vlmopt[triton]'") from None
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("tritonclient_model_config_pb2", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise VlmoptError(f"tritonclient {package_version('tritonclient')} has no {path.name}; pip install 'vlmopt[triton]'")
    schema = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(schema)
    return schema


@dataclass(frozen=True)
class Tensor:
    """One input or output of a Triton model: dims without the batch axis when the model batches, -1 where free."""

    name: str
    data_type: str
    dims: tuple[int, ...]

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, "data_type": self.data_type, "dims": list(self.dims)}


@dataclass(frozen=True)
class Batching:
    """`max_batch_size` (0: the model takes whole tensors, no batch axis) and the dynamic batcher's settings."""

    max_batch_size: int
    preferred: tuple[int, ...] = ()
    max_queue_delay_us: int = 0

    def apply(self, config: dict[str, Any]) -> None:
        config["max_batch_size"] = self.max_batch_size
        if self.max_batch_size > 0:
            batcher: dict[str, Any] = {"max_queue_delay_microseconds": self.max_queue_delay_us}
            if self.preferred:
                batcher["preferred_batch_size"] = list(self.preferred)
            config["dynamic_batching"] = batcher


def instance_group(count: int, device: str) -> list[dict[str, Any]]:
    return [{"count": count, "kind": "KIND_GPU" if device == "gpu" else "KIND_CPU"}]


def parameters(values: dict[str, str]) -> dict[str, dict[str, str]]:
    return {key: {"string_value": str(value)} for key, value in values.items()}


def thread_parameters(serving: str, threads: int | None) -> dict[str, str]:
    """The backend's own thread settings, per instance (None: the backend's default)."""
    if threads is None:
        return {}
    if serving == "onnxruntime":
        return {"intra_op_thread_count": str(threads), "inter_op_thread_count": "1"}
    if serving == "openvino":
        return {"INFERENCE_NUM_THREADS": str(threads), "NUM_STREAMS": "1"}
    if serving == "python":
        return {"threads": str(threads)}
    return {}


def tower_config(
    name: str,
    serving: str,
    inputs: list[Tensor],
    outputs: list[Tensor],
    batching: Batching,
    instances: int,
    device: str,
    threads: int | None,
    extra_parameters: dict[str, str] | None = None,
    model_file: str | None = None,
) -> dict[str, Any]:
    """A tower's model: its platform or backend, its tensors, batching, instances and thread parameters, and the
    file under `1/` it loads (None: the backend's own, `model.py` for python)."""
    config: dict[str, Any] = {"name": name, **PLATFORMS[serving]}
    batching.apply(config)
    config["input"] = [t.to_config() for t in inputs]
    config["output"] = [t.to_config() for t in outputs]
    config["instance_group"] = instance_group(instances, device)
    values = {**thread_parameters(serving, threads), **(extra_parameters or {})}
    if values:
        config["parameters"] = parameters(values)
    if model_file is not None:
        config["default_model_filename"] = model_file
    return config


def python_config(
    name: str, inputs: list[Tensor], outputs: list[Tensor], batching: Batching, instances: int, values: dict[str, str] | None = None
) -> dict[str, Any]:
    """A python-backend step (pre-processing, normalization) on CPU."""
    return tower_config(name, "python", inputs, outputs, batching, instances, "cpu", None, values)


@dataclass(frozen=True)
class Step:
    """One model of an ensemble: which ensemble tensors feed its inputs (`inputs`: model input -> ensemble tensor)
    and what its outputs become (`outputs`: model output -> ensemble tensor)."""

    model: str
    inputs: dict[str, str]
    outputs: dict[str, str]


def ensemble_config(name: str, inputs: list[Tensor], outputs: list[Tensor], max_batch_size: int, steps: list[Step]) -> dict[str, Any]:
    return {
        "name": name,
        "platform": "ensemble",
        "max_batch_size": max_batch_size,
        "input": [t.to_config() for t in inputs],
        "output": [t.to_config() for t in outputs],
        "ensemble_scheduling": {
            "step": [{"model_name": s.model, "model_version": -1, "input_map": dict(s.inputs), "output_map": dict(s.outputs)} for s in steps]
        },
    }


def render(config: dict[str, Any]) -> str:
    """`config` as `config.pbtxt` text, checked against Triton's schema both ways: the mapping must make a
    `ModelConfig`, and the text printed from it must parse back into the same message."""
    from google.protobuf import json_format, text_format

    schema = model_config_pb2()
    try:
        message = json_format.ParseDict(config, schema.ModelConfig())
    except json_format.ParseError as exc:
        raise AssertionError(f"vlmopt built a configuration for {config.get('name')} that Triton's schema refuses: {exc}") from exc
    text = text_format.MessageToString(message)
    parsed = parse(text, str(config.get("name")))
    assert parsed == message, f"the configuration of {config.get('name')} does not read back as written"
    return text


def parse(text: str, where: str) -> Any:
    """A `config.pbtxt`'s text as Triton's `ModelConfig`; a field the schema does not know is refused in one line."""
    from google.protobuf import text_format

    schema = model_config_pb2()
    try:
        return text_format.Parse(text, schema.ModelConfig())
    except text_format.ParseError as exc:
        raise VlmoptError(f"{where}: not a valid Triton model configuration ({exc})") from None
