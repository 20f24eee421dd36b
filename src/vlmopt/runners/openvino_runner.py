"""An OpenVINO IR tower behind the runner interface, compiled once with the settings its artifact recorded.

OpenVINO's CPU plugin runs in bf16 by default on CPUs with AVX512_BF16 or AMX, even for an fp32 model,
so the runner compiles with the artifact's recorded `INFERENCE_PRECISION_HINT` and reads back what the
compiled model actually runs: the precision hint it settled on and, from the execution graph, the
precision of every compute layer (`executed`). Verification and `bench` go through this runner, so they
check and time what ran.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlmopt.errors import VlmoptError
from vlmopt.families.generative import LOGITS, GenerativeContract
from vlmopt.graph import LOGITS_TO_KEEP
from vlmopt.machine import type_name
from vlmopt.runners.base import Runner
from vlmopt.runners.generate import KvCache, OrtGenerateRunner, OrtParts

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


def open_core(meta: dict[str, Any]) -> tuple[Any, str]:
    """OpenVINO's Core and the device an artifact recorded, checked to be on this machine."""
    from vlmopt.machine import check_openvino_device, require_openvino

    ov = require_openvino("running an OpenVINO artifact")
    core = ov.Core()
    device = meta.get("device", "CPU")
    check_openvino_device(core, device)
    return core, device


def port_name(port: Any, expected: list[str]) -> str:
    """A port's tensor name: the one the tower's interface uses when the tensor has several (OpenVINO merges names when it folds a node)."""
    names = port.get_names()
    return next((name for name in expected if name in names), None) or port.get_any_name()


class OpenVINORunner(Runner):
    """One IR file (`.xml` beside its `.bin`); `meta` is what `vlmopt openvino` recorded for the tower."""

    backend = "openvino"

    def __init__(self, path: Path, meta: dict[str, Any], threads: int | None = None, profile: bool = False, names: tuple[list[str], list[str]] | None = None):
        core, device = open_core(meta)
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


# -- generation: vlmopt's loop over OpenVINO parts ---------------------------------------------------
@dataclass
class PortInfo:
    """A port as ONNX Runtime's `NodeArg` describes it: its name, shape (ints, or names for dynamic axes) and type."""

    name: str
    shape: list[int | str]
    type: str


#: OpenVINO element types -> ONNX Runtime's type names, as the loop reads them
_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)", "int32": "tensor(int32)"}


def _port_info(port: Any, axis: str) -> PortInfo:
    shape = [int(d.get_length()) if d.is_static else f"{axis}{i}" for i, d in enumerate(port.get_partial_shape())]
    dtype = np.dtype(port.get_element_type().to_dtype()).name
    return PortInfo(port.get_any_name(), shape, _ORT_TYPES.get(dtype, f"tensor({dtype})"))


