"""`vlmopt compare BASELINE CURRENT`: two bench reports, per artifact, tower and batch, and whether CURRENT regressed.

How a slowdown is decided: each bench row keeps its latency samples. For a row measured in both
reports, the samples of each are resampled with replacement (2000 times, fixed seed) and the ratio
of the medians, current over baseline, is taken each time; the 2.5th and 97.5th percentiles of those
ratios are a 95% confidence interval of the slowdown. A regression is called only when the whole
interval lies above `1 + max_slowdown`: a median that moved by more than the limit, but by less than
the two runs' own spread, is reported as within noise. Rows with fewer than 3 samples on either side
are not judged. The PyTorch reference (`hf`) is shown for context (a slower machine or PyTorch shows
there) but not gated. Cosine (each artifact against PyTorch in its own run) and size are exact
figures: a drop or growth beyond the limit is a regression.

BASELINE and CURRENT are each a bench report, a folder of them (its newest), or a model directory (its latest).
Both reports must be of bench report schema 2 and of the same model: the same family and
architecture (the PyTorch reference's tensor names and shapes). Other weights of the same
architecture are compared, with a note.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmopt.errors import EXIT_CHECK_FAILED, EXIT_OK, VlmoptError
from vlmopt.stages.bench import REFERENCE, REPORT_SCHEMA, latest_report
from vlmopt.workspace import MANIFEST_NAME, ModelDir

RESAMPLES = 2000
SEED = 0
CONFIDENCE = 0.95
MIN_SAMPLES = 3
DEFAULT_MAX_SLOWDOWN = 0.10
DEFAULT_MAX_COSINE_DROP = 0.001
DEFAULT_MAX_SIZE_GROWTH = 0.10


def parse_limit(value: float | str | None, flag: str, percent: bool = True) -> float | None:
    """A limit from the command line or Python: `10%`, `0.1`, or `off` (None). Refuses negative or non-finite ones."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("off", "none"):
        return None
    scale = 1.0
    if percent and text.endswith("%"):
        text, scale = text[:-1], 0.01
    try:
        number = float(text) * scale
    except ValueError:
        raise VlmoptError(f"{flag} takes a number{' or a percentage like 10%' if percent else ''}, or off; got {value!r}") from None
    if not np.isfinite(number) or number < 0:
        raise VlmoptError(f"{flag} must be a finite number of at least 0, got {value!r}")
    return number


@dataclass
class RowDelta:
    """One artifact, tower and batch measured in both reports."""

    artifact: str
    tower: str
    batch: int
    sequence: int | None
    baseline_ms: float
    current_ms: float
    #: current median over baseline median, with its 95% bootstrap interval (None: too few samples)
    ratio: float
    low: float | None
    high: float | None
    baseline_cosine: float | None
    current_cosine: float | None
    baseline_size_mb: float
    current_size_mb: float
    verdict: str = "ok"
    problems: list[str] = field(default_factory=list)

    @property
    def cosine_drop(self) -> float | None:
        if self.baseline_cosine is None or self.current_cosine is None:
            return None
        return self.baseline_cosine - self.current_cosine

    @property
    def size_growth(self) -> float | None:
        return self.current_size_mb / self.baseline_size_mb - 1 if self.baseline_size_mb else None

    def to_json(self) -> dict[str, Any]:
        return {
            "artifact": self.artifact,
            "tower": self.tower,
            "batch": self.batch,
            "sequence": self.sequence,
            "latency_ms": {"baseline_p50": self.baseline_ms, "current_p50": self.current_ms},
            "ratio": self.ratio,
            "ratio_interval": None if self.low is None else [self.low, self.high],
            "cosine": {"baseline": self.baseline_cosine, "current": self.current_cosine, "drop": self.cosine_drop},
            "size_mb": {"baseline": self.baseline_size_mb, "current": self.current_size_mb, "growth": self.size_growth},
            "verdict": self.verdict,
            "problems": self.problems,
        }


