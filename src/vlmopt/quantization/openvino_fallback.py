"""Accuracy-aware fallback for NNCF int8 OpenVINO models: the fewest layers NNCF leaves in float.

NNCF's int8 OpenVINO model reads each quantized layer's activation through a `FakeQuantize` and its weight
through an int8 decompression. A layer kept in float is a layer in NNCF's ignored scope; OpenVINO's CPU
plugin then runs it in the model's inference precision (f32, or bf16 where the CPU has it, which makes a
kept layer cheap: about 1 ms per MiniLM FFN matmul at batch 8 x 128 on the Zen 5 this was measured on).

Measured on all-MiniLM-L6-v2 (88 real sentences, gate cosine min 0.995; issue 10):
- NNCF's own `quantize_with_accuracy_control` (min-cosine metric, max drop 0.005) ran 14 minutes and ended
  at cosine min 0.074, below where it started (0.866): it is not used.
- Rewiring layers past their activation FakeQuantize (NNCF's `RestoreMode.ONLY_ACTIVATIONS`, a cheap graph
  edit) cannot reach the gate: with every activation in float the int8 per-channel weights and the bias
  correction fitted to quantized inputs still leave 0.989. So each search step re-quantizes with the kept
  layers in the ignored scope (about 7 s for MiniLM), and the model shipped is the one measured.

Steps, the same search as `fallback.py` (`fallback.search`):
1. Ranking (`FakeQuantizeProbe`, `sensitivity`): the fully quantized model plus, per candidate (an
   operation reading a FakeQuantize), a copy of the operation on its float inputs; the relative RMS error
   of each candidate's output, quantized vs float activations, all candidates in ONE run.
2. Search: keep the 1, 2, 4, ... most sensitive in float until the gate passes, bisect, give back.
3. `layer_costs`: what each kept layer costs, from OpenVINO's per-layer performance counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

#: OpenVINO operation types a fallback measures and reverts (those NNCF's int8 puts a FakeQuantize in front of)
REVERTIBLE = ("MatMul", "Convolution", "GroupConvolution", "ConvolutionBackpropData")


#: operations that only move data: NNCF's FakeQuantize may sit above them (`FQ -> Reshape -> MatMul`)
_LAYOUT = ("Reshape", "Transpose", "Squeeze", "Unsqueeze")


def _trace(source: Any) -> tuple[Any, list[Any]] | None:
    """The FakeQuantize feeding an input (through layout-only operations) and those operations, nearest the
    FakeQuantize first; None when the input is not quantized."""
    chain = []
    node = source.get_node()
    while node.get_type_name() in _LAYOUT:
        chain.append(node)
        node = node.input_value(0).get_node()
    if node.get_type_name() != "FakeQuantize":
        return None
    return node, chain[::-1]


#: what a weight's decompression is made of (`Constant(i8) -> Convert -> Subtract -> Multiply`, maybe reshaped)
_DECOMPRESSION = ("Constant", "Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Unsqueeze")


def _is_weight(source: Any) -> bool:
    """Whether an input is computed from constants only (a weight and its decompression)."""
    node = source.get_node()
    if node.get_type_name() not in _DECOMPRESSION:
        return False
    return all(_is_weight(node.input_value(i)) for i in range(node.get_input_size()))


def _layer(op: Any) -> bool:
    """A quantized layer with a weight: a MatMul/convolution reading a FakeQuantize'd activation and a constant weight.
    Attention's activation-by-activation MatMuls are left to NNCF: OpenVINO's low-precision transformations
    compute them in int8 with the dequantization moved past them, and their exposed outputs did not match the
    model's own (relative difference 1.0 on the tiny CLIP), so a probe cannot rank them."""
    return op.get_type_name() in REVERTIBLE and bool(_fake_quantized_inputs(op)) and any(_is_weight(op.input_value(i)) for i in range(op.get_input_size()))


def _fake_quantized_inputs(op: Any) -> list[int]:
    """The input ports of `op` fed by a FakeQuantize (its quantized activations)."""
    return [i for i, port in enumerate(op.inputs()) if _trace(port.get_source_output()) is not None]


def _float_input(source: Any, factory: Any) -> Any:
    """The same input without its FakeQuantize: the layout operations re-made on the FakeQuantize's input."""
    traced = _trace(source)
    if traced is None:
        return source
    fq, chain = traced
    value = fq.input_value(0)
    for node in chain:
        value = factory.create(node.get_type_name(), [value, *[node.input_value(i) for i in range(1, node.get_input_size())]], node.get_attributes()).output(0)
    return value