class OpenVINOSession:
    """One compiled IR part behind the slice of ONNX Runtime's session API that vlmopt's generation loop and its
    int4 tools use (`run`, `get_inputs`, `get_outputs`), so the same loop runs either back end.

    A decoder (`past_key_values.*` inputs, `present.*` outputs) is compiled stateful, as optimum-intel deploys one:
    OpenVINO's make-stateful transformation turns each past/present pair into a variable the plugin keeps between
    runs, so a decode step feeds only its new positions. Measured on the tiny llama, one decode step: 2.4 to 4 ms
    stateful against 20 to 30 ms with the cache passed in and out as inputs whose length changes every step (load
    average 27). The session still shows the file's own interface; `run` with pasts sets the variables to them first."""

    def __init__(self, path: Path, meta: dict[str, Any], threads: int | None = None):
        core, device = open_core(meta)
        try:
            model = core.read_model(str(path))
            self._inputs = [_port_info(p, "in") for p in model.inputs]
            self._outputs = [_port_info(p, "out") for p in model.outputs]
            #: past input -> present output, the pairs the plugin keeps as variables
            self.pairs = {i.name: i.name.replace("past_key_values.", "present.", 1) for i in self._inputs if i.name.startswith("past_key_values.")}
            if self.pairs:
                from openvino._offline_transformations import apply_make_stateful_transformation

                apply_make_stateful_transformation(model, self.pairs)
            self.compiled = core.compile_model(model, device, compile_config(meta, threads))
        except RuntimeError as exc:
            raise VlmoptError(f"OpenVINO cannot load {path}: {first_line(exc)}") from exc
        self.request = self.compiled.create_infer_request()
        self._ports = {port.get_any_name(): port for port in self.compiled.outputs}
        self._fed = [port.get_any_name() for port in self.compiled.inputs]
        #: each past input's variable (named after the pair by the transformation)
        self.states = {past: next(v for v in self.request.query_state() if v.name == past + present) for past, present in self.pairs.items()}

    def get_inputs(self) -> list[PortInfo]:
        return self._inputs

    def get_outputs(self) -> list[PortInfo]:
        return self._outputs

    def set_pasts(self, pasts: dict[str, np.ndarray]) -> None:
        """The variables set to these past values (empty ones start a sequence)."""
        import openvino as ov

        for name, value in pasts.items():
            self.states[name].state = ov.Tensor(np.ascontiguousarray(value))

    def infer(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """One run on the variables as they stand (a stateful decoder's step); its logits."""
        results = self.request.infer({name: np.ascontiguousarray(feed[name]) for name in self._fed})
        return np.array(results[self._ports[LOGITS]] if LOGITS in self._ports else results[self.compiled.outputs[0]])

    def run(self, output_names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.pairs:
            self.set_pasts({name: feed[name] for name in self.pairs})
        results = self.request.infer({name: np.ascontiguousarray(feed[name]) for name in self._fed})
        presents = {present: past for past, present in self.pairs.items()}
        wanted = output_names or [o.name for o in self._outputs]
        # the request reuses its output buffers on the next run: what is handed back is copied out
        return [np.array(self.states[presents[n]].state.data) if n in presents else np.array(results[self._ports[n]]) for n in wanted]


class OpenVINOParts(OrtParts):
    """The parts of an OpenVINO artifact (`.xml` IR), compiled with the settings `vlmopt openvino` recorded for each
    (`engines`: part -> its record's `engine`); the rest of the loop is ONNX Runtime's (`OrtParts`)."""

    def __init__(
        self, folder: Path, files: dict[str, str], threads: int | None = None, contract: GenerativeContract | None = None, engines: dict[str, Any] | None = None
    ):
        self._meta = {files[name]: meta or {} for name, meta in (engines or {}).items() if name in files}
        super().__init__(folder, files, threads, contract)
        if self.shares_buffer:
            raise VlmoptError("OpenVINO runs decoders with a concatenated KV cache (exported from PyTorch: `vlmopt convert --decoder torch`)")

    def session(self, path: Path, threads: int | None) -> Any:  # type: ignore[override]
        return OpenVINOSession(path, self._meta.get(path.name, {}), threads)

    def decoder_session(self, path: Path, threads: int | None) -> Any:
        """An IR lists every input it takes among its inputs, `logits_to_keep` included."""
        return self.session(path, threads)

    def cache(self, batch: int, capacity: int) -> KvCache:
        return OpenVINOKvCache(self, batch, capacity)


class OpenVINOKvCache(KvCache):
    """One generation's KV cache in the stateful decoder's variables: set empty for the batch, then grown by the
    plugin at each run."""

    def __init__(self, parts: OrtParts, batch: int, capacity: int):
        self.parts, self.capacity = parts, capacity
        parts.decoder.set_pasts({name: parts.empty_past(batch) for name in parts.past_names})
        self.mask = np.zeros((batch, 0), np.int64)
        self.position_offsets = None
        self.lengths = np.zeros(batch, np.int64)

    def _run(
        self,
        inputs_embeds: np.ndarray,
        mask: np.ndarray,
        keep: int = 0,
        extra: dict[str, np.ndarray] | None = None,
        positions: np.ndarray | None = None,
        prompt: bool = False,
    ) -> np.ndarray:
        """One run of the stateful decoder; `prompt` changes nothing: the cache lives in this one request's variables,
        so an OpenVINO artifact has no separate prefill decoder."""
        feed = self.parts.step_feed(inputs_embeds, mask, extra, positions)
        if self.parts.keeps_logits:
            feed[LOGITS_TO_KEEP] = np.array(keep, np.int64)
        return self.parts.decoder.infer(feed)

    def keys(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        return np.array(self.parts.decoder.states[f"past_key_values.{layer}.key"].state.data), self.mask.astype(bool)


class OpenVINOGenerateRunner(OrtGenerateRunner):
    """vlmopt's generation loop (`OrtGenerateRunner`'s) over the OpenVINO IR parts of an artifact."""

    backend = "openvino"

    def __init__(
        self, folder: Path, files: dict[str, str], threads: int | None = None, contract: GenerativeContract | None = None, engines: dict[str, Any] | None = None
    ):
        self.parts = OpenVINOParts(folder, files, threads, contract, engines)