@dataclass
class Comparison:
    """Every shared row's deltas, the rows only one report has, what regressed, and notes on what differs between the runs."""

    baseline: str
    current: str
    rows: list[RowDelta]
    limits: dict[str, float | None]
    only_baseline: list[str] = field(default_factory=list)
    only_current: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[str]:
        return [f"{r.artifact} {r.tower} batch {r.batch}: {problem}" for r in self.rows for problem in r.problems]

    @property
    def ok(self) -> bool:
        return not self.regressions

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_CHECK_FAILED

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "exit_code": self.exit_code,
            "baseline": self.baseline,
            "current": self.current,
            "limits": self.limits,
            "method": f"bootstrap {CONFIDENCE:.0%} interval of the ratio of median latencies ({RESAMPLES} resamples, seed {SEED})",
            "rows": [r.to_json() for r in self.rows],
            "regressions": self.regressions,
            "only_baseline": self.only_baseline,
            "only_current": self.only_current,
            "notes": self.notes,
        }

    def markdown(self) -> str:
        lines = [
            f"### vlmopt compare: {'no regression' if self.ok else f'{len(self.regressions)} regression(s)'}",
            "",
            f"Baseline `{self.baseline}` → current `{self.current}`. Latency: median p50, change with its 95% bootstrap interval; "
            f"a slowdown counts only when the whole interval is above +{_pct(self.limits['max_slowdown'])}.",
            "",
            "| artifact | tower | batch | baseline ms | current ms | change (95% interval) | cosine Δ | size Δ | verdict |",
            "|---|---|---:|---:|---:|---|---:|---:|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.artifact} | {r.tower} | {r.batch} | {r.baseline_ms:.2f} | {r.current_ms:.2f} | {_change(r)} | "
                f"{_signed(None if r.cosine_drop is None else r.current_cosine - r.baseline_cosine, '{:+.6f}')} | {_signed(r.size_growth, '{:+.1%}')} | {r.verdict} |"
            )
        for problem in self.regressions:
            lines.append(f"\n- **regression**: {problem}")
        for note in self.notes:
            lines.append(f"\n- {note}")
        return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "off" if value is None else f"{value:.0%}"


def _signed(value: float | None, pattern: str) -> str:
    return "" if value is None else pattern.format(value)


def _change(r: RowDelta) -> str:
    text = f"{r.ratio - 1:+.1%}"
    if r.low is not None:
        text += f" ({r.low - 1:+.1%} … {r.high - 1:+.1%})"
    return text


