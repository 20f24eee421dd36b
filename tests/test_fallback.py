"""Accuracy-aware quantization: a missed gate names the most sensitive layers; the fallback (on by default for the int8
modes, asked for with --fallback for int4) keeps the fewest of them in fp32 until the gate passes on rows the search did
not see, ships that graph and records what it kept, the fidelity reached on both halves and what the kept layers cost.

The tiny random-weight CLIP's text tower misses cosine 0.99 in int4 (0.94 on the built-in sentences): a gate it
can be made to meet by keeping some of its 13 layers in fp32."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import Result

from conftest import snapshot, vlmopt, vlmopt_json
from vlmopt.quantization.fallback import Splicer

INT4 = ("--mode", "int4", "--min-cosine", "0.99")


@pytest.fixture(scope="module")
def fell_back(tmp_path_factory: pytest.TempPathFactory, converted: Callable[[str], Path]) -> tuple[Path, dict[str, Any]]:
    """(model directory, artifact) of the tiny CLIP in int4 with --fallback."""
    model_dir = tmp_path_factory.mktemp("fallback") / "clip"
    shutil.copytree(converted("clip"), model_dir)
    return model_dir, vlmopt_json("quantize", model_dir, *INT4, "--fallback", "--fallback-budget", "0.95")["artifact"]


@pytest.fixture(scope="module")
def missed(tmp_path_factory: pytest.TempPathFactory, converted: Callable[[str], Path]) -> Result:
    """The same quantize without --fallback: the gate is missed."""
    model_dir = tmp_path_factory.mktemp("missed") / "clip"
    shutil.copytree(converted("clip"), model_dir)
    return vlmopt("quantize", model_dir, *INT4, "--json")


def _kept(artifact: dict[str, Any]) -> list[str]:
    return [k["node"] for k in artifact["record"]["fallback"]["towers"]["text"]["kept"]]


def _run(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


# -- a missed gate explains itself --------------------------------------------------------------------
def test_a_missed_gate_names_the_most_sensitive_layers(missed: Result) -> None:
    assert missed.exit_code == 1
    assert "most sensitive layers of the text tower" in missed.stderr
    assert "--fallback" in missed.stderr
    assert "nothing was written" in missed.stderr


def test_a_missed_gate_reports_every_layers_sensitivity_in_json(missed: Result) -> None:
    report = json.loads(missed.stdout)

    rows = report["report"]["sensitivity"]["text"]
    assert len(rows) == 13
    assert [r["sensitivity"] for r in rows] == sorted((r["sensitivity"] for r in rows), reverse=True)
    assert {"node", "op", "sensitivity", "weights"} <= set(rows[0])


def test_a_missed_gate_prints_the_sensitivity_table(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    result = vlmopt("quantize", copy_model_dir(converted("clip")), *INT4)

    assert result.exit_code == 1
    assert "per-layer sensitivity of the text tower" in result.stdout


# -- --fallback -------------------------------------------------------------------------------------------
def test_fallback_keeps_some_layers_in_fp32_until_the_gate_passes(fell_back: tuple[Path, dict[str, Any]]) -> None:
    _, artifact = fell_back
    text = artifact["record"]["fallback"]["towers"]["text"]

    assert artifact["verification"]["passed"] is True
    assert min(text["fully_quantized"].values()) < 0.99 <= min(text["reached"].values())
    assert 0 < len(text["kept"]) < text["quantized_layers"] == 13


def test_fallback_leaves_a_tower_that_passed_fully_quantized(fell_back: tuple[Path, dict[str, Any]]) -> None:
    model_dir, artifact = fell_back

    vision = onnx.load(model_dir / "int4" / "vision.onnx").graph
    weights = {t.name for t in vision.initializer}

    assert set(artifact["record"]["fallback"]["towers"]) == {"text"}
    assert not [n.name for n in vision.node if n.op_type == "MatMul" and any(i in weights for i in n.input)]


def test_fallback_ships_the_kept_layers_as_fp32_matmuls(fell_back: tuple[Path, dict[str, Any]]) -> None:
    model_dir, artifact = fell_back
    nodes = {n.name: n.op_type for n in onnx.load(model_dir / "int4" / "text.onnx").graph.node}

    assert all(nodes.get(name) == "MatMul" for name in _kept(artifact))
    assert sum(1 for op in nodes.values() if op == "MatMulNBits") == 13 - len(_kept(artifact))


def test_the_shipped_graph_is_the_quantizer_run_with_the_kept_layers_excluded(
    fell_back: tuple[Path, dict[str, Any]], copy_model_dir: Callable[[Path], Path]
) -> None:
    model_dir, artifact = fell_back
    again = copy_model_dir(model_dir)
    excluded = [f for name in _kept(artifact) for f in ("--exclude-nodes", name)]
    vlmopt_json("quantize", again, "--mode", "int4", "--min-cosine", "0.99", "--name", "int4-excluded", *excluded)
    feed = {"input_ids": np.array([[1022, 5, 6, 7, 1023]], dtype=np.int64), "attention_mask": np.ones((1, 5), dtype=np.int64)}

    np.testing.assert_allclose(_run(model_dir / "int4" / "text.onnx", feed), _run(again / "int4-excluded" / "text.onnx", feed), atol=1e-5)


def test_fallback_records_the_speed_cost_of_each_kept_layer(fell_back: tuple[Path, dict[str, Any]]) -> None:
    text = fell_back[1]["record"]["fallback"]["towers"]["text"]

    for kept in text["kept"]:
        assert {"kept_ms", "quantized_ms", "cost_ms", "sensitivity"} <= set(kept), kept
    assert text["speed"]["total_with_fallback_ms"] > 0 and text["speed"]["total_fp32_ms"] > 0


def test_fallback_that_was_not_needed_says_so(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    artifact = vlmopt_json("quantize", copy_model_dir(converted("clip")), "--mode", "int8-weights", "--fallback")["artifact"]

    assert artifact["record"]["fallback"] == {"needed": False}


def test_an_unreachable_gate_exits_1_with_the_best_fidelity_and_how_many_layers_were_kept(
    converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]
) -> None:
    model_dir = copy_model_dir(converted("clip"))
    before = snapshot(model_dir)

    result = vlmopt("quantize", model_dir, *INT4, "--fallback", "--fallback-budget", "0.08")

    assert result.exit_code == 1, result.output
    assert "cannot be reached within a budget of 1 of 13 layers" in result.stderr
    best = re.search(r"the best cosine min found is ([0-9.]+), with ([01]) of 13 layers kept and the rest int4", result.stderr)
    assert best is not None, result.stderr
    assert float(best.group(1)) < 0.99
    assert snapshot(model_dir) == before


def test_the_search_stops_at_once_when_the_budget_cannot_reach_the_gate(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    result = vlmopt("quantize", copy_model_dir(converted("clip")), *INT4, "--fallback", "--fallback-budget", "0.08", "--json")

    report = json.loads(result.stdout)
    (step,) = report["fallback"]["towers"]["text"]["rounds"][0]["steps"][1:]
    assert step[0] == 1
    assert "no smaller set can pass" in report["error"]


def test_the_fallback_records_the_searched_and_the_held_out_figures(fell_back: tuple[Path, dict[str, Any]]) -> None:
    text = fell_back[1]["record"]["fallback"]["towers"]["text"]

    # fully quantized: each half, and the whole as the gate batches it; reached: searched, and the worse of the other two
    assert set(text["fully_quantized"]) == {"search", "held_out", "whole"} and set(text["reached"]) == {"search", "held_out"}
    assert text["reached"]["held_out"] >= 0.99
    assert text["rounds"][-1]["held_out"] == text["reached"]["held_out"]


def test_the_fallback_says_in_one_line_what_it_kept_and_what_it_cost(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    result = vlmopt("quantize", copy_model_dir(converted("clip")), *INT4, "--fallback", "--fallback-budget", "0.95")

    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("fallback of text:")]
    assert re.search(r"\d+ of 13 layers kept in fp32, cosine min [0-9.]+ -> [0-9.]+ on the held-out half", line), line
    assert re.search(r"time per batch of \d+x\d+ \(kernel time\) [0-9.]+ ms fp32, [0-9.]+ fully int8, [0-9.]+ with the kept layers: [0-9.]+x fp32", line), line


# -- the splice itself ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def splicer(fell_back: tuple[Path, dict[str, Any]], converted: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Splicer:
    """The tiny CLIP text tower, fp32 and fully int8-dynamic."""
    from vlmopt.stages.quantize import QuantizeOptions, int8_dynamic

    folder = tmp_path_factory.mktemp("splice")
    source = converted("clip") / "onnx" / "text.onnx"
    int8_dynamic(source, folder / "text.onnx", QuantizeOptions())
    fp32 = onnx.load(source)
    del fp32.graph.value_info[:]
    return Splicer(fp32, onnx.load(folder / "text.onnx"))


def _outputs(model: onnx.ModelProto) -> np.ndarray:
    import onnxruntime as ort

    feed = {"input_ids": np.array([[1022, 5, 6, 7, 1023], [1022, 9, 1023, 1023, 1023]], dtype=np.int64), "attention_mask": np.array([[1] * 5, [1, 1, 1, 0, 0]])}
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_reverting_no_layer_is_the_quantized_graph(splicer: Splicer) -> None:
    np.testing.assert_array_equal(_outputs(splicer.revert([])), _outputs(splicer.quantized))


def test_reverting_every_layer_is_the_fp32_graph(splicer: Splicer) -> None:
    np.testing.assert_allclose(_outputs(splicer.revert(splicer.candidates)), _outputs(splicer.fp32), atol=1e-5)


def test_the_probe_exposes_each_layers_fp32_and_quantized_output(splicer: Splicer) -> None:
    model, pairs = splicer.probe()

    assert set(pairs) == set(splicer.candidates)
    assert len(model.graph.output) == 1 + 2 * len(pairs)
