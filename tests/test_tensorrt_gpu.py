"""Real TensorRT engines of the tiny CLIP: built from the fp32, fp16 and TensorRT-int8 artifacts, benchmarked on
the GPU against PyTorch, and refused once their recorded TensorRT version no longer matches.

Needs TensorRT (>= 10) and a CUDA GPU; skipped, with the reason, anywhere else.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import assert_bad_input, manifest, snapshot, vlmopt, vlmopt_json
from vlmopt.engines import parse_version
from vlmopt.machine import gpus, tensorrt_status
from vlmopt.workspace import MANIFEST_NAME

TENSORRT_VERSION, _ = tensorrt_status()
GPUS = gpus() if TENSORRT_VERSION is not None else []

pytestmark = pytest.mark.skipif(
    TENSORRT_VERSION is None or not GPUS,
    reason="needs TensorRT and a CUDA GPU (vlmopt doctor tells what is missing)",
)

#: the engine artifacts the module fixture builds, by the ONNX artifact each is built from
ENGINES = {"trt-onnx": "onnx", "trt-fp16": "fp16", "trt-int8-static-trt": "int8-static-trt"}


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory, converted: Callable[[str], Path]) -> tuple[Path, dict[str, dict[str, Any]]]:
    """(model directory, `build --json` output per engine artifact): the tiny CLIP with its three engines."""
    model_dir = tmp_path_factory.mktemp("tensorrt") / "clip"
    shutil.copytree(converted("clip"), model_dir)
    vlmopt_json("quantize", model_dir, "--mode", "fp16")
    vlmopt_json("quantize", model_dir, "--mode", "int8-static", "--target", "tensorrt")
    built = {name: vlmopt_json("build", model_dir, "--from", source) for name, source in ENGINES.items()}
    return model_dir, built


@pytest.fixture(scope="module")
def bench_report(engines: tuple[Path, dict[str, dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One quick GPU benchmark of a copy of the model directory with its engines."""
    model_dir = tmp_path_factory.mktemp("tensorrt-bench") / "clip"
    shutil.copytree(engines[0], model_dir)
    return vlmopt_json("bench", model_dir, "--device", "cuda", "--iterations", "2", "--warmup", "1", "--batch", "1,8")


