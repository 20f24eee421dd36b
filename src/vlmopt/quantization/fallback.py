"""Accuracy-aware quantization: find the layers whose quantization costs the most, keep the fewest of them in fp32.

How it works (issue 10's study; NNCF's `quantize_with_accuracy_control`, ModelOpt's `auto_quantize` and
Intel Neural Compressor's accuracy-driven tuning were the anchors):

1. The stage quantizes a tower ONCE with its ONNX Runtime quantizer (dynamic, static QDQ, MatMulNBits).
   Every one of them keeps the output tensor name of each node it replaces, so the fp32 graph F and the
   quantized graph Q share their boundary tensors. `Splicer(F, Q)` finds, for each quantized node of F, the
   small subgraph of Q that replaces it (its *slice*). With slices any mix of fp32 and quantized nodes is a
   graph edit, with no quantizer re-run and no re-calibration:
     - `revert(kept)`: Q with the `kept` nodes back in fp32 (what a fallback ships);
     - `probe()`: F plus every slice fed from F's own tensors, both outputs exposed: the per-layer error of
       all candidates in ONE run.
2. Sensitivity (`sensitivity`): per candidate, the relative RMS error of its own output, quantized vs fp32,
   on the same fp32 inputs (the "local" proxy). Measured on MiniLM and MPNet it kept the same layers as
   NNCF's revert-one-at-a-time ranking and ModelOpt's quantize-one-at-a-time one, for one run instead of one
   per layer. It is also the diagnosis printed when a gate is missed.
3. Search (`search`): keep the 1, 2, 4, ... most sensitive nodes in fp32 until the gate passes, bisect down to
   the fewest that pass, then give back (re-quantize) kept nodes, least sensitive first, while it still passes.
   Each step is a graph edit plus one evaluation on the gate data.
4. The stage ships `revert(kept)` itself: the graph that was measured. For dynamic and MatMulNBits graphs it
   equals the quantizer run with `nodes_to_exclude=kept`; for static QDQ it is better (the quantizer also
   rounds the residual stream around excluded nodes: MiniLM 0.9951 spliced vs 0.9909 re-quantized).
   `layer_costs` profiles both graphs with ONNX Runtime: the time each kept node costs.

Nothing here knows a model: the ranking comes from data, so it holds for encoders it was never tuned on.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from vlmopt.errors import VlmoptError

#: the operators a quantizer replaces that a fallback can put back in fp32
QUANTIZABLE = ("MatMul", "Gemm", "Attention", "MultiHeadAttention", "Conv", "Gather")


# -- graph editing -------------------------------------------------------------------------------------
def _topological(nodes: list[Any], available: set[str]) -> list[Any]:
    """Kahn's order; `available` = graph inputs + initializers (+ '' for absent optional inputs)."""
    ready = set(available) | {""}
    pending, ordered = list(nodes), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({i for n in rest for i in n.input if i not in ready})[:5]
            raise ValueError(f"graph edit left unresolved inputs: {missing}")
        pending = rest
    return ordered


def _dead_code(model: Any) -> None:
    """Drop nodes whose outputs nobody reads, and initializers nobody reads."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        used = outputs | {i for n in graph.node for i in n.input}
        keep = [n for n in graph.node if any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input} | outputs
    initializers = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def _replace_nodes(model: Any, nodes: list[Any], initializers: Iterable[Any], value_info: Iterable[Any] = ()) -> None:
    """Set the graph's nodes (topologically sorted) and add initializers. `value_info` is kept for the tensors that
    remain: ONNX Runtime's fusions depend on it (without it SkipLayerNormalization is not fused and a per-tensor int8
    graph's output moves by up to 1e-2, so the splice would not be what the quantizer made)."""
    graph = model.graph
    have = {t.name for t in graph.initializer}
    graph.initializer.extend(t for t in initializers if t.name not in have)
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    ordered = _topological(nodes, available)
    del graph.node[:]
    graph.node.extend(ordered)
    present = {o for n in ordered for o in n.output}
    infos, seen = [], set()
    for info in [*graph.value_info, *value_info]:
        if info.name in present and info.name not in seen:
            infos.append(copy.deepcopy(info))
            seen.add(info.name)
    del graph.value_info[:]
    graph.value_info.extend(infos)


