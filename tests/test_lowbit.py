"""A decoder's int4, data-aware (`quantize --part decoder=int4 --method ...`), mixed precision by sensitivity, and
records that show a part's token figures and whether they were gated."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import assert_refused, manifest, vlmopt, vlmopt_json
from vlmopt.quantization import int4

GATES_OFF = ("--min-token-agreement", "off", "--max-ppl-increase", "off")


@pytest.fixture(scope="module")
def llava(converted: Callable[[str], Path]) -> Path:
    return converted("llava")


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir / "hf")


def _sessions(model_dir: Path, decoder: onnx.ModelProto):
    from vlmopt.quantization.fallback import session
    from vlmopt.runners.generate import ort_session

    return ort_session(model_dir / "onnx" / "embedding.onnx", 1), session(decoder, 1)


def _planted(model_dir: Path) -> onnx.ModelProto:
    """The tiny decoder with weight outliers planted: in every weight matrix, one weight in 16 is 12x larger, so a
    block's scale is set by its outlier and round-to-nearest leaves the other weights few levels."""
    from onnx import numpy_helper

    model = onnx.load(str(model_dir / "onnx" / "decoder.onnx"))
    del model.graph.value_info[:]
    weights = {n.input[1] for n in int4.weight_matmuls(model)}
    rng = np.random.default_rng(0)
    for tensor in model.graph.initializer:
        if tensor.name in weights:
            w = numpy_helper.to_array(tensor).copy()
            w[rng.random(w.shape) < 1 / 16] *= 12
            tensor.CopyFrom(numpy_helper.from_array(w.astype(np.float32), tensor.name))
    return model


def _logit_error(embedding, reference, candidate, ids: np.ndarray) -> float:
    """Relative RMS error of the candidate's logits against the reference's, over windows of 32 tokens of `ids`."""
    from vlmopt.quantization.fallback import session

    sess = session(candidate, 1)
    hidden = int(reference.get_inputs()[0].shape[2]) if reference.get_inputs()[0].name == "inputs_embeds" else None
    hidden = hidden or int(next(i for i in reference.get_inputs() if i.name == "inputs_embeds").shape[2])
    num = den = 0.0
    for start in range(0, len(ids) - 32 + 1, 32):
        feed = int4.prefill_feed(reference, int4.embed(embedding, ids[start : start + 32], hidden))
        a, b = reference.run(["logits"], feed)[0], sess.run(["logits"], feed)[0]
        num += float(((a - b) ** 2).sum())
        den += float((a**2).sum())
    return (num / den) ** 0.5


# -- the methods -------------------------------------------------------------------------------------
def test_gptq_beats_round_to_nearest_on_a_decoder_with_planted_outliers(llava: Path) -> None:
    from vlmopt.samples import text_tokens

    planted = _planted(llava)
    embedding, reference = _sessions(llava, planted)
    tokenizer = _tokenizer(llava)
    calibration = int4.calibration_text(tokenizer, None, 8)
    feeds = int4.decoder_feeds(embedding, reference, calibration.windows)
    held_out, _ = text_tokens(tokenizer, 256)  # the gate's text: not what GPTQ calibrated on
    settings = int4.Settings(block_size=32, symmetric=True, accuracy_level=4, threads=1)

    rtn_error = _logit_error(embedding, reference, int4.rtn(planted, settings), held_out)
    gptq_error = _logit_error(embedding, reference, int4.gptq(planted, settings, feeds), held_out)

    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)


