"""`vlmopt bench`: every artifact through the same runner interface, on the same inputs, in one run.

The PyTorch reference (the `hf` artifact) is always measured alongside, so speed-ups and
fidelity are ratios taken on this machine, now, not against remembered numbers.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape

from vlmopt import options as opts
from vlmopt.errors import CheckFailed, VlmoptError
from vlmopt.families import Tower
from vlmopt.inputs import make_inputs
from vlmopt.options import StageOptions, option
from vlmopt.records import Choice, Recommendation
from vlmopt.runners import ArtifactRunners
from vlmopt.stage import RunContext, Stage, StageResult
from vlmopt.verification.compare import compare
from vlmopt.versions import package_version
from vlmopt.workspace import ModelDir, check_writable, write_atomically

REFERENCE = "hf"
#: the PyTorch reference at half precision, measured too when benchmarking on a GPU
FP16_REFERENCE = "hf-fp16"
#: timed calls per contender in each round
_BLOCK = 5


@dataclass
class BenchOptions(StageOptions):
    artifacts: list[str] = option(
        [], "Artifacts to run (default: every runnable one); the PyTorch reference `hf` is always included.", argument=True, metavar="ARTIFACT"
    )
    batch: list[int] = option([1, 8], "Comma-separated batch sizes.", minimum=1, metavar="N,N,...")
    seq_len: int | None = option(None, "Text sequence length (default: the tower's usual length, e.g. 77 for CLIP).", minimum=1)
    tower: list[str] = option([], "Only these towers (repeatable): vision, text, model.")
    warmup: int = option(3, "Untimed runs before measuring.", minimum=0)
    iterations: int = option(20, "Timed runs per measurement.", minimum=1)
    duration: float | None = option(None, "Seconds per measurement instead of a fixed --iterations.", minimum=0.0, maximum=3600.0, exclusive=("min",))
    min_speedup: float | None = option(None, "Exit 1 when any artifact is slower than this multiple of PyTorch.", minimum=0.0, exclusive=("min",))
    torch_attention: str = option("sdpa", "Attention of the PyTorch reference: sdpa (its fastest) or eager.", choices=("sdpa", "eager"))
    device: str = option("cpu", "cpu, or cuda: PyTorch fp32/fp16 on the GPU, ONNX Runtime's CUDA provider, TensorRT engines.", choices=("cpu", "cuda"))
    cuda_graphs: bool = option(False, "Replay TensorRT engines from captured CUDA graphs (--device cuda).")
    select: bool = option(
        False, "Exit 1 when, for some tower and batch, no artifact passed its fidelity gate (the recommendation is recorded either way).", recorded=False
    )
    select_min_cosine: float | None = option(
        None,
        "Hold every artifact to this cosine against PyTorch when choosing the fastest (default: each artifact's own recorded --min-cosine).",
        minimum=0.0,
        maximum=1.0,
        recorded=False,
    )

    def check(self) -> None:
        if not self.batch:
            raise VlmoptError("--batch takes positive batch sizes like 1,8,32")
        if self.cuda_graphs and self.device != "cuda":
            raise VlmoptError("--cuda-graphs replays TensorRT engines on a GPU; add --device cuda")


class PeakRss:
    """Samples this process's resident memory in a thread; `peak - baseline` is what a load+run cost."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self.baseline = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakRss:
        gc.collect()
        self.baseline = self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def increase_mb(self) -> float:
        return (self.peak - self.baseline) / 2**20


def _stats(times: list[float]) -> dict[str, Any]:
    """Latency statistics in ms, with the samples themselves (`vlmopt compare` judges regressions against their spread)."""
    ms = np.asarray(times)
    return {
        "mean": float(ms.mean()),
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "min": float(ms.min()),
        "iterations": len(times),
        "samples": [round(float(t), 4) for t in ms],
    }