class FakeQuantizeProbe:
    """The candidates of an NNCF int8 OpenVINO model and the probe that ranks them (see the module docstring)."""

    def __init__(self, model: Any) -> None:
        self.quantized = model
        #: candidate layer -> its operation type, in graph order
        self.op_types = {op.get_friendly_name(): op.get_type_name() for op in model.get_ordered_ops() if _layer(op)}
        self.candidates = list(self.op_types)

    def probe(self) -> tuple[Any, dict[str, tuple[int, int]]]:
        """The model plus a float-input copy of every candidate; {candidate: (quantized output index, float output index)}."""
        import openvino as ov
        from openvino.utils.node_factory import NodeFactory

        model = self.quantized.clone()
        factory = NodeFactory()
        results = list(model.get_results())
        pairs: dict[str, tuple[int, int]] = {}
        extra = []
        for op in model.get_ordered_ops():
            if op.get_friendly_name() not in self.op_types:
                continue
            inputs = [_float_input(port.get_source_output(), factory) for port in op.inputs()]
            twin = factory.create(op.get_type_name(), inputs, op.get_attributes())
            start = len(results) + len(extra)
            extra += [ov.opset13.result(op.output(0)), ov.opset13.result(twin.output(0))]
            pairs[op.get_friendly_name()] = (start, start + 1)
        probe = ov.Model(results + extra, model.get_parameters(), "fallback-probe")
        return probe, pairs


def compiler(core: Any, device: str, config: dict[str, Any]) -> Callable[[Any], Any]:
    """Compile a model with the artifact's settings (precision hint, threads)."""
    return lambda model: core.compile_model(model, device, config)


def sensitivity(probe: FakeQuantizeProbe, feeds: list[dict[str, np.ndarray]], compile_model: Callable[[Any], Any]) -> list[tuple[str, float]]:
    """[(layer, relative RMS error of its output with quantized vs float activations)], most sensitive first."""
    from vlmopt.quantization.fallback import relative_errors

    model, pairs = probe.probe()
    compiled = compile_model(model)
    request = compiled.create_infer_request()
    names = {name for port in compiled.inputs for name in port.get_names()}

    def runs() -> Iterator[dict[str, tuple[np.ndarray, np.ndarray]]]:
        for feed in feeds:
            values = list(request.infer({k: v for k, v in feed.items() if k in names}).values())
            yield {layer: (values[f], values[q]) for layer, (q, f) in pairs.items()}

    return relative_errors(runs())


def cosine_errors(
    reference: list[dict[str, np.ndarray]], feeds: list[dict[str, np.ndarray]], compile_model: Callable[[Any], Any]
) -> Callable[[Any], np.ndarray]:
    """An evaluation callback for `fallback.search`: per sample 1 - cosine against `reference` (the fp32 parent's
    outputs for `feeds`), the worst over outputs."""
    from vlmopt.verification.compare import rowwise_cosine

    def evaluate(model: Any) -> np.ndarray:
        compiled = compile_model(model)
        request = compiled.create_infer_request()
        names = {name for port in compiled.inputs for name in port.get_names()}
        by_name = {name: port for port in compiled.outputs for name in port.get_names()}
        errors = []
        for feed, ref in zip(feeds, reference, strict=True):
            got = request.infer({k: v for k, v in feed.items() if k in names})
            worst = np.max([1.0 - rowwise_cosine(value, got[by_name[name]]) for name, value in ref.items()], axis=0)
            errors.append(worst)
        return np.concatenate(errors)

    return evaluate


class Requantizer:
    """`fallback.search`'s view of an NNCF model: the fully quantized model, its candidates, and `revert(kept)`,
    which quantizes again with `kept` added to the ignored scope (`quantize(kept)`)."""

    def __init__(self, quantized: Any, candidates: list[str], quantize: Callable[[list[str]], Any]) -> None:
        self.quantized = quantized
        self.candidates = candidates
        self._quantize = quantize
        self._last: tuple[tuple[str, ...], Any] | None = None

    def revert(self, kept: list[str]) -> Any:
        key = tuple(kept)
        if self._last is None or self._last[0] != key:  # the search's final answer is usually the last model it made
            self._last = (key, self._quantize(list(kept)) if kept else self.quantized)
        return self._last[1]


