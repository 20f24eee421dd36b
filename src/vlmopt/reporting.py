"""`vlmopt report DIR`: what a CI job posts and a reviewer reads.

A Markdown summary (for `$GITHUB_STEP_SUMMARY` or a pull-request comment): the model, what failed in
the last `vlmopt run` (steps, gates) and which artifacts are stale or modified, each artifact with its
kind, size, fidelity (worst cosine, per tower) and best speed-up, the speed-ups per tower and batch of
the latest bench report, and the gates. And PNG plots (matplotlib, Agg): latency against batch per
artifact (one panel per tower), and size against fidelity and against speed-up, the Pareto front marked.

Everything is read from the manifest, the latest bench report and the last run's summary; nothing is
measured again.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmopt.errors import VlmoptError
from vlmopt.pipeline import read_summary
from vlmopt.stages.bench import REFERENCE, REPORTS, latest_report
from vlmopt.workspace import Artifact, check_writable, write_atomically

SUMMARY = "summary.md"
PLOTS = {"latency": "latency.png", "fidelity": "size-vs-fidelity.png", "speedup": "size-vs-speedup.png", "tradeoff": "speedup-vs-fidelity.png"}
#: 1 - cosine is drawn on a log scale; identical outputs are drawn at this floor
_DISTANCE_FLOOR = 1e-9


@dataclass
class Report:
    """The summary as Markdown, the files written (summary and plots), and the figures behind them."""

    model_dir: Path
    output: Path
    markdown: str
    files: list[str]
    artifacts: list[dict[str, Any]]
    failures: list[str]
    bench_report: str | None
    plots: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": True,
            "model_dir": str(self.model_dir),
            "output": str(self.output),
            "summary": str(self.output / SUMMARY),
            "plots": self.plots,
            "files": self.files,
            "bench_report": self.bench_report,
            "artifacts": self.artifacts,
            "failures": self.failures,
            "markdown": self.markdown,
        }


# -- figures per artifact and tower, from the latest bench report ----------------------------------
@dataclass
class TowerFigures:
    artifact: str
    tower: str
    size_mb: float
    #: worst cosine against PyTorch over the batches (None for the reference)
    cosine: float | None
    #: geometric mean of the speed-ups over the batches
    speedup: float | None
    #: batch -> (p50, p10, p90) latency in ms
    latency: dict[int, tuple[float, float, float]]


def tower_figures(bench: dict[str, Any]) -> dict[str, list[TowerFigures]]:
    """Per tower, one entry per artifact measured, in the report's order."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in bench.get("rows", []):
        grouped.setdefault((row["tower"], row["artifact"]), []).append(row)
    towers: dict[str, list[TowerFigures]] = {}
    for (tower, artifact), rows in grouped.items():
        cosines = [r["cosine_min"] for r in rows if r.get("cosine_min") is not None]
        speedups = [r["speedup"] for r in rows if r.get("speedup")]
        latency = {}
        for r in rows:
            samples = np.asarray(r["latency_ms"].get("samples") or [r["latency_ms"]["p50"]], dtype=float)
            latency[int(r["batch"])] = (float(np.median(samples)), float(np.percentile(samples, 10)), float(np.percentile(samples, 90)))
        towers.setdefault(tower, []).append(
            TowerFigures(
                artifact,
                tower,
                float(rows[0]["size_mb"]),
                min(cosines) if cosines else None,
                float(math.exp(np.mean(np.log(speedups)))) if speedups else None,
                dict(sorted(latency.items())),
            )
        )
    return towers


def pareto_front(points: list[tuple[float, float]], maximize: bool) -> list[int]:
    """Indices of the points no other point beats on both axes: smaller x, and larger y (`maximize`) or smaller y."""
    sign = -1.0 if maximize else 1.0
    scored = [(x, sign * y) for x, y in points]  # both axes: smaller is better

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] <= b[0] and a[1] <= b[1] and a != b

    front = [i for i, p in enumerate(scored) if not any(dominates(q, p) for j, q in enumerate(scored) if j != i)]
    return sorted(front, key=lambda i: points[i][0])


