"""The model directory's write lock: a second writer is refused; the next holder clears what a killed one left."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from conftest import assert_bad_input, snapshot, vlmopt
from vlmopt.workspace import ModelDir


def test_convert_is_refused_while_another_writer_holds_the_lock(exported: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(exported("clip"))
    before = snapshot(model_dir)

    # flock locks belong to an open file description: this second open conflicts like another process would.
    with ModelDir(model_dir).lock():
        result = vlmopt("convert", model_dir)

    assert_bad_input(result, "in use")
    assert snapshot(model_dir) == before
    assert not (model_dir / "onnx").exists()


def test_the_lock_is_released_when_its_holder_is_done(exported: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(exported("clip"))
    with ModelDir(model_dir).lock():
        pass

    with ModelDir(model_dir).lock():
        pass


def test_taking_the_lock_removes_temporary_folders_a_killed_process_left(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))
    for leftover in (".tmp-onnx-k1ll3d", ".old-onnx-4242"):
        (model_dir / leftover).mkdir()
        (model_dir / leftover / "vision.onnx").write_bytes(b"half written")
    (model_dir / ".tmp-manifest.json").write_text("{")

    result = vlmopt("convert", model_dir)

    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in model_dir.iterdir()) == ["hf", "onnx", "vlmopt.json"]