def measure_interleaved(calls: dict[str, Callable[[], Any]], warmup: int, iterations: int, duration: float | None) -> dict[str, dict[str, Any]]:
    """Latency statistics (ms) per call, timed in round-robin blocks (A×5, B×5, A×5, ...).

    Interleaving makes the ratios robust on a shared machine: a slow spell (another process, a
    frequency change) hits every contender alike instead of whichever happened to run then.
    Each block starts with one untimed call, because the previous contender's thread pool keeps
    spinning for a while after it returns (timing single alternating calls made PyTorch's batch-1
    vision tower 50% slower here). Stops after `iterations` timed calls per contender, or once
    `duration` seconds per contender have passed.
    """
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    deadline = time.perf_counter() + duration * len(calls) if duration else None
    while True:
        for name, call in calls.items():
            call()  # untimed: lets the previous contender's idle threads stop spinning
            block = _BLOCK if deadline is not None else min(_BLOCK, iterations - len(times[name]))
            for _ in range(block):
                start = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - start) * 1000)
        rounds = len(next(iter(times.values())))
        if (deadline is None and rounds >= iterations) or (deadline is not None and time.perf_counter() >= deadline):
            break
    return {name: _stats(t) for name, t in times.items()}


def _items(tower: Tower, feed: dict[str, np.ndarray]) -> int:
    """Items per call: the (image) batch; for monoliths the images, the prompts being the classes."""
    return int(feed[tower.inputs[0].name].shape[0])


def _sequence(feed: dict[str, np.ndarray]) -> int | None:
    return int(feed["input_ids"].shape[1]) if "input_ids" in feed else None


def _sizes(tower: Tower, batch: int, seq_len: int | None) -> dict[str, int]:
    sizes = dict(tower.bench_sizes)
    sizes.update({"batch": batch, "image_batch": batch})
    sizes.setdefault("text_batch", 8)
    if seq_len is not None:
        if tower.vocab and seq_len > tower.vocab.max_length:
            raise VlmoptError(f"--seq-len {seq_len} is longer than the {tower.name} tower's {tower.vocab.max_length} positions")
        sizes["sequence"] = seq_len
    sizes.setdefault("sequence", tower.vocab.max_length if tower.vocab else 1)
    return sizes


def _accepts(tower: Tower, feed: dict[str, np.ndarray]) -> bool:
    """Whether the feed fits the tower's fixed dimensions (a static-shape export runs one shape only)."""
    for spec in tower.inputs:
        shape = feed[spec.name].shape
        if len(shape) != len(spec.shape) or any(isinstance(d, int) and d != n for d, n in zip(spec.shape, shape, strict=True)):
            return False
    return True


def _feeds(tower: Tower, options: BenchOptions) -> dict[int, dict[str, np.ndarray]]:
    """One feed per batch size, shared by every artifact so all run (and are compared on) the same inputs."""
    feeds: dict[int, dict[str, np.ndarray]] = {}
    for batch in options.batch:
        feed = make_inputs(tower, _sizes(tower, batch, options.seq_len), seed=batch)
        feeds.setdefault(_items(tower, feed), feed)
    return feeds


def _default_kinds(device: str) -> tuple[str, ...]:
    """What `bench DIR` runs by default: on a GPU the TensorRT engines too, on a CPU the OpenVINO artifacts."""
    return ("hf", "onnx", "tensorrt") if device == "cuda" else ("hf", "onnx", "openvino")


def _runnable_openvino(names: list[str], artifacts: dict[str, Any], named: bool) -> tuple[list[str], list[dict[str, Any]]]:
    """OpenVINO artifacts need the openvino extra: named ones are refused without it (one line, exit 2); those
    chosen by default are skipped, said why."""
    from vlmopt.machine import require_openvino

    wanted = [n for n in names if artifacts[n].kind == "openvino"]
    if not wanted:
        return names, []
    try:
        require_openvino(f"benchmarking '{wanted[0]}'")
    except VlmoptError as exc:
        if named:
            raise
        return [n for n in names if n not in wanted], [{"artifact": n, "tower": "*", "batch": "*", "reason": exc.message} for n in wanted]
    return names, []


