"""An OpenVINO IR tower behind the runner interface, compiled once with the settings its artifact recorded.

OpenVINO's CPU plugin runs in bf16 by default on CPUs with AVX512_BF16 or AMX, even for an fp32 model,
so the runner compiles with the artifact's recorded `INFERENCE_PRECISION_HINT` and reads back what the
compiled model actually runs: the precision hint it settled on and, from the execution graph, the
precision of every compute layer (`executed`). Verification and `bench` go through this runner, so they
check and time what ran.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from vlmopt.errors import VlmoptError
from vlmopt.machine import type_name
from vlmopt.runners.base import Runner

#: execution-graph layers that only move or describe data; the rest are compute whose precision is reported
_PLUMBING = {
    "Input",
    "Output",
    "Parameter",
    "Result",
    "Const",
    "Constant",
    "Reorder",
    "Reshape",
    "Transpose",
    "ShapeOf",
    "Gather",
    "Concatenation",
    "Broadcast",
}
#: the artifact's recorded setting -> OpenVINO's INFERENCE_PRECISION_HINT (auto: the plugin's own default)
PRECISION_HINTS = {"f32": "f32", "bf16": "bf16", "f16": "f16", "auto": None}
PERFORMANCE_HINTS = {"latency": "LATENCY", "throughput": "THROUGHPUT"}


def compile_config(meta: dict[str, Any], threads: int | None, profile: bool = False) -> dict[str, Any]:
    """The `compile_model` properties for an artifact's recorded settings and this run's thread count."""
    config: dict[str, Any] = {"PERFORMANCE_HINT": PERFORMANCE_HINTS[meta.get("performance_hint", "latency")]}
    hint = PRECISION_HINTS[meta.get("inference_precision", "f32")]
    if hint is not None:
        config["INFERENCE_PRECISION_HINT"] = hint
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if profile:
        config["PERF_COUNT"] = True
    return config


def executed_precisions(compiled: Any) -> dict[str, Any]:
    """What a compiled model runs: its precision hint as read back, and per compute layer type how many layers ran at each precision."""
    layers: dict[str, Counter[str]] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        if kind in _PLUMBING:
            continue
        precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
        layers.setdefault(kind, Counter())[precision] += 1
    return {
        "inference_precision": type_name(compiled.get_property("INFERENCE_PRECISION_HINT")),
        "layers": {kind: dict(sorted(counts.items())) for kind, counts in sorted(layers.items())},
    }


def port_name(port: Any, expected: list[str]) -> str:
    """A port's tensor name: the one the tower's interface uses when the tensor has several (OpenVINO merges names when it folds a node)."""
    names = port.get_names()
    return next((name for name in expected if name in names), None) or port.get_any_name()


class OpenVINORunner(Runner):
    """One IR file (`.xml` beside its `.bin`); `meta` is what `vlmopt openvino` recorded for the tower."""

    backend = "openvino"

    def __init__(self, path: Path, meta: dict[str, Any], threads: int | None = None, profile: bool = False, names: tuple[list[str], list[str]] | None = None):
        from vlmopt.machine import check_openvino_device, require_openvino

        ov = require_openvino("running an OpenVINO artifact")
        core = ov.Core()
        device = meta.get("device", "CPU")
        check_openvino_device(core, device)
        try:
            model = core.read_model(str(path))
            self.compiled = core.compile_model(model, device, compile_config(meta, threads, profile))
        except RuntimeError as exc:
            raise VlmoptError(f"OpenVINO cannot load {path}: {first_line(exc)}") from exc
        self.request = self.compiled.create_infer_request()
        self._outputs = list(self.compiled.outputs)
        inputs, outputs = names or ([], [])
        super().__init__([port_name(i, inputs) for i in self.compiled.inputs], [port_name(o, outputs) for o in self._outputs])
        self._types = {name: port.get_element_type().to_dtype() for name, port in zip(self.input_names, self.compiled.inputs, strict=True)}
        self.executed = executed_precisions(self.compiled)
        self.executed["device"] = device
        self.executed["performance_hint"] = str(self.compiled.get_property("PERFORMANCE_HINT")).rsplit(".", 1)[-1].lower()
        self.streams = int(self.compiled.get_property("NUM_STREAMS"))
        self.executed["streams"] = self.streams
        # a fixed-batch IR takes whole batches only; a dynamic one under the throughput hint splits them over the streams
        self._static = not self.compiled.inputs[0].get_partial_shape()[0].is_dynamic
        # one infer request per stream, started and awaited by hand: OpenVINO's AsyncInferQueue calls back from its
        # worker threads, and freeing it (or the compiled model) while one of them still runs aborted the process
        self._requests = [self.compiled.create_infer_request() for _ in range(self.streams)] if self.streams > 1 else []

    def run_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = {name: np.ascontiguousarray(feed[name], dtype=self._types[name]) for name in self.input_names}
        batch = len(next(iter(inputs.values())))
        if self._requests and batch > 1 and not self._static:
            return self._run_split(inputs, batch)
        results = self.request.infer({port: inputs[name] for name, port in zip(self.input_names, self.compiled.inputs, strict=True)})
        return {name: np.array(results[port], dtype=np.float32) for name, port in zip(self.output_names, self._outputs, strict=True)}

    def _run_split(self, inputs: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        """The throughput hint: the batch split over OpenVINO's streams, one request each, run in parallel."""
        parts = np.array_split(np.arange(batch), min(self.streams, batch))
        feeds = [
            {port: np.ascontiguousarray(inputs[name][rows[0] : rows[-1] + 1]) for name, port in zip(self.input_names, self.compiled.inputs, strict=True)}
            for rows in parts
        ]
        started = []
        try:
            for request, feed in zip(self._requests, feeds, strict=False):
                request.start_async(feed)
                started.append(request)
        finally:
            for request in started:
                request.wait()  # every started request finishes before its inputs (held by `feeds`) may go
        results = [[np.array(request.get_tensor(port).data, dtype=np.float32) for port in self._outputs] for request in started]
        return {name: np.concatenate([part[k] for part in results]) for k, name in enumerate(self.output_names)}

    def profile(self) -> list[dict[str, Any]]:
        """Per-layer times of the last run (compiled with `profile=True`): OpenVINO's performance counters, slowest first."""
        rows = []
        for info in self.request.get_profiling_info():
            if info.status.name != "EXECUTED":
                continue
            rows.append({"layer": info.node_name, "type": info.node_type, "exec_type": info.exec_type, "ms": info.real_time.total_seconds() * 1000})
        return sorted(rows, key=lambda r: r["ms"], reverse=True)

    def details(self) -> dict[str, Any]:
        return self.executed

    def close(self) -> None:
        for request in self._requests:
            request.wait()
        self._requests = []
        self.request = None
        self.compiled = None


def first_line(exc: BaseException) -> str:
    """OpenVINO's messages open with its source location; the line that says what went wrong, shortened."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Exception from", "Check '"))]
    return (useful or lines or [type(exc).__name__])[0][:300]
