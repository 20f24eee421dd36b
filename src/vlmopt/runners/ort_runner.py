from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vlmopt.errors import VlmoptError
from vlmopt.runners.base import Runner


def quiet_cpu_options(threads: int | None) -> Any:
    """ONNX Runtime session options for CPU work beside other work: warnings off, `threads` intra-op threads that do
    not spin between runs (on shared cores, spinning threads slow whatever runs next)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OrtRunner(Runner):
    """An ONNX file in an ONNX Runtime session (CPU unless other providers are given)."""

    backend = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None, providers: list[str] | None = None, spinning: bool = True):
        """`spinning=False`: intra-op threads sleep as soon as a run ends instead of spinning, for a process that has
        other work between runs on the same cores (a server's decoding, preprocessing and HTTP)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise VlmoptError(f"cannot load ONNX file {path}: {first}") from exc
        super().__init__([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        # graphs with fp16 inputs (`quantize --fp16-io`) take the same float32 feeds as every other artifact
        self._casts = {i.name: np.float16 for i in self.session.get_inputs() if i.type == "tensor(float16)"}

    def run_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, {name: self._cast(name, feed[name]) for name in self.input_names})
        return dict(zip(self.output_names, outputs, strict=True))

    def _cast(self, name: str, value: np.ndarray) -> np.ndarray:
        dtype = self._casts.get(name)
        return value if dtype is None or value.dtype == dtype else value.astype(dtype)

    def close(self) -> None:
        self.session = None