def test_gptq_writes_codes_on_the_grid_it_chose(llava: Path) -> None:
    """GPTQ's codes are packed as they are: dequantizing the MatMulNBits weight gives exactly GPTQ's rounded weight."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((64, 8)).astype(np.float32)
    x = rng.standard_normal((256, 64))
    codes, scales, zeros = int4.gptq_codes(weight, x.T @ x, 32, 4, symmetric=False)
    dequantized = (codes.astype(np.float64) - np.repeat(zeros, 32, 0)) * np.repeat(scales, 32, 0)

    assert codes.max() <= 15 and np.abs(dequantized - weight).max() < np.abs(weight).max()
    assert np.abs(x @ dequantized - x @ weight).mean() < np.abs(x @ weight).mean() * 0.2


def test_the_calibration_text_is_not_the_text_the_gate_judges_on(llava: Path) -> None:
    from vlmopt.samples import english_text, text_tokens
    from vlmopt.verification.generation import TEXT_TOKENS

    tokenizer = _tokenizer(llava)
    gate, _ = text_tokens(tokenizer, TEXT_TOKENS)
    calibration = int4.calibration_text(tokenizer, None, 4)
    gate_spans = {tuple(gate[i : i + 64]) for i in range(len(gate) - 64)}
    text, _ = int4.builtin_text()

    assert len(calibration.windows) == 4 and all(len(w) == int4.CALIB_WINDOW for w in calibration.windows)
    assert english_text().endswith(text) and len(english_text()) - len(text) > TEXT_TOKENS * 12  # the gate tokenizes at most its first 12 characters a token
    assert not any(tuple(w[i : i + 64]) in gate_spans for w in calibration.windows for i in range(0, len(w) - 64, 8))


def test_quantize_decoder_int4_by_gptq_records_the_method_and_its_calibration(llava: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(llava)

    vlmopt_json("quantize", model_dir, "--part", "decoder=int4", "--method", "gptq", "--calib-samples", "4", *GATES_OFF)

    artifact = manifest(model_dir)["artifacts"]["decoder-int4"]
    details = artifact["record"]["towers"]["decoder"]["quantization"]
    decoder = onnx.load(str(model_dir / "decoder-int4" / "decoder.onnx"), load_external_data=False)
    assert details["method"] == "gptq" and "gptq" in details["weights"]
    assert details["calibration"]["windows"] == 4 and "from character" in details["calibration"]["source"]
    assert {a.i for n in decoder.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"} == {4}


def test_auto_scores_every_method_on_the_gate_text_and_records_which_it_chose_and_why(llava: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(llava)

    vlmopt_json("quantize", model_dir, "--part", "decoder=int4", "--method", "auto", "--calib-samples", "4", *GATES_OFF)

    auto = manifest(model_dir)["artifacts"]["decoder-int4"]["record"]["towers"]["decoder"]["quantization"]["auto"]
    tried = {m: t for m, t in auto["tried"].items() if "error" not in t}
    assert {"rtn", "gptq", "hqq"} <= set(tried)
    assert auto["chosen"] in tried and auto["why"]
    fast = [m for m in tried if m not in int4.FLOAT_ZERO_POINTS]
    assert tried[auto["chosen"]]["top1_agreement"] == max(tried[m]["top1_agreement"] for m in fast)
    assert auto["tried"]["grid"]["error"].startswith("not tried: 0 of")  # the random decoder is on no 4-bit grid


# -- mixed precision ----------------------------------------------------------------------------------
def test_keeping_every_matrix_at_int8_gives_the_int8_graphs_logits(llava: Path) -> None:
    from vlmopt.quantization.fallback import Splicer

    model = onnx.load(str(llava / "onnx" / "decoder.onnx"))
    del model.graph.value_info[:]
    settings = int4.Settings(threads=1)
    q4, q8 = int4.rtn(model, settings), int4.rtn(model, settings, bits=8)
    splicer = Splicer(model, q4)
    embedding, reference = _sessions(llava, model)
    ids = np.random.default_rng(0).integers(5, 400, 64)

    mixed = int4.Int8Keeper(splicer, q8).revert(splicer.candidates)

    assert _logit_error(embedding, reference, mixed, ids) == pytest.approx(_logit_error(embedding, reference, q8, ids), abs=1e-7)
    assert _logit_error(embedding, reference, mixed, ids) < _logit_error(embedding, reference, q4, ids) / 4


def test_fallback_keeps_the_fewest_matrices_at_int8_until_the_token_gates_pass(llava: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(llava)
    # the tiny random decoder agrees on about 0.85 of the positions in int4 and 0.98 in int8: a gate of 0.9 needs some int8
    result = vlmopt_json("quantize", model_dir, "--part", "decoder=int4", "--fallback", "--min-token-agreement", "0.9", "--max-ppl-increase", "off")

    artifact = manifest(model_dir)["artifacts"]["decoder-int4"]
    info = artifact["record"]["fallback"]["towers"]["decoder"]
    decoder = onnx.load(str(model_dir / "decoder-int4" / "decoder.onnx"), load_external_data=False)
    bits = [next(a.i for a in n.attribute if a.name == "bits") for n in decoder.graph.node if n.op_type == "MatMulNBits"]
    assert result["ok"] and artifact["verification"]["passed"]
    assert info["fully_int4"]["top1_agreement"] < 0.9 <= info["reached"]["top1_agreement"]
    assert 1 <= len(info["kept"]) == bits.count(8) and bits.count(4) == info["quantized_layers"] - len(info["kept"])
    assert all(k["precision"] == "int8" and "cost_ms" in k for k in info["kept"])
    assert info["speed"]["int4_tokens_per_s"] and info["speed"]["mixed_tokens_per_s"]


@pytest.fixture(scope="module")
def refused(llava: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny decoder's int4 with a token gate it misses (it agrees on about 0.85 in int4) and no --fallback."""
    import shutil

    model_dir = tmp_path_factory.mktemp("refused") / "llava"
    shutil.copytree(llava, model_dir)
    return model_dir, vlmopt("quantize", model_dir, "--part", "decoder=int4", "--min-token-agreement", "0.99", "--max-ppl-increase", "off", "--json")


