"""`vlmopt openvino --part decoder=int4`: a decoder compressed by NNCF's data-aware weight compression, run by vlmopt's
generation loop on OpenVINO, and verified by the same token agreement and perplexity gates as quantize's ONNX int4."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import assert_refused, manifest, vlmopt, vlmopt_json

GATES_OFF = ("--min-token-agreement", "off", "--max-ppl-increase", "off")
INT4 = "openvino-decoder-int4"


@pytest.fixture(scope="module")
def llama(torch_converted: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama with its decoder exported from PyTorch (OpenVINO reads no GroupQueryAttention)."""
    model_dir = tmp_path_factory.mktemp("ov-llama") / "llama"
    shutil.copytree(torch_converted("llama"), model_dir)
    return model_dir


@pytest.fixture(scope="module")
def int4_llama(llama: Path) -> Path:
    vlmopt_json("openvino", llama, "--part", "decoder=int4", *GATES_OFF)
    return llama


def _metrics(model_dir: Path, artifact: str) -> dict[str, float]:
    return {m["name"]: m["value"] for m in manifest(model_dir)["artifacts"][artifact]["verification"]["metrics"]}


def test_decoder_int4_runs_4_bit_matrices_in_openvino(int4_llama: Path) -> None:
    executed = manifest(int4_llama)["artifacts"][INT4]["record"]["executed"]["decoder"]["layers"]

    assert executed["FullyConnected"].get("u4", 0) >= 1, executed


def test_decoder_int4_is_calibrated_by_awq_on_real_text_the_gate_does_not_read(int4_llama: Path) -> None:
    record = manifest(int4_llama)["artifacts"][INT4]["record"]

    compression = record["towers"]["decoder"]["compression"]
    assert compression["method"] == "awq" and compression["group_size"] == 32
    assert record["calibration"]["decoder"]["data"] == "real"
    assert "the gate reads only its start" in record["calibration"]["decoder"]["source"]


def test_decoder_int4_is_verified_by_token_agreement_and_perplexity_against_its_onnx_parent(int4_llama: Path) -> None:
    metrics = _metrics(int4_llama, INT4)

    assert 0.5 < metrics["teacher-forced next-token top-1 agreement"] < 1.0
    assert "perplexity increase" in metrics


def test_info_shows_the_openvino_decoders_token_figures_and_that_they_were_not_gated(int4_llama: Path) -> None:
    listing = vlmopt_json("info", int4_llama)

    verdict = next(a["verdict"] for a in listing["artifacts"] if a["name"] == INT4)
    assert verdict.startswith("passed (top-1 agreement") and verdict.count("not gated") == 2, verdict


def test_a_missed_token_gate_fails_with_exit_1_and_writes_nothing(int4_llama: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(int4_llama)

    result = vlmopt("openvino", model_dir, "--part", "decoder=int4", "--method", "rtn", "--name", "strict", "--min-token-agreement", "0.9999")

    assert result.exit_code == 1, result.stderr
    assert "top-1 agreement" in result.stderr or "token" in result.stderr, result.stderr
    assert not (model_dir / "strict").exists() and "strict" not in manifest(model_dir)["artifacts"]


def test_the_openvino_loop_generates_the_onnx_loops_tokens_from_the_same_fp32_graphs(llama: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    from generative import preprocessor_of
    from vlmopt.runners.loops import loop_runner
    from vlmopt.verification.generation import _pairs, _request

    model_dir = copy_model_dir(llama)
    vlmopt_json("openvino", model_dir)
    artifacts = manifest(model_dir)["artifacts"]
    preprocessor = preprocessor_of(model_dir)

    def files(name: str) -> dict[str, str]:
        return {tower: record["file"] for tower, record in artifacts[name]["towers"].items()}

    with (
        loop_runner(model_dir / "onnx", files("onnx"), 1, preprocessor.contract) as onnx,
        loop_runner(model_dir / "openvino", files("openvino"), 1, preprocessor.contract) as ir,
    ):
        requests = [_request(preprocessor, prompt, 12) for prompt in _pairs(preprocessor, 2)]
        assert ir.backend == "openvino"
        assert [ir.generate(r).tokens for r in requests] == [onnx.generate(r).tokens for r in requests]


# -- bad input ---------------------------------------------------------------------------------------
def test_decoder_int4_on_a_model_without_a_decoder_is_refused(converted: Callable[[str], Path]) -> None:
    assert_refused(converted("clip"), "openvino", "--part", "decoder=int4", fragments=("no part named decoder",))


def test_a_method_without_a_decoder_int4_part_is_refused(converted: Callable[[str], Path]) -> None:
    assert_refused(converted("clip"), "openvino", "--mode", "int4-weights", "--method", "gptq", fragments=("--part decoder=int4",))


def test_a_method_on_an_int4_part_that_is_not_a_decoder_is_refused(llama: Path) -> None:
    assert_refused(llama, "openvino", "--part", "embedding=int4", "--method", "gptq", *GATES_OFF, fragments=("the embedding part is not one",))


def test_a_part_mode_nncf_does_not_make_is_refused(llama: Path) -> None:
    assert_refused(llama, "openvino", "--part", "decoder=int3", fragments=("decoder=int3", "fp32, int8, int4"))


def test_a_decoder_of_onnxruntime_genais_builder_is_refused_naming_the_torch_export(converted: Callable[[str], Path]) -> None:
    assert_refused(converted("llama"), "openvino", "--part", "decoder=int4", fragments=("GroupQueryAttention", "--decoder torch"))


@pytest.mark.parametrize(
    ("content", "fragment"), [(b"  \n", "is empty"), (b"caf\xe9 " * 400, "not UTF-8"), (b"Too short.", "fewer than one")], ids=["empty", "latin-1", "short"]
)
def test_bad_calibration_text_is_refused(llama: Path, tmp_path: Path, content: bytes, fragment: str) -> None:
    text = tmp_path / "calib.txt"
    text.write_bytes(content)

    assert_refused(llama, "openvino", "--part", "decoder=int4", "--calib-text", text, *GATES_OFF, fragments=(fragment,))


def test_calibration_text_for_rtn_is_refused(llama: Path, tmp_path: Path) -> None:
    text = tmp_path / "calib.txt"
    text.write_text("Some text. " * 300)

    assert_refused(llama, "openvino", "--part", "decoder=int4", "--method", "rtn", "--calib-text", text, fragments=("needs no data",))


def test_generate_runs_the_openvino_decoder_in_vlmopts_loop(int4_llama: Path) -> None:
    result = vlmopt_json("generate", int4_llama, INT4, "--prompt", "Describe a cat.", "--max-new-tokens", "4")

    assert result["backend"] == "openvino" and len(result["tokens"]) == 4


def test_bench_shows_the_openvino_decoders_recorded_token_figures(int4_llama: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(int4_llama)

    result = vlmopt("bench", model_dir, INT4, "--batch", "1")

    report = next((model_dir / "reports").glob("bench-*.md")).read_text()
    assert result.exit_code == 0, result.stderr
    line = next(line for line in report.splitlines() if line.startswith(f"- `{INT4}`"))
    assert "top-1 agreement" in line and "perplexity" in line and line.count("not gated") == 2, line
