"""A conversion that fails verification, or any stage failing midway, leaves the model directory as it was."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from conftest import leftovers, snapshot, vlmopt


def test_convert_failing_atol_exits_1_naming_the_tolerance(exported: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(exported("clip"))

    result = vlmopt("convert", model_dir, "--atol", "1e-12")

    assert result.exit_code == 1, result.output
    assert "atol" in result.stderr
    assert "Traceback" not in result.output


def test_convert_failing_atol_leaves_the_directory_unchanged(exported: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(exported("clip"))
    listing_before = sorted(p.name for p in model_dir.iterdir())
    manifest_before = (model_dir / "vlmopt.json").read_bytes()
    state_before = snapshot(model_dir)

    vlmopt("convert", model_dir, "--atol", "1e-12")

    assert sorted(p.name for p in model_dir.iterdir()) == listing_before
    assert (model_dir / "vlmopt.json").read_bytes() == manifest_before
    assert snapshot(model_dir) == state_before
    assert not (model_dir / "onnx").exists()
    assert leftovers(model_dir) == []


def test_forced_convert_failing_verification_keeps_the_previous_onnx_artifact(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))
    onnx_before = {p.name: p.read_bytes() for p in (model_dir / "onnx").iterdir()}
    manifest_before = (model_dir / "vlmopt.json").read_bytes()
    state_before = snapshot(model_dir)

    result = vlmopt("convert", model_dir, "--force", "--atol", "1e-12")

    assert result.exit_code == 1, result.output
    assert {p.name: p.read_bytes() for p in (model_dir / "onnx").iterdir()} == onnx_before
    assert (model_dir / "vlmopt.json").read_bytes() == manifest_before
    assert snapshot(model_dir) == state_before
    assert leftovers(model_dir) == []


def test_convert_failing_verification_with_json_prints_the_failed_verification(exported: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(exported("clip"))

    result = vlmopt("convert", model_dir, "--atol", "1e-12", "--json")

    report = json.loads(result.stdout)
    assert result.exit_code == 1
    assert report["ok"] is False
    assert report["exit_code"] == 1
    assert report["verification"]["passed"] is False
    assert not all(output["passed"] for checks in report["verification"]["towers"].values() for check in checks for output in check["outputs"].values())
