"""`vlmopt optimize`: ONNX Runtime's transformer fusions on an fp32 export, verified against the unfused graph."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import TOWERS, manifest, snapshot, vlmopt, vlmopt_json

QUICK_BENCH = ("--iterations", "1", "--warmup", "0", "--batch", "1")


def _ops(path: Path, op_type: str) -> int:
    return sum(1 for node in onnx.load(path).graph.node if node.op_type == op_type)


def _padded_text_feed(batch: int = 3, sequence: int = 9) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    mask = np.ones((batch, sequence), dtype=np.int64)
    mask[-1, sequence // 2 :] = 0
    return {"input_ids": rng.integers(1, 1000, size=(batch, sequence), dtype=np.int64), "attention_mask": mask}


@pytest.fixture(scope="module")
def optimized_clip(tmp_path_factory: pytest.TempPathFactory, converted: Callable[[str], Path]) -> tuple[Path, dict[str, Any]]:
    """(model directory, the `onnx-opt` artifact as --json printed it) of the tiny CLIP, optimized once."""
    model_dir = tmp_path_factory.mktemp("optimized") / "clip"
    shutil.copytree(converted("clip"), model_dir)
    report = vlmopt_json("optimize", model_dir)
    return model_dir, report["artifact"]


# -- CLIP: every attention block fused ----------------------------------------------------------
@pytest.mark.parametrize("tower", ["vision", "text"])
def test_optimize_fuses_attention_in_every_layer_of_both_clip_towers(tower: str, optimized_clip: tuple[Path, dict[str, Any]]) -> None:
    model_dir, artifact = optimized_clip
    recorded = artifact["record"]["towers"][tower]

    assert recorded["attention_layers"] == 2  # the tiny demo CLIP has two layers per tower
    assert recorded["fused"]["Attention"] == recorded["attention_layers"]
    assert _ops(model_dir / "onnx-opt" / f"{tower}.onnx", "Attention") == recorded["attention_layers"]


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_attention_layers_counts_the_softmax_of_every_block_of_the_unfused_export(tower: str, optimized_clip: tuple[Path, dict[str, Any]]) -> None:
    model_dir, artifact = optimized_clip

    assert artifact["record"]["towers"][tower]["attention_layers"] == _ops(model_dir / "onnx" / f"{tower}.onnx", "Softmax")


def test_optimized_graphs_keep_no_unfused_softmax(optimized_clip: tuple[Path, dict[str, Any]]) -> None:
    model_dir, _ = optimized_clip

    for tower in TOWERS["clip"]:
        assert _ops(model_dir / "onnx-opt" / f"{tower}.onnx", "Softmax") == 0, tower


def test_optimized_clip_records_passed_verification_against_the_unfused_graph(optimized_clip: tuple[Path, dict[str, Any]]) -> None:
    _, artifact = optimized_clip
    verification = artifact["verification"]

    assert verification["passed"] is True
    assert verification["reference"] == "onnx"
    assert sorted(verification["towers"]) == ["text", "vision"]
    for checks in verification["towers"].values():
        for output in (o for check in checks for o in check["outputs"].values()):
            assert output["cosine_min"] >= verification["gates"]["min_cosine"], output
            assert output["max_abs_diff"] <= verification["gates"]["atol"], output


def test_optimized_artifact_records_its_parent_and_that_it_is_optimized_fp32(optimized_clip: tuple[Path, dict[str, Any]]) -> None:
    model_dir, artifact = optimized_clip

    assert artifact["parent"] == "onnx"
    assert artifact["parent_digest"] == manifest(model_dir)["artifacts"]["onnx"]["digest"]
    assert artifact["traits"]["fused"] is True
    assert artifact["traits"]["precision"] == "fp32"


def test_optimized_artifact_records_that_it_holds_onnxruntime_only_operators(optimized_clip: tuple[Path, dict[str, Any]]) -> None:
    _, artifact = optimized_clip

    assert artifact["traits"]["ort_only_ops"] == ["com.microsoft"]


def test_optimized_graphs_keep_the_exports_input_and_output_names(optimized_clip: tuple[Path, dict[str, Any]]) -> None:
    model_dir, _ = optimized_clip

    for tower in TOWERS["clip"]:
        fused, unfused = (onnx.load(model_dir / name / f"{tower}.onnx").graph for name in ("onnx-opt", "onnx"))
        assert [i.name for i in fused.input] == [i.name for i in unfused.input], tower
        assert [o.name for o in fused.output] == [o.name for o in unfused.output], tower


def test_fused_text_tower_matches_the_unfused_one_on_a_padded_batch(optimized_clip: tuple[Path, dict[str, Any]]) -> None:
    """The causal + padding mask reaches the fused Attention (it is renamed for the fusion and back)."""
    model_dir, _ = optimized_clip
    feed = _padded_text_feed()
    fused, unfused = (ort.InferenceSession(str(model_dir / name / "text.onnx"), providers=["CPUExecutionProvider"]) for name in ("onnx-opt", "onnx"))

    (expected,) = unfused.run(None, feed)
    (actual,) = fused.run(None, feed)

    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_optimized_graphs_declare_the_operator_domains_they_use(tower: str, optimized_clip: tuple[Path, dict[str, Any]]) -> None:
    model = onnx.load(optimized_clip[0] / "onnx-opt" / f"{tower}.onnx")

    assert "com.microsoft" in {o.domain for o in model.opset_import}
    onnx.checker.check_model(model)


def test_bench_runs_the_optimized_artifact(optimized_clip: tuple[Path, dict[str, Any]], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(optimized_clip[0])

    result = vlmopt("bench", model_dir, "onnx-opt", *QUICK_BENCH, "--json")

    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert sorted(r["tower"] for r in rows if r["artifact"] == "onnx-opt") == ["text", "vision"]


def test_optimize_rerun_with_unchanged_inputs_is_skipped(optimized_clip: tuple[Path, dict[str, Any]], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(optimized_clip[0])
    before = snapshot(model_dir)

    report = vlmopt_json("optimize", model_dir)

    assert report["skipped"] is True
    assert snapshot(model_dir) == before


def test_optimize_without_attention_fuses_no_attention_and_still_verifies(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))

    artifact = vlmopt_json("optimize", model_dir, "--no-attention", "--name", "onnx-noattn")["artifact"]

    assert artifact["verification"]["passed"] is True
    for tower, recorded in artifact["record"]["towers"].items():
        assert "Attention" not in recorded["fused"], tower
        assert _ops(model_dir / "onnx-noattn" / f"{tower}.onnx", "Softmax") == recorded["attention_layers"], tower


# -- the other families -------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["siglip", "vit", "bert"])
def test_optimize_writes_a_verified_artifact_for(family: str, converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted(family))

    artifact = vlmopt_json("optimize", model_dir)["artifact"]

    assert artifact["verification"]["passed"] is True
    assert sorted(artifact["towers"]) == sorted(TOWERS[family])
    assert sorted(p.name for p in (model_dir / "onnx-opt").glob("*.onnx")) == sorted(f"{t}.onnx" for t in TOWERS[family])


@pytest.mark.parametrize(("family", "tower"), [("vit", "vision"), ("bert", "text"), ("siglip", "text")])
def test_optimize_fuses_attention_in_every_layer_of(family: str, tower: str, converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted(family))

    recorded = vlmopt_json("optimize", model_dir)["artifact"]["record"]["towers"][tower]

    assert recorded["fused"].get("Attention", 0) == recorded["attention_layers"] > 0
