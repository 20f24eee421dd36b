"""Typed records that one stage writes into the manifest and another reads.

- `Traits`: what an artifact's content *is* (precision, fused, ONNX Runtime-only operators, TensorRT
  readiness, sparsity, family). Later stages decide on these. Traits a child carries over from its
  parent unchanged are listed in `inherited`, so a record never passes a parent's fact off as its own.
- `TowerRecord`: one graph (or engine) of an artifact: its file, its interface (`Tower`) and size.
- `Verification`: how an artifact was checked against its reference, per tower and per kind of data.

What a stage did (fused-operator counts, calibration, pruning before/after) is the stage's own
`record`, a plain mapping that no other stage reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vlmopt.families.base import Tower

#: traits a derived artifact keeps from its parent unless its stage changes them
_CARRIED = ("family", "model_type", "sparsity", "two_four_sparse", "fused", "ort_only_ops", "precision", "attn_implementation")


@dataclass
class Sparsity:
    """Zeros written into a tower's weights by `prune` (no masks)."""

    pattern: str
    scope: str
    target: float
    achieved: float
    layers: int


@dataclass
class Traits:
    """What an artifact's content is, as later stages and runners decide on it."""

    family: str | None = None
    model_type: str | None = None
    precision: str = "fp32"
    #: ONNX Runtime's transformer fusions were applied (Attention, SkipLayerNormalization, ...)
    fused: bool = False
    #: operator domains beyond standard ONNX (com.microsoft): ONNX Runtime only, TensorRT cannot parse them
    ort_only_ops: list[str] = field(default_factory=list)
    #: where the graph is meant to run: cpu, or tensorrt (symmetric Q/DQ a strongly typed build takes)
    target: str | None = None
    #: per tower, why a strongly typed TensorRT build cannot take the graph (None: it can); empty: not checked
    tensorrt_issues: dict[str, str | None] = field(default_factory=dict)
    #: per tower, zeros written into the weights; `two_four_sparse` when every pruned tower is 2:4
    sparsity: dict[str, Sparsity] = field(default_factory=dict)
    two_four_sparse: bool = False
    attn_implementation: str | None = None
    #: names of the traits above that were carried over from the parent unchanged
    inherited: list[str] = field(default_factory=list)

    def derive(self, **changes: Any) -> Traits:
        """A child's traits: the carried ones from this (parent) record, `changes` applied, and which were inherited said."""
        carried = {name: getattr(self, name) for name in _CARRIED}
        values = {**carried, **changes}
        inherited = [name for name in _CARRIED if name not in changes and values[name] != getattr(Traits(), name)]
        return Traits(**values, inherited=inherited)

    def tensorrt_ready(self) -> bool | None:
        if not self.tensorrt_issues:
            return None
        return all(issue is None for issue in self.tensorrt_issues.values())

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Traits:
        data = dict(data)
        data["sparsity"] = {tower: Sparsity(**s) for tower, s in (data.get("sparsity") or {}).items()}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class TowerRecord:
    """One graph of an artifact: its file (relative to the artifact's folder), interface and size.

    `engine` is what a backend needs beyond the file to load it (TensorRT: version, GPU, profiles). `prefill`: a
    decoder's second graph for the prompt (`quantize --prefill`), same inputs and outputs, other weights."""

    tower: Tower
    file: str | None = None
    size: int | None = None
    engine: dict[str, Any] | None = None
    prefill: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = {"file": self.file, "size": self.size, **self.tower.to_json()}
        if self.engine is not None:
            data["engine"] = self.engine
        if self.prefill is not None:
            data["prefill"] = self.prefill
        return data

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> TowerRecord:
        return cls(Tower.from_json(name, data), data.get("file"), data.get("size"), data.get("engine"), data.get("prefill"))


# -- verification ---------------------------------------------------------------------------------
@dataclass
class OutputCheck:
    """One output compared on a set of feeds: the worst max |diff| (and where), the worst and the mean row cosine;
    `passed`: within every gate that applies to it."""

    output: str
    max_abs_diff: float
    cosine_min: float
    cosine_mean: float
    worst_at: dict[str, int] | None = None
    passed: bool = True


@dataclass
class DataCheck:
    """A tower's outputs compared on one kind of data: `real` (photos, sentences) or `synthetic` (random inputs).

    `gated`: the thresholds apply to these figures."""

    data: str
    source: str
    feeds: int
    samples: int
    outputs: dict[str, OutputCheck]
    gated: bool = True

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DataCheck:
        return cls(**{**data, "outputs": {k: OutputCheck(**v) for k, v in data["outputs"].items()}})


@dataclass
class MetricCheck:
    """A task-level figure (zero-shot top-1 agreement, retrieval agreement, token agreement) and its gate."""

    name: str
    value: float
    data: str
    threshold: float | None = None
    higher_is_better: bool = True
    detail: dict[str, Any] = field(default_factory=dict)
    #: the option that sets `threshold` ("--min-token-agreement"), for the failure message
    gate: str | None = None

    @property
    def passed(self) -> bool:
        if self.threshold is None:
            return True
        return self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold


#: the options that gate a generative variant's token figures
TOKEN_GATES = ("--min-token-agreement", "--max-ppl-increase")
_TOKEN_LABELS = {"--min-token-agreement": "top-1 agreement", "--max-ppl-increase": "perplexity"}


def _token_text(metric: MetricCheck) -> str:
    """`top-1 agreement 0.6750, not gated` / `perplexity +33.4% > +5.0%, FAILED`."""
    percent = metric.gate == "--max-ppl-increase"
    value = f"{metric.value:+.1%}" if percent else f"{metric.value:.4f}"
    label = _TOKEN_LABELS.get(metric.gate or "", metric.name)
    if metric.detail.get("graph") == "prompt":  # `quantize --prefill`'s prompt decoder, gated beside the decoder
        label = f"prompt decoder {label}"
    if metric.threshold is None:
        return f"{label} {value}, not gated"
    limit = f"{metric.threshold:+.1%}" if percent else f"{metric.threshold:g}"
    sign = ("<=" if metric.passed else ">") if percent else (">=" if metric.passed else "<")
    return f"{label} {value} {sign} {limit}" + ("" if metric.passed else ", FAILED")


@dataclass
class Verification:
    """How an artifact compared with its reference (PyTorch, or its parent) before it was committed."""

    reference: str
    gates: dict[str, float | None]
    towers: dict[str, list[DataCheck]]
    metrics: list[MetricCheck] = field(default_factory=list)
    passed: bool = True
    failures: list[str] = field(default_factory=list)

    def gated_outputs(self) -> list[tuple[str, OutputCheck]]:
        return [(tower, o) for tower, checks in self.towers.items() for c in checks if c.gated for o in c.outputs.values()]

    def worst_cosine(self) -> float | None:
        outputs = self.gated_outputs()
        return min(o.cosine_min for _, o in outputs) if outputs else None

    def worst_abs_diff(self) -> float | None:
        outputs = self.gated_outputs()
        return max(o.max_abs_diff for _, o in outputs) if outputs else None

    def metric(self, name: str) -> MetricCheck | None:
        return next((m for m in self.metrics if m.name == name), None)

    def token_metrics(self) -> list[MetricCheck]:
        """A generative variant's token figures (agreement, perplexity increase), gated or not."""
        return [m for m in self.metrics if m.gate in TOKEN_GATES]

    def verdict(self) -> str:
        """One line: passed or FAILED, then each token figure and whether it was gated, then the worst cosine (or max
        |diff| where only an atol gate applies). A variant whose token gates were off does not pass on the cosine of
        parts it left unchanged without saying so."""
        details = [_token_text(m) for m in self.token_metrics()]
        if self.gates.get("min_cosine") is not None or self.gates.get("atol") is None:
            worst = self.worst_cosine()
            if worst is not None:
                details.append(f"cosine min {worst:.4f}")
        else:
            worst = self.worst_abs_diff()
            if worst is not None:
                details.append(f"max |diff| {worst:.1e}")
        return ("passed" if self.passed else "FAILED") + (f" ({'; '.join(details)})" if details else "")

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for metric, check in zip(data["metrics"], self.metrics, strict=True):
            metric["passed"] = check.passed
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Verification:
        metrics = [MetricCheck(**{k: v for k, v in m.items() if k != "passed"}) for m in data.get("metrics", [])]
        towers = {t: [DataCheck.from_json(c) for c in checks] for t, checks in data["towers"].items()}
        return cls(data["reference"], data.get("gates", {}), towers, metrics, data.get("passed", True), data.get("failures", []))


# -- the recommendation ---------------------------------------------------------------------------
@dataclass
class Choice:
    """For one tower and batch size: the fastest artifact that passed its fidelity gate in a bench run, or None.

    `gate` says what it was held to (`cosine >= 0.99 (its quantize gate)`); `digest` is the artifact's content
    when it was measured, so a reader can tell a re-made artifact from the one measured; `rejected` says, for
    each faster artifact that was passed over, why."""

    tower: str
    batch: int
    artifact: str | None
    backend: str | None = None
    digest: str | None = None
    latency_ms: float | None = None
    throughput: float | None = None
    speedup: float | None = None
    cosine_min: float | None = None
    gate: str | None = None
    rejected: dict[str, str] = field(default_factory=dict)


@dataclass
class Recommendation:
    """What `bench` chose for each tower and batch size: the artifact `package` and `serve` are to deploy by default.

    Kept in the manifest (`vlmopt.json`, key `recommendation`) and in the bench report that made it."""

    report: str
    created: str
    #: the cosine-against-PyTorch every artifact was held to (`--select-min-cosine`); None: each its own recorded gate
    select_min_cosine: float | None
    choices: list[Choice] = field(default_factory=list)

    def unmet(self) -> list[Choice]:
        """Towers and batches for which no artifact passed its gate."""
        return [c for c in self.choices if c.artifact is None]

    def choice(self, tower: str, batch: int) -> Choice | None:
        return next((c for c in self.choices if c.tower == tower and c.batch == batch), None)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recommendation:
        choices = [Choice(**c) for c in data.get("choices", [])]
        return cls(data["report"], data["created"], data.get("select_min_cosine"), choices)