# -- build ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "source"), list(ENGINES.items()))
def test_build_writes_one_verified_engine_per_tower(name: str, source: str, engines: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    model_dir, built = engines
    artifact = built[name]["artifact"]

    assert built[name]["ok"] is True
    assert (artifact["name"], artifact["kind"], artifact["stage"], artifact["parent"]) == (name, "tensorrt", "build", source)
    assert sorted(artifact["towers"]) == ["text", "vision"]
    for tower, record in artifact["towers"].items():
        assert record["file"] == f"{tower}.engine"
        assert (model_dir / name / record["file"]).stat().st_size > 0
    assert artifact["verification"]["passed"] is True
    assert artifact["verification"]["reference"] == f"{source} (onnxruntime)"


@pytest.mark.parametrize(("name", "source"), list(ENGINES.items()))
def test_an_engine_records_tensorrt_gpu_compute_capability_profiles_and_source(name: str, source: str, engines: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    model_dir, _ = engines
    gpu = GPUS[0]
    towers = manifest(model_dir)["artifacts"][name]["towers"]

    for tower, record in towers.items():
        meta = record["engine"]
        assert meta["tensorrt_version"] == TENSORRT_VERSION
        assert meta["gpu"] == gpu.name
        assert meta["compute_capability"] == f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}"
        assert meta["source"] == source
        assert sorted(meta["profiles"]) == sorted(spec["name"] for spec in record["inputs"]), tower
        for profile in meta["profiles"].values():
            assert profile["min"][0] == 1
            assert profile["opt"][0] == 8
            assert profile["max"][0] == 32


def test_the_text_engine_takes_sequences_up_to_the_model_s_longest(engines: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    model_dir, _ = engines
    record = manifest(model_dir)["artifacts"]["trt-onnx"]["towers"]["text"]
    longest = record["vocab"]["max_length"]

    assert record["engine"]["profiles"]["input_ids"] == {"min": [1, 1], "opt": [8, longest], "max": [32, longest]}


def test_build_keeps_a_timing_cache_for_this_tensorrt_and_gpu(engines: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    model_dir, _ = engines
    major, minor = GPUS[0].compute_capability

    cache = model_dir / "timing-caches" / f"tensorrt-{TENSORRT_VERSION}-sm{major}{minor}.cache"

    assert cache.is_file()
    assert cache.stat().st_size > 0


def test_building_again_with_the_same_options_is_skipped(engines: tuple[Path, dict[str, dict[str, Any]]], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(engines[0])

    again = vlmopt_json("build", model_dir, "--from", "onnx")

    assert again["skipped"] is True
    assert again["artifact"]["digest"] == engines[1]["trt-onnx"]["artifact"]["digest"]


def test_build_with_max_seq_longer_than_the_model_is_refused(engines: tuple[Path, dict[str, dict[str, Any]]], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(engines[0])
    longest = manifest(model_dir)["artifacts"]["onnx"]["towers"]["text"]["vocab"]["max_length"]
    before = snapshot(model_dir)

    result = vlmopt("build", model_dir, "--max-seq", longest + 1, "--name", "trt-long")

    assert_bad_input(result, f"--max-seq {longest + 1}")
    assert snapshot(model_dir) == before


def test_build_with_shapes_for_an_input_no_tower_takes_is_refused(
    engines: tuple[Path, dict[str, dict[str, Any]]], copy_model_dir: Callable[[Path], Path]
) -> None:
    model_dir = copy_model_dir(engines[0])
    before = snapshot(model_dir)

    result = vlmopt("build", model_dir, "--shapes", "token_type_ids:1x8,8x8,32x8", "--name", "trt-shapes")

    assert_bad_input(result, "--shapes names token_type_ids")
    assert snapshot(model_dir) == before


# -- bench on the GPU -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ENGINES))
def test_bench_on_cuda_measures_every_engine_tower_and_batch(name: str, bench_report: dict[str, Any]) -> None:
    rows = [r for r in bench_report["rows"] if r["artifact"] == name]

    assert sorted((r["tower"], r["batch"]) for r in rows) == [("text", 1), ("text", 8), ("vision", 1), ("vision", 8)]
    assert all(r["backend"] == "tensorrt" for r in rows)


@pytest.mark.parametrize("name", list(ENGINES))
def test_bench_on_cuda_engines_agree_with_pytorch_to_cosine_0_99(name: str, bench_report: dict[str, Any]) -> None:
    rows = [r for r in bench_report["rows"] if r["artifact"] == name]

    assert rows
    for row in rows:
        assert row["cosine_min"] is not None, row
        assert row["cosine_min"] >= 0.99, row
        assert row["latency_ms"]["mean"] > 0, row


# -- engines from elsewhere are refused --------------------------------------------------------------
def _record_engine_field(model_dir: Path, artifact: str, field: str, value: str) -> None:
    data = json.loads((model_dir / MANIFEST_NAME).read_text())
    for record in data["artifacts"][artifact]["towers"].values():
        record["engine"][field] = value
    (model_dir / MANIFEST_NAME).write_text(json.dumps(data, indent=2))


def _another_patch_release(version: str) -> str:
    major, minor, patch = (list(parse_version(version)) + [0, 0])[:3]
    return f"{major}.{minor}.{patch + 1}"


def test_an_engine_recorded_for_another_tensorrt_version_is_refused_with_the_rebuild_command(
    engines: tuple[Path, dict[str, dict[str, Any]]], copy_model_dir: Callable[[Path], Path]
) -> None:
    model_dir = copy_model_dir(engines[0])
    other = _another_patch_release(TENSORRT_VERSION or "")
    _record_engine_field(model_dir, "trt-onnx", "tensorrt_version", other)

    result = vlmopt("bench", model_dir, "trt-onnx", "--device", "cuda", "--iterations", "1", "--warmup", "0", "--batch", "1")

    assert_bad_input(
        result,
        f"built with TensorRT {other} on {GPUS[0].name}",
        f"this machine has TensorRT {TENSORRT_VERSION}",
        f"vlmopt build {model_dir} --from onnx --name trt-onnx --force",
    )


def test_an_engine_recorded_for_another_compute_capability_is_refused(
    engines: tuple[Path, dict[str, dict[str, Any]]], copy_model_dir: Callable[[Path], Path]
) -> None:
    model_dir = copy_model_dir(engines[0])
    _record_engine_field(model_dir, "trt-fp16", "compute_capability", "1.0")

    result = vlmopt("bench", model_dir, "trt-fp16", "--device", "cuda", "--iterations", "1", "--warmup", "0", "--batch", "1")

    assert_bad_input(result, "(compute capability 1.0)", f"this GPU is {GPUS[0].name}", "--from fp16 --name trt-fp16 --force")