@dataclass
class Slice:
    """The nodes of the quantized graph that replace one fp32 node."""

    node: str
    op_type: str
    outputs: list[str]
    nodes: list[Any]
    initializers: list[str]
    #: every fp32 tensor the slice's nodes produce (the outputs, and tensors the quantizer re-made, such as a
    #: Transpose the QDQ quantizer moved behind a DequantizeLinear)
    restores: list[str]


class Splicer:
    """Mixes an fp32 graph and its fully quantized version node by node (see the module docstring)."""

    def __init__(self, fp32: Any, quantized: Any, op_types: Sequence[str] = QUANTIZABLE):
        self.op_types = tuple(op_types)
        self.fp32 = fp32
        self.quantized = quantized
        self.f_init = {t.name: t for t in fp32.graph.initializer}
        self.q_init = {t.name: t for t in quantized.graph.initializer}
        f_tensors = {i.name for i in fp32.graph.input} | set(self.f_init) | {o for n in fp32.graph.node for o in n.output}
        self.f_producer = {o: n for n in fp32.graph.node for o in n.output}
        q_producer = {o: n for n in quantized.graph.node for o in n.output}

        def same(a: Any, b: Any) -> bool:
            return a.op_type == b.op_type and list(a.input) == list(b.input)

        self.slices: dict[str, Slice] = {}
        for node in fp32.graph.node:
            if node.op_type not in self.op_types or not node.output:
                continue
            producer = q_producer.get(node.output[0])
            if producer is None or same(producer, node):
                continue  # absent, or untouched by the quantizer
            # backward in Q from the node's outputs down to tensors Q computes exactly as F does
            stack, seen, members, inits = list(node.output), set(), [], set()
            while stack:
                name = stack.pop()
                if name in seen or name == "":
                    continue
                seen.add(name)
                if name in self.q_init:
                    inits.add(name)
                    continue
                prod = q_producer.get(name)
                if prod is None:
                    continue  # a graph input
                if name in f_tensors and name not in node.output and name in self.f_producer and same(prod, self.f_producer[name]):
                    continue
                if name in f_tensors and name not in self.f_producer:
                    continue  # F's graph input or initializer
                if all(id(prod) != id(m) for m in members):
                    members.append(prod)
                    stack.extend(prod.input)
            restores = sorted({o for m in members for o in m.output if o in self.f_producer})
            self.slices[node.name] = Slice(node.name, node.op_type, list(node.output), members, sorted(inits), restores)
        self.candidates = [n.name for n in fp32.graph.node if n.name in self.slices]
        self.f_nodes = {n.name: n for n in fp32.graph.node}

    def weight_size(self, name: str) -> int:
        """Elements of the node's constant inputs: its share of the weights."""
        return int(sum(int(np.prod(self.f_init[i].dims)) for i in self.f_nodes[name].input if i in self.f_init)) or 1

    def revert(self, kept: Iterable[str]) -> Any:
        """The quantized graph with the `kept` nodes back in fp32."""
        kept = [k for k in kept if k in self.slices]
        model = copy.deepcopy(self.quantized)
        heads = {o for k in kept for o in self.slices[k].restores}
        nodes = [n for n in model.graph.node if not (set(n.output) & heads)]
        fp32_nodes, added = [], set()
        for tensor in sorted(heads):
            producer = self.f_producer[tensor]
            if id(producer) not in added:
                added.add(id(producer))
                fp32_nodes.append(copy.deepcopy(producer))
        needed = {i for n in fp32_nodes for i in n.input if i in self.f_init}
        _replace_nodes(model, nodes + fp32_nodes, [self.f_init[i] for i in needed], self.fp32.graph.value_info)
        self._bypass_idle_qdq(model)
        _dead_code(model)
        return model

    def _bypass_idle_qdq(self, model: Any) -> None:
        """ONNX Runtime's QDQ quantizer makes every reader of a quantized activation read the DequantizeLinear output
        (the residual Add included). Where no quantized compute node reads the pair any more, its readers get the
        fp32 tensor back."""
        graph = model.graph
        producer = {o: n for n in graph.node for o in n.output}
        readers: dict[str, list[Any]] = {}
        for n in graph.node:
            for i in n.input:
                readers.setdefault(i, []).append(n)
        initializers = {t.name for t in graph.initializer}
        for dq in list(graph.node):
            if dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear" or q.input[0] in initializers:
                continue
            users = readers.get(dq.output[0], [])
            if any(u.op_type in self.op_types for u in users):
                continue
            for u in users:
                u.input[:] = [q.input[0] if i == dq.output[0] else i for i in u.input]

    def probe(self, nodes: Iterable[str] | None = None) -> tuple[Any, dict[str, tuple[str, str]]]:
        """F plus, per candidate, a renamed copy of its quantized slice fed from F's tensors, both outputs exposed.
        Returns the model and {node: (fp32 output, quantized output)}."""
        import onnx

        nodes = list(nodes or self.candidates)
        model = copy.deepcopy(self.fp32)
        added, inits, pairs = [], set(), {}
        for k, name in enumerate(nodes):
            sl = self.slices[name]
            internal = {o for m in sl.nodes for o in m.output}
            rename = {t: f"{t}__probe{k}" for t in internal}
            for member in sl.nodes:
                twin = copy.deepcopy(member)
                twin.name = f"{member.name}__probe{k}"
                twin.input[:] = [rename.get(i, i) for i in twin.input]
                twin.output[:] = [rename.get(o, o) for o in twin.output]
                added.append(twin)
            inits.update(sl.initializers)
            pairs[name] = (sl.outputs[0], rename[sl.outputs[0]])
        _replace_nodes(model, list(model.graph.node) + added, [self.q_init[i] for i in inits], self.quantized.graph.value_info)
        for ref, q in pairs.values():
            model.graph.output.extend([onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in (ref, q)])
        return model, pairs


