"""`vlmopt bench`: every artifact through the same runner interface, on the same inputs, in one run.

The PyTorch reference (the `hf` artifact) is always measured alongside, so speed-ups and
fidelity are ratios taken on this machine, now, not against remembered numbers.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from vlmopt.errors import CheckFailed, VlmoptError
from vlmopt.families import Tower
from vlmopt.inputs import make_inputs
from vlmopt.runners import ArtifactRunners
from vlmopt.verify import compare
from vlmopt.workspace import ModelDir

REFERENCE = "hf"
#: the PyTorch reference at half precision, measured too when benchmarking on a GPU
FP16_REFERENCE = "hf-fp16"
#: timed calls per contender in each round
_BLOCK = 5


@dataclass
class BenchOptions:
    artifacts: list[str] = field(default_factory=list)
    batches: list[int] = field(default_factory=lambda: [1, 8])
    seq_len: int | None = None
    towers: list[str] = field(default_factory=list)
    warmup: int = 3
    iterations: int = 20
    duration: float | None = None
    threads: int | None = None
    min_speedup: float | None = None
    attn_implementation: str = "sdpa"
    device: str = "cpu"
    cuda_graphs: bool = False

    def validate(self) -> None:
        if not self.batches or any(b < 1 for b in self.batches):
            raise VlmoptError(f"--batch takes positive batch sizes, got {self.batches}")
        if self.seq_len is not None and self.seq_len < 1:
            raise VlmoptError(f"--seq-len must be at least 1, got {self.seq_len}")
        if self.warmup < 0 or self.iterations < 1:
            raise VlmoptError("--warmup must be >= 0 and --iterations >= 1")
        if self.duration is not None and self.duration <= 0:
            raise VlmoptError(f"--duration must be positive, got {self.duration}")
        if self.threads is not None and self.threads < 1:
            raise VlmoptError(f"--threads must be at least 1, got {self.threads}")
        if self.attn_implementation not in ("eager", "sdpa"):
            raise VlmoptError(f"--torch-attention must be eager or sdpa, got {self.attn_implementation}")
        if self.device not in ("cpu", "cuda"):
            raise VlmoptError(f"--device must be cpu or cuda, got '{self.device}'")
        if self.cuda_graphs and self.device != "cuda":
            raise VlmoptError("--cuda-graphs replays TensorRT engines on a GPU; add --device cuda")
        if self.device == "cuda":
            from vlmopt.machine import gpus

            if not gpus():
                raise VlmoptError("--device cuda needs a CUDA GPU, and torch sees none here; bench on --device cpu")


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
    ms = np.asarray(times)
    return {
        "mean": float(ms.mean()),
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "min": float(ms.min()),
        "iterations": len(times),
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
    for batch in options.batches:
        feed = make_inputs(tower, _sizes(tower, batch, options.seq_len), seed=batch)
        feeds.setdefault(_items(tower, feed), feed)
    return feeds


def run(model_dir: ModelDir, options: BenchOptions, progress: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Benchmark the artifacts; write `reports/bench-<time>.{json,md}`; record results in the manifest.

    Raises `CheckFailed` after writing the report when an artifact is slower than `min_speedup`.
    """
    options.validate()
    all_artifacts = model_dir.load()
    names = list(options.artifacts) or [n for n, a in all_artifacts.items() if a.kind in _default_kinds(options.device)]
    for name in names:
        model_dir.artifact(name)
    if REFERENCE in all_artifacts and REFERENCE not in names:
        names.insert(0, REFERENCE)
    if REFERENCE in names:
        names.remove(REFERENCE)
        names.insert(0, REFERENCE)
    threads = options.threads or _physical_cores()
    skipped: list[dict[str, Any]] = []
    if options.device == "cuda":
        names, not_here = _runnable_on_cuda(names, all_artifacts)
        skipped += not_here

    loaders = {
        name: ArtifactRunners(
            model_dir,
            all_artifacts[name],
            threads=threads,
            attn_implementation=options.attn_implementation,
            device=options.device,
            cuda_graphs=options.cuda_graphs,
        )
        for name in names
    }
    if options.device == "cuda" and REFERENCE in names:
        # PyTorch at half precision on the GPU: the eager baseline a GPU user would otherwise ship
        loaders[FP16_REFERENCE] = ArtifactRunners(
            model_dir, all_artifacts[REFERENCE], threads=threads, attn_implementation=options.attn_implementation, device="cuda", torch_dtype="float16"
        )
        names.insert(1, FP16_REFERENCE)
        all_artifacts = {**all_artifacts, FP16_REFERENCE: all_artifacts[REFERENCE]}
    monolith = any("model" in all_artifacts[n].towers for n in names)
    tower_sets = {name: loader.towers(include_monolith=monolith) for name, loader in loaders.items()}
    measured = [n for n in names if all_artifacts[n].kind != "hf"] or names
    tower_names: list[str] = []
    for name in measured:
        tower_names += [t for t in tower_sets[name] if t not in tower_names]
    if options.towers:
        unknown = [t for t in options.towers if t not in tower_names]
        if unknown:
            raise VlmoptError(f"no tower named {', '.join(unknown)} in {', '.join(measured)} (towers: {', '.join(tower_names)})")
        tower_names = [t for t in tower_names if t in options.towers]

    rows: list[dict[str, Any]] = []
    say = progress or (lambda message, advance: None)
    for tower_name in tower_names:
        having = [n for n in names if tower_name in tower_sets[n]]
        dynamic = [n for n in having if all(isinstance(a, str) for a in tower_sets[n][tower_name].inputs[0].shape[:1])]
        feeds = _feeds(tower_sets[(dynamic or having)[0]][tower_name], options)
        accepted = {n: [b for b, f in feeds.items() if _accepts(tower_sets[n][tower_name], f)] for n in having}
        for name in having:
            for batch in sorted(set(feeds) - set(accepted[name])):
                skipped.append({"artifact": name, "tower": tower_name, "batch": batch, "reason": "static shapes differ from this measurement's"})

        # Load every contender first (memory: the rise while loading and first running each one) ...
        runners, memory, sizes, gpu_mb = {}, {}, {}, {}
        for name in [n for n in having if accepted[n]]:
            say(f"loading {name} · {tower_name}", 0)
            with PeakRss() as rss, GpuMemory(options.device) as gpu_memory:
                runners[name] = loaders[name].runner(tower_sets[name][tower_name])
                for batch in accepted[name]:
                    runners[name].run(feeds[batch])
            memory[name] = round(rss.increase_mb, 1)
            gpu_mb[name] = gpu_memory.increase_mb
            sizes[name] = round(loaders[name].size_bytes(tower_sets[name][tower_name], runners[name]) / 2**20, 2)

        # ... then time them against each other, interleaved, on the same inputs.
        for batch, feed in feeds.items():
            contenders = {n: runners[n] for n in runners if batch in accepted[n]}
            say(f"{tower_name} · batch {batch} · {', '.join(contenders)}", 0)
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
                if reference is not None:
                    row["speedup"] = latencies[reference]["mean"] / latency["mean"]
                    if name != reference:
                        expected = outputs[reference]
                        fidelity = [compare(k, expected[k], outputs[name][k]) for k in outputs[name] if k in expected]
                        row["cosine_min"] = min(c.cosine_min for c in fidelity)
                        row["max_abs_diff"] = max(c.max_abs_diff for c in fidelity)
                rows.append(row)
            say(f"{tower_name} · batch {batch}", 1)
        for runner in runners.values():
            runner.close()
        del runners
        gc.collect()
    for loader in loaders.values():
        loader.close()

    report = {
        "model_dir": str(model_dir.path),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "logical_cores": os.cpu_count(), "threads": threads},
        "settings": {**asdict(options), "threads": threads},
        "device": _device_name(options.device),
        "rows": rows,
        "skipped": skipped,
    }
    paths = write_report(model_dir, report)
    report["files"] = [str(p) for p in paths]
    for name in [n for n in names if n != FP16_REFERENCE]:
        model_dir.update_artifact(name, benchmark={"report": paths[0].name, "rows": [r for r in rows if r["artifact"] == name]})

    if options.min_speedup is not None:
        slow = [r for r in rows if r["artifact"] != REFERENCE and r["speedup"] is not None and r["speedup"] < options.min_speedup]
        if slow:
            worst = min(slow, key=lambda r: r["speedup"])
            raise CheckFailed(
                f"{len(slow)} measurement(s) below --min-speedup {options.min_speedup:g}: slowest is {worst['artifact']} "
                f"{worst['tower']} at batch {worst['batch']}, {worst['speedup']:.2f}x PyTorch",
                details={"report": report},
            )
    return report