#: the performance-counter types that do a layer's arithmetic
_COMPUTE = ("FullyConnected", "MatMul", "Convolution", "GroupConvolution", "Deconvolution")


def _layer_time(layer: str, times: dict[str, tuple[str, float]]) -> float | None:
    """A layer's time from per-node counters: its own node, else the compute nodes OpenVINO named after a sibling
    it fused with (`.../dense/MatMul` runs as the FullyConnected `.../dense/Add`)."""
    if layer in times and times[layer][0] in _COMPUTE:
        return times[layer][1]
    scope = layer.rsplit("/", 1)[0] + "/"
    found = [t for name, (kind, t) in times.items() if kind in _COMPUTE and name.startswith(scope) and "/" not in name[len(scope) :]]
    return sum(found) if found else None


def timed(model: Any, feed: dict[str, np.ndarray], compile_model: Callable[[Any], Any], runs: int = 10) -> dict[str, tuple[str, float]]:
    """{node: (type, median ms)} from OpenVINO's per-layer counters over `runs` (after 2 warm-up runs)."""
    compiled = compile_model(model)
    request = compiled.create_infer_request()
    names = {name for port in compiled.inputs for name in port.get_names()}
    f = {k: v for k, v in feed.items() if k in names}
    per: dict[str, list[float]] = {}
    kinds: dict[str, str] = {}
    for i in range(2 + runs):
        request.infer(f)
        if i >= 2:
            for info in request.profiling_info:
                per.setdefault(info.node_name, []).append(info.real_time.total_seconds() * 1e3)
                kinds[info.node_name] = info.node_type
    return {k: (kinds[k], float(np.median(v))) for k, v in per.items()}


def layer_costs(
    quantized: Any, fallback: Any, kept: list[str], feed: dict[str, np.ndarray], compile_model: Callable[[Any], Any], runs: int = 10
) -> dict[str, Any]:
    """Per kept layer: its time in float in the fallback model against its int8 time in the fully quantized one
    (ms, OpenVINO's per-layer performance counters, same feed, median of `runs`; `compile_model` must set
    PERF_COUNT), and both models' summed layer times."""

    full, mixed = timed(quantized, feed, compile_model, runs), timed(fallback, feed, compile_model, runs)
    layers = {}
    for name in kept:
        before, after = _layer_time(name, full), _layer_time(name, mixed)
        if before is not None and after is not None:
            layers[name] = {"kept_ms": round(after, 4), "quantized_ms": round(before, 4), "cost_ms": round(after - before, 4)}
    return {
        "layers": layers,
        "total_quantized_ms": round(sum(t for _, t in full.values()), 3),
        "total_with_fallback_ms": round(sum(t for _, t in mixed.values()), 3),
    }


class IgnoredScopeBackend:
    """`vlmopt.quantization.accuracy`'s view of an NNCF int8 model: kept layers go into NNCF's ignored scope and the
    model is quantized again (`Requantizer`), so the model shipped is the model measured."""

    def __init__(
        self,
        quantized: Any,
        original: Any,
        quantize: Callable[[list[str]], Any],
        compile_model: Callable[[Any], Any],
        profiled: Callable[[Any], Any],
        tier: str,
    ) -> None:
        self.probe = FakeQuantizeProbe(quantized)
        self.requantizer = Requantizer(quantized, self.probe.candidates, quantize)
        self.quantized = quantized
        self.original = original
        self.candidates = self.probe.candidates
        self.compile_model = compile_model
        self.profiled = profiled
        self.tier = tier

    def revert(self, kept: list[str]) -> Any:
        return self.requantizer.revert(kept)

    def op_type(self, layer: str) -> str:
        return self.probe.op_types[layer]

    def ranking(self, feeds: list[dict[str, np.ndarray]]) -> list[tuple[str, float]]:
        return sensitivity(self.probe, feeds, self.compile_model)

    def errors(self, reference: list[dict[str, np.ndarray]], feeds: list[dict[str, np.ndarray]]) -> Callable[[Any], np.ndarray]:
        return cosine_errors(reference, feeds, self.compile_model)

    def costs(self, model: Any, kept: list[str], feed: dict[str, np.ndarray]) -> dict[str, Any]:
        costs = layer_costs(self.quantized, model, kept, feed, self.profiled)
        costs["total_fp32_ms"] = round(sum(t for _, t in timed(self.original, feed, self.profiled).values()), 3)
        return costs