# -- running graphs ---------------------------------------------------------------------------------------
def session(model: Any, threads: int | None = None, profile_dir: str | None = None) -> Any:
    """An ONNX Runtime CPU session of an in-memory graph."""
    import onnxruntime as ort

    from vlmopt.runners.ort_runner import quiet_cpu_options

    options = quiet_cpu_options(threads)
    if profile_dir:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(profile_dir, "profile")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def cosine_errors(reference: list[dict[str, np.ndarray]], feeds: list[dict[str, np.ndarray]], threads: int | None = None) -> Callable[[Any], np.ndarray]:
    """An evaluation callback: per sample (batch row) 1 - cosine against `reference` (the fp32 parent's outputs for
    `feeds`), the worst over outputs."""
    from vlmopt.verification.compare import rowwise_cosine

    def evaluate(model: Any) -> np.ndarray:
        sess = session(model, threads)
        names = {i.name for i in sess.get_inputs()}
        outputs = list(reference[0])
        errors = []
        for feed, ref in zip(feeds, reference, strict=True):
            got = sess.run(outputs, {k: v for k, v in feed.items() if k in names})
            worst = np.max([1.0 - rowwise_cosine(ref[name], value) for name, value in zip(outputs, got, strict=True)], axis=0)
            errors.append(worst)
        return np.concatenate(errors)

    return evaluate


# -- sensitivity ----------------------------------------------------------------------------------------------
def relative_errors(runs: Iterable[dict[str, tuple[np.ndarray, np.ndarray]]]) -> list[tuple[str, float]]:
    """[(layer, relative RMS error of its output over all runs)], most sensitive first; each run maps a layer to its
    (reference, quantized) outputs on the same inputs."""
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for outputs in runs:
        for layer, (reference, quantized) in outputs.items():
            reference = np.asarray(reference, dtype=np.float64)
            num[layer] = num.get(layer, 0.0) + float(((reference - quantized) ** 2).sum())
            den[layer] = den.get(layer, 0.0) + float((reference**2).sum())
    scores = {n: (num[n] / max(den[n], 1e-30)) ** 0.5 for n in num}
    return sorted(scores.items(), key=lambda kv: kv[1], reverse=True)


def sensitivity(splicer: Splicer, feeds: list[dict[str, np.ndarray]], threads: int | None = None) -> list[tuple[str, float]]:
    """[(node, relative RMS error of its output when only it is quantized, on fp32 inputs)], most sensitive first."""
    model, pairs = splicer.probe()
    sess = session(model, threads)
    names = {i.name for i in sess.get_inputs()}
    outputs = [n for pair in pairs.values() for n in pair]

    def runs() -> Iterator[dict[str, tuple[np.ndarray, np.ndarray]]]:
        for feed in feeds:
            got = dict(zip(outputs, sess.run(outputs, {k: v for k, v in feed.items() if k in names}), strict=True))
            yield {node: (got[ref], got[q]) for node, (ref, q) in pairs.items()}

    return relative_errors(runs())


