"""`vlmopt build`, `vlmopt doctor` and `vlmopt bench --device` on a machine without TensorRT or a CUDA GPU.

What a user without the hardware sees: one line saying what is missing and exit 2, nothing written; a
doctor that says what the machine can and cannot do. Tests that only hold where TensorRT or a GPU is
absent are skipped elsewhere (tests/test_tensorrt_gpu.py covers those machines).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import assert_bad_input, assert_refused, manifest, vlmopt, vlmopt_json
from vlmopt.engines import Profile, engine_metadata
from vlmopt.errors import VlmoptError
from vlmopt.machine import INSTALL_TENSORRT, gpus, require_tensorrt_gpu, tensorrt_status
from vlmopt.workspace import MANIFEST_NAME, content_digest, file_records

TENSORRT_VERSION, TENSORRT_PROBLEM = tensorrt_status()
HAS_GPU = bool(gpus())

without_tensorrt = pytest.mark.skipif(TENSORRT_VERSION is not None, reason=f"TensorRT {TENSORRT_VERSION} is installed here")
without_gpu = pytest.mark.skipif(HAS_GPU, reason="a CUDA GPU is visible here")


@pytest.fixture
def clip_dir(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> Path:
    """A private copy of the converted tiny CLIP."""
    return copy_model_dir(converted("clip"))


@pytest.fixture(scope="module")
def clip_with_opt(tmp_path_factory: pytest.TempPathFactory, converted: Callable[[str], Path]) -> Path:
    """The converted tiny CLIP with the ONNX Runtime-fused `onnx-opt` (to copy, not to change)."""
    model_dir = tmp_path_factory.mktemp("build-cli") / "clip"
    shutil.copytree(converted("clip"), model_dir)
    vlmopt_json("optimize", model_dir)
    return model_dir


# -- vlmopt build without TensorRT --------------------------------------------------------------------
@without_tensorrt
def test_build_without_tensorrt_says_so_in_one_line_and_writes_nothing(clip_dir: Path) -> None:
    assert_refused(clip_dir, "build", fragments=("vlmopt build needs TensorRT and a CUDA GPU", "TensorRT is not installed"))


@without_tensorrt
def test_build_without_tensorrt_names_the_pip_extra_with_its_brackets(clip_dir: Path) -> None:
    line = assert_refused(clip_dir, "build")

    assert INSTALL_TENSORRT in line
    assert "vlmopt[tensorrt]" in line


@without_tensorrt
def test_build_without_tensorrt_reports_the_error_as_json_under_json(clip_dir: Path) -> None:
    result = vlmopt("build", clip_dir, "--json")

    assert result.exit_code == 2
    payload = json.loads(result.stdout)
    assert payload["ok"] is False
    assert payload["exit_code"] == 2
    assert "TensorRT is not installed" in payload["error"]


@without_tensorrt
def test_machine_check_without_tensorrt_names_tensorrt_and_the_purpose() -> None:
    with pytest.raises(VlmoptError) as raised:
        require_tensorrt_gpu("running a TensorRT engine")

    assert raised.value.message.startswith(f"running a TensorRT engine needs TensorRT and a CUDA GPU: TensorRT is not installed ({INSTALL_TENSORRT})")


@without_tensorrt
def test_machine_check_names_the_missing_gpu_too_when_both_are_missing() -> None:
    if gpus():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(VlmoptError) as raised:
        require_tensorrt_gpu("vlmopt build")

    assert raised.value.message.endswith("and torch sees no CUDA GPU")


@without_tensorrt
def test_tensorrt_status_without_tensorrt_says_how_to_install_it() -> None:
    assert tensorrt_status() == (None, f"TensorRT is not installed ({INSTALL_TENSORRT})")


# -- vlmopt build: input refused before TensorRT is needed --------------------------------------------
def test_build_from_the_onnx_runtime_fused_artifact_is_refused_naming_its_operators(tmp_path: Path, clip_with_opt: Path) -> None:
    model_dir = tmp_path / "clip"
    shutil.copytree(clip_with_opt, model_dir)

    assert_refused(
        model_dir, "build", "--from", "onnx-opt", fragments=("'onnx-opt' holds ONNX Runtime-only operators (com.microsoft)", "TensorRT cannot parse")
    )


def test_build_from_the_hugging_face_artifact_isassert_refused(clip_dir: Path) -> None:
    assert_refused(clip_dir, "build", "--from", "hf", fragments=("build reads an ONNX artifact", "'hf'"))


def test_build_from_an_artifact_that_does_not_exist_isassert_refused(clip_dir: Path) -> None:
    assert_refused(clip_dir, "build", "--from", "fp16", fragments=("no artifact named 'fp16'",))


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (("--optimization-level", "9"), "--optimization-level must be in [0, 5], got 9"),
        (("--shapes", "bad"), "--shapes takes name:MIN,OPT,MAX"),
        (("--shapes", "input_ids:8x32,1x32,32x32"), "min <= opt <= max"),
        (("--workspace", "0"), "--workspace"),
        (("--hardware-compatibility", "turing"), "--hardware-compatibility"),
        (("--sparse-weights", "maybe"), "--sparse-weights"),
        (("--min-cosine", "2"), "--min-cosine"),
        (("--opt-batch", "64"), "--opt-batch (64)"),
        (("--max-seq", "0"), "--max-seq"),
    ],
    ids=[
        "optimization-level-9",
        "shapes-bad",
        "shapes-min-above-opt",
        "workspace-0",
        "hardware-compatibility-turing",
        "sparse-maybe",
        "min-cosine-2",
        "opt-batch-above-max-batch",
        "max-seq-0",
    ],
)
def test_build_with_an_invalid_flag_value_isassert_refused(flags: tuple[str, ...], fragment: str, clip_dir: Path) -> None:
    assert_refused(clip_dir, "build", *flags, fragments=(fragment,))


def test_build_of_a_model_directory_that_does_not_exist_isassert_refused(tmp_path: Path) -> None:
    missing = tmp_path / "missing"

    result = vlmopt("build", missing)

    assert_bad_input(result, "does not exist")
    assert not missing.exists()


def test_build_help_names_the_pip_extra_with_its_brackets() -> None:
    result = vlmopt("build", "--help")

    assert result.exit_code == 0
    assert "vlmopt[tensorrt]" in result.stdout


# -- vlmopt bench --device ----------------------------------------------------------------------------
@without_gpu
def test_bench_on_cuda_without_a_gpu_isassert_refused(clip_dir: Path) -> None:
    assert_refused(clip_dir, "bench", "--device", "cuda", fragments=("--device cuda needs a CUDA GPU", "--device cpu"))


def test_bench_on_an_unknown_device_isassert_refused(clip_dir: Path) -> None:
    assert_refused(clip_dir, "bench", "--device", "tpu", fragments=("--device must be one of cpu, cuda, got 'tpu'",))


@pytest.fixture
def clip_with_engine(clip_dir: Path) -> Path:
    """The tiny CLIP with a `trt-onnx` entry as `vlmopt build` records one on another machine (placeholder engine files)."""
    data = manifest(clip_dir)
    onnx = data["artifacts"]["onnx"]
    folder = clip_dir / "trt-onnx"
    folder.mkdir()
    towers: dict[str, Any] = {}
    for name, record in onnx["towers"].items():
        (folder / f"{name}.engine").write_bytes(b"an engine built elsewhere")
        profiles = {spec["name"]: Profile(*[tuple(1 for _ in spec["shape"])] * 3) for spec in record["inputs"]}
        towers[name] = {**record, "file": f"{name}.engine", "engine": engine_metadata("10.14.1", "NVIDIA A100-SXM4-80GB", (8, 0), profiles, source="onnx")}
    files = file_records(folder)
    data["artifacts"]["trt-onnx"] = {
        **onnx,
        "name": "trt-onnx",
        "kind": "tensorrt",
        "stage": "build",
        "options": {},
        "parent": "onnx",
        "parent_digest": onnx["digest"],
        "digest": content_digest(files),
        "files": [f.__dict__ for f in files],
        "towers": towers,
        "verification": None,
        "benchmark": None,
    }
    (clip_dir / MANIFEST_NAME).write_text(json.dumps(data, indent=2))
    return clip_dir


@without_tensorrt
def test_bench_of_an_engine_without_tensorrt_says_tensorrt_is_missing(clip_with_engine: Path) -> None:
    result = vlmopt("bench", clip_with_engine, "trt-onnx", "--batch", "1", "--iterations", "1", "--warmup", "0")

    assert_bad_input(result, "needs TensorRT and a CUDA GPU", "TensorRT is not installed")


@without_tensorrt
def test_loading_an_engine_without_tensorrt_raises_the_one_line_error(clip_with_engine: Path) -> None:
    from vlmopt.runners.tensorrt_runner import TensorRTRunner

    record = manifest(clip_with_engine)["artifacts"]["trt-onnx"]["towers"]["vision"]

    with pytest.raises(VlmoptError, match="TensorRT is not installed"):
        TensorRTRunner(clip_with_engine / "trt-onnx" / record["file"], record["engine"], "vlmopt build DIR --force")


# -- vlmopt doctor ------------------------------------------------------------------------------------
def _table_row(output: str, first_cell: str) -> list[str]:
    """The cells of the table row whose first cell is `first_cell`."""
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("│┃").split("│")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row '{first_cell}' in:\n{output}")


def test_doctor_shows_torch_gpus_onnxruntime_and_tensorrt() -> None:
    import onnxruntime
    import torch

    result = vlmopt("doctor")

    assert result.exit_code == 0, result.output
    assert _table_row(result.stdout, "torch")[1].startswith(torch.__version__)
    assert _table_row(result.stdout, "GPUs")[1]
    assert "CPUExecutionProvider" in _table_row(result.stdout, "ONNX Runtime")[1]
    assert onnxruntime.__version__ in _table_row(result.stdout, "ONNX Runtime")[1]
    assert _table_row(result.stdout, "TensorRT")[1]


@without_tensorrt
@without_gpu
def test_doctor_here_shows_no_gpu_no_tensorrt_and_build_unusable() -> None:
    result = vlmopt("doctor")

    assert result.exit_code == 0, result.output
    assert _table_row(result.stdout, "GPUs")[1] == "none visible to torch"
    assert _table_row(result.stdout, "TensorRT")[1] == TENSORRT_PROBLEM
    assert _table_row(result.stdout, "build") == ["build", "no", "pip install 'vlmopt[tensorrt]'; a CUDA GPU"]
    assert _table_row(result.stdout, "bench (TensorRT)")[1] == "no"
    assert _table_row(result.stdout, "export")[1] == "yes"


def test_doctor_json_has_the_machine_and_its_stages() -> None:
    report = vlmopt_json("doctor")

    assert report["ok"] is True
    assert {"torch", "torch_cuda", "gpus", "onnxruntime", "onnxruntime_providers", "tensorrt", "tensorrt_problem", "stages"} <= set(report)
    assert "CPUExecutionProvider" in report["onnxruntime_providers"]
    assert all(set(row) == {"stage", "usable", "needs"} and row["usable"] in ("yes", "no") for row in report["stages"])
    assert {row["stage"] for row in report["stages"]} >= {"export", "convert", "quantize", "build", "bench (CPU)", "bench (TensorRT)"}


@without_tensorrt
@without_gpu
def test_doctor_json_here_has_no_gpus_no_tensorrt_and_build_unusable() -> None:
    report = vlmopt_json("doctor")

    assert report["gpus"] == []
    assert report["tensorrt"] is None
    assert report["tensorrt_problem"] == f"TensorRT is not installed ({INSTALL_TENSORRT})"
    stages = {row["stage"]: row for row in report["stages"]}
    assert stages["build"]["usable"] == "no"
    assert stages["bench (TensorRT)"]["usable"] == "no"
    assert stages["bench (CPU)"]["usable"] == "yes"