def _runnable_on_cuda(names: list[str], artifacts: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """ONNX artifacts run on the GPU only through ONNX Runtime's CUDA provider; without it they are skipped, said why."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return names, []
    keep = [n for n in names if artifacts[n].kind != "onnx"]
    reason = "ONNX Runtime's CUDA provider is not installed (pip install onnxruntime-gpu)"
    return keep, [{"artifact": n, "tower": "*", "batch": "*", "reason": reason} for n in names if n not in keep]


class GpuMemory:
    """Device memory taken while an artifact loads and first runs (free memory before minus after; all allocators)."""

    def __init__(self, device: str):
        self.device = device
        self.increase_mb: float | None = None

    def __enter__(self) -> GpuMemory:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self._free = torch.cuda.mem_get_info()[0]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self.increase_mb = round((self._free - torch.cuda.mem_get_info()[0]) / 2**20, 1)


def _device_name(device: str) -> str:
    if device == "cuda":
        from vlmopt.machine import gpus

        found = gpus()
        return found[0].name if found else "cuda"
    return platform.processor() or platform.machine()


def markdown_table(rows: list[dict[str, Any]]) -> str:
    gpu = any(r.get("gpu_memory_mb") is not None for r in rows)
    header = "| artifact | backend | tower | batch | seq | mean ms | p50 ms | p90 ms | p99 ms | items/s | Δ peak RSS MB |"
    header += " GPU MB |" if gpu else ""
    header += " size MB | speed-up | cosine min |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lat = r["latency_ms"]
        gpu_cell = f" {_fmt(r.get('gpu_memory_mb'), '{:.0f}')} |" if gpu else ""
        lines.append(
            f"| {r['artifact']} | {_backend(r)} | {r['tower']} | {r['batch']} | {r['sequence'] or ''} | {lat['mean']:.2f} | {lat['p50']:.2f} | "
            f"{lat['p90']:.2f} | {lat['p99']:.2f} | {r['throughput']:.1f} | {r['peak_rss_mb']:.0f} |{gpu_cell} {r['size_mb']:.1f} | "
            f"{_fmt(r['speedup'], '{:.2f}x')} | {_fmt(r['cosine_min'], '{:.6f}')} |"
        )
    return "\n".join(lines) + "\n"


def _backend(row: dict[str, Any]) -> str:
    """The backend, with the precision it ran in where the runner reports one (OpenVINO: f32 or bf16)."""
    ran = (row.get("runtime") or {}).get("inference_precision")
    return f"{row['backend']} ({ran})" if ran else row["backend"]


def _fmt(value: float | None, pattern: str) -> str:
    return "" if value is None else pattern.format(value)


REPORTS = "reports"
#: version of the bench report's layout; `vlmopt compare` and `report` refuse others
REPORT_SCHEMA = 2


def writable_reports(model_dir: ModelDir) -> Path:
    """The reports folder, checked writable (and with room) before any measuring: a benchmark that cannot save its
    report is wasted. Created only when a report is written."""
    folder = model_dir.path / REPORTS
    check_writable(folder)
    return folder


def write_report(model_dir: ModelDir, report: dict[str, Any], annotate: Callable[[dict[str, Any], str], None] | None = None) -> list[Path]:
    """`reports/bench-<time>.json` and `.md`, both whole or neither; `annotate(report, json_name)` adds to the report
    what needs its name (the recommendation) before it is written."""
    folder = writable_reports(model_dir)
    made = not folder.exists()
    folder.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    suffix, n = "", 1
    while (folder / f"bench-{stamp}{suffix}.json").exists():
        n += 1
        suffix = f"-{n}"
    json_path, md_path = folder / f"bench-{stamp}{suffix}.json", folder / f"bench-{stamp}{suffix}.md"
    report["schema_version"] = REPORT_SCHEMA
    report["files"] = [str(json_path), str(md_path)]
    if annotate is not None:
        annotate(report, json_path.name)
    settings = report["settings"]
    amount = f"{settings['duration']:g}s per measurement" if settings["duration"] else f"{settings['iterations']} iterations"
    md = (
        f"# vlmopt bench — {model_dir.path.name}\n\n{report['created']} · {report['machine']['cpu']} · "
        f"{settings['threads']} threads · warm-up {settings['warmup']} · "
        f"{amount}\n\n" + markdown_table(report["rows"]) + "\nSpeed-up and cosine are against the PyTorch reference (`hf`) measured in the same run; "
        "Δ peak RSS is the resident-memory rise while loading and running the artifact.\n" + _verification_markdown(report)
    )
    if report.get("recommendation"):
        md += "\n" + recommendation_markdown(Recommendation.from_json(report["recommendation"]))
    try:
        write_atomically(md_path, md.encode())
        write_atomically(json_path, (json.dumps(report, indent=2) + "\n").encode())
    except BaseException:
        md_path.unlink(missing_ok=True)
        if made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return [json_path, md_path]


def recommendation_markdown(recommendation: Recommendation) -> str:
    lines = [
        "## Recommended: the fastest artifact that passed its fidelity gate",
        "",
        "| tower | batch | artifact | backend | mean ms | speed-up | cosine min | gate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in recommendation.choices:
        if c.artifact is None:
            lines.append(f"| {c.tower} | {c.batch} | none passed | | | | | {'; '.join(f'{a}: {why}' for a, why in c.rejected.items())} |")
        else:
            lines.append(
                f"| {c.tower} | {c.batch} | {c.artifact} | {c.backend} | {_fmt(c.latency_ms, '{:.2f}')} | {_fmt(c.speedup, '{:.2f}x')} | "
                f"{_fmt(c.cosine_min, '{:.6f}')} | {c.gate} |"
            )
    return "\n".join(lines) + "\n"


#: the cosine against PyTorch an artifact is held to when it recorded no gate of its own (quantize's default)
DEFAULT_SELECT_MIN_COSINE = 0.99


def _gate(artifact: Any, select_min_cosine: float | None) -> tuple[str, Callable[[dict[str, Any]], bool]]:
    """What an artifact's bench row must show to be chosen: the --select-min-cosine, else its own recorded
    cosine gate, else its own atol gate, else the default cosine."""
    if select_min_cosine is not None:
        return f"cosine >= {select_min_cosine:g} (--select-min-cosine)", lambda r: r["cosine_min"] >= select_min_cosine
    gates = artifact.verification.gates if artifact.verification else {}
    if gates.get("min_cosine") is not None:
        limit = gates["min_cosine"]
        return f"cosine >= {limit:g} (its {artifact.stage} gate)", lambda r: r["cosine_min"] >= limit
    if gates.get("atol") is not None:
        atol = gates["atol"]
        return f"max |diff| <= {atol:g} (its {artifact.stage} gate)", lambda r: r["max_abs_diff"] <= atol
    return f"cosine >= {DEFAULT_SELECT_MIN_COSINE:g} (no gate recorded)", lambda r: r["cosine_min"] >= DEFAULT_SELECT_MIN_COSINE


def recommend(report: dict[str, Any], artifacts: dict[str, Any], select_min_cosine: float | None, report_name: str) -> Recommendation:
    """Per tower and batch of a bench report, the fastest artifact whose outputs, compared with PyTorch's in that
    run, pass its fidelity gate, and whose own verification passed. The PyTorch reference is not a candidate."""
    choices = []
    keys = list(dict.fromkeys((r["tower"], r["batch"]) for r in report["rows"]))
    for tower, batch in keys:
        rows = [r for r in report["rows"] if (r["tower"], r["batch"]) == (tower, batch) and r["artifact"] not in (REFERENCE, FP16_REFERENCE)]
        rows = sorted((r for r in rows if r["artifact"] in artifacts), key=lambda r: r["latency_ms"]["mean"])
        choice = Choice(tower, batch, None)
        for row in rows:
            artifact = artifacts[row["artifact"]]
            gate, passes = _gate(artifact, select_min_cosine)
            if row["cosine_min"] is None:
                choice.rejected[row["artifact"]] = "not compared with PyTorch (no hf artifact measured)"
            elif artifact.verification is not None and not artifact.verification.passed:
                choice.rejected[row["artifact"]] = "its own verification failed"
            elif not passes(row):
                choice.rejected[row["artifact"]] = f"cosine {row['cosine_min']:.6f}, max |diff| {row['max_abs_diff']:.2g}; needs {gate}"
            else:
                choice.artifact, choice.backend, choice.digest, choice.gate = row["artifact"], row["backend"], artifact.digest, gate
                choice.latency_ms, choice.throughput, choice.speedup, choice.cosine_min = (
                    row["latency_ms"]["mean"],
                    row["throughput"],
                    row["speedup"],
                    row["cosine_min"],
                )
                break
        choices.append(choice)
    return Recommendation(report_name, report["created"], select_min_cosine, choices)


def latest_report(model_dir: ModelDir) -> dict[str, Any] | None:
    """The newest bench report of this layout in the model directory, or None."""
    folder = model_dir.path / REPORTS
    for path in sorted(folder.glob("bench-*.json"), key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []:
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(report, dict) and report.get("schema_version") == REPORT_SCHEMA:
            return report
    return None


def recommendation_table(recommendation: Recommendation) -> Any:
    from rich.table import Table

    title = "recommended: the fastest artifact that passed its fidelity gate (vs PyTorch, this run)"
    table = Table(title=title, title_justify="left")
    for column in ("tower", "batch", "artifact", "backend", "mean ms", "speed-up", "cosine min", "gate"):
        table.add_column(column, justify="right" if column in ("batch", "mean ms", "speed-up", "cosine min") else "left")
    for c in recommendation.choices:
        if c.artifact is None:
            table.add_row(c.tower, str(c.batch), "[red]none passed[/]", "", "", "", "", "; ".join(f"{a}: {why}" for a, why in c.rejected.items()))
        else:
            table.add_row(
                c.tower,
                str(c.batch),
                f"[green]{c.artifact}[/]",
                c.backend or "",
                _fmt(c.latency_ms, "{:.2f}"),
                _fmt(c.speedup, "{:.2f}x"),
                _fmt(c.cosine_min, "{:.6f}"),
                c.gate or "",
            )
    return table


class Bench(Stage):
    name = "bench"
    Options = BenchOptions
    tools = ("torch", "transformers", "onnxruntime", "openvino")
    summary = "Measure latency (mean/p50/p90/p99), throughput, memory and speed-up against PyTorch."
    details = (
        "Writes DIR/reports/bench-<time>.json and .md and records the results in the manifest; a rerun with the same "
        "artifacts, options, threads and tool versions is up to date (--force measures again).\n"
        "Example: vlmopt bench build/clip --batch 1,8"
    )

    def environment(self, options: BenchOptions) -> dict[str, str]:
        environment = super().environment(options)
        if options.device == "cuda":
            environment["tensorrt"] = package_version("tensorrt") or "not installed"
        return {**environment, "cpu": platform.processor() or platform.machine(), "device": _device_name(options.device)}

    def describe_report(self, report: dict[str, Any]) -> list[Any]:
        from rich.table import Table

        settings = report["settings"]
        amount = f"{settings['duration']:g} s" if settings["duration"] else f"{settings['iterations']} iterations"
        table = Table(title=f"vlmopt bench · {report['machine']['threads']} threads · warm-up {settings['warmup']} · {amount}", title_justify="left")
        gpu = any(r.get("gpu_memory_mb") is not None for r in report["rows"])
        columns = (
            "artifact",
            "backend",
            "tower",
            "batch",
            "seq",
            "mean ms",
            "p50",
            "p90",
            "p99",
            "items/s",
            "Δ RSS MB",
            *(("GPU MB",) if gpu else ()),
            "size MB",
        )
        for column in (*columns, "speed-up", "cosine min"):
            table.add_column(column, justify="left" if column in ("artifact", "backend", "tower") else "right")
        for r in report["rows"]:
            lat, speedup = r["latency_ms"], r["speedup"]
            style = "" if speedup is None else ("green" if speedup >= 1 else "red")
            table.add_row(
                r["artifact"],
                _backend(r),
                r["tower"],
                str(r["batch"]),
                str(r["sequence"] or ""),
                *(f"{lat[k]:.2f}" for k in ("mean", "p50", "p90", "p99")),
                f"{r['throughput']:.1f}",
                f"{r['peak_rss_mb']:.0f}",
                *((_fmt(r.get("gpu_memory_mb"), "{:.0f}"),) if gpu else ()),
                f"{r['size_mb']:.1f}",
                f"[{style}]{speedup:.2f}x[/]" if speedup is not None else "",
                _fmt(r["cosine_min"], "{:.6f}"),
            )
        lines: list[Any] = [table]
        if report.get("recommendation"):
            lines.append(recommendation_table(Recommendation.from_json(report["recommendation"])))
        for skip in report.get("not_measured", []):
            lines.append(f"[yellow]not measured:[/] {skip['artifact']} {skip['tower']} at batch {skip['batch']}: {skip['reason']}")
        for name, verdict in (report.get("verification") or {}).items():
            lines.append(f"verification of {name}: {escape(verdict)}")
        if report.get("files"):
            lines.append(f"reports: {', '.join(report['files'])}")
        return lines

    def requires(self, options: BenchOptions) -> str | None:
        if options.device == "cuda":
            from vlmopt.machine import gpus

            if not gpus():
                return "--device cuda needs a CUDA GPU, and torch sees none here; bench on --device cpu"
        return None

    def reads(self, options: BenchOptions, artifacts: dict[str, str]) -> list[str]:
        """The artifacts measured: those named, or every one of the kinds this device runs; the PyTorch reference first."""
        names = list(options.artifacts) or [n for n, kind in artifacts.items() if kind in _default_kinds(options.device)]
        if REFERENCE in artifacts or REFERENCE in names:
            names = [REFERENCE, *(n for n in names if n != REFERENCE)]
        return names

    def _key(self, model_dir: ModelDir, options: BenchOptions, context: RunContext) -> tuple[list[str], dict[str, Any], list[dict[str, Any]]]:
        """The artifacts to measure (each checked to exist), what identifies the measurement (a report with this key is
        up to date), and the artifacts this machine cannot run (OpenVINO ones without the extra), said why."""
        all_artifacts = model_dir.load()
        names = self.reads(options, {n: a.kind for n, a in all_artifacts.items()})
        for name in names:
            model_dir.artifact(name)  # exists, with its files as recorded: never time (and record results for) changed files
        names, not_here = _runnable_openvino(names, all_artifacts, named=bool(options.artifacts))
        key = {
            "options": opts.recorded(options),
            "artifacts": {n: all_artifacts[n].digest for n in names},
            "environment": self.environment(options),
            "threads": context.thread_count,
        }
        return names, json.loads(json.dumps(key)), not_here

    def staleness(self, directory: str | os.PathLike[str] | ModelDir, options: BenchOptions, context: RunContext | None = None) -> str | None:
        opts.validate(options)
        model_dir = directory if isinstance(directory, ModelDir) else ModelDir.open(directory)
        _, key, _ = self._key(model_dir, options, context or RunContext())
        latest = latest_report(model_dir)
        if latest is None:
            return "not measured yet"
        if latest.get("key") == key:
            return None
        changed = [part for part in ("options", "artifacts", "environment", "threads") if (latest.get("key") or {}).get(part) != key[part]]
        what = {"options": "options", "artifacts": "artifacts", "environment": "tool versions or machine", "threads": "threads"}
        return f"{' and '.join(what[c] for c in changed) or 'the measurement'} changed since {Path(latest['files'][0]).name}"

    def _run_locked(self, model_dir: ModelDir, options: BenchOptions, context: RunContext) -> StageResult:
        result = self._measure_or_reuse(model_dir, options, context)
        report = result.report
        assert report is not None
        if result.skipped or "recommendation" not in report:
            # an earlier report: choose again under this run's --select-min-cosine (artifacts unchanged, by its key)
            report["recommendation"] = recommend(report, model_dir.load(), options.select_min_cosine, Path(report["files"][0]).name).to_json()
        recommendation = Recommendation.from_json(report["recommendation"])
        current = model_dir.recommendation()
        if current is None or current.to_json() != recommendation.to_json():
            model_dir.record_recommendation(recommendation)
        _check_speedup(report, options)
        if options.select and recommendation.unmet():
            unmet = recommendation.unmet()
            first = unmet[0]
            why = "; ".join(f"{a}: {reason}" for a, reason in first.rejected.items()) or "no artifact other than PyTorch was measured"
            raise CheckFailed(
                f"--select: no artifact passed its fidelity gate for {', '.join(f'{c.tower} at batch {c.batch}' for c in unmet)} ({first.tower} batch {first.batch}: {why})",
                details={"report": report},
            )
        return result

    def _measure_or_reuse(self, model_dir: ModelDir, options: BenchOptions, context: RunContext) -> StageResult:
        missing = self.requires(options)
        if missing:
            raise VlmoptError(missing)
        names, key, not_here = self._key(model_dir, options, context)
        latest = latest_report(model_dir)
        if not context.force and latest is not None and latest.get("key") == key:
            return StageResult(
                self.name, "bench", True, report=latest, reason=f"up to date: {latest['files'][0]} measured the same artifacts, options and tools"
            )
        writable_reports(model_dir)
        all_artifacts = model_dir.load()
        report = measure(model_dir, options, names, all_artifacts, context.thread_count, context)
        report["not_measured"] = not_here + report["not_measured"]
        report["model"] = model_identity(model_dir)
        report["key"] = key

        def choose(report: dict[str, Any], name: str) -> None:
            report["recommendation"] = recommend(report, all_artifacts, options.select_min_cosine, name).to_json()

        paths = write_report(model_dir, report, annotate=choose)
        for name in [n for n in names if n != FP16_REFERENCE]:
            model_dir.update_artifact(name, benchmark={"report": paths[0].name, "rows": [r for r in report["rows"] if r["artifact"] == name]})
        return StageResult(self.name, "bench", False, report=report, files=report["files"])


def _check_speedup(report: dict[str, Any], options: BenchOptions) -> None:
    """--min-speedup, applied to a new report and to an up-to-date one alike (a rerun fails as the first run did)."""
    if options.min_speedup is None:
        return
    slow = [r for r in report["rows"] if r["artifact"] != REFERENCE and r["speedup"] is not None and r["speedup"] < options.min_speedup]
    if slow:
        worst = min(slow, key=lambda r: r["speedup"])
        raise CheckFailed(
            f"{len(slow)} measurement(s) below --min-speedup {options.min_speedup:g}: slowest is {worst['artifact']} "
            f"{worst['tower']} at batch {worst['batch']}, {worst['speedup']:.2f}x PyTorch",
            details={"report": report},
        )


def model_identity(model_dir: ModelDir) -> dict[str, Any] | None:
    """Which model a report measured, for `vlmopt compare`: the family, and the architecture as the PyTorch reference's
    tensor names and shapes (read from the safetensors headers; not the weights, which `weights` identifies)."""
    artifacts = model_dir.load()
    reference = artifacts.get(REFERENCE)
    if reference is None:
        return None
    folder = model_dir.artifact_path(REFERENCE)
    shapes: dict[str, list[int]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(length))
        shapes.update({name: entry["shape"] for name, entry in header.items() if name != "__metadata__"})
    digest = hashlib.sha256(json.dumps(sorted(shapes.items())).encode()).hexdigest()
    return {
        "family": reference.traits.family,
        "model_type": reference.traits.model_type,
        "source": reference.record.get("source"),
        "architecture": digest,
        "parameters": int(sum(int(np.prod(shape)) for shape in shapes.values())),
        "weights": reference.digest,
    }


def measure(model_dir: ModelDir, options: BenchOptions, names: list[str], all_artifacts: dict[str, Any], threads: int, context: RunContext) -> dict[str, Any]:
    """Load every contender of each tower, then time them interleaved on the same inputs; the report (not yet written)."""
    not_measured: list[dict[str, Any]] = []
    if options.device == "cuda":
        names, not_here = _runnable_on_cuda(names, all_artifacts)
        not_measured += not_here

    def loader(name: str, artifact: Any, **kwargs: Any) -> ArtifactRunners:
        return ArtifactRunners(model_dir.artifact_path(artifact.name), artifact, threads=threads, attn_implementation=options.torch_attention, **kwargs)

    with contextlib.ExitStack() as stack:
        loaders = {name: stack.enter_context(loader(name, all_artifacts[name], device=options.device, cuda_graphs=options.cuda_graphs)) for name in names}
        if options.device == "cuda" and REFERENCE in names:
            # PyTorch at half precision on the GPU: the eager baseline a GPU user would otherwise ship
            loaders[FP16_REFERENCE] = stack.enter_context(loader(FP16_REFERENCE, all_artifacts[REFERENCE], device="cuda", torch_dtype="float16"))
            names.insert(1, FP16_REFERENCE)
        monolith = any("model" in all_artifacts[n].towers for n in names if n in all_artifacts)
        tower_sets = {name: runners.towers(include_monolith=monolith) for name, runners in loaders.items()}
        kinds = {name: runners.artifact.kind for name, runners in loaders.items()}
        measured = [n for n in names if kinds[n] != "hf"] or names
        tower_names: list[str] = []
        for name in measured:
            tower_names += [t for t in tower_sets[name] if t not in tower_names]
        if options.tower:
            unknown = [t for t in options.tower if t not in tower_names]
            if unknown:
                raise VlmoptError(f"no tower named {', '.join(unknown)} in {', '.join(measured)} (towers: {', '.join(tower_names)})")
            tower_names = [t for t in tower_names if t in options.tower]
        rows: list[dict[str, Any]] = []
        for tower_name in tower_names:
            rows += _measure_tower(tower_name, names, loaders, tower_sets, options, not_measured, context)
    return {
        "model_dir": str(model_dir.path),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "logical_cores": os.cpu_count(), "threads": threads},
        "settings": {**opts.recorded(options), "threads": threads},
        "device": _device_name(options.device),
        "rows": rows,
        "not_measured": not_measured,
        "verification": recorded_verification({n: all_artifacts[n] for n in names if n in all_artifacts}),
    }


def recorded_verification(artifacts: dict[str, Any]) -> dict[str, str]:
    """Each measured artifact's own verification, as `info` shows it: a speed-up is read beside what the artifact was
    held to (a generative variant's token figures, gated or not, which the bench's cosine against PyTorch does not show)."""
    return {name: a.verification.verdict() for name, a in artifacts.items() if a.verification is not None}


def _verification_markdown(report: dict[str, Any]) -> str:
    recorded = report.get("verification") or {}
    if not recorded:
        return ""
    lines = ["", "Recorded verification of each artifact (its own stage's check against its parent):", ""]
    lines += [f"- `{name}`: {verdict}" for name, verdict in recorded.items()]
    return "\n".join(lines) + "\n"


def _measure_tower(
    tower_name: str,
    names: list[str],
    loaders: dict[str, ArtifactRunners],
    tower_sets: dict[str, dict[str, Tower]],
    options: BenchOptions,
    not_measured: list[dict[str, Any]],
    context: RunContext,
) -> list[dict[str, Any]]:
    having = [n for n in names if tower_name in tower_sets[n]]
    dynamic = [n for n in having if all(isinstance(a, str) for a in tower_sets[n][tower_name].inputs[0].shape[:1])]
    feeds = _feeds(tower_sets[(dynamic or having)[0]][tower_name], options)
    accepted = {n: [b for b, f in feeds.items() if _accepts(tower_sets[n][tower_name], f)] for n in having}
    for name in having:
        for batch in sorted(set(feeds) - set(accepted[name])):
            not_measured.append({"artifact": name, "tower": tower_name, "batch": batch, "reason": "static shapes differ from this measurement's"})

    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        # Load every contender first (memory: the rise while loading and first running each one) ...
        runners, memory, sizes, gpu_mb = {}, {}, {}, {}
        for name in [n for n in having if accepted[n]]:
            context.progress(f"loading {name} · {tower_name}")
            with PeakRss() as rss, GpuMemory(options.device) as gpu_memory:
                runners[name] = stack.enter_context(loaders[name].runner(tower_sets[name][tower_name]))
                for batch in accepted[name]:
                    runners[name].run(feeds[batch])
            memory[name] = round(rss.increase_mb, 1)
            gpu_mb[name] = gpu_memory.increase_mb
            sizes[name] = round(loaders[name].size_bytes(tower_sets[name][tower_name], runners[name]) / 2**20, 2)

        # ... then time them against each other, interleaved, on the same inputs.
        for batch, feed in feeds.items():
            contenders = {n: runners[n] for n in runners if batch in accepted[n]}
            context.progress(f"{tower_name} · batch {batch} · {', '.join(contenders)}")
            latencies = measure_interleaved(
                {n: (lambda r=r, f=feed: r.run(f)) for n, r in contenders.items()}, options.warmup, options.iterations, options.duration
            )
            outputs = {n: r.run(feed) for n, r in contenders.items()}
            reference = REFERENCE if REFERENCE in contenders else None
            for name in contenders:
                latency = latencies[name]
                row = {
                    "artifact": name,
                    "backend": loaders[name].backend,
                    "tower": tower_name,
                    "batch": batch,
                    "sequence": _sequence(feed),
                    "latency_ms": latency,
                    "throughput": _items(tower_sets[name][tower_name], feed) * 1000 / latency["mean"],
                    "peak_rss_mb": memory[name],
                    "gpu_memory_mb": gpu_mb[name],
                    "size_mb": sizes[name],
                    "speedup": None,
                    "cosine_min": None,
                    "max_abs_diff": None,
                }
                ran = contenders[name].details()
                if ran is not None:
                    row["runtime"] = ran
                if reference is not None:
                    row["speedup"] = latencies[reference]["mean"] / latency["mean"]
                    if name != reference:
                        expected = outputs[reference]
                        fidelity = [compare(k, expected[k], outputs[name][k]) for k in outputs[name] if k in expected]
                        row["cosine_min"] = min(c.cosine_min for c in fidelity)
                        row["max_abs_diff"] = max(c.max_abs_diff for c in fidelity)
                rows.append(row)
    gc.collect()
    return rows


STAGE = Bench()