# -- budget ------------------------------------------------------------------------------------------------------
def check_budget(fallback: bool, share: float | None) -> None:
    """The `--fallback-budget` rule both stages share: it bounds the fallback, so it needs one."""
    if share is not None and not fallback:
        raise VlmoptError("--fallback-budget bounds the fallback, and --no-fallback turns it off; drop one of them")


def layer_budget(share: float | None, layers: int) -> int:
    """The most layers the fallback may keep out of a tower's `layers` quantized ones: `share` of them (the default
    budget when None), rounded down, and never all of them (that would be the fp32 graph under another name)."""
    from vlmopt.options import FALLBACK_BUDGET

    share = FALLBACK_BUDGET if share is None else share
    return max(0, min(int(layers * share + 1e-9), layers - 1))


# -- search ----------------------------------------------------------------------------------------------------
@dataclass
class Step:
    kept: int
    value: float
    passed: bool
    phase: str


@dataclass
class Result:
    """What a search found: the kept nodes, the gate value reached and that of the fully quantized graph."""

    passed: bool
    kept: list[str]
    value: float
    full_value: float
    candidates: int
    ranking: list[tuple[str, float]]
    steps: list[Step] = field(default_factory=list)
    evaluations: int = 0
    seconds: float = 0.0
    #: why the search stopped before it found the fewest layers (None: it did not)
    stopped: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ranking"] = [{"node": n, "sensitivity": s} for n, s in self.ranking]
        return data


def search(
    splicer: Any,
    evaluate: Callable[[Any], np.ndarray],
    threshold: float,
    ranking: list[tuple[str, float]],
    max_kept: int | None = None,
    full_errors: np.ndarray | None = None,
    say: Callable[[str], None] = lambda message: None,
    seconds: float | None = None,
) -> Result:
    """The fewest of the ranked nodes to keep out of int8 for min cosine >= `threshold` (errors are 1 - cosine per
    sample), at most `max_kept`; when none passes, the best value seen and at which count.

    It stops early where it cannot succeed: the most the budget allows (`max_kept` nodes) is tried first, and when
    that misses the gate no smaller set is tried. After `seconds` it stops too, with the smallest passing set found
    so far, or none (`Result.stopped` says why)."""
    started = time.perf_counter()
    full = evaluate(splicer.quantized) if full_errors is None else full_errors
    evaluations = int(full_errors is None)

    def value(errors: np.ndarray) -> float:
        return float(1.0 - errors.max())

    result = Result(value(full) >= threshold, [], value(full), value(full), len(splicer.candidates), ranking)
    result.steps.append(Step(0, value(full), result.passed, "fully quantized"))
    order = [n for n, _ in ranking]
    limit = min(len(order) if max_kept is None else max_kept, len(order))
    cache: dict[int, float] = {0: value(full)}

    def finish(passed: bool, kept: int, stopped: str | None = None) -> Result:
        result.passed, result.kept, result.value, result.stopped = passed, order[:kept], cache[kept], stopped
        result.evaluations, result.seconds = evaluations, time.perf_counter() - started
        return result

    if result.passed:
        return finish(True, 0)

    def passes(k: int, phase: str) -> bool:
        nonlocal evaluations
        if k not in cache:
            cache[k] = value(evaluate(splicer.revert(order[:k])))
            evaluations += 1
            result.steps.append(Step(k, cache[k], cache[k] >= threshold, phase))
            say(f"keeping {k} layers out of int8: cosine min {cache[k]:.5f}")
        return cache[k] >= threshold

    def out_of_time() -> bool:
        return seconds is not None and time.perf_counter() - started > seconds

    if limit == 0:
        return finish(False, 0, "the budget keeps no layer")
    if not passes(limit, "budget"):
        best = max(cache, key=lambda j: cache[j])
        return finish(False, best, f"the budget's {limit} layers reach {cache[limit]:.6f}, below {threshold:.6f}: no smaller set can pass")
    low, high, k = 0, limit, 1
    while k < high:
        if out_of_time():
            return finish(True, high, f"stopped after {seconds:g} s")
        if passes(k, "double"):
            high = k
            break
        low = k
        k *= 2
    while high - low > 1:
        if out_of_time():
            return finish(True, high, f"stopped after {seconds:g} s")
        middle = (low + high) // 2
        if passes(middle, "bisect"):
            high = middle
        else:
            low = middle
    kept, reached = order[:high], cache[high]
    for name in reversed(order[:high]):
        if len(kept) <= 1 or out_of_time():
            break
        trial = [n for n in kept if n != name]
        trial_value = value(evaluate(splicer.revert(trial)))
        evaluations += 1
        ok = trial_value >= threshold
        result.steps.append(Step(len(trial), trial_value, ok, f"give back {name}"))
        if ok:
            kept, reached = trial, trial_value
            say(f"gave back {name}: cosine min {trial_value:.5f}")
    result.passed, result.kept, result.value = True, kept, reached
    result.evaluations, result.seconds = evaluations, time.perf_counter() - started
    return result


