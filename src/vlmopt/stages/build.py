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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmopt.engines import HARDWARE_COMPATIBILITY, Profile, check_tensorrt_version, derive_profiles, engine_metadata, parse_shape_override
from vlmopt.errors import VlmoptError
from vlmopt.families import Tower
from vlmopt.options import StageOptions, eval_images_option, eval_text_option, min_cosine_option, name_option, option, source_option
from vlmopt.records import TowerRecord, Verification
from vlmopt.stage import Accepts, Job, Made, Stage, provisional
from vlmopt.workspace import Artifact, StageOutput

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
class BuildOptions(StageOptions):
    source: str = source_option("onnx", "the ONNX artifact to build: onnx (fp32), fp16 or int8-static-trt")
    name: str | None = name_option(None, "trt-<from>")
    opt_batch: int = option(8, "Batch size the engine is tuned for.", minimum=1)
    max_batch: int = option(32, "Largest batch the engine takes (the smallest is 1).", minimum=1)
    max_seq: int | None = option(None, "Longest text the engine takes (default: the model's maximum).", minimum=1)
    shapes: list[str] = option([], "Override an input's profile: name:MIN,OPT,MAX, e.g. input_ids:1x77,8x77,32x77 (repeatable).", separator=None)
    workspace: int = option(4096, "Builder workspace limit in MiB.", minimum=1)
    optimization_level: int = option(3, "Builder optimization level 0..5 (higher: longer builds, faster engines).", minimum=0, maximum=5)
    timing_cache: bool = option(True, "Keep and reuse a timing cache in DIR/timing-caches/.", flag="--timing-cache/--no-timing-cache")
    hardware_compatibility: str = option(
        "none", "none, ampere+ (runs on any GPU of compute capability >= 8.0) or same-cc.", choices=tuple(HARDWARE_COMPATIBILITY)
    )
    version_compatible: bool = option(False, "An engine later TensorRT releases of this major can load.")
    sparse_weights: str = option("auto", "auto (on for artifacts pruned to 2:4), on or off.", choices=SPARSE)
    min_cosine: float | None = min_cosine_option(0.99)
    eval_images: str | None = eval_images_option()
    eval_text: str | None = eval_text_option()

    @property
    def artifact(self) -> str:
        return self.name or f"trt-{self.source}"

    def overrides(self) -> dict[str, Profile]:
        return dict(parse_shape_override(text) for text in self.shapes)

    def check(self) -> None:
        if self.max_batch < self.opt_batch:
            raise VlmoptError(f"--opt-batch ({self.opt_batch}) must be at least 1 and at most --max-batch ({self.max_batch})")
        self.overrides()


def sparse_requested(option: str, parent: Artifact) -> bool:
    """On for artifacts `vlmopt prune` recorded as 2:4 sparse, unless the user says otherwise."""
    return option == "on" or (option == "auto" and parent.traits.two_four_sparse)


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
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace * 2**20)
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


def _admits(profiles: dict[str, Profile]) -> Callable[[dict[str, Any]], bool]:
    """Whether a feed's shapes lie inside the engine's profiles (verification skips those that do not)."""
    return lambda feed: all(profile.admits(tuple(feed[name].shape)) for name, profile in profiles.items())


