"""A TensorRT engine behind the runner interface, with torch CUDA tensors as device buffers.

torch is already a dependency and its CUDA tensors give device memory, streams and CUDA graphs, so no
pycuda or cuda-python is needed (NVIDIA's own samples moved off pycuda in TensorRT 10.14).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vlmopt.engines import check_engine_compatible
from vlmopt.errors import VlmoptError
from vlmopt.runners.base import Runner


class TensorRTRunner(Runner):
    """One engine file; `meta` is what `vlmopt build` recorded (refused on another TensorRT or GPU)."""

    backend = "tensorrt"

    def __init__(self, path: Path, meta: dict[str, Any], rebuild: str, cuda_graph: bool = False):
        from vlmopt.machine import require_tensorrt_gpu

        version, gpu = require_tensorrt_gpu("running a TensorRT engine")
        import tensorrt as trt
        import torch

        check_engine_compatible(meta, version, gpu.name, gpu.compute_capability, rebuild)
        self._torch = torch
        self._logger = trt.Logger(trt.Logger.ERROR)
        runtime = trt.Runtime(self._logger)
        if meta.get("version_compatible"):
            runtime.engine_host_code_allowed = True
        self.engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise VlmoptError(f"TensorRT could not load {path}; rebuild it: {rebuild}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        self._dtypes = {n: torch.from_numpy(np.zeros(0, dtype=trt.nptype(self.engine.get_tensor_dtype(n)))).dtype for n in names}
        self._stream = torch.cuda.Stream()
        self._cuda_graph = cuda_graph
        self._graphs: dict[tuple[Any, ...], tuple[Any, dict[str, Any], dict[str, Any]]] = {}
        super().__init__(inputs, outputs)

    def _buffers(self, feed: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, Any]]:
        torch = self._torch
        inputs = {}
        for name in self.input_names:
            tensor = torch.from_numpy(np.ascontiguousarray(feed[name])).to(device="cuda", dtype=self._dtypes[name])
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
            inputs[name] = tensor
        outputs = {}
        for name in self.output_names:
            tensor = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._dtypes[name], device="cuda")
            self.context.set_tensor_address(name, tensor.data_ptr())
            outputs[name] = tensor
        return inputs, outputs

    def run_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        if not self._cuda_graph:
            inputs, outputs = self._buffers(feed)
            with torch.cuda.stream(self._stream):
                if not self.context.execute_async_v3(self._stream.cuda_stream):
                    raise VlmoptError("TensorRT execution failed")
            self._stream.synchronize()
            return _to_host(outputs)
        key = tuple((n, feed[n].shape) for n in self.input_names)
        if key not in self._graphs:
            inputs, outputs = self._buffers(feed)
            with torch.cuda.stream(self._stream):
                self.context.execute_async_v3(self._stream.cuda_stream)  # TensorRT's first run does its setup outside capture
            self._stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self._stream):
                self.context.execute_async_v3(self._stream.cuda_stream)
            self._graphs[key] = (graph, inputs, outputs)
        graph, inputs, outputs = self._graphs[key]
        for name in self.input_names:
            inputs[name].copy_(torch.from_numpy(np.ascontiguousarray(feed[name])).to(dtype=self._dtypes[name]))
        graph.replay()
        torch.cuda.synchronize()
        return _to_host(outputs)

    def close(self) -> None:
        self._graphs.clear()
        self.context = None
        self.engine = None


def _to_host(outputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """Device outputs as float32 numpy arrays (the copy also waits for the GPU)."""
    return {name: tensor.float().cpu().numpy() for name, tensor in outputs.items()}
