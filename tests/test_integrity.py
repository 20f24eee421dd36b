"""A stage uses its parent only as recorded; a missing artifact is never looked up on the hub; `info --verify` gates."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import assert_bad_input, snapshot, vlmopt, vlmopt_json


def _flip_last_byte(path: Path) -> None:
    """Change a file in place, keeping its size (what a careless edit or a bad copy does)."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


# -- parents are verified before use, and up-to-date checks see same-size changes ------------------------
def test_quantize_refuses_a_parent_changed_in_place_at_the_same_size(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))
    _flip_last_byte(model_dir / "onnx" / "vision.onnx")
    before = snapshot(model_dir)

    result = vlmopt("quantize", model_dir, "--mode", "int8-dynamic")

    assert_bad_input(result, "artifact 'onnx'", "vision.onnx changed content", "vlmopt convert", "--force")
    assert snapshot(model_dir) == before


def test_convert_refuses_an_hf_parent_with_a_missing_file(exported: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(exported("clip"))
    (model_dir / "hf" / "tokenizer.json").unlink()
    before = snapshot(model_dir)

    result = vlmopt("convert", model_dir)

    assert_bad_input(result, "artifact 'hf'", "tokenizer.json is missing", "vlmopt export")
    assert snapshot(model_dir) == before


def test_convert_redoes_an_onnx_artifact_changed_in_place_at_the_same_size(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("vit"))
    _flip_last_byte(model_dir / "onnx" / "vision.onnx")

    report = vlmopt_json("convert", model_dir)

    assert report["skipped"] is False
    assert vlmopt("info", model_dir, "--verify").exit_code == 0


def test_an_unchanged_parent_copied_with_new_times_is_hashed_and_accepted(converted: Callable[[str], Path], tmp_path: Path) -> None:
    model_dir = tmp_path / "copy"
    shutil.copytree(converted("vit"), model_dir, copy_function=shutil.copyfile)  # new mtimes, same bytes

    report = vlmopt_json("convert", model_dir)

    assert report["skipped"] is True


# -- a missing artifact is never a hub id --------------------------------------------------------------
def test_convert_after_the_hf_folder_was_removed_says_so_in_one_line(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("vit"))
    shutil.rmtree(model_dir / "hf")

    result = vlmopt("convert", model_dir, "--force")

    assert_bad_input(result, "artifact 'hf'", f"its folder {model_dir / 'hf'} is missing", "vlmopt export")


def test_convert_from_inside_the_directory_after_the_hf_folder_was_removed_never_asks_the_hub(
    converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = copy_model_dir(converted("vit"))
    shutil.rmtree(model_dir / "hf")
    monkeypatch.chdir(model_dir)

    result = vlmopt("convert", ".", "--force")

    assert_bad_input(result, "artifact 'hf'", "its folder hf is missing")


def test_a_local_folder_is_read_only_locally_even_when_it_looks_like_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlmopt.errors import VlmoptError
    from vlmopt.hf import load_config

    monkeypatch.chdir(tmp_path)

    with pytest.raises(VlmoptError, match="folder hf does not exist"):
        load_config(Path("hf"))


# -- info --verify as a gate ---------------------------------------------------------------------------
def test_info_verify_exits_0_when_every_artifact_is_ok(converted: Callable[[str], Path]) -> None:
    assert vlmopt("info", converted("clip"), "--verify").exit_code == 0


@pytest.mark.parametrize("damage", ["changed", "missing", "stale"])
def test_info_verify_exits_1_when_an_artifact_is_not_ok(
    damage: str, converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path], retrained_clip_source: Path
) -> None:
    model_dir = copy_model_dir(converted("clip"))
    if damage == "changed":
        _flip_last_byte(model_dir / "onnx" / "text.onnx")
    elif damage == "missing":
        (model_dir / "onnx" / "text.onnx").unlink()
    else:
        vlmopt_json("export", retrained_clip_source, "-o", model_dir)

    result = vlmopt("info", model_dir, "--verify", "--json")

    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["exit_code"] == 1
    assert "onnx" in report["error"]
    assert {a["name"]: a["status"] != "ok" for a in report["artifacts"]} == {"hf": False, "onnx": True}


def test_plain_info_lists_a_same_size_change_as_modified_and_exits_0(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))
    _flip_last_byte(model_dir / "onnx" / "text.onnx")

    result = vlmopt("info", model_dir, "--json")

    assert result.exit_code == 0
    statuses = {a["name"]: a["status"] for a in json.loads(result.stdout)["artifacts"]}
    assert statuses["onnx"] == "modified: text.onnx changed content"


# -- a backup an older vlmopt left --------------------------------------------------------------------
def test_a_recorded_artifact_left_only_in_a_backup_folder_is_restored_not_deleted(
    converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]
) -> None:
    model_dir = copy_model_dir(converted("vit"))
    before = snapshot(model_dir)
    os.rename(model_dir / "hf", model_dir / ".old-hf-4242")  # what a kill right after the first rename of a replacement left

    result = vlmopt("info", model_dir, "--verify")

    assert result.exit_code == 0, result.output
    assert snapshot(model_dir) == before
