"""What vlmopt leaves in a model directory: files others can read, nothing from commands that wrote
nothing, and no needless rework when a source folder holds its own model directory."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import vlmopt, vlmopt_json
from vlmopt.workspace import ModelDir


def _modes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in [folder, *sorted(folder.rglob("*"))]}


def test_artifact_folders_files_and_the_manifest_honour_the_umask(demo_source: Callable[[str], Path], tmp_path: Path) -> None:
    mask = os.umask(0o022)
    try:
        vlmopt_json("export", demo_source("vit"), "-o", tmp_path / "model")
    finally:
        os.umask(mask)

    assert _modes(tmp_path / "model") == {
        ".": "0o755",
        "hf": "0o755",
        "hf/config.json": "0o644",
        "hf/model.safetensors": "0o644",
        "hf/preprocessor_config.json": "0o644",
        "vlmopt.json": "0o644",
    }


def _contents_and_times(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file's modification time, size and bytes: what "nothing written" keeps."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("command", [("convert",), ("convert", "--name", "bad/name")], ids=["skipped", "refused"])
def test_a_command_that_writes_nothing_leaves_every_file_untouched_the_lock_included(
    command: tuple[str, ...], converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]
) -> None:
    model_dir = copy_model_dir(converted("vit"))
    before = _contents_and_times(model_dir)

    result = vlmopt(command[0], model_dir, *command[1:])

    assert result.exit_code in (0, 2), result.output
    assert _contents_and_times(model_dir) == before


def test_a_command_refused_the_lock_changes_nothing(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("vit"))

    with ModelDir(model_dir).lock():
        before = _contents_and_times(model_dir)
        result = vlmopt("convert", model_dir, "--force")
        after = _contents_and_times(model_dir)

    assert result.exit_code == 2
    assert after == before


def test_the_lock_file_exists_only_while_a_command_holds_it(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("vit"))

    with ModelDir(model_dir).lock():
        held = (model_dir / ".vlmopt.lock").exists()

    assert held and not (model_dir / ".vlmopt.lock").exists()


def test_export_run_from_inside_its_source_is_skipped_the_second_time(
    demo_source: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "source"
    shutil.copytree(demo_source("vit"), source)
    monkeypatch.chdir(source)
    vlmopt_json("export", ".", "-o", "build")

    report = vlmopt_json("export", ".", "-o", "build")

    assert report["skipped"] is True


def test_an_export_into_a_folder_holding_only_what_a_killed_export_left_goes_ahead(demo_source: Callable[[str], Path], tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    (model_dir / ".tmp-hf-k1ll3d").mkdir(parents=True)
    (model_dir / ".tmp-hf-k1ll3d" / "model.safetensors").write_bytes(b"half written")
    (model_dir / ".vlmopt.lock").write_text("4242")

    vlmopt_json("export", demo_source("vit"), "-o", model_dir)

    assert sorted(p.name for p in model_dir.iterdir()) == ["hf", "vlmopt.json"]