# -- reading reports ------------------------------------------------------------------------------
def load_report(path: str | os.PathLike[str], what: str) -> tuple[dict[str, Any], str]:
    """A bench report from a JSON file, a folder of them (the newest by name: reports/bench-<time>.json) or a model
    directory (its latest bench report); refuses other schemas."""
    target = Path(path)
    if target.is_dir() and not (target / MANIFEST_NAME).is_file():
        # a folder of reports (a model directory's reports/, say, downloaded from another CI run): its newest bench report
        found = sorted(target.glob("bench-*.json"))
        if not found:
            raise VlmoptError(f"{what} {target} is neither a bench report (JSON), a folder of bench reports, nor a vlmopt model directory")
        target = found[-1]
    if target.is_dir():
        report = latest_report(ModelDir(target))
        if report is None:
            raise VlmoptError(f"{what} {target} has no bench report of schema {REPORT_SCHEMA}; measure it with `vlmopt bench {target}`")
        return report, (report.get("files") or [str(target)])[0]
    if not target.is_file():
        raise VlmoptError(f"{what} {target} does not exist")
    try:
        report = json.loads(target.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise VlmoptError(f"{what} {target} is not a JSON bench report ({type(exc).__name__})") from None
    if not isinstance(report, dict) or "rows" not in report:
        raise VlmoptError(f"{what} {target} is not a bench report (no rows)")
    version = report.get("schema_version")
    if version != REPORT_SCHEMA:
        raise VlmoptError(
            f"{what} {target} is a bench report of schema version {version!r}; this vlmopt compares version {REPORT_SCHEMA} (with latency samples): "
            "measure it again with `vlmopt bench`"
        )
    return report, str(target)


def _model(report: dict[str, Any], name: str, what: str) -> dict[str, Any]:
    model = report.get("model")
    if not isinstance(model, dict) or not model.get("architecture"):
        raise VlmoptError(f"{what} {name} does not record which model it measured (no `model` in the report); measure it again with `vlmopt bench`")
    return model


def _describe(model: dict[str, Any]) -> str:
    return (
        f"{model.get('family')}/{model.get('model_type')}, {model.get('parameters', 0) / 1e6:.1f}M parameters, architecture {str(model['architecture'])[:12]}"
    )


def _where(report: dict[str, Any]) -> str:
    machine = report.get("machine") or {}
    return f"{report.get('device') or machine.get('cpu')} with {machine.get('threads')} threads"


def _key(row: dict[str, Any]) -> tuple[str, str, int, int | None]:
    return (row["artifact"], row["tower"], int(row["batch"]), row.get("sequence"))


def _samples(row: dict[str, Any], name: str) -> np.ndarray:
    samples = (row.get("latency_ms") or {}).get("samples")
    if not isinstance(samples, list) or not samples:
        raise VlmoptError(
            f"{name}: row {row.get('artifact')} {row.get('tower')} batch {row.get('batch')} has no latency samples; measure it again with `vlmopt bench`"
        )
    return np.asarray(samples, dtype=float)


def ratio_interval(baseline: np.ndarray, current: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """The 95% bootstrap interval of median(current) / median(baseline): each sample set resampled with replacement."""
    rng = np.random.default_rng(seed)
    base = np.median(baseline[rng.integers(0, len(baseline), (resamples, len(baseline)))], axis=1)
    cur = np.median(current[rng.integers(0, len(current), (resamples, len(current)))], axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(cur / base, [tail, 100 - tail])
    return float(low), float(high)


# -- comparing ------------------------------------------------------------------------------------
def compare(
    baseline: str | os.PathLike[str],
    current: str | os.PathLike[str],
    max_slowdown: float | str | None = DEFAULT_MAX_SLOWDOWN,
    max_cosine_drop: float | str | None = DEFAULT_MAX_COSINE_DROP,
    max_size_growth: float | str | None = DEFAULT_MAX_SIZE_GROWTH,
) -> Comparison:
    """Compare two bench reports (or model directories: their latest report). Raises `VlmoptError` for reports of
    another schema or another model; regressions are in the result (`ok`, `exit_code` 1)."""
    limits = {
        "max_slowdown": parse_limit(max_slowdown, "--max-slowdown"),
        "max_cosine_drop": parse_limit(max_cosine_drop, "--max-cosine-drop", percent=False),
        "max_size_growth": parse_limit(max_size_growth, "--max-size-growth"),
    }
    base_report, base_name = load_report(baseline, "baseline")
    cur_report, cur_name = load_report(current, "current")
    base_model, cur_model = _model(base_report, base_name, "baseline"), _model(cur_report, cur_name, "current")
    identity = ("family", "model_type", "architecture")
    if any(base_model.get(k) != cur_model.get(k) for k in identity):
        raise VlmoptError(f"baseline {base_name} measured another model ({_describe(base_model)}) than current {cur_name} ({_describe(cur_model)})")

    comparison = Comparison(base_name, cur_name, [], limits)
    if base_model.get("weights") != cur_model.get("weights"):
        comparison.notes.append("the weights differ (same architecture): cosines are each against its own PyTorch reference")
    if _where(base_report) != _where(cur_report):
        comparison.notes.append(f"measured on {_where(base_report)} vs {_where(cur_report)}: latency changes mix machine and code")
    base_rows = {_key(r): r for r in base_report["rows"]}
    cur_rows = {_key(r): r for r in cur_report["rows"]}
    comparison.only_baseline = [f"{k[0]} {k[1]} batch {k[2]}" for k in base_rows if k not in cur_rows]
    comparison.only_current = [f"{k[0]} {k[1]} batch {k[2]}" for k in cur_rows if k not in base_rows]
    for key, cur in cur_rows.items():
        base = base_rows.get(key)
        if base is not None:
            comparison.rows.append(_row_delta(base, cur, base_name, cur_name, limits))
    if comparison.only_baseline:
        comparison.notes.append(f"only in the baseline (not compared): {', '.join(comparison.only_baseline)}")
    if comparison.only_current:
        comparison.notes.append(f"only in the current report (not compared): {', '.join(comparison.only_current)}")
    return comparison


def _row_delta(base: dict[str, Any], cur: dict[str, Any], base_name: str, cur_name: str, limits: dict[str, float | None]) -> RowDelta:
    b, c = _samples(base, base_name), _samples(cur, cur_name)
    ratio = float(np.median(c) / np.median(b))
    enough = len(b) >= MIN_SAMPLES and len(c) >= MIN_SAMPLES
    low, high = ratio_interval(b, c) if enough else (None, None)
    row = RowDelta(
        cur["artifact"],
        cur["tower"],
        int(cur["batch"]),
        cur.get("sequence"),
        float(np.median(b)),
        float(np.median(c)),
        ratio,
        low,
        high,
        base.get("cosine_min"),
        cur.get("cosine_min"),
        float(base.get("size_mb") or 0),
        float(cur.get("size_mb") or 0),
    )
    verdicts = []
    slowdown = limits["max_slowdown"]
    if row.artifact == REFERENCE:
        verdicts.append("reference (not gated)")
    elif low is None:
        verdicts.append(f"too few samples to judge ({len(b)} and {len(c)}; at least {MIN_SAMPLES})")
    elif slowdown is not None and low > 1 + slowdown:
        row.problems.append(f"{ratio - 1:+.1%} slower (95% interval {low - 1:+.1%} … {high - 1:+.1%}, above +{slowdown:.0%})")
    elif slowdown is not None and high < 1 / (1 + slowdown):
        verdicts.append("faster")
    elif slowdown is not None and ratio > 1 + slowdown:
        verdicts.append("slower, within noise")
    drop, limit = row.cosine_drop, limits["max_cosine_drop"]
    if drop is not None and limit is not None and drop > limit:
        row.problems.append(f"cosine {row.baseline_cosine:.6f} → {row.current_cosine:.6f} (a drop of {drop:.2g}, above {limit:g})")
    growth, limit = row.size_growth, limits["max_size_growth"]
    if growth is not None and limit is not None and growth > limit:
        row.problems.append(f"size {row.baseline_size_mb:.2f} → {row.current_size_mb:.2f} MB ({growth:+.1%}, above +{limit:.0%})")
    row.verdict = "REGRESSION" if row.problems else (", ".join(verdicts) or "ok")
    return row
