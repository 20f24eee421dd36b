"""`vlmopt openvino`: OpenVINO IR (fp32, NNCF int8, NNCF weight compression) verified against its parent, its runner, bench and the recommendation."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import assert_bad_input, assert_refused, manifest, snapshot, vlmopt, vlmopt_json

if importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None:
    if os.environ.get("CI"):
        raise ImportError("CI installs the openvino extra (make install); its tests must run there, not skip")
    pytest.skip("the openvino extra is not installed here (pip install -e '.[openvino]')", allow_module_level=True)

import openvino as ov  # noqa: E402

QUICK_BENCH = ("--iterations", "2", "--warmup", "0")
#: a few calibration samples keep NNCF fast on the tiny models; the tiny random text tower then needs a lower gate
FEW = ("--calib-samples", "8", "--min-cosine", "0.9")


@pytest.fixture(scope="module")
def ov_dir(tmp_path_factory: pytest.TempPathFactory, converted: Callable[[str], Path]) -> Path:
    """The tiny CLIP with `openvino` (fp32 IR) and `openvino-int8` (NNCF, synthetic calibration) made from `onnx`."""
    model_dir = tmp_path_factory.mktemp("openvino") / "clip"
    shutil.copytree(converted("clip"), model_dir)
    for flags in ((), ("--mode", "int8", *FEW)):
        result = vlmopt("openvino", model_dir, *flags)
        assert result.exit_code == 0, result.output
    return model_dir


def _artifact(model_dir: Path, name: str) -> dict[str, Any]:
    return manifest(model_dir)["artifacts"][name]


def _cpu_default_precision() -> str:
    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()


# -- the artifacts ---------------------------------------------------------------------------------
def test_fp32_ir_is_written_per_tower_and_verified_against_its_onnx_parent(ov_dir: Path) -> None:
    artifact = _artifact(ov_dir, "openvino")

    assert artifact["kind"] == "openvino" and artifact["parent"] == "onnx"
    assert sorted(f["path"] for f in artifact["files"]) == ["text.bin", "text.xml", "vision.bin", "vision.xml"]
    verification = artifact["verification"]
    assert verification["reference"] == "onnx" and verification["passed"]
    for checks in verification["towers"].values():
        for output in checks[0]["outputs"].values():
            assert output["cosine_min"] > 0.99999, output


def test_fp32_ir_keeps_the_tower_interface_the_manifest_records(ov_dir: Path) -> None:
    model = ov.Core().read_model(ov_dir / "openvino" / "text.xml")

    assert [sorted(i.get_names()) for i in model.inputs] == [["input_ids"], ["attention_mask"]]
    assert [sorted(o.get_names()) for o in model.outputs] == [["text_embeds"]]
    assert model.inputs[0].get_partial_shape().is_dynamic


def test_fp32_ir_records_that_it_ran_in_f32(ov_dir: Path) -> None:
    artifact = _artifact(ov_dir, "openvino")

    for tower, executed in artifact["record"]["executed"].items():
        assert artifact["towers"][tower]["engine"]["inference_precision"] == "f32"
        assert executed["inference_precision"] == "f32", executed
        assert executed["layers"]["FullyConnected"] == {"f32": executed["layers"]["FullyConnected"]["f32"]}, executed


def test_int8_by_nncf_is_verified_and_runs_int8_layers_except_the_fallbacks_and_the_outlier_channels(ov_dir: Path) -> None:
    artifact = _artifact(ov_dir, "openvino-int8")
    fallback = artifact["record"].get("fallback") or {}

    assert artifact["traits"]["precision"] == "int8"
    assert artifact["verification"]["passed"] and artifact["verification"]["gates"]["min_cosine"] == 0.9
    for tower, executed in artifact["record"]["executed"].items():
        kinds = executed["layers"]["FullyConnected"]
        kept = (fallback.get("towers") or {}).get(tower, {}).get("kept", [])
        assert set(kinds) - {"f32"} <= {"i8", "u8"} and kinds.get("i8", 0) + kinds.get("u8", 0) > 0, (tower, kinds)
        split = artifact["record"]["towers"][tower]["compression"].get("outlier_channels", {}).get("matmuls", 0)
        assert kinds.get("f32", 0) == len(kept) + split, (tower, kinds, kept, split)
        assert artifact["record"]["towers"][tower]["compression"]["model_type"] == "transformer"


def test_int8_without_calibration_data_calibrates_on_the_built_in_photos_and_prose(
    converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]
) -> None:
    model_dir = copy_model_dir(converted("clip"))

    result = vlmopt("openvino", model_dir, "--mode", "int8", *FEW, "--name", "ov8")

    assert result.exit_code == 0, result.output
    assert "SYNTHETIC" not in result.stderr
    calibration = _artifact(model_dir, "ov8")["record"]["calibration"]
    assert calibration["vision"] == {"data": "real", "source": "built-in photos", "samples": 8}
    assert calibration["text"] == {"data": "real", "source": "built-in prose", "samples": 8}


def test_int8_of_a_tower_without_a_tokenizer_says_synthetic_in_capitals(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    """The demo BERT ships no tokenizer: its text tower can only be calibrated on random inputs, and says so."""
    model_dir = copy_model_dir(converted("bert"))

    result = vlmopt("openvino", model_dir, "--mode", "int8", *FEW, "--name", "ov8")

    assert result.exit_code == 0, result.output
    assert "SYNTHETIC" in result.stderr
    assert _artifact(model_dir, "ov8")["record"]["calibration"]["text"]["data"] == "synthetic"


def test_int8_calibrated_on_prompts_records_real_data(tmp_path: Path, converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    """The tiny CLIP: the demo BERT ships no tokenizer, so no prompt of it would be real text."""
    model_dir = copy_model_dir(converted("clip"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na dog on the beach\na red car\na ship at sunset\n")
    images = Path(__file__).resolve().parents[1] / "examples" / "data" / "images"

    result = vlmopt("openvino", model_dir, "--mode", "int8", "--calib-text", prompts, "--calib-images", images, *FEW)

    assert result.exit_code == 0, result.output
    assert "SYNTHETIC" not in result.stderr
    assert _artifact(model_dir, "openvino-int8")["record"]["calibration"]["text"] == {"data": "real", "source": f"your text {prompts}", "samples": 4}


def test_int8_weight_compression_keeps_activations_float(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))

    artifact = vlmopt_json("openvino", model_dir, "--mode", "int8-weights")["artifact"]

    assert artifact["traits"]["precision"] == "int8-weights"
    assert artifact["record"]["towers"]["text"]["compression"]["mode"] == "int8_asym"
    assert artifact["verification"]["passed"]
    model = ov.Core().read_model(model_dir / "openvino-int8-weights" / "text.xml")
    weight_types = {op.get_element_type().get_type_name() for op in model.get_ordered_ops() if op.get_type_name() == "Constant"}
    assert "u8" in weight_types


def test_int4_weight_compression_uses_groups_of_the_given_size(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))

    artifact = vlmopt_json("openvino", model_dir, "--mode", "int4-weights", "--group-size", "16", "--symmetric", "--min-cosine", "0.9")["artifact"]

    assert artifact["record"]["towers"]["vision"]["compression"] == {"mode": "int4_sym", "group_size": 16, "ratio": 1.0}
    model = ov.Core().read_model(model_dir / "openvino-int4-weights" / "vision.xml")
    assert "i4" in {op.get_element_type().get_type_name() for op in model.get_ordered_ops() if op.get_type_name() == "Constant"}


def test_bf16_inference_precision_is_recorded_as_what_openvino_ran(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))
    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")

    artifact = vlmopt_json("openvino", model_dir, "--inference-precision", "bf16", "--name", "ov-bf16")["artifact"]

    expected = "bf16" if "BF16" in capabilities else "f32"
    assert {t: e["inference_precision"] for t, e in artifact["record"]["executed"].items()} == {"vision": expected, "text": expected}
    assert artifact["verification"]["passed"]


def test_auto_inference_precision_records_openvinos_own_default(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("vit"))

    artifact = vlmopt_json("openvino", model_dir, "--inference-precision", "auto", "--name", "ov-auto")["artifact"]

    assert artifact["towers"]["vision"]["engine"]["inference_precision"] == "auto"
    assert artifact["record"]["executed"]["vision"]["inference_precision"] == _cpu_default_precision()


def test_static_batch_fixes_the_recorded_interface_and_the_ir(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))

    artifact = vlmopt_json("openvino", model_dir, "--static-batch", "2", "--name", "ov-b2")["artifact"]

    assert artifact["towers"]["vision"]["inputs"][0]["shape"][0] == 2
    assert artifact["towers"]["text"]["inputs"][0]["shape"] == [2, "sequence"]
    model = ov.Core().read_model(model_dir / "ov-b2" / "vision.xml")
    assert model.inputs[0].get_partial_shape()[0].get_length() == 2


def test_a_rerun_with_the_same_options_is_up_to_date(ov_dir: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(ov_dir)
    before = snapshot(model_dir)

    result = vlmopt_json("openvino", model_dir)

    assert result["skipped"] is True
    assert snapshot(model_dir) == before


# -- bench and the recommendation ------------------------------------------------------------------
@pytest.fixture(scope="module")
def benched(tmp_path_factory: pytest.TempPathFactory, ov_dir: Path) -> tuple[Path, dict[str, Any]]:
    model_dir = tmp_path_factory.mktemp("ov-bench") / "clip"
    shutil.copytree(ov_dir, model_dir)
    result = vlmopt("bench", model_dir, "--batch", "1,2", *QUICK_BENCH, "--json")
    assert result.exit_code == 0, result.output
    return model_dir, json.loads(result.stdout)


def test_bench_measures_openvino_artifacts_by_default_with_the_precision_they_ran(benched: tuple[Path, dict[str, Any]]) -> None:
    _, report = benched

    rows = [r for r in report["rows"] if r["backend"] == "openvino"]

    assert sorted((r["artifact"], r["tower"], r["batch"]) for r in rows) == sorted(
        (a, t, b) for a in ("openvino", "openvino-int8") for t in ("vision", "text") for b in (1, 2)
    )
    for row in rows:
        assert row["runtime"]["inference_precision"] == "f32", row
        # the fp32 IR against PyTorch; the int8 one was made to meet the fixture's --min-cosine 0.9 (FEW), and calibrated on the real data, not more
        assert row["cosine_min"] > (0.99 if row["artifact"] == "openvino" else 0.9), row


def test_bench_records_one_recommendation_per_tower_and_batch_in_report_and_manifest(benched: tuple[Path, dict[str, Any]]) -> None:
    model_dir, report = benched

    recorded = manifest(model_dir)["recommendation"]

    assert recorded == report["recommendation"]
    assert sorted((c["tower"], c["batch"]) for c in recorded["choices"]) == [("text", 1), ("text", 2), ("vision", 1), ("vision", 2)]
    artifacts = manifest(model_dir)["artifacts"]
    for choice in recorded["choices"]:
        assert choice["artifact"] in artifacts and choice["artifact"] != "hf"
        assert choice["digest"] == artifacts[choice["artifact"]]["digest"]


def test_the_recommendation_is_the_fastest_artifact_that_passed_its_gate(benched: tuple[Path, dict[str, Any]]) -> None:
    _, report = benched

    for choice in report["recommendation"]["choices"]:
        rows = [r for r in report["rows"] if (r["tower"], r["batch"]) == (choice["tower"], choice["batch"]) and r["artifact"] != "hf"]
        faster = [r["artifact"] for r in rows if r["latency_ms"]["mean"] < choice["latency_ms"]]
        assert sorted(faster) == sorted(choice["rejected"]), choice


def test_info_shows_the_recommendation(benched: tuple[Path, dict[str, Any]]) -> None:
    model_dir, report = benched

    result = vlmopt("info", model_dir)

    assert result.exit_code == 0, result.output
    assert "recommended by bench" in result.stdout
    first = report["recommendation"]["choices"][0]
    assert f"{first['tower']} batch {first['batch']}: {first['artifact']}" in result.stdout
    assert vlmopt_json("info", model_dir)["recommendation"]["choices"] == report["recommendation"]["choices"]


def test_bench_select_exits_1_when_no_artifact_passes_for_a_tower(ov_dir: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(ov_dir)

    result = vlmopt("bench", model_dir, "openvino-int8", "--batch", "1", *QUICK_BENCH, "--select", "--select-min-cosine", "0.99999999")

    assert result.exit_code == 1, result.output
    assert "--select: no artifact passed its fidelity gate" in result.stderr
    assert all(c["artifact"] is None for c in manifest(model_dir)["recommendation"]["choices"])


def test_bench_select_exits_0_when_every_tower_and_batch_has_a_choice(ov_dir: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(ov_dir)

    result = vlmopt("bench", model_dir, "openvino", "--batch", "1", *QUICK_BENCH, "--select")

    assert result.exit_code == 0, result.output


# -- doctor ----------------------------------------------------------------------------------------
def test_doctor_reports_openvinos_version_devices_and_cpu_capabilities() -> None:
    report = vlmopt_json("doctor")

    assert report["openvino"]["version"] == ov.get_version().split("-")[0]
    assert "CPU" in report["openvino"]["devices"]
    assert report["openvino"]["cpu_default_precision"] == _cpu_default_precision()
    assert {"stage": "openvino", "usable": "yes", "needs": "OpenVINO and NNCF (installed)"} in report["stages"]
    assert "OpenVINO" in vlmopt("doctor").stdout


# -- bad input -------------------------------------------------------------------------------------
def _refused(model_dir: Path, *args: object, fragments: tuple[str, ...] = ()) -> None:
    assert_refused(model_dir, "openvino", *args, fragments=fragments)


def test_openvino_not_installed_is_refused_naming_the_extra(monkeypatch: pytest.MonkeyPatch, converted: Callable[[str], Path]) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)

    _refused(converted("clip"), fragments=("OpenVINO", "pip install 'vlmopt[openvino]'"))


def test_benching_an_openvino_artifact_without_openvino_is_refused_naming_the_extra(monkeypatch: pytest.MonkeyPatch, ov_dir: Path) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)
    before = snapshot(ov_dir)

    result = vlmopt("bench", ov_dir, "openvino", "--batch", "1", *QUICK_BENCH)

    assert_bad_input(result, "pip install 'vlmopt[openvino]'")
    assert snapshot(ov_dir) == before


def test_an_artifact_openvino_cannot_read_is_refused_naming_the_operator(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))
    for args in (("optimize", model_dir), ("quantize", model_dir, "--mode", "int8-dynamic", "--from", "onnx-opt", "--name", "int8-opt")):
        assert vlmopt(*args).exit_code == 0

    _refused(model_dir, "--from", "int8-opt", fragments=("com.microsoft.QAttention", "int8-opt"))


def test_calibration_images_that_do_not_fit_the_model_are_refused(
    tmp_path: Path, converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]
) -> None:
    from PIL import Image

    model_dir = copy_model_dir(converted("clip"))
    processor = model_dir / "hf" / "processor_config.json"
    config = json.loads(processor.read_text())
    image_processor = config.get("image_processor", config)
    image_processor["size"] = {"shortest_edge": 48}
    image_processor["crop_size"] = {"height": 48, "width": 48}
    processor.write_text(json.dumps(config))
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(images / "red.png")

    _refused(model_dir, "--mode", "int8", "--calib-images", images, fragments=("48", "vision tower takes"))


def test_a_device_openvino_does_not_know_is_refused(converted: Callable[[str], Path]) -> None:
    _refused(converted("clip"), "--device", "NPU9", fragments=("NPU9", "CPU"))


def test_an_ignored_name_nncf_does_not_find_is_refused(converted: Callable[[str], Path]) -> None:
    _refused(converted("clip"), "--mode", "int8", *FEW, "--ignored-names", "no/such/node", fragments=("no/such/node",))


def test_an_int4_group_size_that_does_not_divide_the_layers_is_refused(converted: Callable[[str], Path]) -> None:
    _refused(converted("clip"), "--mode", "int4-weights", "--group-size", "48", fragments=("group size",))


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (("--mode", "fp32", "--calib-text", "prompts.txt"), "--calib-text"),
        (("--mode", "int8-weights", "--preset", "performance"), "--preset"),
        (("--mode", "int8", "--group-size", "32"), "--group-size"),
        (("--mode", "int8-weights", "--split-outliers", "2"), "--split-outliers"),
        (("--mode", "fp32", "--ignored-types", "MatMul"), "--ignored-"),
        (("--inference-precision", "fp8"), "--inference-precision"),
        (("--static-batch", "0"), "--static-batch"),
        (("--mode", "int8", "--ignored-patterns", "(unclosed"), "regular expression"),
    ],
)
def test_options_that_do_not_fit_the_mode_are_refused(flags: tuple[str, ...], fragment: str, converted: Callable[[str], Path]) -> None:
    _refused(converted("clip"), *flags, fragments=(fragment,))


def test_nncf_refuses_to_compress_an_artifact_that_is_already_quantized(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))
    assert vlmopt("quantize", model_dir, "--mode", "fp16").exit_code == 0

    _refused(model_dir, "--mode", "int8", "--from", "fp16", fragments=("already fp16", "--from onnx"))


def test_the_hugging_face_artifact_is_refused_with_what_to_convert(converted: Callable[[str], Path]) -> None:
    _refused(converted("clip"), "--from", "hf", fragments=("ONNX", "vlmopt convert"))


# -- run settings ----------------------------------------------------------------------------------
def test_throughput_hint_splits_a_batch_over_streams_and_still_verifies(ov_dir: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(ov_dir)

    artifact = vlmopt_json("openvino", model_dir, "--from", "openvino-int8", "--performance-hint", "throughput", "--name", "ov-tput")["artifact"]

    assert artifact["verification"]["passed"] and artifact["verification"]["reference"] == "openvino-int8"
    for executed in artifact["record"]["executed"].values():
        assert executed["performance_hint"] == "throughput" and executed["streams"] >= 1, executed


def test_an_openvino_parent_is_retargeted_without_quantizing_again(ov_dir: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(ov_dir)

    artifact = vlmopt_json("openvino", model_dir, "--from", "openvino-int8", "--static-batch", "8", "--name", "ov-b8")["artifact"]

    assert artifact["traits"]["precision"] == "int8"
    assert "compression" not in artifact["record"]["towers"].get("vision", {})
    assert artifact["towers"]["vision"]["engine"]["static_batch"] == 8


def test_nncf_refuses_to_compress_an_openvino_artifact_again(ov_dir: Path) -> None:
    _refused(ov_dir, "--from", "openvino", "--mode", "int8-weights", fragments=("already OpenVINO IR", "--from onnx"))


def test_bench_by_default_lists_openvino_artifacts_as_not_measured_without_the_extra(
    monkeypatch: pytest.MonkeyPatch, ov_dir: Path, copy_model_dir: Callable[[Path], Path]
) -> None:
    model_dir = copy_model_dir(ov_dir)
    monkeypatch.setitem(sys.modules, "openvino", None)

    report = vlmopt_json("bench", model_dir, "--tower", "vision", "--batch", "1", *QUICK_BENCH)

    assert {r["artifact"] for r in report["rows"]} == {"hf", "onnx"}
    skipped = {s["artifact"]: s["reason"] for s in report["not_measured"]}
    assert set(skipped) == {"openvino", "openvino-int8"}
    assert all("pip install 'vlmopt[openvino]'" in reason for reason in skipped.values())


def test_nncf_refuses_a_graph_fused_by_onnx_runtime(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))
    assert vlmopt("optimize", model_dir).exit_code == 0

    _refused(model_dir, "--from", "onnx-opt", "--mode", "int8", fragments=("fused", "--from onnx"))


def test_a_graph_fused_by_onnx_runtime_converts_as_is(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))
    assert vlmopt("optimize", model_dir).exit_code == 0

    artifact = vlmopt_json("openvino", model_dir, "--from", "onnx-opt")["artifact"]

    assert artifact["name"] == "openvino-onnx-opt" and artifact["verification"]["passed"]


def test_doctor_says_which_extra_makes_the_openvino_stage_usable_without_openvino() -> None:
    from vlmopt.machine import INSTALL_OPENVINO, Machine, OpenVINOInfo, stages_usable

    machine = Machine(torch="2.13.0", torch_cuda=None, openvino=OpenVINOInfo(None, problem="OpenVINO is not installed"))

    rows = {row["stage"]: row for row in stages_usable(machine)}

    assert rows["openvino"] == {"stage": "openvino", "usable": "no", "needs": INSTALL_OPENVINO}


def test_an_ignored_pattern_applies_to_each_tower_where_it_matches(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))

    artifact = vlmopt_json(
        "openvino", model_dir, "--mode", "int8", *FEW, "--ignored-patterns", ".*text_model.*self_attn/MatMul(_1)?$", "--smooth-quant", "off"
    )["artifact"]

    towers = artifact["record"]["towers"]
    assert towers["text"]["compression"]["ignored"]["patterns"] == [".*text_model.*self_attn/MatMul(_1)?$"]
    assert "ignored" not in towers["vision"]["compression"]
    assert towers["text"]["compression"]["smooth_quant_alpha"] is None


# -- recipes ---------------------------------------------------------------------------------------
def test_a_recipe_names_the_openvino_stage_and_bench_measures_what_it_made(tmp_path: Path) -> None:
    from conftest import run_json, statuses, write_recipe

    recipe = write_recipe(
        tmp_path / "recipes",
        "source: demo:clip-tiny\nmodel_dir: ../build/clip\nsteps:\n"
        "  - convert: {}\n  - openvino: {mode: int8-weights}\n  - bench: {batch: [1], iterations: 2, warmup: 0}\n",
    )

    code, payload = run_json(recipe)

    assert code == 0, payload
    assert statuses(payload) == {"hf": "ran", "onnx": "ran", "openvino-int8-weights": "ran", "bench": "ran"}
    report = json.loads((tmp_path / "build" / "clip" / "vlmopt.json").read_text())
    assert report["artifacts"]["openvino-int8-weights"]["benchmark"]["rows"], "bench measured the recipe's OpenVINO artifact"