def _default_kinds(device: str) -> tuple[str, ...]:
    """What `bench DIR` runs by default: on a GPU the TensorRT engines too."""
    return ("hf", "onnx", "tensorrt") if device == "cuda" else ("hf", "onnx")


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


def _physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


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
            f"| {r['artifact']} | {r['backend']} | {r['tower']} | {r['batch']} | {r['sequence'] or ''} | {lat['mean']:.2f} | {lat['p50']:.2f} | "
            f"{lat['p90']:.2f} | {lat['p99']:.2f} | {r['throughput']:.1f} | {r['peak_rss_mb']:.0f} |{gpu_cell} {r['size_mb']:.1f} | "
            f"{_fmt(r['speedup'], '{:.2f}x')} | {_fmt(r['cosine_min'], '{:.6f}')} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, pattern: str) -> str:
    return "" if value is None else pattern.format(value)


def write_report(model_dir: ModelDir, report: dict[str, Any]) -> list[Path]:
    folder = model_dir.path / "reports"
    folder.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    json_path, md_path = folder / f"bench-{stamp}.json", folder / f"bench-{stamp}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    settings = report["settings"]
    amount = f"{settings['duration']:g}s per measurement" if settings["duration"] else f"{settings['iterations']} iterations"
    md = (
        f"# vlmopt bench — {model_dir.path.name}\n\n{report['created']} · {report['machine']['cpu']} · "
        f"{settings['threads']} threads · warm-up {settings['warmup']} · "
        f"{amount}\n\n" + markdown_table(report["rows"]) + "\nSpeed-up and cosine are against the PyTorch reference (`hf`) measured in the same run; "
        "Δ peak RSS is the resident-memory rise while loading and running the artifact.\n"
    )
    md_path.write_text(md)
    return [json_path, md_path]