# -- what each kept node costs ----------------------------------------------------------------------------------
def _profile(model: Any, feed: dict[str, np.ndarray], runs: int, threads: int | None) -> dict[str, float]:
    """Median microseconds per node over `runs` (ONNX Runtime's profiler, after 2 warm-up runs)."""
    with tempfile.TemporaryDirectory(prefix="vlmopt-profile-") as folder:
        sess = session(model, threads, profile_dir=folder)
        names = {i.name for i in sess.get_inputs()}
        f = {k: v for k, v in feed.items() if k in names}
        for _ in range(2 + runs):
            sess.run(None, f)
        with open(sess.end_profiling()) as fh:
            events = json.load(fh)
    per: dict[str, list[float]] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            per.setdefault(event["name"][: -len("_kernel_time")], []).append(float(event["dur"]))
    return {k: float(np.median(v[-runs:])) for k, v in per.items()}


def layer_costs(splicer: Splicer, kept: Sequence[str], feed: dict[str, np.ndarray], runs: int = 10, threads: int | None = None) -> dict[str, Any]:
    """Per kept node: its fp32 kernel time in the fallback graph against the kernel time of its quantized slice in the
    fully quantized graph (ms, ONNX Runtime's profiler, same feed). A slice node shared by several kept nodes (the
    DynamicQuantizeLinear of q/k/v's common input) is split between them, and counted only when the fallback graph
    no longer runs it. Kernel times on a busy machine are noisy; their order follows the layers' FLOPs."""
    parent = _profile(splicer.fp32, feed, runs, threads)
    full = _profile(splicer.quantized, feed, runs, threads)
    mixed = _profile(splicer.revert(kept), feed, runs, threads)
    owners: dict[str, int] = {}
    for name in kept:
        for member in splicer.slices[name].nodes:
            owners[member.name] = owners.get(member.name, 0) + 1
    layers = {}
    for name in kept:
        quantized = sum(full.get(m.name, 0.0) / owners[m.name] for m in splicer.slices[name].nodes if m.name not in mixed)
        fp32 = mixed.get(name, 0.0)
        layers[name] = {"kept_ms": round(fp32 / 1e3, 4), "quantized_ms": round(quantized / 1e3, 4), "cost_ms": round((fp32 - quantized) / 1e3, 4)}
    return {
        "layers": layers,
        "total_fp32_ms": round(sum(parent.values()) / 1e3, 3),
        "total_quantized_ms": round(sum(full.values()) / 1e3, 3),
        "total_with_fallback_ms": round(sum(mixed.values()) / 1e3, 3),
    }


class SpliceBackend:
    """`vlmopt.quantization.accuracy`'s view of an ONNX Runtime graph: kept layers are spliced back in fp32."""

    tier = "fp32"

    def __init__(self, splicer: Splicer, threads: int | None = None) -> None:
        self.splicer = splicer
        self.quantized = splicer.quantized
        self.candidates = splicer.candidates
        self.threads = threads

    def revert(self, kept: list[str]) -> Any:
        return self.splicer.revert(kept)

    def op_type(self, layer: str) -> str:
        return self.splicer.slices[layer].op_type

    def ranking(self, feeds: list[dict[str, np.ndarray]]) -> list[tuple[str, float]]:
        return sensitivity(self.splicer, feeds, self.threads)

    def errors(self, reference: list[dict[str, np.ndarray]], feeds: list[dict[str, np.ndarray]]) -> Callable[[Any], np.ndarray]:
        return cosine_errors(reference, feeds, self.threads)

    def costs(self, model: Any, kept: list[str], feed: dict[str, np.ndarray]) -> dict[str, Any]:
        return layer_costs(self.splicer, kept, feed, threads=self.threads)