def test_a_missed_token_gate_names_the_most_sensitive_matrices_and_the_command_that_keeps_them(refused) -> None:
    model_dir, result = refused
    lines = result.stderr.strip().splitlines()

    assert result.exit_code == 1 and len(lines) == 1, result.stderr
    assert "most sensitive matrices of the decoder part" in lines[0]
    assert "layers.0." in lines[0] or "layers.1." in lines[0], lines[0]
    assert f"vlmopt quantize {model_dir} --part decoder=int4 --min-token-agreement 0.99 --max-ppl-increase off --fallback" in lines[0]
    assert "node_" not in lines[0] and "nothing was written" in lines[0]


def test_a_missed_token_gate_reports_every_matrixs_sensitivity_in_json(refused) -> None:
    model_dir, result = refused

    rows = json.loads(result.stdout)["report"]["sensitivity"]["decoder"]
    assert len(rows) == len(int4.weight_matmuls(onnx.load(str(model_dir / "onnx" / "decoder.onnx"), load_external_data=False)))
    assert [r["sensitivity"] for r in rows] == sorted((r["sensitivity"] for r in rows), reverse=True)
    assert all(r["matrix"].startswith(("layers.", "lm_head")) and r["sensitivity"] > 0 for r in rows), rows[:3]
    assert "decoder-int4" not in manifest(model_dir)["artifacts"]


# -- records that tell the truth ----------------------------------------------------------------------
def test_info_shows_a_decoders_token_figures_and_that_they_were_not_gated(llava: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(llava)
    vlmopt_json("quantize", model_dir, "--part", "decoder=int4", *GATES_OFF)

    listing = vlmopt_json("info", model_dir)
    vlmopt("report", model_dir)
    summary = (model_dir / "reports" / "summary.md").read_text()

    row = next(line for line in summary.splitlines() if line.startswith("| `decoder-int4`"))
    assert "top-1 agreement" in row and "perplexity" in row and "not gated" in row, row
    verdict = next(a["verdict"] for a in listing["artifacts"] if a["name"] == "decoder-int4")
    assert verdict.startswith("passed (top-1 agreement") and "perplexity" in verdict and verdict.count("not gated") == 2, verdict


def test_the_verdict_of_a_gated_variant_names_each_token_figure_against_its_limit() -> None:
    from vlmopt.records import MetricCheck, Verification

    verification = Verification(
        "onnx",
        {"min_cosine": 0.99},
        {},
        [
            MetricCheck("teacher-forced next-token top-1 agreement", 0.955, "text", 0.9, gate="--min-token-agreement"),
            MetricCheck("perplexity increase", 0.33, "text", 0.05, higher_is_better=False, gate="--max-ppl-increase"),
        ],
        passed=False,
    )

    assert verification.verdict() == "FAILED (top-1 agreement 0.9550 >= 0.9; perplexity +33.0% > +5.0%, FAILED)"


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "is empty"),
        (b"   \n\n", "is empty"),
        (b"caf\xe9 au lait " * 200, "not UTF-8"),
        (b"Too short for one window.", "fewer than one calibration window"),
    ],
    ids=["empty", "blank", "latin-1", "short"],
)
def test_bad_calibration_text_is_refused(llava: Path, tmp_path: Path, content: bytes, fragment: str) -> None:
    text = tmp_path / "calib.txt"
    text.write_bytes(content)

    assert_refused(llava, "quantize", "--part", "decoder=int4", "--method", "gptq", "--calib-text", text, *GATES_OFF, fragments=(fragment,))


def test_a_method_on_a_part_that_is_not_a_decoder_is_refused(llava: Path) -> None:
    assert_refused(llava, "quantize", "--part", "embedding=int4", "--part", "decoder=int8", "--method", "gptq", *GATES_OFF, fragments=("--method gptq",))


def test_a_method_without_a_decoder_int4_part_is_refused(converted: Callable[[str], Path]) -> None:
    assert_refused(converted("clip"), "quantize", "--mode", "int4", "--method", "gptq", fragments=("--part decoder=int4",))


def test_decoder_int4_on_a_model_without_a_decoder_is_refused(converted: Callable[[str], Path]) -> None:
    assert_refused(converted("clip"), "quantize", "--part", "decoder=int4", "--method", "gptq", fragments=("no part named decoder",))


def test_calibration_text_for_a_method_that_reads_none_is_refused(llava: Path, tmp_path: Path) -> None:
    text = tmp_path / "calib.txt"
    text.write_text("Some text. " * 300)

    assert_refused(llava, "quantize", "--part", "decoder=int4", "--method", "rtn", "--calib-text", text, *GATES_OFF, fragments=("reads no calibration data",))
