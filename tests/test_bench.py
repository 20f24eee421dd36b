"""`vlmopt bench`: PyTorch and ONNX Runtime measured side by side, reported and recorded."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import assert_bad_input, manifest, snapshot, vlmopt, vlmopt_json

QUICK = ("--iterations", "2", "--warmup", "0")


@pytest.fixture(scope="module")
def benched(tmp_path_factory: pytest.TempPathFactory, converted: Callable[[str], Path]) -> tuple[Path, dict[str, Any]]:
    """(model directory, JSON report) of one quick benchmark of the tiny CLIP at batches 1 and 2."""
    model_dir = tmp_path_factory.mktemp("bench") / "clip"
    shutil.copytree(converted("clip"), model_dir)
    result = vlmopt("bench", model_dir, "--batch", "1,2", *QUICK, "--json")
    assert result.exit_code == 0, result.stderr
    return model_dir, json.loads(result.stdout)


def test_bench_measures_pytorch_and_onnxruntime_for_every_tower_and_batch(benched: tuple[Path, dict[str, Any]]) -> None:
    _, report = benched

    measured = sorted((r["artifact"], r["backend"], r["tower"], r["batch"]) for r in report["rows"])

    expected = sorted((a, b, t, n) for a, b in (("hf", "pytorch"), ("onnx", "onnxruntime")) for t in ("vision", "text") for n in (1, 2))
    assert measured == expected


def test_bench_rows_report_latency_percentiles_and_throughput(benched: tuple[Path, dict[str, Any]]) -> None:
    _, report = benched

    for row in report["rows"]:
        latency = row["latency_ms"]
        assert all(latency[k] > 0 for k in ("mean", "p50", "p90", "p99")), row
        assert latency["p50"] <= latency["p90"] <= latency["p99"], row
        assert row["throughput"] > 0, row


def test_pytorch_reference_rows_have_speedup_one(benched: tuple[Path, dict[str, Any]]) -> None:
    _, report = benched

    assert [r["speedup"] for r in report["rows"] if r["artifact"] == "hf"] == [1.0] * 4


def test_onnx_rows_agree_with_pytorch_to_cosine_above_0_999(benched: tuple[Path, dict[str, Any]]) -> None:
    _, report = benched
    onnx_rows = [r for r in report["rows"] if r["artifact"] == "onnx"]

    assert len(onnx_rows) == 4
    for row in onnx_rows:
        assert row["cosine_min"] > 0.999, row
        assert row["speedup"] > 0, row


def test_bench_writes_json_and_markdown_reports(benched: tuple[Path, dict[str, Any]]) -> None:
    model_dir, report = benched

    (json_report,) = (model_dir / "reports").glob("bench-*.json")
    (md_report,) = (model_dir / "reports").glob("bench-*.md")

    assert json.loads(json_report.read_text())["rows"] == report["rows"]
    assert "| onnx | onnxruntime | vision | 1 |" in md_report.read_text()


def test_bench_records_its_results_on_the_onnx_artifact(benched: tuple[Path, dict[str, Any]]) -> None:
    model_dir, report = benched

    benchmark = manifest(model_dir)["artifacts"]["onnx"]["benchmark"]

    (json_report,) = (model_dir / "reports").glob("bench-*.json")
    assert benchmark["report"] == json_report.name
    assert benchmark["rows"] == [r for r in report["rows"] if r["artifact"] == "onnx"]


def test_bench_below_min_speedup_exits_1_and_still_writes_the_report(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))

    result = vlmopt("bench", model_dir, "--batch", "1", *QUICK, "--min-speedup", "1000000")  # the tiny model ran 9873x PyTorch on a loaded machine

    assert result.exit_code == 1, result.output
    assert "min-speedup" in result.stderr
    assert len(list((model_dir / "reports").glob("bench-*.json"))) == 1
    assert len(list((model_dir / "reports").glob("bench-*.md"))) == 1


def test_bench_of_an_unknown_artifact_is_bad_input(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))
    before = snapshot(model_dir)

    result = vlmopt("bench", model_dir, "no-such-artifact", "--batch", "1", *QUICK)

    assert_bad_input(result, "no-such-artifact")
    assert snapshot(model_dir) == before


@pytest.mark.parametrize("batch", ["0", "x", "1,-2"])
def test_bench_with_a_batch_that_is_not_a_positive_integer_is_bad_input(
    batch: str, converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]
) -> None:
    model_dir = copy_model_dir(converted("clip"))
    before = snapshot(model_dir)

    result = vlmopt("bench", model_dir, "--batch", batch, *QUICK)

    assert result.exit_code == 2, result.output
    assert "internal error" not in result.output
    assert snapshot(model_dir) == before


# -- fixed-shape artifacts ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def benched_static(tmp_path_factory: pytest.TempPathFactory, static_clip: Path) -> dict[str, Any]:
    """The JSON report of benchmarking the tiny CLIP converted with --static --batch-size 2 --seq-len 8."""
    model_dir = tmp_path_factory.mktemp("bench-static") / "clip"
    shutil.copytree(static_clip, model_dir)
    result = vlmopt("bench", model_dir, "--batch", "1,2", "--seq-len", "8", *QUICK, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_bench_reports_a_static_artifact_as_not_measured_at_other_shapes(static_clip: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(static_clip)

    report = vlmopt_json("bench", model_dir, "--batch", "2", "--tower", "text", *QUICK)

    assert [r["artifact"] for r in report["rows"]] == ["hf"]
    assert report["not_measured"] == [{"artifact": "onnx", "tower": "text", "batch": 2, "reason": "static shapes differ from this measurement's"}]


def test_bench_runs_a_static_artifact_only_at_its_fixed_batch(benched_static: dict[str, Any]) -> None:
    onnx_batches = {(r["tower"], r["batch"]) for r in benched_static["rows"] if r["artifact"] == "onnx"}

    assert onnx_batches == {("vision", 2), ("text", 2)}


def test_bench_compares_a_static_artifact_with_pytorch_on_the_same_inputs(benched_static: dict[str, Any]) -> None:
    onnx_rows = [r for r in benched_static["rows"] if r["artifact"] == "onnx"]

    assert onnx_rows
    for row in onnx_rows:
        assert row["cosine_min"] > 0.999, row


def test_bench_times_exactly_the_requested_iterations(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))

    report = vlmopt_json("bench", model_dir, "--tower", "vision", "--batch", "1", "--iterations", "7", "--warmup", "0")

    assert [r["latency_ms"]["iterations"] for r in report["rows"]] == [7, 7]