# -- plots ----------------------------------------------------------------------------------------
def _colors(names: list[str]) -> dict[str, Any]:
    """A colour per artifact (the reference in near-black first), the same in every figure."""
    import matplotlib

    palette = matplotlib.colormaps["tab10"].colors
    others = list(dict.fromkeys(n for n in names if n != REFERENCE))
    colors = {REFERENCE: (0.2, 0.2, 0.2)} if REFERENCE in names else {}
    colors.update({name: palette[i % len(palette)] for i, name in enumerate(others)})
    return colors


def _figure(panels: int) -> tuple[Any, list[Any]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 5.0), squeeze=False, layout="constrained")
    return fig, list(axes[0])


def _legend(fig: Any, colors: dict[str, Any], front: bool = False, lines: bool = False) -> None:
    """One legend for the figure, below the panels: the same artifact has the same colour in every panel."""
    from matplotlib.lines import Line2D

    handles = [
        Line2D(
            [],
            [],
            color=color,
            marker="D" if name == REFERENCE else "o",
            linestyle=("--" if name == REFERENCE else "-") if lines else "none",
            label=f"{name} (PyTorch)" if name == REFERENCE else name,
        )
        for name, color in colors.items()
    ]
    if front:
        handles.append(Line2D([], [], color="0.55", linestyle="--", label="Pareto front (ringed)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 7), fontsize=8, frameon=False)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".tmp-{path.name}")
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()


def _subtitle(bench: dict[str, Any], name: str) -> str:
    machine = bench.get("machine") or {}
    settings = bench.get("settings") or {}
    amount = f"{settings.get('duration'):g} s" if settings.get("duration") else f"{settings.get('iterations')} iterations"
    return f"{name} · {bench.get('device') or machine.get('cpu')} · {machine.get('threads')} threads · {amount} · {bench.get('created', '')}"


def plot_latency(figures: dict[str, list[TowerFigures]], bench: dict[str, Any], name: str, path: Path) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    fig, axes = _figure(len(figures))
    colors = _colors([f.artifact for entries in figures.values() for f in entries])
    for ax, (tower, entries) in zip(axes, figures.items(), strict=True):
        batches = sorted({b for f in entries for b in f.latency})
        for f in entries:
            xs = sorted(f.latency)
            p50 = [f.latency[b][0] for b in xs]
            low = [f.latency[b][0] - f.latency[b][1] for b in xs]
            high = [f.latency[b][2] - f.latency[b][0] for b in xs]
            style = "--" if f.artifact == REFERENCE else "-"
            label = f"{f.artifact} (PyTorch)" if f.artifact == REFERENCE else f.artifact
            marker = "D" if f.artifact == REFERENCE else "o"
            ax.errorbar(xs, p50, yerr=[low, high], marker=marker, markersize=5, linestyle=style, capsize=3, color=colors[f.artifact], label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.set_xlabel("batch")
        ax.set_ylabel("latency per call, ms (median; bars p10–p90)")
        ax.set_title(f"{tower} tower")
        ax.grid(True, which="major", alpha=0.3)
    _legend(fig, colors, lines=True)
    fig.suptitle(f"Latency against batch\n{_subtitle(bench, name)}", fontsize=10)
    _save(fig, path)


def _label_offsets(xs: list[float], heights: list[float]) -> list[float]:
    """Vertical label offsets (points) so that the labels of points drawn close together stack in the points' own order."""

    def spread(values: list[float]) -> float:
        return (max(values) - min(values)) or 1.0

    nx = [x / spread(xs) for x in xs]
    ny = [y / spread(heights) for y in heights]
    offsets = [3.0] * len(xs)
    done: set[int] = set()
    for i in range(len(xs)):
        if i in done:
            continue
        cluster, grew = {i}, True
        while grew:
            near = {j for j in range(len(xs)) for k in cluster if abs(nx[j] - nx[k]) < 0.06 and abs(ny[j] - ny[k]) < 0.08}
            grew = not near <= cluster
            cluster |= near
        for rank, j in enumerate(sorted(cluster, key=lambda j: -heights[j])):
            offsets[j] = 5.0 - 11.0 * rank if len(cluster) > 1 else 3.0
        done |= cluster
    return offsets


def _labelled_point(ax: Any, x: float, y: float, name: str, color: Any, on_front: bool, offset: float, marker: str = "o") -> None:
    """One artifact's point, ringed and starred when it is on the Pareto front, with its name beside it."""
    ax.scatter(
        x,
        y,
        s=80 if on_front else 45,
        color=color,
        edgecolors="black" if on_front else "none",
        linewidths=1.6,
        zorder=4 if on_front else 3,  # the ringed point stays visible where two coincide
        marker=marker,
    )
    ax.annotate(
        name + (" *" if on_front else ""),
        (x, y),
        textcoords="offset points",
        xytext=(8, offset),
        va="center",
        fontsize=8,
        color=tuple(0.75 * c for c in color[:3]),
        bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
        zorder=5,
    )


def _scatter_with_front(ax: Any, entries: list[TowerFigures], ys: list[float], heights: list[float], colors: dict[str, Any], maximize: bool) -> None:
    """Each artifact a point (ringed when on the Pareto front, the front drawn as a dashed staircase), labelled in its colour.

    `heights` are where the points appear on the plot, higher is higher (log or inverted axes), for placing labels."""
    xs = [f.size_mb for f in entries]
    front = pareto_front(list(zip(xs, ys, strict=True)), maximize=maximize)
    if len(front) > 1:
        fx, fy = [xs[i] for i in front], [ys[i] for i in front]
        ax.step(fx, fy, where="post", linestyle="--", color="0.55", linewidth=1.2, zorder=1)
    offsets = _label_offsets(xs, heights)
    for i, f in enumerate(entries):
        _labelled_point(ax, xs[i], ys[i], f.artifact, colors[f.artifact], i in front, offsets[i], marker="D" if f.artifact == REFERENCE else "o")
    if xs:
        low, high = min(xs), max(xs)
        pad = (high - low) * 0.15 or high * 0.1 or 1.0
        ax.set_xlim(max(0.0, low - pad), high + pad * 1.6)
    ax.set_xlabel("size of the tower (graph and weights), MB")
    ax.grid(True, alpha=0.3)


def plot_fidelity(figures: dict[str, list[TowerFigures]], bench: dict[str, Any], name: str, path: Path) -> bool:
    measured = {t: [f for f in entries if f.cosine is not None] for t, entries in figures.items()}
    measured = {t: entries for t, entries in measured.items() if entries}
    if not measured:
        return False
    fig, axes = _figure(len(measured))
    colors = _colors([f.artifact for entries in figures.values() for f in entries])
    for ax, (tower, entries) in zip(axes, measured.items(), strict=True):
        distances = [max(1.0 - f.cosine, _DISTANCE_FLOOR) for f in entries]
        _scatter_with_front(ax, entries, distances, [-math.log10(d) for d in distances], colors, maximize=False)
        _cosine_axis(ax, distances)
        reference = next((f for f in figures[tower] if f.artifact == REFERENCE), None)
        where = f" (PyTorch: {reference.size_mb:.1f} MB)" if reference else ""
        ax.set_title(f"{tower} tower{where}", fontsize=10)
    _legend(fig, {n: c for n, c in colors.items() if n != REFERENCE}, front=True)
    fig.suptitle(f"Size against fidelity: * on the Pareto front (nothing smaller is closer to PyTorch)\n{_subtitle(bench, name)}", fontsize=10)
    _save(fig, path)
    return True


def _cosine_axis(ax: Any, distances: list[float], axis: str = "y") -> None:
    """The y (or x) axis in cosines (0.99, 0.999, ...) on a log scale of 1 - cosine, closest to PyTorch at the top (right)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    scale, limits, which, label_axis = (
        (ax.set_yscale, ax.set_ylim, ax.yaxis, ax.set_ylabel) if axis == "y" else (ax.set_xscale, ax.set_xlim, ax.xaxis, ax.set_xlabel)
    )
    scale("log")
    low = math.floor(math.log10(min(distances)))
    high = math.ceil(math.log10(max(distances)))
    if high - low < 2:
        low, high = low - 1, high + 1
    step = max(1, (high - low) // 6)
    limits(10.0 ** (high + 0.25), 10.0 ** (low - 0.35))  # inverted: the closest at the top, room for labels
    which.set_major_locator(FixedLocator([10.0**e for e in range(low, high + 1, step)]))
    which.set_minor_locator(NullLocator())

    def label(value: float, _: Any) -> str:
        if value <= _DISTANCE_FLOOR * 1.001:
            return "≥ 1 − 1e-9"
        nines = round(-math.log10(value))
        return f"{1 - value:.{max(1, nines)}f}" if nines <= 7 else f"1 − 1e-{nines}"

    which.set_major_formatter(FuncFormatter(label))
    label_axis("worst cosine against PyTorch (log scale of 1 − cosine)")


def plot_speedup(figures: dict[str, list[TowerFigures]], bench: dict[str, Any], name: str, path: Path) -> bool:
    measured = {t: [f for f in entries if f.speedup is not None] for t, entries in figures.items()}
    measured = {t: entries for t, entries in measured.items() if entries}
    if not measured:
        return False
    fig, axes = _figure(len(measured))
    colors = _colors([f.artifact for entries in figures.values() for f in entries])
    batches = sorted({b for entries in figures.values() for f in entries for b in f.latency})
    for ax, (tower, entries) in zip(axes, measured.items(), strict=True):
        speedups = [f.speedup for f in entries]
        _scatter_with_front(ax, entries, speedups, speedups, colors, maximize=True)
        ax.axhline(1.0, color="0.3", linewidth=0.8, linestyle=":")
        ax.set_ylim(0, max(speedups) * 1.18)
        ax.set_ylabel(f"speed-up against PyTorch (geometric mean, batch {', '.join(map(str, batches))})")
        ax.set_title(f"{tower} tower", fontsize=10)
    _legend(fig, colors, front=True)
    fig.suptitle(f"Size against speed-up: * on the Pareto front (nothing smaller is faster)\n{_subtitle(bench, name)}", fontsize=10)
    _save(fig, path)
    return True


def plot_tradeoff(figures: dict[str, list[TowerFigures]], bench: dict[str, Any], name: str, path: Path) -> bool:
    """Speed-up against fidelity per tower, the Pareto front (nothing both faster and closer to PyTorch) ringed and drawn:
    where pruning, distillation and quantization each land between the two."""
    measured = {t: [f for f in entries if f.speedup is not None and f.cosine is not None] for t, entries in figures.items()}
    measured = {t: entries for t, entries in measured.items() if entries}
    if not measured:
        return False
    fig, axes = _figure(len(measured))
    colors = _colors([f.artifact for entries in figures.values() for f in entries])
    for ax, (tower, entries) in zip(axes, measured.items(), strict=True):
        distances = [max(1.0 - f.cosine, _DISTANCE_FLOOR) for f in entries]  # type: ignore[operator]
        speedups = [float(f.speedup) for f in entries]  # type: ignore[arg-type]
        front = pareto_front(list(zip(distances, speedups, strict=True)), maximize=True)
        if len(front) > 1:
            ax.step([distances[i] for i in front], [speedups[i] for i in front], where="pre", linestyle="--", color="0.55", linewidth=1.2, zorder=1)
        offsets = _label_offsets([-math.log10(x) for x in distances], speedups)
        for i, f in enumerate(entries):
            _labelled_point(ax, distances[i], speedups[i], f.artifact, colors[f.artifact], i in front, offsets[i])
        _cosine_axis(ax, distances, axis="x")
        ax.set_ylim(0, max(speedups) * 1.18)
        ax.axhline(1.0, color="0.3", linewidth=0.8, linestyle=":")
        ax.set_ylabel("speed-up against PyTorch (geometric mean over the batches)")
        ax.set_title(f"{tower} tower", fontsize=10)
        ax.grid(True, alpha=0.3)
    _legend(fig, {n: c for n, c in colors.items() if n != REFERENCE}, front=True)
    fig.suptitle(f"Speed-up against fidelity: * on the Pareto front (nothing is both faster and closer to PyTorch)\n{_subtitle(bench, name)}", fontsize=10)
    _save(fig, path)
    return True


def artifact_parameters(model_dir: Any, artifact: Artifact) -> int | None:
    """Parameters of the Hugging Face checkpoint an artifact is (or descends from), counted from its safetensors headers."""
    from safetensors import safe_open

    folder = model_dir.checkpoint_folder(artifact)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    total = 0
    try:
        for file in files:
            with safe_open(file, framework="numpy") as weights:
                for key in weights.keys():  # noqa: SIM118 - safe_open has no __iter__
                    total += math.prod(weights.get_slice(key).get_shape())
    except (OSError, ValueError, RuntimeError):
        return None
    return total


# -- Markdown -------------------------------------------------------------------------------------
def _tower_cosines(artifact: Artifact) -> dict[str, float]:
    worst: dict[str, float] = {}
    if artifact.verification is None:
        return worst
    for tower, output in artifact.verification.gated_outputs():
        worst[tower] = min(worst.get(tower, 1.0), output.cosine_min)
    return worst


def _artifact_rows(entries: list[Any], bench: dict[str, Any] | None, model_dir: Any = None) -> list[dict[str, Any]]:
    hf = next((e.artifact for e in entries if e.artifact.name == REFERENCE), None)
    rows = []
    for entry in entries:
        a = entry.artifact
        speedups = [r["speedup"] for r in (bench or {}).get("rows", []) if r["artifact"] == a.name and r.get("speedup") is not None]
        verification = a.verification
        rows.append(
            {
                "name": a.name,
                "kind": a.kind,
                "stage": a.stage,
                "precision": None if a.kind == "hf" else a.traits.precision,
                "target": a.traits.target,
                "parent": a.parent,
                "size_mb": round(a.size / 2**20, 3),
                "parameters": artifact_parameters(model_dir, a) if model_dir is not None else None,
                "size_vs_hf": a.size / hf.size if hf is not None and hf.size else None,
                "worst_cosine": verification.worst_cosine() if verification else None,
                "verified_against": verification.reference if verification else None,
                "verified": None if verification is None else verification.passed,
                "verdict": None if verification is None else verification.verdict(),
                "token_metrics": {
                    m.name: {"value": m.value, "threshold": m.threshold, "gated": m.threshold is not None, "passed": m.passed}
                    for m in verification.token_metrics()
                }
                if verification
                else {},
                "tower_cosines": _tower_cosines(a),
                "best_speedup": max(speedups) if speedups and a.name != REFERENCE else None,
                "worst_speedup": min(speedups) if speedups and a.name != REFERENCE else None,
                "status": entry.status,
            }
        )
    return rows


def _kind_text(row: dict[str, Any]) -> str:
    if row["kind"] == "hf":
        return "PyTorch (Hugging Face)"
    names = {"onnx": "ONNX", "tensorrt": "TensorRT", "openvino": "OpenVINO"}
    target = " (for TensorRT)" if row["target"] == "tensorrt" and row["kind"] == "onnx" else ""
    return f"{names.get(row['kind'], row['kind'])} {row['precision']}{target}"


def _failures(rows: list[dict[str, Any]], run: dict[str, Any] | None, bench: dict[str, Any] | None) -> tuple[list[str], list[str]]:
    """What failed (steps, gates, artifacts whose files changed or that are stale), and what was skipped and why."""
    failed, skipped = [], []
    if run is not None:
        for step in run.get("steps", []):
            label = f"`{step['id']}`" + (f" ({step['stage']})" if step["id"] != step["stage"] else "")
            if step["status"] == "failed":
                failed.append(f"step {label}: {step['reason']}")
            elif step["status"] == "skipped":
                skipped.append(f"step {label}: {step['reason']}")
        for gate in run.get("gates", []):
            if gate.get("passed") is False:
                failed.append(f"gate {gate['reason']}")
            elif gate.get("passed") is None and gate.get("reason"):
                skipped.append(f"gate {gate['reason']}")
    for row in rows:
        if row["status"] != "ok":
            failed.append(f"artifact `{row['name']}`: {row['status']}")
        if row["verified"] is False:
            failed.append(f"artifact `{row['name']}`: its verification failed")
    for miss in (bench or {}).get("not_measured", []):
        skipped.append(f"bench: {miss['artifact']} {miss['tower']} at batch {miss['batch']} not measured: {miss['reason']}")
    return failed, skipped


def _millions(count: int | None) -> str:
    return "" if count is None else f"{count / 1e6:.2f}M" if count >= 10_000 else str(count)


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(
    name: str,
    model: dict[str, Any] | None,
    rows: list[dict[str, Any]],
    bench: dict[str, Any] | None,
    bench_name: str | None,
    run: dict[str, Any] | None,
    plots: dict[str, str],
    images: bool,
) -> str:
    failed, skipped = _failures(rows, run, bench)
    lines = [f"## vlmopt report: `{name}`", ""]
    if model:
        lines.append(
            f"**Model:** {model.get('family')} (`{model.get('model_type')}`), {model.get('parameters', 0) / 1e6:.1f}M parameters, from `{model.get('source')}`  "
        )
    if bench is not None:
        lines.append(f"**Bench:** `{bench_name}`: {_md(_subtitle(bench, name))}  ")
    if run is not None:
        lines.append(f"**Last run:** `{run.get('recipe')}` at {run.get('created', '?')}, exit {run.get('exit_code')}  ")
    lines.append("")
    if failed:
        lines += ["### ❌ What failed", ""] + [f"- {_md(f)}" for f in failed] + [""]
    else:
        summary = "."
        if run:
            steps = run.get("steps", [])
            skipped_steps = len([s for s in steps if s["status"] == "skipped"])
            gates = run.get("gates", [])
            passed = len([g for g in gates if g.get("passed")])
            unchecked = len(gates) - passed
            summary = f": {len(steps)} steps" + (f" ({skipped_steps} skipped)" if skipped_steps else "")
            summary += f", {passed} of {len(gates)} gates passed" + (f" ({unchecked} not checked)" if unchecked else "") + "."
        lines += ["**✅ Nothing failed**" + summary, ""]
    if skipped:
        lines += ["<details><summary>Skipped</summary>", ""] + [f"- {_md(s)}" for s in skipped] + ["", "</details>", ""]

    lines += [
        "### Artifacts",
        "",
        "| artifact | kind | from | parameters | size MB | size vs hf | worst cosine | per tower | verified against | verification | speed-up | status |",
        "|---|---|---|---:|---:|---:|---:|---|---|---|---:|---|",
    ]
    for r in rows:
        towers = ", ".join(f"{t} {c:.6f}" for t, c in r["tower_cosines"].items())
        speed = ""
        if r["best_speedup"] is not None:
            speed = f"{r['worst_speedup']:.2f}x–{r['best_speedup']:.2f}x" if r["worst_speedup"] != r["best_speedup"] else f"{r['best_speedup']:.2f}x"
        share = "" if r["size_vs_hf"] is None else f"{r['size_vs_hf']:.0%}"
        worst = "" if r["worst_cosine"] is None else f"{r['worst_cosine']:.6f}"
        status = "ok" if r["status"] == "ok" else "⚠️ " + _md(r["status"])
        lines.append(
            f"| `{r['name']}` | {_kind_text(r)} | {r['parent'] or ''} | {_millions(r.get('parameters'))} | {r['size_mb']:.1f} | {share} | {worst} | {towers} | "
            f"{_md(r['verified_against'] or '')} | {_md(r['verdict'] or '')} | {speed} | {status} |"
        )
    lines += [
        "",
        "Parameters: those of the Hugging Face checkpoint the artifact is or was made from (a pruned or distilled one has fewer). "
        "Worst cosine: the lowest row cosine of any gated output in the artifact's verification against its parent (or PyTorch; "
        "a distilled checkpoint against its teacher). "
        "Verification: passed or failed, with a generative variant's token figures and whether each was gated.",
        "",
    ]

    if bench is not None:
        lines += _speedup_table(bench, [r["name"] for r in rows])
        if bench.get("recommendation"):
            from vlmopt.records import Recommendation
            from vlmopt.stages.bench import recommendation_markdown

            lines += [recommendation_markdown(Recommendation.from_json(bench["recommendation"])).replace("## Recommended", "### Recommended"), ""]
    else:
        lines += ["### Speed", "", f"No bench report yet: `vlmopt bench {name}` measures every artifact against PyTorch.", ""]

    if run is not None and run.get("gates"):
        lines += ["### Gates", "", "| gate | artifact | limit | value | result |", "|---|---|---:|---:|---|"]
        for gate in run["gates"]:
            result = {True: "✅ passed", False: "❌ failed", None: "➖ not checked"}[gate.get("passed")]
            value = "" if gate.get("value") is None else f"{gate['value']:.6g}"
            lines.append(f"| {gate['gate']} | `{gate['artifact']}` | {gate['limit']:g} | {value} | {result} |")
        lines.append("")

    if plots:
        lines += ["### Plots", "", "Of the artifacts in the latest bench report.", ""]
        titles = {
            "latency": "Latency against batch",
            "fidelity": "Size against fidelity",
            "speedup": "Size against speed-up",
            "tradeoff": "Speed-up against fidelity",
        }
        for kind, file in plots.items():
            lines.append(f"![{titles[kind]}]({Path(file).name})" if images else f"- {titles[kind]}: `{Path(file).name}`")
        lines.append("")
    return "\n".join(lines)


def _speedup_table(bench: dict[str, Any], order: list[str]) -> list[str]:
    towers = list(dict.fromkeys(r["tower"] for r in bench["rows"]))
    columns = sorted({(r["tower"], int(r["batch"])) for r in bench["rows"]}, key=lambda c: (towers.index(c[0]), c[1]))
    cells: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}
    for r in sorted(bench["rows"], key=lambda r: order.index(r["artifact"]) if r["artifact"] in order else len(order)):
        cells.setdefault(r["artifact"], {})[(r["tower"], int(r["batch"]))] = r
    lines = [
        "### Speed-up against PyTorch",
        "",
        "Mean latency of PyTorch (`hf`) over the artifact's, measured in the same run on the same inputs; p50 latency in ms.",
        "",
        "| artifact | " + " | ".join(f"{t} ×{b}" for t, b in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for artifact, by_column in cells.items():
        row = []
        for column in columns:
            r = by_column.get(column)
            if r is None:
                row.append("")
            elif r.get("speedup") is None:
                row.append(f"{r['latency_ms']['p50']:.2f} ms")
            else:
                row.append(f"{r['speedup']:.2f}x · {r['latency_ms']['p50']:.2f} ms")
        lines.append(f"| `{artifact}` | " + " | ".join(row) + " |")
    lines.append("")
    return lines


# -- the report -----------------------------------------------------------------------------------
def report(directory: str | os.PathLike[str], output: str | os.PathLike[str] | None = None) -> Report:
    """Write `summary.md` and the PNG plots into `output` (default DIR/reports/) and return the summary.

    Raises `VlmoptError` when DIR is not a model directory or `output` cannot be written."""
    from vlmopt.inventory import info
    from vlmopt.stages.bench import model_identity

    model_dir, entries = info(directory)
    out = Path(output) if output is not None else model_dir.path / REPORTS
    if out.exists() and not out.is_dir():
        raise VlmoptError(f"--output {out} exists and is not a folder")
    check_writable(out)
    bench = latest_report(model_dir)
    bench_name = Path(bench["files"][0]).name if bench and bench.get("files") else None
    run = read_summary(model_dir.path)
    entries = sorted(entries, key=lambda e: (e.artifact.name != REFERENCE, e.artifact.created, e.artifact.name))
    rows = _artifact_rows(entries, bench, model_dir)
    model = (bench or {}).get("model") or model_identity(model_dir)
    name = str(directory)

    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    if bench is not None and bench.get("rows"):
        figures = tower_figures(bench)
        plot_latency(figures, bench, name, out / PLOTS["latency"])
        plots["latency"] = str(out / PLOTS["latency"])
        if plot_fidelity(figures, bench, name, out / PLOTS["fidelity"]):
            plots["fidelity"] = str(out / PLOTS["fidelity"])
        if plot_speedup(figures, bench, name, out / PLOTS["speedup"]):
            plots["speedup"] = str(out / PLOTS["speedup"])
        if plot_tradeoff(figures, bench, name, out / PLOTS["tradeoff"]):
            plots["tradeoff"] = str(out / PLOTS["tradeoff"])
    write_atomically(out / SUMMARY, render_markdown(name, model, rows, bench, bench_name, run, plots, images=True).encode())
    markdown = render_markdown(name, model, rows, bench, bench_name, run, plots, images=False)
    failed, _ = _failures(rows, run, bench)
    return Report(model_dir.path, out, markdown, [str(out / SUMMARY), *plots.values()], rows, failed, bench_name, plots)
