"""`vlmopt info`: what a model directory holds, and whether its files are still what the manifest says."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from conftest import vlmopt


def _statuses(model_dir: Path) -> dict[str, str]:
    result = vlmopt("info", model_dir, "--json")
    assert result.exit_code == 0, result.stderr
    return {a["name"]: a["status"] for a in json.loads(result.stdout)["artifacts"]}


def test_info_lists_every_artifact_as_ok_in_an_untouched_directory(converted: Callable[[str], Path]) -> None:
    assert _statuses(converted("clip")) == {"hf": "ok", "onnx": "ok"}


def test_info_reports_an_artifact_whose_file_was_changed_as_modified(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))
    with open(model_dir / "onnx" / "vision.onnx", "ab") as fh:
        fh.write(b"tampered")

    statuses = _statuses(model_dir)

    assert statuses["onnx"].startswith("modified")
    assert "vision.onnx" in statuses["onnx"]
    assert statuses["hf"] == "ok"


def test_info_verify_reports_a_same_size_content_change_as_modified(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))
    path = model_dir / "onnx" / "text.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))

    result = vlmopt("info", model_dir, "--verify", "--json")

    statuses = {a["name"]: a["status"] for a in json.loads(result.stdout)["artifacts"]}
    assert statuses["onnx"].startswith("modified")
    assert "text.onnx" in statuses["onnx"]


def test_info_reports_an_artifact_whose_parent_was_re_exported_as_stale(reexported_clip: Path) -> None:
    statuses = _statuses(reexported_clip)

    assert statuses == {"hf": "ok", "onnx": "stale: its parent 'hf' changed"}


def test_info_prints_a_table_of_the_artifacts(converted: Callable[[str], Path]) -> None:
    result = vlmopt("info", converted("clip"))

    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.strip("│┃ ").startswith("hf ") for line in lines), result.stdout
    assert any(line.strip("│┃ ").startswith("onnx ") for line in lines), result.stdout
    assert "passed" in result.stdout