class Build(Stage):
    name = "build"
    Options = BuildOptions
    produces = "tensorrt"
    accepts = Accepts(kinds=("onnx",), ort_only_ops=False, hint="build from onnx, fp16 or int8-static-trt", ort_only_ops_refusal="TensorRT cannot parse")
    tools = ("tensorrt",)
    summary = "Build strongly typed TensorRT engines (10.x and 11.x) from an ONNX artifact that carries its precision; verify them against ONNX Runtime."
    details = (
        "Needs TensorRT (pip install 'vlmopt\\[tensorrt]') and a CUDA GPU; without either it says which and exits 2.\n"
        "Example: vlmopt build build/clip --from fp16"
    )

    def artifact_name(self, options: BuildOptions) -> str:
        return options.artifact

    def requires(self, options: BuildOptions) -> str | None:
        from vlmopt.machine import require_tensorrt_gpu

        try:
            version, _ = require_tensorrt_gpu()
            check_tensorrt_version(version)
        except VlmoptError as exc:
            return exc.message
        return None

    def environment(self, options: BuildOptions) -> dict[str, str]:
        """Engines are tied to the exact TensorRT version and GPU they were built with."""
        from vlmopt.machine import gpus, tensorrt_status

        found = gpus()
        gpu = f"{found[0].name} (compute capability {found[0].compute_capability[0]}.{found[0].compute_capability[1]})" if found else "none"
        return {"tensorrt": tensorrt_status()[0] or "not installed", "gpu": gpu}

    def check_parent(self, parent: Artifact, options: BuildOptions) -> None:
        super().check_parent(parent, options)
        not_ready = {t: issue for t, issue in parent.traits.tensorrt_issues.items() if issue is not None}
        if not_ready:
            tower, issue = next(iter(not_ready.items()))
            raise VlmoptError(f"'{parent.name}' is not a graph TensorRT builds ({tower}: {issue}); quantize with --target tensorrt")

    def prepare(self, job: Job) -> None:
        options: BuildOptions = job.options
        overrides = options.overrides()
        profiles = {}
        for name, tower in job.towers.items():
            mine = {k: v for k, v in overrides.items() if k in {s.name for s in tower.inputs}}
            profiles[name] = derive_profiles(tower, options.opt_batch, options.max_batch, options.max_seq, mine)
        unused = set(overrides) - {n for p in profiles.values() for n in p}
        if unused:
            raise VlmoptError(f"--shapes names {', '.join(sorted(unused))}, which no tower of '{job.parent.name}' takes")
        job.state["profiles"] = profiles

    def build(self, job: Job, tmp: Path) -> StageOutput:
        from vlmopt.machine import require_tensorrt_gpu

        options: BuildOptions = job.options
        version, gpu = require_tensorrt_gpu()
        cc = gpu.compute_capability
        job.state.update(
            version=version,
            gpu=gpu,
            sparse=sparse_requested(options.sparse_weights, job.parent),
            cache=job.model_dir.path / TIMING_CACHES / f"tensorrt-{version}-sm{cc[0]}{cc[1]}.cache" if options.timing_cache else None,
        )
        output = super().build(job, tmp)
        output.traits = job.parent.traits.derive(target="tensorrt", sparsity=job.parent.traits.sparsity)
        output.record["tensorrt_version"] = version
        output.record["gpu"] = gpu.name
        output.record["compute_capability"] = f"{cc[0]}.{cc[1]}"
        output.record["sparse_weights"] = job.state["sparse"]
        return output

    def make_tower(self, job: Job, tower: str, tmp: Path) -> Made:
        options: BuildOptions = job.options
        version, gpu, profiles = job.state["version"], job.state["gpu"], job.state["profiles"][tower]
        spec = job.towers[tower]
        job.say(f"building the {tower} tower's engine (TensorRT {version}, {gpu.name})")
        engine, timings = _build_engine(job.parent_file(tower), spec, profiles, options, job.state["sparse"], job.state["cache"])
        file = f"{tower}.engine"
        (tmp / file).write_bytes(engine)
        meta = engine_metadata(
            version,
            gpu.name,
            gpu.compute_capability,
            profiles,
            source=job.parent.name,
            hardware_compatibility=options.hardware_compatibility,
            version_compatible=options.version_compatible,
            sparse_weights=job.state["sparse"],
            precision=job.parent.traits.precision,
            remake_args=self.remake_args(options),
            **timings,
        )
        return Made(TowerRecord(spec, file, len(engine), engine=meta), timings)

    def verify(self, job: Job, tmp: Path, towers: dict[str, TowerRecord]) -> Verification | None:
        from vlmopt.verification import Gates, verify_artifacts

        job.say("verifying the engines against ONNX Runtime")
        profiles = job.state["profiles"]
        verification = verify_artifacts(
            job.parent_dir,
            job.parent,
            tmp,
            provisional(self, job, tmp, towers),
            Gates.of(job.options),
            data=job.state.get("data"),
            admits={n: _admits(profiles[n]) for n in towers},
        )
        verification.reference = f"{job.parent.name} (onnxruntime)"
        return verification


STAGE = Build()
