"""`vlmopt build`: strongly typed TensorRT engines from ONNX artifacts that already carry their precision.

TensorRT 11 builds strongly typed networks only (its FP16/INT8 builder flags and INT8 calibrators are
gone), and TensorRT 10 does with the STRONGLY_TYPED flag: the fp16 and `--target tensorrt` int8
artifacts of `quantize` are built as they are, the fp32 export as fp32. One engine per tower, with
optimization profiles from the artifact's dynamic axes, a timing cache kept in the model directory,
verified against ONNX Runtime on the same inputs before it is committed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlmopt.engines import HARDWARE_COMPATIBILITY, Profile, check_tensorrt_version, derive_profiles, engine_metadata, parse_shape_override
from vlmopt.errors import VlmoptError
from vlmopt.families import Tower
from vlmopt.stages import fidelity
from vlmopt.workspace import Artifact, ModelDir, StageOutput, StageResult

TIMING_CACHES = "timing-caches"
SPARSE = ("auto", "on", "off")
#: what to do about the parse errors users meet most, keyed by a word of TensorRT's message
_HINTS = (
    ("No importer registered for op", "an operator TensorRT does not implement: build from the plain export (--from onnx), not an ONNX Runtime-fused one"),
    ("INT64", "INT64 tensors: TensorRT casts INT64 weights and shape tensors to INT32; re-export with a current opset (vlmopt convert --opset 18)"),
    ("shape tensor", "a shape computed at run time: fix the axis (vlmopt convert --static) or give it a range with --shapes"),
    ("DequantizeLinear", "Q/DQ TensorRT rejects: quantize with --mode int8-static --target tensorrt (symmetric, zero zero-points, float bias)"),
)


@dataclass
class BuildOptions:
    source: str = "onnx"
    output: str | None = None
    opt_batch: int = 8
    max_batch: int = 32
    max_seq: int | None = None
    shapes: list[str] = field(default_factory=list)
    workspace_mb: int = 4096
    optimization_level: int = 3
    timing_cache: bool = True
    hardware_compatibility: str = "none"
    version_compatible: bool = False
    sparse_weights: str = "auto"
    min_cosine: float | None = 0.99

    @property
    def name(self) -> str:
        return self.output or f"trt-{self.source}"

    def overrides(self) -> dict[str, Profile]:
        return dict(parse_shape_override(text) for text in self.shapes)

    def validate(self) -> None:
        if self.opt_batch < 1 or self.max_batch < self.opt_batch:
            raise VlmoptError(f"--opt-batch ({self.opt_batch}) must be at least 1 and at most --max-batch ({self.max_batch})")
        if self.max_seq is not None and self.max_seq < 1:
            raise VlmoptError(f"--max-seq must be at least 1, got {self.max_seq}")
        if self.workspace_mb < 1:
            raise VlmoptError(f"--workspace must be at least 1 MiB, got {self.workspace_mb}")
        if not 0 <= self.optimization_level <= 5:
            raise VlmoptError(f"--optimization-level must be 0..5, got {self.optimization_level}")
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise VlmoptError(f"--hardware-compatibility must be one of {', '.join(HARDWARE_COMPATIBILITY)}, got '{self.hardware_compatibility}'")
        if self.sparse_weights not in SPARSE:
            raise VlmoptError(f"--sparse-weights must be auto, on or off, got '{self.sparse_weights}'")
        if self.min_cosine is not None and not 0 <= self.min_cosine <= 1:
            raise VlmoptError(f"--min-cosine must be in [0, 1], got {self.min_cosine}")
        self.overrides()


def check_parent(parent: Artifact) -> None:
    """TensorRT parses standard ONNX: not Hugging Face folders, not ONNX Runtime-fused or -quantized graphs."""
    if parent.kind != "onnx":
        raise VlmoptError(f"build reads an ONNX artifact; '{parent.name}' is of kind '{parent.kind}'")
    if parent.meta.get("custom_domains"):
        raise VlmoptError(
            f"'{parent.name}' holds ONNX Runtime-only operators ({', '.join(parent.meta['custom_domains'])}) that TensorRT cannot parse; "
            "build from onnx, fp16 or int8-static-trt"
        )
    not_ready = {t: r.get("tensorrt_issue") for t, r in parent.towers.items() if r.get("tensorrt_ready") is False}
    if not_ready:
        tower, issue = next(iter(not_ready.items()))
        raise VlmoptError(f"'{parent.name}' is not a graph TensorRT builds ({tower}: {issue}); quantize with --target tensorrt")


def sparse_requested(option: str, parent: Artifact) -> bool:
    """On for artifacts `vlmopt prune` recorded as 2:4 sparse, unless the user says otherwise."""
    return option == "on" or (option == "auto" and bool(parent.meta.get("two_four_sparse")))


def parse_error_message(tower: str, errors: list[tuple[str, str, str]]) -> str:
    """One line: the first parse error with its node and operator, and a hint when the message is a familiar one."""
    if not errors:
        return f"TensorRT could not parse the {tower} tower (no error reported)"
    description, node, op = errors[0]
    description = (description or "").strip().splitlines()[0][:200] if (description or "").strip() else "no description"
    hint = next((h for key, h in _HINTS if key.lower() in description.lower() or key == op), None)
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    where = f" at node '{node}' ({op})" if node or op else ""
    return f"TensorRT cannot parse the {tower} tower{where}: {description}{more}" + (f"; hint: {hint}" if hint else "")


def rebuild_command(model_dir: ModelDir, options: BuildOptions) -> str:
    """The command that rebuilds this engine with the same options, ready to paste."""
    import shlex

    defaults = BuildOptions()
    flags = {
        "--opt-batch": options.opt_batch,
        "--max-batch": options.max_batch,
        "--max-seq": options.max_seq,
        "--workspace": options.workspace_mb,
        "--optimization-level": options.optimization_level,
        "--hardware-compatibility": options.hardware_compatibility,
        "--sparse-weights": options.sparse_weights,
    }
    default_values = [defaults.opt_batch, defaults.max_batch, defaults.max_seq, defaults.workspace_mb, defaults.optimization_level, "none", "auto"]
    parts = ["vlmopt", "build", str(model_dir.path), "--from", options.source, "--name", options.name]
    for (flag, value), default in zip(flags.items(), default_values, strict=True):
        if value != default:
            parts += [flag, str(value)]
    parts += [arg for shape in options.shapes for arg in ("--shapes", shape)]
    if options.version_compatible:
        parts.append("--version-compatible")
    return shlex.join([*parts, "--force"])


def _build_engine(
    onnx_path: Path, tower: Tower, profiles: dict[str, Profile], options: BuildOptions, sparse: bool, cache_path: Path | None
) -> tuple[bytes, dict[str, Any]]:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # required on 10.x, accepted and ignored on 11.x
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            error = parser.get_error(i)
            errors.append((error.desc(), error.node_name(), error.node_operator()))
        raise VlmoptError(parse_error_message(tower.name, errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb * 2**20)
    config.builder_optimization_level = options.optimization_level
    profile = builder.create_optimization_profile()
    for name, shapes in profiles.items():
        profile.set_shape(name, shapes.min, shapes.opt, shapes.max)
    config.add_optimization_profile(profile)
    if options.hardware_compatibility != "none":
        level = getattr(trt.HardwareCompatibilityLevel, HARDWARE_COMPATIBILITY[options.hardware_compatibility], None)
        if level is None:
            raise VlmoptError(f"TensorRT {trt.__version__} has no hardware-compatibility level '{options.hardware_compatibility}'")
        config.hardware_compatibility_level = level
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    cache = None
    if cache_path is not None:
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise VlmoptError(f"TensorRT failed to build the {tower.name} tower's engine; rerun with --debug for TensorRT's log")
    if cache is not None and cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(cache.serialize()))
    return bytes(serialized), {"build_seconds": round(time.perf_counter() - started, 1)}


def run(model_dir: ModelDir, options: BuildOptions, force: bool = False, progress: Callable[[str], None] | None = None) -> StageResult:
    """Build one engine per tower of an ONNX artifact; verify each against ONNX Runtime; commit only if all pass."""
    from vlmopt.machine import require_tensorrt_gpu

    options.validate()
    parent = model_dir.artifact(options.source)
    check_parent(parent)
    towers = {name: Tower.from_json(name, data) for name, data in parent.towers.items()}
    overrides = options.overrides()
    profiles = {}
    for name, tower in towers.items():
        mine = {k: v for k, v in overrides.items() if k in {s.name for s in tower.inputs}}
        profiles[name] = derive_profiles(tower, options.opt_batch, options.max_batch, options.max_seq, mine)
    unused = set(overrides) - {n for p in profiles.values() for n in p}
    if unused:
        raise VlmoptError(f"--shapes names {', '.join(sorted(unused))}, which no tower of '{parent.name}' takes")
    version, gpu = require_tensorrt_gpu()
    check_tensorrt_version(version)
    sparse = sparse_requested(options.sparse_weights, parent)
    cc = gpu.compute_capability
    cache_path = model_dir.path / TIMING_CACHES / f"tensorrt-{version}-sm{cc[0]}{cc[1]}.cache" if options.timing_cache else None
    say = progress or (lambda message: None)
    parent_dir = model_dir.artifact_path(parent.name)

    def build(tmp: Path) -> StageOutput:
        from vlmopt.runners import OrtRunner
        from vlmopt.runners.tensorrt_runner import TensorRTRunner

        recorded: dict[str, dict[str, Any]] = {}
        for name, tower in towers.items():
            say(f"building the {name} tower's engine (TensorRT {version}, {gpu.name})")
            engine, timings = _build_engine(parent_dir / parent.towers[name]["file"], tower, profiles[name], options, sparse, cache_path)
            file = f"{name}.engine"
            (tmp / file).write_bytes(engine)
            meta = engine_metadata(
                version,
                gpu.name,
                cc,
                profiles[name],
                source=parent.name,
                hardware_compatibility=options.hardware_compatibility,
                version_compatible=options.version_compatible,
                sparse_weights=sparse,
                precision=parent.meta.get("precision", "fp32"),
                **timings,
            )
            recorded[name] = {**tower.to_json(), "file": file, "engine": meta}
        say("verifying the engines against ONNX Runtime")
        rebuild = rebuild_command(model_dir, options)
        references = {n: OrtRunner(parent_dir / parent.towers[n]["file"]) for n in towers}
        candidates = {n: TensorRTRunner(tmp / recorded[n]["file"], recorded[n]["engine"], rebuild) for n in towers}
        admits = {n: _admits(profiles[n]) for n in towers}
        verification = fidelity.check_runners(towers, references, candidates, fidelity.Thresholds(min_cosine=options.min_cosine), admits=admits)
        verification["reference"] = f"{parent.name} (onnxruntime)"
        for runner in [*references.values(), *candidates.values()]:
            runner.close()
        meta = {**parent.meta, "tensorrt_version": version, "gpu": gpu.name, "compute_capability": f"{cc[0]}.{cc[1]}", "sparse_weights": sparse}
        return StageOutput(towers=recorded, meta=meta, verification=verification)

    return model_dir.produce(options.name, kind="tensorrt", stage="build", options=asdict(options), parent=parent, build=build, force=force)


def _admits(profiles: dict[str, Profile]) -> Callable[[dict[str, Any]], bool]:
    """Whether a feed's shapes lie inside the engine's profiles (verification skips those that do not)."""
    return lambda feed: all(profile.admits(tuple(feed[name].shape)) for name, profile in profiles.items())
